"""Filtering at scale: a synthetic 10M-row, 3-epoch score table through `mimicfilter filter`.

Measures wall time and peak memory (RSS of the filter process) of: vote aggregation over epochs,
a two-rule ensemble ("CLIP-score top 30% AND mimic votes, minus mimic bottom 20%") and writing
manifest.parquet + summary.json. Targets on a 2-core, 24 GiB machine: under a minute, under 4 GiB.

    python benchmarks/bench_filter.py [--rows 10000000] [--epochs 3] [--memory-limit 3GB]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from synthetic_scores import filter_run


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--parts", type=int, default=20, help="parts per epoch")
    parser.add_argument("--memory-limit", default="3GB")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="mimicfilter-bench-filter-") as scratch:
        run = Path(scratch) / "run"
        started = time.perf_counter()
        filter_run(run, args.rows, args.epochs, args.parts)
        generated = time.perf_counter() - started
        command = [
            sys.executable, "-m", "mimicfilter", "filter", str(run), "--out", str(Path(scratch) / "curated"),
            "--keep-votes", "--top-frac", "clip_score=0.3", "--drop", "bottom-frac:mimic_score=0.2",
            "--memory-limit", args.memory_limit, "--json",
        ]
        started = time.perf_counter()
        completed = subprocess.run(command, capture_output=True, text=True)
        wall = time.perf_counter() - started
        if completed.returncode != 0:
            sys.exit(completed.stderr)
        peak_gib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20  # KiB → GiB
        summary = json.loads(completed.stdout)
        manifest_bytes = (Path(scratch) / "curated" / "manifest.parquet").stat().st_size
    result = {
        "rows": args.rows,
        "epochs": args.epochs,
        "samples": summary["samples"],
        "kept": summary["kept"],
        "table_generation_seconds": round(generated, 1),
        "filter_wall_seconds": round(wall, 1),
        "filter_peak_rss_gib": round(peak_gib, 2),
        "duckdb_memory_limit": args.memory_limit,
        "manifest_mib": round(manifest_bytes / 2**20, 1),
    }
    print(json.dumps(result, indent=2))
    print(f"filter: {wall:.1f} s (target < 60 s), peak RSS {peak_gib:.2f} GiB (target < 4 GiB)")


if __name__ == "__main__":
    main()
