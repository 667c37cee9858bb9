"""Step 3 of ``extrapolate``: the method fitted on each candidate feature set (the best held-out ρ
wins), described in one line, and the record the saved extrapolator and stats.json carry."""

from __future__ import annotations

from typing import Any

import numpy as np

from mimicfilter.errors import MimicfilterError
from mimicfilter.extrapolate.config import ExtrapolateConfig
from mimicfilter.extrapolate.features import available_features
from mimicfilter.extrapolate.methods import Fitted, ReferenceSet, SearchSettings, Split, fit_gnn, fit_knn, holdout_split
from mimicfilter.extrapolate.sources import Scored

MISSING_EXAMPLES = 3  # scored samples without an embedding named in stats.json


def fit(config: ExtrapolateConfig, reference: ReferenceSet, search: SearchSettings) -> tuple[Fitted, dict[str, float], Split]:
    """The method fitted on each candidate feature set; the best held-out rho wins (ties: the first
    of image, pair). Returns the winner, every candidate's held-out rho and the split."""
    available = available_features(reference.embedded)
    if config.features not in ("auto", *available):
        raise MimicfilterError(f"--features {config.features}: the embeddings hold the image side only "
                               "(made by an older mimicfilter, or one --embedding-column)",
                               hint="re-embed with this version, name a text column too, or pass --features image")
    candidates = available if config.features == "auto" else (config.features,)
    shards = reference.shards if config.holdout_by == "shard" else None
    split = holdout_split(len(reference.positions), config.holdout_fraction, config.seed, shards)
    best, by_features = None, {}
    for features in candidates:  # one index in memory at a time: the loser's is dropped
        if config.method == "knn":
            fitted = fit_knn(reference, features, split, config.k_candidates, config.weighted, search)
        else:
            fitted = fit_gnn(reference, features, split, config.graph_k, config.gnn, search)
        by_features[features] = fitted.heldout_spearman
        if best is None or np.nan_to_num(fitted.heldout_spearman, nan=-2.0) > np.nan_to_num(best.heldout_spearman, nan=-2.0):
            best = fitted
        del fitted
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
    index = fitted.index.describe()
    searched = f"{index['kind']} index" + (f", nprobe {index['nprobe']} (recall@{index['recall_k']} {index['recall']:.3f})"
                                           if index.get("nprobe") else "")
    return (f"held-out split ({held}): {chosen} on {fitted.features} features, "
            f"Spearman rho {fitted.heldout_spearman:.3f} (by features: {others}); {searched}")


def _missing_examples(scored: Scored, missing: np.ndarray) -> list[str]:
    table = scored.table.take(missing[:MISSING_EXAMPLES])
    return [f"{shard} {key}" + (f" (uid {uid})" if uid else "") for shard, key, uid in
            zip(table.column("shard").to_pylist(), table.column("key").to_pylist(), table.column("uid").to_pylist())]


def fit_record(config: ExtrapolateConfig, fitted: Fitted, by_features: dict[str, float], split: Split,
               reference: ReferenceSet, scored: Scored, missing: np.ndarray, fingerprint: dict) -> dict[str, Any]:
    """What the saved extrapolator and stats.json record of the fit."""
    return {
        "fingerprint": fingerprint,
        "method": fitted.method,
        "features": fitted.features,
        "chosen": {"method": fitted.method, "features": fitted.features, **fitted.details},
        **fitted.details,
        "index": fitted.index.describe(),
        "scored_samples": reference.scored_samples,
        "reference_samples": int(len(reference.positions)),
        "scored_without_embedding": int(len(missing)),
        "scored_without_embedding_examples": _missing_examples(scored, missing),
        "scored_mean": reference.values.mean(dim=0).tolist(),
        "heldout_size": len(split.holdout),
        "heldout_train_size": len(split.train),
        "heldout_by": split.by,
        "heldout_shards": split.shards_held_out,
        "heldout_spearman": fitted.heldout_spearman,
        "heldout_spearman_weight": fitted.heldout_spearman_weight,
        "heldout_spearman_by_features": by_features,
        "same_label": config.same_label,
        "embedding_dim": int(reference.embedded.image.shape[1]),
    }
