"""Check a shard set against its manifest and index, and summarise it.

``verify`` trusts nothing it can recompute: every shard is re-hashed, its members are read
(and their names checked: shards from strangers are data, never paths or code), and its
sample count is compared with the manifest, its DALI index and ``index.parquet``.
"""

from __future__ import annotations

import tarfile
from collections import Counter
from pathlib import Path
from typing import Callable

from .coco import sha256_file
from .errors import InputError
from .index import read_index
from .manifest import read_manifest
from .shards import index_path, iter_samples, read_dali_index


def verify_shard_set(root: Path, on_shard: Callable[[str], None] | None = None) -> list[str]:
    """Problems found under ``root``, one sentence each naming the shard; empty when sound."""
    root = Path(root)
    manifest = read_manifest(root)
    problems: list[str] = []
    index_counts: Counter = Counter()
    index_file = root / manifest.get("index", "index.parquet")
    if index_file.is_file():
        index_counts = Counter(read_index(index_file).column("shard").to_pylist())
        if manifest.get("index_sha256") and sha256_file(index_file) != manifest["index_sha256"]:
            problems.append(f"index {index_file.name}: sha256 differs from the manifest")
    else:
        problems.append(f"index {index_file.name} is missing")
    for group, info in manifest["groups"].items():
        for shard in info["shards"]:
            name = shard["name"]
            path = root / name
            if on_shard:
                on_shard(name)
            if not path.is_file():
                problems.append(f"{name}: missing")
                continue
            if path.stat().st_size != shard["bytes"]:
                problems.append(f"{name}: {path.stat().st_size} bytes, manifest says {shard['bytes']}")
            if sha256_file(path) != shard["sha256"]:
                problems.append(f"{name}: sha256 differs from the manifest")
            try:
                samples = sum(1 for _ in iter_samples(path))
            except (ValueError, tarfile.TarError, OSError) as exc:
                problems.append(f"{name}: unreadable: {exc}")
                continue
            if samples != shard["samples"]:
                problems.append(f"{name}: {samples} samples, manifest says {shard['samples']}")
            idx = index_path(path)
            try:
                if len(read_dali_index(idx)) != shard["samples"]:
                    problems.append(f"{name}: DALI index {idx.name} disagrees on the sample count")
                elif shard.get("idx_sha256") and sha256_file(idx) != shard["idx_sha256"]:
                    problems.append(f"{name}: DALI index {idx.name} sha256 differs from the manifest")
            except (ValueError, OSError) as exc:
                problems.append(f"{name}: DALI index: {exc}")
            if index_file.is_file() and index_counts[name] != shard["samples"]:
                problems.append(f"{name}: {index_counts[name]} rows in {index_file.name}, "
                                f"manifest says {shard['samples']}")
    return problems


def summarize(root: Path) -> dict:
    """Counts per group and class, sizes and skips, for ``jigsawdata info``."""
    root = Path(root)
    manifest = read_manifest(root)
    index_file = root / manifest.get("index", "index.parquet")
    if not index_file.is_file():
        raise InputError(f"{index_file} is missing: run `jigsawdata verify {root}`")
    table = read_index(index_file)
    names = {c["label"]: c["name"] for c in manifest["classes"]}
    names[manifest["background"]["label"]] = manifest["background"]["name"]
    per_class = Counter(table.column("label").to_pylist())
    return {
        "groups": {g: {"shards": len(v["shards"]), "samples": v["samples"], "bytes": v["bytes"]}
                   for g, v in manifest["groups"].items()},
        "classes": {names[label]: n for label, n in sorted(per_class.items())},
        "counts": manifest["counts"],
        "skipped_images": len(manifest["skipped_images"]),
        "source": manifest["source"],
        "seed": manifest["params"]["seed"],
    }
