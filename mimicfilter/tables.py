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

# Optional columns, appended after SCORE_SCHEMA's only when a run asks for them: the default schema
# (and every reader of it) is unchanged. ``read_part``/``read_scores`` drop them unless named.
EMBEDDING_COLUMN = "embedding"  # score --save-embeddings, and every `embed` part
EXTRAPOLATED_COLUMN = "extrapolated"  # `extrapolate` output: true where the scores are kNN predictions


def embedding_field(dim: int) -> pa.Field:
    """The proxy's L2-normalised image embedding: a fixed-size list of ``dim`` float16 (null unless ok)."""
    return pa.field(EMBEDDING_COLUMN, pa.list_(pa.float16(), dim))


def score_schema(embedding_dim: int | None = None, extrapolated: bool = False) -> pa.Schema:
    """SCORE_SCHEMA, plus ``embedding`` (with ``embedding_dim``) and/or ``extrapolated`` when asked."""
    schema = SCORE_SCHEMA
    if embedding_dim is not None:
        schema = schema.append(embedding_field(embedding_dim))
    if extrapolated:
        schema = schema.append(pa.field(EXTRAPOLATED_COLUMN, pa.bool_(), nullable=False))
    return schema


def embedding_array(values: list[Any], dim: int) -> pa.FixedSizeListArray:
    """Per-row embeddings (array-likes of length ``dim``, or None) as a float16 fixed-size list array."""
    import numpy as np

    mask = np.array([value is None for value in values], dtype=bool)
    flat = np.zeros((len(values), dim), dtype=np.float16)
    for row, value in enumerate(values):
        if value is not None:
            flat[row] = np.asarray(value, dtype=np.float16)
    return pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1)), dim, mask=pa.array(mask))


def rows_to_table(rows: Iterable[dict[str, Any]], embedding_dim: int | None = None) -> pa.Table:
    """Rows (dicts with the schema's columns; missing columns are null) as a table in index order.

    With ``embedding_dim``, the table has the ``embedding`` column too (from each row's ``embedding``).
    """
    ordered = sorted(rows, key=lambda row: (row["epoch"], row["index"]))
    columns = {name: [row.get(name) for row in ordered] for name in SCORE_COLUMNS}
    table = pa.table(columns, schema=SCORE_SCHEMA)
    if embedding_dim is not None:
        embeddings = embedding_array([row.get(EMBEDDING_COLUMN) for row in ordered], embedding_dim)
        table = table.append_column(embedding_field(embedding_dim), embeddings)
    return table


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
    """One part (local or remote) with the score schema.

    Optional columns (``embedding``, ``extrapolated``) are dropped unless ``columns`` names them;
    naming one the part lacks is an error.
    """
    source = arrow_source(path)
    extra = [name for name in columns or () if name not in SCORE_COLUMNS]
    if not extra:
        return pq.read_table(source["source"], filesystem=source.get("filesystem"), schema=SCORE_SCHEMA, columns=columns)
    file_schema = pq.read_schema(source["source"], filesystem=source.get("filesystem"))
    missing = [name for name in extra if name not in file_schema.names]
    if missing:
        from mimicfilter.errors import MimicfilterError

        raise MimicfilterError(f"{path} has no column {', '.join(missing)}",
                               hint="embeddings are stored by `score --save-embeddings` and `embed`")
    schema = pa.schema([SCORE_SCHEMA.field(name) if name in SCORE_COLUMNS else file_schema.field(name)
                        for name in SCORE_COLUMNS + tuple(extra)])
    return pq.read_table(source["source"], filesystem=source.get("filesystem"), schema=schema, columns=columns)


def read_scores(run_dir: Path, columns: list[str] | None = None) -> pa.Table:
    """All finished parts of a run as one table, sorted by (shard, epoch, index)."""
    parts = part_paths(run_path(run_dir))
    if not parts:
        empty = SCORE_SCHEMA.empty_table()
        return empty if columns is None else empty.select([name for name in columns if name in SCORE_COLUMNS])
    table = pa.concat_tables(read_part(part, columns) for part in parts)
    sort_keys = [(name, "ascending") for name in ("shard", "epoch", "index") if name in table.column_names]
    return table.sort_by(sort_keys) if sort_keys else table


def table_stats(run_dir: Path, score_column: str | None = "mimic_score", flag_column: str | None = None) -> dict[str, Any]:
    """Row and status counts of a run's parts (score, embed or extrapolate parts), one part at a time.

    With ``score_column``: the mean and the positive fraction of its non-null values; with
    ``flag_column``: how many rows have it true (``{flag_column}_rows``). Memory does not grow
    with the run.
    """
    import pyarrow.compute as pc
    from collections import Counter

    counts: Counter = Counter()
    rows = scored = positive = flagged = 0
    score_sum = 0.0
    columns = ["status"] + [column for column in (score_column, flag_column) if column]
    for part in part_paths(run_path(run_dir)):
        source = arrow_source(part)
        table = pq.read_table(source["source"], filesystem=source.get("filesystem"), columns=columns)
        rows += table.num_rows
        counts.update(table.column("status").to_pylist())
        if score_column:
            scores = table.column(score_column).drop_null()
            scored += len(scores)
            if len(scores):
                score_sum += pc.sum(scores.cast("float64")).as_py()
                positive += pc.sum(pc.greater(scores, 0).cast("int64")).as_py()
        if flag_column:
            flagged += pc.sum(table.column(flag_column).cast("int64")).as_py() or 0
    stats: dict[str, Any] = {"rows": rows, "status_counts": {status: counts.get(status, 0) for status in STATUSES}}
    if score_column:
        stats[f"{score_column}_mean"] = score_sum / scored if scored else None
        stats[f"{score_column}_positive_fraction"] = positive / scored if scored else None
    if flag_column:
        stats[f"{flag_column}_rows"] = flagged
    return stats

