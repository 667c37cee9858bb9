"""The ``report`` stage: a score run → quality estimate, plots, contact sheets, one static HTML page.

    score parts ──► aggregate (DuckDB, default rule) or a filter manifest ──► per-shard quality
                ──► sampled rows ──► histograms (matplotlib, Agg)
                ──► highest / lowest samples ──► read back from the shards ──► contact sheets (Pillow)
                ──► index.html + report.json + _SUCCESS (only files that exist are referenced)

The output directory is one unit (store/swap.py): it is built beside the old one and swapped in
whole, so a page never sits beside another run's plots, even after a failure or a kill.

The quality estimate is the filter's: the kept share of the usable (status ``ok``) samples under
the default rule (``keep-votes`` with the default aggregation) or under the decisions of a given
``filter`` manifest. Plots use a deterministic hash sample of the rows when the table is larger
than ``sample_rows``; the page states the sample size.
"""

from __future__ import annotations

import json
import secrets
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mimicfilter.curate.duck import check_memory_limit, connect, load_scores, score_files
from mimicfilter.curate.votes import AggregateConfig
from mimicfilter.errors import MimicfilterError
from mimicfilter.report.html import render_html
from mimicfilter.report.plots import plot_score_histograms, plot_score_vs_clip, plot_shard_quality, plot_weight_histogram
from mimicfilter.report.sheets import contact_sheet, decode_config_of_run
from mimicfilter.report.tally import (
    decisions,
    extreme_samples,
    sample_rows,
    sample_samples,
    shard_quality,
    status_counts,
)
from mimicfilter.shards.discover import shard_locator
from mimicfilter.store.atomic import atomic_write_bytes, atomic_write_json
from mimicfilter.store.paths import SUCCESS_FILE, is_remote
from mimicfilter.store.rundir import read_run_info, unfinished_run
from mimicfilter.store.swap import is_temp_name, replaced_directory

REPORT_FILES = {"index.html", "report.json", SUCCESS_FILE, "scores.png", "weights.png", "score_vs_clip.png",
                "shards.png", "highest.png", "lowest.png"}


@dataclass(frozen=True)
class ReportConfig:
    run_dir: Path
    out_dir: Path | None = None  # None: RUN/report
    filter_manifest: Path | None = None
    sheet_size: int = 24  # samples per contact sheet (highest and lowest)
    sample_rows: int = 200_000  # rows used for the plots; more are hash-sampled down to about this
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
    with replaced_directory(Path(config.out_dir), _owned_by_report(Path(config.out_dir)), "--out") as staging:
        summary = _write_report(config, info, files, staging)
        summary["warnings"] = [f"{unfinished}: the report covers what it holds so far"] if unfinished else []
        atomic_write_bytes(staging / "index.html", render_html(summary, info).encode())
        atomic_write_json(staging / "report.json", summary)
        atomic_write_bytes(staging / SUCCESS_FILE, f"{summary['run_id']}\n".encode())
    return summary


def _write_report(config: ReportConfig, info: dict[str, Any], files: list[str], out: Path) -> dict[str, Any]:
    """The numbers, plots and sheets, written into ``out`` (the staging directory)."""
    with tempfile.TemporaryDirectory(prefix="mimicfilter-report-") as spill:
        connection = connect(config.memory_limit, spill)
        load_scores(connection, files)
        rule = decisions(connection, config.aggregation, config.filter_manifest)
        shards = shard_quality(connection)
        statuses = status_counts(connection)
        sample = sample_rows(connection, config.sample_rows)
        per_sample = sample_samples(connection, config.sample_rows)
        highest = extreme_samples(connection, "DESC", config.sheet_size)
        lowest = extreme_samples(connection, "ASC", config.sheet_size)
        connection.close()
    ok = sum(shard.ok for shard in shards)
    kept = sum(shard.kept for shard in shards)
    images = {}
    images["scores"] = plot_score_histograms(sample, rule, out / "scores.png")
    images["weights"] = plot_weight_histogram(sample, out / "weights.png")
    images["score_vs_clip"] = plot_score_vs_clip(per_sample, out / "score_vs_clip.png")
    images["shards"] = plot_shard_quality(shards, kept / ok if ok else None, out / "shards.png")
    if config.sheet_size:
        decode = decode_config_of_run(info)
        locate = shard_locator(config.shard_roots, info.get("shards") or sorted({entry.shard for entry in highest}))
        highest = [entry.moved(locate) for entry in highest]
        lowest = [entry.moved(locate) for entry in lowest]
        images["highest"] = contact_sheet(highest, decode, f"The {len(highest)} highest mimic scores (rank, score, caption or label, shard/key)", out / "highest.png")
        images["lowest"] = contact_sheet(lowest, decode, f"The {len(lowest)} lowest mimic scores (rank, score, caption or label, shard/key)", out / "lowest.png")
    images = {name: path.name for name, path in images.items() if path is not None}
    return {
        "run_dir": str(config.run_dir),
        "run_id": f"{time.strftime('%Y%m%dT%H%M%S')}-{secrets.token_hex(4)}",
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "rule": rule["name"],
        "aggregation": rule.get("aggregation"),
        "samples": sum(shard.samples for shard in shards),
        "ok": ok,
        "kept": kept,
        "quality_estimate": kept / ok if ok else None,
        "shards_worst_first": [asdict(shard) | {"quality": shard.quality} for shard in shards],
        "status_counts": statuses,
        "plot_rows": {"score_rows_used": sample["rows_used"], "score_rows_total": sample["rows_total"],
                      "samples_used": per_sample["rows_used"], "samples_total": per_sample["rows_total"]},
        "task": info.get("fingerprint", {}).get("task"),
        "epochs": info.get("train", {}).get("epochs", 1),
        "images": images,
    }

