"""Static scoring (``--train none``) and ``embed``: every shard on its own, one part per shard.

:func:`score_shard` is the pure, idempotent unit of work (one shard → one part; a part that exists
is done); :class:`ShardWorkerFactory` hands it to any executor (Ray actors, other machines).
:func:`local_shard_rows` is the local executor's loop, shared by ``score`` and ``embed``: worker
processes read and decode whole shards, this process scores their batches and gets each shard's
rows as soon as the shard is complete.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from mimicfilter.execute.local import fan_out
from mimicfilter.pipeline.batch_scorer import BatchScorer, build_batch_scorer
from mimicfilter.pipeline.batches import Batch
from mimicfilter.pipeline.config import Progress, ScoreConfig
from mimicfilter.pipeline.stages import Decoder, ShardBatches
from mimicfilter.store.parts import part_path, write_part
from mimicfilter.store.schema import rows_to_table


def shard_reader(config: ScoreConfig, batch_scorer: BatchScorer) -> ShardBatches:
    return ShardBatches(Decoder.for_models(config.decode, batch_scorer.scorer.models), config.batch_size,
                        config.allow_pipe)


def score_shard(shard: str, batch_scorer: BatchScorer, config: ScoreConfig) -> int:
    """Score one shard into its part file (skipped when the part exists); returns the row count.

    Pure and idempotent: the part depends only on the shard and the config, so any executor may
    call it, retry it, or run it on another machine.
    """
    path = part_path(config.out_dir, shard)
    if path.exists():
        return 0
    rows = []
    for batch in shard_reader(config, batch_scorer)(shard):
        rows.extend(batch_scorer.score(batch))
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


def local_shard_rows(shards: list[str], reader: ShardBatches, rows_of_batch: Callable[[Batch], list[dict[str, Any]]],
                     workers: int, pin_memory: bool, progress: Progress | None) -> Iterator[ShardRows]:
    """Every finished shard's rows: worker processes read and decode, this process makes the rows.

    Memory is flat in the number of shards: the loader holds a bounded prefetch queue, and rows are
    kept only for the shards being read now (at most one per worker) until the caller writes them.
    """
    rows_by_shard: dict[str, list[dict[str, Any]]] = {}
    for batch in fan_out(shards, reader, workers, pin_memory):
        rows = rows_of_batch(batch)
        rows_by_shard.setdefault(batch.shard, []).extend(rows)
        if progress:
            progress.advance(len(rows))
        if batch.last:
            finished = ShardRows(batch.shard, rows_by_shard.pop(batch.shard))
            yield finished
            if progress:
                progress.shard_done(len(finished.rows))


def score_local(config: ScoreConfig, batch_scorer: BatchScorer, pending: list[str], progress: Progress | None) -> int:
    """The local executor: one part per finished shard; returns the rows scored."""
    reader = shard_reader(config, batch_scorer)
    pin_memory = batch_scorer.scorer.models.device.type == "cuda"
    scored = 0
    for finished in local_shard_rows(pending, reader, batch_scorer.score, config.workers, pin_memory, progress):
        write_part(rows_to_table(finished.rows, embedding_dim=batch_scorer.embedding_dim),
                   part_path(config.out_dir, finished.shard))
        scored += len(finished.rows)
    return scored
