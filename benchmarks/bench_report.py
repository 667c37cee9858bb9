"""`mimicfilter filter` + `mimicfilter report --filter-manifest` on a huge synthetic table, against a
plain DuckDB + matplotlib script of the same figures.

A synthetic score run (default 10M rows = 3.33M samples × 3 epochs, like a trajectory run; 20 parts
per epoch, ~1 % decode errors, a bimodal mimic score, a correlated CLIP score and the pool columns)
goes through, as whole processes, alternating in every round:

  A  `mimicfilter filter RUN --out CURATED --binarize sign --memory-limit 3GB`, then
     `mimicfilter report RUN --filter-manifest CURATED/manifest.parquet --binarize sign --sheet-size 6
     --memory-limit 3GB` (the report reads the per-sample table the filter's manifest holds; the
     shards do not exist, so every tile is an "unreadable image": the sheets' read-back is timed but
     costs no decoding);
  B  a plain script written here: one DuckDB pass over all rows for the per-sample means and the
     sign votes (majority over epochs), then the report's five figures from every sample (no
     sampling, no sheets, no page);
  C  (with --cold) `mimicfilter report RUN` alone, which aggregates the score parts itself.

`--memory-limit` (3GB) caps DuckDB in A, B and C alike. `--binarize sign` gives A and B the same
cheap rule (the default `mirror` adds the mixture's passes to the filter, as bench_filter.py
measures). Prints each process's wall time and peak RSS (wait4; no command starts subprocesses),
and the ratios report / plain and filter + report / plain (best wall of the rounds, largest peak
RSS). Checks that the report reused the manifest and that its page states
the hash sample behind its plots.

    python benchmarks/bench_report.py [--rows 10000000] [--epochs 3] [--rounds 2] [--memory-limit 3GB] [--cold]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from synthetic_scores import report_run

PLAIN_SCRIPT = r'''
import sys, duckdb, numpy as np, matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
run, out, memory_limit = sys.argv[1], sys.argv[2], sys.argv[3]
con = duckdb.connect()
con.execute("SET memory_limit = ?", [memory_limit])
s = con.execute(f"""
    SELECT avg(mimic_score) AS score, avg(clip_score) AS clip, arg_max(status, epoch) = 'ok' AS ok,
           sum(CASE WHEN mimic_score > 0 THEN 1 ELSE 0 END) * 2 > count(*) AS kept,
           max(caption_chars) AS chars, max(least(image_width, image_height)) AS side
    FROM read_parquet('{run}/scores/*.parquet') GROUP BY shard, "index" """).fetchnumpy()
ok, kept = s["ok"], s["kept"] & s["ok"]
score, clip = s["score"][ok], s["clip"][ok]

def save(figure, name):
    figure.savefig(f"{out}/{name}.png", dpi=100)
    plt.close(figure)

figure, axes = plt.subplots(figsize=(6.4, 3.9))
axes.hist([score[kept[ok]], score[~kept[ok]]], bins=60, stacked=True)
save(figure, "scores")
order = np.argsort(-score)
share = np.arange(1, len(order) + 1) / len(order)
mean_clip = np.cumsum(clip[order]) / np.arange(1, len(order) + 1)
figure, axes = plt.subplots(figsize=(6.4, 3.9))
axes.plot(score[order], share)
axes.twinx().plot(score[order], mean_clip)
save(figure, "keep_curve")
figure, axes = plt.subplots(figsize=(6.4, 3.9))
axes.hist2d(score, clip, bins=120, norm=matplotlib.colors.LogNorm())
save(figure, "score_vs_clip")
for name, values in (("caption_lengths", s["chars"]), ("image_sizes", s["side"])):
    values = np.asarray(values, dtype=float)
    figure, axes = plt.subplots(figsize=(6.4, 3.9))
    axes.hist([values[kept & np.isfinite(values)], values[~kept & np.isfinite(values)]], bins=60, stacked=True)
    save(figure, name)
print(float(kept.sum() / ok.sum()))
'''


def timed(command: list[str]) -> tuple[float, float, str, str]:
    """(wall seconds, peak RSS GiB, stdout, stderr) of one whole process, measured with wait4."""
    with tempfile.TemporaryFile("w+") as stdout, tempfile.TemporaryFile("w+") as stderr:
        started = time.perf_counter()
        process = subprocess.Popen(command, stdout=stdout, stderr=stderr, text=True)
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.perf_counter() - started
        process.returncode = os.waitstatus_to_exitcode(status)
        stdout.seek(0)
        stderr.seek(0)
        if process.returncode != 0:
            sys.exit(f"{' '.join(command[:4])} failed:\n{stderr.read()[-2000:]}")
        return wall, usage.ru_maxrss / 2**20, stdout.read(), stderr.read()  # ru_maxrss: KiB


def commands(run: Path, scratch: Path, name: str, binarize: str, memory_limit: str,
             plain: Path) -> list[tuple[str, list[str]]]:
    """The processes of one contender, in order: (label, command)."""
    mimicfilter = [sys.executable, "-m", "mimicfilter"]
    limits = ["--binarize", binarize, "--memory-limit", memory_limit]
    curated, out = scratch / f"{name}-curated", scratch / f"{name}-report"
    if name == "plain":
        out.mkdir(exist_ok=True)
        return [("plain", [sys.executable, str(plain), str(run), str(out), memory_limit])]
    report = [*mimicfilter, "report", str(run), "--out", str(out), "--sheet-size", "6", *limits, "--json"]
    if name == "cold":
        return [("report (cold)", report)]
    return [("filter", [*mimicfilter, "filter", str(run), "--out", str(curated), *limits, "--json"]),
            ("report", [*report, "--filter-manifest", str(curated / "manifest.parquet")])]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--parts", type=int, default=20, help="parts per epoch")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--binarize", default="sign", help="the vote rule of filter and report (sign: the plain script's)")
    parser.add_argument("--memory-limit", default="3GB", help="DuckDB's memory cap, the same in every process")
    parser.add_argument("--cold", action="store_true", help="also time `report RUN` without a manifest (C)")
    args = parser.parse_args(argv)
    contenders = ["filter+report", "plain"] + (["cold"] if args.cold else [])
    with tempfile.TemporaryDirectory(prefix="mimicfilter-bench-report-") as scratch_name:
        scratch = Path(scratch_name)
        run = scratch / "run"
        started = time.perf_counter()
        report_run(run, args.rows, args.epochs, args.parts)
        print(f"table: {args.rows:,} rows written in {time.perf_counter() - started:.0f} s", flush=True)
        plain = scratch / "plain.py"
        plain.write_text(PLAIN_SCRIPT)
        results: dict[str, list[tuple[float, float]]] = {}
        summaries = {}
        for round_number in range(args.rounds):
            for name in contenders:  # alternating, so a busy neighbour hits every contender alike
                for label, command in commands(run, scratch, name, args.binarize, args.memory_limit, plain):
                    wall, peak, stdout, stderr = timed(command)
                    results.setdefault(label, []).append((wall, peak))
                    print(f"round {round_number + 1} {label:13s}: {wall:6.1f} s, peak RSS {peak:.2f} GiB", flush=True)
                    if label.startswith("report"):
                        summaries[label] = json.loads(stdout)
                        summaries[label]["page"] = (scratch / f"{name}-report" / "index.html").read_text()
                        summaries[label]["stderr"] = stderr
    best = {label: min(wall for wall, _ in runs) for label, runs in results.items()}
    peak = {label: max(rss for _, rss in runs) for label, runs in results.items()}
    summary = summaries["report"]
    rows = summary["plot_rows"]
    sampled = rows["samples_used"] < rows["samples_total"]  # small tables are drawn whole
    stated = not sampled or f"{rows['samples_used']:,} of {rows['samples_total']:,} usable samples" in summary["page"]
    reused = summary["per_sample_table"]["from"] == "filter manifest"
    print(json.dumps({
        "rows": args.rows, "epochs": args.epochs, "binarize": args.binarize, "memory_limit": args.memory_limit, "samples": summary["samples"],
        "plot_samples_used": rows["samples_used"], "plot_samples_total": rows["samples_total"],
        "page_states_the_sample": stated, "report_reused_the_manifest": reused, "images": sorted(summary["images"]),
        "wall_s": {label: [round(wall, 1) for wall, _ in runs] for label, runs in results.items()},
        "peak_rss_gib": {label: round(rss, 2) for label, rss in peak.items()},
    }, indent=2))
    print(f"report after filter / plain script: wall {best['report'] / best['plain']:.2f}x (best of {args.rounds}), "
          f"peak RSS {peak['report'] / peak['plain']:.2f}x")
    print(f"filter + report / plain script: wall {(best['filter'] + best['report']) / best['plain']:.2f}x, "
          f"peak RSS {max(peak['filter'], peak['report']) / peak['plain']:.2f}x")
    if args.cold:
        print(f"report alone (aggregating) / plain script: wall {best['report (cold)'] / best['plain']:.2f}x, "
              f"peak RSS {peak['report (cold)'] / peak['plain']:.2f}x")
    if not stated or not reused:
        sys.exit(f"the page states its sample: {stated}; the report reused the manifest: {reused} "
                 f"({summary['per_sample_table']})")


if __name__ == "__main__":
    main()
