"""The shard set's manifest: what was built, from what, how, and how to check it.

Written last, atomically, so its presence means the shard set is complete. Readers check
``format_version``: a newer major version is refused rather than misread. A multi-machine
build writes one partial manifest per part; :func:`merge_parts` joins them and refuses
parts that were built from different inputs or settings.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from .errors import InputError

FORMAT_VERSION = "1.0"
MANIFEST_NAME = "manifest.json"
INDEX_NAME = "index.parquet"
PARTS_DIR = "parts"
_SHA256 = re.compile(r"[0-9a-f]{64}")

# Fields that must agree between the parts of one build.
_SHARED_FIELDS = ("format_version", "tool", "source", "params", "classes", "background", "parts")


@dataclass(frozen=True)
class ListedFile:
    """A file of a shard set that the manifest vouches for."""

    name: str
    """Relative to the shard-set root, checked to stay inside it."""
    sha256: str
    size: int | None
    """Known for shards; ``None`` for their DALI indexes and the sample index."""


def _checked_name(name, suffix: str) -> str:
    if not isinstance(name, str) or not name:
        raise InputError(f"manifest names a file {name!r}: not a path, refusing the shard set")
    parts = name.split("/")
    if (name.startswith("/") or "\\" in name or "\0" in name or any(p in ("", ".", "..") for p in parts)
            or PurePosixPath(name).is_absolute()):
        raise InputError(f"manifest names an unsafe path {name!r}: refusing the shard set")
    if not name.endswith(suffix) or parts[-1] == suffix:
        raise InputError(f"manifest names {name!r} where a {suffix} file belongs: refusing the shard set")
    return name


def _checked_sha(value, name: str) -> str:
    if not isinstance(value, str) or not _SHA256.fullmatch(value):
        raise InputError(f"manifest gives no valid sha256 for {name!r} (got {value!r}): refusing the shard set")
    return value


def listed_files(manifest: dict) -> list[ListedFile]:
    """Every file the manifest vouches for, with its sha256, after checking that each name
    is a safe relative path of the right kind, that none repeats (a shard's ``.idx`` and
    the index included) and that each has a sha256. Raises :class:`InputError`."""
    groups = manifest.get("groups")
    if not isinstance(groups, dict):
        raise InputError("manifest has no 'groups' object: refusing the shard set")
    files: list[ListedFile] = []
    for group, info in sorted(groups.items()):
        shards = info.get("shards") if isinstance(info, dict) else None
        if not isinstance(shards, list) or not all(isinstance(s, dict) for s in shards):
            raise InputError(f"manifest group {group!r} has no list of shards: refusing the shard set")
        for shard in shards:
            name = _checked_name(shard.get("name"), ".tar")
            size = shard.get("bytes")
            if isinstance(size, bool) or not isinstance(size, int) or size < 0:
                raise InputError(f"manifest gives no byte count for {name!r} (got {size!r}): refusing the shard set")
            samples = shard.get("samples")
            if isinstance(samples, bool) or not isinstance(samples, int) or samples < 0:
                raise InputError(f"manifest gives no sample count for {name!r} (got {samples!r}): refusing the shard set")
            files.append(ListedFile(name, _checked_sha(shard.get("sha256"), name), size))
            if "idx_sha256" in shard:
                idx = name[:-4] + ".idx"
                files.append(ListedFile(idx, _checked_sha(shard["idx_sha256"], idx), None))
    if "index_sha256" in manifest:
        index = _checked_name(manifest.get("index", INDEX_NAME), ".parquet")
        files.append(ListedFile(index, _checked_sha(manifest["index_sha256"], index), None))
    seen: set[str] = set()
    for f in files:
        if f.name in seen:
            raise InputError(f"manifest lists {f.name!r} twice: refusing the shard set")
        seen.add(f.name)
    return files


def major(version: str) -> int:
    return int(str(version).split(".", 1)[0])


def check_version(manifest: dict, where: Path | str) -> None:
    version = manifest.get("format_version")
    if version is None:
        raise InputError(f"{where} has no format_version: not a jigsawdata manifest")
    if major(version) > major(FORMAT_VERSION):
        raise InputError(
            f"{where} has format version {version}; this jigsawdata understands format "
            f"{FORMAT_VERSION} (major {major(FORMAT_VERSION)}): upgrade jigsawdata to read it")


def write_bytes_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_text_atomic(path: Path, text: str) -> None:
    """UTF-8 whatever the locale: the card's sha256 in the manifest is of these bytes."""
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: Path, data: dict) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def read_manifest(path: Path) -> dict:
    """Load a manifest from a file or a shard-set directory, checking its version."""
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST_NAME
    if not path.is_file():
        raise InputError(f"no manifest at {path}: not a finished shard set (build it, or merge its parts)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise InputError(f"{path} is not valid JSON: {exc}") from exc
    check_version(manifest, path)
    return manifest


def part_manifest_path(root: Path, part: int, parts: int) -> Path:
    return root / PARTS_DIR / f"manifest-{part:03d}-of-{parts:03d}.json"


def part_index_path(root: Path, part: int, parts: int) -> Path:
    return root / PARTS_DIR / f"index-{part:03d}-of-{parts:03d}.parquet"


def group_totals(groups: dict) -> dict:
    """Recompute per-group sample and byte totals from the shard lists."""
    return {g: {"shards": v["shards"], "samples": sum(s["samples"] for s in v["shards"]),
                "bytes": sum(s["bytes"] for s in v["shards"])} for g, v in sorted(groups.items())}


def merge_parts(root: Path) -> dict:
    """Join the partial manifests under ``root/parts`` into ``root/manifest.json``."""
    from .card import CARD_NAME, attach_card, label_counts
    from .coco import sha256_file
    from .index import merge_index_files, read_index

    root = Path(root)
    paths = sorted((root / PARTS_DIR).glob("manifest-*-of-*.json"))
    if not paths:
        raise InputError(f"no partial manifests under {root / PARTS_DIR}")
    manifests = []
    for p in paths:
        m = json.loads(p.read_text())
        check_version(m, p)
        manifests.append(m)
    first = manifests[0]
    for p, m in zip(paths, manifests):
        for key in _SHARED_FIELDS:
            if m.get(key) != first.get(key):
                raise InputError(f"{p.name} disagrees with {paths[0].name} on '{key}': parts of different builds")
    n_parts = first["parts"]
    found = sorted(m["part"] for m in manifests)
    if found != list(range(n_parts)):
        missing = sorted(set(range(n_parts)) - set(found))
        raise InputError(f"cannot merge: parts {missing} of {n_parts} are not built yet")
    groups: dict = {}
    for m in manifests:
        for g, v in m["groups"].items():
            groups.setdefault(g, {"shards": []})["shards"].extend(v["shards"])
    counts, skipped = Counter(), []
    for m in manifests:
        counts.update(m["counts"])
        skipped.extend(m["skipped_images"])
    merged = {key: first[key] for key in _SHARED_FIELDS}
    merge_index_files([part_index_path(root, k, n_parts) for k in range(n_parts)], root / INDEX_NAME)
    merged.update(part=None, groups=group_totals(groups), counts=dict(sorted(counts.items())),
                  skipped_images=sorted(skipped, key=lambda s: s["image_id"]), index=INDEX_NAME,
                  index_sha256=sha256_file(root / INDEX_NAME))
    labels = read_index(root / INDEX_NAME).column("label").to_numpy()
    write_text_atomic(root / CARD_NAME, attach_card(merged, label_counts(labels)))
    write_json_atomic(root / MANIFEST_NAME, merged)
    return merged
