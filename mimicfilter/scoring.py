"""The ``score`` pipeline: shards → decoded samples → batches → scores → Parquet parts.

Stages are composed here and nowhere else:

    read (shards.iter_shard_samples) → decode (decode.decode_sample) → batch (batches.group_batches)
        → score (scorer.MimicScorer [+ proxy update]) → write (tables.write_part, atomic)

Static mode (``--train none``): :func:`score_shard` is the pure, idempotent unit of work (one shard
→ one part) for any executor; :func:`run_score`'s local executor has DataLoader workers read and
decode whole shards in parallel while the main process scores, and writes each part as soon as its
shard is complete. Trajectory mode (``--train head|full``) is one ordered stream per epoch; see
:mod:`mimicfilter.trajectory`.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from mimicfilter import __version__
from mimicfilter.batches import group_batches
from mimicfilter.decode import DecodeConfig, decode_sample
from mimicfilter.errors import MimicfilterError
from mimicfilter.executors import Partition, RayConfig, score_with_ray
from mimicfilter.models import LoadedModels, ModelSpec, load_models, resolve_device
from mimicfilter.rundir import SCORES_DIR, finish_run_dir, prepare_run_dir, write_rank_stats
from mimicfilter.scorer import BatchScores, MimicScorer, make_scorer
from mimicfilter.shards import iter_shard_samples, part_name
from mimicfilter.storage import is_remote
from mimicfilter.tables import rows_to_table, table_stats, write_part
from mimicfilter.trajectory import TrainConfig, run_trajectory

DEFAULT_TEMPERATURE = {"contrastive": 0.05, "classify": 1.0}


@dataclass(frozen=True)
class ScoreConfig:
    """Everything ``mimicfilter score`` needs; validated once, up front."""

    shards: tuple[str, ...]
    out_dir: Path
    model: ModelSpec
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    batch_size: int = 256
    workers: int = 0
    temperature: float | None = None
    train: TrainConfig = field(default_factory=lambda: TrainConfig(mode="none"))
    allow_pipe: bool = False
    overwrite: bool = False
    argv: tuple[str, ...] = ()
    partition: Partition = field(default_factory=Partition)
    ray: RayConfig | None = None  # None: the local executor
    save_embeddings: bool = False  # also store the initial proxy's image embedding (mimicfilter.embed)

    def __post_init__(self):
        if not self.shards:
            raise MimicfilterError("no shards to score", hint="pass shard files, a directory, a pattern or @list.txt")
        if self.batch_size < 2:
            raise MimicfilterError(f"--batch-size {self.batch_size}: need at least 2 (the loss contrasts pairs)")
        if self.workers < 0:
            raise MimicfilterError(f"--workers {self.workers}: must be 0 or more")
        if self.temperature is not None and not self.temperature > 0:
            raise MimicfilterError(f"--temperature {self.temperature}: must be positive")
        if self.decode.task != self.model.task:
            raise MimicfilterError(f"decoding for {self.decode.task!r} but models for {self.model.task!r}")
        if (self.ray is not None or self.partition.partitioned) and self.train.mode != "none":
            raise MimicfilterError(
                f"--train {self.train.mode} is one ordered stream and cannot be split over shards",
                hint="use --train none with --ray or --rank/--world-size (or score a subset and `extrapolate`)",
            )
        if is_remote(self.out_dir) and self.train.mode != "none":
            raise MimicfilterError(
                f"--out {self.out_dir}: trajectory runs (checkpoints, resume) need a local or mounted directory",
                hint="use a local --out, or --train none for a remote run directory",
            )
        if self.partition.partitioned and self.overwrite:
            raise MimicfilterError(
                "--overwrite with --world-size > 1 would let one rank delete the others' parts",
                hint="empty the run directory once before launching the ranks",
            )

    @property
    def effective_temperature(self) -> float:
        return self.temperature if self.temperature is not None else DEFAULT_TEMPERATURE[self.decode.task]


class Progress(Protocol):
    """What the pipeline reports while it runs (the CLI draws a bar from it)."""

    def start(self, total: int, done: int, unit: str = "shards") -> None: ...

    def advance(self, samples: int) -> None: ...

    def shard_done(self, samples: int) -> None: ...

    def close(self) -> None: ...


def part_path(run_dir: Path, shard: str) -> Path:
    return run_dir / SCORES_DIR / f"{part_name(shard)}.parquet"


def _tokenize(tokenizer: Callable, caption: str) -> torch.Tensor:
    return tokenizer([caption])[0]


def detect_task(shards: tuple[str, ...], decode: DecodeConfig, allow_pipe: bool, sample_limit: int = 16) -> str:
    """``classify`` when the first readable samples carry a label and no caption, else ``contrastive``."""
    text_ext = "json" if decode.json_field else decode.text_key.lower()
    for shard in shards[:2]:
        for raw in itertools.islice(iter_shard_samples(shard, allow_pipe=allow_pipe), sample_limit):
            files = raw["files"]
            if raw["status"] == "ok" and files:
                has_label, has_text = decode.label_key in files, text_ext in files
                return "classify" if has_label and not has_text else "contrastive"
    return "contrastive"


def make_tokenize(decode_config: DecodeConfig, tokenizer: Callable) -> Callable | None:
    """A picklable caption → token-ids function (for DataLoader workers); None for classification."""
    return functools.partial(_tokenize, tokenizer) if decode_config.task == "contrastive" else None


def shard_batches(
    shard: str, decode_config: DecodeConfig, preprocess: Callable, tokenizer: Callable, batch_size: int, allow_pipe: bool
) -> Iterator[dict[str, Any]]:
    """read → decode → batch for one shard."""
    tokenize = make_tokenize(decode_config, tokenizer)
    raw_samples = iter_shard_samples(shard, allow_pipe=allow_pipe)
    decoded = (decode_sample(raw, decode_config, preprocess, tokenize) for raw in raw_samples)
    yield from group_batches(decoded, batch_size, shard)


class _ShardBatches(IterableDataset):
    """Each DataLoader worker reads whole shards (every ``num_workers``-th one) and yields batches."""

    def __init__(self, shards: list[str], decode_config, preprocess, tokenizer, batch_size: int, allow_pipe: bool):
        self.shards = shards
        self.arguments = (decode_config, preprocess, tokenizer, batch_size, allow_pipe)

    def __iter__(self):
        worker = get_worker_info()
        mine = self.shards if worker is None else self.shards[worker.id :: worker.num_workers]
        for shard in mine:
            yield from shard_batches(shard, *self.arguments)


def batch_rows(batch: dict[str, Any], scores: BatchScores | None, epoch: int = 0) -> list[dict[str, Any]]:
    """One output row per sample of the batch; samples that are not ok get null scores."""
    rows = []
    ok_position = 0
    for meta in batch["rows"]:
        row = {**meta, "epoch": epoch, "step": batch["step"]}
        if meta["status"] == "ok" and scores is not None:
            for column in ("mimic_score", "mimic_weight", "loss", "clip_score", "ref_loss"):
                values = getattr(scores, column)
                row[column] = None if values is None else float(values[ok_position])
            if scores.embedding is not None:
                row["embedding"] = scores.embedding[ok_position].numpy()
            ok_position += 1
        rows.append(row)
    return rows


def batch_targets(batch: dict[str, Any]) -> torch.Tensor:
    """Token ids for image–text batches, labels for classification batches."""
    return batch["texts"] if batch["texts"] is not None else batch["labels"]


def score_batch(scorer: MimicScorer, batch: dict[str, Any]) -> list[dict[str, Any]]:
    scores = scorer.score(batch["images"], batch_targets(batch)) if batch["images"] is not None else None
    return batch_rows(batch, scores)


def score_shard(shard: str, scorer: MimicScorer, config: ScoreConfig) -> int:
    """Score one shard into its part file (skipped when the part exists); returns the row count.

    Pure and idempotent: the part depends only on the shard and the config, so any executor may
    call it, retry it, or run it on another machine.
    """
    path = part_path(config.out_dir, shard)
    if path.exists():
        return 0
    models = scorer.models
    rows = []
    for batch in shard_batches(
        shard, decode_config_for(config.decode, models), models.preprocess, models.tokenizer, config.batch_size, config.allow_pipe
    ):
        rows.extend(score_batch(scorer, batch))
    write_part(rows_to_table(rows, embedding_dim=scorer.embedding_dim), path)
    return len(rows)


def decode_config_for(decode: DecodeConfig, models: LoadedModels) -> DecodeConfig:
    """The decode config with what only the models know: the number of classes of the head."""
    if models.task != "classify":
        return decode
    return dataclasses.replace(decode, num_classes=models.reference.head.out_features)


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


def _device_type(config: ScoreConfig, models: LoadedModels) -> str:
    """Where the scores are computed: this process's device, or the Ray actors' for --ray."""
    if config.ray is not None:
        return "cuda" if config.ray.gpus_per_task else "cpu"
    return models.device.type


def build_scorer(config: ScoreConfig) -> MimicScorer:
    device = resolve_device(config.model.device)
    torch.manual_seed(config.model.seed)
    models = load_models(dataclasses.replace(config.model, device=str(device)))
    autocast = torch.bfloat16 if device.type == "cuda" else None
    scorer = make_scorer(models, config.effective_temperature, autocast_dtype=autocast)
    if config.save_embeddings:
        from mimicfilter.embed import with_embeddings

        scorer = with_embeddings(scorer, config.train.mode, autocast)
    return scorer


def run_score(config: ScoreConfig, progress: Progress | None = None) -> dict[str, Any]:
    """Score every shard into ``config.out_dir`` (resuming an earlier identical run); returns the stats."""
    started = time.time()
    # With --ray the driver only validates the models and hashes the checkpoints (on CPU: the
    # head node may have no GPU); the actors load them again on their own devices.
    driver_config = config if config.ray is None else dataclasses.replace(
        config, model=dataclasses.replace(config.model, device="cpu")
    )
    scorer = build_scorer(driver_config)
    models = scorer.models
    provenance = {
        "mimicfilter_version": __version__,
        "argv": list(config.argv) or sys.argv,
        "models": models.provenance,
        "scoring_route": scorer.route,
        "shared_trunk": scorer.shared_trunk,
        "temperature": config.effective_temperature,
        "batch_size": config.batch_size,
        "seed": config.model.seed,
        "train": asdict(config.train),
        "device": str(models.device) if config.ray is None else f"ray ({_device_type(config, models)})",
        "shards": list(config.shards),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **({"embedding": scorer.embedding_space} if config.save_embeddings else {}),
    }
    run_dir = config.out_dir
    prepare_run_dir(run_dir, _fingerprint(config, models), provenance, config.overwrite,
                    concurrent=config.partition.partitioned)
    loop_started = time.time()
    try:
        if config.train.mode == "none":
            counts = _score_static(config, scorer, progress)
            scored_samples, shards_resumed = counts.samples_scored, counts.shards_resumed
        else:
            scored_samples = run_trajectory(
                scorer,
                config.train,
                shards=config.shards,
                run_dir=run_dir,
                decode_config=decode_config_for(config.decode, models),
                tokenize=make_tokenize(config.decode, models.tokenizer),
                batch_size=config.batch_size,
                seed=config.model.seed,
                workers=config.workers,
                allow_pipe=config.allow_pipe,
                rows_of_batch=batch_rows,
                progress=progress,
            )
            shards_resumed = None
    finally:
        if progress:
            progress.close()
    finished = time.time()
    wall, scoring = finished - started, finished - loop_started
    stats = {
        **table_stats(run_dir),
        "shards": len(config.shards),
        "shards_resumed": shards_resumed,
        "samples_scored_now": scored_samples,
        "wall_seconds": round(wall, 3),
        "scoring_seconds": round(scoring, 3),  # reading, decoding and scoring; model loading excluded
        "samples_per_second": round(scored_samples / scoring, 2) if scored_samples else None,
        "train": config.train.mode,
        "epochs": config.train.epochs,
        "scoring_route": scorer.route,
        "device": provenance["device"],
        "workers": config.workers,
        "run_dir": str(run_dir),
        "cpu_count": os.cpu_count(),
    }
    if config.train.mode == "none":
        stats |= {"executor": counts.executor, "shards_this_process": counts.shards_mine,
                  "rank": config.partition.rank, "world_size": config.partition.world_size}
        if config.partition.partitioned:
            write_rank_stats(run_dir, config.partition.rank, config.partition.world_size, stats)
        if counts.failures:
            raise MimicfilterError(
                f"{len(counts.failures)} shard(s) failed after --max-retries {config.ray.max_retries}: "
                f"{counts.failures[0]}",
                hint="re-run the same command to retry them (finished parts are kept)",
            )
        missing = sum(not part_path(run_dir, shard).exists() for shard in config.shards)
        if missing:  # other ranks are still working: the last one to finish marks the run done
            return stats | {"shards_missing": missing}
    finish_run_dir(run_dir, stats)
    return stats


@dataclass(frozen=True)
class _StaticCounts:
    samples_scored: int
    shards_resumed: int
    shards_mine: int
    executor: str
    failures: tuple[str, ...] = ()


def _score_static(config: ScoreConfig, scorer: MimicScorer, progress: Progress | None) -> _StaticCounts:
    """This process's shards (all, or its --rank's share), on Ray or the local executor."""
    mine = config.partition.select(config.shards)
    pending = [shard for shard in mine if not part_path(config.out_dir, shard).exists()]
    if progress:
        progress.start(len(mine), len(mine) - len(pending))
    if config.ray is not None:
        result = score_with_ray(config, pending, progress)
        return _StaticCounts(result.samples_scored, len(mine) - len(pending), len(mine),
                             f"ray ({result.actors} actors)", result.failures)
    scored = _score_local(config, scorer, pending, progress)
    return _StaticCounts(scored, len(mine) - len(pending), len(mine), "local")


@dataclass(frozen=True)
class LocalBatches:
    """What the local executor needs to read pending shards in DataLoader workers."""

    shards: list[str]
    decode: DecodeConfig
    preprocess: Callable
    tokenizer: Callable
    batch_size: int
    workers: int
    allow_pipe: bool
    pin_memory: bool


@dataclass(frozen=True)
class ShardRows:
    shard: str
    rows: list[dict[str, Any]]


def local_shard_rows(
    source: LocalBatches, rows_of_batch: Callable[[dict[str, Any]], list[dict[str, Any]]], progress: Progress | None
) -> Iterator[ShardRows]:
    """The local executor's loop, shared by ``score`` and ``embed``: every finished shard's rows.

    DataLoader workers read and decode whole shards; this process turns batches into rows. Memory
    is flat in the number of shards: the loader holds a bounded prefetch queue, and rows are kept
    only for the shards being read now (at most one per worker) until the caller writes them.
    """
    dataset = _ShardBatches(
        source.shards, source.decode, source.preprocess, source.tokenizer, source.batch_size, source.allow_pipe
    )
    loader = DataLoader(
        dataset, batch_size=None, num_workers=min(source.workers, len(source.shards)), pin_memory=source.pin_memory
    )
    rows_by_shard: dict[str, list[dict[str, Any]]] = {}
    for batch in loader:
        rows = rows_of_batch(batch)
        rows_by_shard.setdefault(batch["shard"], []).extend(rows)
        if progress:
            progress.advance(len(rows))
        if batch["last"]:
            finished = ShardRows(batch["shard"], rows_by_shard.pop(batch["shard"]))
            yield finished
            if progress:
                progress.shard_done(len(finished.rows))


def _score_local(config: ScoreConfig, scorer: MimicScorer, pending: list[str], progress: Progress | None) -> int:
    """The local executor: one part per finished shard; returns the rows scored."""
    models = scorer.models
    source = LocalBatches(
        pending, decode_config_for(config.decode, models), models.preprocess, models.tokenizer, config.batch_size,
        config.workers, config.allow_pipe, pin_memory=models.device.type == "cuda",
    )
    embedding_dim = scorer.embedding_dim
    scored_samples = 0
    for finished in local_shard_rows(source, functools.partial(score_batch, scorer), progress):
        write_part(rows_to_table(finished.rows, embedding_dim=embedding_dim), part_path(config.out_dir, finished.shard))
        scored_samples += len(finished.rows)
    return scored_samples
