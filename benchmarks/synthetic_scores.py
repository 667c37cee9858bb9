"""Synthetic score runs of any size, written by DuckDB: parts like a trajectory run's (every sample
once per epoch, ~1 % decode errors), for the scale benchmarks of `filter` (bench_filter.py,
bench_filter_versions.py) and `report` (bench_report.py)."""

from __future__ import annotations

import json
from pathlib import Path

BAD = "hash(i) % 100 = 0"  # ~1 % of the samples: decode errors with no scores

# Columns over the sample number i and the epoch: 10,000 samples a shard, batches of 256.
IDENTITY = f"""
    'pool/' || lpad((i // 10000)::VARCHAR, 8, '0') || '.tar' AS shard,
    lpad(i::VARCHAR, 12, '0') AS key,
    md5(i::VARCHAR) AS uid,
    (i % 10000)::INTEGER AS "index",
    {{epoch}}::SMALLINT AS epoch,
    (i // 256)::INTEGER AS step,
    CASE WHEN {BAD} THEN 'decode_error' ELSE 'ok' END AS status,
    CASE WHEN {BAD} THEN 'cannot decode image jpg' END AS error,"""

# Mimic scores spread evenly over [-1, 1).
FILTER_COLUMNS = IDENTITY + f"""
    CASE WHEN {BAD} THEN NULL
         ELSE (((hash(i * 7 + {{epoch}}) % 20000) / 10000.0) - 1.0)::FLOAT END AS mimic_score,
    CASE WHEN {BAD} THEN NULL
         ELSE ((hash(i * 13 + {{epoch}}) % 30000) / 10000.0)::FLOAT END AS mimic_weight,
    ((hash(i * 3) % 10000) / 1000.0)::FLOAT AS loss,
    ((hash(i * 5) % 10000) / 10000.0)::FLOAT AS clip_score,
    ((hash(i * 11) % 10000) / 1000.0)::FLOAT AS ref_loss,
    NULL::INTEGER AS label
"""

# A bimodal mimic score (a quarter of the samples low), a CLIP score that follows it, and the pool columns.
REPORT_COLUMNS = IDENTITY + f"""
    CASE WHEN {BAD} THEN NULL WHEN hash(i * 17) % 4 = 0
         THEN (-1.0 + (hash(i * 7 + {{epoch}}) % 10000) / 10000.0)::FLOAT
         ELSE (1.0 + (hash(i * 7 + {{epoch}}) % 20000) / 10000.0)::FLOAT END AS mimic_score,
    CASE WHEN {BAD} THEN NULL ELSE ((hash(i * 13 + {{epoch}}) % 30000) / 10000.0)::FLOAT END AS mimic_weight,
    ((hash(i * 3) % 10000) / 1000.0)::FLOAT AS loss,
    CASE WHEN {BAD} THEN NULL WHEN hash(i * 17) % 4 = 0 THEN ((hash(i * 5) % 3000) / 10000.0)::FLOAT
         ELSE (0.2 + (hash(i * 5) % 2000) / 10000.0)::FLOAT END AS clip_score,
    ((hash(i * 11) % 10000) / 1000.0)::FLOAT AS ref_loss,
    NULL::INTEGER AS label,
    (5 + hash(i * 19) % 200)::INTEGER AS caption_chars,
    CASE WHEN {BAD} THEN NULL ELSE (64 + hash(i * 23) % 1000)::INTEGER END AS image_width,
    CASE WHEN {BAD} THEN NULL ELSE (64 + hash(i * 29) % 800)::INTEGER END AS image_height
"""


def write_run(directory: Path, rows: int, epochs: int, parts: int, columns: str, run_info: dict) -> None:
    """``rows`` score rows (rows // epochs samples x epochs) in ``parts`` zstd parts per epoch, and run.json."""
    import duckdb

    samples = rows // epochs
    scores = directory / "scores"
    scores.mkdir(parents=True)
    per_part = -(-samples // parts)
    connection = duckdb.connect()
    for epoch in range(epochs):
        for part in range(parts):
            start, stop = part * per_part, min(samples, (part + 1) * per_part)
            path = scores / f"epoch-{epoch:04d}-chunk-{part:05d}.parquet"
            connection.execute(f"COPY (SELECT {columns.format(epoch=epoch)} FROM range({start}, {stop}) t(i)) "
                               f"TO '{path}' (FORMAT parquet, COMPRESSION zstd)")
    (directory / "run.json").write_text(json.dumps(run_info))


def filter_run(directory: Path, rows: int, epochs: int, parts: int) -> None:
    """A finished run for `filter` (it warns about unfinished ones)."""
    write_run(directory, rows, epochs, parts, FILTER_COLUMNS, {"shards": []})
    (directory / "_SUCCESS").write_text("")


def report_run(directory: Path, rows: int, epochs: int, parts: int) -> None:
    """A trajectory run for `report`, with the pool columns (its shards do not exist)."""
    write_run(directory, rows, epochs, parts, REPORT_COLUMNS,
              {"shards": [], "train": {"mode": "head", "epochs": epochs}, "fingerprint": {"task": "contrastive"}})
