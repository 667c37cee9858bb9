"""The ``filter`` pipeline: score tables → aggregate → rules → manifest and curated artefacts.

    score parts ──► aggregate (per sample) ──► [join external scores] ──► rules ──► decisions
        decisions ──► manifest.parquet, summary.json, keys, DataComp .npy, curated shards

All the heavy lifting is DuckDB SQL over the Parquet parts (out of core); Python only streams
the kept keys when it has to (``--keys``, ``--write-shards``) and fetches uids as numpy arrays.
"""

from __future__ import annotations

import json
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import duckdb

from mimicfilter.curate.duck import connect, load_scores, score_files, sql_string
from mimicfilter.curate.estimate import QualityEstimate, estimate_label, estimate_quality
from mimicfilter.curate.outputs import write_datacomp, write_keys, write_manifest, write_shards
from mimicfilter.curate.rules import Rule, apply_rules
from mimicfilter.curate.votes import AggregateConfig, aggregate
from mimicfilter.errors import MimicfilterError
from mimicfilter.store.atomic import atomic_write_json
from mimicfilter.store.paths import RUN_FILE, run_path

JOIN_KEYS = {"uid": ("uid",), "shard,key": ("shard", "key")}


@dataclass(frozen=True)
class JoinSpec:
    """An external score table joined to the samples, e.g. DataComp metadata with CLIP-L/14 scores."""

    path: str
    on: str = "uid"

    def __post_init__(self):
        if self.on not in JOIN_KEYS:
            raise MimicfilterError(f"--on {self.on!r}", hint="uid or shard,key")


@dataclass(frozen=True)
class FilterConfig:
    inputs: tuple[str, ...]
    out_dir: Path | None
    keep: tuple[Rule, ...] = ()
    drop: tuple[Rule, ...] = ()
    combine: str = "and"
    aggregation: AggregateConfig = field(default_factory=AggregateConfig)
    joins: tuple[JoinSpec, ...] = ()
    keys: str | None = None  # "-" for stdout, or a file path
    datacomp_npy: Path | None = None
    write_shards: Path | None = None
    maxcount: int = 10_000
    dry_run: bool = False
    memory_limit: str | None = None
    argv: tuple[str, ...] = ()

    def __post_init__(self):
        if not self.inputs:
            raise MimicfilterError("no score tables given", hint="pass run directories or Parquet files")
        if self.out_dir is None and not self.dry_run:
            raise MimicfilterError("--out is required (or --dry-run)")
        if self.maxcount < 1:
            raise MimicfilterError(f"--maxcount {self.maxcount}: must be at least 1")

    @property
    def effective_keep(self) -> tuple[Rule, ...]:
        """With no keep rule, the paper's filter: keep what the epoch votes keep."""
        return self.keep or (Rule("keep-votes"),)


def _join(connection, joins: tuple[JoinSpec, ...]) -> list[dict]:
    """Left-join external tables onto ``samples`` (in place); returns what was joined."""
    report = []
    for number, join in enumerate(joins):
        if not Path(join.path).exists() and not any(c in join.path for c in "*?["):
            raise MimicfilterError(f"--join {join.path} does not exist")
        keys = JOIN_KEYS[join.on]
        try:
            connection.execute(
                f"CREATE OR REPLACE VIEW external_{number} AS SELECT * FROM read_parquet({sql_string(join.path)})"
            )
            external_columns = [row[0] for row in connection.execute(f"DESCRIBE external_{number}").fetchall()]
        except duckdb.Error as error:
            raise MimicfilterError(f"cannot read --join {join.path}: {' '.join(str(error).split())[:200]}") from error
        missing = [key for key in keys if key not in external_columns]
        if missing:
            raise MimicfilterError(f"--join {join.path} has no column {', '.join(missing)} to join --on {join.on}")
        key_list = ", ".join(f'"{key}"' for key in keys)
        total, distinct = connection.execute(
            f"SELECT count(*), count(DISTINCT ({key_list})) FROM external_{number}"
        ).fetchone()
        if total != distinct:
            raise MimicfilterError(f"--join {join.path}: {total - distinct} duplicate {join.on} value(s)",
                                   hint="the joined table needs one row per sample")
        ours = {row[0] for row in connection.execute("DESCRIBE samples").fetchall()}
        added = [column for column in external_columns if column not in ours]
        skipped = [column for column in external_columns if column in ours and column not in keys]
        selected = ", ".join(f'e."{column}"' for column in added)
        condition = " AND ".join(f's."{key}" = e."{key}"' for key in keys)
        connection.execute(
            f"CREATE OR REPLACE TABLE samples AS SELECT s.*{', ' + selected if selected else ''} "
            f"FROM samples s LEFT JOIN external_{number} e ON {condition}"
        )
        matched = connection.execute(
            f"SELECT count(*) FROM samples s SEMI JOIN external_{number} e ON {condition}"
        ).fetchone()[0]
        report.append({"path": join.path, "on": join.on, "columns": added, "ignored_columns": skipped, "matched": matched})
    return report


def _summary(connection, config: FilterConfig, aggregation: dict, joins: list[dict],
             estimate: QualityEstimate) -> dict[str, Any]:
    reasons = dict(connection.execute("SELECT reason, count(*) FROM decisions GROUP BY reason ORDER BY 2 DESC").fetchall())
    total, ok, kept = connection.execute(
        "SELECT count(*), count(*) FILTER (WHERE status = 'ok'), count(*) FILTER (WHERE kept) FROM decisions"
    ).fetchone()
    return {
        "inputs": list(config.inputs),
        "argv": list(config.argv),
        "rules": {
            "keep": [rule.text for rule in config.effective_keep],
            "drop": [rule.text for rule in config.drop],
            "combine": config.combine,
        },
        "aggregation": aggregation,
        "joins": joins,
        "samples": total,
        "ok": ok,
        "kept": kept,
        "kept_fraction": kept / total if total else None,
        **_estimate_fields(config, kept, ok, estimate),
        "reasons": reasons,
    }


def _estimate_fields(config: FilterConfig, kept: int, ok: int, estimate: QualityEstimate) -> dict[str, Any]:
    """The kept share of usable samples under its right name, and the votes' quality estimate of the pool."""
    label = estimate_label([rule.text for rule in config.effective_keep], [rule.text for rule in config.drop])
    return {
        "headline": {"label": label, "value": kept / ok if ok else None},
        "quality_estimate": estimate.value,
        "quality": estimate.as_dict(),
        "warnings": list(estimate.warnings),
    }


def _shard_order(connection) -> list[str]:
    return [row[0] for row in connection.execute("SELECT DISTINCT shard FROM samples ORDER BY shard").fetchall()]


def run_filter(config: FilterConfig, stdout: IO[str] = sys.stdout) -> dict[str, Any]:
    """Run the filter; returns the summary (also written to summary.json unless --dry-run)."""
    files = score_files(config.inputs)
    with tempfile.TemporaryDirectory(prefix="mimicfilter-duckdb-") as spill:
        connection = connect(config.memory_limit, spill)
        load_scores(connection, files)
        aggregation = aggregate(connection, config.aggregation)
        estimate = estimate_quality(connection, aggregation, config.aggregation)
        joins = _join(connection, config.joins)
        apply_rules(connection, list(config.effective_keep), list(config.drop), config.combine)
        summary = _summary(connection, config, aggregation, joins, estimate)
        if config.dry_run:
            return summary
        out = config.out_dir
        write_manifest(connection, out / "manifest.parquet")
        shard_order = _run_shard_order(config.inputs) or _shard_order(connection)
        outputs = {"manifest": str(out / "manifest.parquet")}
        if config.keys:
            outputs["keys"] = config.keys
            summary["keys_written"] = write_keys(connection, shard_order, config.keys, stdout)
        if config.datacomp_npy:
            summary["datacomp_uids"] = write_datacomp(connection, config.datacomp_npy)
            outputs["datacomp_npy"] = str(config.datacomp_npy)
        if config.write_shards:
            summary["curated_shards"] = write_shards(connection, shard_order, config.write_shards, config.maxcount,
                                                   summary["kept"])
            outputs["curated_shards"] = str(config.write_shards)
        summary["outputs"] = outputs
        atomic_write_json(out / "summary.json", summary)
        connection.close()
    return summary


def _run_shard_order(inputs: tuple[str, ...]) -> list[str]:
    """The shard order of the runs' run.json files, so curated shards follow the original order."""
    order: list[str] = []
    for item in inputs:
        run_file = run_path(item) / RUN_FILE
        if run_file.is_file():
            order.extend(json.loads(run_file.read_text()).get("shards", []))
    return list(dict.fromkeys(order))
