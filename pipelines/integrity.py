"""Check a local shard set against its manifest before a pipeline reads it.

DALI and the reference pipeline trust their input: a truncated shard, an unsafe member or a
label past the class list surfaces as a reader traceback, or worse, as a shard silently read
short. So before the first batch every shard and DALI index is checked once: its sha256
against the manifest, and, for a shard, its member names, its sample count, its labels and
that every JPEG decodes (once: the result is cached).
The result is cached per file by (path, size, mtime, ctime, inode): the second run costs a ``stat`` per
file. Any problem is one :class:`InputError` naming the shard.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from jigsawdata.errors import InputError
from jigsawdata.fetch import cached_shards
from jigsawdata.files import sha256_file, write_json_atomic
from jigsawdata.location import ShardLocation, default_cache_dir
from jigsawdata.manifest import read_manifest
from jigsawdata.shards import header_problem, jpeg_problem, mapped, walk_members

log = logging.getLogger(__name__)

CACHE_NAME = "verified-shards.json"
CHECKS = 2
"""What a cache entry vouches for: 2 adds that every JPEG decodes. Entries of fewer checks are
made again."""


def _scan_shard(path: Path) -> dict:
    """sha256, sample count and label range of a shard, read once; raises ValueError on an
    unsafe member, an unreadable header, an unparsable label or a JPEG that does not decode."""
    keys, low, high = set(), 0, -1
    with open(path, "rb") as fh, mapped(fh) as data:
        digest = hashlib.sha256(data).hexdigest()
        for name, typeflag, offset, size in walk_members(data):
            problem = header_problem(name, typeflag)
            if problem:
                raise ValueError(problem)
            stem, ext = name.split(".", 1)
            keys.add(stem)
            if ext == "jpg":
                jpeg = jpeg_problem(bytes(data[offset:offset + size]))
                if jpeg:
                    raise ValueError(f"sample {stem}: its .jpg {jpeg}")
            elif ext == "cls":
                text = bytes(data[offset:offset + size])
                try:
                    label = int(text)
                except ValueError:
                    raise ValueError(f"sample {stem} has label {text[:20].decode(errors='replace')!r}") from None
                low, high = min(low, label), max(high, label)
    return {"sha256": digest, "samples": len(keys), "min_label": low, "max_label": high, "checks": CHECKS}


def _load_cache(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _save_cache(path: Path, cache: dict) -> None:
    """Best effort: a read-only or shared cache folder only costs the next run a re-check."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, cache, shared=True)  # ranks and runs may share the cache folder
    except OSError as exc:
        log.debug("cannot write the verification cache %s: %s", path, exc)


def check_shard_set(root: Path, cache_dir: Path | str | None = None) -> int:
    """Check every file of the shard set at ``root`` against its manifest; returns how many
    files had to be read (0 when the cache vouched for all). Raises :class:`InputError`."""
    root = Path(root)
    manifest = read_manifest(root)
    shards = {s.name: s for s in manifest.shards}
    labels = manifest.num_labels
    cache_path = Path(cache_dir or default_cache_dir()) / CACHE_NAME
    cache = _load_cache(cache_path)
    read = 0
    hint = f"run `jigsawdata verify {root}`, or fetch or build it again (--no-verify skips this check)"
    for item in manifest.files():
        if item.name.endswith(".parquet"):
            continue  # the sample index is for people and verify; pipelines never read it
        path = root / item.name
        try:
            stat = path.stat()
        except FileNotFoundError:
            raise InputError(f"{item.name} of {root} is missing: {hint}") from None
        if item.size is not None and stat.st_size != item.size:
            raise InputError(f"{item.name} of {root} is damaged: {stat.st_size} bytes, the manifest says {item.size}; "
                             f"{hint}")
        key = str(path.resolve())
        entry = cache.get(key)
        tar = item.name.endswith(".tar")
        if not (isinstance(entry, dict) and entry.get("size") == stat.st_size and (not tar or entry.get("checks") == CHECKS)
                and entry.get("mtime_ns") == stat.st_mtime_ns and entry.get("ctime_ns") == stat.st_ctime_ns
                and entry.get("inode") == stat.st_ino):
            try:
                scanned = _scan_shard(path) if tar else {"sha256": sha256_file(path)}
            except (ValueError, OSError) as exc:
                raise InputError(f"{item.name} of {root} is damaged or unsafe ({exc}): {hint}") from exc
            entry = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "ctime_ns": stat.st_ctime_ns,
                     "inode": stat.st_ino, **scanned}
            read += 1
        if entry["sha256"] != item.sha256:
            raise InputError(f"{item.name} of {root} is damaged: its sha256 differs from the manifest's; {hint}")
        shard = shards.get(item.name)
        if shard is not None:
            if entry["samples"] != shard.samples:
                raise InputError(f"{item.name} of {root} is damaged: it holds {entry['samples']} samples, the "
                                 f"manifest says {shard.samples}; {hint}")
            if entry["max_label"] >= labels or entry["min_label"] < 0:
                bad = entry["max_label"] if entry["max_label"] >= labels else entry["min_label"]
                raise InputError(f"{item.name} of {root} is damaged: label {bad} is outside 0..{labels - 1} (the "
                                 f"classes + background of its manifest); {hint}")
        cache[key] = entry
    if read:
        _save_cache(cache_path, cache)
        log.info("checked %d files of %s against its manifest", read, root)
    return read


def local_checked(location: Path | str, *, verify: bool = True, cache_dir: Path | str | None = None,
                  fetch: bool = True) -> Path:
    """The one way a command reaches a shard set it reads (training, validation, evaluation,
    preview, ERF drawing): a URL is fetched into the cache (each file against the manifest),
    and the local files are checked with :func:`check_shard_set` (cached; ``verify=False``
    skips it). ``fetch=False`` expects the cache to be filled already (the other ranks of a
    node, once its first rank fetched). Returns the local directory."""
    where = ShardLocation.of(location)
    root = where.local_copy(cache_dir)
    if where.remote and fetch:
        cached_shards(where.where, cache_dir)
    if verify:
        check_shard_set(root, cache_dir)
    return root
