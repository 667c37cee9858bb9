"""`mimicfilter report` on a huge synthetic table: it builds from a stated hash sample, in bounded memory.

A synthetic score run (default 10M rows = 3.33M samples × 3 epochs, 20 parts per epoch, ~1 % decode
errors, a bimodal mimic score, a correlated CLIP score and the pool columns) goes through, as whole
processes, alternating A/B:

  A  `mimicfilter report RUN --out OUT --binarize sign --sheet-size 6 --memory-limit 3GB` (the shards
     do not exist, so every tile is an "unreadable image": the sheets' read-back is timed but costs
     no decoding);
  B  a plain script written here: DuckDB per-sample means over all rows, the kept share under the sign
     rule, and one matplotlib histogram of every sample's mean score (no sampling, no sheets).

`--binarize sign` gives both the same cheap rule; `--binarize gmm` (the default rule) adds the
mixture's EM passes over each epoch's scores, the same cost `filter` pays (bench_filter.py).

Prints each run's wall time and peak RSS and the A/B ratios, and checks that the page says it
used a sample. The machine may be shared: read the ratios, not the absolute seconds.

    python benchmarks/bench_report.py [--rows 10000000] [--epochs 3] [--rounds 2] [--binarize sign]
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
run, out = sys.argv[1], sys.argv[2]
con = duckdb.connect()
con.execute("SET memory_limit = '3GB'")
con.execute(f"CREATE TABLE samples AS SELECT shard, key, any_value(status) AS status, avg(mimic_score) AS score "
            f"FROM read_parquet('{run}/scores/*.parquet') GROUP BY shard, key")
scores = con.execute("SELECT score FROM samples WHERE status = 'ok'").fetchnumpy()["score"]
kept = float((scores > 0).mean())
figure, axes = plt.subplots(figsize=(6.4, 3.9))
axes.hist(scores, bins=60)
figure.savefig(f"{out}/scores.png", dpi=100)
print(kept)
'''


def timed(command: list[str]) -> tuple[float, float, str]:
    """(wall seconds, peak RSS GiB, stdout) of one whole process, measured with wait4."""
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
        return wall, usage.ru_maxrss / 2**20, stdout.read()  # ru_maxrss: KiB


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--parts", type=int, default=20, help="parts per epoch")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--binarize", default="sign", help="the report's vote rule (sign: the plain script's)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="mimicfilter-bench-report-") as scratch:
        run = Path(scratch) / "run"
        started = time.perf_counter()
        report_run(run, args.rows, args.epochs, args.parts)
        print(f"table: {args.rows:,} rows written in {time.perf_counter() - started:.0f} s", flush=True)
        plain = Path(scratch) / "plain.py"
        plain.write_text(PLAIN_SCRIPT)
        results = {"report": [], "plain": []}
        for round_number in range(args.rounds):
            for name in ("report", "plain"):  # alternating, so a busy neighbour hits both alike
                out = Path(scratch) / f"{name}-{round_number}"
                out.mkdir()
                if name == "report":
                    command = [sys.executable, "-m", "mimicfilter", "report", str(run), "--out", str(out),
                               "--binarize", args.binarize, "--sheet-size", "6", "--memory-limit", "3GB", "--json"]
                else:
                    command = [sys.executable, str(plain), str(run), str(out)]
                wall, peak, stdout = timed(command)
                results[name].append((wall, peak))
                print(f"round {round_number + 1} {name:6s}: {wall:6.1f} s, peak RSS {peak:.2f} GiB", flush=True)
                if name == "report":
                    summary = json.loads(stdout)
                    page = (out / "index.html").read_text()
        rows = summary["plot_rows"]
        stated = f"{rows['samples_used']:,} of {rows['samples_total']:,} usable samples" in page
        report_wall = min(wall for wall, _ in results["report"])
        plain_wall = min(wall for wall, _ in results["plain"])
        report_peak = max(peak for _, peak in results["report"])
        plain_peak = max(peak for _, peak in results["plain"])
    print(json.dumps({
        "rows": args.rows, "epochs": args.epochs, "binarize": args.binarize, "samples": summary["samples"],
        "plot_samples_used": rows["samples_used"], "plot_samples_total": rows["samples_total"],
        "page_states_the_sample": stated, "images": sorted(summary["images"]),
        "report_wall_s": [round(wall, 1) for wall, _ in results["report"]],
        "plain_wall_s": [round(wall, 1) for wall, _ in results["plain"]],
        "report_peak_rss_gib": round(report_peak, 2), "plain_peak_rss_gib": round(plain_peak, 2),
    }, indent=2))
    print(f"report / plain script: wall {report_wall / plain_wall:.2f}x (best of {args.rounds}), "
          f"peak RSS {report_peak / plain_peak:.2f}x; the page states its sample: {stated}")
    if not stated:
        sys.exit("the page does not state the hash sample")


if __name__ == "__main__":
    main()
