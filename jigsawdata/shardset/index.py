"""The per-sample index (``index.parquet``): one row per crop, for querying and checking.

Written with pyarrow from the same records that fill the shards, so ``verify`` can compare
the two, and users can select samples by class, image or size without opening a tar.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from jigsawdata.errors import InputError, first_line
from jigsawdata.files import atomic_path

SCHEMA = pa.schema(
    [
        ("shard", pa.string()),
        ("key", pa.string()),
        ("image_id", pa.int64()),
        ("ann_id", pa.int64()),
        ("category_id", pa.int64()),
        ("label", pa.int32()),
        ("group", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("crop_box", pa.list_(pa.int32(), 4)),
    ]
)


def write_index(path: Path, rows: Sequence[dict]) -> None:
    """Write rows (dicts with the schema's fields) atomically."""
    table = pa.Table.from_pylist([{name: row[name] for name in SCHEMA.names} for row in rows], schema=SCHEMA)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


ROW_GROUP = 1024 * 1024
"""Rows per row group: pyarrow's default, so writing slices of this size gives the bytes
:func:`write_index` gives for the whole table."""


def write_index_slices(path: Path, rows: int, make_slice: Callable[[int, int], pa.Table]) -> None:
    """Write the index atomically from ``make_slice(start, end)`` tables of at most
    :data:`ROW_GROUP` rows: one row group in memory at a time, whatever the set's size."""
    with atomic_path(path) as tmp, pq.ParquetWriter(tmp, SCHEMA) as writer:
        for start in range(0, rows, ROW_GROUP):
            writer.write_table(make_slice(start, min(start + ROW_GROUP, rows)), row_group_size=ROW_GROUP)


def read_index(path: Path | pa.BufferReader, where: str | None = None) -> pa.Table:
    """The sample index (a file, or the bytes of one read from ``where``); a damaged file or
    one of another schema is an :class:`InputError` naming it (Arrow's own errors name neither
    the file nor what to do)."""
    try:
        return pq.read_table(path, schema=SCHEMA)
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise InputError(
            f"{where or path} is not a readable sample index ({first_line(exc, type(exc).__name__)}): "
            "restore it, "
            "or fetch or build the set again"
        ) from exc


def merge_index_files(paths: Sequence[Path], out: Path) -> None:
    table = pa.concat_tables([read_index(p) for p in paths])
    with atomic_path(out) as tmp:
        pq.write_table(table, tmp)
