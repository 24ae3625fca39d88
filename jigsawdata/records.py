"""Every staged crop of a build as numpy columns: what the shuffle, the shard split and the
index need, in about 130 bytes per crop whatever the size of the set.

Extraction stages each chunk's records as JSON; :func:`load_records` reads them back one
chunk at a time, keeps the fixed-size fields as columns and spills each sample's ``.json``
member (the variable-size provenance) to one staging file, read back by offset when the
shard is written. Nothing here holds a Python object per crop, so a set of tens of millions
of crops builds on one ordinary machine.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pyarrow as pa

from .files import atomic_path
from .grouping import GROUPS

META_FIELDS = ("image_id", "ann_id", "category_id", "label", "group", "gt_box", "crop_box",
               "width", "height", "source")
"""The fields of a sample's ``.json`` member."""


def sample_json(record: dict) -> bytes:
    return json.dumps({k: record[k] for k in META_FIELDS}, sort_keys=True, separators=(",", ":")).encode()


@dataclass(frozen=True)
class Records:
    """Columns, one row per staged crop, in staging order (chunk by chunk)."""

    key: np.ndarray  # bytes (numpy "S"), the tar member stem
    group: np.ndarray  # int8, index into GROUPS
    image_id: np.ndarray  # int64
    ann_id: np.ndarray  # int64, -1 for negatives (null in the index)
    category_id: np.ndarray  # int64
    label: np.ndarray  # int32
    width: np.ndarray  # int32
    height: np.ndarray  # int32
    crop_box: np.ndarray  # (N, 4) int32
    chunk: np.ndarray  # int32: staging chunk holding the JPEG
    offset: np.ndarray  # int64: the JPEG's offset in the chunk's blob
    size: np.ndarray  # int32: the JPEG's bytes
    meta_offset: np.ndarray  # int64: the ``.json`` member's offset in the spill file
    meta_size: np.ndarray  # int32

    def __len__(self) -> int:
        return len(self.key)


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


def load_records(chunks: int, read_chunk: Callable[[int], dict], spill: Path) -> tuple[Records, list[dict]]:
    """Columns of every chunk's records, in chunk order, with the ``.json`` members spilled
    to ``spill``; also each chunk's JSON without its records (skips and counts)."""
    parts, extras, written = [], [], 0
    with atomic_path(spill) as tmp, open(tmp, "wb") as out:
        for i in range(chunks):
            meta = read_chunk(i)
            columns, blob = _chunk_columns(meta.pop("records"), i, written)
            out.write(blob)
            written += len(blob)
            parts.append(columns)
            extras.append(meta)
    columns = {}
    for name in Records.__dataclass_fields__:  # column by column, freeing the parts as we go
        columns[name] = np.concatenate([p.pop(name) for p in parts])
    return Records(**columns), extras


def shuffled_groups(records: Records, order_rng: Callable[[int], np.random.Generator]) -> dict[str, np.ndarray]:
    """Row numbers of each group, sorted by key, then permuted by that group's generator."""
    out = {}
    for gi, group in enumerate(GROUPS):
        rows = np.flatnonzero(records.group == gi)
        ordered = rows[np.argsort(records.key[rows], kind="stable")]
        out[group] = ordered[order_rng(gi).permutation(len(ordered))]
    return out


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


def index_table(records: Records, rows: np.ndarray, shard_of_row: np.ndarray, shard_names: Sequence[str],
                schema: pa.Schema) -> pa.Table:
    """The index rows (``schema``'s columns) of ``rows``, in that order."""
    names = pa.array(list(shard_names), type=pa.string()).take(pa.array(shard_of_row, type=pa.int32()))
    ann = records.ann_id[rows]
    columns = {
        "shard": names,
        "key": pa.array(records.key[rows], type=pa.binary()).cast(pa.string()),
        "image_id": pa.array(records.image_id[rows]),
        "ann_id": pa.array(ann, mask=ann < 0),
        "category_id": pa.array(records.category_id[rows]),
        "label": pa.array(records.label[rows]),
        "group": pa.array(list(GROUPS), type=pa.string()).take(pa.array(records.group[rows])),
        "width": pa.array(records.width[rows]),
        "height": pa.array(records.height[rows]),
        "crop_box": pa.FixedSizeListArray.from_arrays(pa.array(records.crop_box[rows].reshape(-1)), 4),
    }
    return pa.Table.from_arrays([columns[f.name].cast(f.type) for f in schema], schema=schema)
