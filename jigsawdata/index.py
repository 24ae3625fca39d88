"""The per-sample index (``index.parquet``): one row per crop, for querying and checking.

Written with pyarrow from the same records that fill the shards, so ``verify`` can compare
the two, and users can select samples by class, image or size without opening a tar.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import pyarrow as pa
import pyarrow.parquet as pq

SCHEMA = pa.schema([
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
])


def write_index(path: Path, rows: Sequence[dict]) -> None:
    """Write rows (dicts with the schema's fields) atomically."""
    table = pa.Table.from_pylist([{name: row[name] for name in SCHEMA.names} for row in rows], schema=SCHEMA)
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def read_index(path: Path) -> pa.Table:
    return pq.read_table(path, schema=SCHEMA)


def merge_index_files(paths: Sequence[Path], out: Path) -> None:
    table = pa.concat_tables([read_index(p) for p in paths])
    tmp = out.with_name(out.name + ".tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, out)
