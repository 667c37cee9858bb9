"""kNN and GNN behind one interface: fit on the scored samples — a seeded held-out split of them
chooses the settings and estimates how well the method ranks — then predict any embedded samples.

The held-out split is drawn once from the scored samples alone and shared by every method and
feature set, so their held-out Spearman ρ are comparable and an unscored sample never takes part
in a choice. After the choice, predictions draw on every scored sample.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from mimicfilter.errors import MimicfilterError
from mimicfilter.extrapolate import gnn
from mimicfilter.extrapolate.features import Embedded
from mimicfilter.extrapolate.knn import MIN_HOLDOUT, Blend, choose_k, knn_predict, knn_search, search_without_self
from mimicfilter.metrics import spearman

METHODS = ("knn", "gnn")


@dataclass
class ReferenceSet:
    """The scored samples that have an embedding: what every prediction is drawn from."""

    positions: np.ndarray  # rows of the scored table
    embedded: Embedded  # [M]
    values: torch.Tensor  # [M, 2] float64: mean mimic score, mean relative weight
    labels: torch.Tensor | None  # with --same-label
    scored_samples: int  # scored samples with a score (some may lack an embedding)
    shards: np.ndarray | None = None  # each sample's shard (any ids): the held-out split can go by shard


@dataclass(frozen=True)
class SearchSettings:
    """How neighbours are found: blocked exact search, optionally among the same label only."""

    block_size: int = 4096
    reference_block: int = 65536
    device: str = "cpu"
    observer: Callable | None = None

    def search(self, queries: torch.Tensor, reference: torch.Tensor, k: int, query_labels=None,
               reference_labels=None) -> tuple[torch.Tensor, torch.Tensor]:
        return knn_search(queries, reference, k, query_labels=query_labels, reference_labels=reference_labels,
                          block_size=self.block_size, reference_block=self.reference_block, device=self.device,
                          observer=self.observer)


HOLDOUT_BY = ("shard", "sample")


@dataclass(frozen=True)
class Split:
    """Positions into the reference set: held out (to choose and report) and the rest (to fit)."""

    holdout: torch.Tensor
    train: torch.Tensor
    by: str = "sample"  # whole shards held out, or single samples
    shards_held_out: int = 0


def holdout_split(count: int, fraction: float, seed: int, shards: np.ndarray | None = None) -> Split:
    """A seeded ``fraction`` of the ``count`` scored samples held out (at least 3).

    With ``shards`` (each sample's shard) spanning two or more shards, whole shards are held out,
    in a seeded order until at least that many samples are, never every shard: held-out samples
    must then find their neighbours in other shards, as unscored samples do when whole shards are
    scored. Within a shard samples are often more alike than across shards (one source, one crawl,
    a sorted pool), and a split by sample would then promise more than extrapolation delivers.
    """
    holdout_size = max(MIN_HOLDOUT, int(round(count * fraction)))
    if count - holdout_size < 1:
        raise MimicfilterError(
            f"only {count} scored samples with embeddings: too few to hold out {MIN_HOLDOUT}+ and keep neighbours",
            hint="score more samples (or check that the scored run's samples have embeddings)",
        )
    rng = np.random.default_rng(seed)
    if shards is not None:
        names, shard_of = np.unique(shards, return_inverse=True)
        held, held_count = [], 0
        for shard in rng.permutation(len(names))[:-1]:  # at least one shard stays for training
            if held_count >= holdout_size:
                break
            held.append(shard)
            held_count += int((shard_of == shard).sum())
        if held_count >= holdout_size:
            mask = np.isin(shard_of, held)
            return Split(torch.as_tensor(np.flatnonzero(mask)), torch.as_tensor(np.flatnonzero(~mask)), "shard", len(held))
    order = rng.permutation(count)
    return Split(torch.as_tensor(np.sort(order[:holdout_size])), torch.as_tensor(np.sort(order[holdout_size:])))


@dataclass
class Fitted:
    """A method fitted on the scored samples; :meth:`predict` gives [Q, 2] (NaN: no neighbour)."""

    method: str
    features: str
    heldout_spearman: float
    heldout_spearman_weight: float
    details: dict[str, Any] = field(default_factory=dict)
    _predict: Callable[[Embedded, torch.Tensor | None], torch.Tensor] | None = None

    def predict(self, queries: Embedded, labels: torch.Tensor | None = None) -> torch.Tensor:
        return self._predict(queries, labels)


# ------------------------------------------------------------------------------------------------ kNN


def fit_knn(reference: ReferenceSet, features: str, split: Split, k_candidates: tuple[int, ...], weighted: bool,
            search: SearchSettings) -> Fitted:
    """k chosen on the held-out split (see :func:`~mimicfilter.extrapolate.knn.choose_k`); for
    pairs, the neighbour mean blended with the pair's agreement."""
    vectors = reference.embedded.neighbour_vectors(features)
    choice = choose_k(vectors, reference.values, k_candidates, split.holdout, split.train, labels=reference.labels,
                      weighted=weighted, signal=reference.embedded.signal(features), search=search.search)

    def predict(queries: Embedded, labels: torch.Tensor | None) -> torch.Tensor:
        sims, index = search.search(queries.neighbour_vectors(features), vectors, choice.k, labels, reference.labels)
        predicted = knn_predict(reference.values, sims, index, weighted)
        return predicted if choice.blend is None else choice.blend.apply(predicted, queries.signal(features))

    details = {"k": choice.k, "heldout_spearman_by_k": {str(k): rho for k, rho in choice.spearman_by_k.items()},
               "k_skipped": list(choice.skipped_candidates), "weighted": weighted}
    if choice.blend is not None:
        details["blend"] = [[round(float(c), 6) for c in row] for row in choice.blend.coefficients]
    return Fitted("knn", features, choice.spearman, choice.spearman_weight, details, predict)


# ------------------------------------------------------------------------------------------------ GNN


@dataclass(frozen=True)
class Standardiser:
    """Column means and deviations (of the scored samples only) to scale inputs and targets."""

    mean: torch.Tensor
    std: torch.Tensor

    @classmethod
    def of(cls, values: torch.Tensor) -> Standardiser:
        values = values.double()
        return cls(values.mean(dim=0), values.std(dim=0).nan_to_num(1.0).clamp(min=1e-12))

    def apply(self, values: torch.Tensor) -> torch.Tensor:
        return ((values.double() - self.mean) / self.std).float()

    def invert(self, values: torch.Tensor) -> torch.Tensor:
        return values.double() * self.std + self.mean


def fit_gnn(reference: ReferenceSet, features: str, split: Split, graph_k: int, settings: gnn.GnnSettings,
            search: SearchSettings) -> Fitted:
    """Train on the training split's graph, stop early on the held-out split, then predict from a
    graph over every scored sample."""
    vectors = reference.embedded.neighbour_vectors(features)
    scale_inputs = Standardiser.of(reference.embedded.node_inputs(features))
    inputs = scale_inputs.apply(reference.embedded.node_inputs(features))
    scale_targets = Standardiser.of(reference.values[split.train])
    targets = scale_targets.apply(reference.values)
    labels = reference.labels
    train, holdout = split.train, split.holdout

    def labels_of(index):
        return None if labels is None else labels[index]

    signal = reference.embedded.signal(features)
    signal = 0 if signal is None else signal.shape[1]  # the trailing input columns the GNN weighs linearly
    pool = gnn.Pool(inputs[train], targets[train],
                    search_without_self(vectors[train], graph_k, labels_of(train), search.search)[1], signal)
    _, holdout_neighbours = search.search(vectors[holdout], vectors[train], graph_k, labels_of(holdout), labels_of(train))
    fit = gnn.train(pool, inputs[holdout], holdout_neighbours, targets[holdout], settings, search.device)
    heldout_weight = spearman(fit.heldout_predictions[:, 1].numpy().astype(np.float64),
                              reference.values[holdout, 1].numpy())
    everything = gnn.Pool(inputs, targets, search_without_self(vectors, graph_k, labels, search.search)[1], signal)

    def predict(queries: Embedded, query_labels: torch.Tensor | None) -> torch.Tensor:
        _, index = search.search(queries.neighbour_vectors(features), vectors, graph_k, query_labels, labels)
        predicted = scale_targets.invert(gnn.predict(fit.model, everything, scale_inputs.apply(queries.node_inputs(features)),
                                                     index, settings.batch_nodes))
        predicted[(index < 0).all(dim=1)] = float("nan")  # no neighbour: nothing to extrapolate from
        return predicted

    details = {"graph_k": graph_k, "best_epoch": fit.best_epoch, "epochs_run": fit.epochs_run,
               "hidden": settings.hidden, "batch_nodes": settings.batch_nodes, "fanout": settings.fanout,
               "full_batch": len(train) <= settings.batch_nodes}
    return Fitted("gnn", features, fit.heldout_spearman, heldout_weight, details, predict)
