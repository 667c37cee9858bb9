"""Summarise the demo run: how well the scores find the swapped captions the demo planted.

The demo shards record the truth in each sample's .json ("swapped": true/false), so we can show
what a user of real data cannot see directly: detection quality of the mimic score versus the
reference CLIP score, and the lowest-scoring pairs.

Usage: python scripts/demo_summary.py RUN_DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from mimicfilter.metrics import auroc
from mimicfilter.store.rundir import read_run_info
from mimicfilter.shards.samples import iter_shard_samples
from mimicfilter.store.parts import read_scores


def read_manifest(path: Path) -> list[dict]:
    """Kept rows of a filter manifest."""
    import pyarrow.parquet as pq

    return [row for row in pq.read_table(path, columns=["shard", "key", "kept"]).to_pylist() if row["kept"]]


def _mean_over_epochs(rows: list[dict]) -> list[dict]:
    """One row per sample: score columns averaged over the epochs it was seen in."""
    grouped: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        grouped.setdefault((row["shard"], row["key"]), []).append(row)
    merged = []
    for group in grouped.values():
        row = dict(group[0])
        for column in ("mimic_score", "mimic_weight", "clip_score"):
            row[column] = float(np.mean([member[column] for member in group]))
        merged.append(row)
    return merged


def main(run_dir: Path) -> None:
    info = read_run_info(run_dir)
    truth = {}
    for shard in info["shards"]:
        for sample in iter_shard_samples(shard):
            meta = json.loads(sample.files.get("json", b"{}") or b"{}")
            truth[(shard, sample.key)] = meta
    rows = _mean_over_epochs([row for row in read_scores(run_dir).to_pylist()
                              if row["status"] == "ok" and row.get("anchor") is None])  # the pool, not its anchors
    swapped = np.array([truth[(row["shard"], row["key"])].get("swapped", False) for row in rows])
    console = Console()
    epochs = info["train"]["epochs"]
    title = f"Finding the {swapped.sum()} swapped captions among {len(rows)} demo pairs"
    table = Table(title=title + (f" (scores averaged over {epochs} epochs)" if epochs > 1 else ""))
    table.add_column("score (low = suspicious)")
    table.add_column("AUROC", justify="right")
    table.add_column(f"precision in lowest {swapped.sum()}", justify="right")
    for column in ("mimic_score", "mimic_weight", "clip_score"):
        values = np.array([row[column] for row in rows])
        lowest = np.argsort(values, kind="mergesort")[: swapped.sum()]
        table.add_row(column, f"{auroc(-values, swapped):.3f}", f"{swapped[lowest].mean():.1%}")
    console.print(table)
    scores = np.array([row["mimic_score"] for row in rows])
    worst = Table(title="Lowest mimic scores (the pairs a filter drops first)")
    for name in ("key", "emoji", "caption", "true name", "mimic score"):
        worst.add_column(name)
    for position in np.argsort(scores, kind="mergesort")[:8]:
        row = rows[position]
        meta = truth[(row["shard"], row["key"])]
        worst.add_row(
            row["key"], meta.get("emoji", ""), meta.get("caption", ""), meta.get("true_caption", ""), f"{row['mimic_score']:.4f}"
        )
    console.print(worst)
    filter_summary = run_dir / "curated" / "summary.json"
    if filter_summary.exists():
        summary = json.loads(filter_summary.read_text())
        kept = {(row["shard"], row["key"]) for row in read_manifest(run_dir / "curated" / "manifest.parquet")}
        kept_swapped = sum(truth[key].get("swapped", False) for key in kept)
        calibrated = summary["quality"].get("calibrated")
        estimate = (f"quality estimate {calibrated['value']:.1%} (90% interval {calibrated['low']:.1%}–"
                    f"{calibrated['high']:.1%}, calibrated on {calibrated['trusted']} trusted pairs)" if calibrated else
                    f"relative score {summary['relative_score']:.1%} (uncalibrated)")
        console.print(
            f"filter ({' AND '.join(summary['rules']['keep'])}): kept {summary['kept']} of {summary['samples']} "
            f"pairs; {estimate} vs true clean fraction {1 - swapped.mean():.1%}; {kept_swapped} swapped pairs "
            f"left in the curated set ({1 - kept_swapped / max(1, len(kept)):.1%} clean)"
        )
    console.print(f"Scores: {run_dir}/scores/*.parquet  ·  provenance: {run_dir}/run.json  ·  stats: {run_dir}/stats.json")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python scripts/demo_summary.py RUN_DIR")
    main(Path(sys.argv[1]))
