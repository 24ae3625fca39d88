"""Download a published shard set and verify it: ``jigsawdata fetch URL --out DIR``.

Any fsspec URL works (``https://``, ``s3://``, ``gs://``, ``file://``, a local path): the
directory that holds ``manifest.json``. Files download in parallel to ``NAME.part``, resume
from where an interrupted transfer stopped (HTTP range requests), and are renamed to their
final name only once their sha256 matches the manifest, so nothing unverified ever sits
under a final name. Files already present and verified are kept: fetching again into the
same directory is a cheap check. The manifest is written last.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Callable

import fsspec

from .card import CARD_NAME
from .coco import sha256_file
from .errors import InputError
from .manifest import MANIFEST_NAME, check_version, write_json_atomic
from .shards import member_problem

log = logging.getLogger(__name__)


class FetchError(InputError):
    """A file could not be downloaded, or did not match the manifest."""


@dataclass(frozen=True)
class RemoteFile:
    name: str
    sha256: str
    size: int | None


def is_url(location: str) -> bool:
    return "://" in str(location) and not str(location).startswith("file://")


def read_remote_manifest(url: str) -> dict:
    fs, root = fsspec.core.url_to_fs(url)
    try:
        manifest = json.loads(fs.cat_file(f"{root.rstrip('/')}/{MANIFEST_NAME}"))
    except FileNotFoundError as exc:
        raise FetchError(f"no {MANIFEST_NAME} at {url}: not a published shard set") from exc
    except json.JSONDecodeError as exc:
        raise FetchError(f"{url}/{MANIFEST_NAME} is not valid JSON: {exc}") from exc
    check_version(manifest, Path(f"{url}/{MANIFEST_NAME}"))
    return manifest


def _safe_name(name: str) -> str:
    pure = PurePosixPath(name)
    if pure.is_absolute() or ".." in pure.parts or not name or "\\" in name:
        raise FetchError(f"manifest names an unsafe path {name!r}: refusing the shard set")
    return name


def files_of(manifest: dict) -> list[RemoteFile]:
    """Every file of a shard set the manifest vouches for, with its sha256."""
    files = []
    for group in manifest["groups"].values():
        for shard in group["shards"]:
            files.append(RemoteFile(_safe_name(shard["name"]), shard["sha256"], shard["bytes"]))
            if shard.get("idx_sha256"):
                files.append(RemoteFile(_safe_name(shard["name"][:-4] + ".idx"), shard["idx_sha256"], None))
    if manifest.get("index_sha256"):
        files.append(RemoteFile(_safe_name(manifest.get("index", "index.parquet")), manifest["index_sha256"], None))
    return files


def _check_tar_members(path: Path, name: str) -> None:
    with tarfile.open(path, mode="r:") as tar:
        for member in tar:
            problem = member_problem(member)
            if problem:
                raise FetchError(f"{name}: {problem}")


def _download(fs, remote: str, part: Path, progress: Callable[[int], None] | None, block: int) -> None:
    offset = part.stat().st_size if part.exists() else 0
    with fs.open(remote, "rb", block_size=block) as src:
        if offset:
            src.seek(offset)
        with open(part, "ab") as dst:
            while chunk := src.read(block):
                dst.write(chunk)
                if progress:
                    progress(len(chunk))


def fetch_file(fs, root: str, item: RemoteFile, out: Path, progress: Callable[[int], None] | None = None,
               retries: int = 5, block: int = 1 << 20) -> str:
    """Fetch one file into ``out``; returns 'kept' or 'fetched'. Raises FetchError."""
    final = out / item.name
    if final.is_file() and sha256_file(final) == item.sha256:
        if progress:
            progress(final.stat().st_size)
        return "kept"
    final.parent.mkdir(parents=True, exist_ok=True)
    part = final.with_name(final.name + ".part")
    remote = f"{root.rstrip('/')}/{item.name}"
    for attempt in range(retries):
        try:
            _download(fs, remote, part, progress, block)
            break
        except FileNotFoundError as exc:
            raise FetchError(f"{item.name}: not found at {remote}") from exc
        except Exception as exc:  # network errors of any fsspec backend; bounded retries
            log.warning("%s: transfer interrupted (%s); resuming (attempt %d of %d)", item.name, exc,
                        attempt + 2, retries)
            time.sleep(min(2.0, 0.1 * 2 ** attempt))
    else:
        raise FetchError(f"{item.name}: download failed {retries} times; rerun fetch to resume it")
    digest = sha256_file(part)
    if digest != item.sha256:
        part.unlink()
        raise FetchError(f"{item.name}: sha256 {digest[:16]}… does not match the manifest's {item.sha256[:16]}…; "
                         "the published copy is corrupt or was tampered with")
    if item.name.endswith(".tar"):
        try:
            _check_tar_members(part, item.name)
        except FetchError:
            part.unlink()
            raise
    os.replace(part, final)
    return "fetched"


def fetch(url: str, out: Path, *, workers: int = 8, retries: int = 5, block: int = 1 << 20,
          progress: Callable[[int], None] | None = None, on_total: Callable[[int], None] | None = None) -> dict:
    """Fetch and verify the shard set at ``url`` into ``out``; returns its manifest."""
    out = Path(out)
    manifest = read_remote_manifest(url)
    files = files_of(manifest)
    if on_total:
        on_total(sum(f.size or 0 for f in files))
    out.mkdir(parents=True, exist_ok=True)
    fs, root = fsspec.core.url_to_fs(url)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        futures = [pool.submit(fetch_file, fs, root, f, out, progress, retries, block) for f in files]
        errors = []
        for future in futures:
            try:
                future.result()
            except FetchError as exc:
                errors.append(str(exc))
    if errors:
        raise FetchError("; ".join(errors))
    try:  # the card is documentation: fetched when published, never required
        (out / CARD_NAME).write_bytes(fs.cat_file(f"{root.rstrip('/')}/{CARD_NAME}"))
    except (FileNotFoundError, OSError):
        log.info("no %s published at %s", CARD_NAME, url)
    write_json_atomic(out / MANIFEST_NAME, manifest)
    return manifest


def cache_location(location: str, cache_dir: Path | str | None = None) -> Path:
    """Where :func:`cached_shards` keeps the copy of ``location`` (nothing is checked)."""
    if not is_url(location):
        return Path(str(location).removeprefix("file://"))
    cache_dir = Path(cache_dir or os.environ.get("JIGSAWDATA_CACHE", Path.home() / ".cache" / "jigsawdata"))
    return cache_dir / hashlib.sha256(location.encode()).hexdigest()[:16]


def cached_shards(location: str, cache_dir: Path | str | None = None, **kwargs) -> Path:
    """A local directory for ``location``: itself when local, else a verified cached copy."""
    target = cache_location(location, cache_dir)
    if not is_url(location):
        return target
    log.info("fetching %s into the cache %s", location, target)
    fetch(location, target, **kwargs)
    return target
