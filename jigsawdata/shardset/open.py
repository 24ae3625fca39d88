"""The one way to reach a shard set that is read: fetch it if remote, check it, read its manifest once.

:func:`open_shard_set` is what every command that reads a set goes through (training,
validation, evaluation, preview, ERF drawing); it returns a :class:`ShardSet` that the
trainer hands down to its loaders, its validation set and each DALI pipeline, so nothing
re-reads the manifest or skips the check. Library callers may give the loaders a path
instead (:func:`as_shard_set` reads it, unchecked).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from jigsawdata.errors import InputError

from .check import check_shard_set
from .fetch import cached_shards
from .grouping import GROUPS
from .location import ShardLocation
from .manifest import Manifest, read_manifest


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


def _fetched(location: Path | str, cache_dir: Path | str | None, fetch: bool) -> Path:
    """The local directory of ``location``: a URL is fetched into the cache first (each file
    against the manifest)."""
    where = ShardLocation.of(location)
    root = where.local_copy(cache_dir)
    if where.remote and fetch:
        cached_shards(where.where, cache_dir)
    return root


def local_copy(
    location: Path | str, *, verify: bool = True, cache_dir: Path | str | None = None, fetch: bool = True
) -> Path:
    """The local directory of a shard set, fetched and checked as :func:`open_shard_set` does
    (``verify`` and ``info`` read its files themselves). ``fetch=False`` expects the cache to be
    filled already (the other ranks of a node, once its first rank fetched)."""
    root = _fetched(location, cache_dir, fetch)
    if verify:
        check_shard_set(root, cache_dir)
    return root


def open_shard_set(
    location: Path | str, *, verify: bool = True, cache_dir: Path | str | None = None, fetch: bool = True
) -> ShardSet:
    """A shard set ready to read: fetched if remote, checked (cached; ``verify=False`` skips
    it), its manifest read once."""
    root = _fetched(location, cache_dir, fetch)
    manifest = read_manifest(root)
    if verify:
        check_shard_set(root, cache_dir, manifest)
    return _shard_set(ShardLocation.of(root), manifest)


def read_shard_set(root: Path | str) -> ShardSet:
    """Read the manifest (of a local directory or of any fsspec URL, checking nothing) and
    check that every group the template needs has samples."""
    where = ShardLocation.of(root)
    return _shard_set(where, where.manifest())


def _shard_set(where: ShardLocation, manifest: Manifest) -> ShardSet:
    groups = {}
    for group in GROUPS:
        info = manifest.groups.get(group)
        if not info or info.samples == 0:
            raise InputError(f"{where.root} has no {group} samples: a jigsaw image needs S, T and W crops")
        groups[group] = GroupShards(
            group,
            tuple(where.file(s.name) for s in info.shards),
            tuple(where.file(s.idx_name) for s in info.shards),
            info.samples,
        )
    return ShardSet(where.root, groups, manifest.class_names)


def as_shard_set(shards: ShardSet | Path | str) -> ShardSet:
    """``shards`` itself when it is opened already, else :func:`read_shard_set` of it."""
    return shards if isinstance(shards, ShardSet) else read_shard_set(shards)


def check_enough_samples(shards: ShardSet, readers: int) -> None:
    """Every reader (rank, or rank x worker) needs at least one sample of every group;
    an empty share would otherwise fail deep inside a reader or wait forever."""
    for g in shards.groups.values():
        if g.samples < readers:
            raise InputError(
                f"group {g.group} of {shards.root} has {g.samples} samples, fewer than the "
                f"{readers} readers that split it; use fewer ranks or workers, or more data"
            )
