"""Deterministic WebDataset tar shards with DALI index files, and their safe reading.

A shard's bytes depend only on its samples: members are USTAR regular files with fixed
mtime, owner and mode, written in sample order (``.jpg``, ``.cls``, ``.json``). Members are
streamed by hand because ``TarFile.addfile`` costs as much as the JPEG encoding of a small
crop; the bytes are the ones :mod:`tarfile` would write. The DALI ``.idx``
(format ``v1.2``, what ``wds2idx`` writes) is produced while writing, so readers never have
to scan a tar to index it.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import mmap
import os
import tarfile
from pathlib import Path, PurePosixPath
from typing import Iterable, Iterator

from PIL import Image, UnidentifiedImageError

from jigsawdata.files import atomic_path, write_text_atomic

DALI_INDEX_VERSION = "v1.2"
ALLOWED_EXTENSIONS = frozenset({"jpg", "cls", "json"})
META_FIELDS = ("image_id", "ann_id", "category_id", "label", "group", "gt_box", "crop_box", "width", "height", "source")
"""The fields of a sample's ``.json`` member."""
_BLOCK = tarfile.BLOCKSIZE
_ZERO_BLOCK = bytes(_BLOCK)


def sample_json(record: dict) -> bytes:
    """A sample's ``.json`` member: its provenance, compact and with sorted keys (byte-stable)."""
    return json.dumps({k: record[k] for k in META_FIELDS}, sort_keys=True, separators=(",", ":")).encode()


class _HashingWriter:
    """File wrapper that hashes and counts what passes through, so a shard is never re-read."""

    def __init__(self, fh) -> None:
        self._fh, self.digest, self.count = fh, hashlib.sha256(), 0

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        self.count += len(data)
        return self._fh.write(data)


def ustar_header(name: str, size: int) -> bytes:
    """The 512-byte USTAR header :mod:`tarfile` writes for a regular file with mtime 0,
    owner 0 and mode 644 (tested byte for byte); built directly because it is on the hot path."""
    encoded = name.encode("utf-8")
    if len(encoded) > 100:
        raise ValueError(f"member name longer than 100 bytes: {name!r}")
    header = bytearray(_BLOCK)
    header[0 : len(encoded)] = encoded
    # mode, uid and gid, then size and mtime; \x00 rather than \0, which would read the digits after it as octal
    header[100:148] = b"0000644\x000000000\x000000000\x00" + b"%011o\x00" % size + b"00000000000\x00"
    header[148:156] = b" " * 8
    header[156:157] = tarfile.REGTYPE
    header[257:265] = tarfile.POSIX_MAGIC
    header[148:156] = b"%06o\0 " % sum(header)
    return bytes(header)


def index_path(shard: Path) -> Path:
    return shard.with_suffix(".idx")


def write_shard(path: Path, samples: Iterable[tuple[str, list[tuple[str, bytes]]]]) -> tuple[int, int, str]:
    """Write ``(key, [(ext, data), ...])`` samples to ``path`` and its ``.idx``, atomically.

    Both files are written under temporary names and renamed, index first, so a shard name
    that exists always has a complete tar beside a matching index.
    Returns ``(samples, bytes, sha256)``.
    """
    lines: list[str] = []
    with atomic_path(path) as tmp_tar, open(tmp_tar, "wb") as raw:
        sink = _HashingWriter(raw)
        for key, components in samples:
            parts = []
            for ext, data in components:
                name = f"{key}.{ext}"
                sink.write(ustar_header(name, len(data)))
                parts.append(f"{ext} {sink.count} {len(data)} {name}")
                sink.write(data)
                sink.write(b"\0" * (-len(data) % _BLOCK))
            lines.append(" ".join(parts))
        # End-of-archive marker and record padding, exactly as tarfile writes them.
        sink.write(b"\0" * (2 * _BLOCK))
        sink.write(b"\0" * (-sink.count % tarfile.RECORDSIZE))
        size, digest = sink.count, sink.digest.hexdigest()
        raw.flush()
        os.fsync(raw.fileno())
        index = f"{DALI_INDEX_VERSION} {len(lines)}\n" + "".join(f"{line}\n" for line in lines)
        write_text_atomic(index_path(path), index)  # named before the tar, which is renamed on leaving
    return len(lines), size, digest


def check_member_name(name: str) -> str | None:
    """Why a tar member name is unsafe or foreign to a shard, or ``None`` if it is fine."""
    if "/" not in name and name not in ("", ".", ".."):  # the common case, without PurePosixPath's cost
        ext = name.split(".", 1)[1] if "." in name else ""
        return (
            None if ext in ALLOWED_EXTENSIONS else f"unexpected member {name!r} (shards hold only .jpg, .cls and .json)"
        )
    pure = PurePosixPath(name)
    if name.startswith("/") or pure.is_absolute():
        return f"absolute path {name!r}"
    if ".." in pure.parts:
        return f"parent reference in {name!r}"
    if len(pure.parts) != 1:
        return f"nested path {name!r}"
    ext = name.split(".", 1)[1] if "." in name else ""
    if ext not in ALLOWED_EXTENSIONS:
        return f"unexpected member {name!r} (shards hold only .jpg, .cls and .json)"
    return None


def walk_members(data) -> Iterator[tuple[str, bytes, int, int]]:
    """``(name, typeflag, data offset, size)`` of every member header of the tar in ``data``
    (bytes or an mmap), up to the end-of-archive block.

    Walked by hand because :mod:`tarfile` costs about 60 µs a member, which made checking a
    shard on download ten times slower than downloading it. Names are read as tarfile reads
    them (the USTAR prefix included); every header is reported, extended ones included, so a
    caller that accepts only regular files is stricter than tarfile, never looser. Checksums
    are left to the readers, which refuse bad ones. Raises ValueError on an unreadable header.
    """
    pos, end = 0, len(data)
    while pos + _BLOCK <= end:
        header = data[pos : pos + _BLOCK]
        if header == _ZERO_BLOCK:
            return
        name = header[:100].split(b"\0", 1)[0]
        if header[257:265] == tarfile.POSIX_MAGIC:
            prefix = header[345:500].split(b"\0", 1)[0]
            name = prefix + b"/" + name if prefix else name
        field = header[124:136]
        try:
            if field[0] & 0x80:
                raise ValueError
            size = int(field.split(b"\0", 1)[0].strip() or b"0", 8)
        except ValueError:
            raise ValueError(f"unreadable tar header at byte {pos}") from None
        if pos + _BLOCK + size > end:
            raise ValueError(f"member {name!r} at byte {pos} runs past the end of the file")
        yield name.decode("utf-8", "surrogateescape"), header[156:157], pos + _BLOCK, size
        pos += _BLOCK + -(-size // _BLOCK) * _BLOCK


@contextlib.contextmanager
def mapped(fh) -> Iterator:
    """The whole of an open file as a read-only buffer (an mmap; ``b""`` when it is empty)."""
    if os.fstat(fh.fileno()).st_size == 0:
        yield b""
        return
    with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as data:
        yield data


def header_problem(name: str, typeflag: bytes) -> str | None:
    """:func:`member_problem` for a header found by :func:`walk_members`."""
    return check_member_name(name) or (
        None if typeflag in (tarfile.REGTYPE, tarfile.AREGTYPE) else f"{name!r} is not a regular file"
    )


def member_problem(member: tarfile.TarInfo) -> str | None:
    """Why a tar member does not belong in a shard (unsafe name, foreign file, not a
    regular file), or ``None``."""
    return check_member_name(member.name) or (None if member.isreg() else f"{member.name!r} is not a regular file")


def iter_samples(path: Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Read a shard sample by sample, refusing unsafe or foreign members."""
    with tarfile.open(path, mode="r:") as tar:
        key, parts = None, {}
        for member in tar:
            problem = member_problem(member)
            if problem:
                raise ValueError(f"{path}: {problem}")
            stem, ext = member.name.split(".", 1)
            if stem != key:
                if key is not None:
                    yield key, parts
                key, parts = stem, {}
            parts[ext] = tar.extractfile(member).read()
        if key is not None:
            yield key, parts


MAX_CROP_PIXELS = 100_000_000
"""Largest crop decoded when checking one: a crop is never larger than the image it was cut
from (``BuildConfig.max_pixels``), and a forged header must not claim gigapixels."""


def jpeg_problem(data: bytes) -> str | None:
    """Why a sample's ``.jpg`` cannot be trained on, or None: it must be a JPEG that decodes
    whole. Decoding is the only proof: bytes that start and end like a JPEG can hold anything
    between, which DALI and Pillow then fail on, or read short, in the middle of training."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.format != "JPEG":
                return f"is {img.format or 'an unknown format'}, not a JPEG"
            if img.width * img.height > MAX_CROP_PIXELS:
                return f"claims {img.width}x{img.height} pixels, more than any crop"
            img.load()
    except UnidentifiedImageError:
        return "does not decode (not an image format Pillow knows)"
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        return f"does not decode ({exc})"
    return None


def read_dali_index(path: Path) -> list[str]:
    """Sample lines of a DALI ``.idx`` after checking its header."""
    lines = path.read_text().splitlines()
    if not lines:
        raise ValueError(f"{path}: empty index")
    version, _, count = lines[0].partition(" ")
    if version != DALI_INDEX_VERSION or not count.isdigit() or int(count) != len(lines) - 1:
        raise ValueError(f"{path}: bad header {lines[0]!r} for {len(lines) - 1} samples")
    return lines[1:]
