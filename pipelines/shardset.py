"""Find a shard set's per-group shards, and check that its readers all get a share."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from jigsawdata.errors import InputError
from jigsawdata.grouping import GROUPS
from jigsawdata.location import ShardLocation


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
    where = ShardLocation.of(root)
    manifest = where.manifest()
    groups = {}
    for group in GROUPS:
        info = manifest.groups.get(group)
        if not info or info.samples == 0:
            raise InputError(f"{where.root} has no {group} samples: a jigsaw image needs S, T and W crops")
        groups[group] = GroupShards(group, tuple(where.file(s.name) for s in info.shards),
                                    tuple(where.file(s.idx_name) for s in info.shards), info.samples)
    return ShardSet(where.root, groups, manifest.class_names)


def check_enough_samples(shards: ShardSet, readers: int) -> None:
    """Every reader (rank, or rank x worker) needs at least one sample of every group;
    an empty share would otherwise fail deep inside a reader or wait forever."""
    for g in shards.groups.values():
        if g.samples < readers:
            raise InputError(f"group {g.group} of {shards.root} has {g.samples} samples, fewer than the "
                             f"{readers} readers that split it; use fewer ranks or workers, or more data")
