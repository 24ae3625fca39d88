"""How jigsawdata writes and hashes files.

Every file takes its final name only once it is complete: it is written under a temporary
name beside it and renamed (``os.replace``, atomic on one file system), so a reader never
sees half a manifest, shard, index or checkpoint, and an interrupted writer leaves at most
its temporary file, which the next writer of that name overwrites. A sha256 is always of
the bytes on disk, read in blocks.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Iterator


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def atomic_path(path: Path, *, shared: bool = False) -> Iterator[Path]:
    """A temporary path beside ``path`` for any writer (``torch.save``, pyarrow, a stream),
    renamed onto ``path`` when the block ends, removed when it raises.

    The temporary name is ``NAME.tmp``, so a leftover of a killed writer is overwritten by
    the next one. ``shared``: other processes may write ``path`` at the same moment (a
    cache), so each gets a unique temporary name instead.
    """
    path = Path(path)
    if shared:
        fd, name = tempfile.mkstemp(prefix=path.name, suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp = Path(name)
    else:
        tmp = path.with_name(path.name + ".tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_bytes_atomic(path: Path, data: bytes, *, shared: bool = False) -> None:
    with atomic_path(path, shared=shared) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(path: Path, text: str, *, shared: bool = False) -> None:
    """UTF-8 whatever the locale: the card's sha256 in the manifest is of these bytes."""
    write_bytes_atomic(path, text.encode("utf-8"), shared=shared)


def json_text(data) -> str:
    """The one JSON layout of the files jigsawdata writes (manifests, records, run
    settings): sorted keys, two-space indent, a final newline; byte-stable for equal data."""
    return json.dumps(data, indent=2, sort_keys=True) + "\n"


def write_json_atomic(path: Path, data, *, shared: bool = False) -> None:
    write_text_atomic(path, json_text(data), shared=shared)


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def exchange_paths(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step (Linux ``renameat2`` with ``RENAME_EXCHANGE``),
    so that each name always holds one whole tree or the other. False, changing nothing, where
    the system or the file system cannot."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # a C library without it (glibc < 2.28, musl < 1.2.5)
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # kernel or file system without it
        return False
    raise OSError(code, os.strerror(code), str(a), None, str(b))
