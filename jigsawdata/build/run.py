"""``build-shards``: COCO set -> grouped, shuffled, verified WebDataset shards.

Two phases, each resumable:

1. *extract* — images are cut into chunks (in image-id order); a worker process decodes a
   chunk's images once, encodes their crops and writes them to a staging blob plus a JSON
   record list, renamed into place when complete. Chunks already staged are skipped.
2. *write* — the staged records are read back as compact columns (:mod:`.records`, about
   100 bytes per crop); each aspect-ratio group is sorted, shuffled with a generator seeded
   from the build seed alone, split into shards by size, and written. Shards already
   written are kept. The index and the manifest come last.

Nothing is held per image or per crop as a Python object: the source is columns
(:class:`~.coco.ImageTable`), chunk tasks are made as workers take them, the negative top-up
keeps a few numbers per image, and the write phase holds the record columns.

Crop bytes depend only on ``(seed, image_id)`` and the shuffle only on the seed, so the output
is byte-identical whatever the worker count and however often the build was interrupted.
"""

from __future__ import annotations

import io
import json
import logging
import multiprocessing
import os
import shutil
from collections import Counter, OrderedDict
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from jigsawdata import __version__
from jigsawdata.coco.reader import DEFAULT_MAX_PIXELS, CocoSource, ImageRecord, load_image
from jigsawdata.errors import InputError
from jigsawdata.files import atomic_path, sha256_file, write_json_atomic, write_text_atomic
from jigsawdata.layout import (
    BUILD_RECORD,
    CARD_NAME,
    INDEX_NAME,
    MANIFEST_NAME,
    PART_MANIFEST_GLOB,
    PARTS_DIR,
    STAGING_GLOB,
    chunk_paths,
    part_index_path,
    part_manifest_path,
    shard_name,
    staging_dir,
)
from jigsawdata.settings import check, setting
from jigsawdata.shardset.card import attach_card, label_counts, license_text
from jigsawdata.shardset.index import SCHEMA, write_index_slices
from jigsawdata.shardset.manifest import (
    BACKGROUND_NAME,
    FORMAT_VERSION,
    ClassInfo,
    GroupInfo,
    Manifest,
    ShardInfo,
    SourceInfo,
    ToolInfo,
    read_manifest,
)
from jigsawdata.shardset.shards import index_path, write_shard

from .outdir import (
    BuildLock,
    check_out_location,
    claim_output,
    forget_written_shards,
    lock_path,
    record_shard,
    reusable_shard,
)
from .records import Records, index_table, load_records, shuffled_groups, split_shards
from .sampling import SamplingConfig, image_rng, negative_topups, plan_image, shuffle_rng, topup_rng

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]
"""``progress(stage, items_done, crops_done)``: called as work completes; stages are
``extract`` (items are images) and ``write`` (items are shards)."""


@dataclass(frozen=True)
class BuildConfig:
    seed: int = setting(0, "Seed of all sampling and of the shuffle.", min=0)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    jpeg_quality: int = setting(90, "JPEG quality of the crops written into the shards.", min=1, max=100)
    shard_size: int = setting(
        256_000_000,
        "Largest shard payload in bytes, also as 256MB or 1GiB (a single larger sample still gets a shard).",
        min=1,
    )
    shard_samples: int = setting(10_000, "Most samples per shard.", min=1)
    chunk_images: int = setting(64, "Images per work unit: the unit of parallel work and of resumption.", min=1)
    max_pixels: int = setting(
        DEFAULT_MAX_PIXELS,
        "Largest image (width x height) decoded; larger ones are skipped as image_too_large (decompression bombs).",
        min=1,
    )

    def __post_init__(self) -> None:
        check(self)


# ---------------------------------------------------------------- phase 1: extract


@dataclass(frozen=True)
class _ChunkTask:
    index: int
    images: tuple[ImageRecord, ...]
    images_dir: Path
    staging: Path
    cfg: BuildConfig
    background_label: int
    topups: tuple[int, ...] = ()
    """Extra negative placements per image (see :func:`negative_topups`); empty for none."""


def _file_state(path: Path) -> list[int] | None:
    """Size, modification and change time of a file, or None when there is none. The change
    time cannot be set by hand, so a file copied over another keeping its size and mtime
    still differs."""
    try:
        st = path.stat()
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def _file_digest(path: Path) -> str | None:
    try:
        return sha256_file(path)
    except OSError:
        return None


def _sources_still_hold(staging: Path, index: int, images_dir: Path) -> bool:
    """Whether a staged chunk was made from the files the build reads now: every image it read
    (used, or skipped for its file: missing, corrupt, ...) is unchanged. Unchanged is proved
    cheaply when the folder and each file's state are those recorded, and otherwise by the
    file's sha256: a moved folder is re-hashed, not re-extracted, while a folder with the same
    names and sizes but other pixels, or images copied in or fixed since, makes the chunk stale."""
    path = chunk_paths(staging, index)[2]
    if not path.is_file():
        return False  # staged by a build that recorded no sources: nothing proves it
    recorded = json.loads(path.read_text())
    same_dir = recorded["images_dir"] == os.path.realpath(images_dir)
    for name, state, digest in recorded["files"]:
        now = images_dir / name
        if not (same_dir and _file_state(now) == state) and _file_digest(now) != digest:
            return False
    return True


def _encode_jpeg(image, quality: int) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _extract_chunk(task: _ChunkTask) -> tuple[int, int]:
    """Decode a chunk's images, encode their crops, stage them. Returns (images, crops)."""
    blob_path, meta_path, _ = chunk_paths(task.staging, task.index)
    records, skipped, counts, exif, files = [], [], Counter(), [], []
    with atomic_path(blob_path) as tmp_blob, open(tmp_blob, "wb") as blob:
        for i, image in enumerate(task.images):
            if not image.skip:  # a file read: recorded before decoding, so a change during it shows
                file = Path(task.images_dir) / image.file_name
                files.append([image.file_name, _file_state(file), _file_digest(file)])
            decoded = load_image(image, task.images_dir, task.cfg.max_pixels)
            pixels, reason = decoded.image, decoded.skip
            if decoded.exif_orientation is not None:
                exif.append(
                    {
                        "image_id": image.image_id,
                        "file_name": image.file_name,
                        "exif_orientation": decoded.exif_orientation,
                    }
                )
            if pixels is None:
                counts[reason] += 1
                skipped.append({"image_id": image.image_id, "file_name": image.file_name, "reason": reason})
                continue
            counts["images_used"] += 1
            crops, image_counts = plan_image(
                image,
                task.cfg.sampling,
                task.background_label,
                image_rng(task.cfg.seed, image.image_id),
                task.topups[i] if task.topups else 0,
                topup_rng(task.cfg.seed, image.image_id),
            )
            counts.update(image_counts)
            for crop in crops:
                data = _encode_jpeg(pixels.crop(crop.crop_box), task.cfg.jpeg_quality)
                records.append(
                    {
                        "key": crop.key,
                        "image_id": crop.image_id,
                        "ann_id": crop.ann_id,
                        "category_id": crop.category_id,
                        "label": crop.label,
                        "group": crop.group,
                        "gt_box": list(crop.gt_box) if crop.gt_box else None,
                        "crop_box": list(crop.crop_box),
                        "width": crop.width,
                        "height": crop.height,
                        "source": image.file_name,
                        "offset": blob.tell(),
                        "size": len(data),
                    }
                )
                blob.write(data)
    write_text_atomic(
        chunk_paths(task.staging, task.index)[2],
        json.dumps({"images_dir": os.path.realpath(task.images_dir), "files": files}),
    )
    write_text_atomic(
        meta_path,
        json.dumps(
            {"records": records, "skipped_images": skipped, "counts": dict(counts), "exif": exif}, separators=(",", ":")
        ),
    )
    return len(task.images), len(records)


def _run_extract(tasks: Iterable[_ChunkTask], workers: int, progress: Progress | None) -> None:
    """Run the tasks, made one at a time as workers take them: a chunk's image records exist
    only while it waits or runs."""

    def report(done: tuple[int, int]) -> None:
        if progress:
            progress("extract", *done)

    if workers <= 1:
        for task in tasks:
            report(_extract_chunk(task))
        return
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        for done in pool.imap_unordered(_extract_chunk, tasks):
            report(done)


# ---------------------------------------------------------------- phase 2: write


class _BlobReader:
    """Random access to staged crops with a bounded number of open files."""

    def __init__(self, staging: Path, max_open: int = 128) -> None:
        self._staging, self._max_open = staging, max_open
        self._open: OrderedDict[int, int] = OrderedDict()

    def read(self, chunk: int, offset: int, size: int) -> bytes:
        fd = self._open.pop(chunk, None)
        if fd is None:
            fd = os.open(chunk_paths(self._staging, chunk)[0], os.O_RDONLY)
            if len(self._open) >= self._max_open:
                os.close(self._open.popitem(last=False)[1])
        self._open[chunk] = fd
        return os.pread(fd, size, offset)

    def close(self) -> None:
        for fd in self._open.values():
            os.close(fd)
        self._open.clear()


# ---------------------------------------------------------------- the build


def _identity(source: CocoSource, cfg: BuildConfig, parts: int, license: str | None) -> Manifest:
    """The manifest's fields that identify this build (``build_fields``), before any shard."""
    return Manifest(
        FORMAT_VERSION,
        groups={},
        classes=source.classes,
        background=ClassInfo(source.background_label, 0, BACKGROUND_NAME),
        tool=ToolInfo("jigsawdata", __version__),
        source=SourceInfo(
            source.ann_file.name,
            source.ann_sha256,
            len(source.images),
            source.orphan_annotations,
            license_text(source.from_coco, license),
            bool(license),
        ),
        params=asdict(cfg),
        parts=parts,
    )


def _differences(a: dict, b: dict) -> list[str]:
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def build_shards(
    source: CocoSource,
    out: Path,
    cfg: BuildConfig,
    *,
    workers: int = 1,
    part: int = 0,
    parts: int = 1,
    keep_staging: bool = False,
    progress: Progress | None = None,
    license: str | None = None,
) -> Manifest:
    """Build (or resume, or confirm) the shard set of ``part`` of ``parts`` under ``out``.

    Returns the manifest. With ``parts > 1`` this writes a partial manifest under
    ``out/parts``; :func:`jigsawdata.build.merge.merge_parts` joins them. ``out`` must be new,
    empty or hold a build of jigsawdata (:mod:`jigsawdata.build.outdir`); one build per part runs
    there at a time.
    """
    if not 0 <= part < parts:
        raise InputError(f"part must be in [0, {parts}), got {part}")
    if parts > len(source.images):  # before anything is written: a part without images could never be merged
        raise InputError(
            f"{parts} parts of {len(source.images)} images would leave parts without images: "
            f"use at most {len(source.images)} parts"
        )
    out = Path(out)
    check_out_location(out, source)
    claim_output(out)
    with BuildLock(lock_path(out, staging_dir(out, part, parts))):
        return _build_locked(
            source,
            out,
            cfg,
            workers=workers,
            part=part,
            parts=parts,
            keep_staging=keep_staging,
            progress=progress,
            license=license,
        )


def _build_locked(
    source: CocoSource,
    out: Path,
    cfg: BuildConfig,
    *,
    workers: int,
    part: int,
    parts: int,
    keep_staging: bool,
    progress: Progress | None,
    license: str | None,
) -> Manifest:
    identity = _identity(source, cfg, parts, license)
    fingerprint = identity.build_fields()
    manifest_path = out / MANIFEST_NAME if parts == 1 else part_manifest_path(out, part, parts)
    index_file = out / INDEX_NAME if parts == 1 else part_index_path(out, part, parts)
    staging = staging_dir(out, part, parts)
    _check_same_build(fingerprint, manifest_path, staging / BUILD_RECORD, out)
    if manifest_path.is_file():
        log.info("%s is complete already; nothing to do", manifest_path)
        return read_manifest(manifest_path)
    staging.mkdir(parents=True, exist_ok=True)
    write_json_atomic(staging / BUILD_RECORD, fingerprint)

    mine = source.images[part::parts]  # a view: image records are made chunk by chunk
    chunks = -(-len(mine) // cfg.chunk_images)

    def chunk(i: int) -> slice:
        return slice(i * cfg.chunk_images, (i + 1) * cfg.chunk_images)

    stale = [
        i
        for i in range(chunks)
        if chunk_paths(staging, i)[1].is_file() and not _sources_still_hold(staging, i, source.images_dir)
    ]
    if stale:
        log.warning(
            "%d staged chunks were made from image files that have changed since (or another --image-dir): "
            "extracting them again",
            len(stale),
        )
        forget_written_shards(staging)  # their records change, and with them every shard
        for i in stale:
            chunk_paths(staging, i)[1].unlink()
    pending = [i for i in range(chunks) if not chunk_paths(staging, i)[1].is_file()]
    staged = chunks - len(pending)
    if progress and staged:
        progress("extract", len(mine) - sum(len(mine[chunk(i)]) for i in pending), 0)
    log.info(
        "extracting crops from %d images in %d chunks (%d staged already), %d workers",
        len(mine),
        chunks,
        staged,
        workers,
    )
    if pending:
        topups = negative_topups(mine, cfg.sampling, source.background_label, cfg.seed)
        _run_extract(
            (
                _ChunkTask(
                    i,
                    tuple(mine[chunk(i)]),
                    source.images_dir,
                    staging,
                    cfg,
                    source.background_label,
                    tuple(topups[chunk(i)].tolist()),
                )
                for i in pending
            ),
            workers,
            progress,
        )

    skipped, counts, exif = [], Counter({"images": len(mine)}), []

    def read_chunk(i: int) -> list[dict]:
        meta = json.loads(chunk_paths(staging, i)[1].read_text())
        skipped.extend(meta["skipped_images"])
        counts.update(meta["counts"])
        exif.extend(meta.get("exif", []))
        return meta["records"]

    records = load_records(chunks, read_chunk, staging / "samples-json.bin")
    if not len(records):
        raise InputError(
            f"no crops could be extracted from {len(mine)} images "
            f"({dict(counts)}): check the image folder and the annotations"
        )

    samples = records.samples
    groups, shard_names, order, shard_of_row = _write_shards(records, out, staging, cfg, part, parts, progress)
    del records  # the staging locations are done with: let them go before the index is made
    samples.reorder(order)
    del order

    manifest_path.parent.mkdir(exist_ok=True)
    write_index_slices(
        index_file,
        len(samples),
        lambda start, end: index_table(samples, slice(start, end), shard_of_row[start:end], shard_names, SCHEMA),
    )
    manifest = replace(
        identity,
        part=part if parts > 1 else None,
        groups=dict(sorted(groups.items())),
        counts=dict(sorted(counts.items())),
        skipped_images=sorted(skipped, key=lambda s: s["image_id"]),
        exif_orientation=sorted(exif, key=lambda e: e["image_id"]) if exif else None,
        index=os.path.relpath(index_file, out),
        index_sha256=sha256_file(index_file),
    )
    if parts == 1:
        manifest, card = attach_card(manifest, label_counts(samples.label))
        write_text_atomic(out / CARD_NAME, card)
    manifest.write(manifest_path)
    if not keep_staging:
        shutil.rmtree(staging)
    log.info("wrote %s: %s", manifest_path, {g: v.samples for g, v in manifest.groups.items()})
    return manifest


def _write_shards(
    records: Records, out: Path, staging: Path, cfg: BuildConfig, part: int, parts: int, progress: Progress | None
) -> tuple[dict, list[str], np.ndarray, np.ndarray]:
    """Shuffle each group, split it into shards and write those not written already. Returns
    the manifest's groups, the shard names, and every row in shard order with the number of
    its shard."""
    groups, shard_names, shard_sizes = {}, [], []
    order, spans = shuffled_groups(records.samples, lambda gi: shuffle_rng(cfg.seed, part, gi))
    reader = _BlobReader(staging)
    try:
        with open(staging / "samples-json.bin", "rb") as metas:
            for group, span in spans.items():
                (out / group).mkdir(exist_ok=True)
                rows, infos = order[span], []
                for si, (start, end) in enumerate(
                    split_shards(records.staged.size[rows], cfg.shard_size, cfg.shard_samples)
                ):
                    name = shard_name(group, part, parts, si)
                    path, shard_rows = out / name, rows[start:end]
                    info = reusable_shard(staging, name, path, len(shard_rows))
                    if info is None:
                        n, nbytes, digest = write_shard(path, _shard_samples(records, shard_rows, reader, metas))
                        info = ShardInfo(name, n, nbytes, digest, sha256_file(index_path(path)))
                        record_shard(staging, info)
                    infos.append(info)
                    shard_names.append(name)
                    shard_sizes.append(len(shard_rows))
                    if progress:
                        progress("write", 1, info.samples)
                groups[group] = GroupInfo.of(infos)
    finally:
        reader.close()
    return groups, shard_names, order, np.repeat(np.arange(len(shard_names), dtype=np.int32), shard_sizes)


def _shard_samples(
    records: Records, rows: np.ndarray, reader: _BlobReader, metas
) -> Iterator[tuple[str, list[tuple[str, bytes]]]]:
    samples, staged = records.samples, records.staged
    for r in rows:
        yield (
            samples.key[r].decode("ascii"),
            [
                ("jpg", reader.read(int(staged.chunk[r]), int(staged.offset[r]), int(staged.size[r]))),
                ("cls", str(samples.label[r]).encode()),
                ("json", os.pread(metas.fileno(), int(staged.meta_size[r]), int(staged.meta_offset[r]))),
            ],
        )


def _check_same_build(fingerprint: dict, manifest_path: Path, staged_path: Path, out: Path) -> None:
    """Refuse to resume, overwrite or join a build made from other inputs or settings: this
    part's manifest and staging area, and those of every other part already in ``out``
    (a ``--part 0/3`` build would otherwise rewrite the shards of a finished ``--part 0/2``)."""
    others = sorted((out / PARTS_DIR).glob(PART_MANIFEST_GLOB)) + sorted(out.glob(f"{STAGING_GLOB}/{BUILD_RECORD}"))
    for path in (manifest_path, staged_path, out / MANIFEST_NAME, *others):
        if path.is_file():
            try:
                previous = json.loads(path.read_text())
            except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
                raise InputError(f"{path} is not valid JSON ({exc}): restore it, or use another --out") from exc
            if not isinstance(previous, dict):
                raise InputError(f"{path} is not a manifest (a JSON object): restore it, or use another --out")
            previous = {k: previous.get(k) for k in fingerprint}
            diff = _differences(previous, fingerprint)
            if diff:
                raise InputError(
                    f"{out} holds a build with different {', '.join(diff)}; use another --out or delete it"
                )
