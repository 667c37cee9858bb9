"""The ``report`` stage: a score run → what was kept and why not, how to pick a threshold, per-shard
quality, contact sheets and the pool's caption lengths and image sizes, on one static HTML page.

    score parts ──► aggregate (DuckDB, default rule) or a filter manifest ──► kept + reason per sample
                ──► funnel, drop reasons, per-shard counts (every row)
                ──► hash-sampled per-sample scores ──► cut, keep curve, budgets ──► SVG plots
                ──► sheet samples (lowest, borderline, highest, random kept/dropped) ──► thumbnails
                ──► index.html + report.json + _SUCCESS (only files that exist are referenced)

The output directory is one unit (store/swap.py): it is built beside the old one and swapped in
whole, so a page never sits beside another run's plots or thumbnails, even after a failure or a kill.

The headline is the filter's: the kept share of the usable (status ``ok``) samples under the
default rule (``keep-votes``: the quality estimate) or under the decisions of a given ``filter``
manifest (a "kept fraction" unless that filter kept by the votes alone); the pool's quality
estimate, its range and warnings come from ``curate/estimate.py``, as in ``filter``. Plots use a
deterministic hash sample of the samples when there are more than ``sample_rows``; the page states
the sample size.
"""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from mimicfilter.curate.calibrate import CalibratedCut, calibrated_cut, calibration_warnings
from mimicfilter.curate.duck import check_memory_limit, connect, load_scores, score_files
from mimicfilter.curate.estimate import estimate_quality, headline_fields
from mimicfilter.curate.samples_cache import check_reuse
from mimicfilter.curate.votes import AggregateConfig
from mimicfilter.errors import MimicfilterError
from mimicfilter.report.duplicates import duplicate_groups, funnel_step, group_sheets, merge_duplicate_reasons
from mimicfilter.report.curves import budgets, curve_points, distribution, equivalent_cut, keep_curve, mean_clip_of
from mimicfilter.report.html import render_html
from mimicfilter.report.plots import (
    plot_calibrated_cut,
    plot_caption_lengths,
    plot_image_sizes,
    plot_keep_curve,
    plot_score_split,
    plot_score_vs_clip,
)
from mimicfilter.report.samples import Sampled, draw_samples, sheet_entries
from mimicfilter.report.sheets import contact_sheets, decode_config_of_run
from mimicfilter.report.sheets import THUMBNAIL_DIR
from mimicfilter.report.tally import (check_manifest_inputs, curated_shards_mismatch, decisions, drop_reasons,
                                      filter_cut_target, funnel, shard_quality, status_counts)
from mimicfilter.shards.discover import shard_locator
from mimicfilter.store.atomic import atomic_write_bytes, atomic_write_json
from mimicfilter.store.guard import Inputs, Output, guard_outputs
from mimicfilter.store.paths import SUCCESS_FILE, is_remote
from mimicfilter.store.rundir import epochs_missing, read_run_info, unfinished_run
from mimicfilter.store.scratch import scratch_directory
from mimicfilter.store.swap import is_temp_name, replaced_directory, sole_writer

# What a report directory holds (plus the images its report.json names): a new report may replace it.
REPORT_FILES = {"index.html", "report.json", SUCCESS_FILE, THUMBNAIL_DIR, "scores.png", "weights.png",
                "score_vs_clip.png", "shards.png", "highest.png", "lowest.png"}


@dataclass(frozen=True)
class ReportConfig:
    run_dir: Path
    out_dir: Path | None = None  # None: RUN/report
    filter_manifest: Path | None = None
    sheet_size: int = 24  # samples on each contact sheet
    sample_rows: int = 200_000  # samples used for the plots; more are hash-sampled down to about this
    aggregation: AggregateConfig = field(default_factory=AggregateConfig)
    memory_limit: str | None = None
    strict: bool = False  # refuse an unfinished run instead of warning
    shard_roots: tuple[str, ...] = ()  # --shard-root: where moved shards are read from (contact sheets)

    def __post_init__(self):
        if self.out_dir is None:
            if is_remote(self.run_dir):
                raise MimicfilterError(f"{self.run_dir} is remote: the report needs a local --out", hint="e.g. --out report/")
            object.__setattr__(self, "out_dir", Path(self.run_dir) / "report")
        check_memory_limit(self.memory_limit)
        if self.sheet_size < 0 or self.sheet_size > 200:
            raise MimicfilterError(f"--sheet-size {self.sheet_size}: must be between 0 and 200")
        if self.sample_rows < 1000:
            raise MimicfilterError(f"--sample-rows {self.sample_rows}: must be at least 1000")
        if self.filter_manifest is not None and not Path(self.filter_manifest).is_file():
            raise MimicfilterError(
                f"--filter-manifest {self.filter_manifest} does not exist", hint="pass the manifest.parquet of `filter --out`"
            )
        if not is_remote(self.run_dir) and Path(self.out_dir).resolve() == Path(self.run_dir).resolve():
            raise MimicfilterError("--out must not be the run directory itself", hint="e.g. --out RUN/report")


def _pool_summary(pool: Sampled | None) -> dict[str, Any]:
    if pool is None:
        return {"columns": []}
    data, kept = pool.data, pool.data["kept"]
    summary: dict[str, Any] = {"columns": [name for name in data if name != "kept"],
                               "samples_used": pool.used, "samples_total": pool.total}
    for name in ("caption_chars", "image_width", "image_height"):
        if name in data:
            summary[name] = distribution(data[name], kept)
    if "image_width" in data and "image_height" in data:
        summary["shorter_side"] = distribution(np.fmin(data["image_width"], data["image_height"]), kept)
    return summary


def _owned_by_report(out: Path):
    """Entries of an existing report directory that a new report may replace (read when asked)."""

    def owned(name: str) -> bool:
        try:
            images = set(json.loads((out / "report.json").read_text()).get("images", {}).values())
        except (OSError, ValueError, AttributeError):
            images = set()
        return name in REPORT_FILES or name in images or is_temp_name(name)

    return owned


def build_report(config: ReportConfig) -> dict[str, Any]:
    """Write the report into ``config.out_dir``; returns its summary (also saved as report.json)."""
    info = read_run_info(config.run_dir)
    unfinished = unfinished_run(config.run_dir)
    if unfinished and config.strict:
        raise MimicfilterError(unfinished, hint="wait for the run to finish (or resume it), or drop --strict")
    files = score_files([str(config.run_dir)])
    if config.filter_manifest is not None:
        check_manifest_inputs(config.filter_manifest, config.run_dir, info)
    out = guard_outputs([Output("--out", config.out_dir, directory=True, whole=True)], Inputs.of(
        runs=[config.run_dir], score_table=files, filter_manifest=config.filter_manifest,
        shard=info.get("shards") or []))["--out"].path
    with sole_writer([(out, "--out")]), replaced_directory(out, _owned_by_report(out), "--out") as staging:
        summary = _write_report(config, info, files, staging)
        if unfinished:
            summary["warnings"].append(f"{unfinished}: the report covers what it holds so far")
        if config.filter_manifest is not None and (mismatch := curated_shards_mismatch(config.filter_manifest)):
            summary["warnings"].append(mismatch)
        epochs = {int(epoch) for epoch in (summary.get("aggregation") or {}).get("thresholds", {})}
        if missing := epochs_missing(config.run_dir, info, epochs):
            summary["warnings"].append(missing)
        atomic_write_bytes(staging / "index.html", render_html(summary, info).encode())
        atomic_write_json(staging / "report.json", summary)
        atomic_write_bytes(staging / SUCCESS_FILE, f"{summary['run_id']}\n".encode())
    return summary


def _calibration(connection, rule: dict[str, Any], manifest: Path | None) -> CalibratedCut | None:
    """With a filter manifest: the pool's calibration against its anchors, its cut at the target the
    filter cut at (the manifest decides what is kept; the page describes the same cut)."""
    target = filter_cut_target(str(manifest)) if manifest is not None else {}
    return calibrated_cut(connection, [int(epoch) for epoch in (rule.get("aggregation") or {}).get("thresholds", {})],
                          target.get("precision"), target.get("recall"))


def _write_report(config: ReportConfig, info: dict[str, Any], files: list[str], out: Path) -> dict[str, Any]:
    """The numbers, plots and sheets, written into ``out`` (the staging directory)."""
    with scratch_directory("report") as spill:
        # before the parts are read: one that changes later makes a manifest's per-sample table stale
        reuse = check_reuse(config.filter_manifest, files, config.aggregation) if config.filter_manifest else None
        connection = connect(config.memory_limit, spill)
        load_scores(connection, files)
        rule = decisions(connection, config.aggregation, config.filter_manifest, reuse)
        calibration = rule.get("calibration") or _calibration(connection, rule, config.filter_manifest)
        anchor_warnings = calibration_warnings(connection, calibration)
        estimate = (reuse.estimate if reuse and reuse.usable
                    else estimate_quality(connection, rule["aggregation"], config.aggregation))
        counts = funnel(connection)
        shards = shard_quality(connection)
        statuses = status_counts(connection)
        reasons = merge_duplicate_reasons(drop_reasons(connection, statuses))
        drawn = draw_samples(connection, config.sample_rows)
        scored, pool = drawn.scores, drawn.pool
        cut = equivalent_cut(scored.data["mimic_score"], scored.data["kept"])
        sheets = sheet_entries(connection, config.sheet_size, cut.mimic_score if cut else None)
        duplicates = duplicate_groups(connection, config.run_dir, config.filter_manifest, config.sheet_size)
        connection.close()
        if reuse is not None:
            reuse.confirm_unchanged()
    quality = counts.kept / counts.usable if counts.usable else None
    curve = keep_curve(scored.data["mimic_score"], scored.data["clip_score"])
    images = {
        "scores": plot_score_split(scored, cut, out / "scores.svg"),
        "keep_curve": plot_keep_curve(curve, cut, quality, out / "keep_curve.svg"),
        "score_vs_clip": plot_score_vs_clip(scored, out / "score_vs_clip.svg"),
    }
    if calibration is not None:
        images["calibrated_cut"] = plot_calibrated_cut(calibration.summary(), out / "calibrated_cut.svg")
    if pool is not None:
        images["caption_lengths"] = plot_caption_lengths(pool, out / "caption_lengths.svg")
        images["image_sizes"] = plot_image_sizes(pool, out / "image_sizes.svg")
    images = {name: path.name for name, path in images.items() if path is not None}
    locate = shard_locator(config.shard_roots, info.get("shards") or sorted(
        {entry.shard for entries in sheets.values() for entry in entries}))
    sheets = {name: [replace(entry, shard=locate(entry.shard)) for entry in entries] for name, entries in sheets.items()}
    cards = contact_sheets(sheets, decode_config_of_run(info), out)
    duplicates = group_sheets(duplicates, decode_config_of_run(info), out, locate)
    clip, kept = scored.data["clip_score"], scored.data["kept"]
    return {
        "run_dir": str(config.run_dir),
        "run_id": f"{time.strftime('%Y%m%dT%H%M%S')}-{secrets.token_hex(4)}",
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "rule": rule["name"],
        "aggregation": rule.get("aggregation"),
        "samples": counts.samples,
        "ok": counts.usable,
        "kept": counts.kept,
        **headline_fields(rule["keep"], rule["drop"], counts.kept, counts.usable, estimate,
                          calibration.calibration.as_dict() if calibration else None),
        **({"calibration": calibration.summary()} if calibration else {}),
        "funnel": asdict(counts) | funnel_step(duplicates),
        "duplicates": duplicates,
        "drop_reasons": [asdict(reason) for reason in reasons],
        "shards_worst_first": [asdict(shard) | {"quality": shard.quality} for shard in shards],
        "status_counts": statuses,
        "cut": asdict(cut) if cut else None,
        "mean_clip_score": {"usable": mean_clip_of(clip, np.ones_like(kept)), "kept": mean_clip_of(clip, kept)},
        "keep_curve": curve_points(curve),
        "budgets": budgets(curve),
        "plot_rows": {"score_rows_used": drawn.score_rows_used, "score_rows_total": drawn.score_rows_total,
                      "samples_used": scored.used, "samples_total": scored.total},
        "pool": _pool_summary(pool),
        "sheets": {name: [asdict(card) for card in entries] for name, entries in cards.items()},
        "task": info.get("fingerprint", {}).get("task"),
        "epochs": info.get("train", {}).get("epochs", 1),
        "images": images,
        "per_sample_table": reuse.as_dict() if reuse else {"from": "score parts"},
        "warnings": anchor_warnings + list(estimate.warnings) + ([
            f"--filter-manifest {config.filter_manifest} was made from other score parts than {config.run_dir} holds "
            "now: the kept set is that filter's decisions, not a filter of these scores (run filter again)"]
            if reuse is not None and reuse.stale else []),
    }
