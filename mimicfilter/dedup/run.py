"""``mimicfilter dedup`` in named steps, every one resumable and shared out like ``extrapolate``:

1. **Inputs**: the units (one input file each: a run's parts, or ``--features-from`` files), their
   embedding space, how ``filter`` will match the samples back (shard and position, or the id);
   ``--features-from`` ids checked against the run's, and for repeats, before anything is written
   (:mod:`~mimicfilter.extrapolate.external_ids`).
2. **Cells**: k-means on a sample of the image embeddings (:mod:`~mimicfilter.dedup.cells`),
   trained once and saved in ``cells/`` (the first process to publish wins; the others load it).
3. **Buckets**: every unit's samples sorted into their cells (:mod:`~mimicfilter.dedup.buckets`),
   one bucket per unit, exactly once.
4. **Pairs**: once every bucket exists, ranges of cells (planned once from the buckets' counts)
   are searched for pairs above 1 − ``max_epsilon`` (:mod:`~mimicfilter.dedup.pairs`), one edges
   part per range, exactly once.
5. **Finish**: counts per ε in stats.json, ``_SUCCESS``, and the buckets (a copy of the
   embeddings) removed.

Steps 3 and 4 run in this process, in ``--workers`` forked processes, on Ray actors or as this
rank's share (``--rank/--world-size``). Ranks need every bucket before any pair: a rank that finds
buckets missing (other ranks still at step 3) stops after its own, and the same command run again
(or the array resubmitted) goes on with the pairs.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from mimicfilter.curate.dedup import DEFAULT_EPSILON
from mimicfilter.dedup.buckets import BUCKETS_DIR, RANGES_FILE, bucket_dir, remove_buckets, saved_ranges, write_bucket
from mimicfilter.dedup.cells import CELLS_DIR, Cells, plan_cells, plan_record, train_cells
from mimicfilter.dedup.config import DedupConfig
from mimicfilter.dedup.pairs import EDGES_DIR, range_part, write_range
from mimicfilter.dedup.sources import Inputs, Reading, Unit, check_features_ids, open_inputs, read_unit
from mimicfilter.dedup.summary import edge_counts
from mimicfilter.errors import MimicfilterError
from mimicfilter.execute.local import OrderedPool
from mimicfilter.execute.ray import run_with_ray
from mimicfilter.extrapolate.config import files_digest
from mimicfilter.store.locks import flocked
from mimicfilter.store.guard import Inputs as GuardedInputs, Output, guard_outputs
from mimicfilter.store.paths import STATS_FILE, SUCCESS_FILE
from mimicfilter.store.rundir import RunDirectory, write_rank_stats

# Hidden lock files in --out: readers of the buckets hold the first shared, and only a process that
# takes it alone removes them; the second lets one process finish the run.
BUCKETS_LOCK, FINISH_LOCK = ".buckets.lock", ".finish.lock"
SAMPLE_SHARE = 4  # at most a quarter of a unit's samples join the k-means sample: it spreads over units


@dataclass(frozen=True)
class RangeTask:
    start: int
    stop: int

    def __str__(self) -> str:
        return f"cells {self.start}..{self.stop - 1}"


@dataclass(frozen=True)
class WorkerFactory:
    """Picklable: builds, once per process or actor, the worker that does one task (a unit's bucket
    or a range's pairs) and returns how many samples or edges it wrote."""

    out_dir: Path
    reading: Reading
    units: tuple[Unit, ...]
    floor: float
    pair: bool
    caption_factor: float
    threads: int | None = None

    def __call__(self) -> Callable[[Unit | RangeTask], int]:
        import faiss
        import torch

        if self.threads:
            faiss.omp_set_num_threads(self.threads)
            torch.set_num_threads(self.threads)
        loaded: list[Cells] = []

        def work(task: Unit | RangeTask) -> int:
            if isinstance(task, RangeTask):
                return write_range(self.out_dir, list(self.units), task.start, task.stop, self.floor, self.pair,
                                   self.caption_factor)
            if not loaded:
                loaded.append(Cells.load(self.out_dir / CELLS_DIR)[0])
            return write_bucket(task, self.reading, loaded[0], self.out_dir)

        return work


class LazyWorker:
    """The factory's worker, built on first use in the process that uses it (forked local workers)."""

    def __init__(self, factory: WorkerFactory):
        self.factory = factory
        self.worker: Callable[[Unit | RangeTask], int] | None = None

    def __call__(self, task: Unit | RangeTask) -> int:
        if self.worker is None:
            self.worker = self.factory()
        return self.worker(task)


def _sample(inputs: Inputs, wanted: int, seed: int) -> np.ndarray:
    """Up to ``wanted`` image embeddings (float32) from units in a seeded order, a share of each."""
    rng = np.random.default_rng(seed)
    taken, held = [], 0
    for position in rng.permutation(len(inputs.units)):
        if held >= wanted:
            break
        images = read_unit(inputs.units[int(position)], inputs.reading).vectors[:, 0]
        share = min(len(images), max(1, -(-len(images) // SAMPLE_SHARE)), wanted - held)
        if share:
            taken.append(images[np.sort(rng.choice(len(images), share, replace=False))].astype(np.float32))
            held += share
    if not taken:
        raise MimicfilterError("no usable embedding in the inputs (every row is not ok, or has none)")
    return np.concatenate(taken)


def fit_cells(config: DedupConfig, inputs: Inputs, say: Callable[[str], None]) -> dict:
    """Step 2: the saved cells (trained now unless another process published them); their record."""
    folder = Path(config.out_dir) / CELLS_DIR
    if not folder.exists():
        plan = plan_cells(inputs.rows, config.cell_size)
        say(f"training {plan.cells} cells on {plan.training_points or 'no'} samples ({plan.levels} level(s))")
        sample = _sample(inputs, plan.training_points, config.seed) if plan.cells > 1 else None
        centroids, coarse, parents = train_cells(sample, plan, config.seed) if sample is not None else \
            (np.zeros((1, inputs.reading.dim), dtype=np.float32), None, None)
        Cells(centroids, coarse, parents, config.margin).save(folder, plan_record(plan, len(centroids)))
    return Cells.load(folder)[1]


def _run_tasks(config: DedupConfig, factory: WorkerFactory, tasks: list) -> tuple[str, tuple[str, ...]]:
    """Every task on Ray, forked workers, or in this process."""
    if not tasks:
        return "none", ()
    if config.ray is not None:
        result = run_with_ray(tasks, dataclasses.replace(factory, threads=max(1, int(config.ray.cpus_per_task))),
                              config.ray)
        return f"ray ({result.actors} actors)", result.failures
    if config.workers:
        with OrderedPool(LazyWorker(dataclasses.replace(factory, threads=config.threads or 1)),
                         config.workers, window=2 * config.workers) as pool:
            for _ in pool.map(tasks):
                pass
        return f"local ({config.workers} workers)", ()
    worker = factory()
    for task in tasks:
        worker(task)
    return "local", ()


def _fingerprint(config: DedupConfig, inputs: Inputs) -> dict[str, Any]:
    return {"format": 1, "kind": "dedup", "run": str(Path(config.run).resolve()), "space": inputs.space,
            "units": len(inputs.units), "units_sha1": files_digest([unit.path for unit in inputs.units]),
            **config.choices()}


def _fail(failures: tuple[str, ...], config: DedupConfig) -> None:
    if failures:
        raise MimicfilterError(f"{len(failures)} task(s) failed after --max-retries {config.ray.max_retries}: "
                               f"{failures[0]}", hint="re-run the same command to retry them (finished parts are kept)")


def run_dedup(config: DedupConfig, echo: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Find the near-duplicate pairs of the run's samples; returns the stats (also stats.json)."""
    say = echo or (lambda message: None)
    out = Path(config.out_dir)
    run = RunDirectory(out, "dedup", config.argv)
    external = config.features_from.paths if config.features_from is not None else ()
    guard_outputs([Output("--out", out, directory=True, run=True)],
                  GuardedInputs.of(runs=[config.run, *config.embeddings], embeddings_file=external))
    inputs = open_inputs(config)
    if config.overwrite:
        (out / SUCCESS_FILE).unlink(missing_ok=True)  # first: a kill below never leaves a finished run without edges
        for name in (CELLS_DIR, BUCKETS_DIR, EDGES_DIR):
            shutil.rmtree(out / name, ignore_errors=True)
        (out / RANGES_FILE).unlink(missing_ok=True)
    if config.features_from is not None and not (out / CELLS_DIR).exists():  # cells: a process checked these files
        check_features_ids(config, inputs)
    run.open(_fingerprint(config, inputs), {"run": str(config.run), "embeddings": [
        str(path) for path in config.embeddings], "embedding": inputs.space, "match": list(inputs.match),
        **config.choices()}, config.overwrite, concurrent=config.partition.partitioned)
    with flocked(out / BUCKETS_LOCK, shared=True):  # the buckets stay while this process may read them
        stats = _search(run, config, inputs, say)
    if (out / SUCCESS_FILE).exists():
        with flocked(out / BUCKETS_LOCK, wait=False, remove=True) as alone:
            if alone:  # else a process still reading them removes them when it ends
                remove_buckets(out)
    return stats


def _finished(out: Path) -> dict[str, Any] | None:
    if (out / SUCCESS_FILE).exists() and (out / STATS_FILE).is_file():
        return json.loads((out / STATS_FILE).read_text())
    return None


def _search(run: RunDirectory, config: DedupConfig, inputs: Inputs, say: Callable[[str], None]) -> dict[str, Any]:
    """Steps 2–5 (the module's docstring); the stats of the finished run when another process finished it."""
    out = run.path
    if (done := _finished(out)) is not None:
        return done  # finished (a run killed before removing its buckets left them; the caller removes them)
    started = time.time()
    record = fit_cells(config, inputs, say)
    seconds = {"cells": round(time.time() - started, 3)}
    factory = WorkerFactory(out, inputs.reading, tuple(inputs.units), 1.0 - config.max_epsilon,
                            config.dedup_on == "pair", config.caption_factor, config.threads)
    mine = config.partition.select(inputs.units)
    pending = [unit for unit in mine if not bucket_dir(out, unit).exists()]
    say(f"{len(inputs.units)} units into {record['cells']} cells: {len(pending)} to sort here")
    executor, failures = _run_tasks(config, factory, pending)
    _fail(failures, config)
    seconds["buckets"] = round(time.time() - started - sum(seconds.values()), 3)
    shared = {"units": len(inputs.units), "cells": record["cells"], "cell_plan": record, "executor": executor,
              "rank": config.partition.rank, "world_size": config.partition.world_size}
    waiting = sum(not bucket_dir(out, unit).exists() for unit in inputs.units)
    if waiting:
        return _partial(run, config, shared | {"buckets_missing": waiting})
    row_bytes = len(inputs.reading.columns) * inputs.reading.dim * 2
    ranges = [RangeTask(*pair) for pair in saved_ranges(out, inputs.units, record["cells"], row_bytes)]
    todo = [task for task in config.partition.select(ranges) if not range_part(out, task.start, task.stop).exists()]
    say(f"searching {len(todo)} of {len(ranges)} ranges of cells for pairs above cosine {1 - config.max_epsilon:g}")
    _, failures = _run_tasks(config, factory, todo)
    _fail(failures, config)
    seconds["pairs"] = round(time.time() - started - sum(seconds.values()), 3)
    missing = sum(not range_part(out, task.start, task.stop).exists() for task in ranges)
    if missing:
        return _partial(run, config, shared | {"ranges_missing": missing})
    with flocked(out / FINISH_LOCK, remove=True):  # ranks ending at once: one finishes, the others read its stats
        if (done := _finished(out)) is not None:
            return done
        stats = run.stats(shared | edge_counts(out, inputs.units, config.max_epsilon, DEFAULT_EPSILON) |
                          {"dedup_on": config.dedup_on, "max_epsilon": config.max_epsilon,
                           "caption_factor": config.caption_factor, "seconds_by_step": seconds,
                           "search_seconds": round(time.time() - started, 3)})
        if not stats["samples"]:  # nothing was searched: "no duplicates" would be read as a finding
            raise MimicfilterError("no sample of the inputs has a usable embedding (null, zero, not finite, or too "
                                   "large for float16)", hint="check the embeddings the run reads")
        run.finish(stats)
    return stats


def _partial(run: RunDirectory, config: DedupConfig, counts: dict[str, Any]) -> dict[str, Any]:
    """This rank is done; others (or a second pass of the same command) finish the run."""
    stats = run.stats(counts)
    if config.partition.partitioned:
        write_rank_stats(run.path, config.partition.rank, config.partition.world_size, stats)
    return stats
