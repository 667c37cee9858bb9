"""The three ways to run static scoring on one machine, on the same shards: local, ranks, Ray.

* local: one `mimicfilter score` process (DataLoader decoding workers);
* ranks: `--world-size W` processes started together, one per rank, sharing the run directory;
* ray:   `--ray` (a local Ray instance) with one 1-CPU actor per core.

Prints samples/s of each (model loading included: it is part of what a job pays per worker) and
checks that the three tables agree. On one machine this measures the executors' overhead; on a
cluster the same commands scale out (docs/scale.md).

    python benchmarks/bench_executors.py [--shards 16] [--samples-per-shard 256] [--model demo|ViT-B-32]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from common import DEMO_MODEL, demo_pool, mimicfilter_command
from mimicfilter.store.parts import read_scores


def model_args(model: str, scratch: Path) -> list[str]:
    if model == "demo":
        return DEMO_MODEL
    import open_clip
    import torch

    checkpoint = scratch / "reference.pt"
    torch.manual_seed(0)
    torch.save(open_clip.create_model(model).state_dict(), checkpoint)  # random weights: no hub offline
    return ["--model", model, "--reference", str(checkpoint)]


def timed(commands: list[list[str]], env: dict[str, str] | None = None) -> float:
    started = time.time()
    processes = [subprocess.Popen(command, stdout=subprocess.DEVNULL, env=env) for command in commands]
    for process, command in zip(processes, commands):
        if process.wait():
            sys.exit(f"failed ({process.returncode}): {' '.join(command)}")
    return time.time() - started


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=int, default=16)
    parser.add_argument("--samples-per-shard", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--model", default="demo", help="demo (the bundled tiny CLIP) or an open_clip name")
    args = parser.parse_args(argv)
    cores = os.cpu_count() or 2
    with tempfile.TemporaryDirectory(prefix="mimicfilter-bench-executors-") as scratch:
        scratch = Path(scratch)
        shards = [str(path) for path in demo_pool(scratch / "shards", args.shards, args.samples_per_shard)]
        base = [*mimicfilter_command(), "score", *shards, *model_args(args.model, scratch), "--train", "none",
                "--batch-size", str(args.batch_size), "--quiet"]
        samples = args.shards * args.samples_per_shard
        one_thread = {**os.environ, "OMP_NUM_THREADS": "1"}  # ranks share the cores like the actors do
        runs = {
            f"local (1 process, {cores} threads, 1 decoding worker)": timed(
                [base + ["--workers", "1", "--out", str(scratch / "local")]]),
            f"ranks (--world-size {cores}, 1 thread each)": timed(
                [base + ["--workers", "0", "--rank", str(rank), "--world-size", str(cores), "--out", str(scratch / "ranks")]
                 for rank in range(cores)], env=one_thread),
            f"ray ({cores} actors x 1 CPU)": timed([base + ["--ray", "--out", str(scratch / "ray")]]),
        }
        tables = {name: read_scores(scratch / name) for name in ("local", "ranks", "ray")}
        reference = np.array(tables["local"].column("mimic_score").to_pylist(), dtype=float)
        agreement = {
            name: float(np.nanmax(np.abs(np.array(table.column("mimic_score").to_pylist(), dtype=float) - reference)))
            for name, table in tables.items() if name != "local"
        }
        equal_keys = all(table.select(["shard", "key", "status"]).equals(tables["local"].select(["shard", "key", "status"]))
                         for table in tables.values())
    print(f"{samples} samples in {args.shards} shards, model {args.model}, batch {args.batch_size}, {cores} CPUs")
    print(f"{'executor':<52} {'wall s':>8} {'samples/s':>10}")
    for name, seconds in runs.items():
        print(f"{name:<52} {seconds:>8.1f} {samples / seconds:>10.1f}")
    print(f"same rows and statuses in all three tables: {equal_keys}; largest |score difference| vs local: "
          + ", ".join(f"{name} {value:.2e}" for name, value in agreement.items())
          + " (any difference would come from thread counts: float32 rounding)")


if __name__ == "__main__":
    main()
