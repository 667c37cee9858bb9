"""``DedupConfig``: everything ``mimicfilter dedup`` needs, validated once, and what of it changes the
result (the fingerprint)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mimicfilter.curate.dedup import DEDUP_ON, DEFAULT_EPSILON
from mimicfilter.errors import MimicfilterError
from mimicfilter.execute.partition import Partition
from mimicfilter.execute.ray import RayConfig
from mimicfilter.extrapolate.external import ExternalSpec

DEFAULT_MAX_EPSILON = 0.15  # pairs are kept down to cosine 0.85: filter may pick any ε up to this later
DEFAULT_CELL_SIZE = 2048  # samples per k-means cell on average: the pair search costs N × this × d
DEFAULT_CAPTION_FACTOR = 0.02  # with pair, captions must be 50 times as close as images (cos ≥ 1 − 0.02 ε)
DEFAULT_MARGIN = 0.02  # a sample joins every cell whose centroid is within this cosine of its nearest one
DEDUP_DIR = "dedup"  # the default --out: inside the run it deduplicates, where `filter --dedup` looks


@dataclass(frozen=True)
class DedupConfig:
    """Everything ``mimicfilter dedup`` needs; validated once, up front."""

    run: Path  # the run whose samples are deduplicated (its own embeddings unless another source is given)
    out_dir: Path | None = None  # None: RUN/dedup
    embeddings: tuple[Path, ...] = ()  # `embed` runs of the same shards
    features_from: ExternalSpec | None = None  # DataComp .npz / Parquet embeddings, matched by uid or key
    dedup_on: str = "pair"  # pair: image AND caption alike; image: the image alone
    max_epsilon: float = DEFAULT_MAX_EPSILON
    caption_factor: float = DEFAULT_CAPTION_FACTOR
    cell_size: int = DEFAULT_CELL_SIZE
    margin: float = DEFAULT_MARGIN
    seed: int = 0
    workers: int = 0  # local worker processes (0: this process)
    threads: int | None = None  # faiss threads per process (None: all cores; workers: 1 each)
    partition: Partition = field(default_factory=Partition)
    ray: RayConfig | None = None
    overwrite: bool = False
    argv: tuple[str, ...] = ()

    def __post_init__(self):
        if self.out_dir is None:
            object.__setattr__(self, "out_dir", Path(self.run) / DEDUP_DIR)
        if self.dedup_on not in DEDUP_ON:
            raise MimicfilterError(f"--dedup-on {self.dedup_on}: choose one of {', '.join(DEDUP_ON)}")
        if not 0 < self.max_epsilon < 1:
            raise MimicfilterError(f"--max-threshold {self.max_epsilon}: an ε lies strictly between 0 and 1",
                                   hint=f"pairs above cosine 1 − ε are kept; the default is {DEFAULT_MAX_EPSILON}")
        if self.max_epsilon < DEFAULT_EPSILON:
            raise MimicfilterError(f"--max-threshold {self.max_epsilon} is below filter's default ε {DEFAULT_EPSILON}",
                                   hint="filter --dedup could not use its default; raise --max-threshold")
        if not 0 < self.caption_factor <= 1:
            raise MimicfilterError(f"--caption-factor {self.caption_factor}: in (0, 1]",
                                   hint="with --dedup-on pair the captions must be within this factor of ε")
        if self.cell_size < 64:
            raise MimicfilterError(f"--cell-size {self.cell_size}: at least 64 samples per cell")
        if not 0 <= self.margin < 1:
            raise MimicfilterError(f"--margin {self.margin}: a cosine margin in [0, 1)")
        if self.workers < 0 or (self.threads is not None and self.threads < 1):
            raise MimicfilterError("--workers must be 0 or more and --threads at least 1")
        if self.embeddings and self.features_from is not None:
            raise MimicfilterError("--embeddings and --features-from are two embedding sources: give one")
        if self.ray is not None and self.workers:
            raise MimicfilterError("--ray and --workers: Ray actors are the workers", hint="drop --workers")
        out = Path(self.out_dir).resolve()
        for source in (self.run, *self.embeddings):
            if Path(source).resolve() == out:
                raise MimicfilterError(f"--out {self.out_dir} is an input run", hint="the default is RUN/dedup")

    def choices(self) -> dict[str, Any]:
        """What changes the result (the fingerprint and run.json record it)."""
        return {"dedup_on": self.dedup_on, "max_epsilon": self.max_epsilon, "caption_factor": self.caption_factor,
                "cell_size": self.cell_size, "margin": self.margin, "seed": self.seed}
