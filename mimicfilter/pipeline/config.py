"""What the pipeline's commands need, validated once, up front; and what they report while running."""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Protocol

import torch

from mimicfilter.defaults import TRAIN_MODES, task_defaults
from mimicfilter.errors import MimicfilterError
from mimicfilter.execute.partition import Partition
from mimicfilter.execute.ray import RayConfig
from mimicfilter.mimic.models import ModelSpec
from mimicfilter.pipeline.anchors import AnchorPlan
from mimicfilter.shards.decode import DecodeConfig
from mimicfilter.store.paths import is_remote


def max_workers() -> int:
    """The most decode processes a run may start: 4 per core (I/O-bound remote shards), at least 64."""
    return max(64, 4 * (os.cpu_count() or 1))


@dataclass(frozen=True)
class TrainConfig:
    """How the proxy learns along the stream."""

    mode: str = "head"  # "head": only the mimic layers learn; "full": the whole proxy learns; "none": frozen
    epochs: int = 1
    lr: float | None = None  # None: the task's default (defaults.TASK_DEFAULTS), filled in by ScoreConfig
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
        if self.lr is not None and not 0 < self.lr < math.inf:
            raise MimicfilterError(f"--lr {self.lr}: needs a finite number above 0")
        if not 0 <= self.weight_decay < math.inf:  # (NaN fails both)
            raise MimicfilterError(f"--weight-decay {self.weight_decay}: needs a finite number, 0 or more")
        if self.shuffle_buffer < 0 or self.checkpoint_every < 0:
            raise MimicfilterError("--shuffle-buffer and --checkpoint-every must be 0 or more")


@dataclass(frozen=True)
class StreamConfig:
    """What every command that streams shards through the models (``score``, ``embed``) needs;
    validated once, up front."""

    shards: tuple[str, ...]
    out_dir: Path
    model: ModelSpec
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    batch_size: int = 256
    workers: int = 0
    allow_pipe: bool = False
    overwrite: bool = False
    argv: tuple[str, ...] = ()
    chunk_size: int = 64  # raw samples per decoding work unit; never changes a table (not in the fingerprint)
    threads: int | None = None  # torch CPU threads of this process (None: torch's choice); speed only

    verb: ClassVar[str] = "stream"  # what the command does to the shards, for the messages

    def __post_init__(self):
        if not self.shards:
            raise MimicfilterError(f"no shards to {self.verb}",
                                   hint="pass shard files, a directory, a pattern or @list.txt")
        if self.workers < 0:
            raise MimicfilterError(f"--workers {self.workers}: must be 0 or more")
        if self.workers > max_workers():
            raise MimicfilterError(f"--workers {self.workers}: more decode processes than this machine can run "
                                   f"(at most {max_workers()}: 4 per core, or 64)", hint="the default suits most machines")
        if self.threads is not None and self.threads < 1:
            raise MimicfilterError(f"--threads {self.threads}: must be at least 1")
        if self.chunk_size < 1:
            raise MimicfilterError(f"chunk size {self.chunk_size}: must be at least 1")
        if self.decode.task != self.model.task:
            raise MimicfilterError(f"decoding for {self.decode.task!r} but models for {self.model.task!r}")
        _check_out_dir(self.out_dir)


def _check_out_dir(out_dir: Path) -> None:
    """A local run directory whose path runs through a file fails here, before any model loads."""
    if is_remote(out_dir):
        return
    existing = next(path for path in (out_dir, *out_dir.absolute().parents) if path.exists())
    if not existing.is_dir():
        raise MimicfilterError(f"--out {out_dir}: {existing} is not a directory", hint="choose another --out")


def use_threads(config: StreamConfig) -> None:
    """Apply ``config.threads`` to this process (decode workers run one thread each regardless)."""
    if config.threads is not None:
        torch.set_num_threads(config.threads)


def _shard_identity(spec: str) -> str:
    """One name per shard: a local path resolved (links, ``..``), a URL or pipe as written."""
    return spec if "://" in spec or spec.startswith("pipe:") else os.path.realpath(spec)


@dataclass(frozen=True)
class ScoreConfig(StreamConfig):
    """Everything ``mimicfilter score`` needs; validated once, up front.

    ``train`` defaults to a frozen proxy (``none``: static scoring, one part per shard) where the
    command line defaults to ``--train head``: a library caller gets the mode whose parts depend
    only on their shard (any executor, any order, no checkpoints) unless it asks for a trajectory,
    while the command runs the paper's method unless told otherwise.
    """

    temperature: float | None = None  # None: the task's default
    train: TrainConfig = field(default_factory=lambda: TrainConfig(mode="none"))
    partition: Partition = field(default_factory=Partition)
    ray: RayConfig | None = None  # None: the local executor
    save_embeddings: bool = False  # also store the reference's pair embedding (mimic.embedder)
    trusted: tuple[str, ...] = ()  # --trusted: shards of checked samples, scored as anchors (pipeline/anchors.py)
    synthetic_share: float | None = None  # share of pool samples whose pair makes a synthetic negative (None: auto)
    anchors: AnchorPlan | None = None  # the plan for ``trusted``, made when the run starts

    verb: ClassVar[str] = "score"

    def __post_init__(self):
        super().__post_init__()
        if self.batch_size < 2:
            raise MimicfilterError(f"--batch-size {self.batch_size}: need at least 2 (the loss contrasts pairs)")
        if self.temperature is not None and not self.temperature > 0:
            raise MimicfilterError(f"--temperature {self.temperature}: must be positive")
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
        if self.synthetic_share is not None and not 0 < self.synthetic_share <= 0.5:
            raise MimicfilterError(f"--synthetic-share {self.synthetic_share}: must lie in (0, 0.5]")
        if both := sorted({_shard_identity(spec) for spec in self.trusted} & {_shard_identity(spec) for spec in self.shards}):
            raise MimicfilterError(f"--trusted {both[0]} is also one of the pool's shards: the pool would be calibrated "
                                   "against its own samples", hint="pass shards of checked samples apart from the pool's "
                                   "inputs (checked samples drawn from the pool, written to shards of their own, are fine)")
        if self.synthetic_share is not None and not self.trusted:
            raise MimicfilterError("--synthetic-share makes the negatives beside --trusted samples",
                                   hint="add --trusted SPEC (the checked samples), or drop --synthetic-share")
        if self.partition.partitioned and self.overwrite:
            raise MimicfilterError(
                "--overwrite with --world-size > 1 would let one rank delete the others' parts",
                hint="empty the run directory once before launching the ranks",
            )
        defaults = task_defaults(self.model.task)
        if self.train.lr is None and not (defaults.lr_needs_pool_size and self.train.mode != "none"):
            # the task's learning rate, resolved once (it is part of the fingerprint); a static run
            # never uses it, and records the value of a pool of lr_pool samples, as earlier versions did
            lr = defaults.lr_for(self.batch_size, defaults.lr_pool)
            object.__setattr__(self, "train", dataclasses.replace(self.train, lr=lr))

    @property
    def lr_needs_pool_size(self) -> bool:
        """The proxy learns with the task's default lr, which depends on how many samples the
        shards hold (:func:`with_pool_lr` counts them)."""
        return self.train.lr is None

    @property
    def effective_temperature(self) -> float:
        return self.temperature if self.temperature is not None else task_defaults(self.decode.task).temperature


@dataclass(frozen=True)
class EmbedConfig(StreamConfig):
    """Everything ``mimicfilter embed`` needs; validated once, up front."""

    verb: ClassVar[str] = "embed"

    def __post_init__(self):
        super().__post_init__()
        if self.batch_size < 1:
            raise MimicfilterError(f"--batch-size {self.batch_size}: must be at least 1")


class Progress(Protocol):
    """What the pipeline reports while it runs (the CLI draws a bar from it)."""

    def start(self, total: int, done: int, unit: str = "shards") -> None: ...

    def advance(self, samples: int) -> None: ...

    def shard_done(self, samples: int) -> None: ...

    def close(self) -> None: ...
