"""Why the estimate reads image–text pools low under a reference that never saw their domain.

    python benchmarks/explain_unseen.py [--out bench-runs/defaults]     # after make bench-defaults

Reads the suite's cached runs at the defaults (``benchmarks/bench_defaults.py``) and, per
image–text pool and reference, splits the clean pairs by what the *reference* sees in them: a
clean pair is "noise-like" when the reference's own CLIP score for it is below the 90th
percentile of the corrupted pairs' CLIP scores (pooled over that reference's pools). It
prints their share, how their mimic scores compare with the noise's (quantiles and the
Kolmogorov–Smirnov distance), and the default rule's error against the truth and against the
truth as the reference can see it (the clean share minus the noise-like clean pairs).

If the noise-like clean pairs score like noise, no rule over the scores can count them as clean:
the estimate is then right about what the reference can tell, and the rest of the error is the
reference's blind spot (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

import defaults_suite as suite
from common import ROOT, slug

REFERENCES = ("unseen", "seen")
NOISE_QUANTILE = 0.9  # a clean pair whose reference CLIP score is below this quantile of the noise's is "noise-like"


def load_run(out: Path, pool: str, reference: str) -> dict | None:
    run_dir = out / "runs" / slug(f"{pool}-{reference}-defaults")
    truth_file = out / "emoji" / "pools" / pool / "truth.json"
    if not (run_dir / "_SUCCESS").exists() or not truth_file.exists():
        return None
    truth = json.loads(truth_file.read_text())
    table = pq.read_table(run_dir / "scores", columns=["shard", "key", "status", "mimic_score", "clip_score"])
    rows = [(f"{Path(shard).name}/{key}", score, clip) for shard, key, status, score, clip in zip(
        *(table.column(name).to_pylist() for name in ("shard", "key", "status", "mimic_score", "clip_score")))
        if status == "ok" and score is not None and f"{Path(shard).name}/{key}" in truth]
    return {"clean": np.array([truth[key] for key, _, _ in rows]), "score": np.array([s for _, s, _ in rows]),
            "clip": np.array([c for _, _, c in rows])}


def deciles(x: np.ndarray) -> str:
    """The 10th, 50th and 90th percentiles, or a dash for no values."""
    return "/".join(f"{v:+.2f}" for v in np.quantile(x, [0.1, 0.5, 0.9])) if len(x) else "–"


def ks_distance(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.sort(a), np.sort(b)
    grid = np.concatenate([a, b])
    return float(np.max(np.abs(np.searchsorted(a, grid, "right") / len(a) - np.searchsorted(b, grid, "right") / len(b))))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "bench-runs" / "defaults")
    args = parser.parse_args(argv)
    blob = json.loads((args.out / "results.json").read_text())
    default = blob["default"]  # the default vote rule, as the suite recorded it
    estimates = {(r["pool"], r["reference"]): r["rules"][default]["estimate"]
                 for r in blob["results"] if r["setting"] == "defaults" and r["task"] == "contrastive"}
    pools = [pool.name for pool in suite.POOLS if pool.task == "contrastive"]
    print("| pool | reference | truth | noise-like clean pairs | their mimic scores (10/50/90 %) | noise's | KS | "
          f"{default} | error | truth the reference can see | error against it |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for reference in REFERENCES:
        runs = {pool: load_run(args.out, pool, reference) for pool in pools}
        runs = {pool: run for pool, run in runs.items() if run is not None}
        noise_clip = np.concatenate([run["clip"][~run["clean"]] for run in runs.values()] or [np.array([])])
        if not len(noise_clip):
            continue
        cut = np.quantile(noise_clip, NOISE_QUANTILE)
        for pool, run in runs.items():
            clean, score = run["clean"], run["score"]
            noise_like = clean & (run["clip"] < cut)
            truth, seen_truth = clean.mean(), (clean & ~noise_like).mean()
            noise = score[~clean]
            ks = f"{ks_distance(score[noise_like], noise):.2f}" if noise_like.sum() and len(noise) else "–"
            estimate = estimates.get((pool, reference))
            error = "–" if estimate is None else f"{100 * (estimate - truth):+.1f}"
            seen_error = "–" if estimate is None else f"{100 * (estimate - seen_truth):+.1f}"
            print(f"| {pool} | {reference} | {100 * truth:.0f}% | {100 * noise_like.sum() / clean.sum():.1f}% of the clean | "
                  f"{deciles(score[noise_like])} | {deciles(noise)} | {ks} | "
                  f"{'–' if estimate is None else f'{100 * estimate:.1f}%'} | {error} | {100 * seen_truth:.1f}% | {seen_error} |")
        print(f"\n({reference}: a clean pair is noise-like below a reference CLIP score of {cut:.3f}, the {100 * NOISE_QUANTILE:.0f}th percentile "
              f"of the {len(noise_clip)} corrupted pairs' scores)\n")


if __name__ == "__main__":
    main()
