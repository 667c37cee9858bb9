"""``ExtrapolateConfig``: everything ``mimicfilter extrapolate`` needs, validated once, and what of it
changes the result (the fingerprint)."""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mimicfilter.errors import MimicfilterError
from mimicfilter.execute.partition import Partition
from mimicfilter.execute.ray import RayConfig
from mimicfilter.extrapolate.external import ExternalSpec
from mimicfilter.extrapolate.features import FEATURE_CHOICES
from mimicfilter.extrapolate.gnn import GnnSettings
from mimicfilter.extrapolate.index import INDEX_KINDS
from mimicfilter.extrapolate.methods import HOLDOUT_BY, METHODS
from mimicfilter.extrapolate.recall import RECALL_TARGET

DEFAULT_K_CANDIDATES = (1, 2, 5, 10, 20, 50)
DEFAULT_MIN_RHO = 0.5  # held-out rho below this: the extrapolated scores are not to be trusted (docs/usage.md)


@dataclass(frozen=True)
class ExtrapolateConfig:
    """Everything ``mimicfilter extrapolate`` needs; validated once, up front."""

    scored: Path
    out_dir: Path
    embeddings: tuple[Path, ...] = ()
    features_from: ExternalSpec | None = None  # embeddings users already have (DataComp .npz, Parquet)
    method: str = "knn"
    features: str = "auto"
    k_candidates: tuple[int, ...] = DEFAULT_K_CANDIDATES
    weighted: bool = False
    same_label: bool = False
    graph_k: int = 10  # GNN: neighbours per node
    gnn: GnnSettings = field(default_factory=GnnSettings)
    holdout_fraction: float = 0.2
    holdout_by: str = "shard"
    min_rho: float = DEFAULT_MIN_RHO
    index: str = "auto"  # exact | ivf-sq8 | ivf-sq4 | auto (by size)
    recall_target: float = RECALL_TARGET
    block_size: int = 16384  # queries handed to faiss at a time
    device: str = "auto"  # as score and embed: a GPU when there is one
    seed: int = 0
    workers: int = 0  # local worker processes predicting units (0: this process)
    threads: int | None = None  # faiss threads per process (None: all cores; workers: 1 each)
    partition: Partition = field(default_factory=Partition)
    ray: RayConfig | None = None
    fit_only: bool = False  # build and save the extrapolator, predict nothing
    overwrite: bool = False
    argv: tuple[str, ...] = ()

    def __post_init__(self):
        if self.method not in METHODS:
            raise MimicfilterError(f"--method {self.method}: choose one of {', '.join(METHODS)}")
        if self.features not in FEATURE_CHOICES:
            raise MimicfilterError(f"--features {self.features}: choose one of {', '.join(FEATURE_CHOICES)}")
        if not self.k_candidates:
            raise MimicfilterError("--k: no candidate given", hint="e.g. --k 1,2,5,10,20,50 or --k 10")
        if any(k < 1 for k in self.k_candidates):
            raise MimicfilterError(f"--k {','.join(map(str, self.k_candidates))}: every k must be at least 1")
        object.__setattr__(self, "k_candidates", tuple(sorted(set(self.k_candidates))))
        if self.graph_k < 1:
            raise MimicfilterError(f"--graph-k {self.graph_k}: must be at least 1")
        if self.holdout_by not in HOLDOUT_BY:
            raise MimicfilterError(f"--holdout-by {self.holdout_by}: choose one of {', '.join(HOLDOUT_BY)}")
        if not 0 < self.holdout_fraction < 1:
            raise MimicfilterError(f"--holdout {self.holdout_fraction}: must lie strictly between 0 and 1")
        if not -1 <= self.min_rho <= 1:
            raise MimicfilterError(f"--min-rho {self.min_rho}: a Spearman rho lies in [-1, 1]")
        if self.index not in INDEX_KINDS:
            raise MimicfilterError(f"--index {self.index}: choose one of {', '.join(INDEX_KINDS)}")
        if not 0 < self.recall_target <= 1:
            raise MimicfilterError(f"--recall {self.recall_target}: a recall lies in (0, 1]")
        if self.block_size < 1:
            raise MimicfilterError("--block-size must be at least 1")
        if self.workers < 0 or (self.threads is not None and self.threads < 1):
            raise MimicfilterError("--workers must be 0 or more and --threads at least 1")
        if self.embeddings and self.features_from is not None:
            raise MimicfilterError("--embeddings and --features-from are two embedding spaces: give one",
                                   hint="--features-from embeds the scored samples too (matched by uid)")
        if self.ray is not None and self.workers:
            raise MimicfilterError("--ray and --workers: Ray actors are the workers", hint="drop --workers")
        out = self.out_dir.resolve()
        for source in (self.scored, *self.embeddings):
            if Path(source).resolve() == out:
                raise MimicfilterError(f"--out {self.out_dir} is also an input run", hint="write to a new directory")

    def choices(self) -> dict[str, Any]:
        """What changes the result (the fingerprint and run.json record it)."""
        chosen = {"method": self.method, "features": self.features, "same_label": self.same_label,
                  "holdout_fraction": self.holdout_fraction, "holdout_by": self.holdout_by, "seed": self.seed,
                  "index": self.index, "recall_target": self.recall_target}
        if self.method == "knn":
            return chosen | {"k_candidates": list(self.k_candidates), "weighted": self.weighted}
        return chosen | {"graph_k": self.graph_k, "gnn": asdict(self.gnn)}


def files_digest(paths: list[str]) -> str:
    """A short digest naming a list of input files (the fingerprint of thousands of them)."""
    return hashlib.sha1("\n".join(paths).encode()).hexdigest()[:16]
