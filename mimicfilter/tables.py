"""The score table: Parquet schema, atomic part writes, reading a run directory back."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable

import pyarrow as pa
import pyarrow.parquet as pq

from mimicfilter.storage import arrow_source, is_remote, run_path

STATUSES = ("ok", "decode_error", "missing_image", "missing_text", "missing_label", "too_large", "shard_error")

SCORE_SCHEMA = pa.schema(
    [
        pa.field("shard", pa.string(), nullable=False),
        pa.field("key", pa.string(), nullable=False),
        pa.field("uid", pa.string()),
        pa.field("index", pa.int32(), nullable=False),
        pa.field("epoch", pa.int16(), nullable=False),
        pa.field("step", pa.int32(), nullable=False),
        pa.field("status", pa.string(), nullable=False),
        pa.field("error", pa.string()),
        pa.field("mimic_score", pa.float32()),
        pa.field("mimic_weight", pa.float32()),
        pa.field("loss", pa.float32()),
        pa.field("clip_score", pa.float32()),
        pa.field("ref_loss", pa.float32()),
        pa.field("label", pa.int32()),
    ]
)
SCORE_COLUMNS = tuple(SCORE_SCHEMA.names)


def rows_to_table(rows: Iterable[dict[str, Any]]) -> pa.Table:
    """Rows (dicts with the schema's columns; missing columns are null) as a table in index order."""
    ordered = sorted(rows, key=lambda row: (row["epoch"], row["index"]))
    columns = {name: [row.get(name) for row in ordered] for name in SCORE_COLUMNS}
    return pa.table(columns, schema=SCORE_SCHEMA)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temp file in the same directory and a rename.

    Remote (fsspec) paths: one upload, which object stores publish only once it is complete.
    """
    if is_remote(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("wb") as handle:
            handle.write(data)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, payload: Any) -> None:
    atomic_write_bytes(path, (json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n").encode())


def write_part(table: pa.Table, path: Path) -> None:
    """Write a Parquet part atomically: a part that exists is complete."""
    if is_remote(path):
        buffer = pa.BufferOutputStream()
        pq.write_table(table, buffer, compression="zstd")
        atomic_write_bytes(path, buffer.getvalue().to_pybytes())
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(descriptor)
    try:
        pq.write_table(table, temp_name, compression="zstd")
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise


def part_paths(run_dir: Path) -> list[Path]:
    """Finished parts of a run (temp files of interrupted writes start with a dot and are ignored)."""
    return sorted((run_dir / "scores").glob("[!.]*.parquet"), key=str)


def read_part(path: Path, columns: list[str] | None = None) -> pa.Table:
    """One part (local or remote) with the score schema."""
    source = arrow_source(path)
    return pq.read_table(source["source"], filesystem=source.get("filesystem"), schema=SCORE_SCHEMA, columns=columns)


def read_scores(run_dir: Path, columns: list[str] | None = None) -> pa.Table:
    """All finished parts of a run as one table, sorted by (shard, epoch, index)."""
    parts = part_paths(run_path(run_dir))
    if not parts:
        return SCORE_SCHEMA.empty_table() if columns is None else SCORE_SCHEMA.empty_table().select(columns)
    table = pa.concat_tables(read_part(part, columns) for part in parts)
    sort_keys = [(name, "ascending") for name in ("shard", "epoch", "index") if name in table.column_names]
    return table.sort_by(sort_keys) if sort_keys else table
