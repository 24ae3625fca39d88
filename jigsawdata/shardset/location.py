"""Where a shard set is: a local directory, or any fsspec URL (``https://``, ``s3://``, ...).

Every shard location a user gives (``--shards``, ``--val-shards``, ``fetch URL``) is read
here and nowhere else: what counts as a URL (``file://`` is a local directory), where a
file the manifest names lives, how the manifest itself is read, and which folder of the
cache holds a fetched copy. The reference pipeline streams a URL's shards in place; DALI
and training read a local directory, which :func:`jigsawdata.shardset.fetch.cached_shards` fills
from a URL once, verified.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import fsspec
import pyarrow as pa

from jigsawdata.errors import FetchError, InputError, first_line
from jigsawdata.layout import MANIFEST_NAME

from .index import read_index
from .manifest import Manifest, ManifestError, read_manifest


def default_cache_dir() -> Path:
    """``$JIGSAWDATA_CACHE``, else ``~/.cache/jigsawdata``."""
    return Path(os.environ.get("JIGSAWDATA_CACHE", Path.home() / ".cache" / "jigsawdata"))


def is_url(location: Path | str) -> bool:
    return "://" in str(location) and not str(location).startswith("file://")


_CLOUD_EXTRAS = {"s3": ("s3fs", "s3"), "s3a": ("s3fs", "s3"), "gs": ("gcsfs", "gcs"), "gcs": ("gcsfs", "gcs")}
"""Cloud protocol -> (its fsspec backend, the jigsawdata extra that installs it)."""


def url_filesystem(url: str):
    """``(fs, path)`` for ``url``, as ``fsspec.core.url_to_fs``; a protocol whose fsspec
    backend is not installed (s3fs for ``s3://`` ...) is an :class:`InputError` naming the
    extra that installs it, rather than fsspec's ImportError deep in a traceback."""
    try:
        return fsspec.core.url_to_fs(url)
    except ImportError as exc:
        protocols = re.findall(r"([A-Za-z][A-Za-z0-9+.-]*)://", url)
        known = [_CLOUD_EXTRAS[p.lower()] for p in protocols if p.lower() in _CLOUD_EXTRAS]
        if known:
            package, extra = known[0]
            raise InputError(
                f"{url}: reading it needs {package}, which is not installed: pip install 'jigsawdata[{extra}]'"
            ) from exc
        raise InputError(f"{url}: {first_line(exc, 'its fsspec backend is not installed')}") from exc
    except ValueError as exc:
        if not str(exc).startswith("Protocol not known"):
            raise
        raise InputError(f"{url}: {exc} (use s3://, gs://, http(s)://, file:// or a local path)") from exc


def read_remote_manifest(url: str) -> Manifest:
    """The checked manifest of the shard set at ``url``; a malformed one is a :class:`FetchError`."""
    fs, root = url_filesystem(url)
    where = f"{url}/{MANIFEST_NAME}"  # the URL as given: Path would fold its "//"
    try:
        data = json.loads(read_bounded(fs, f"{root.rstrip('/')}/{MANIFEST_NAME}", MAX_MANIFEST_BYTES, where))
    except FileNotFoundError as exc:
        raise FetchError(f"no {MANIFEST_NAME} at {url}: not a published shard set") from exc
    except json.JSONDecodeError as exc:
        raise FetchError(f"{where} is not valid JSON: {exc}") from exc
    try:
        return Manifest.from_json(data, where)
    except ManifestError as exc:
        raise FetchError(str(exc)) from exc


MAX_MANIFEST_BYTES = 64 << 20
"""A manifest grows by ~200 bytes a shard and ~100 a skipped image: COCO's is a few MB."""
MAX_CARD_BYTES = 16 << 20


def read_bounded(fs, path: str, limit: int, what: str) -> bytes:
    """A remote file's bytes, refused once past ``limit``: a server that streams without end
    (or lies about the length) fills neither memory nor disk."""
    from fsspec.implementations.http import HTTPFileSystem

    # over HTTP, one plain GET streamed with the standard library: fsspec's default reads by
    # ranges (which servers without range support answer with the whole file each time) and
    # reports a server it cannot reach as a missing file
    with _http_get(path) if isinstance(fs, HTTPFileSystem) else fs.open(path, "rb") as stream:
        data = bytearray()
        while len(data) <= limit and (chunk := stream.read(min(1 << 20, limit + 1 - len(data)))):
            data += chunk  # a stream may return less than asked before its end
    if len(data) > limit:
        raise FetchError(f"{what} is larger than {limit} bytes, more than any shard set needs: refusing it")
    return bytes(data)


HTTP_TIMEOUT = 60.0
"""Seconds a connection may stay silent before a request or a transfer counts as failed."""


def http_open(url: str, headers: dict[str, str]):
    """``urlopen`` of a GET of ``url``, quoted as every request for a shard set is (a name may
    hold spaces); a 404 or 410 is FileNotFoundError (a real "not found", never a dropped
    connection), any other HTTP error is raised as it is."""
    request = urllib.request.Request(urllib.parse.quote(url, safe=":/%?&=@+~#!$'()*,;[]"), headers=headers)
    try:
        return urllib.request.urlopen(request, timeout=HTTP_TIMEOUT)
    except urllib.error.HTTPError as exc:
        exc.close()
        if exc.code in (404, 410):
            raise FileNotFoundError(url) from exc
        raise


def _http_get(url: str):
    """The response to a GET of ``url``: a 404 or 410 is FileNotFoundError, another answer or a
    server that cannot be reached a :class:`FetchError` saying so."""
    try:
        return http_open(url, {"Accept-Encoding": "identity"})
    except FileNotFoundError:
        raise
    except urllib.error.HTTPError as exc:
        raise FetchError(f"{url}: the server answered {exc.code} {exc.reason}") from exc
    except (urllib.error.URLError, OSError) as exc:
        raise FetchError(f"{url}: cannot reach the server ({getattr(exc, 'reason', exc)})") from exc


@dataclass(frozen=True)
class ShardLocation:
    where: str
    """The URL as given, or the local directory (without ``file://``)."""
    remote: bool

    @classmethod
    def of(cls, location: Path | str) -> ShardLocation:
        text = str(location)
        return cls(text, True) if is_url(text) else cls(text.removeprefix("file://"), False)

    @property
    def root(self) -> Path | str:
        """The URL, or the local directory as a :class:`~pathlib.Path`."""
        return self.where if self.remote else Path(self.where)

    def file(self, name: str) -> str:
        """Where a file the manifest names (``S/S-000000.tar``) is: a URL or a local path."""
        return f"{self.where.rstrip('/')}/{name}" if self.remote else str(Path(self.where) / name)

    def manifest(self) -> Manifest:
        return read_remote_manifest(self.where) if self.remote else read_manifest(Path(self.where))

    def index(self, manifest: Manifest) -> pa.Table:
        """The set's sample index, read from where it is; a remote one is checked against the
        manifest's sha256 before it is parsed."""
        if not self.remote:
            path = Path(self.where) / manifest.index_name
            if not path.is_file():
                raise InputError(f"{path} is missing: run `jigsawdata verify {self.where}`")
            return read_index(path)
        fs, root = url_filesystem(self.where)
        where = self.file(manifest.index_name)
        limit = next(f.limit for f in manifest.files() if f.name == manifest.index_name)
        data = read_bounded(fs, f"{root.rstrip('/')}/{manifest.index_name}", limit, where)
        if manifest.index_sha256 and hashlib.sha256(data).hexdigest() != manifest.index_sha256:
            raise FetchError(f"{where}: sha256 does not match the manifest's")
        return read_index(pa.BufferReader(data), where)

    def local_copy(self, cache_dir: Path | str | None = None) -> Path:
        """The local directory to read: the set itself, or for a URL its folder in the
        cache (filled by :func:`jigsawdata.shardset.fetch.cached_shards`; nothing is checked here)."""
        if not self.remote:
            return Path(self.where)
        return Path(cache_dir or default_cache_dir()) / hashlib.sha256(self.where.encode()).hexdigest()[:16]
