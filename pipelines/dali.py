"""The jigsaw pipeline on NVIDIA DALI: GPU (nvJPEG + CUDA kernels) or DALI's CPU backend.

Four webdataset readers — two over the S shards with different seeds, one over T, one
over W — feed one graph (all readers of a DALI pipeline share a batch size, which is how two
S crops per image are drawn). Per sample, from the JPEG header alone: draw the random resize
(aspect kept) and the region window, and order the two S crops by resized area; then decode
only the source pixels that reach the window and resample them into it with a random
horizontal flip. The four pieces are pasted onto a zero canvas (which zero-pads the axes
smaller than a region) and normalised. ``device`` selects where this runs; the graph is the
same but for the decoder and the stitch (see :func:`_fit_windows` and :func:`_pad_and_cat`).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import replace
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from jigsawdata.errors import InputError, first_line
from jigsawdata.shardset.location import is_url
from jigsawdata.shardset.open import GroupShards, ShardSet, as_shard_set, check_enough_samples

from .config import IMAGENET_MEAN, IMAGENET_STD, JigsawConfig
from .ranks import process_info
from .template import READER_GROUPS, Template

log = logging.getLogger(__name__)

READERS: tuple[tuple[str, str], ...] = tuple(zip(("S0", "S1", "T", "W"), READER_GROUPS))
_PLACEMENTS = (("S0", "W", "T", "S1"), ("S1", "W", "T", "S0"))
"""The reader whose piece fills each region (TL, TR, BL, BR): the smaller S crop top-left, the
larger bottom-right (docs/method.md 3). The first order holds unless S0 is the larger (ties keep
reader order)."""
_MAX_LABEL_DIGITS = 9
_ROI_MARGIN = 4.0
"""Source pixels decoded around a window's ROI: more than the bilinear filter's support at
the smallest resize (1 / 0.8 px) plus the reach of 2x chroma upsampling."""


def reader_seed(seed: int, reader: int) -> int:
    """A distinct, positive 31-bit seed per reader, derived from the pipeline seed."""
    return int(np.random.SeedSequence([seed, reader]).generate_state(1)[0] & 0x7FFFFFFF)


def _label_bytes(cls):
    """The ``.cls`` component (ASCII decimal) zero-padded to a fixed width, so a batch of
    them is one dense tensor; :func:`parse_labels` turns it into integers on the torch side,
    which costs nothing there and saves a dozen graph operators per reader here."""
    from nvidia.dali import fn

    return fn.pad(cls, shape=[_MAX_LABEL_DIGITS], fill_value=0)


def parse_labels(digits: torch.Tensor) -> torch.Tensor:
    """(..., D) uint8 ASCII digits, zero-padded at the end -> (...) int64."""
    d = digits.to(torch.int64)
    valid = d >= 48
    value = torch.zeros(d.shape[:-1], dtype=torch.int64, device=d.device)
    for i in range(d.shape[-1]):
        value = torch.where(valid[..., i], value * 10 + d[..., i] - 48, value)
    return value


def _read(
    group: GroupShards, name: str, seed: int, cfg: JigsawConfig, shard_id: int, num_shards: int, pad_last_batch: bool
):
    from nvidia.dali import fn

    jpg, cls = fn.readers.webdataset(
        paths=list(group.tars),
        index_paths=list(group.indexes),
        ext=["jpg", "cls"],
        missing_component_behavior="error",
        random_shuffle=cfg.shuffle,
        initial_fill=cfg.initial_fill,
        seed=seed,
        shard_id=shard_id,
        num_shards=num_shards,
        pad_last_batch=pad_last_batch,
        name=name,
    )
    return jpg, _label_bytes(cls)


def _constant(values):
    """A float32 constant tensor (the same for every sample)."""
    from nvidia.dali import types

    return types.Constant(np.asarray(values, dtype=np.float32))


def _source_sizes(jpgs):
    """``[height, width]`` of each reader's sample as one ``(readers, 2)`` float tensor, from
    the JPEG headers alone. Every geometry step below is one operator for all four readers:
    DALI's CPU operators cost about a microsecond per sample each, whatever they compute, so
    the jigsaw's arithmetic is done on stacked tensors rather than per reader."""
    from nvidia.dali import fn, types

    return fn.stack(*(fn.peek_image_shape(j, dtype=types.FLOAT) for j in jpgs))[:, 0:2]


def _resized_sizes(source, cfg: JigsawConfig):
    """The random resize (aspect kept), drawn before anything is decoded."""
    import nvidia.dali.math as dmath
    from nvidia.dali import fn

    lo, hi = cfg.scale
    if cfg.fit != "pad_crop" or (lo, hi) == (1.0, 1.0):
        return source
    scale = fn.random.uniform(range=[lo, hi], shape=[len(READERS), 1]) if hi > lo else lo
    return dmath.max(dmath.floor(source * scale + 0.5), 1.0)


def _regions(template: Template, swap):
    """Per reader, the ``[height, width]`` and the canvas origin ``[y, x]`` of its region,
    under the placement ``swap`` selects (see ``_PLACEMENTS``). The pieces stay in reader
    order and only their places change, so the comparison routes no image data."""
    boxes = np.array(template.boxes, dtype=np.float32)  # (x0, y0, x1, y1), region order
    size, origin = boxes[:, [3, 2]] - boxes[:, [1, 0]], boxes[:, [1, 0]]
    kept, swapped = ([order.index(name) for name, _ in READERS] for order in _PLACEMENTS)
    return tuple(_constant(a[kept]) + _constant(a[swapped] - a[kept]) * swap for a in (size, origin))


def _positions(cfg: JigsawConfig):
    """Window positions ``[y, x]`` per reader, as fractions of the slack (see
    :func:`jigsawdata.pipelines.fit.window_anchor`)."""
    from nvidia.dali import fn

    if cfg.crop_pos is not None:
        return _constant(np.full((len(READERS), 2), cfg.crop_pos))
    return fn.random.uniform(range=[0.0, 1.0], shape=[len(READERS), 2])


def _mirror(cfg: JigsawConfig):
    """A random horizontal flip per sample (one reader's)."""
    from nvidia.dali import fn

    return fn.random.coin_flip(probability=cfg.flip_p) if cfg.flip_p > 0 else 0


def _fit_windows(jpgs, source, resized, size, pos, cfg: JigsawConfig, decoder: str):
    """pad_crop: resample only the source pixels that can reach each region.

    The resized sample's region-sized window ``[anchor, anchor + window)`` (per axis,
    ``anchor = round(pos * slack)``, the window clamped to the resized size) maps back to
    ``[anchor, anchor + window) * source / resized`` in the source crop: the ROI that
    ``resize_crop_mirror`` resamples into the window. On the CPU only that ROI, plus a
    margin of ``_ROI_MARGIN`` pixels for the resampling filter's support and the JPEG
    decoder's chroma upsampling, is decoded (``decoders.image_slice``: libjpeg-turbo skips
    the rest), and the pixels equal those of a whole decode. nvJPEG decodes whole crops
    faster than it decodes regions with fancy upsampling (measured on an H200: 5,273 vs 3,933
    images/s), so the GPU decodes them whole. Returns the pieces (each at most region-sized)
    and their offsets ``[y, x]`` in their regions: an axis smaller than its region is placed
    by ``pos`` and the rest of the region stays zero.
    """
    import nvidia.dali.math as dmath
    from nvidia.dali import fn, types

    window = dmath.min(resized, size)
    anchor = dmath.floor(pos * (resized - window) + 0.5)
    lo = anchor * source / resized
    hi = (anchor + window) * source / resized
    if decoder == "mixed":
        images = [fn.decoders.image(j, device=decoder, output_type=types.RGB, jpeg_fancy_upsampling=True) for j in jpgs]
    else:
        start = dmath.max(dmath.floor(lo) - _ROI_MARGIN, 0.0)
        end = dmath.min(dmath.ceil(hi) + _ROI_MARGIN, source)
        first, last = fn.cast(start, dtype=types.INT32), fn.cast(end, dtype=types.INT32)
        images = [
            fn.decoders.image_slice(
                j, start=first[i], end=last[i], axis_names="HW", device=decoder, output_type=types.RGB
            )
            for i, j in enumerate(jpgs)
        ]
        lo, hi = lo - start, hi - start
    pieces = [
        fn.resize_crop_mirror(
            image,
            size=window[i],
            roi_start=lo[i],
            roi_end=hi[i],
            mirror=_mirror(cfg),
            interp_type=types.INTERP_LINEAR,
            antialias=True,
        )
        for i, image in enumerate(images)
    ]
    return pieces, dmath.floor(pos * (size - window) + 0.5)


def _fit_whole(jpgs, size, pos, cfg: JigsawConfig, decoder: str):
    """The warp / resize ablations: each whole sample is resized to (or into) its region,
    then padded to it; the pieces fill their regions (offsets zero)."""
    from nvidia.dali import fn, types

    pieces = []
    for i, jpg in enumerate(jpgs):
        # nvJPEG upsamples chroma like libjpeg-turbo only when asked: the shards are 4:2:0.
        image = fn.decoders.image(jpg, device=decoder, output_type=types.RGB, jpeg_fancy_upsampling=True)
        rh, rw = size[i, 0], size[i, 1]
        mode = "not_larger" if cfg.fit == "resize" else "default"
        piece = fn.resize(image, resize_x=rw, resize_y=rh, mode=mode, interp_type=types.INTERP_LINEAR)
        if cfg.flip_p > 0:
            piece = fn.flip(piece, horizontal=_mirror(cfg))
        pieces.append(
            fn.crop(
                piece,
                crop_w=rw,
                crop_h=rh,
                crop_pos_x=pos[i, 1],
                crop_pos_y=pos[i, 0],
                out_of_bounds_policy="pad",
                fill_values=0,
            )
        )
    return pieces, 0.0


def _paste(pieces, origin, offset, template: Template):
    """The CPU stitch: one ``multi_paste`` of the four pieces onto a zero canvas, which pads
    and stitches at once, about eight times cheaper than padding each piece and concatenating
    the regions with DALI's CPU ``crop`` and ``cat`` (which runs on one thread)."""
    from nvidia.dali import fn, types

    return fn.multi_paste(
        *pieces, out_anchors=fn.cast(origin + offset, dtype=types.INT32), output_size=[template.canvas, template.canvas]
    )


def _pad_and_cat(pieces, size, pos, swap):
    """The GPU stitch: pad each piece to its region, placed by ``pos`` as :func:`_fit_windows`
    places it, then concatenate the regions. Gives the canvas :func:`_paste` gives (a test
    checks this on the CPU); the GPU uses it because DALI's GPU ``multi_paste`` was never
    run here with inputs of different shapes."""
    from nvidia.dali import fn

    s0, s1, tall, wide = (
        fn.crop(
            piece,
            crop_h=size[i, 0],
            crop_w=size[i, 1],
            crop_pos_y=pos[i, 0],
            crop_pos_x=pos[i, 1],
            out_of_bounds_policy="pad",
            fill_values=0,
        )
        for i, piece in enumerate(pieces)
    )
    if swap:
        small, large = s1, s0
    else:
        small, large = s0, s1
    return fn.cat(fn.cat(small, wide, axis=1), fn.cat(tall, large, axis=1), axis=0)


def _placed_labels(labels, swap):
    """``(4, digits)`` uint8 labels in region order (see :func:`parse_labels`)."""
    from nvidia.dali import fn

    by_reader = dict(zip((name for name, _ in READERS), labels))
    kept, swapped = (fn.stack(*(by_reader[name] for name in order)) for order in _PLACEMENTS)
    if swap:
        placed = swapped
    else:
        placed = kept
    return placed


def _local_shards(root: ShardSet | Path | str) -> ShardSet:
    """``root`` opened (see :func:`~jigsawdata.shardset.open.as_shard_set`); a URL is refused in
    one line, as DALI's readers take local files only."""
    where = root.root if isinstance(root, ShardSet) else root
    if is_url(str(where)):
        raise InputError(
            f"DALI reads local shards only: `jigsawdata fetch {where} --out DIR` first "
            "(pretrain --shards URL does this into a cache)"
        )
    return as_shard_set(root)


def jigsaw_pipeline(
    root: ShardSet | Path | str,
    batch_size: int,
    cfg: JigsawConfig,
    *,
    device: str = "cpu",
    num_threads: int = 4,
    device_id: int | None = None,
    shard_id: int = 0,
    num_shards: int = 1,
    fp16: bool = False,
    prefetch_queue_depth: int = 2,
    checkpoint: bytes | None = None,
    pad_last_batch: bool = False,
):
    """Build (not yet started) the DALI pipeline over the shard set ``root`` (opened, or its folder).

    Outputs ``images`` (N, canvas, canvas, 3) float (fp16 on request) and ``labels``
    (N, 4) uint8 ASCII digits in region order TL, TR, BL, BR (see :func:`parse_labels`).
    ``pad_last_batch`` evens out the ranks' shares, so that every rank's epoch has the same
    number of batches (DistributedDataParallel would otherwise wait for the shortest).
    """
    from nvidia.dali import fn, pipeline_def, types

    if device not in ("cpu", "gpu"):
        raise ValueError(f"device must be 'cpu' or 'gpu', got {device!r}")
    if device == "gpu" and device_id is None:
        raise ValueError("device='gpu' needs a device_id")
    shards = _local_shards(root)

    @pipeline_def(
        batch_size=batch_size,
        num_threads=num_threads,
        device_id=device_id if device == "gpu" else None,
        seed=reader_seed(cfg.seed, len(READERS)),
        enable_conditionals=True,
        prefetch_queue_depth=prefetch_queue_depth,
        exec_dynamic=True,
        enable_checkpointing=True,
    )
    def pipe():
        decoder = "mixed" if device == "gpu" else "cpu"
        jpgs, labels = zip(
            *(
                _read(shards.groups[group], name, reader_seed(cfg.seed, i), cfg, shard_id, num_shards, pad_last_batch)
                for i, (name, group) in enumerate(READERS)
            )
        )
        source = _source_sizes(jpgs)
        resized = _resized_sizes(source, cfg)
        # The smaller S crop goes top-left, the larger bottom-right (ties keep reader order);
        # decided from the JPEG headers, before anything is decoded.
        area = resized[:, 0] * resized[:, 1]
        swap = area[0] > area[1]
        size, origin = _regions(cfg.template, swap)
        pos = _positions(cfg)
        if cfg.fit == "pad_crop":
            pieces, offset = _fit_windows(jpgs, source, resized, size, pos, cfg, decoder)
        else:
            pieces, offset = _fit_whole(jpgs, size, pos, cfg, decoder)
        if device == "gpu":
            image = _pad_and_cat(pieces, size, pos, swap)
        else:
            image = _paste(pieces, origin, offset, cfg.template)
        # HWC out, permuted to NCHW on the torch side: channels_last memory without a copy.
        images = fn.crop_mirror_normalize(
            image,
            dtype=types.FLOAT16 if fp16 else types.FLOAT,
            output_layout="HWC",
            mean=[m * 255 for m in IMAGENET_MEAN],
            std=[s * 255 for s in IMAGENET_STD],
        )
        return images, _placed_labels(labels, swap)

    return pipe(checkpoint=checkpoint)


INSTALL_DALI = "pip install 'jigsawdata[dali]' (or 'jigsawdata[dali-cuda120]' for a CUDA 12 driver)"


def dali_missing() -> str | None:
    """Why DALI (a separate, CUDA-versioned wheel) cannot be imported; None when it can."""
    try:
        import nvidia.dali  # noqa: F401
    except ImportError as exc:
        return str(exc)
    return None


def require_dali(instead: str = "use --pipeline reference") -> None:
    """Fail with one line that says what to install, or what to do ``instead``, without DALI."""
    missing = dali_missing()
    if missing:
        raise InputError(f"NVIDIA DALI cannot be imported ({missing}): {INSTALL_DALI}, or {instead}")


def part_config(cfg: JigsawConfig, part: int) -> JigsawConfig:
    """The settings of a loader's ``part``-th pipeline: its own seed (part 0 keeps the
    loader's), so that the pipelines draw independent augmentations."""
    if part == 0:
        return cfg
    return replace(cfg, seed=int(np.random.SeedSequence([cfg.seed, part]).generate_state(1)[0] & 0x7FFFFFFF))


class DaliJigsawLoader:
    """Batches of ``(images, labels)`` torch tensors from the DALI pipeline.

    Iteration never ends (training is iteration-based) unless ``epoch=True``, in which case
    one pass over this rank's share of the S shards (first S reader) is one epoch.
    In a torchrun job each rank reads its own 1/world share of every group. :meth:`state`
    returns DALI's checkpoint of the readers and random generators; passing it back as
    ``checkpoint`` continues exactly where that state was taken.

    ``pipelines`` > 1 runs that many copies of the graph, each over its own share of the
    rank's samples (with its own seed), and takes their batches in turn, as a DataLoader
    takes its workers'. DALI runs a pipeline's CPU operators one at a time, so its threads
    wait while the executor sets up each of the ~100 operators: on two cores, one pipeline
    of two threads kept 1.7 cores busy, two pipelines of one thread 2.0 (and gave 1.37x the
    images/s). :meth:`state` then holds every pipeline's checkpoint and resumes only with as
    many pipelines.
    """

    def __init__(
        self,
        root: ShardSet | Path | str,
        batch_size: int,
        cfg: JigsawConfig | None = None,
        *,
        device: str = "cpu",
        num_threads: int = 4,
        pipelines: int = 1,
        device_id: int | None = None,
        rank: int | None = None,
        world_size: int | None = None,
        fp16: bool = False,
        epoch: bool = False,
        checkpoint: bytes | dict | None = None,
    ) -> None:
        require_dali()
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        if pipelines < 1:
            raise ValueError(f"pipelines must be >= 1, got {pipelines}")
        cfg = cfg or JigsawConfig()
        if rank is None or world_size is None:
            here = process_info()
            rank, world_size = here.rank, here.world
        root = _local_shards(root)  # opened once, handed to every pipeline
        check_enough_samples(root, world_size * pipelines)
        self.batch_size, self._root = batch_size, root.root
        self._next, states = _split_state(checkpoint, pipelines)
        self._iterators = []
        for part, state in enumerate(states):
            pipe = jigsaw_pipeline(
                root,
                batch_size,
                part_config(cfg, part),
                device=device,
                num_threads=num_threads,
                device_id=device_id,
                shard_id=rank * pipelines + part,
                num_shards=world_size * pipelines,
                fp16=fp16,
                checkpoint=state,
                pad_last_batch=epoch,
            )
            pipe.build()
            with self._reading():  # the iterator runs the first batch now
                self._iterators.append(
                    DALIGenericIterator(
                        [pipe],
                        ["images", "labels"],
                        reader_name="S0" if epoch else None,
                        last_batch_policy=LastBatchPolicy.DROP,
                        auto_reset=False,
                    )
                )
        self._live = list(range(pipelines))
        log.info(
            "DALI jigsaw loader: device=%s rank %d/%d batch %d, %d pipeline(s) of %d thread(s)",
            device,
            rank,
            world_size,
            batch_size,
            pipelines,
            num_threads,
        )

    def __iter__(self):
        return self

    def __next__(self):
        while self._live:
            part = self._next
            live = self._live.index(part)
            try:
                with self._reading():
                    batch = next(self._iterators[part])[0]
            except StopIteration:  # this part's epoch is over; the others may still have batches
                self._live.remove(part)
                self._next = self._live[live % len(self._live)] if self._live else 0
                continue
            self._next = self._live[(live + 1) % len(self._live)]
            return batch["images"].permute(0, 3, 1, 2), parse_labels(batch["labels"])
        raise StopIteration

    @contextlib.contextmanager
    def _reading(self) -> Iterator[None]:
        """DALI's errors name neither the shard nor the sample: point to `verify`, which does."""
        try:
            yield
        except RuntimeError as exc:
            raise InputError(
                f"DALI could not read or decode a sample of {self._root} ({dali_gist(exc)}): run "
                f"`jigsawdata verify {self._root}`, which names every such sample, and fetch or build "
                "the set again"
            ) from exc

    def reset(self) -> None:
        for iterator in self._iterators:
            iterator.reset()
        self._live, self._next = list(range(len(self._iterators))), 0

    def state(self) -> bytes | dict:
        """DALI's checkpoint of the pipeline; with several, each one's and whose batch is next."""
        parts = [iterator.checkpoints()[0] for iterator in self._iterators]
        return parts[0] if len(parts) == 1 else {"next": self._next, "parts": parts}


def dali_gist(exc: BaseException) -> str:
    """The operator and the cause of a DALI pipeline error, in one line: its text is a page
    (the pipeline's definition traceback, then the cause after ``encountered:``)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    op = next((line.rstrip(",") for line in lines if line.startswith("Error in")), None)
    cause = next((lines[i + 1] for i, line in enumerate(lines[:-1]) if line == "encountered:"), None)
    return ": ".join(part for part in (op, cause) if part) or first_line(exc)


def _split_state(checkpoint: bytes | dict | None, pipelines: int) -> tuple[int, list]:
    """``(next part, checkpoint per part)`` from a :meth:`DaliJigsawLoader.state`."""
    if checkpoint is None:
        return 0, [None] * pipelines
    saved = checkpoint if isinstance(checkpoint, dict) else {"next": 0, "parts": [checkpoint]}
    if len(saved["parts"]) != pipelines:
        raise InputError(
            f"the saved data position is of {len(saved['parts'])} DALI pipeline(s), not {pipelines}: "
            "resume with as many"
        )
    return saved["next"], saved["parts"]
