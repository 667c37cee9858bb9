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
from mimicfilter.extrapolate.index import ScoredIndex, gpu_count
from mimicfilter.extrapolate.knn import MIN_HOLDOUT, Blend, choose_k, knn_predict, without_self
from mimicfilter.extrapolate.recall import RECALL_TARGET, tune_search
from mimicfilter.metrics import spearman

METHODS = ("knn", "gnn")
# The GNN keeps every scored sample's inputs (2·d + 1 floats for pairs) and neighbour lists in memory
# and trains over them for up to --gnn-epochs epochs; beyond this many scored samples kNN is the method.
GNN_MAX_SCORED = 200_000


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
    """How neighbours are found: which faiss index (``auto``: by size, :func:`~mimicfilter.extrapolate.
    index.plan_index`), for about how many queries to come, the recall an IVF index is tuned to,
    where it searches, and how many queries go to faiss at a time (``observer``, tests: told each count)."""

    index: str = "auto"
    query_count: int = 0  # the unscored samples to predict (the scored ones are added)
    recall_target: float = RECALL_TARGET
    device: str = "cpu"
    seed: int = 0
    block_size: int = 16384
    observer: Callable[[int], None] | None = None


def search_blocks(index: ScoredIndex, vectors: Callable[[np.ndarray], torch.Tensor], count: int, k: int,
                  labels: np.ndarray | None, allowed: np.ndarray | None,
                  settings: SearchSettings) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of ``count`` queries (``vectors(rows)`` gives them), ``settings.block_size`` at a time."""
    sims = torch.full((count, k), float("-inf"))
    ids = torch.full((count, k), -1, dtype=torch.long)
    for start in range(0, count, settings.block_size):
        rows = np.arange(start, min(count, start + settings.block_size))
        if settings.observer is not None:
            settings.observer(len(rows))
        block = index.search(vectors(rows).numpy(), k, None if labels is None else labels[rows], allowed)
        sims[rows], ids[rows] = torch.from_numpy(block[0]), torch.from_numpy(block[1])
    return sims, ids


class Neighbours:
    """The index over the reference set's vectors of one feature set; searched by rows of the set."""

    def __init__(self, reference: ReferenceSet, features: str, settings: SearchSettings):
        self.reference, self.features, self.settings = reference, features, settings
        self.labels = None if reference.labels is None else reference.labels.numpy()
        count = len(reference.positions)
        gpu = settings.device.startswith("cuda") and gpu_count() > 0
        self.index = ScoredIndex.build(self.vectors, count, reference.embedded.dim(features), self.labels,
                                       settings.query_count + count, settings.index, settings.seed,
                                       lambda sub, vectors: tune_search(sub, vectors, settings.seed, settings.recall_target),
                                       gpu)
        self.index.use_device(settings.device)

    def vectors(self, rows: np.ndarray) -> np.ndarray:
        return self.reference.embedded.neighbour_vectors(self.features, rows).numpy()

    def of_rows(self, rows: np.ndarray, k: int, allowed: np.ndarray | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The top-k among the ``allowed`` scored samples of the scored samples ``rows``."""
        rows = np.asarray(rows)
        return search_blocks(self.index, lambda block: torch.from_numpy(self.vectors(rows[block])), len(rows), k,
                             None if self.labels is None else self.labels[rows], allowed, self.settings)


def query_neighbours(index: ScoredIndex, queries: Embedded, features: str, k: int, labels: torch.Tensor | None,
                     settings: SearchSettings) -> tuple[torch.Tensor, torch.Tensor]:
    return search_blocks(index, lambda rows: queries.neighbour_vectors(features, rows), len(queries), k,
                         None if labels is None else labels.numpy(), None, settings)


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


@dataclass
class KnnPredictor:
    """kNN at the chosen k: the neighbours' mean (blended with the pair's agreement for pairs)."""

    features: str
    k: int
    weighted: bool
    values: torch.Tensor  # [M, 2] the scored samples' targets
    blend: Blend | None = None

    def predict(self, index: ScoredIndex, queries: Embedded, labels: torch.Tensor | None,
                settings: SearchSettings) -> torch.Tensor:
        sims, ids = query_neighbours(index, queries, self.features, self.k, labels, settings)
        predicted = knn_predict(self.values, sims, ids, self.weighted)
        return predicted if self.blend is None else self.blend.apply(predicted, queries.signal(self.features))


@dataclass
class GnnPredictor:
    """The trained GNN over the graph of every scored sample; a query's edges are its graph_k nearest."""

    features: str
    graph_k: int
    model: gnn.SageRegressor
    pool: gnn.Pool
    scale_inputs: Standardiser
    scale_targets: Standardiser
    batch_nodes: int

    def predict(self, index: ScoredIndex, queries: Embedded, labels: torch.Tensor | None,
                settings: SearchSettings) -> torch.Tensor:
        _, ids = query_neighbours(index, queries, self.features, self.graph_k, labels, settings)
        inputs = self.scale_inputs.apply(queries.node_inputs(self.features))
        predicted = self.scale_targets.invert(gnn.predict(self.model, self.pool, inputs, ids, self.batch_nodes))
        predicted[(ids < 0).all(dim=1)] = float("nan")  # no neighbour: nothing to extrapolate from
        return predicted


@dataclass
class Fitted:
    """A method fitted on the scored samples, with its index; :meth:`predict` gives [Q, 2] (NaN: no neighbour)."""

    method: str
    features: str
    heldout_spearman: float
    heldout_spearman_weight: float
    details: dict[str, Any] = field(default_factory=dict)
    predictor: KnnPredictor | GnnPredictor | None = None
    index: ScoredIndex | None = None
    settings: SearchSettings = field(default_factory=SearchSettings)

    def predict(self, queries: Embedded, labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.predictor.predict(self.index, queries, labels, self.settings)


# ------------------------------------------------------------------------------------------------ kNN


def fit_knn(reference: ReferenceSet, features: str, split: Split, k_candidates: tuple[int, ...], weighted: bool,
            search: SearchSettings) -> Fitted:
    """k chosen on the held-out split (see :func:`~mimicfilter.extrapolate.knn.choose_k`); for
    pairs, the neighbour mean blended with the pair's agreement."""
    neighbours = Neighbours(reference, features, search)
    choice = choose_k(neighbours.of_rows, reference.values, k_candidates, split.holdout, split.train,
                      weighted=weighted, signal=reference.embedded.signal(features))
    details = {"k": choice.k, "heldout_spearman_by_k": {str(k): rho for k, rho in choice.spearman_by_k.items()},
               "k_skipped": list(choice.skipped_candidates), "weighted": weighted}
    if choice.blend is not None:
        details["blend"] = [[round(float(c), 6) for c in row] for row in choice.blend.coefficients]
    predictor = KnnPredictor(features, choice.k, weighted, reference.values, choice.blend)
    return Fitted("knn", features, choice.spearman, choice.spearman_weight, details, predictor, neighbours.index, search)


# ------------------------------------------------------------------------------------------------ GNN


def fit_gnn(reference: ReferenceSet, features: str, split: Split, graph_k: int, settings: gnn.GnnSettings,
            search: SearchSettings) -> Fitted:
    """Train on the training split's graph, stop early on the held-out split, then predict from a
    graph over every scored sample. Every graph comes from the one index over the scored samples."""
    if len(reference.positions) > GNN_MAX_SCORED:
        raise MimicfilterError(
            f"--method gnn: {len(reference.positions)} scored samples is beyond its {GNN_MAX_SCORED} (it holds every "
            "scored sample's inputs and edges in memory and trains over them for epochs)",
            hint="use --method knn (its index scales to billions of samples)")
    neighbours = Neighbours(reference, features, search)
    scale_inputs = Standardiser.of(reference.embedded.node_inputs(features))
    inputs = scale_inputs.apply(reference.embedded.node_inputs(features))
    scale_targets = Standardiser.of(reference.values[split.train])
    targets = scale_targets.apply(reference.values)
    train, holdout = split.train.numpy(), split.holdout.numpy()
    count = len(reference.positions)
    allowed = np.zeros(count, dtype=bool)
    allowed[train] = True
    local = torch.full((count + 1,), -1, dtype=torch.long)  # scored-set id → position in the training split
    local[torch.as_tensor(train)] = torch.arange(len(train))

    def to_train(ids: torch.Tensor) -> torch.Tensor:
        return local[ids]  # id −1 reads the last slot: −1

    signal = reference.embedded.signal(features)
    signal = 0 if signal is None else signal.shape[1]  # the trailing input columns the GNN weighs linearly
    train_edges = without_self(*neighbours.of_rows(train, graph_k + 1, allowed), train, graph_k)[1]
    pool = gnn.Pool(inputs[train], targets[train], to_train(train_edges), signal)
    holdout_neighbours = to_train(neighbours.of_rows(holdout, graph_k, allowed)[1])
    fit = gnn.train(pool, inputs[holdout], holdout_neighbours, targets[holdout], settings, search.device)
    heldout_weight = spearman(fit.heldout_predictions[:, 1].numpy().astype(np.float64),
                              reference.values[holdout, 1].numpy())
    everything = np.arange(count)
    edges = without_self(*neighbours.of_rows(everything, graph_k + 1, None), everything, graph_k)[1]
    predictor = GnnPredictor(features, graph_k, fit.model.cpu(), gnn.Pool(inputs, targets, edges, signal),
                             scale_inputs, scale_targets, settings.batch_nodes)
    details = {"graph_k": graph_k, "best_epoch": fit.best_epoch, "epochs_run": fit.epochs_run,
               "hidden": settings.hidden, "batch_nodes": settings.batch_nodes, "fanout": settings.fanout,
               "full_batch": len(train) <= settings.batch_nodes}
    return Fitted("gnn", features, fit.heldout_spearman, heldout_weight, details, predictor, neighbours.index, search)
