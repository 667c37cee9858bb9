"""A small GraphSAGE regressor over the k-nearest-neighbour graph, in plain torch with sparse ops.

The graph: every node (a sample) links to its k nearest *scored* samples (never itself), found by
the blocked search of :mod:`~mimicfilter.extrapolate.knn`. The pool of scored samples that edges
may point to is the training split while the model is fitted and selected, and every scored sample
when the unscored ones are predicted — so fitting never sees an unscored sample, and the held-out
split is predicted exactly as an unscored sample would be.

Two mean-aggregation layers (``h = relu(W_self x + W_neigh mean_j x_j)``). The first sees only
input features; the second also receives the neighbours' known scores, so a node's own score
never reaches its own prediction (its neighbours' first-layer states carry no scores). The model
therefore learns how to combine "what my scored neighbours got" with "what I and they look like"
(for pairs: the pair's own image–text agreement), where plain kNN can only average.

Memory and time are bounded by the batch, not by the graph: a step takes ``batch_nodes`` target
nodes, samples ``fanout`` of each node's neighbours per hop (all of them when the scored set fits
one batch: then training is full-batch and deterministic), gathers just those nodes' features and
multiplies by sparse mean-adjacency matrices (``torch.sparse.mm``). Evaluation and prediction use
every neighbour (no sampling), one batch of targets at a time.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mimicfilter.errors import MimicfilterError
from mimicfilter.extrapolate.knn import Blend
from mimicfilter.metrics import spearman


@dataclass(frozen=True)
class GnnSettings:
    """Training settings of the GNN; validated once."""

    hidden: int = 64
    max_epochs: int = 300
    patience: int = 30  # stop after this many epochs without a lower held-out error
    lr: float = 5e-3
    weight_decay: float = 1e-4
    batch_nodes: int = 65536  # target nodes per step; a scored set this small trains full-batch
    fanout: int = 10  # neighbours sampled per node and hop in mini-batches
    seed: int = 0

    def __post_init__(self):
        for name in ("hidden", "max_epochs", "batch_nodes", "fanout"):
            if getattr(self, name) < 1:
                raise MimicfilterError(f"GNN setting {name} = {getattr(self, name)}: must be at least 1")
        if self.patience < 1 or self.lr <= 0 or self.weight_decay < 0:
            raise MimicfilterError("GNN settings: patience >= 1, lr > 0, weight decay >= 0")


@dataclass
class Pool:
    """The scored nodes edges point to: standardised inputs [P, F], standardised targets [P, T] and
    neighbour lists [P, k] into the pool (−1 where there is none; never the node itself).
    ``signal_columns``: the trailing input columns the model also weighs linearly."""

    inputs: torch.Tensor
    targets: torch.Tensor
    neighbours: torch.Tensor
    signal_columns: int = 0


class SageRegressor(nn.Module):
    """Two GraphSAGE mean layers (the second aggregates the neighbours' states and known targets),
    plus two linear paths: the neighbours' mean target (weight 1 at the start) and the node's last
    ``linear_inputs`` input columns (weight 0; for pairs: the agreement, a strong low-dimensional
    signal that a few hundred scored samples can weigh without overfitting). With the layers'
    output initialised to zero, an untrained model is exactly the kNN mean over the graph's
    neighbours, and training learns corrections to it."""

    def __init__(self, in_features: int, hidden: int, targets: int, linear_inputs: int = 0):
        super().__init__()
        self.self1 = nn.Linear(in_features, hidden)
        self.neigh1 = nn.Linear(in_features, hidden, bias=False)
        self.self2 = nn.Linear(hidden, hidden)
        self.neigh2 = nn.Linear(hidden + targets, hidden, bias=False)
        self.out = nn.Linear(hidden, targets)
        self.linear_inputs = linear_inputs
        self.own = nn.Linear(linear_inputs, targets, bias=False) if linear_inputs else None
        self.neighbour_mean = nn.Parameter(torch.ones(targets))
        for layer in (self.out, self.own):
            if layer is not None:
                nn.init.zeros_(layer.weight)
        nn.init.zeros_(self.out.bias)

    def first(self, inputs: torch.Tensor, neighbour_mean: torch.Tensor) -> torch.Tensor:
        return F.relu(self.self1(inputs) + self.neigh1(neighbour_mean))

    def second(self, state: torch.Tensor, inputs: torch.Tensor, neighbour_mean: torch.Tensor) -> torch.Tensor:
        """``neighbour_mean``: the mean of [first-layer state, target] over the neighbours."""
        hidden = F.relu(self.self2(state) + self.neigh2(neighbour_mean))
        targets = neighbour_mean[:, -self.neighbour_mean.shape[0]:]
        predicted = self.out(hidden) + self.neighbour_mean * targets
        return predicted if self.own is None else predicted + self.own(inputs[:, inputs.shape[1] - self.linear_inputs:])


def neighbour_means(pool: Pool) -> torch.Tensor:
    """Each pool node's mean target over its pool neighbours [P, T] (NaN without neighbours)."""
    valid = (pool.neighbours >= 0).unsqueeze(-1)
    gathered = pool.targets[pool.neighbours.clamp(min=0)] * valid
    count = valid.sum(dim=1)
    return torch.where(count > 0, gathered.sum(dim=1) / count.clamp(min=1), torch.full_like(gathered[:, 0], float("nan")))


def init_linear_paths(model: SageRegressor, pool: Pool) -> None:
    """Start the linear paths at the least-squares blend of the neighbour mean and the signal on the
    pool (:class:`~mimicfilter.extrapolate.knn.Blend`), so epoch 0 is the blended kNN at this k."""
    signal = pool.inputs[:, pool.inputs.shape[1] - pool.signal_columns:]
    blend = Blend.fit(neighbour_means(pool), signal, pool.targets).coefficients.float()
    with torch.no_grad():
        model.neighbour_mean.copy_(blend[:, 0])
        if model.own is not None:
            model.own.weight.copy_(blend[:, 1:-1])
        model.out.bias.copy_(blend[:, -1])


def _sample(neighbours: torch.Tensor, fanout: int, generator: torch.Generator | None) -> torch.Tensor:
    """``fanout`` of each row's valid neighbours, at random (all of them without a generator)."""
    if generator is None or neighbours.shape[1] <= fanout:
        return neighbours
    keys = torch.rand(neighbours.shape, generator=generator)
    keys[neighbours < 0] = 2.0  # padding sorts last
    picked = keys.argsort(dim=1)[:, :fanout]
    return neighbours.gather(1, picked)


def _mean_adjacency(neighbours: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sparse [R, U] row-mean adjacency, the U distinct neighbour ids) of neighbour lists [R, k]."""
    valid = neighbours >= 0
    nodes, local = torch.unique(neighbours[valid], return_inverse=True)
    rows = torch.arange(neighbours.shape[0]).repeat_interleave(valid.sum(dim=1))
    degree = valid.sum(dim=1).clamp(min=1).to(torch.float32)
    adjacency = torch.sparse_coo_tensor(torch.stack([rows, local]), 1.0 / degree[rows],
                                        (neighbours.shape[0], len(nodes)), check_invariants=False)
    return adjacency.coalesce(), nodes


def forward_targets(model: SageRegressor, pool: Pool, inputs: torch.Tensor, neighbours: torch.Tensor,
                    fanout: int, generator: torch.Generator | None = None,
                    observer: Callable[[int], None] | None = None) -> torch.Tensor:
    """Predicted standardised targets [B, T] of B target nodes (their inputs and pool neighbours).

    Only the nodes within two hops are gathered (on the pool's device, the CPU) and moved to the
    model's device; ``observer`` (tests) is told how many pool nodes one call touched.
    """
    device = next(model.parameters()).device
    adjacency, hop1 = _mean_adjacency(_sample(neighbours, fanout, generator))
    hop1_adjacency, hop2 = _mean_adjacency(_sample(pool.neighbours[hop1], fanout, generator))
    if observer is not None:
        observer(len(torch.unique(torch.cat([hop1, hop2]))))
    adjacency, hop1_adjacency = adjacency.to(device), hop1_adjacency.to(device)
    hop1_inputs = pool.inputs[hop1].to(device)
    hop1_state = model.first(hop1_inputs, torch.sparse.mm(hop1_adjacency, pool.inputs[hop2].to(device)))
    inputs = inputs.to(device)
    state = model.first(inputs, torch.sparse.mm(adjacency, hop1_inputs))
    messages = torch.cat([hop1_state, pool.targets[hop1].to(device)], dim=1)
    return model.second(state, inputs, torch.sparse.mm(adjacency, messages))


def predict(model: SageRegressor, pool: Pool, inputs: torch.Tensor, neighbours: torch.Tensor,
            batch_nodes: int, observer: Callable[[int], None] | None = None) -> torch.Tensor:
    """Standardised predictions for every target, ``batch_nodes`` at a time, with all neighbours."""
    model.eval()
    parts = []
    with torch.no_grad():
        for start in range(0, inputs.shape[0], batch_nodes):
            stop = start + batch_nodes
            parts.append(forward_targets(model, pool, inputs[start:stop], neighbours[start:stop], 0, None, observer).cpu())
    return torch.cat(parts) if parts else torch.zeros(0, pool.targets.shape[1])


@dataclass
class GnnFit:
    """The trained model (its best held-out epoch) and how the held-out split went."""

    model: SageRegressor
    heldout_spearman: float  # of the first target, at the best epoch
    heldout_predictions: torch.Tensor  # standardised, [H, T]
    best_epoch: int
    epochs_run: int
    history: list[float] = field(default_factory=list)  # held-out error per epoch


def train(pool: Pool, heldout_inputs: torch.Tensor, heldout_neighbours: torch.Tensor, heldout_targets: torch.Tensor,
          settings: GnnSettings, device: torch.device | str = "cpu", observer: Callable[[int], None] | None = None) -> GnnFit:
    """Fit on the pool's own nodes (each predicted from its pool neighbours); keep the epoch with the
    lowest held-out squared error of the first (standardised) target — smoother than rho on a small
    split, and it also asks for the right scale — and stop after ``patience`` epochs without one."""
    count = pool.inputs.shape[0]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        model = SageRegressor(pool.inputs.shape[1], settings.hidden, pool.targets.shape[1], pool.signal_columns)
    init_linear_paths(model, pool)
    model = model.to(device)
    generator = torch.Generator().manual_seed(settings.seed)
    full_batch = count <= settings.batch_nodes
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    best_predictions = predict(model, pool, heldout_inputs, heldout_neighbours, settings.batch_nodes, observer)
    best_error = float(F.mse_loss(best_predictions[:, 0], heldout_targets[:, 0]))  # epoch 0: the kNN mean
    best_state, best_epoch, history = copy.deepcopy(model.state_dict()), 0, [best_error]
    epoch = 0
    for epoch in range(1, settings.max_epochs + 1):
        model.train()
        order = torch.arange(count) if full_batch else torch.randperm(count, generator=generator)
        for start in range(0, count, settings.batch_nodes):
            batch = order[start : start + settings.batch_nodes]
            predicted = forward_targets(model, pool, pool.inputs[batch], pool.neighbours[batch], settings.fanout,
                                        None if full_batch else generator, observer)
            loss = F.mse_loss(predicted, pool.targets[batch].to(predicted.device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        predictions = predict(model, pool, heldout_inputs, heldout_neighbours, settings.batch_nodes, observer)
        error = float(F.mse_loss(predictions[:, 0], heldout_targets[:, 0]))
        history.append(error)
        if error < best_error:
            best_error, best_state, best_epoch, best_predictions = error, copy.deepcopy(model.state_dict()), epoch, predictions
        elif epoch - best_epoch >= settings.patience:
            break
    model.load_state_dict(best_state)
    model.eval()  # stays on ``device``; predict() returns CPU tensors
    rho = spearman(best_predictions[:, 0].numpy().astype(np.float64), heldout_targets[:, 0].numpy().astype(np.float64))
    return GnnFit(model, rho, best_predictions, best_epoch, epoch, history)
