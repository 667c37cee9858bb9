"""k-nearest-neighbour kernels: blocked top-k cosine search, neighbour means (optionally blended
with the sample's own signal), and the choice of k on a held-out split of the scored samples."""

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


Search = Callable[..., tuple[torch.Tensor, torch.Tensor]]  # (queries, reference, k, query_labels, reference_labels)


def default_search(queries, reference, k, query_labels=None, reference_labels=None):
    return knn_search(queries, reference, k, query_labels=query_labels, reference_labels=reference_labels)


def search_without_self(vectors: torch.Tensor, k: int, labels: torch.Tensor | None,
                        search: Search = default_search) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's k nearest *other* rows (similarities, indices [N, k], −1 padded): k + 1 found and
    the row itself dropped — wherever near-duplicates put it in the order."""
    sims, index = search(vectors, vectors, k + 1, labels, labels)
    own = index == torch.arange(len(vectors))[:, None]
    rank = torch.where(own, torch.full_like(index, k + 1), torch.arange(k + 1).expand_as(index))
    keep = rank.argsort(dim=1)[:, :k]
    return sims.gather(1, keep), index.gather(1, keep)


@dataclass(frozen=True)
class Blend:
    """Per target: prediction = a · neighbour mean + b · the sample's own signal + c, fitted by least
    squares on the training split (each training sample's neighbour mean leaves itself out)."""

    coefficients: torch.Tensor  # [T, 2 + S]: neighbour mean, signal columns, intercept

    @staticmethod
    def _design(neighbour_mean: torch.Tensor, signal: torch.Tensor, target: int) -> torch.Tensor:
        ones = torch.ones(len(signal), 1, dtype=torch.float64)
        return torch.cat([neighbour_mean[:, target : target + 1].double(), signal.double(), ones], dim=1)

    @classmethod
    def fit(cls, neighbour_mean: torch.Tensor, signal: torch.Tensor, values: torch.Tensor) -> Blend:
        rows = ~torch.isnan(neighbour_mean).any(dim=1)
        coefficients = []
        for target in range(values.shape[1]):
            design = cls._design(neighbour_mean[rows], signal[rows], target)
            if len(design) < design.shape[1]:  # too few rows to fit: the plain neighbour mean
                coefficients.append(torch.cat([torch.ones(1), torch.zeros(design.shape[1] - 1)]).double())
                continue
            solution = torch.linalg.lstsq(design, values[rows, target : target + 1].double()).solution[:, 0]
            coefficients.append(solution)
        return cls(torch.stack(coefficients))

    def apply(self, neighbour_mean: torch.Tensor, signal: torch.Tensor) -> torch.Tensor:
        return torch.stack([self._design(neighbour_mean, signal, target) @ self.coefficients[target]
                            for target in range(self.coefficients.shape[0])], dim=1)


@dataclass(frozen=True)
class KChoice:
    """The k chosen on the held-out split of the scored samples, and how every candidate did."""

    k: int
    spearman: float  # mimic_score, at k
    spearman_weight: float  # mimic_weight, at k
    spearman_by_k: dict[int, float]
    skipped_candidates: tuple[int, ...] = ()
    blend: Blend | None = None  # with a signal: the neighbour mean and the signal, blended at k


def choose_k(
    embeddings: torch.Tensor,
    values: torch.Tensor,
    candidates: tuple[int, ...],
    holdout: torch.Tensor,
    train: torch.Tensor,
    *,
    labels: torch.Tensor | None = None,
    weighted: bool = False,
    signal: torch.Tensor | None = None,
    search: Search = default_search,
) -> KChoice:
    """Pick k by Spearman ρ of predicted vs true mean score on the held-out rows ``holdout``,
    predicted from the rows ``train`` (both positions into the scored samples' ``embeddings``,
    ``values`` [M, 2], ``labels`` and ``signal`` [M, S]: the split is built from the scored
    samples alone). With ``signal`` (pairs: their agreement), each k's prediction is a
    :class:`Blend` of the neighbour mean and the signal, fitted on the training split.
    """
    usable = tuple(k for k in candidates if k <= len(train) - (signal is not None))
    if not usable:
        raise MimicfilterError(
            f"--k {min(candidates)} is larger than the scored set's training split ({len(train)} of "
            f"{len(train) + len(holdout)} scored samples; {len(holdout)} are held out to choose k)",
            hint=f"pass --k {len(train) - 1} or less, or score more samples",
        )
    labels_of = (lambda rows: None) if labels is None else (lambda rows: labels[rows])
    sims, index = search(embeddings[holdout], embeddings[train], max(usable), labels_of(holdout), labels_of(train))
    if signal is not None:
        train_sims, train_index = search_without_self(embeddings[train], max(usable), labels_of(train), search)
    train_values, true_values = values[train], values[holdout].numpy()
    by_k, by_k_weight, blends = {}, {}, {}
    for k in usable:
        predicted = knn_predict(train_values, sims[:, :k], index[:, :k], weighted)
        if signal is not None:
            own_mean = knn_predict(train_values, train_sims[:, :k], train_index[:, :k], weighted)
            blends[k] = Blend.fit(own_mean, signal[train], train_values)
            predicted = blends[k].apply(predicted, signal[holdout])
        predicted = predicted.numpy()
        predicted = np.where(np.isnan(predicted), np.nanmean(train_values.numpy(), axis=0), predicted)
        by_k[k] = spearman(predicted[:, 0], true_values[:, 0])
        by_k_weight[k] = spearman(predicted[:, 1], true_values[:, 1])
    best = max(usable, key=lambda k: (np.nan_to_num(by_k[k], nan=-2.0), -k))
    return KChoice(best, by_k[best], by_k_weight[best], by_k, tuple(k for k in candidates if k not in usable),
                   blends.get(best))
