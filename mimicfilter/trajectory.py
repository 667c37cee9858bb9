"""Grad-Mimic stage 1: score every sample while the proxy learns (``--train head|full``).

One ordered stream per epoch: the shards in order, through a seeded shuffle buffer, decoded and
cut into batches of ``batch_size`` ok samples (batches span shards here; the tail rule of
:mod:`mimicfilter.batches` applies at the epoch's end). Each batch is scored at the current proxy,
then the proxy takes one AdamW step on the re-weighted loss. Rows record the epoch and the global
step at which each sample was seen.

Resume: every ``checkpoint_every`` steps and at each epoch end, the rows since the previous
checkpoint are written as a part (``scores/epoch-EEEE-chunk-CCCCC.parquet``) and then the proxy,
the optimizer and the stream position are saved (``checkpoints/latest.pt``, atomically). A
re-run loads that checkpoint, skips the samples of the stream it had consumed (raw bytes are
re-read but not decoded), and continues; the parts it rewrites are byte-for-byte what the killed
run would have written, so the finished table equals an uninterrupted run's (CPU, same seed).
"""

from __future__ import annotations

import io
import itertools
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset

from mimicfilter.batches import group_batches
from mimicfilter.choices import TRAIN_MODES
from mimicfilter.decode import DecodeConfig, decode_sample
from mimicfilter.errors import MimicfilterError
from mimicfilter.rundir import CHECKPOINTS_DIR, SCORES_DIR
from mimicfilter.scorer import MimicScorer
from mimicfilter.shards import iter_shard_samples
from mimicfilter.tables import atomic_write_bytes, rows_to_table, write_part


@dataclass(frozen=True)
class TrainConfig:
    """How the proxy learns along the stream."""

    mode: str = "head"  # "head": only the mimic layers learn; "full": the whole proxy learns
    epochs: int = 1
    lr: float = 1e-4
    weight_decay: float = 1e-5
    shuffle_buffer: int = 1000
    checkpoint_every: int = 500

    def __post_init__(self):
        if self.mode not in TRAIN_MODES:
            raise MimicfilterError(f"--train {self.mode}: not supported", hint=f"one of {', '.join(TRAIN_MODES)}")
        if self.epochs < 1:
            raise MimicfilterError(f"--epochs {self.epochs}: must be at least 1")
        if self.mode == "none" and self.epochs != 1:
            raise MimicfilterError("--epochs needs a learning proxy", hint="use --train head or full, or drop --epochs")
        if not self.lr > 0 or self.weight_decay < 0:
            raise MimicfilterError(f"--lr {self.lr} / --weight-decay {self.weight_decay}: need lr > 0 and decay >= 0")
        if self.shuffle_buffer < 0 or self.checkpoint_every < 0:
            raise MimicfilterError("--shuffle-buffer and --checkpoint-every must be 0 or more")


@dataclass(frozen=True)
class StreamPosition:
    """Where a trajectory stands: what the next batch is, and which part comes next."""

    epoch: int = 0
    consumed: int = 0  # samples of this epoch's shuffled stream already in scored batches
    step: int = 0  # global batch counter (the ``step`` column)
    chunk: int = 0  # index of the next part within this epoch


def shuffled(samples: Iterable[dict], buffer_size: int, rng: random.Random) -> Iterator[dict]:
    """The classic streaming shuffle: keep ``buffer_size`` samples, emit a random one per arrival."""
    if buffer_size <= 1:
        yield from samples
        return
    buffer: list[dict] = []
    for sample in samples:
        if len(buffer) < buffer_size:
            buffer.append(sample)
            continue
        position = rng.randrange(buffer_size)
        yield buffer[position]
        buffer[position] = sample
    rng.shuffle(buffer)
    yield from buffer


def epoch_stream(shards: tuple[str, ...], epoch: int, seed: int, shuffle_buffer: int, allow_pipe: bool) -> Iterator[dict]:
    """The raw samples of one epoch, in the order the proxy sees them (a function of seed and epoch)."""
    rng = random.Random(seed * 1_000_003 + epoch)
    raw = itertools.chain.from_iterable(iter_shard_samples(shard, allow_pipe=allow_pipe) for shard in shards)
    return shuffled(raw, shuffle_buffer, rng)


class _EpochBatches(IterableDataset):
    """One epoch's batches, produced in a single worker so the order is the stream's order."""

    def __init__(self, shards, epoch, position: StreamPosition, train: TrainConfig, seed: int,
                 decode_config: DecodeConfig, preprocess: Callable, tokenize: Callable | None,
                 batch_size: int, allow_pipe: bool):
        self.shards, self.epoch, self.position, self.train, self.seed = shards, epoch, position, train, seed
        self.decode_config, self.preprocess, self.tokenize = decode_config, preprocess, tokenize
        self.batch_size, self.allow_pipe = batch_size, allow_pipe

    def __iter__(self):
        stream = epoch_stream(self.shards, self.epoch, self.seed, self.train.shuffle_buffer, self.allow_pipe)
        remaining = itertools.islice(stream, self.position.consumed, None)  # resume: skip without decoding
        decoded = (decode_sample(raw, self.decode_config, self.preprocess, self.tokenize) for raw in remaining)
        yield from group_batches(decoded, self.batch_size, shard=None, first_step=self.position.step)


def _checkpoint_path(run_dir: Path) -> Path:
    return run_dir / CHECKPOINTS_DIR / "latest.pt"


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
        _checkpoint_path(run_dir),
        {"position": asdict(position), "proxy": _trained_state(scorer, mode), "optimizer": optimizer.state_dict()},
    )


def load_checkpoint(run_dir: Path, scorer: MimicScorer, optimizer) -> StreamPosition:
    """Restore proxy and optimizer from the last checkpoint; a fresh position when there is none."""
    path = _checkpoint_path(run_dir)
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


def run_trajectory(
    scorer: MimicScorer,
    train: TrainConfig,
    *,
    shards: tuple[str, ...],
    run_dir: Path,
    decode_config: DecodeConfig,
    tokenize: Callable | None,
    batch_size: int,
    seed: int,
    workers: int,
    allow_pipe: bool,
    rows_of_batch: Callable[[dict, Any, int], list[dict]],
    progress=None,
) -> int:
    """Run (or resume) the trajectory into ``run_dir``; returns the number of rows scored now."""
    trained = scorer.enable_training(train.mode)
    optimizer = torch.optim.AdamW(trained, lr=train.lr, weight_decay=train.weight_decay)
    position = load_checkpoint(run_dir, scorer, optimizer)
    models = scorer.models
    if progress:
        progress.start(train.epochs, position.epoch, unit="epochs")
    scored_now = 0
    while position.epoch < train.epochs:
        epoch = position.epoch
        dataset = _EpochBatches(shards, epoch, position, train, seed, decode_config, models.preprocess, tokenize,
                                batch_size, allow_pipe)
        loader = DataLoader(dataset, batch_size=None, num_workers=min(workers, 1),
                            pin_memory=models.device.type == "cuda")
        rows: list[dict] = []
        consumed, step, chunk = position.consumed, position.step, position.chunk
        for batch in loader:
            if batch["images"] is None:
                scores = None
            else:
                targets = batch["texts"] if batch["texts"] is not None else batch["labels"]
                # A batch of one has no contrast and a zero gradient: score it, but take no step.
                ok = batch["images"].shape[0]
                scores = scorer.train_step(batch["images"], targets, optimizer) if ok > 1 else scorer.score(batch["images"], targets)
            batch_rows = rows_of_batch(batch, scores, epoch)
            rows.extend(batch_rows)
            consumed += len(batch_rows)
            step += 1
            scored_now += len(batch_rows)
            if progress:
                progress.advance(len(batch_rows))
            if train.checkpoint_every and step % train.checkpoint_every == 0 and not batch["last"]:
                _write_chunk(run_dir, epoch, chunk, rows, scorer.embedding_dim)
                chunk += 1
                rows = []
                save_checkpoint(run_dir, scorer, optimizer, train.mode,
                                StreamPosition(epoch=epoch, consumed=consumed, step=step, chunk=chunk))
        _write_chunk(run_dir, epoch, chunk, rows, scorer.embedding_dim)
        position = StreamPosition(epoch=epoch + 1, consumed=0, step=step, chunk=0)
        save_checkpoint(run_dir, scorer, optimizer, train.mode, position)
        _save(run_dir / CHECKPOINTS_DIR / f"epoch-{epoch:04d}.pt", {"proxy": _trained_state(scorer, train.mode)})
        if progress:
            progress.shard_done(consumed)
    return scored_now


def _write_chunk(run_dir: Path, epoch: int, chunk: int, rows: list[dict], embedding_dim: int | None = None) -> None:
    write_part(rows_to_table(rows, embedding_dim=embedding_dim), run_dir / SCORES_DIR / f"epoch-{epoch:04d}-chunk-{chunk:05d}.parquet")
