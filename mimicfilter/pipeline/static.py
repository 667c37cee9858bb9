"""Static scoring (``--train none``) and ``embed``: every shard on its own, one part per shard.

:func:`score_shard` is the pure, idempotent unit of work (one shard → one part; a part that exists
is done); :class:`ShardWorkerFactory` hands it to any executor (Ray actors, other machines).
:func:`score_static` runs this process's shards on Ray or the local executor, whose loop
:func:`local_shard_rows` is shared by ``score`` and ``embed``: this process reads the shards in
order, worker processes decode chunks of them (any idle worker takes the next chunk, results come
back in order: :mod:`mimicfilter.pipeline.stream`), and this process scores the batches and gets
each shard's rows as soon as the shard is complete.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import torch

from mimicfilter.execute.local import OrderedPool
from mimicfilter.execute.ray import run_with_ray
from mimicfilter.pipeline.anchors import AnchorPlan
from mimicfilter.pipeline.batch_scorer import BatchScorer, build_batch_scorer
from mimicfilter.pipeline.batches import Batch
from mimicfilter.pipeline.config import Progress, ScoreConfig, StreamConfig
from mimicfilter.pipeline.decoder import Decoder
from mimicfilter.pipeline.stream import EarlyStart, ShardStream, open_input
from mimicfilter.store.parts import write_part
from mimicfilter.store.paths import part_path
from mimicfilter.store.rundir import unfinish_for
from mimicfilter.store.schema import rows_to_table


def shard_stream(config: StreamConfig, shards: Iterable[str], device_type: str,
                 anchors: AnchorPlan | None = None) -> ShardStream:
    """The batches of ``shards`` for a run of ``config`` scoring on ``device_type`` (``score``'s
    early start and its run both ask for theirs here, so equal inputs give equal streams)."""
    return ShardStream(tuple(shards), config.batch_size, config.allow_pipe, device_type, config.chunk_size, anchors)


def pending_shards(config: ScoreConfig, redo_finished: bool = False) -> list[str]:
    """This process's shards (all, or its --rank's share) without a part yet (``redo_finished``: all of them)."""
    mine = config.partition.select(config.shards)
    return [shard for shard in mine if redo_finished or not part_path(config.out_dir, shard).exists()]


def score_shard(shard: str, batch_scorer: BatchScorer, config: ScoreConfig) -> int:
    """Score one shard into its part file (skipped when the part exists); returns the row count.

    Pure and idempotent: the part depends only on the shard and the config, so any executor may
    call it, retry it, or run it on another machine.
    """
    path = part_path(config.out_dir, shard)
    if path.exists():
        return 0
    rows = []
    decoder = Decoder.for_models(config.decode, batch_scorer.scorer.models)
    stream = ShardStream((shard,), config.batch_size, config.allow_pipe, anchors=config.anchors)
    for batch in stream.batches(OrderedPool(decoder.decode_chunk, 0)):
        rows.extend(batch_scorer.score(decoder.decode_on_device(batch, batch_scorer.scorer.models.device)))
    write_part(rows_to_table(rows, embedding_dim=batch_scorer.embedding_dim), path)
    return len(rows)


@dataclass(frozen=True)
class ShardWorkerFactory:
    """A picklable worker factory for executors: builds the models once, then scores shard after shard."""

    config: ScoreConfig

    def __call__(self) -> Callable[[str], int]:
        config = self.config
        if config.ray is not None and not config.ray.gpus_per_task:  # never touch a GPU Ray did not assign
            config = dataclasses.replace(config, model=dataclasses.replace(config.model, device="cpu"))
        batch_scorer = build_batch_scorer(config.model, config.effective_temperature, config.save_embeddings)
        return functools.partial(score_shard, batch_scorer=batch_scorer, config=config)


@dataclass(frozen=True)
class ShardRows:
    shard: str
    rows: list[dict[str, Any]]


def local_shard_rows(batches: Iterator[Batch], decoder: Decoder, device: torch.device,
                     rows_of_batch: Callable[[Batch], list[dict[str, Any]]],
                     progress: Progress | None) -> Iterator[ShardRows]:
    """Every finished shard's rows, shards in order, from a per-shard stream's ``batches``.

    Memory is flat in the number of shards: the pool keeps a bounded number of chunks in flight,
    and rows are kept only for the shard being scored until the caller writes them.
    """
    rows: list[dict[str, Any]] = []
    for batch in batches:
        batch_rows = rows_of_batch(decoder.decode_on_device(batch, device))
        rows.extend(batch_rows)
        if progress:
            progress.advance(len(batch_rows))
        if batch.last:
            finished, rows = ShardRows(batch.shard, rows), []
            yield finished
            if progress:
                progress.shard_done(len(finished.rows))


@dataclass(frozen=True)
class StaticCounts:
    samples_scored: int
    shards_resumed: int
    shards_mine: int
    executor: str
    failures: tuple[str, ...] = ()


def score_static(config: ScoreConfig, batch_scorer: BatchScorer, progress: Progress | None,
                 early: EarlyStart | None = None) -> StaticCounts:
    """This process's shards (all, or its --rank's share), one part each, on Ray or the local
    executor (``early``: the pool and stream started before the models loaded, taken if they fit)."""
    mine = config.partition.select(config.shards)
    pending = pending_shards(config)
    unfinish_for(config.out_dir, pending)
    if progress:
        progress.start(len(mine), len(mine) - len(pending))
    if config.ray is not None:

        def on_done(shard: str, rows: int) -> None:
            if progress:
                progress.advance(rows)
                progress.shard_done(rows)

        result = run_with_ray(pending, ShardWorkerFactory(config), config.ray, on_done)
        return StaticCounts(result.total, len(mine) - len(pending), len(mine),
                            f"ray ({result.actors} actors)", result.failures)
    models = batch_scorer.scorer.models
    decoder = Decoder.for_models(config.decode, models)
    pool, batches = open_input(decoder, shard_stream(config, pending, models.device.type, config.anchors),
                               config.workers, early)
    scored = 0
    with pool:
        for finished in local_shard_rows(batches, decoder, models.device, batch_scorer.score, progress):
            write_part(rows_to_table(finished.rows, embedding_dim=batch_scorer.embedding_dim),
                       part_path(config.out_dir, finished.shard))
            scored += len(finished.rows)
    return StaticCounts(scored, len(mine) - len(pending), len(mine), "local")
