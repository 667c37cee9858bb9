"""Grad-Mimic stage 1: score every sample while the proxy learns (``--train head|full``).

One ordered stream per epoch: the shards in order, through a seeded shuffle buffer, decoded and
cut into batches of ``batch_size`` ok samples (batches span shards here; the tail rule of
:mod:`mimicfilter.pipeline.batches` applies at the epoch's end). Each batch is scored at the current proxy,
then the proxy takes one AdamW step on the re-weighted loss. Rows record the epoch and the global
step at which each sample was seen.

Decoding runs in ``workers`` processes with the stream's order kept: this process reads the
shards, shuffles, skips what a resumed run already consumed, and hands chunks of raw samples to the
pool, whose results come back in submission order (:mod:`mimicfilter.pipeline.stream`). Batch
boundaries, tables and resume are the same for any worker count.

Resume: every ``checkpoint_every`` steps and at each epoch end, the rows since the previous
checkpoint are written as a part (``scores/epoch-EEEE-chunk-CCCCC.parquet``) and then the proxy,
the optimizer and the stream position are saved (``checkpoints/latest.pt``, atomically; these names
are spelled in :mod:`mimicfilter.store.paths`). A re-run loads that checkpoint, skips the samples
of the stream it had consumed (raw bytes are re-read but not decoded), and continues; the parts it
rewrites are byte-for-byte what the killed run would have written, so the finished table equals
an uninterrupted run's (CPU, same seed).
"""

from __future__ import annotations

import io
import itertools
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch

from mimicfilter.execute.local import OrderedPool
from mimicfilter.mimic.scorer import MimicScorer
from mimicfilter.pipeline.anchors import AnchorPlan, pool_with_anchors
from mimicfilter.pipeline.batch_scorer import BatchScorer
from mimicfilter.pipeline.batches import Batch, group_batches
from mimicfilter.pipeline.config import Progress, ScoreConfig, TrainConfig
from mimicfilter.pipeline.decoder import Decoder
from mimicfilter.pipeline.stream import (CHUNK_SIZE, EarlyStart, decoded_samples, open_input, pins_memory, raw_stream,
                                         stream_chunks)
from mimicfilter.shards.records import RawSample
from mimicfilter.store.atomic import atomic_write_bytes
from mimicfilter.store.parts import write_part
from mimicfilter.store.paths import epoch_checkpoint_path, latest_checkpoint_path, trajectory_part_path
from mimicfilter.store.schema import rows_to_table


@dataclass(frozen=True)
class StreamPosition:
    """Where a trajectory stands: what the next batch is, and which part comes next."""

    epoch: int = 0
    consumed: int = 0  # samples of this epoch's shuffled stream already in scored batches
    step: int = 0  # global batch counter (the ``step`` column)
    chunk: int = 0  # index of the next part within this epoch


def shuffled(samples: Iterable[RawSample], buffer_size: int, rng: random.Random) -> Iterator[RawSample]:
    """The classic streaming shuffle: keep ``buffer_size`` samples, emit a random one per arrival."""
    if buffer_size <= 1:
        yield from samples
        return
    buffer: list[RawSample] = []
    for sample in samples:
        if len(buffer) < buffer_size:
            buffer.append(sample)
            continue
        position = rng.randrange(buffer_size)
        yield buffer[position]
        buffer[position] = sample
    rng.shuffle(buffer)
    yield from buffer


def epoch_samples(shards: tuple[str, ...], epoch: int, seed: int, shuffle_buffer: int,
                  allow_pipe: bool, anchors: AnchorPlan | None = None) -> Iterator[RawSample]:
    """The raw samples of one epoch (with their anchors), in the order the proxy sees them (a
    function of seed and epoch)."""
    rng = random.Random(seed * 1_000_003 + epoch)
    return pool_with_anchors(raw_stream(shards, allow_pipe), anchors,
                             reorder=lambda pool: shuffled(pool, shuffle_buffer, rng))


@dataclass(frozen=True)
class EpochStream:
    """The batches of the epoch ``position`` is in, from there on: read, shuffle and skip here,
    decode in the pool's workers, batch here in the stream's order."""

    shards: tuple[str, ...]
    seed: int
    shuffle_buffer: int
    batch_size: int
    allow_pipe: bool
    position: StreamPosition
    device_type: str = "cpu"  # where the batches go (a GPU gets page-locked batches)
    chunk_size: int = CHUNK_SIZE
    anchors: AnchorPlan | None = None  # score --trusted: anchors spread through every epoch

    def batches(self, pool: OrderedPool) -> Iterator[Batch]:
        position = self.position
        stream = epoch_samples(self.shards, position.epoch, self.seed, self.shuffle_buffer, self.allow_pipe,
                               self.anchors)
        remaining = itertools.islice(stream, position.consumed, None)  # resume: skip without decoding
        samples = decoded_samples(pool.map(stream_chunks(remaining, self.chunk_size)))
        return group_batches(samples, self.batch_size, None, position.step, pins_memory(self.device_type))


def epoch_stream(config: ScoreConfig, position: StreamPosition, device_type: str) -> EpochStream:
    """The stream from ``position`` for a run of ``config`` scoring on ``device_type`` (``score``'s
    early start and the run both ask for theirs here, so equal inputs give equal streams)."""
    return EpochStream(config.shards, config.model.seed, config.train.shuffle_buffer, config.batch_size,
                       config.allow_pipe, position, device_type, config.chunk_size, config.anchors)


def _trained_state(scorer: MimicScorer, mode: str) -> dict[str, torch.Tensor]:
    if mode == "full":
        return {name: value.detach().cpu() for name, value in scorer.models.proxy.state_dict().items()}
    return {name: value.detach().cpu() for name, value in scorer.mimic_parameters().items()}


def _save(path: Path, payload: dict[str, Any]) -> None:
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def save_checkpoint(run_dir: Path, scorer: MimicScorer, optimizer, mode: str, position: StreamPosition) -> None:
    _save(
        latest_checkpoint_path(run_dir),
        {"position": asdict(position), "proxy": _trained_state(scorer, mode), "optimizer": optimizer.state_dict()},
    )


def load_checkpoint(run_dir: Path, scorer: MimicScorer, optimizer) -> StreamPosition:
    """Restore proxy and optimizer from the last checkpoint; a fresh position when there is none."""
    path = latest_checkpoint_path(run_dir)
    if not path.exists():
        return StreamPosition()
    payload = torch.load(path, map_location=scorer.models.device, weights_only=True)
    proxy = scorer.models.proxy
    with torch.no_grad():
        state = dict(proxy.named_parameters()) | dict(proxy.named_buffers())
        for name, value in payload["proxy"].items():
            state[name].copy_(value)
    optimizer.load_state_dict(payload["optimizer"])
    return StreamPosition(**payload["position"])


def has_checkpoint(run_dir: Path) -> bool:
    return latest_checkpoint_path(run_dir).exists()


def run_trajectory(config: ScoreConfig, batch_scorer: BatchScorer, progress: Progress | None = None,
                   early: EarlyStart | None = None) -> int:
    """Run (or resume) the trajectory into ``config.out_dir``; returns the number of rows scored now.

    ``early``: the pool and first-epoch stream started before the models loaded, taken when they
    are exactly what this run needs."""
    scorer, train = batch_scorer.scorer, config.train
    optimizer = torch.optim.AdamW(scorer.enable_training(train.mode), lr=train.lr, weight_decay=train.weight_decay)
    position = load_checkpoint(config.out_dir, scorer, optimizer)
    device = scorer.models.device
    if progress:
        progress.start(train.epochs, position.epoch, unit="epochs")
    if position.epoch >= train.epochs:
        return 0
    decoder = Decoder.for_models(config.decode, scorer.models)
    pool, batches = open_input(decoder, epoch_stream(config, position, device.type), config.workers, early)
    epochs = _Epochs(batch_scorer, decoder, optimizer, train, config.out_dir, progress)
    scored_now = 0
    with pool:
        while position.epoch < train.epochs:
            if batches is None:
                batches = epoch_stream(config, position, device.type).batches(pool)
            position, scored = epochs.run(position, batches)
            scored_now += scored
            batches = None
    return scored_now


@dataclass
class _Epochs:
    """A trajectory's epochs: each batch scored at the current proxy and then a step on it, parts
    written and the proxy checkpointed every ``checkpoint_every`` steps and at the epoch's end."""

    batch_scorer: BatchScorer
    decoder: Decoder
    optimizer: torch.optim.Optimizer
    train: TrainConfig
    run_dir: Path
    progress: Progress | None

    def run(self, position: StreamPosition, batches: Iterator[Batch]) -> tuple[StreamPosition, int]:
        """The epoch ``position`` is in, from there on; (the next epoch's start, rows scored)."""
        epoch, consumed, step, chunk = position.epoch, position.consumed, position.step, position.chunk
        device = self.batch_scorer.scorer.models.device
        rows: list[dict] = []
        scored = 0
        for batch in batches:
            batch_rows = self.batch_scorer.train(self.decoder.decode_on_device(batch, device), self.optimizer, epoch)
            rows.extend(batch_rows)
            consumed += len(batch_rows)
            step += 1
            scored += len(batch_rows)
            if self.progress:
                self.progress.advance(len(batch_rows))
            if self.train.checkpoint_every and step % self.train.checkpoint_every == 0 and not batch.last:
                self._write_part(epoch, chunk, rows)
                chunk += 1
                rows = []
                self._checkpoint(StreamPosition(epoch=epoch, consumed=consumed, step=step, chunk=chunk))
        self._write_part(epoch, chunk, rows)
        following = StreamPosition(epoch=epoch + 1, consumed=0, step=step, chunk=0)
        self._checkpoint(following)
        _save(epoch_checkpoint_path(self.run_dir, epoch),
              {"proxy": _trained_state(self.batch_scorer.scorer, self.train.mode)})
        if self.progress:
            self.progress.shard_done(consumed)
        return following, scored

    def _checkpoint(self, position: StreamPosition) -> None:
        save_checkpoint(self.run_dir, self.batch_scorer.scorer, self.optimizer, self.train.mode, position)

    def _write_part(self, epoch: int, chunk: int, rows: list[dict]) -> None:
        write_part(rows_to_table(rows, embedding_dim=self.batch_scorer.embedding_dim),
                   trajectory_part_path(self.run_dir, epoch, chunk))
