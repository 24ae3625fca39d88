"""Numpy columns that grow a chunk at a time in memory of their own.

A build holds its large columns (the checked annotations, the staged crops' records) for a
while and then lets them go. Grown in the C allocator's heap (``array.array``, or per-chunk
arrays concatenated at the end), a column leaves a hole when it is freed that the heap keeps
resident, and that Arrow, which writes the index last, cannot use: the peak memory of a build
would carry every column it ever dropped. Here a column lives in a private anonymous mapping
that grows in place (``mremap``): only the bytes written are resident, nothing is left behind
per chunk, and dropping the column gives its memory back to the system at once.
"""

from __future__ import annotations

import mmap

import numpy as np


def _anonymous(nbytes: int) -> mmap.mmap:
    # Private: a shared anonymous mapping (mmap's default) cannot grow in place.
    return mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)


def empty(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """An uninitialised array in memory of its own."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape)) * dtype.itemsize
    return np.frombuffer(_anonymous(nbytes), dtype=dtype).reshape(shape) if nbytes else np.empty(shape, dtype)


class Column:
    """Rows added a chunk at a time; :meth:`array` is a view of them all, after which the
    column takes no more rows. Fixed-width bytes columns (numpy ``S``) widen as concatenate
    would, padding the rows so far, when a chunk brings longer values."""

    def __init__(self) -> None:
        self._map: mmap.mmap | None = None
        self._size, self._dtype, self._shape = 0, np.dtype(np.uint8), ()

    def add(self, values: np.ndarray) -> None:
        if self._map is not None and not values.size:
            return
        if self._map is None:
            self._dtype, self._shape = values.dtype, values.shape[1:]
        elif values.dtype.kind == "S" and values.dtype.itemsize > self._dtype.itemsize:
            rows = self.array().astype(values.dtype)
            self._map, self._size, self._dtype = None, 0, values.dtype
            self._write(rows.tobytes())
        self._write(np.ascontiguousarray(values, dtype=self._dtype).tobytes())

    def _write(self, data: bytes) -> None:
        end = self._size + len(data)
        if self._map is None:
            self._map = _anonymous(max(end, mmap.PAGESIZE))
        elif end > len(self._map):
            self._map.resize(max(end, 2 * len(self._map)))  # untouched pages cost nothing
        self._map[self._size : end] = data
        self._size = end

    def array(self) -> np.ndarray:
        if not self._size:
            return np.empty((0, *self._shape), self._dtype)
        count = self._size // self._dtype.itemsize
        return np.frombuffer(self._map, dtype=self._dtype, count=count).reshape(-1, *self._shape)
