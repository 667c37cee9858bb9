"""The report's counts, in DuckDB over every row: which samples are kept and why not (default rule
or a filter manifest), the funnel, per-shard quality with error counts, statuses with example
errors, and the drop reasons with examples."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mimicfilter.curate.calibrate import calibrated_cut
from mimicfilter.curate.rules import apply_rules
from mimicfilter.curate.duck import sql_string
from mimicfilter.curate.outputs import CURATED_PREFIX
from mimicfilter.curate.reshard import RUN_ID_FIELD, index_file_name
from mimicfilter.curate.samples_cache import Reuse
from mimicfilter.curate.votes import AggregateConfig, aggregate
from mimicfilter.errors import MimicfilterError
from mimicfilter.store.rundir import run_identity

ERROR_EXAMPLES = 3
KEPT_REASON = "kept"
NOT_IN_MANIFEST = "not in the manifest"
STATUS_PREFIX = "status:"


@dataclass(frozen=True)
class ShardQuality:
    shard: str
    samples: int
    ok: int
    kept: int
    errors: dict[str, int] = field(default_factory=dict)  # status → samples, for every status but ok

    @property
    def quality(self) -> float | None:
        return self.kept / self.ok if self.ok else None


@dataclass(frozen=True)
class Funnel:
    samples: int
    usable: int
    kept: int


@dataclass(frozen=True)
class DropReason:
    reason: str  # "status:decode_error", "not keep-votes", "dropped by bottom-frac mimic_score=0.2", ...
    kind: str  # "status" (the sample could not be scored) or "rule" (scored, then not kept)
    count: int
    examples: list[dict[str, Any]]  # status: {error, count, first}; rule: {shard, key, mimic_score}


def decisions(connection, aggregation_config: AggregateConfig, filter_manifest: Path | None,
              reuse: Reuse | None = None) -> dict[str, Any]:
    """Table ``samples`` with ``kept`` and ``reason`` columns; returns the rule that decided them.

    Reasons read like ``filter``'s manifest: ``kept``, ``status:<status>``, ``not keep-votes``, or,
    with a manifest, its own ``reason`` column (``not in the manifest`` for samples it does not name).
    A manifest whose per-sample table may be reused (curate/samples_cache.py) *is* ``samples``: a
    view over the file, read where needed, nothing aggregated again.
    """
    columns = _manifest_columns(connection, str(filter_manifest)) if filter_manifest is not None else set()
    if filter_manifest is not None and reuse is not None and reuse.usable:
        connection.execute("CREATE OR REPLACE VIEW samples AS SELECT * REPLACE (coalesce(kept, false) AND status = 'ok' "
                           f"AS kept) FROM read_parquet({sql_string(str(filter_manifest))})")
        return _manifest_rule(str(filter_manifest), reuse.aggregation)
    aggregation = aggregate(connection, aggregation_config)
    if filter_manifest is None:
        cut = calibrated_cut(connection, [int(epoch) for epoch in aggregation["thresholds"]])
        if cut is not None and cut.rule is not None:  # a run with anchors: filter's default rule is its cut
            apply_rules(connection, [cut.rule], [], "and")
            connection.execute("CREATE OR REPLACE TABLE samples AS SELECT * FROM decisions")
            return {"name": cut.rule.text, "aggregation": aggregation, "thresholds": aggregation["thresholds"],
                    "keep": [cut.rule.text], "drop": [], "calibration": cut}
        connection.execute(
            "CREATE OR REPLACE TABLE samples AS SELECT *, (status = 'ok' AND vote_keep) AS kept, "
            f"CASE WHEN status <> 'ok' THEN {sql_string(STATUS_PREFIX)} || status "
            f"WHEN vote_keep THEN {sql_string(KEPT_REASON)} ELSE 'not keep-votes' END AS reason FROM samples"
        )
        name = f"keep-votes ({aggregation['binarize']} per epoch, {aggregation['combine_votes']} over epochs)"
        return {"name": name, "aggregation": aggregation, "thresholds": aggregation["thresholds"],
                "keep": ["keep-votes"], "drop": [], "calibration": cut}
    manifest = str(filter_manifest)
    stated = "m.reason" if "reason" in columns else f"CASE WHEN m.kept THEN {sql_string(KEPT_REASON)} ELSE 'dropped' END"
    # a sample is (shard, index); manifests written before the index column existed join on the key
    identity = ("index",) if "index" in columns else ("key",)
    repeated = connection.execute(f"SELECT count(*) - count(DISTINCT (shard, \"{identity[0]}\")) "
                                  f"FROM read_parquet({sql_string(manifest)})").fetchone()[0]
    if repeated:  # each would count its sample twice
        raise MimicfilterError(f"--filter-manifest {manifest} names {repeated} sample(s) more than once",
                               hint="pass the manifest.parquet that filter wrote")
    condition = " AND ".join(f's."{name}" = m."{name}"' for name in ("shard", *identity))
    connection.execute(
        f"CREATE OR REPLACE TABLE samples AS SELECT s.*, coalesce(m.kept, false) AND s.status = 'ok' AS kept, "
        f"m.kept IS NOT NULL AS in_manifest, "
        f"CASE WHEN s.status <> 'ok' THEN {sql_string(STATUS_PREFIX)} || s.status "
        f"WHEN m.kept IS NULL THEN {sql_string(NOT_IN_MANIFEST)} ELSE {stated} END AS reason "
        f"FROM samples s LEFT JOIN (SELECT shard, \"{identity[0]}\", kept{', reason' if 'reason' in columns else ''} "
        f"FROM read_parquet({sql_string(manifest)})) m ON {condition}"
    )
    matched = connection.execute("SELECT count(*) FILTER (WHERE in_manifest) FROM samples").fetchone()[0]
    if matched == 0:
        raise MimicfilterError(f"--filter-manifest {manifest} names none of this run's samples",
                               hint="pass the manifest of a filter over this run")
    return _manifest_rule(manifest, aggregation)


def _manifest_columns(connection, manifest: str) -> set[str]:
    """The manifest's columns, once it is known to be one: shard, key and a true/false ``kept``."""
    try:
        types = {row[0]: row[1] for row in
                 connection.execute(f"DESCRIBE SELECT * FROM read_parquet({sql_string(manifest)})").fetchall()}
    except Exception as error:  # duckdb raises several types for unreadable files
        raise MimicfilterError(f"cannot read --filter-manifest {manifest}: {' '.join(str(error).split())[:200]}") from error
    if not {"shard", "key", "kept"} <= set(types) or types["kept"] != "BOOLEAN":
        raise MimicfilterError(f"--filter-manifest {manifest} is not a filter manifest (needs shard, key and a "
                               "true/false kept)")
    return set(types)


def _manifest_rule(manifest: str, aggregation: dict) -> dict[str, Any]:
    rules = _manifest_rules(manifest)
    return {"name": _manifest_rule_name(manifest), "aggregation": aggregation, "thresholds": aggregation["thresholds"],
            "keep": rules.get("keep", [f"manifest {manifest}"]), "drop": rules.get("drop", [])}


def _filter_summary(manifest: str) -> dict[str, Any] | None:
    """The ``summary.json`` that ``filter`` wrote next to the manifest; None without one (or an unreadable one)."""
    summary_file = Path(manifest).with_name("summary.json")
    try:
        summary = json.loads(summary_file.read_text()) if summary_file.is_file() else None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return summary if isinstance(summary, dict) else None


def check_manifest_inputs(manifest: Path, run_dir, info: dict[str, Any]) -> None:
    """A manifest whose filter read other runs than this one (``info``: its run.json), by the runs that
    its ``summary.json`` names: its decisions are about other scores, even where the shards are the
    same. A run moved or copied since is the same run. Nothing to check without that record."""
    runs = (_filter_summary(str(manifest)) or {}).get("input_runs")
    if not isinstance(runs, list) or not runs:
        return
    mine = run_identity(info)
    if not any(isinstance(run, dict) and all(run.get(name) == value for name, value in mine.items()) for run in runs):
        named = ", ".join(str(run.get("run")) for run in runs if isinstance(run, dict))
        raise MimicfilterError(f"--filter-manifest {manifest} was written by a filter over {named}, which is not the run "
                               f"now in {run_dir} (another run, or one scored again since)",
                               hint="pass the manifest of a filter over this run, or filter it again")


def curated_shards_mismatch(manifest: Path) -> str | None:
    """Curated shards outside the manifest's directory are published first, as a unit of their own: a
    filter killed between the two swaps leaves new shards beside the old manifest. Their wids index
    names the filter run that wrote them; a warning when that is not the manifest's run."""
    summary = _filter_summary(str(manifest)) or {}
    shards = (summary.get("outputs") or {}).get("curated_shards")
    if not isinstance(shards, str) or not summary.get("run_id"):
        return None
    try:
        written_by = json.loads((Path(shards) / index_file_name(CURATED_PREFIX)).read_text()).get(RUN_ID_FIELD)
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        return None  # gone or not ours: nothing to compare
    if written_by in (None, summary["run_id"]):
        return None
    return (f"the curated shards in {shards} were written by filter run {written_by}, not by the run {summary['run_id']} "
            "that wrote this manifest (a filter stopped between publishing the two?): run the filter again")


def filter_cut_target(manifest: str) -> dict[str, float]:
    """The calibrated cut's target that ``filter`` wrote the manifest with (``{"precision": p}`` or
    ``{"recall": r}``, from its summary.json); empty when it made none, or nothing says."""
    target: Any = _filter_summary(manifest)
    for key in ("calibration", "cut", "target"):
        target = target.get(key) if isinstance(target, dict) else None
    if not isinstance(target, dict) or len(target) != 1:
        return {}
    (name, value), = target.items()
    ok = name in ("precision", "recall") and isinstance(value, (int, float)) and not isinstance(value, bool) \
        and 0 < value <= 1
    return {name: float(value)} if ok else {}


def _manifest_rules(manifest: str) -> dict[str, Any]:
    """The filter's rules from its ``summary.json``; none known (a rule that may fix the kept share) without one."""
    return (_filter_summary(manifest) or {}).get("rules", {})


def _manifest_rule_name(manifest: str) -> str:
    """The rule in full, from the ``summary.json`` that ``filter`` wrote next to the manifest."""
    filter_summary = _filter_summary(manifest)
    if filter_summary is None:
        return f"manifest {manifest}"
    rules, votes = filter_summary.get("rules", {}), filter_summary.get("aggregation", {})
    keep = [
        f"{rule} ({votes['binarize']} per epoch, {votes['combine_votes']} over epochs)"
        if rule == "keep-votes" and {"binarize", "combine_votes"} <= set(votes) else rule
        for rule in rules.get("keep", [])
    ]
    joined = f" {rules.get('combine', 'and').upper()} ".join(keep)
    drops = "".join(f" minus {drop}" for drop in rules.get("drop", []))
    return f"{joined}{drops} (from {manifest})"


def funnel(connection) -> Funnel:
    samples, usable, kept = connection.execute(
        "SELECT count(*), count(*) FILTER (WHERE status = 'ok'), count(*) FILTER (WHERE kept) FROM samples"
    ).fetchone()
    return Funnel(samples, usable, kept)


def _shard_order(shard: ShardQuality) -> tuple:
    """Shards without a usable sample first (nothing in them can be judged), then worst quality."""
    return (shard.quality is not None, shard.quality if shard.quality is not None else 0.0, shard.shard)


def shard_quality(connection) -> list[ShardQuality]:
    """Per shard: samples, usable and kept samples, non-ok statuses; unusable shards first, then worst first."""
    errors: dict[str, dict[str, int]] = {}
    for shard, status, count in connection.execute(
        "SELECT shard, status, count(*) FROM samples WHERE status <> 'ok' GROUP BY shard, status ORDER BY shard, 3 DESC, status"
    ).fetchall():
        errors.setdefault(shard, {})[status] = count
    rows = connection.execute(
        "SELECT shard, count(*), count(*) FILTER (WHERE status = 'ok'), count(*) FILTER (WHERE kept) "
        "FROM samples GROUP BY shard"
    ).fetchall()
    shards = [ShardQuality(shard, samples, ok, kept, errors.get(shard, {})) for shard, samples, ok, kept in rows]
    return sorted(shards, key=_shard_order)


def status_counts(connection) -> dict[str, dict[str, Any]]:
    """Per status (of each sample's last epoch): the count and a few distinct example errors."""
    counts = dict(connection.execute("SELECT status, count(*) FROM samples GROUP BY status ORDER BY 2 DESC, 1").fetchall())
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


def drop_reasons(connection, statuses: dict[str, dict[str, Any]]) -> list[DropReason]:
    """Every reason a sample was not kept, most common first: status errors with their example
    errors, rule reasons with a few samples (a deterministic hash pick, not the extremes)."""
    found = []
    for reason, count in connection.execute(
        "SELECT reason, count(*) FROM samples WHERE NOT kept GROUP BY reason ORDER BY 2 DESC, 1"
    ).fetchall():
        if reason.startswith(STATUS_PREFIX):
            status = reason[len(STATUS_PREFIX):]
            found.append(DropReason(reason, "status", count, statuses.get(status, {}).get("examples", [])))
            continue
        examples = connection.execute(
            "SELECT shard, key, mimic_score FROM samples WHERE NOT kept AND reason = ? "
            "ORDER BY hash(shard || chr(0) || \"index\"::VARCHAR), shard, \"index\" LIMIT ?",
            [reason, ERROR_EXAMPLES],
        ).fetchall()
        found.append(DropReason(reason, "rule", count, [
            {"shard": shard, "key": key, "mimic_score": None if score is None else float(score)}
            for shard, key, score in examples
        ]))
    return found
