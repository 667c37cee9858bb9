"""The ``filter`` pipeline: score tables → aggregate → rules → manifest and curated artefacts.

    score parts ──► aggregate (per sample) ──► [join external scores] ──► rules ──► decisions
        decisions ──► manifest.parquet, summary.json, keys, DataComp .npy, curated shards

All the heavy lifting is DuckDB SQL over the Parquet parts (out of core); Python only streams
the kept keys when it has to (``--keys``, ``--write-shards``) and fetches uids as numpy arrays.
Rules (user SQL included) run after file access is switched off; the outputs are published as
one unit (publish.py).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import duckdb

from mimicfilter.curate.calibrate import MIN_ANCHORS, CalibratedCut, calibrated_cut, calibration_warnings
from mimicfilter.curate import dedup as content_dedup
from mimicfilter.curate.duck import (check_memory_limit, connect, forbid_file_access, load_scores, score_files,
                                     sql_identifier, sql_string)
from mimicfilter.curate.duplicates import DEDUPE_UID, dedupe_uids, find_duplicates, shared_kept_uids
from mimicfilter.curate.estimate import QualityEstimate, estimate_quality, headline_fields
from mimicfilter.curate.outputs import write_keys
from mimicfilter.curate.publish import MANIFEST, SUMMARY, publish
from mimicfilter.curate.rules import Rule, apply_rules
from mimicfilter.curate.samples_cache import parts_fingerprint, samples_record
from mimicfilter.curate.votes import AggregateConfig, aggregate
from mimicfilter.errors import MimicfilterError
from mimicfilter.shards.discover import shard_locator
from mimicfilter.store.guard import Inputs, Output, Target, guard_outputs
from mimicfilter.store.schema import NON_FINITE
from mimicfilter.store.paths import RUN_FILE, SUCCESS_FILE, is_remote_url, run_path
from mimicfilter.store.rundir import epochs_missing, run_identity, run_record, unfinished_run
from mimicfilter.store.scratch import scratch_directory

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
    strict: bool = False  # refuse unfinished runs instead of warning
    dedupe_uid: str = "off"  # see duplicates.py
    shard_roots: tuple[str, ...] = ()  # --shard-root: where moved shards are read from
    target_precision: float | None = None  # the calibrated cut's target (needs anchors: score --trusted)
    target_recall: float | None = None
    dedup: content_dedup.DedupOptions = field(default_factory=content_dedup.DedupOptions)  # --dedup (curate/dedup.py)

    def __post_init__(self):
        if not self.inputs:
            raise MimicfilterError("no score tables given", hint="pass run directories or Parquet files")
        if self.out_dir is None and not self.dry_run:
            raise MimicfilterError("--out is required (or --dry-run)")
        if self.maxcount < 1:
            raise MimicfilterError(f"--maxcount {self.maxcount}: must be at least 1")
        check_memory_limit(self.memory_limit)
        if self.dedupe_uid not in DEDUPE_UID:
            raise MimicfilterError(f"--dedupe-uid {self.dedupe_uid!r}", hint=f"one of {', '.join(DEDUPE_UID)}")
        if self.keys not in (None, "-") and os.path.isdir(self.keys):
            raise MimicfilterError(f"--keys {self.keys} is a directory", hint="name a file, or - for stdout")
        written = [name for name, value in (("--keys FILE", self.keys not in (None, "-")),
                                            ("--datacomp-npy", self.datacomp_npy), ("--write-shards", self.write_shards))
                   if value]
        if self.shard_roots and self.write_shards is None:
            raise MimicfilterError("--shard-root only changes where --write-shards reads the shards",
                                   hint="add --write-shards DIR, or drop --shard-root")
        for name, value in (("--target-precision", self.target_precision), ("--target-recall", self.target_recall)):
            if value is not None and not 0 < value <= 1:
                raise MimicfilterError(f"{name} {value}: must lie in (0, 1]")
        if self.target_precision is not None and self.target_recall is not None:
            raise MimicfilterError("--target-precision and --target-recall both choose the cut", hint="give one")
        if (self.target_precision is not None or self.target_recall is not None) and self.keep:
            raise MimicfilterError("--target-precision/--target-recall choose the calibrated cut, the keep rule",
                                   hint="drop the other keep rules (--drop rules still apply after it)")
        if self.dry_run and written:
            raise MimicfilterError(f"--dry-run writes no files, but {', '.join(written)} asks for one",
                                   hint="drop --dry-run, or the output options (--keys - still prints keys)")

    @property
    def effective_keep(self) -> tuple[Rule, ...]:
        """With no keep rule, the paper's filter: keep what the epoch votes keep (a run with anchors
        is cut by its calibration instead: :func:`_keep_rules`)."""
        return self.keep or (Rule("keep-votes"),)

    @property
    def wants_calibrated_cut(self) -> bool:
        return not self.keep


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
            external_types = {row[0]: row[1] for row in connection.execute(f"DESCRIBE external_{number}").fetchall()}
        except duckdb.Error as error:
            raise MimicfilterError(f"cannot read --join {join.path}: {' '.join(str(error).split())[:200]}") from error
        external_columns = list(external_types)
        missing = [key for key in keys if key not in external_columns]
        if missing:
            raise MimicfilterError(f"--join {join.path} has no column {', '.join(missing)} to join --on {join.on}")
        not_text = [f"{key} is {external_types[key]}" for key in keys if external_types[key] != "VARCHAR"]
        if not_text:  # the run's keys are text: another type would fail inside the join
            raise MimicfilterError(f"--join {join.path}: {', '.join(not_text)}, not text like the run's",
                                   hint="write the key column as strings")
        key_list = ", ".join(sql_identifier(key) for key in keys)
        keyless = " OR ".join(f"{sql_identifier(key)} IS NULL" for key in keys)
        total, distinct, unkeyed = connection.execute(
            f"SELECT count(*), count(DISTINCT ({key_list})), count(*) FILTER (WHERE {keyless}) FROM external_{number}"
        ).fetchone()
        if unkeyed:
            raise MimicfilterError(f"--join {join.path}: {unkeyed} row(s) without a {join.on} value match no sample",
                                   hint="drop those rows, or fill in their key")
        if total != distinct:
            raise MimicfilterError(f"--join {join.path}: {total - distinct} duplicate {join.on} value(s)",
                                   hint="the joined table needs one row per sample")
        ours = {row[0] for row in connection.execute("DESCRIBE samples").fetchall()}
        added = [column for column in external_columns if column not in ours]
        skipped = [column for column in external_columns if column in ours and column not in keys]
        selected = ", ".join(f"e.{sql_identifier(column)}" for column in added)
        condition = " AND ".join(f"s.{sql_identifier(key)} = e.{sql_identifier(key)}" for key in keys)
        connection.execute(
            f"CREATE OR REPLACE TABLE samples AS SELECT s.*{', ' + selected if selected else ''} "
            f"FROM samples s LEFT JOIN external_{number} e ON {condition}"
        )
        matched = connection.execute(
            f"SELECT count(*) FROM samples s SEMI JOIN external_{number} e ON {condition}"
        ).fetchone()[0]
        report.append({"path": join.path, "on": join.on, "columns": added, "ignored_columns": skipped, "matched": matched})
    return report


def _summary(connection, config: FilterConfig, keep: tuple[Rule, ...], aggregation: dict, joins: list[dict],
             estimate: QualityEstimate, cut: CalibratedCut | None) -> dict[str, Any]:
    reasons = dict(connection.execute("SELECT reason, count(*) FROM decisions GROUP BY reason ORDER BY 2 DESC").fetchall())
    total, ok, kept, non_finite = connection.execute(
        "SELECT count(*), count(*) FILTER (WHERE status = 'ok'), count(*) FILTER (WHERE kept), "
        f"count(*) FILTER (WHERE status = '{NON_FINITE}') FROM decisions"
    ).fetchone()
    return {
        "inputs": list(config.inputs),
        "argv": list(config.argv),
        "rules": {
            "keep": [rule.text for rule in keep],
            "drop": [rule.text for rule in config.drop],
            "combine": config.combine,
        },
        "aggregation": aggregation,
        "joins": joins,
        "samples": total,
        "ok": ok,
        "kept": kept,
        "kept_fraction": kept / total if total else None,
        "non_finite_scores": non_finite,  # samples with a NaN, infinite or missing score in some epoch
        **headline_fields([rule.text for rule in keep], [rule.text for rule in config.drop], kept, ok, estimate,
                          cut.calibration.as_dict() if cut else None),
        **({"calibration": cut.summary()} if cut else {}),
        "reasons": reasons,
    }


def _shard_order(connection) -> list[str]:
    return [row[0] for row in connection.execute("SELECT DISTINCT shard FROM samples ORDER BY shard").fetchall()]


def _warnings(connection, config: FilterConfig, unfinished: list[str], duplicates: dict,
              missing_epochs: list[str]) -> list[str]:
    warnings = [f"{message}: filtering what it holds so far" for message in unfinished] + missing_epochs
    for what, found in duplicates.items():
        if found["names"]:
            example = found["example"]
            warnings.append(f"{found['names']} {what[:-1]}(s) shared by {found['samples']} samples "
                            f"(e.g. {example['name']}: {example['samples']}); kept apart by (shard, index)")
    if config.datacomp_npy is not None and (extra := shared_kept_uids(connection)):
        warnings.append(f"{extra} sample(s) not kept carry the uid of a kept sample: DataComp's resharder copies "
                        "every sample with a listed uid (--dedupe-uid drop-all keeps the subset exact)")
    return warnings


def _outputs(config: FilterConfig) -> list[Output]:
    return [
        Output("--out", config.out_dir, directory=True, whole=True, own_names=(MANIFEST, SUMMARY, SUCCESS_FILE)),
        Output("--keys", config.keys, stream_ok=True),
        Output("--datacomp-npy", config.datacomp_npy, stream_ok=True),
        Output("--write-shards", config.write_shards, directory=True, whole=True),
    ]


def _guard(config: FilterConfig, files: list[str], shards: list[str]) -> dict[str, Target]:
    """Every output checked against the inputs (store/guard.py) before anything is written."""
    runs = [item for item in config.inputs if not is_remote_url(item) and run_path(item).is_dir()]
    return guard_outputs(_outputs(config), Inputs.of(runs=runs, score_table=files, joined_table=[
        join.path for join in config.joins], shard=shards))


def _top_k_warnings(connection, rules: tuple[Rule, ...]) -> list[str]:
    """A top-k rule asking for more samples than there are usable ones keeps them all: say so."""
    warnings = []
    for rule in rules:
        if rule.kind == "top-k":
            usable = connection.execute(
                f'SELECT count("{rule.column}") FROM samples WHERE status = \'ok\'').fetchone()[0]
            if rule.value > usable:
                warnings.append(f"--top-k {rule.column}={rule.value:g} asks for more than the {usable} usable samples "
                                f"with a {rule.column} value: every one is kept")
    return warnings


def _keep_rules(config: FilterConfig, cut: CalibratedCut | None) -> tuple[Rule, ...]:
    """The keep rules: the user's; else the calibrated cut when the run has anchors; else the votes."""
    targeted = config.target_precision is not None or config.target_recall is not None
    if targeted and cut is None:
        raise MimicfilterError("--target-precision/--target-recall need a run scored with anchors",
                               hint=f"score with --trusted CHECKED_SHARDS (at least {MIN_ANCHORS} usable trusted samples)")
    if not config.wants_calibrated_cut or cut is None:
        return config.effective_keep
    if cut.rule is None:
        raise MimicfilterError(f"no cut reaches the target {cut.target}: the estimated precision stays below it",
                               hint="lower --target-precision, or use --target-recall")
    return (cut.rule,)


def run_filter(config: FilterConfig, stdout: IO[str] = sys.stdout) -> dict[str, Any]:
    """Run the filter; returns the summary (also written to summary.json unless --dry-run)."""
    files = score_files(config.inputs)
    runs = _input_runs(config.inputs)
    _check_comparable(runs)
    _guard(config, files, _run_shard_order(runs))
    unfinished = [message for item in config.inputs if (message := unfinished_run(item))]
    if unfinished and config.strict:
        raise MimicfilterError(unfinished[0], hint="wait for the run to finish (or resume it), or drop --strict")
    parts = parts_fingerprint(files)  # before reading them: a part that changes later makes the record stale
    with scratch_directory("duckdb") as spill:
        connection = connect(config.memory_limit, spill)
        load_scores(connection, files)
        rows = connection.execute("SELECT count(*) FROM scores").fetchone()[0]
        dedup = content_dedup.prepare(connection, config.dedup, config.inputs, list(config.keep))  # narrows `scores`
        aggregation = aggregate(connection, config.aggregation)
        estimate = estimate_quality(connection, aggregation, config.aggregation)
        cut = calibrated_cut(connection, [int(epoch) for epoch in aggregation["thresholds"]], config.target_precision,
                             config.target_recall)
        keep = _keep_rules(config, cut)
        anchor_warnings = calibration_warnings(connection, cut)
        content_dedup.add_duplicates(connection, dedup)  # the dropped duplicates' rows, never kept by a rule
        joins = _join(connection, config.joins)
        forbid_file_access(connection)  # user SQL (--where) runs from here on: tables only, no files
        apply_rules(connection, list(keep), list(config.drop), config.combine,
                    excluded=content_dedup.excluded_reason(dedup))
        dropped = dedupe_uids(connection, config.dedupe_uid)
        duplicates = find_duplicates(connection)
        summary = _summary(connection, config, keep, aggregation, joins, estimate, cut)
        # which runs these are, wherever they are moved: report --filter-manifest checks its run is one
        summary["input_runs"] = [{"run": item} | run_identity(info) for item, info in runs]
        summary |= {"score_rows": rows, "duplicates": duplicates,
                    "warnings": anchor_warnings + list(estimate.warnings)
                    + _warnings(connection, config, unfinished, duplicates, _epochs_missing(runs, aggregation))
                    + _top_k_warnings(connection, keep + config.drop)}
        if config.dedupe_uid != "off":
            summary["dedupe_uid"] = {"mode": config.dedupe_uid, "dropped": dropped}
        summary = content_dedup.summarise(summary, dedup)
        shard_order = _run_shard_order(runs) or _shard_order(connection)
        if config.dry_run:
            if config.keys == "-":  # stdout is no file: a dry run still shows what would be kept
                written = write_keys(connection, shard_order, None, stdout)
                summary |= {"keys_written": written.lines} | ({"keys_reader_closed": True} if written.reader_closed else {})
            return summary
        targets = _guard(config, files, shard_order)  # the table's shards too (tables without a run.json)
        locate = shard_locator(config.shard_roots, shard_order) if config.write_shards else None
        summary = publish(connection, out=targets["--out"].path, keys="-" if config.keys == "-" else targets.get("--keys"),
                          datacomp_npy=targets.get("--datacomp-npy"),
                          shards_dir=targets["--write-shards"].path if config.write_shards else None,
                          maxcount=config.maxcount, shard_order=shard_order, locate=locate, summary=summary,
                          stdout=stdout, manifest_metadata=_samples_cache(parts, config, aggregation, estimate, summary))
        connection.close()
    return summary


def _samples_cache(parts: dict | None, config: FilterConfig, aggregation: dict, estimate: QualityEstimate,
                   summary: dict) -> dict[bytes, bytes]:
    """The manifest's record of its per-sample table, so `report --filter-manifest` need not aggregate
    again (curate/samples_cache.py); the report uses it only when it reads exactly these parts."""
    return samples_record(parts, config.aggregation, aggregation, estimate, summary["samples"])


def _input_runs(inputs: tuple[str, ...]) -> list[tuple[str, dict]]:
    """The inputs that are run directories, with their run.json records."""
    return [(item, run_record(run_path(item) / RUN_FILE)) for item in inputs if (run_path(item) / RUN_FILE).is_file()]


def _epochs_missing(runs: list[tuple[str, dict]], aggregation: dict) -> list[str]:
    """A warning per finished run whose score rows lack an epoch its run.json promises."""
    present = {int(epoch) for epoch in aggregation["thresholds"]}
    return [message for item, info in runs if (message := epochs_missing(item, info, present))]


def _run_shard_order(runs: list[tuple[str, dict]]) -> list[str]:
    """The shard order of the runs' run.json files, so curated shards follow the original order."""
    return list(dict.fromkeys(shard for _, info in runs for shard in info.get("shards", [])))


POOLABLE = ("shards", "device_type")  # what may differ between the score runs of one filter


def _check_comparable(runs: list[tuple[str, dict]]) -> None:
    """Runs filtered together are judged by one set of per-epoch votes (and one calibration): their
    scores must come from the same settings — task, models, trajectory, anchors; only the shards, the
    device and the path of a local model config may differ."""

    def settings(fingerprint: dict) -> dict:
        # a local model config is compared by its contents, not by the path it was read from
        skipped = {*POOLABLE, "architecture"} if "architecture_config" in fingerprint else set(POOLABLE)
        return {key: value for key, value in fingerprint.items() if key not in skipped}

    scored = [(item, settings(info.get("fingerprint") or {})) for item, info in runs if info.get("command") == "score"]
    first_item, first = scored[0] if scored else (None, {})
    for item, fingerprint in scored[1:]:
        differs = sorted(key for key in set(first) | set(fingerprint) if first.get(key) != fingerprint.get(key))
        if differs:
            raise MimicfilterError(f"{first_item} and {item} were scored with different settings ({', '.join(differs)}): "
                                   "one set of votes cannot judge both", hint="filter each run on its own")
