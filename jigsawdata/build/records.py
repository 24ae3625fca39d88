"""Every staged crop of a build as numpy columns: what the shuffle, the shard split and the
index need, in about 100 bytes per crop whatever the size of the set.

Extraction stages each chunk's records as JSON; :func:`load_records` reads them back one
chunk at a time, appends the fixed-size fields to columns (:mod:`jigsawdata.columns`) and spills each
sample's ``.json`` member (the variable-size provenance) to one staging file, read back
by offset when the shard is written. Once the shards are out, the staging locations are let
go and the sample columns are put in index order in place, so the index is written from
views. Nothing here holds a Python object per crop, so a set of tens of millions of crops
builds on one ordinary machine.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from jigsawdata.columns import Column, empty
from jigsawdata.files import atomic_path
from jigsawdata.shardset.grouping import GROUPS
from jigsawdata.shardset.shards import sample_json


@dataclass(eq=False)
class Samples:
    """What the shuffle and the index need of each crop, one row per crop."""

    key: np.ndarray  # bytes (numpy "S"), the tar member stem
    group: np.ndarray  # int8, index into GROUPS
    image_id: np.ndarray  # int64
    ann_id: np.ndarray  # int64, -1 for negatives (null in the index)
    category_id: np.ndarray  # int64
    label: np.ndarray  # int32
    width: np.ndarray  # int32
    height: np.ndarray  # int32
    crop_box: np.ndarray  # (N, 4) int32

    def __len__(self) -> int:
        return len(self.key)

    def reorder(self, rows: np.ndarray) -> None:
        """Put the rows in ``rows`` order, in place and one column at a time, so that the set
        is held once plus one column (the index is then written from views)."""
        for name in self.__dataclass_fields__:
            column = getattr(self, name)
            ordered = empty((len(rows), *column.shape[1:]), column.dtype)
            np.take(column, rows, axis=0, out=ordered)
            setattr(self, name, ordered)


@dataclass(frozen=True, eq=False)
class Staged:
    """Where each crop's bytes wait in the staging area, one row per crop."""

    chunk: np.ndarray  # int32: staging chunk holding the JPEG
    offset: np.ndarray  # int64: the JPEG's offset in the chunk's blob
    size: np.ndarray  # int32: the JPEG's bytes
    meta_offset: np.ndarray  # int64: the ``.json`` member's offset in the spill file
    meta_size: np.ndarray  # int32


@dataclass(frozen=True, eq=False)
class Records:
    """Every staged crop, in staging order (chunk by chunk)."""

    samples: Samples
    staged: Staged

    def __len__(self) -> int:
        return len(self.samples)


def _chunk_columns(records: list[dict], chunk: int, meta_start: int) -> tuple[dict, bytes]:
    metas = [sample_json(r) for r in records]
    sizes = np.fromiter((len(m) for m in metas), dtype=np.int32, count=len(metas))
    starts = meta_start + np.concatenate([[0], np.cumsum(sizes[:-1], dtype=np.int64)]) if metas else sizes
    columns = {
        "key": np.array([r["key"].encode("ascii") for r in records], dtype=bytes),
        "group": np.array([GROUPS.index(r["group"]) for r in records], dtype=np.int8),
        "image_id": np.array([r["image_id"] for r in records], dtype=np.int64),
        "ann_id": np.array([-1 if r["ann_id"] is None else r["ann_id"] for r in records], dtype=np.int64),
        "category_id": np.array([r["category_id"] for r in records], dtype=np.int64),
        "label": np.array([r["label"] for r in records], dtype=np.int32),
        "width": np.array([r["width"] for r in records], dtype=np.int32),
        "height": np.array([r["height"] for r in records], dtype=np.int32),
        "crop_box": np.array([r["crop_box"] for r in records], dtype=np.int32).reshape(-1, 4),
        "chunk": np.full(len(records), chunk, dtype=np.int32),
        "offset": np.array([r["offset"] for r in records], dtype=np.int64),
        "size": np.array([r["size"] for r in records], dtype=np.int32),
        "meta_offset": np.asarray(starts, dtype=np.int64),
        "meta_size": sizes,
    }
    return columns, b"".join(metas)


def load_records(chunks: int, read_chunk: Callable[[int], list[dict]], spill: Path) -> Records:
    """Columns of every chunk's records (``read_chunk(i)``), in chunk order, with the ``.json``
    members spilled to ``spill``."""
    columns: dict[str, Column] = {}
    written = 0
    with atomic_path(spill) as tmp, open(tmp, "wb") as out:
        for i in range(chunks):
            values, blob = _chunk_columns(read_chunk(i), i, written)
            out.write(blob)
            written += len(blob)
            for name, column in values.items():
                columns.setdefault(name, Column()).add(column)
    arrays = {name: column.array() for name, column in columns.items()}
    return Records(
        Samples(**{name: arrays[name] for name in Samples.__dataclass_fields__}),
        Staged(**{name: arrays[name] for name in Staged.__dataclass_fields__}),
    )


def shuffled_groups(samples: Samples, order_rng: Callable[[int], np.random.Generator]) -> tuple[np.ndarray, dict]:
    """Every row number, group after group (in GROUPS order), each group's sorted by key and
    then permuted by that group's generator; and each group's slice of them."""
    order, spans, start = empty((len(samples),), np.int64), {}, 0
    for gi, group in enumerate(GROUPS):
        rows = np.flatnonzero(samples.group == gi)
        ordered = rows[np.argsort(samples.key[rows], kind="stable")]
        spans[group] = slice(start, start + len(rows))
        order[spans[group]] = ordered[order_rng(gi).permutation(len(ordered))]
        start += len(rows)
    return order, spans


def split_shards(sizes: np.ndarray, max_bytes: int, max_samples: int) -> list[tuple[int, int]]:
    """``[start, end)`` of each shard over samples of these byte sizes, in order: a shard
    ends before the sample that would take it past ``max_bytes`` or ``max_samples`` (a
    single larger sample still gets a shard of its own)."""
    ends = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])
    bounds, start, n = [], 0, len(sizes)
    while start < n:
        by_bytes = int(np.searchsorted(ends, ends[start] + max_bytes, side="right")) - 1
        end = max(start + 1, min(start + max_samples, by_bytes, n))
        bounds.append((start, end))
        start = end
    return bounds


def _strings(values: np.ndarray) -> pa.Array:
    """A numpy bytes column as an Arrow string array built from its buffer (``pa.array``
    would make a Python object per value); trailing NULs are numpy's padding."""
    n, width = len(values), values.dtype.itemsize
    lengths = np.char.str_len(values)
    if (lengths == width).all():
        data, offsets = np.ascontiguousarray(values), np.arange(0, (n + 1) * width, width, dtype=np.int32)
    else:
        data = values.view(np.uint8).reshape(n, width)[np.arange(width) < lengths[:, None]]
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    return pa.StringArray.from_buffers(n, pa.py_buffer(offsets), pa.py_buffer(data))


def index_table(
    samples: Samples, rows: slice, shard_of_row: np.ndarray, shard_names: Sequence[str], schema: pa.Schema
) -> pa.Table:
    """The index rows (``schema``'s columns) of the ``rows`` of samples already in index
    order (:meth:`Samples.reorder`): built from views of the columns, not copies."""
    pool = pa.system_memory_pool()  # reuses what the build freed; Arrow's default keeps twice its use resident
    ann = samples.ann_id[rows]
    columns = {
        "shard": pc.take(
            pa.array(list(shard_names), type=pa.string()), pa.array(shard_of_row, type=pa.int32()), memory_pool=pool
        ),
        "key": _strings(samples.key[rows]),
        "image_id": pa.array(samples.image_id[rows]),
        "ann_id": pa.array(ann, mask=ann < 0, memory_pool=pool),
        "category_id": pa.array(samples.category_id[rows]),
        "label": pa.array(samples.label[rows]),
        "group": pc.take(pa.array(list(GROUPS), type=pa.string()), pa.array(samples.group[rows]), memory_pool=pool),
        "width": pa.array(samples.width[rows]),
        "height": pa.array(samples.height[rows]),
        "crop_box": pa.FixedSizeListArray.from_arrays(pa.array(samples.crop_box[rows].reshape(-1)), 4),
    }
    return pa.Table.from_arrays([columns[f.name].cast(f.type, memory_pool=pool) for f in schema], schema=schema)
