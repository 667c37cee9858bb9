"""k-nearest-neighbour kernels: blocked top-k cosine search, neighbour means, and the choice of k
on a held-out split of the scored samples."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from mimicfilter.errors import MimicfilterError
from mimicfilter.metrics import spearman

MIN_HOLDOUT = 3  # Spearman ρ needs a few points


DISTANCE_EPSILON = 1e-6



def knn_search(
    queries: torch.Tensor,
    reference: torch.Tensor,
    k: int,
    *,
    query_labels: torch.Tensor | None = None,
    reference_labels: torch.Tensor | None = None,
    block_size: int = 4096,
    reference_block: int = 65536,
    device: torch.device | str = "cpu",
    observer: Callable[[tuple[int, int]], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` cosine similarities of each query among ``reference`` (rows L2-normalised).

    Returns (similarities [Q, k] float32, indices [Q, k] int64) on the CPU, best first; slots
    without a neighbour (fewer than k reference rows, or none with the query's label when labels
    are given) hold −inf and index −1. Memory: one ``block_size`` × ``reference_block`` similarity
    block at a time (``observer`` is told each block's shape), plus the reference on ``device``.
    """
    device = torch.device(device)
    n_queries, n_reference = queries.shape[0], reference.shape[0]
    if queries.shape[1] != reference.shape[1]:
        raise MimicfilterError(f"embedding dimension mismatch: {queries.shape[1]} vs {reference.shape[1]}")
    reference = reference.to(device, torch.float32)
    labelled = query_labels is not None and reference_labels is not None
    if labelled:
        reference_labels = reference_labels.to(device)
    out_sims = torch.full((n_queries, k), float("-inf"))
    out_index = torch.full((n_queries, k), -1, dtype=torch.long)
    for q_start in range(0, n_queries, block_size):
        q = queries[q_start : q_start + block_size].to(device, torch.float32)
        best_sims = torch.full((q.shape[0], k), float("-inf"), device=device)
        best_index = torch.full((q.shape[0], k), -1, dtype=torch.long, device=device)
        q_labels = query_labels[q_start : q_start + block_size].to(device) if labelled else None
        for r_start in range(0, n_reference, reference_block):
            block = reference[r_start : r_start + reference_block]
            sims = q @ block.T
            if observer is not None:
                observer(tuple(sims.shape))
            if labelled:
                sims.masked_fill_(q_labels[:, None] != reference_labels[None, r_start : r_start + block.shape[0]],
                                  float("-inf"))
            top = sims.topk(min(k, sims.shape[1]), dim=1)
            merged_sims = torch.cat([best_sims, top.values], dim=1)
            merged_index = torch.cat([best_index, top.indices + r_start], dim=1)
            keep = merged_sims.topk(k, dim=1)
            best_sims = keep.values
            best_index = merged_index.gather(1, keep.indices)
            del sims, top, merged_sims, merged_index
        best_index[torch.isneginf(best_sims)] = -1
        out_sims[q_start : q_start + q.shape[0]] = best_sims.cpu()
        out_index[q_start : q_start + q.shape[0]] = best_index.cpu()
    return out_sims, out_index


def knn_predict(values: torch.Tensor, sims: torch.Tensor, index: torch.Tensor, weighted: bool) -> torch.Tensor:
    """Mean (or 1/(1−cos)-weighted mean) of the neighbours' ``values`` [M, C] → [Q, C].

    Rows with no valid neighbour get NaN.
    """
    valid = torch.isfinite(sims) & (index >= 0)
    if weighted:
        distance = (1.0 - sims.double()).clamp(min=0.0)
        weights = torch.where(valid, 1.0 / (distance + DISTANCE_EPSILON), torch.zeros((), dtype=torch.float64))
    else:
        weights = valid.double()
    neighbour_values = values.double()[index.clamp(min=0)]  # [Q, k, C]
    total = weights.sum(dim=1, keepdim=True)
    # first neighbour + weighted mean of the differences: exactly that value when all neighbours agree
    base = neighbour_values[:, 0, :]
    predicted = base + (weights[..., None] * (neighbour_values - base[:, None, :])).sum(dim=1) / total
    return torch.where(total > 0, predicted, torch.full_like(predicted, float("nan")))


@dataclass(frozen=True)
class KChoice:
    """The k chosen on the held-out split of the scored samples, and how every candidate did."""

    k: int
    spearman: float  # mimic_score, at k
    spearman_weight: float  # mimic_weight, at k
    spearman_by_k: dict[int, float]
    holdout: np.ndarray  # positions into the scored reference arrays
    train_size: int
    skipped_candidates: tuple[int, ...] = ()


def choose_k(
    embeddings: torch.Tensor,
    values: torch.Tensor,
    candidates: tuple[int, ...],
    *,
    labels: torch.Tensor | None = None,
    holdout_fraction: float = 0.2,
    seed: int = 0,
    weighted: bool = False,
    block_size: int = 4096,
    reference_block: int = 65536,
    device: torch.device | str = "cpu",
    observer: Callable | None = None,
) -> KChoice:
    """Pick k by Spearman ρ of predicted vs true mean score on a held-out split of the scored set.

    Takes only the scored samples (their embeddings, values [M, 2] and labels): the split is built
    from them alone.
    """
    count = embeddings.shape[0]
    holdout_size = max(MIN_HOLDOUT, int(round(count * holdout_fraction)))
    if count - holdout_size < 1:
        raise MimicfilterError(
            f"only {count} scored samples with embeddings: too few to hold out {MIN_HOLDOUT}+ and keep neighbours",
            hint="score more samples (or check that the scored run's samples have embeddings)",
        )
    train_size = count - holdout_size
    usable = tuple(k for k in candidates if k <= train_size)
    if not usable:
        raise MimicfilterError(
            f"--k {min(candidates)} is larger than the scored set's training split ({train_size} of {count} "
            f"scored samples; {holdout_size} are held out to choose k)",
            hint=f"pass --k {train_size} or less, or score more samples",
        )
    order = np.random.default_rng(seed).permutation(count)
    holdout, train = np.sort(order[:holdout_size]), np.sort(order[holdout_size:])
    hold_t, train_t = torch.as_tensor(holdout), torch.as_tensor(train)
    sims, index = knn_search(
        embeddings[hold_t], embeddings[train_t], max(usable),
        query_labels=None if labels is None else labels[hold_t],
        reference_labels=None if labels is None else labels[train_t],
        block_size=block_size, reference_block=reference_block, device=device, observer=observer,
    )
    train_values, true_values = values[train_t], values[hold_t].numpy()
    by_k, by_k_weight = {}, {}
    for k in usable:
        predicted = knn_predict(train_values, sims[:, :k], index[:, :k], weighted).numpy()
        predicted = np.where(np.isnan(predicted), np.nanmean(train_values.numpy(), axis=0), predicted)
        by_k[k] = spearman(predicted[:, 0], true_values[:, 0])
        by_k_weight[k] = spearman(predicted[:, 1], true_values[:, 1])
    best = max(usable, key=lambda k: (np.nan_to_num(by_k[k], nan=-2.0), -k))
    return KChoice(best, by_k[best], by_k_weight[best], by_k, holdout, train_size,
                   tuple(k for k in candidates if k not in usable))

