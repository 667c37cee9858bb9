"""Grad-Mimic stage 1: score every sample while the proxy learns (``--train head|full``).

One ordered stream per epoch: the shards in order, through a seeded shuffle buffer, decoded and
cut into batches of ``batch_size`` ok samples (batches span shards here; the tail rule of
:mod:`mimicfilter.pipeline.batches` applies at the epoch's end). Each batch is scored at the current proxy,
then the proxy takes one AdamW step on the re-weighted loss. Rows record the epoch and the global
step at which each sample was seen.

Decoding runs in ``workers`` processes with the stream's order kept: this process reads the
shards, shuffles, skips what a resumed run already consumed, and hands chunks of raw samples to the
pool, whose results come back in submission order (:mod:`mimicfilter.pipeline.stages`). Batch
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
from mimicfilter.pipeline.batch_scorer import BatchScorer
from mimicfilter.pipeline.batches import Batch, group_batches
from mimicfilter.pipeline.config import Progress, TrainConfig
from mimicfilter.pipeline.stages import (CHUNK_SIZE, Decoder, EarlyInput, decoded_samples, input_pool, raw_stream,
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


def epoch_stream(shards: tuple[str, ...], epoch: int, seed: int, shuffle_buffer: int, allow_pipe: bool) -> Iterator[RawSample]:
    """The raw samples of one epoch, in the order the proxy sees them (a function of seed and epoch)."""
    rng = random.Random(seed * 1_000_003 + epoch)
    return shuffled(raw_stream(shards, allow_pipe), shuffle_buffer, rng)


@dataclass(frozen=True)
class EpochBatches:
    """One epoch's batches from where the position stands: read, shuffle and skip here, decode in
    the pool's workers, batch here in the stream's order."""

    shards: tuple[str, ...]
    seed: int
    shuffle_buffer: int
    decoder: Decoder
    batch_size: int
    allow_pipe: bool
    chunk_size: int = CHUNK_SIZE

    def __call__(self, epoch: int, position: StreamPosition, pool: OrderedPool, pin_memory: bool = False) -> Iterator[Batch]:
        stream = epoch_stream(self.shards, epoch, self.seed, self.shuffle_buffer, self.allow_pipe)
        remaining = itertools.islice(stream, position.consumed, None)  # resume: skip without decoding
        samples = decoded_samples(pool.map(stream_chunks(remaining, self.chunk_size)))
        return group_batches(samples, self.batch_size, None, position.step, pin_memory)


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


def run_trajectory(batch_scorer: BatchScorer, train: TrainConfig, batches: EpochBatches, run_dir: Path,
                   workers: int, progress: Progress | None = None, early: EarlyInput | None = None) -> int:
    """Run (or resume) the trajectory into ``run_dir``; returns the number of rows scored now.

    ``early``: the pool and first-epoch stream started before the models loaded (key: the start
    position), used when they are exactly what this run needs."""
    scorer = batch_scorer.scorer
    trained = scorer.enable_training(train.mode)
    optimizer = torch.optim.AdamW(trained, lr=train.lr, weight_decay=train.weight_decay)
    position = load_checkpoint(run_dir, scorer, optimizer)
    device = scorer.models.device
    if progress:
        progress.start(train.epochs, position.epoch, unit="epochs")
    key = (position, device.type == "cuda")
    pool, started = input_pool(early, batches.decoder, key, workers)
    with pool:
        return _epochs(batch_scorer, train, batches, run_dir, pool, device, optimizer, position, progress, started)


def _epochs(batch_scorer: BatchScorer, train: TrainConfig, batches: EpochBatches, run_dir: Path, pool: OrderedPool,
            device: torch.device, optimizer: torch.optim.Optimizer, position: StreamPosition,
            progress: Progress | None, started: Iterator[Batch] | None = None) -> int:
    scorer = batch_scorer.scorer
    scored_now = 0
    while position.epoch < train.epochs:
        epoch = position.epoch
        rows: list[dict] = []
        consumed, step, chunk = position.consumed, position.step, position.chunk
        stream = started if started is not None else batches(epoch, position, pool, pin_memory=device.type == "cuda")
        started = None
        for batch in stream:
            batch_rows = batch_scorer.train(batches.decoder.decode_on_device(batch, device), optimizer, epoch)
            rows.extend(batch_rows)
            consumed += len(batch_rows)
            step += 1
            scored_now += len(batch_rows)
            if progress:
                progress.advance(len(batch_rows))
            if train.checkpoint_every and step % train.checkpoint_every == 0 and not batch.last:
                _write_chunk(run_dir, epoch, chunk, rows, batch_scorer.embedding_dim)
                chunk += 1
                rows = []
                save_checkpoint(run_dir, scorer, optimizer, train.mode,
                                StreamPosition(epoch=epoch, consumed=consumed, step=step, chunk=chunk))
        _write_chunk(run_dir, epoch, chunk, rows, batch_scorer.embedding_dim)
        position = StreamPosition(epoch=epoch + 1, consumed=0, step=step, chunk=0)
        save_checkpoint(run_dir, scorer, optimizer, train.mode, position)
        _save(epoch_checkpoint_path(run_dir, epoch), {"proxy": _trained_state(scorer, train.mode)})
        if progress:
            progress.shard_done(consumed)
    return scored_now


def _write_chunk(run_dir: Path, epoch: int, chunk: int, rows: list[dict], embedding_dim: int | None = None) -> None:
    write_part(rows_to_table(rows, embedding_dim=embedding_dim), trajectory_part_path(run_dir, epoch, chunk))
