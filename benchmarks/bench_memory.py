"""Flat memory: the peak RSS of a static `mimicfilter score` run must not grow with the number of shards.

Writes N equal shards (real images: the demo's emoji, re-keyed), scores 2 and then 20 of them with
the demo model (`--train none`) in fresh processes, and prints each run's peak RSS and the ratio
(target ≤ 1.1). The peak RSS is the kernel's ru_maxrss of the scoring process (os.wait4), so it
is exact; with --workers > 0 it is the main process (the DataLoader workers are each bounded by
one shard in flight and are reported separately from /proc while the run goes).

    python benchmarks/bench_memory.py [--samples-per-shard 256] [--workers 0] [--shards 2 20]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from common import DEMO_MODEL, demo_pool, mimicfilter_command


def tree_rss_mib(pid: int) -> float:
    """Resident memory of a process and its children now (MiB), from /proc."""
    total = 0
    pids = [pid]
    children_file = Path(f"/proc/{pid}/task/{pid}/children")
    if children_file.exists():
        pids += [int(child) for child in children_file.read_text().split()]
    for each in pids:
        try:
            for line in Path(f"/proc/{each}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


def score(shards: list[Path], out: Path, workers: int, batch_size: int) -> dict[str, float]:
    command = [*mimicfilter_command(), "score", *map(str, shards), *DEMO_MODEL, "--train", "none", "--batch-size", str(batch_size),
               "--workers", str(workers), "--out", str(out), "--quiet", "--overwrite"]
    started = time.time()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    tree_peak = [0.0]

    def watch():
        while process.poll() is None:
            tree_peak[0] = max(tree_peak[0], tree_rss_mib(process.pid))
            time.sleep(0.05)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    watcher.join()
    if process.returncode:
        sys.exit(f"scoring failed with exit code {process.returncode}: {' '.join(command)}")
    return {"peak_rss_mib": usage.ru_maxrss / 1024, "tree_peak_mib": tree_peak[0], "seconds": time.time() - started}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=int, nargs=2, default=[2, 20], metavar=("FEW", "MANY"))
    parser.add_argument("--samples-per-shard", type=int, default=256)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=128)
    args = parser.parse_args(argv)
    few, many = args.shards
    with tempfile.TemporaryDirectory(prefix="mimicfilter-bench-memory-") as scratch:
        scratch = Path(scratch)
        shards = demo_pool(scratch / "shards", many, args.samples_per_shard)
        results = {}
        for count in (few, many):
            results[count] = score(shards[:count], scratch / f"run-{count}", args.workers, args.batch_size)
    print(f"static scoring, demo tiny CLIP, {args.samples_per_shard} samples/shard, batch {args.batch_size}, "
          f"--workers {args.workers}, {os.cpu_count()} CPUs")
    print(f"{'shards':>7} {'samples':>8} {'peak RSS (MiB)':>15} {'process tree peak (MiB)':>24} {'seconds':>8}")
    for count, result in results.items():
        print(f"{count:>7} {count * args.samples_per_shard:>8} {result['peak_rss_mib']:>15.1f} "
              f"{result['tree_peak_mib']:>24.1f} {result['seconds']:>8.1f}")
    ratio = results[many]["peak_rss_mib"] / results[few]["peak_rss_mib"]
    tree_ratio = results[many]["tree_peak_mib"] / results[few]["tree_peak_mib"]
    print(f"peak RSS ratio {many} / {few} shards: {ratio:.3f} (target <= 1.1); process tree: {tree_ratio:.3f}")


if __name__ == "__main__":
    main()
