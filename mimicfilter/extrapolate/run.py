"""Score extrapolation: predict the mimic scores of unscored samples from their scored neighbours.

Score a subset with the (expensive) trajectory, embed the rest (the cheap ``embed`` pass, or
``score --save-embeddings``), then predict each unscored sample's per-sample mean mimic score and
relative weight from the scored samples most like it (:mod:`~mimicfilter.extrapolate.features`:
the image alone, or the image–text pair and its agreement), by kNN (the mean of the k nearest,
optionally distance-weighted or among the same label only) or by a small GNN over the kNN graph
(:mod:`~mimicfilter.extrapolate.gnn`).

* **Per-sample targets.** A scored sample's target is its mean ``mimic_score`` and mean
  ``mimic_weight`` over the scored run's epochs.
* **Choices on a held-out split of the scored samples only**: a seeded fraction of them is
  predicted from the rest; k (kNN), the stopping epoch (GNN) and, with ``--features auto``, the
  feature set are the ones with the highest Spearman ρ between predicted and true mean scores.
  Unscored samples never enter a choice. That ρ is printed and stored in stats.json; below
  ``--min-rho`` the run is marked untrusted (``trusted: false``) and ``extrapolate`` says the
  extrapolated scores should not be used for filtering.
* **Blocked search.** Similarities are computed block by block (``block_size`` queries ×
  ``reference_block`` scored samples at most), so the full N×M similarity matrix never exists.
* **Output**: a normal run directory (run.json, scores/ parts, stats.json, _SUCCESS) with the score
  schema plus a boolean ``extrapolated`` column, one row per sample at epoch 0 (step −1): scored
  samples keep their true (epoch-mean) scores, unscored ok samples get predictions
  (``loss``/``clip_score``/``ref_loss`` null), bad samples keep their status and null scores.
  ``filter`` and ``report`` read it like any score run.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from mimicfilter.errors import MimicfilterError
from mimicfilter.extrapolate.features import FEATURE_CHOICES, Embedded, available_features
from mimicfilter.extrapolate.gnn import GnnSettings
from mimicfilter.extrapolate.methods import (
    HOLDOUT_BY,
    METHODS,
    Fitted,
    ReferenceSet,
    SearchSettings,
    Split,
    fit_gnn,
    fit_knn,
    holdout_split,
)
from mimicfilter.extrapolate.output import write_predictions
from mimicfilter.extrapolate.sources import (
    Scored,
    Source,
    check_spaces,
    embeddings_numpy,
    iter_embed_parts,
    open_run,
    read_embed_part,
    read_scored,
    scored_run_embeddings,
)
from mimicfilter.mimic.device import resolve_device
from mimicfilter.store.parts import table_stats
from mimicfilter.store.rundir import RunDirectory
from mimicfilter.store.schema import EMBEDDING_COLUMN, EXTRAPOLATED_COLUMN

DEFAULT_K_CANDIDATES = (1, 2, 5, 10, 20, 50)
DEFAULT_MIN_RHO = 0.5  # held-out rho below this: the extrapolated scores are not to be trusted (docs/usage.md)


@dataclass(frozen=True)
class ExtrapolateConfig:
    """Everything ``mimicfilter extrapolate`` needs; validated once, up front."""

    scored: Path
    out_dir: Path
    embeddings: tuple[Path, ...] = ()
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
    block_size: int = 4096  # queries per similarity block
    reference_block: int = 65536  # scored samples per similarity block
    device: str = "cpu"
    seed: int = 0
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
        if self.block_size < 1 or self.reference_block < 1:
            raise MimicfilterError("--block-size and --reference-block must be at least 1")
        out = self.out_dir.resolve()
        for source in (self.scored, *self.embeddings):
            if Path(source).resolve() == out:
                raise MimicfilterError(f"--out {self.out_dir} is also an input run", hint="write to a new directory")

    def choices(self) -> dict[str, Any]:
        """What changes the result (the fingerprint and run.json record it)."""
        chosen = {"method": self.method, "features": self.features, "same_label": self.same_label,
                  "holdout_fraction": self.holdout_fraction, "holdout_by": self.holdout_by, "seed": self.seed}
        if self.method == "knn":
            return chosen | {"k_candidates": list(self.k_candidates), "weighted": self.weighted}
        return chosen | {"graph_k": self.graph_k, "gnn": asdict(self.gnn)}


def _fingerprint(config: ExtrapolateConfig, scored: Source, embedding_sources: list[Source], device: torch.device) -> dict:
    return {
        "format": 2,
        "kind": "extrapolate",
        "scored": scored.info.get("fingerprint"),
        "embeddings": [source.info.get("fingerprint") for source in embedding_sources],
        **config.choices(),
        "device_type": device.type,
    }


# ------------------------------------------------------------------------------------- the steps


def open_sources(config: ExtrapolateConfig) -> tuple[Source, list[Source], dict[str, Any]]:
    """Step 1: the scored run, the embeddings runs, and the one embedding space they share."""
    scored_source = open_run(Path(config.scored), "--scored run")
    embedding_sources = [open_run(Path(path), "--embeddings run") for path in config.embeddings]
    for source in embedding_sources:
        if source.space is None:
            raise MimicfilterError(f"{source.path} holds no embeddings",
                                   hint="make it with `mimicfilter embed` or `score --save-embeddings`")
    spaces = [source for source in [scored_source, *embedding_sources] if source.space is not None]
    if not spaces:
        raise MimicfilterError(
            f"no embeddings: {config.scored} was scored without --save-embeddings and no --embeddings run is given",
            hint="embed the pool with `mimicfilter embed` and pass --embeddings RUN",
        )
    return scored_source, embedding_sources, check_spaces(spaces)


def _embeddings_of_scored(scored_source: Source, embedding_sources: list[Source], scored: Scored,
                          has_score: np.ndarray, columns: tuple[str, ...], dim: int) -> dict[int, np.ndarray]:
    """Scored-table position → embedding [sides, D]: the scored run's own, else from the embeddings runs."""
    vectors = scored_run_embeddings(scored_source, scored) if scored_source.space is not None else {}
    wanted = {position for position in np.flatnonzero(has_score).tolist() if position not in vectors}
    if not wanted:
        return vectors
    for _, part in iter_embed_parts(embedding_sources):
        table = read_embed_part(part, columns)
        table = table.filter(table.column(EMBEDDING_COLUMN).is_valid())
        if not table.num_rows:
            continue
        rows = [(row, scored.position.get(pair)) for row, pair in
                enumerate(zip(table.column("shard").to_pylist(), table.column("key").to_pylist()))]
        rows = [(row, position) for row, position in rows if position in wanted]
        if rows:
            block = np.stack([embeddings_numpy(table.column(name), dim) for name in columns], axis=1)
            for row, position in rows:
                vectors[position] = block[row]
                wanted.discard(position)
    return vectors


def reference_set(config: ExtrapolateConfig, scored_source: Source, embedding_sources: list[Source], scored: Scored,
                  columns: tuple[str, ...], dim: int) -> ReferenceSet:
    """Step 2: the scored samples' targets (epoch means), embeddings and (with --same-label) labels."""
    mean_score = np.asarray(scored.table.column("mimic_score").to_numpy(zero_copy_only=False), dtype=np.float64)
    mean_weight = np.asarray(scored.table.column("mimic_weight").to_numpy(zero_copy_only=False), dtype=np.float64)
    statuses = scored.table.column("status").to_pylist()
    has_score = np.array([status == "ok" for status in statuses]) & ~np.isnan(mean_score)
    vectors = _embeddings_of_scored(scored_source, embedding_sources, scored, has_score, columns, dim)
    positions = np.array(sorted(p for p in vectors if has_score[p]), dtype=np.int64)
    if not len(positions):
        raise MimicfilterError(
            f"none of the {int(has_score.sum())} scored samples of {config.scored} has an embedding",
            hint="score with --save-embeddings, or embed the scored shards too (same shard paths as when scoring)",
        )
    stacked = torch.from_numpy(np.stack([vectors[p] for p in positions]).astype(np.float32))  # [M, sides, D]
    embedded = Embedded(stacked[:, 0], stacked[:, 1] if stacked.shape[1] > 1 else None)
    values = torch.from_numpy(np.stack([mean_score[positions], mean_weight[positions]], 1))
    labels = None
    if config.same_label:
        label_values = np.asarray(scored.table.column("label").to_numpy(zero_copy_only=False), dtype=float)[positions]
        if np.isnan(label_values).any():
            raise MimicfilterError("--same-label needs labels, and scored samples without one were found",
                                   hint="--same-label is for classification runs (shards with .cls)")
        labels = torch.from_numpy(label_values.astype(np.int64))
    shards = np.asarray(scored.table.column("shard").to_pylist(), dtype=object)[positions]
    return ReferenceSet(positions, embedded, values, labels, int(has_score.sum()), shards)


def fit(config: ExtrapolateConfig, reference: ReferenceSet,
        search: SearchSettings) -> tuple[Fitted, dict[str, float], Split]:
    """Step 3: the method fitted on each candidate feature set; the best held-out rho wins (ties:
    the first of image, pair). Returns the winner, every candidate's held-out rho and the split."""
    available = available_features(reference.embedded)
    if config.features not in ("auto", *available):
        raise MimicfilterError(f"--features {config.features}: the embeddings hold the image side only "
                               "(made by an older mimicfilter)", hint="re-embed with this version, or pass --features image")
    candidates = available if config.features == "auto" else (config.features,)
    shards = reference.shards if config.holdout_by == "shard" else None
    split = holdout_split(len(reference.positions), config.holdout_fraction, config.seed, shards)
    fits = []
    for features in candidates:
        if config.method == "knn":
            fits.append(fit_knn(reference, features, split, config.k_candidates, config.weighted, search))
        else:
            fits.append(fit_gnn(reference, features, split, config.graph_k, config.gnn, search))
    by_features = {fitted.features: fitted.heldout_spearman for fitted in fits}
    best = max(fits, key=lambda fitted: np.nan_to_num(fitted.heldout_spearman, nan=-2.0))
    return best, by_features, split


def describe(fitted: Fitted, by_features: dict[str, float], split: Split) -> str:
    """One line: the method, what it chose and the held-out rho it reached."""
    if fitted.method == "knn":
        by_k = ", ".join(f"k={k}: {rho:.3f}" for k, rho in fitted.details["heldout_spearman_by_k"].items())
        chosen = f"kNN, k = {fitted.details['k']} ({by_k})"
    else:
        chosen = (f"GNN, {fitted.details['graph_k']} neighbours, best epoch {fitted.details['best_epoch']} "
                  f"of {fitted.details['epochs_run']}")
    others = "; ".join(f"{name} {rho:.3f}" for name, rho in by_features.items())
    held = f"{len(split.holdout)} scored samples" + (f" in {split.shards_held_out} shard(s)" if split.by == "shard" else "")
    return (f"held-out split ({held}): {chosen} on {fitted.features} features, "
            f"Spearman rho {fitted.heldout_spearman:.3f} (by features: {others})")


def run_extrapolate(config: ExtrapolateConfig, observer: Callable | None = None,
                    echo: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Extrapolate the scored run's per-sample scores to the embedded samples; returns the stats.

    ``observer`` (tests) is told the shape of every similarity block; ``echo`` gets progress lines.
    """
    say = echo or (lambda message: None)
    run = RunDirectory(config.out_dir, "extrapolate", config.argv)
    device = resolve_device(config.device)
    scored_source, embedding_sources, space = open_sources(config)
    columns = (scored_source if scored_source.space else embedding_sources[0]).columns  # the same for all (checked)
    dim = int(space["dim"])
    scored = read_scored(scored_source)
    say(f"scored run: {scored.table.num_rows} samples")
    reference = reference_set(config, scored_source, embedding_sources, scored, columns, dim)

    fit_started = time.time()
    search = SearchSettings(config.block_size, config.reference_block, str(device), observer)
    fitted, by_features, split = fit(config, reference, search)
    heldout_size = len(split.holdout)
    say(describe(fitted, by_features, split))
    trusted = bool(fitted.heldout_spearman >= config.min_rho)  # NaN: not trusted

    provenance = {
        "scored_run": str(config.scored),
        "embeddings_runs": [str(path) for path in config.embeddings],
        "embedding": space,
        **config.choices(),
        "chosen": {"method": fitted.method, "features": fitted.features, **fitted.details},
        "min_rho": config.min_rho,
        "device": str(device),
    }
    run.open(_fingerprint(config, scored_source, embedding_sources, device), provenance, config.overwrite)
    written = write_predictions(config.out_dir, embedding_sources, scored, reference, fitted, columns, dim)
    fit_seconds = time.time() - fit_started

    counted = table_stats(config.out_dir, flag_column=EXTRAPOLATED_COLUMN)
    flagged = counted.pop(f"{EXTRAPOLATED_COLUMN}_rows")
    return run.finish(run.stats({
        **counted,
        "scored_samples": reference.scored_samples,
        "reference_samples": int(len(reference.positions)),
        "extrapolated_samples": flagged,
        "extrapolated_now": written.extrapolated,
        "fallback_samples": written.fallbacks,
        "method": fitted.method,
        "features": fitted.features,
        **fitted.details,
        "heldout_size": heldout_size,
        "heldout_train_size": len(split.train),
        "heldout_by": split.by,
        "heldout_shards": split.shards_held_out,
        "heldout_spearman": fitted.heldout_spearman,
        "heldout_spearman_weight": fitted.heldout_spearman_weight,
        "heldout_spearman_by_features": by_features,
        "min_rho": config.min_rho,
        "trusted": trusted,
        "same_label": config.same_label,
        "embedding_dim": dim,
        "embedding_columns": list(columns),
        "parts_written_now": written.parts_written,
        "extrapolate_seconds": round(fit_seconds, 3),
        "device": str(device),
    }))
