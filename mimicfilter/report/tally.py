"""The report's numbers, in DuckDB: which samples are kept (default rule or a filter manifest),
per-shard quality, statuses with example errors, hash-sampled rows for plots, the extreme samples."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from mimicfilter.curate.duck import sql_string
from mimicfilter.curate.votes import AggregateConfig, aggregate
from mimicfilter.errors import MimicfilterError

ERROR_EXAMPLES = 3



@dataclass(frozen=True)
class ShardQuality:
    shard: str
    samples: int
    ok: int
    kept: int

    @property
    def quality(self) -> float | None:
        return self.kept / self.ok if self.ok else None


@dataclass(frozen=True)
class SheetEntry:
    shard: str
    key: str
    mimic_score: float
    label: int | None
    kept: bool
    index: int | None = None  # position in the shard: a shard may hold one key twice

    def moved(self, locate) -> "SheetEntry":
        """This entry with its shard read from where ``locate`` says it is now (--shard-root)."""
        return replace(self, shard=locate(self.shard))


def decisions(connection, aggregation_config: AggregateConfig, filter_manifest: Path | None) -> dict[str, Any]:
    """Table ``samples`` with a ``kept`` column; returns the rule that decided it."""
    aggregation = aggregate(connection, aggregation_config)
    if filter_manifest is None:
        connection.execute("ALTER TABLE samples ADD COLUMN kept BOOLEAN")
        connection.execute("UPDATE samples SET kept = (status = 'ok' AND vote_keep)")
        name = f"keep-votes ({aggregation['binarize']} per epoch, {aggregation['combine_votes']} over epochs)"
        return {"name": name, "aggregation": aggregation, "thresholds": aggregation["thresholds"]}
    manifest = str(filter_manifest)
    try:
        columns = {row[0] for row in connection.execute(f"DESCRIBE SELECT * FROM read_parquet({sql_string(manifest)})").fetchall()}
    except Exception as error:  # duckdb raises several types for unreadable files
        raise MimicfilterError(f"cannot read --filter-manifest {manifest}: {' '.join(str(error).split())[:200]}") from error
    if not {"shard", "key", "kept"} <= columns:
        raise MimicfilterError(f"--filter-manifest {manifest} is not a filter manifest (needs shard, key, kept)")
    identity = 's.shard = m.shard AND s."index" = m."index"' if "index" in columns else "s.shard = m.shard AND s.key = m.key"
    connection.execute(
        f"CREATE OR REPLACE TABLE samples AS SELECT s.*, coalesce(m.kept, false) AND s.status = 'ok' AS kept, "
        f"m.kept IS NOT NULL AS in_manifest FROM samples s LEFT JOIN "
        f"(SELECT * FROM read_parquet({sql_string(manifest)})) m ON {identity}"
    )
    matched = connection.execute("SELECT count(*) FILTER (WHERE in_manifest) FROM samples").fetchone()[0]
    if matched == 0:
        raise MimicfilterError(f"--filter-manifest {manifest} names none of this run's samples",
                               hint="pass the manifest of a filter over this run")
    summary_file = Path(manifest).with_name("summary.json")
    name = f"manifest {manifest}"
    if summary_file.is_file():
        filter_summary = json.loads(summary_file.read_text())
        rules, votes = filter_summary.get("rules", {}), filter_summary.get("aggregation", {})
        keep = [
            f"{rule} ({votes['binarize']} per epoch, {votes['combine_votes']} over epochs)"
            if rule == "keep-votes" and {"binarize", "combine_votes"} <= set(votes) else rule
            for rule in rules.get("keep", [])
        ]
        joined = f" {rules.get('combine', 'and').upper()} ".join(keep)
        drops = "".join(f" minus {drop}" for drop in rules.get("drop", []))
        name = f"{joined}{drops} (from {manifest})"
    return {"name": name, "aggregation": aggregation, "thresholds": aggregation["thresholds"]}


def shard_quality(connection) -> list[ShardQuality]:
    """Per shard: samples, usable samples and kept samples; worst quality first (empty shards last)."""
    rows = connection.execute(
        "SELECT shard, count(*), count(*) FILTER (WHERE status = 'ok'), count(*) FILTER (WHERE kept) "
        "FROM samples GROUP BY shard"
    ).fetchall()
    shards = [ShardQuality(shard, samples, ok, kept) for shard, samples, ok, kept in rows]
    return sorted(shards, key=lambda s: (s.quality is None, s.quality if s.quality is not None else 0, s.shard))


def status_counts(connection) -> dict[str, dict[str, Any]]:
    """Per status (of each sample's last epoch): the count and a few distinct example errors."""
    counts = dict(connection.execute("SELECT status, count(*) FROM samples GROUP BY status ORDER BY 2 DESC").fetchall())
    result = {}
    for status, count in counts.items():
        examples = connection.execute(
            "SELECT error, count(*) AS n, min(shard || ' / ' || key) FROM samples WHERE status = ? AND error IS NOT NULL "
            "GROUP BY error ORDER BY n DESC, error LIMIT ?",
            [status, ERROR_EXAMPLES],
        ).fetchall()
        result[status] = {
            "count": count,
            "examples": [{"error": error, "count": n, "first": where} for error, n, where in examples],
        }
    return result


def _hash_filter(total: int, wanted: int, key_sql: str) -> str:
    """A deterministic ~wanted/total sample by hash of the sample's identity (stable across epochs)."""
    if total <= wanted:
        return "true"
    fraction_ppm = max(1, int(1_000_000 * wanted / total))
    return f"(hash({key_sql}) % 1000000) < {fraction_ppm}"


@dataclass(frozen=True)
class _Sampled:
    data: dict[str, np.ndarray]
    total: int  # rows before sampling


def _hashed_sample(connection, table: str, condition: str, columns: str, wanted: int) -> _Sampled:
    """``columns`` of ``table`` rows meeting ``condition``, hash-sampled down to about ``wanted``."""
    total = connection.execute(f"SELECT count(*) FROM {table} WHERE {condition}").fetchone()[0]
    where = _hash_filter(total, wanted, "shard || chr(0) || key")
    data = connection.execute(f"SELECT {columns} FROM {table} WHERE {condition} AND {where}").fetchnumpy()
    return _Sampled(data, total)


def sample_rows(connection, wanted: int) -> dict[str, Any]:
    """Per-epoch score rows (ok only) for the histograms, hash-sampled when there are many."""
    sampled = _hashed_sample(connection, "scores", "status = 'ok' AND mimic_score IS NOT NULL",
                             "epoch, mimic_score, mimic_weight", wanted)
    data = sampled.data
    return {"epoch": np.asarray(data["epoch"]), "mimic_score": np.asarray(data["mimic_score"], dtype=float),
            "mimic_weight": np.asarray(data["mimic_weight"], dtype=float), "rows_used": len(data["epoch"]),
            "rows_total": sampled.total}


def sample_samples(connection, wanted: int) -> dict[str, Any]:
    """Per-sample means (ok only) with the keep decision, for the score-vs-CLIP plot."""
    sampled = _hashed_sample(connection, "samples", "status = 'ok'", "mimic_score, clip_score, kept", wanted)
    data, total = sampled.data, sampled.total
    clip = data["clip_score"]
    clip = None if clip is None or len(clip) == 0 or np.all(_is_null(clip)) else np.asarray(clip, dtype=float)
    return {"mimic_score": np.asarray(data["mimic_score"], dtype=float), "clip_score": clip,
            "kept": np.asarray(data["kept"], dtype=bool), "rows_used": len(data["kept"]), "rows_total": total}


def _is_null(values) -> np.ndarray:
    mask = getattr(values, "mask", None)
    if mask is not None:
        return np.asarray(np.broadcast_to(mask, values.shape))
    return np.array([value is None for value in values])


def extreme_samples(connection, order: str, count: int) -> list[SheetEntry]:
    if not count:
        return []
    rows = connection.execute(
        f"SELECT shard, key, mimic_score, label, kept, \"index\" FROM samples "
        f"WHERE status = 'ok' AND mimic_score IS NOT NULL ORDER BY mimic_score {order}, shard, \"index\" LIMIT ?",
        [count],
    ).fetchall()
    return [SheetEntry(shard, key, float(score), label, bool(kept), index)
            for shard, key, score, label, kept, index in rows]

