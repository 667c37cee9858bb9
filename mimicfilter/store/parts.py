"""Score parts: atomic Parquet writes, finding a run's finished parts, reading them back, counting them."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mimicfilter.errors import MimicfilterError
from mimicfilter.store.atomic import atomic_path, atomic_write_bytes
from mimicfilter.store.paths import SCORES_DIR, RunPath, arrow_source, is_remote, run_path
from mimicfilter.store.schema import ANCHOR_COLUMN, SCORE_COLUMNS, SCORE_SCHEMA, STATUSES


def write_part(table: pa.Table, path: RunPath) -> None:
    """Write a Parquet part atomically: a part that exists is complete."""
    if is_remote(path):
        buffer = pa.BufferOutputStream()
        pq.write_table(table, buffer, compression="zstd")
        atomic_write_bytes(path, buffer.getvalue().to_pybytes())
        return
    with atomic_path(path) as temp:
        pq.write_table(table, str(temp), compression="zstd")


def part_paths(run_dir: RunPath) -> list[RunPath]:
    """Finished parts of a run (temp files of interrupted writes start with a dot and are ignored)."""
    return sorted((run_dir / SCORES_DIR).glob("[!.]*.parquet"), key=str)


def read_part(path: RunPath, columns: list[str] | None = None) -> pa.Table:
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
        raise MimicfilterError(f"{path} has no column {', '.join(missing)}",
                               hint="embeddings are stored by `score --save-embeddings` and `embed`")
    schema = pa.schema([SCORE_SCHEMA.field(name) if name in SCORE_COLUMNS else file_schema.field(name)
                        for name in SCORE_COLUMNS + tuple(extra)])
    return pq.read_table(source["source"], filesystem=source.get("filesystem"), schema=schema, columns=columns)


def read_scores(run_dir: RunPath, columns: list[str] | None = None) -> pa.Table:
    """All finished parts of a run as one table, sorted by (shard, epoch, index)."""
    parts = part_paths(run_path(run_dir))
    if not parts:
        empty = SCORE_SCHEMA.empty_table()
        return empty if columns is None else empty.select([name for name in columns if name in SCORE_COLUMNS])
    table = pa.concat_tables(read_part(part, columns) for part in parts)
    sort_keys = [(name, "ascending") for name in ("shard", "epoch", "index") if name in table.column_names]
    return table.sort_by(sort_keys) if sort_keys else table


def table_stats(run_dir: RunPath, score_column: str | None = "mimic_score", flag_column: str | None = None) -> dict[str, Any]:
    """Row and status counts of a run's parts (score, embed or extrapolate parts), one part at a time.

    With ``score_column``: the mean and the positive fraction of its non-null values; with
    ``flag_column``: how many rows have it true (``{flag_column}_rows``). Anchor rows (score
    --trusted) are counted apart (``anchor_rows``, and of those with status ok ``anchor_usable_rows``),
    never as pool rows. Memory does not grow with the run.
    """
    counts: Counter = Counter()
    anchors: Counter = Counter()
    usable_anchors: Counter = Counter()  # of those, the rows with status ok
    rows = scored = positive = flagged = 0
    score_sum = 0.0
    columns = ["status"] + [column for column in (score_column, flag_column) if column]
    for part in part_paths(run_path(run_dir)):
        source = arrow_source(part)
        names = pq.read_schema(source["source"], filesystem=source.get("filesystem")).names
        wanted = columns + ([ANCHOR_COLUMN] if ANCHOR_COLUMN in names else [])
        table = pq.read_table(source["source"], filesystem=source.get("filesystem"), columns=wanted)
        if ANCHOR_COLUMN in names:
            anchors.update(table.column(ANCHOR_COLUMN).drop_null().to_pylist())
            usable_anchors.update(table.filter(pc.equal(table.column("status"), "ok")).column(ANCHOR_COLUMN)
                                  .drop_null().to_pylist())
            table = table.filter(pc.is_null(table.column(ANCHOR_COLUMN)))
        table = table.select(columns)
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
    if anchors:
        stats["anchor_rows"] = dict(sorted(anchors.items()))
        stats["anchor_usable_rows"] = {kind: usable_anchors.get(kind, 0) for kind in stats["anchor_rows"]}
    return stats
