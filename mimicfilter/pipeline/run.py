"""``mimicfilter score``: shards → decoded samples → batches → scores → Parquet parts, resumable.

    read (shards.samples) → decode (shards.decode) → batch (pipeline.batches)      pipeline.stages
        → score (mimic scorer [+ proxy update]) → rows (pipeline.batch_scorer)
        → write (store.parts.write_part, atomic)

Static mode (``--train none``, :mod:`~mimicfilter.pipeline.static`): one part per shard, on the local
executor, a ``--rank`` share, or Ray actors. Trajectory mode (``--train head|full``,
:mod:`~mimicfilter.pipeline.trajectory`): one ordered stream per epoch while the proxy learns.
"""

from __future__ import annotations

import dataclasses
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

from mimicfilter.defaults import task_defaults
from mimicfilter.errors import MimicfilterError
from mimicfilter.execute.ray import run_with_ray
from mimicfilter.execute.local import OrderedPool
from mimicfilter.mimic.models import LoadedModels, preview_inputs
from mimicfilter.pipeline.batch_scorer import BatchScorer, build_batch_scorer
from mimicfilter.pipeline.config import Progress, ScoreConfig
from mimicfilter.mimic.device import resolve_device
from mimicfilter.pipeline.stages import Decoder, EarlyInput, check_decoder, shard_batches
from mimicfilter.pipeline.static import ShardWorkerFactory, score_local
from mimicfilter.pipeline.trajectory import EpochBatches, StreamPosition, has_checkpoint, run_trajectory
from mimicfilter.shards.samples import count_shard_samples
from mimicfilter.store.parts import table_stats
from mimicfilter.store.paths import part_path
from mimicfilter.store.rundir import RunDirectory, write_rank_stats
from mimicfilter.timing import current, phase


def startup_breakdown() -> dict[str, float]:
    """The phases recorded before the scoring loop, in order (``score --verbose``)."""
    return {name: round(seconds, 3) for name, seconds in current() or []}


def _fingerprint(config: ScoreConfig, models: LoadedModels) -> dict[str, Any]:
    provenance = models.provenance
    return {
        "format": 1,
        "task": models.task,
        "shards": list(config.shards),
        "architecture": provenance["architecture"],
        "architecture_config": provenance["architecture_config"],
        "reference": {k: v for k, v in provenance["reference"].items() if k != "path"},
        "proxy": {k: v for k, v in provenance["proxy"].items() if k != "path"},
        "reference_head": {k: v for k, v in provenance.get("reference_head", {}).items() if k != "path"},
        "mimic_layers": list(models.mimic_layers),
        "batch_size": config.batch_size,
        "temperature": config.effective_temperature,
        "seed": config.model.seed,
        "train": asdict(config.train),
        "device_type": _device_type(config, models),
        "decode": asdict(config.decode),
        # only when on, so runs made before the flag existed keep their fingerprint
        **({"save_embeddings": True} if config.save_embeddings else {}),
    }


def _device_type(config: ScoreConfig, models: LoadedModels | None) -> str:
    """Where the scores are computed: this process's device, or the Ray actors' for --ray."""
    if config.ray is not None:
        return "cuda" if config.ray.gpus_per_task else "cpu"
    return models.device.type if models is not None else resolve_device(config.model.device).type


@dataclass(frozen=True)
class _StaticCounts:
    samples_scored: int
    shards_resumed: int
    shards_mine: int
    executor: str
    failures: tuple[str, ...] = ()


def _score_static(config: ScoreConfig, batch_scorer: BatchScorer, progress: Progress | None,
                  early: EarlyInput | None = None) -> _StaticCounts:
    """This process's shards (all, or its --rank's share), on Ray or the local executor."""
    mine = config.partition.select(config.shards)
    pending = [shard for shard in mine if not part_path(config.out_dir, shard).exists()]
    if progress:
        progress.start(len(mine), len(mine) - len(pending))
    if config.ray is not None:

        def on_done(shard: str, rows: int) -> None:
            if progress:
                progress.advance(rows)
                progress.shard_done(rows)

        result = run_with_ray(pending, ShardWorkerFactory(config), config.ray, on_done)
        return _StaticCounts(result.total, len(mine) - len(pending), len(mine),
                             f"ray ({result.actors} actors)", result.failures)
    scored = score_local(config, batch_scorer, pending, progress, early)
    return _StaticCounts(scored, len(mine) - len(pending), len(mine), "local")


def start_decoding_early(config: ScoreConfig) -> EarlyInput | None:
    """Fork the decode workers and start reading and decoding before the models load: the
    preprocessing, tokenizer and class count are known from the architecture alone
    (:func:`~mimicfilter.mimic.models.preview_inputs`). The stream is the one the run will need
    if nothing changes while the models load (static: the shards without a part; a trajectory: a
    fresh run's first epoch); the run checks that against the loaded models and the opened run
    directory and otherwise starts its own, so the early start never changes a table."""
    if config.workers < 1 or config.ray is not None:
        return None
    inputs = preview_inputs(config.model)
    if inputs is None:
        return None
    decoder = Decoder.for_inputs(config.decode, inputs)
    pin_memory = _device_type(config, None) == "cuda"
    pool = OrderedPool(decoder.decode_chunk, config.workers)
    # --overwrite usually replaces a different run, whose results run.open then deletes
    if config.train.mode == "none":
        pending = tuple(shard for shard in config.partition.select(config.shards)
                        if config.overwrite or not part_path(config.out_dir, shard).exists())
        batches = shard_batches(pending, pool, config.batch_size, config.allow_pipe, pin_memory, config.chunk_size)
        return EarlyInput(decoder, pool, (pending, pin_memory), batches)
    if has_checkpoint(config.out_dir) and not config.overwrite:  # where it resumes is known once the run dir is open
        return EarlyInput(decoder, pool)
    fresh = StreamPosition()
    first_epoch = _epoch_batches(config, decoder)(fresh.epoch, fresh, pool, pin_memory)
    return EarlyInput(decoder, pool, (fresh, pin_memory), first_epoch)


def _epoch_batches(config: ScoreConfig, decoder: Decoder) -> EpochBatches:
    return EpochBatches(config.shards, config.model.seed, config.train.shuffle_buffer, decoder, config.batch_size,
                        config.allow_pipe, config.chunk_size)


def with_pool_lr(config: ScoreConfig) -> tuple[ScoreConfig, int | None]:
    """The config with the task's default lr where it depends on the pool's size, and the number
    of samples it was computed from (None: nothing to count). The samples are counted from the
    shards' tar headers (local files: seeking over the data; URLs and pipes: streamed once)."""
    if not config.lr_needs_pool_size:
        return config, None
    with ThreadPoolExecutor(max(1, min(16, len(config.shards)))) as readers:
        samples = sum(readers.map(lambda shard: count_shard_samples(shard, allow_pipe=config.allow_pipe), config.shards))
    lr = task_defaults(config.model.task).lr_for(config.batch_size, samples)
    return dataclasses.replace(config, train=dataclasses.replace(config.train, lr=lr)), samples


def run_score(config: ScoreConfig, progress: Progress | None = None) -> dict[str, Any]:
    """Score every shard into ``config.out_dir`` (resuming an earlier identical run); returns the stats."""
    check_decoder(config.decode, _device_type(config, None))
    run = RunDirectory(config.out_dir, "score", config.argv)
    with phase("start decoding (before the models load)"):
        early = start_decoding_early(config)
    try:
        with phase("count the pool's samples (the default lr follows them)"):
            config, pool_samples = with_pool_lr(config)
        return _run_score(config, run, progress, early, pool_samples)
    finally:
        if early is not None:  # not taken by the run (or taken and done): stop its workers
            early.close()


def _run_score(config: ScoreConfig, run: RunDirectory, progress: Progress | None, early: EarlyInput | None,
               pool_samples: int | None = None) -> dict[str, Any]:
    # With --ray the driver only validates the models and hashes the checkpoints (on CPU: the
    # head node may have no GPU); the actors load them again on their own devices.
    driver_model = config.model if config.ray is None else dataclasses.replace(config.model, device="cpu")
    with phase("models and scorer (total)"):
        batch_scorer = build_batch_scorer(driver_model, config.effective_temperature, config.save_embeddings)
    scorer = batch_scorer.scorer
    models = scorer.models
    device = str(models.device) if config.ray is None else f"ray ({_device_type(config, models)})"
    provenance = {
        "models": models.provenance,
        "scoring_route": scorer.route,
        "shared_trunk": scorer.shared_trunk,
        "temperature": config.effective_temperature,
        "batch_size": config.batch_size,
        "seed": config.model.seed,
        "train": asdict(config.train),
        # the samples the default lr was scaled to (defaults.TaskDefaults.lr_for)
        **({"lr_pool_samples": pool_samples} if pool_samples is not None else {}),
        "device": device,
        "shards": list(config.shards),
        **({"embedding": batch_scorer.embedder.space} if batch_scorer.embedder is not None else {}),
    }
    with phase("open the run directory"):
        run.open(_fingerprint(config, models), provenance, config.overwrite, concurrent=config.partition.partitioned)
    loop_started = time.time()
    counts = None
    try:
        if config.train.mode == "none":
            counts = _score_static(config, batch_scorer, progress, early)
            scored_samples, shards_resumed = counts.samples_scored, counts.shards_resumed
        else:
            batches = _epoch_batches(config, Decoder.for_models(config.decode, models))
            scored_samples = run_trajectory(batch_scorer, config.train, batches, config.out_dir, config.workers,
                                            progress, early)
            shards_resumed = None
    finally:
        if progress:
            progress.close()
    scoring = time.time() - loop_started
    stats = run.stats({
        **table_stats(config.out_dir),
        "shards": len(config.shards),
        "shards_resumed": shards_resumed,
        "samples_scored_now": scored_samples,
        "scoring_seconds": round(scoring, 3),  # reading, decoding and scoring; model loading excluded
        "samples_per_second": round(scored_samples / scoring, 2) if scored_samples else None,
        "train": config.train.mode,
        "epochs": config.train.epochs,
        "scoring_route": scorer.route,
        "device": device,
        "workers": config.workers,
        **({"startup_seconds": startup_breakdown()} if current() is not None else {}),
    })
    if counts is not None:
        stats |= {"executor": counts.executor, "shards_this_process": counts.shards_mine,
                  "rank": config.partition.rank, "world_size": config.partition.world_size}
        if config.partition.partitioned:
            write_rank_stats(config.out_dir, config.partition.rank, config.partition.world_size, stats)
        if counts.failures:
            raise MimicfilterError(
                f"{len(counts.failures)} shard(s) failed after --max-retries {config.ray.max_retries}: "
                f"{counts.failures[0]}",
                hint="re-run the same command to retry them (finished parts are kept)",
            )
        missing = sum(not part_path(config.out_dir, shard).exists() for shard in config.shards)
        if missing:  # other ranks are still working: the last one to finish marks the run done
            return stats | {"shards_missing": missing}
    return run.finish(stats)
