"""The ``report`` stage: a score run → quality estimate, plots, contact sheets, one static HTML page.

    score parts ──► aggregate (DuckDB, default rule) or a filter manifest ──► per-shard quality
                ──► sampled rows ──► histograms (matplotlib, Agg)
                ──► highest / lowest samples ──► read back from the shards ──► contact sheets (Pillow)
                ──► index.html + report.json (atomic writes; only files that exist are referenced)

The headline is the filter's: the kept share of the usable (status ``ok``) samples under the
default rule (``keep-votes``: the quality estimate) or under the decisions of a given ``filter``
manifest (a "kept fraction" unless that filter kept by the votes alone). The quality estimate of
the pool, its interval and its warnings come from ``curate/estimate.py``, as in ``filter``.
Plots use a deterministic hash sample of the rows when the table is larger than ``sample_rows``;
the page states the sample size.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mimicfilter.curate.duck import connect, load_scores, score_files
from mimicfilter.curate.estimate import estimate_quality
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
from mimicfilter.store.atomic import atomic_write_bytes, atomic_write_json
from mimicfilter.store.paths import is_remote
from mimicfilter.store.rundir import read_run_info


@dataclass(frozen=True)
class ReportConfig:
    run_dir: Path
    out_dir: Path
    filter_manifest: Path | None = None
    sheet_size: int = 24  # samples per contact sheet (highest and lowest)
    sample_rows: int = 200_000  # rows used for the plots; more are hash-sampled down to about this
    aggregation: AggregateConfig = field(default_factory=AggregateConfig)
    memory_limit: str | None = None

    def __post_init__(self):
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


def build_report(config: ReportConfig) -> dict[str, Any]:
    """Write the report into ``config.out_dir``; returns its summary (also saved as report.json)."""
    info = read_run_info(config.run_dir)
    files = score_files([str(config.run_dir)])
    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="mimicfilter-report-") as spill:
        connection = connect(config.memory_limit, spill)
        load_scores(connection, files)
        rule = decisions(connection, config.aggregation, config.filter_manifest)
        estimate = estimate_quality(connection, rule["aggregation"], config.aggregation)
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
    images["shards"] = plot_shard_quality(shards, kept / ok if ok else None, out / "shards.png", rule["label"])
    if config.sheet_size:
        decode = decode_config_of_run(info)
        images["highest"] = contact_sheet(highest, decode, f"The {len(highest)} highest mimic scores (rank, score, caption or label, shard/key)", out / "highest.png")
        images["lowest"] = contact_sheet(lowest, decode, f"The {len(lowest)} lowest mimic scores (rank, score, caption or label, shard/key)", out / "lowest.png")
    images = {name: path.name for name, path in images.items() if path is not None}
    summary = {
        "run_dir": str(config.run_dir),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "rule": rule["name"],
        "aggregation": rule.get("aggregation"),
        "samples": sum(shard.samples for shard in shards),
        "ok": ok,
        "kept": kept,
        "headline": {"label": rule["label"], "value": kept / ok if ok else None},
        "quality_estimate": estimate.value,
        "quality": estimate.as_dict(),
        "warnings": list(estimate.warnings),
        "shards_worst_first": [asdict(shard) | {"quality": shard.quality} for shard in shards],
        "status_counts": statuses,
        "plot_rows": {"score_rows_used": sample["rows_used"], "score_rows_total": sample["rows_total"],
                      "samples_used": per_sample["rows_used"], "samples_total": per_sample["rows_total"]},
        "task": info.get("fingerprint", {}).get("task"),
        "epochs": info.get("train", {}).get("epochs", 1),
        "images": images,
    }
    atomic_write_bytes(out / "index.html", render_html(summary, info).encode())
    atomic_write_json(out / "report.json", summary)
    return summary

