"""k-nearest-neighbour kernels: neighbour means (optionally blended with the sample's own signal)
and the choice of k on a held-out split of the scored samples. The neighbours come from the faiss
index over the scored samples (:mod:`~mimicfilter.extrapolate.index`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from mimicfilter.errors import MimicfilterError
from mimicfilter.metrics import spearman

MIN_HOLDOUT = 3  # Spearman ρ needs a few points
DISTANCE_EPSILON = 1e-6


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


RowSearch = Callable[[np.ndarray, int, np.ndarray | None], tuple[torch.Tensor, torch.Tensor]]
"""(rows of the scored set, k, allowed mask over the scored set or None) → their top-k among the
allowed scored samples: (similarities, scored-set ids) [R, k], −inf / −1 where there is none."""


def without_self(sims: torch.Tensor, index: torch.Tensor, rows: np.ndarray, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's k nearest *other* samples from its k + 1 nearest: the row itself dropped,
    wherever near-duplicates put it in the order (−1 padded)."""
    own = index == torch.as_tensor(rows)[:, None]
    rank = torch.where(own, torch.full_like(index, index.shape[1]), torch.arange(index.shape[1]).expand_as(index))
    keep = rank.argsort(dim=1, stable=True)[:, :k]
    sims, index = sims.gather(1, keep), index.gather(1, keep)
    gone = own.gather(1, keep)
    return sims.masked_fill(gone, float("-inf")), index.masked_fill(gone, -1)


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
    search: RowSearch,
    values: torch.Tensor,
    candidates: tuple[int, ...],
    holdout: torch.Tensor,
    train: torch.Tensor,
    *,
    weighted: bool = False,
    signal: torch.Tensor | None = None,
) -> KChoice:
    """Pick k by Spearman ρ of predicted vs true mean score on the held-out rows ``holdout``,
    predicted from the rows ``train`` (both positions into the scored samples' ``values`` [M, 2] and
    ``signal`` [M, S]; the search is restricted to the training rows: the split is built from the
    scored samples alone). With ``signal`` (pairs: their agreement), each k's prediction is a
    :class:`Blend` of the neighbour mean and the signal, fitted on the training split.
    """
    usable = tuple(k for k in candidates if k <= len(train) - (signal is not None))
    if not usable:
        raise MimicfilterError(
            f"--k {min(candidates)} is larger than the scored set's training split ({len(train)} of "
            f"{len(train) + len(holdout)} scored samples; {len(holdout)} are held out to choose k)",
            hint=f"pass --k {len(train) - 1} or less, or score more samples",
        )
    allowed = np.zeros(len(values), dtype=bool)
    allowed[train.numpy()] = True
    sims, index = search(holdout.numpy(), max(usable), allowed)
    if signal is not None:
        train_sims, train_index = without_self(*search(train.numpy(), max(usable) + 1, allowed), train.numpy(), max(usable))
    train_values, true_values = values[train], values[holdout].numpy()
    by_k, by_k_weight, blends = {}, {}, {}
    for k in usable:
        predicted = knn_predict(values, sims[:, :k], index[:, :k], weighted)
        if signal is not None:
            own_mean = knn_predict(values, train_sims[:, :k], train_index[:, :k], weighted)
            blends[k] = Blend.fit(own_mean, signal[train], train_values)
            predicted = blends[k].apply(predicted, signal[holdout])
        predicted = predicted.numpy()
        predicted = np.where(np.isnan(predicted), np.nanmean(train_values.numpy(), axis=0), predicted)
        by_k[k] = spearman(predicted[:, 0], true_values[:, 0])
        by_k_weight[k] = spearman(predicted[:, 1], true_values[:, 1])
    best = max(usable, key=lambda k: (np.nan_to_num(by_k[k], nan=-2.0), -k))
    return KChoice(best, by_k[best], by_k_weight[best], by_k, tuple(k for k in candidates if k not in usable),
                   blends.get(best))
