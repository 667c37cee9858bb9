"""`mimicfilter dedup` at scale: N synthetic clustered 512-d embeddings in DataComp-layout files, 5 %
of them planted near-copies of others; one `dedup --features-from` in a fresh process. Prints
wall time, the peak RSS of the process tree, the cells, the pairs kept and the recall of the
planted pairs at filter's default ε.

    python benchmarks/bench_dedup_scale.py                               # 1M, --dedup-on image
    python benchmarks/bench_dedup_scale.py --samples 10000000 --workdir /data/bench-dedup
    python benchmarks/bench_dedup_scale.py --dedup-on pair               # image and text arrays

The embeddings are those of benchmarks/bench_extrapolate_scale.py (4,096 sub-topic centres, top-1
neighbour cosine ≈ 0.5, like CLIP embeddings of a web pool); a planted copy is its source plus
Gaussian noise (cosine 0.97–0.995 to it, on each side with pair). The files are written once per
parameter set into --workdir and reused.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bench_extrapolate_scale import centres, run_watched, samples
from common import ROOT, mimicfilter_command

COPY_SHARE = 0.05
IMAGE, TEXT = "l14_img", "l14_txt"


def one_file(number: int, count: int, start: int, model, text_model, pair: bool) -> tuple[dict, list[tuple[int, int]]]:
    """The arrays of one file and its planted pairs (global sample numbers)."""
    rng = np.random.default_rng(10_000_000 + number)
    images, _ = samples(count, number, model)
    arrays = {IMAGE: images}
    if pair:
        arrays[TEXT], _ = samples(count, 5_000_000 + number, text_model)
    copies = int(COPY_SHARE * count)
    sources = rng.choice(count - copies, copies, replace=False)
    for name, side in arrays.items():
        noise = rng.uniform(0.1, 0.25, (copies, 1)).astype(np.float32) / np.sqrt(side.shape[1])
        copy = side[sources].astype(np.float32) + noise * rng.standard_normal((copies, side.shape[1]), dtype=np.float32)
        side[count - copies:] = (copy / np.linalg.norm(copy, axis=1, keepdims=True)).astype(np.float16)
    return arrays, [(start + int(s), start + count - copies + i) for i, s in enumerate(sources)]


def write_pool(workdir: Path, total: int, dim: int, per_file: int, pair: bool) -> None:
    params = {"samples": total, "dim": dim, "per_file": per_file, "pair": pair, "copy_share": COPY_SHARE, "format": 2}
    marker = workdir / "pool.json"
    if marker.is_file() and json.loads(marker.read_text()) == params:
        return
    folder = workdir / "pool"
    folder.mkdir(parents=True, exist_ok=True)
    model, text_model = centres(dim), centres(dim, seed=1)
    planted = []
    for number, start in enumerate(range(0, total, per_file)):
        count = min(per_file, total - start)
        arrays, pairs = one_file(number, count, start, model, text_model, pair)
        np.savez(folder / f"{number:08d}.npz", **arrays)
        pq.write_table(pa.table({"uid": [f"{start + i:032x}" for i in range(count)]}), folder / f"{number:08d}.parquet")
        planted += pairs
    np.save(workdir / "planted.npy", np.array(planted, dtype=np.int64))
    write_run(workdir / "run", total, per_file)
    marker.write_text(json.dumps(params))


def write_run(run: Path, total: int, per_file: int) -> None:
    """A stand-in for the run the files embed: one part per file holding its samples' identity (dedup
    reads a run's uids only, to check that the files' ids name its samples)."""
    (run / "scores").mkdir(parents=True, exist_ok=True)
    for number, start in enumerate(range(0, total, per_file)):
        count = min(per_file, total - start)
        shard = f"/pool/{number:08d}.tar"
        pq.write_table(pa.table({"shard": [shard] * count, "key": [f"{i:04d}" for i in range(count)],
                                 "uid": [f"{start + i:032x}" for i in range(count)],
                                 "index": pa.array(np.arange(count), pa.int32()), "status": ["ok"] * count}),
                       run / "scores" / f"{number:08d}.parquet")
    (run / "run.json").write_text(json.dumps({"command": "score", "shards": [f"/pool/{number:08d}.tar" for number in
                                                                           range(-(-total // per_file))]}))
    (run / "_SUCCESS").write_text("")


def run_dedup(workdir: Path, out: Path, pair: bool, extra: list[str]) -> dict:
    """One `dedup` in a fresh process: its stats, wall seconds and peak RSS (MiB, process tree)."""
    columns = f"{IMAGE},{TEXT}" if pair else IMAGE
    return run_watched([*mimicfilter_command(), "dedup", str(workdir / "run"), "--features-from", str(workdir / "pool"),
                        "--embedding-column", columns, "--dedup-on", "pair" if pair else "image", "--out", str(out),
                        "--overwrite", "--json", *extra])


def planted_recall(workdir: Path, out: Path, epsilon: float) -> float:
    """Share of the planted pairs that end in one group at ``epsilon``."""
    import duckdb

    sys.path.insert(0, str(ROOT))
    from mimicfilter.curate.groups import components

    planted = np.load(workdir / "planted.npy")
    edges = duckdb.sql(f"SELECT uid_a, uid_b FROM read_parquet('{out}/edges/*.parquet') "
                       f"WHERE similarity >= {1 - epsilon}").fetchnumpy()
    a = np.array([int(uid, 16) for uid in edges["uid_a"]], dtype=np.int64)
    b = np.array([int(uid, 16) for uid in edges["uid_b"]], dtype=np.int64)
    nodes = np.unique(np.concatenate([a, b, planted.reshape(-1)]))
    labels = components(len(nodes), np.searchsorted(nodes, a), np.searchsorted(nodes, b))
    ends = np.searchsorted(nodes, planted)
    return float(np.mean(labels[ends[:, 0]] == labels[ends[:, 1]]))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--per-file", type=int, default=10_000, help="samples per npz file (DataComp: ~10k)")
    parser.add_argument("--dedup-on", choices=["image", "pair"], default="image")
    parser.add_argument("--workdir", type=Path, default=None, help="[bench-runs/dedup-scale]")
    parser.add_argument("extra", nargs="*", help="more `mimicfilter dedup` options, after --")
    args = parser.parse_args(argv)
    args.workdir = args.workdir or ROOT / "bench-runs" / "dedup-scale"
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    pair = args.dedup_on == "pair"
    started = time.time()
    write_pool(args.workdir, args.samples, args.dim, args.per_file, pair)
    print(f"pool: {args.samples:,} samples ({args.dedup_on}), written or reused in {time.time() - started:.0f} s", flush=True)
    load_before = os.getloadavg()[0]
    watched = run_dedup(args.workdir, args.workdir / "dedup", pair, args.extra)
    stats, wall, peak = watched["stats"], watched["wall_s"], watched["peak_rss_mib"]
    load_after = os.getloadavg()[0]
    from mimicfilter.curate.dedup import DEFAULT_EPSILON

    recall = planted_recall(args.workdir, args.workdir / "dedup", DEFAULT_EPSILON)
    default = stats["at_default"]
    print(json.dumps({"samples": stats["samples"], "cells": stats["cells"], "levels": stats["cell_plan"]["levels"],
                      "edges": stats["edges"], "wall_s": round(wall, 1), "peak_rss_mib": round(peak, 1),
                      "groups_at_default": default["groups"], "duplicates_at_default": default["duplicates"],
                      "planted_recall_at_default": round(recall, 4), "load_before": load_before,
                      "load_after": load_after, "cpu_count": os.cpu_count()}, indent=1))


if __name__ == "__main__":
    sys.exit(main())
