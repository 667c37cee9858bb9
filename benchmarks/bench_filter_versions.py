"""Two mimicfilter installs, one synthetic score table: is `filter` slower or bigger after a change?

The table of bench_filter.py (synthetic_scores.py) (every sample once per epoch, ~1 % bad samples) goes through
`python -m mimicfilter filter` of interpreter A and of interpreter B, alternating A/B and B/A
rounds as whole processes; prints each run's wall time and peak RSS, and the B/A wall-time ratio.
Both must keep the same number of samples.

    python benchmarks/bench_filter_versions.py --a /work/main/.venv/bin/python --b .venv/bin/python \\
        [--rows 3000000] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from synthetic_scores import filter_run

# Run in a fresh process per measurement, so RUSAGE_CHILDREN is that one filter's peak RSS.
MEASURE = ("import resource, subprocess, sys, time; started = time.perf_counter(); "
           "done = subprocess.run(sys.argv[1:], capture_output=True); wall = time.perf_counter() - started; "
           "print(done.returncode, wall, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20)")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--a", required=True, help="python of install A (e.g. main's virtualenv)")
    parser.add_argument("--b", required=True, help="python of install B")
    parser.add_argument("--rows", type=int, default=3_000_000)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)
    installs = {"A": args.a, "B": args.b}
    with tempfile.TemporaryDirectory(prefix="mimicfilter-bench-versions-") as scratch:
        run = Path(scratch) / "run"
        filter_run(run, args.rows, 3, 20)
        walls: dict[str, list[float]] = {"A": [], "B": []}
        kept: set[int] = set()
        for number in range(args.rounds * 2):
            name = "AB"[number % 2] if (number // 2) % 2 == 0 else "BA"[number % 2]
            out = Path(scratch) / f"curated-{number}"
            command = [installs[name], "-m", "mimicfilter", "filter", str(run), "--out", str(out), "--keep-votes",
                       "--top-frac", "clip_score=0.3", "--drop", "bottom-frac:mimic_score=0.2",
                       "--memory-limit", "3GB", "--json"]
            code, wall, rss = subprocess.run([sys.executable, "-c", MEASURE, *command], capture_output=True,
                                             text=True, check=True).stdout.split()
            if code != "0":
                sys.exit(f"{name} failed: exit {code}")
            kept.add(json.loads((out / "summary.json").read_text())["kept"])
            walls[name].append(float(wall))
            print(f"{name}: {float(wall):.1f} s, peak RSS {float(rss):.2f} GiB", flush=True)
    if len(kept) != 1:
        sys.exit(f"the installs keep different samples: {sorted(kept)}")
    print(f"kept {kept.pop()} samples in every run; wall time B/A = {sum(walls['B']) / sum(walls['A']):.3f}")


if __name__ == "__main__":
    main()
