"""Every file name and glob jigsawdata writes or looks for, in one place.

A shard set, a build's staging area, the caches and a run folder are read by several
modules (the builder writes what ``verify``, ``fetch`` and the trainers read; ``experiment``
reads the trainers' runs): a name spelled once here cannot drift between writer and reader.
"""

from __future__ import annotations

from pathlib import Path

# A shard set
MANIFEST_NAME = "manifest.json"
INDEX_NAME = "index.parquet"
CARD_NAME = "README.md"
PARTS_DIR = "parts"
PART_MANIFEST_GLOB = "manifest-*-of-*.json"
SHARD_SUFFIX = ".tar"
DALI_INDEX_SUFFIX = ".idx"


def shard_name(group: str, part: int, parts: int, index: int) -> str:
    """``S/S-000000.tar``, or ``S/S-p001-000000.tar`` in part 1 of a parted build."""
    stem = f"{group}-{index:06d}" if parts == 1 else f"{group}-p{part:03d}-{index:06d}"
    return f"{group}/{stem}{SHARD_SUFFIX}"


def part_manifest_path(root: Path, part: int, parts: int) -> Path:
    return root / PARTS_DIR / f"manifest-{part:03d}-of-{parts:03d}.json"


def part_index_path(root: Path, part: int, parts: int) -> Path:
    return root / PARTS_DIR / f"index-{part:03d}-of-{parts:03d}.parquet"


# A build's staging area (one per part), beside the shards it writes
STAGING_GLOB = ".staging-*-of-*"
BUILD_RECORD = "build.json"
"""The staged build's identity (source and settings), checked on resume."""
LOCK_SUFFIX = ".lock"


def staging_dir(out: Path, part: int, parts: int) -> Path:
    return out / f".staging-{part:03d}-of-{parts:03d}"


def chunk_paths(staging: Path, index: int) -> tuple[Path, Path, Path]:
    """A staged chunk's crop bytes, its records and the proof of the image files it read."""
    stem = staging / f"chunk-{index:06d}"
    return stem.with_suffix(".bin"), stem.with_suffix(".json"), stem.with_suffix(".sources.json")


# COCO-format sets
ANNOTATION_GLOB = "instances_*.json"


def annotation_name(split: str) -> str:
    return f"instances_{split}.json"


# Caches
PARTIAL_SUFFIX = ".part"
"""A download in progress; renamed to its own name once checked."""
FETCH_RECORD_SUFFIX = ".fetch.json"
VERIFIED_NAME = "verified-shards.json"

# A run folder (pre-training, fine-tuning)
CONFIG_NAME = "config.json"
METRICS_NAME = "metrics.jsonl"
METRICS_PLOT_NAME = "metrics.png"
CHECKPOINT_NAME = "checkpoint.pt"
