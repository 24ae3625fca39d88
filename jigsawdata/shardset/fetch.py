"""Download a published shard set and verify it: ``jigsawdata fetch URL --out DIR``.

Any fsspec URL works (``https://``, ``s3://``, ``gs://``, ``file://``, a local path): the
directory that holds ``manifest.json``. Every name in the manifest is checked before
anything is downloaded. Files download in parallel to ``NAME.part``, streamed from byte 0
(so any static HTTP server works, ``python -m http.server`` included; over HTTP(S) the bytes
come through the standard library's client, see :class:`_HTTPStream`) and hashed while they
stream; an interrupted transfer is retried, resuming with a range request where the server
honours it and starting over where it does not. A file takes its final name only once its
sha256 matches the manifest, so nothing unverified ever sits under a final name. Files
already present and verified are kept: fetching again into the same directory is a cheap
check. The manifest is written last.

A directory is fetched into only when it is new, empty, being fetched from the same
manifest, or holds that very set: another shard set is replaced (with ``force``, in a fresh
directory swapped in when complete, so a failure leaves the old set whole), and a folder
that holds no shard set is never touched.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

from jigsawdata.errors import FetchError
from jigsawdata.files import exchange_paths, sha256_file, write_bytes_atomic, write_json_atomic
from jigsawdata.layout import CARD_NAME, FETCH_RECORD_SUFFIX, MANIFEST_NAME, PARTIAL_SUFFIX

from .location import MAX_CARD_BYTES, ShardLocation, http_open, read_bounded, read_remote_manifest, url_filesystem
from .manifest import ListedFile, Manifest
from .shards import header_problem, mapped, walk_members

log = logging.getLogger(__name__)

FETCH_MARKER = FETCH_RECORD_SUFFIX
"""Written first into a directory being fetched: which manifest it is being filled from."""


class _Interrupted(Exception):
    """A transfer ended early: retried."""


def _check_tar_members(path: Path, name: str) -> None:
    with open(path, "rb") as fh, mapped(fh) as data:
        try:
            for member, typeflag, _, _ in walk_members(data):
                problem = header_problem(member, typeflag)
                if problem:
                    raise FetchError(f"{name}: {problem}")
        except ValueError as exc:
            raise FetchError(f"{name}: {exc}") from exc


class _HTTPStream:
    """One streamed HTTP GET. Read with the standard library's blocking client rather than
    fsspec's: each download thread then receives, hashes and writes without the hand-over to
    fsspec's single event-loop thread, which held fetch to half the speed of a plain
    download; and the status of a range request (206, or 200 from a server without range
    support) is visible, which fsspec's file objects hide."""

    def __init__(self, url: str, offset: int) -> None:
        self._response = http_open(url, {"Range": f"bytes={offset}-"} if offset else {})
        content_range = self._response.headers.get("Content-Range", "")
        honoured = self._response.status == 206 and content_range.startswith(f"bytes {offset}-")
        self.start = offset if honoured else 0

    def read(self, size: int) -> bytes:
        data = self._response.read(size)
        if not data and self._response.length:  # the server promised more than it sent
            raise _Interrupted(f"connection closed {self._response.length} bytes before the end")
        return data

    def close(self) -> None:
        self._response.close()


def _open_at(fs, remote: str, offset: int):
    """``(stream, start)``: ``remote`` from ``offset`` when the store honours ranges, else from 0."""
    from fsspec.implementations.http import HTTPFileSystem

    if isinstance(fs, HTTPFileSystem):
        stream = _HTTPStream(remote, offset)
        return stream, stream.start
    stream = fs.open(remote, "rb")
    if offset:
        stream.seek(offset)
    return stream, offset


def _prefix_digest(part: Path, length: int):
    digest = hashlib.sha256()
    with open(part, "rb") as fh:
        while length > 0 and (block := fh.read(min(1 << 20, length))):
            digest.update(block)
            length -= len(block)
    return digest


_LOGGED_ERRORS = 10
"""Failed files named in the log beside the one the error names: a dead server fails them all."""


class _TooLarge(FetchError):
    """The server sent more than the file can hold: never retried."""


def _download(
    fs, remote: str, part: Path, size: int | None, progress: Callable[[int], None] | None, block: int, limit: int
) -> str:
    """Stream ``remote`` into ``part`` (continuing it where possible), never past ``limit``
    bytes; returns the sha256."""
    have = part.stat().st_size if part.exists() else 0
    if size is not None and have > size:
        have = 0
    stream, start = _open_at(fs, remote, have)
    try:
        if start != have and progress:
            progress(start - have)  # starting over: what was counted is counted again
        digest = _prefix_digest(part, start) if start else hashlib.sha256()
        with open(part, "r+b" if start else "wb") as dst:
            dst.seek(start)
            dst.truncate()
            while chunk := stream.read(min(block, limit + 1 - dst.tell())):
                dst.write(chunk)
                digest.update(chunk)
                if progress:
                    progress(len(chunk))
                if dst.tell() > limit:
                    dst.truncate(0)
                    raise _TooLarge(
                        f"the server sent more than the {limit} bytes the manifest allows; "
                        "the published copy is corrupt or hostile"
                    )
            got = dst.tell()
    finally:
        stream.close()
    if size is not None and got < size:
        raise _Interrupted(f"stream ended at byte {got} of {size}")
    return digest.hexdigest()


def fetch_file(
    fs,
    root: str,
    item: ListedFile,
    out: Path,
    progress: Callable[[int], None] | None = None,
    retries: int = 5,
    block: int = 1 << 20,
) -> str:
    """Fetch one file into ``out``; returns 'kept' or 'fetched'. Raises FetchError."""
    final = out / item.name
    if final.is_file() and sha256_file(final) == item.sha256:
        if progress:
            progress(final.stat().st_size)
        return "kept"
    final.parent.mkdir(parents=True, exist_ok=True)
    part = final.with_name(final.name + PARTIAL_SUFFIX)
    if progress and part.exists():
        progress(part.stat().st_size)
    remote = f"{root.rstrip('/')}/{item.name}"
    for attempt in range(1, retries + 1):
        try:
            digest = _download(fs, remote, part, item.size, progress, block, item.limit or item.size or 0)
            break
        except FileNotFoundError as exc:  # only a real "not found" answer: never a dropped connection
            raise FetchError(f"{item.name}: not found at {remote}") from exc
        except _TooLarge as exc:
            part.unlink(missing_ok=True)
            raise FetchError(f"{item.name}: {exc}") from exc
        except Exception as exc:  # network errors of any fsspec backend; bounded retries
            if attempt == retries:
                times = "once" if retries == 1 else f"{retries} times"
                raise FetchError(
                    f"{item.name}: transfer interrupted {times} (last: {exc or type(exc).__name__}); "
                    "rerun fetch to resume it"
                ) from exc
            log.warning(
                "%s: transfer interrupted (%s); retrying (attempt %d of %d)",
                item.name,
                exc or type(exc).__name__,
                attempt + 1,
                retries,
            )
            time.sleep(min(2.0, 0.1 * 2 ** (attempt - 1)))
    if digest != item.sha256:
        part.unlink()
        raise FetchError(
            f"{item.name}: sha256 {digest[:16]}… does not match the manifest's {item.sha256[:16]}…; "
            "the published copy is corrupt or was tampered with"
        )
    if item.name.endswith(".tar"):
        try:
            _check_tar_members(part, item.name)
        except FetchError:
            part.unlink()
            raise
    os.replace(part, final)
    return "fetched"


def _fingerprint(manifest: dict) -> str:
    return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()


def _holds(out: Path, fingerprint: str) -> str:
    """What ``out`` holds: 'nothing', 'this' set (or a fetch of it), 'another' set, or 'foreign' files."""
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return "nothing"
    if not out.is_dir():
        return "foreign"
    for name in (FETCH_MARKER, MANIFEST_NAME):
        try:
            data = json.loads((out / name).read_text())
        except (OSError, ValueError):
            continue
        if name == FETCH_MARKER and isinstance(data, dict) and "manifest_sha256" in data:
            return "this" if data["manifest_sha256"] == fingerprint else "another"
        if name == MANIFEST_NAME and isinstance(data, dict) and "format_version" in data:
            return "this" if _fingerprint(data) == fingerprint else "another"
    return "foreign"


def _target(out: Path, fingerprint: str, force: bool) -> Path:
    """The directory to fetch into: ``out`` itself, or (replacing another set) a fresh one beside it."""
    holds = _holds(out, fingerprint)
    if holds == "foreign":
        raise FetchError(
            f"{out} is not empty and holds no shard set: fetch writes only into a new or empty folder, "
            "or one holding a shard set"
        )
    if holds == "another" and not force:
        raise FetchError(
            f"{out} holds another shard set: refusing to mix the two; use --force to replace it, or another --out"
        )
    if holds == "another":
        target = Path(tempfile.mkdtemp(prefix=f".{out.name}.fetch-", dir=out.parent))
    else:
        target = out
        target.mkdir(parents=True, exist_ok=True)
    write_json_atomic(target / FETCH_MARKER, {"manifest_sha256": fingerprint})
    return target


def _swap_in(new: Path, out: Path) -> None:
    """Replace the directory ``out`` with ``new``, then delete the old set: one atomic exchange
    where the system has it, so that ``out`` holds a whole set at every moment, else two
    renames (a crash between them leaves both sets beside ``out``)."""
    if exchange_paths(new, out):
        shutil.rmtree(new)  # the old set, now under the temporary name
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    os.replace(out, old)
    os.replace(new, out)
    shutil.rmtree(old)


def fetch(
    url: str,
    out: Path,
    *,
    workers: int = 8,
    retries: int = 5,
    block: int = 1 << 20,
    progress: Callable[[int], None] | None = None,
    on_total: Callable[[int], None] | None = None,
    force: bool = False,
) -> Manifest:
    """Fetch and verify the shard set at ``url`` into ``out``; returns its manifest.

    ``out`` holding another shard set is refused unless ``force``, which replaces it only
    once the new set is complete and verified."""
    out = Path(out)
    if workers < 1 or retries < 1:
        raise FetchError("workers and retries must be >= 1")
    manifest = read_remote_manifest(url)
    files = manifest.files()
    if on_total:
        on_total(sum(f.size or 0 for f in files))
    target = _target(out, _fingerprint(manifest.to_json()), force)
    fs, root = url_filesystem(url)
    try:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            futures = [pool.submit(fetch_file, fs, root, f, target, progress, retries, block) for f in files]
            errors = []
            for future in futures:
                try:
                    future.result()
                except FetchError as exc:
                    errors.append(str(exc))
        if errors:
            for error in errors[1 : _LOGGED_ERRORS + 1]:
                log.warning("%s", error)
            others = len(errors) - 1
            logged = "logged above" if others <= _LOGGED_ERRORS else f"the next {_LOGGED_ERRORS} logged above"
            more = f" (and {others} more files failed, {logged})" if others else ""
            raise FetchError(f"{errors[0]}{more}")
    except BaseException:
        if target != out:
            shutil.rmtree(target, ignore_errors=True)
        raise
    _fetch_card(fs, root, target, manifest.card_sha256, url)
    manifest.write(target / MANIFEST_NAME)
    (target / FETCH_MARKER).unlink()
    if target != out:
        _swap_in(target, out)
    return manifest


def _fetch_card(fs, root: str, target: Path, expected: str | None, url: str) -> None:
    """The dataset card: checked against the manifest's ``card_sha256`` (``expected``) when it
    has one (and then required); sets built before it was recorded take the card as
    published, if any."""
    try:
        data = read_bounded(fs, f"{root.rstrip('/')}/{CARD_NAME}", MAX_CARD_BYTES, CARD_NAME)
    except (FileNotFoundError, OSError) as exc:
        if expected:
            raise FetchError(f"{CARD_NAME}: the manifest vouches for it but it could not be fetched ({exc})") from exc
        log.info("no %s published at %s", CARD_NAME, url)
        return
    if expected and hashlib.sha256(data).hexdigest() != expected:
        raise FetchError(f"{CARD_NAME}: sha256 does not match the manifest's; nothing was written under its name")
    write_bytes_atomic(target / CARD_NAME, data)


def cached_shards(location: str, cache_dir: Path | str | None = None, **kwargs) -> Path:
    """A local directory for ``location``: itself when local, else a verified copy in the
    cache (:meth:`ShardLocation.local_copy`)."""
    where = ShardLocation.of(location)
    target = where.local_copy(cache_dir)
    if where.remote:
        log.info("fetching %s into the cache %s", location, target)
        fetch(where.where, target, force=True, **kwargs)
    return target
