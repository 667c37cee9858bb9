"""``mimicfilter score``: shards → decoded samples → batches → scores → Parquet parts, resumable.

    read (shards.samples) → decode (pipeline.decoder) → batch (pipeline.batches)   pipeline.stream
        → score (mimic scorer [+ proxy update]) → rows (pipeline.batch_scorer)
        → write (store.parts.write_part, atomic)

Static mode (``--train none``, :mod:`~mimicfilter.pipeline.static`): one part per shard, on the local
executor, a ``--rank`` share, or Ray actors. Trajectory mode (``--train head|full``,
:mod:`~mimicfilter.pipeline.trajectory`): one ordered stream per epoch while the proxy learns.
Reading and decoding start before the models load (:func:`start_decoding_early`).
"""

from __future__ import annotations

import dataclasses
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from typing import Any

from mimicfilter.defaults import task_defaults
from mimicfilter.errors import MimicfilterError
from mimicfilter.mimic.device import resolve_device
from mimicfilter.mimic.models import LoadedModels, preview_inputs
from mimicfilter.pipeline.anchors import plan_anchors
from mimicfilter.pipeline.batch_scorer import BatchScorer, build_batch_scorer
from mimicfilter.pipeline.config import Progress, ScoreConfig, use_threads
from mimicfilter.pipeline.decoder import Decoder, check_decoder
from mimicfilter.pipeline.static import StaticCounts, pending_shards, score_static, shard_stream
from mimicfilter.pipeline.stream import EarlyStart, Stream
from mimicfilter.pipeline.trajectory import StreamPosition, epoch_stream, has_checkpoint, run_trajectory
from mimicfilter.shards.samples import count_shard_samples
from mimicfilter.store.guard import guard_run_directory
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
        **({"anchors": config.anchors.provenance()} if config.anchors is not None else {}),
    }


def _provenance(config: ScoreConfig, batch_scorer: BatchScorer, device: str, pool_samples: int | None) -> dict[str, Any]:
    scorer = batch_scorer.scorer
    return {
        "models": scorer.models.provenance,
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
        **({"anchors": config.anchors.provenance()} if config.anchors is not None else {}),
    }


def _device_type(config: ScoreConfig, models: LoadedModels | None) -> str:
    """Where the scores are computed: this process's device, or the Ray actors' for --ray."""
    if config.ray is not None:
        return "cuda" if config.ray.gpus_per_task else "cpu"
    return models.device.type if models is not None else resolve_device(config.model.device).type


def start_decoding_early(config: ScoreConfig) -> EarlyStart | None:
    """Fork the decode workers and start reading and decoding before the models load: the
    preprocessing, tokenizer and class count are known from the architecture alone
    (:func:`~mimicfilter.mimic.models.preview_inputs`). The run takes the early stream only if it
    is the one it needs once the models are loaded and the run directory is open (else it starts
    its own: :func:`~mimicfilter.pipeline.stream.open_input`), so the early start never changes a table."""
    if config.workers < 1 or config.ray is not None:
        return None
    inputs = preview_inputs(config.model)
    if inputs is None:
        return None
    return EarlyStart.begin(Decoder.for_inputs(config.decode, inputs), config.workers, _expected_stream(config))


def _expected_stream(config: ScoreConfig) -> Stream | None:
    """The stream the run will need if nothing changes while the models load (static: the shards
    without a part; a trajectory: a fresh run's first epoch); None when it cannot be known yet."""
    device_type = _device_type(config, None)
    if config.train.mode == "none":
        # --overwrite usually replaces a different run, whose results run.open then deletes
        return shard_stream(config, pending_shards(config, redo_finished=config.overwrite), device_type, config.anchors)
    if has_checkpoint(config.out_dir) and not config.overwrite:  # where it resumes is known once the run dir is open
        return None
    return epoch_stream(config, StreamPosition(), device_type)


def with_anchors(config: ScoreConfig) -> ScoreConfig:
    """The config with its anchor plan (``--trusted``: read and counted now, before any model loads)."""
    if not config.trusted or config.anchors is not None:
        return config
    plan = plan_anchors(config.trusted, config.shards, config.decode, config.model.seed, config.synthetic_share,
                        config.allow_pipe)
    return dataclasses.replace(config, anchors=plan)


def with_pool_lr(config: ScoreConfig) -> tuple[ScoreConfig, int | None]:
    """The config with the task's default lr where it depends on the pool's size, and the number
    of samples it was computed from (None: nothing to count). The samples are counted from the
    shards' tar headers (local plain tars: seeking over the data; compressed files, URLs and pipes: streamed once)."""
    if not config.lr_needs_pool_size:
        return config, None
    with ThreadPoolExecutor(max(1, min(16, len(config.shards)))) as readers:
        samples = sum(readers.map(lambda shard: count_shard_samples(shard, allow_pipe=config.allow_pipe), config.shards))
    lr = task_defaults(config.model.task).lr_for(config.batch_size, samples)
    return dataclasses.replace(config, train=dataclasses.replace(config.train, lr=lr)), samples


def run_score(config: ScoreConfig, progress: Progress | None = None) -> dict[str, Any]:
    """Score every shard into ``config.out_dir`` (resuming an earlier identical run); returns the stats."""
    use_threads(config)
    check_decoder(config.decode, _device_type(config, None))
    run = RunDirectory(config.out_dir, "score", config.argv)
    spec = config.model
    guard_run_directory(config.out_dir, config.shards + config.trusted,
                        (spec.model, spec.reference, spec.proxy, spec.reference_head, spec.classnames))
    with phase("read the trusted samples, plan the anchors"):
        config = with_anchors(config)
    with phase("start decoding (before the models load)"):
        early = start_decoding_early(config)
    try:
        with phase("count the pool's samples (the default lr follows them)"):
            config, pool_samples = with_pool_lr(config)
        return _run_score(config, run, progress, early, pool_samples)
    finally:
        if early is not None:  # not taken by the run (or taken and done): stop its workers
            early.close()


def _run_score(config: ScoreConfig, run: RunDirectory, progress: Progress | None, early: EarlyStart | None,
               pool_samples: int | None = None) -> dict[str, Any]:
    # With --ray the driver only validates the models and hashes the checkpoints (on CPU: the
    # head node may have no GPU); the actors load them again on their own devices.
    driver_model = config.model if config.ray is None else dataclasses.replace(config.model, device="cpu")
    with phase("models and scorer (total)"):
        batch_scorer = build_batch_scorer(driver_model, config.effective_temperature, config.save_embeddings)
    models = batch_scorer.scorer.models
    device = str(models.device) if config.ray is None else f"ray ({_device_type(config, models)})"
    with phase("open the run directory"):
        run.open(_fingerprint(config, models), _provenance(config, batch_scorer, device, pool_samples),
                 config.overwrite, concurrent=config.partition.partitioned)
    loop_started = time.time()
    counts = None
    try:
        if config.train.mode == "none":
            counts = score_static(config, batch_scorer, progress, early)
            scored_samples, shards_resumed = counts.samples_scored, counts.shards_resumed
        else:
            scored_samples, shards_resumed = run_trajectory(config, batch_scorer, progress, early), None
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
        "scoring_route": batch_scorer.scorer.route,
        "device": device,
        "workers": config.workers,
        **({"startup_seconds": startup_breakdown()} if current() is not None else {}),
    })
    return run.finish(stats) if counts is None else _finish_static(config, run, counts, stats)


def _finish_static(config: ScoreConfig, run: RunDirectory, counts: StaticCounts, stats: dict[str, Any]) -> dict[str, Any]:
    """A static run's closing stats; the run is finished by the rank that finds every part written."""
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
