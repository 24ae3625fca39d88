"""Find a shard set's per-group shards and decide which part of it this rank reads."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from jigsawdata.errors import InputError
from jigsawdata.fetch import is_url, read_remote_manifest
from jigsawdata.grouping import GROUPS
from jigsawdata.manifest import read_manifest


@dataclass(frozen=True)
class GroupShards:
    group: str
    tars: tuple[str, ...]
    indexes: tuple[str, ...]
    samples: int


@dataclass(frozen=True)
class ShardSet:
    root: Path | str
    groups: dict[str, GroupShards]
    class_names: tuple[str, ...]
    """Name of every label, background last."""


def open_shard_set(root: Path | str) -> ShardSet:
    """Read the manifest (of a local directory or of any fsspec URL) and check that every
    group the template needs has samples."""
    if is_url(str(root)):
        manifest = read_remote_manifest(str(root))
        base = str(root).rstrip("/") + "/"
    else:
        root = Path(str(root).removeprefix("file://"))
        manifest = read_manifest(root)
        base = str(root) + os.sep
    groups = {}
    for group in GROUPS:
        info = manifest["groups"].get(group)
        if not info or info["samples"] == 0:
            raise InputError(f"{root} has no {group} samples: a jigsaw image needs S, T and W crops")
        tars = tuple(base + s["name"] for s in info["shards"])
        groups[group] = GroupShards(group, tars, tuple(t[:-4] + ".idx" for t in tars), info["samples"])
    names = tuple(c["name"] for c in sorted(manifest["classes"], key=lambda c: c["label"]))
    return ShardSet(root, groups, names + (manifest["background"]["name"],))


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the world size: torch.distributed if initialised, else the
    variables torchrun sets, else a single process."""
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
    except ImportError:
        pass
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def check_enough_samples(shards: ShardSet, readers: int) -> None:
    """Every reader (rank, or rank x worker) needs at least one sample of every group;
    an empty share would otherwise fail deep inside a reader or wait forever."""
    for g in shards.groups.values():
        if g.samples < readers:
            raise InputError(f"group {g.group} of {shards.root} has {g.samples} samples, fewer than the "
                             f"{readers} readers that split it; use fewer ranks or workers, or more data")
