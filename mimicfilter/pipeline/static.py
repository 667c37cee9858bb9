"""Static scoring (``--train none``) and ``embed``: every shard on its own, one part per shard.

:func:`score_shard` is the pure, idempotent unit of work (one shard → one part; a part that exists
is done); :class:`ShardWorkerFactory` hands it to any executor (Ray actors, other machines).
:func:`local_shard_rows` is the local executor's loop, shared by ``score`` and ``embed``: this
process reads the shards in order, worker processes decode chunks of them (any idle worker takes
the next chunk, results come back in order: :mod:`mimicfilter.pipeline.stages`), and this process
scores the batches and gets each shard's rows as soon as the shard is complete.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch

from mimicfilter.pipeline.batch_scorer import BatchScorer, build_batch_scorer
from mimicfilter.pipeline.batches import Batch
from mimicfilter.pipeline.config import Progress, ScoreConfig
from mimicfilter.pipeline.stages import CHUNK_SIZE, Decoder, EarlyInput, ShardBatches, input_pool, shard_batches
from mimicfilter.store.parts import write_part
from mimicfilter.store.paths import part_path
from mimicfilter.store.schema import rows_to_table


def shard_decoder(config: ScoreConfig, batch_scorer: BatchScorer) -> Decoder:
    return Decoder.for_models(config.decode, batch_scorer.scorer.models)


def score_shard(shard: str, batch_scorer: BatchScorer, config: ScoreConfig) -> int:
    """Score one shard into its part file (skipped when the part exists); returns the row count.

    Pure and idempotent: the part depends only on the shard and the config, so any executor may
    call it, retry it, or run it on another machine.
    """
    path = part_path(config.out_dir, shard)
    if path.exists():
        return 0
    rows = []
    decoder = shard_decoder(config, batch_scorer)
    for batch in ShardBatches(decoder, config.batch_size, config.allow_pipe)(shard):
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


def local_shard_rows(shards: list[str], decoder: Decoder, rows_of_batch: Callable[[Batch], list[dict[str, Any]]],
                     batch_size: int, allow_pipe: bool, workers: int, device: torch.device,
                     progress: Progress | None, chunk_size: int = CHUNK_SIZE,
                     early: EarlyInput | None = None) -> Iterator[ShardRows]:
    """Every finished shard's rows, shards in order: ``workers`` processes decode, this one makes the rows.

    Memory is flat in the number of shards: the pool keeps a bounded number of chunks in flight,
    and rows are kept only for the shard being scored until the caller writes them. ``early``: the
    pool and stream started before the models loaded, used when they are exactly these.
    """
    rows: list[dict[str, Any]] = []
    pin_memory = device.type == "cuda"
    pool, batches = input_pool(early, decoder, (tuple(shards), pin_memory), workers)
    with pool:
        if batches is None:
            batches = shard_batches(shards, pool, batch_size, allow_pipe, pin_memory, chunk_size)
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


def score_local(config: ScoreConfig, batch_scorer: BatchScorer, pending: list[str], progress: Progress | None,
                early: EarlyInput | None = None) -> int:
    """The local executor: one part per finished shard; returns the rows scored."""
    scored = 0
    for finished in local_shard_rows(pending, shard_decoder(config, batch_scorer), batch_scorer.score,
                                     config.batch_size, config.allow_pipe, config.workers,
                                     batch_scorer.scorer.models.device, progress, config.chunk_size, early):
        write_part(rows_to_table(finished.rows, embedding_dim=batch_scorer.embedding_dim),
                   part_path(config.out_dir, finished.shard))
        scored += len(finished.rows)
    return scored
