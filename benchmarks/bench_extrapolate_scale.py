"""Score extrapolation at scale: a scored run and a DataComp-layout pool of synthetic clustered 512-d
embeddings with a planted score, extrapolated by ``mimicfilter extrapolate --features-from`` in a
fresh process. Prints wall time, the peak RSS of the process tree, the index it chose (kind, nlist,
nprobe, the recall@10 it was tuned to), recall@10 of the IVF neighbours against exact search on
a subsample of the unscored samples, Spearman rho of the extrapolated scores against the planted
truth, and, on that subsample, rho of the exact-search prediction (the same k) against the truth.

    python benchmarks/bench_extrapolate_scale.py                         # quick: 100k scored, 1M unscored
    python benchmarks/bench_extrapolate_scale.py --scored 1000000 --unscored 10000000 --workdir /data/w
    python benchmarks/bench_extrapolate_scale.py --workdir W             # again: reuses W's pool

The data: 4,096 sub-topic centres (128 topics × 32) on the unit sphere; a sample is its sub-topic's
centre plus Gaussian noise of norm 0.8–1.6, normalised (top-1 neighbour cosine ≈ 0.5, as CLIP
embeddings of a web pool). Planted score = the sub-topic's effect + 4 × (x · a fixed direction) +
noise 0.3. Scored samples sit in ``scored-NNNNN`` shards (a score run written through the store,
the npz beside each shard's name), unscored ones in ``NNNNNNNN.npz`` + ``.parquet`` files.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
MIMICFILTER = Path(sys.executable).parent / "mimicfilter"
TOPICS, SUBTOPICS = 128, 32
ARRAY = "l14_img"


def centres(dim: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    topics = rng.standard_normal((TOPICS, dim)).astype(np.float32)
    topics /= np.linalg.norm(topics, axis=1, keepdims=True)
    subs = np.repeat(topics, SUBTOPICS, 0) + 0.9 * rng.standard_normal((TOPICS * SUBTOPICS, dim)).astype(np.float32) / np.sqrt(dim)
    subs /= np.linalg.norm(subs, axis=1, keepdims=True)
    direction = rng.standard_normal(dim).astype(np.float32)
    return subs, direction / np.linalg.norm(direction), rng.standard_normal(TOPICS * SUBTOPICS).astype(np.float32)


def samples(count: int, seed: int, model) -> tuple[np.ndarray, np.ndarray]:
    """``count`` unit vectors (float16) and their planted scores."""
    subs, direction, effect = model
    rng = np.random.default_rng(seed)
    which = rng.integers(0, len(subs), count)
    noise = rng.uniform(0.8, 1.6, count).astype(np.float32)[:, None] / np.sqrt(subs.shape[1])
    vectors = subs[which] + noise * rng.standard_normal((count, subs.shape[1]), dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    score = effect[which] + 4 * vectors @ direction + 0.3 * rng.standard_normal(count).astype(np.float32)
    return vectors.astype(np.float16), score


def write_file(stem: Path, uids: list[str], vectors: np.ndarray, truth: np.ndarray) -> None:
    np.savez(stem.with_suffix(".npz"), **{ARRAY: vectors})
    pq.write_table(pa.table({"uid": uids, "true_score": truth}), stem.with_suffix(".parquet"))


def write_scored_run(run_dir: Path, shards: list[tuple[str, list[str], np.ndarray]]) -> None:
    """A finished `score` run (one epoch, --train none) holding ``shards``: (shard, uids, scores)."""
    from mimicfilter.store.parts import write_part
    from mimicfilter.store.paths import part_path
    from mimicfilter.store.rundir import RunDirectory
    from mimicfilter.store.schema import SCORE_SCHEMA

    run = RunDirectory(run_dir, "score", ["bench_extrapolate_scale.py"])
    run.open({"synthetic": str(run_dir)}, {"shards": [shard for shard, _, _ in shards], "train": {"mode": "none"}}, True)
    for shard, uids, scores in shards:
        count = len(uids)
        columns = {"shard": [shard] * count, "key": uids, "uid": uids, "index": np.arange(count, dtype=np.int32),
                   "epoch": np.zeros(count, np.int16), "step": np.zeros(count, np.int32), "status": ["ok"] * count,
                   "mimic_score": scores.astype(np.float32), "mimic_weight": np.ones(count, np.float32)}
        table = pa.table({field.name: pa.array(columns[field.name], field.type) if field.name in columns
                          else pa.nulls(count, field.type) for field in SCORE_SCHEMA}, schema=SCORE_SCHEMA)
        write_part(table, part_path(run_dir, shard))
    run.finish(run.stats({"rows": sum(len(uids) for _, uids, _ in shards)}))


def write_pool(workdir: Path, scored: int, unscored: int, dim: int, per_file: int) -> dict:
    """The scored run and the pool's npz/parquet files, once per parameter set (cached in ``workdir``)."""
    params = {"scored": scored, "unscored": unscored, "dim": dim, "per_file": per_file, "format": 1}
    marker = workdir / "pool.json"
    if marker.is_file() and json.loads(marker.read_text()) == params:
        return params
    pool = workdir / "pool"
    pool.mkdir(parents=True, exist_ok=True)
    model = centres(dim)
    shards = []
    for number, start in enumerate(range(0, scored, per_file)):
        count = min(per_file, scored - start)
        vectors, score = samples(count, 1_000_000 + number, model)
        uids = [f"s{start + i:011d}" for i in range(count)]
        shard = str(pool / f"scored-{number:05d}.tar")
        write_file(pool / f"scored-{number:05d}", uids, vectors, score)
        shards.append((shard, uids, score))
    write_scored_run(workdir / "scored", shards)
    for number, start in enumerate(range(0, unscored, per_file)):
        count = min(per_file, unscored - start)
        vectors, score = samples(count, number, model)
        write_file(pool / f"{number:08d}", [f"u{start + i:011d}" for i in range(count)], vectors, score)
    marker.write_text(json.dumps(params))
    return params


def tree_rss_mib(pid: int) -> float:
    """Resident memory of a process and all its descendants now (MiB), from /proc."""
    total, pending = 0, [pid]
    while pending:
        each = pending.pop()
        try:
            for line in Path(f"/proc/{each}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
            for task in Path(f"/proc/{each}/task").iterdir():
                pending += [int(child) for child in (task / "children").read_text().split()]
        except OSError:
            pass
    return total / 1024


def extrapolate(workdir: Path, out: Path, extra: list[str]) -> dict:
    """One `extrapolate` in a fresh process: its stats, wall time and peak RSS (process tree)."""
    command = [str(MIMICFILTER), "extrapolate", "--scored", str(workdir / "scored"), "--features-from",
               str(workdir / "pool"), "--embedding-column", ARRAY, "--out", str(out), "--overwrite", "--json", *extra]
    started = time.time()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = [0.0]

    def watch() -> None:
        while process.poll() is None:
            peak[0] = max(peak[0], tree_rss_mib(process.pid))
            time.sleep(0.2)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    stdout, stderr = process.communicate()
    watcher.join()
    if process.returncode:
        raise SystemExit(f"extrapolate failed ({process.returncode}): {stderr.strip()[-2000:]}")
    return {"wall_s": round(time.time() - started, 1), "peak_rss_mib": round(peak[0]), "stats": json.loads(stdout)}


def evaluate(workdir: Path, out: Path, k: int, eval_queries: int, seed: int = 0) -> dict:
    """recall@10 (IVF vs exact) and rho against the planted truth, on ``eval_queries`` unscored samples."""
    import duckdb

    from mimicfilter.extrapolate.index import ScoredIndex, exact_search
    from mimicfilter.extrapolate.recall import recall_at
    from mimicfilter.metrics import spearman

    pool = workdir / "pool"
    predicted = duckdb.sql(f"SELECT uid, mimic_score FROM read_parquet('{out}/scores/*.parquet') WHERE extrapolated").df()
    truth = duckdb.sql(f"SELECT uid, true_score FROM read_parquet('{pool}/[0-9]*.parquet')").df()
    joined = predicted.merge(truth, on="uid")
    rho_all = spearman(joined["mimic_score"].to_numpy(np.float64), joined["true_score"].to_numpy(np.float64))
    files = sorted(pool.glob("scored-*.npz"))
    scored_vectors = np.concatenate([np.load(file)[ARRAY] for file in files])
    unscored = sorted(pool.glob("[0-9]*.npz"))
    rng = np.random.default_rng(seed)
    per_file = max(1, eval_queries // len(unscored))
    queries, query_uids, query_truth = [], [], []
    for file in unscored[:: max(1, len(unscored) // eval_queries)][:eval_queries]:
        vectors = np.load(file)[ARRAY]
        meta = pq.read_table(file.with_suffix(".parquet"))
        rows = np.sort(rng.choice(len(vectors), min(per_file, len(vectors)), replace=False))
        queries.append(vectors[rows])
        query_uids += [meta.column("uid")[int(row)].as_py() for row in rows]
        query_truth.append(meta.column("true_score").to_numpy()[rows])
    queries = np.concatenate(queries)[:eval_queries].astype(np.float32)
    query_truth = np.concatenate(query_truth)[:eval_queries]
    query_uids = query_uids[:eval_queries]
    started = time.time()
    _, exact_ids = exact_search(queries, lambda rows: scored_vectors[rows], np.arange(len(scored_vectors)), max(10, k))
    exact_s = time.time() - started
    index = ScoredIndex.load(out / "extrapolator" / "index")
    _, found = index.search(queries, 10)
    scores = dict(zip(predicted["uid"], predicted["mimic_score"]))
    exact_prediction = _scored_scores(workdir)[exact_ids[:, :k]].mean(axis=1)
    ivf_prediction = np.array([scores[uid] for uid in query_uids])
    return {
        "recall_at_10": round(recall_at(found, exact_ids[:, :10]), 4),
        "rho_all_vs_truth": round(rho_all, 4),
        "eval_queries": len(queries),
        "rho_eval_ivf_vs_truth": round(spearman(ivf_prediction, query_truth), 4),
        "rho_eval_exact_vs_truth": round(spearman(exact_prediction, query_truth), 4),
        "rho_eval_ivf_vs_exact": round(spearman(ivf_prediction, exact_prediction), 4),
        "exact_search_s": round(exact_s, 1),
    }


def _scored_scores(workdir: Path) -> np.ndarray:
    """The scored run's scores in the order of the scored npz files."""
    table = pq.read_table(workdir / "scored" / "scores").sort_by([("shard", "ascending"), ("index", "ascending")])
    return table.column("mimic_score").to_numpy().astype(np.float64)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scored", type=int, default=100_000)
    parser.add_argument("--unscored", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--per-file", type=int, default=10_000, help="samples per npz file (a DataComp shard)")
    parser.add_argument("--eval-queries", type=int, default=10_000, help="unscored samples searched exactly")
    parser.add_argument("--workdir", type=Path, default=None, help="keep the pool here (reused when unchanged)")
    parser.add_argument("--k", default="10", help="extrapolate --k (default: 10)")
    parser.add_argument("extra", nargs="*", help="more extrapolate options, after --")
    args = parser.parse_args(argv)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-extrapolate-scale-"))
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    params = write_pool(workdir, args.scored, args.unscored, args.dim, args.per_file)
    print(f"pool: {params} ({time.time() - started:.0f} s to write or reuse) in {workdir}", flush=True)
    load = os.getloadavg()[0]
    run = extrapolate(workdir, workdir / "out", ["--k", args.k, *args.extra])
    stats = run["stats"]
    quality = evaluate(workdir, workdir / "out", stats["k"], args.eval_queries)
    result = {"load_1min_before": round(load, 2), "load_1min_after": round(os.getloadavg()[0], 2),
              "cpu_count": os.cpu_count(), "wall_s": run["wall_s"], "peak_rss_mib": run["peak_rss_mib"],
              "fit_s": stats["extrapolate_seconds"], "index": stats["index"], "k": stats["k"],
              "heldout_spearman": round(stats["heldout_spearman"], 4), "extrapolated": stats["extrapolated_samples"],
              "unscored_per_s": round(stats["extrapolated_samples"] / run["wall_s"]), **quality}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
