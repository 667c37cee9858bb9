"""Mixture-proportion estimation with anchors (numpy): how much of a pool looks like the trusted sample.

The pool's per-sample signal (oriented: higher = cleaner) is a mixture ``pool = π·clean + (1-π)·noise``.
The trusted sample stands for the clean component; the synthetic negatives for one kind of noise.

* :func:`best_bin` — Garg et al. 2021 ("Mixture Proportion Estimation and PU Learning: A Modern
  Approach"): for every upper tail ``S ≥ c``, ``pool(c) / trusted(c)`` bounds π from above (the noise's
  share of the tail is ≥ 0); the tail that minimises the bound plus its confidence term is used. Tight
  when the top scores hold (almost) no noise; never low by more than sampling error.
* :func:`two_component` — the share that best explains the pool's distribution as trusted plus
  synthetic (least squares over the pooled quantiles): unbiased when the pool's noise looks like the
  synthetic negatives, low when the noise is further from the clean data than they are.
* :func:`clean_share` — the estimate filter reports: the two-component share while it is
  consistent with the best-bin bound (not above the bound's 99th bootstrap percentile); otherwise
  the pool's noise is unlike the synthetic negatives (milder: it scores closer to the clean data),
  and the best-bin bound is the estimate. The interval spans both estimators' 90 % bootstrap
  intervals. When a two-sample test cannot tell the pool from the trusted sample (p ≥ 5 %), a clean
  pool is not ruled out: the interval reaches 100 % and the estimate is the top of the estimators'
  intervals — a small trusted sample's luck alone would otherwise read a clean pool 5–10 points low.
* :func:`tail_curve` — for thresholds on the signal: the kept share, the estimated recall (the trusted
  sample's tail) and precision (π · recall / kept share) of the kept set.

Everything is a pure function of arrays; the bootstrap is seeded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

DELTA, GAMMA = 0.1, 0.01  # Garg et al.'s confidence level and slack
TAIL_QUANTILES = np.linspace(0.0, 0.99, 100)  # candidate tails: the trusted sample's quantiles


def _tail_shares(values: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Share of ``values`` at or above each threshold (``values`` sorted)."""
    return 1.0 - np.searchsorted(values, thresholds, side="left") / len(values)


def best_bin(pool: np.ndarray, trusted: np.ndarray) -> tuple[float, float]:
    """(π upper estimate, the tail's threshold) by best-bin estimation; arrays need not be sorted."""
    pool, trusted = np.sort(pool), np.sort(trusted)
    thresholds = np.unique(np.quantile(trusted, TAIL_QUANTILES))
    in_pool, in_trusted = _tail_shares(pool, thresholds), _tail_shares(trusted, thresholds)
    confidence = math.sqrt(math.log(4 / DELTA) / (2 * len(trusted))) + math.sqrt(math.log(4 / DELTA) / (2 * len(pool)))
    bound = in_pool / in_trusted + (1 + GAMMA) / in_trusted * confidence
    best = int(np.argmin(bound))
    return float(min(1.0, in_pool[best] / in_trusted[best])), float(thresholds[best])


def two_component(pool: np.ndarray, trusted: np.ndarray, synthetic: np.ndarray) -> float:
    """π minimising Σ_c (F_pool(c) - π F_trusted(c) - (1-π) F_synthetic(c))² over the pooled quantiles."""
    grid = np.quantile(np.concatenate([trusted, synthetic]), np.linspace(0.01, 0.99, 99))
    pool_cdf, trusted_cdf, synthetic_cdf = (np.searchsorted(np.sort(a), grid, side="right") / len(a)
                                            for a in (pool, trusted, synthetic))
    spread = trusted_cdf - synthetic_cdf
    denominator = float(spread @ spread)
    if denominator == 0:
        return float("nan")
    return float(np.clip(((pool_cdf - synthetic_cdf) @ spread) / denominator, 0.0, 1.0))


def same_distribution_p(first: np.ndarray, second: np.ndarray) -> float:
    """The two-sample Kolmogorov–Smirnov test's p-value (asymptotic, Stephens' correction)."""
    grid = np.concatenate([first, second])
    distance = float(np.max(np.abs(np.searchsorted(np.sort(first), grid, side="right") / len(first)
                                   - np.searchsorted(np.sort(second), grid, side="right") / len(second))))
    effective = len(first) * len(second) / (len(first) + len(second))
    scaled = (math.sqrt(effective) + 0.12 + 0.11 / math.sqrt(effective)) * distance
    if scaled < 1e-3:
        return 1.0
    terms = [2 * (-1) ** (k - 1) * math.exp(-2 * k * k * scaled * scaled) for k in range(1, 101)]
    return float(min(1.0, max(0.0, sum(terms))))


def bootstrap(estimate, samples: tuple[np.ndarray, ...], rounds: int = 200, seed: int = 0) -> np.ndarray:
    """``estimate(*resampled)`` over ``rounds`` resamples of every array (with replacement), seeded."""
    rng = np.random.default_rng(seed)
    return np.array([estimate(*(array[rng.integers(0, len(array), len(array))] for array in samples))
                     for _ in range(rounds)])


CLEAN_TEST_LEVEL = 0.05  # Kolmogorov–Smirnov: the pool and the trusted sample differ below this p-value
BOOTSTRAP_POOL = 50_000  # pool values resampled per bootstrap round (the trusted sample's error dominates)
SWITCH_QUANTILE = 0.99  # the two-component share above this quantile of the best-bin bound: unlike the noise


@dataclass(frozen=True)
class CleanShare:
    value: float
    low: float  # the 90 % interval
    high: float
    upper: float  # the best-bin estimate
    explained: float  # the two-component estimate (NaN without synthetic negatives)
    method: str  # "two-component" or "best-bin" (", consistent with clean" when the test cannot tell)
    clean_p: float = 1.0  # the KS test's p-value, pool vs trusted sample


def clean_share(pool: np.ndarray, trusted: np.ndarray, synthetic: np.ndarray, rounds: int = 200,
                seed: int = 0) -> CleanShare:
    """The pool's clean share (see the module docstring); arrays oriented higher = cleaner."""
    upper = best_bin(pool, trusted)[0]
    explained = two_component(pool, trusted, synthetic) if len(synthetic) else float("nan")
    resampled = pool if len(pool) <= BOOTSTRAP_POOL else np.random.default_rng(seed).choice(pool, BOOTSTRAP_POOL)
    rounds_of = bootstrap(lambda p, t, s: (best_bin(p, t)[0], two_component(p, t, s) if len(s) else np.nan),
                          (resampled, trusted, synthetic if len(synthetic) else np.zeros(1)), rounds, seed)
    bounds, fits = rounds_of[:, 0], rounds_of[:, 1]
    consistent = not math.isnan(explained) and explained <= np.quantile(bounds, SWITCH_QUANTILE)
    value, method = (explained, "two-component") if consistent else (upper, "best-bin")
    lows = [np.quantile(bounds, 0.05)] + ([np.quantile(fits, 0.05)] if consistent else [])
    highs = [np.quantile(bounds, 0.95)] + ([np.quantile(fits, 0.95)] if consistent else [])
    clean_p = same_distribution_p(pool, trusted)
    if clean_p >= CLEAN_TEST_LEVEL:  # the data cannot rule out a clean pool
        value, method = max(value, max(highs)), method + ", consistent with clean"
        highs.append(1.0)
    low, high = min(min(lows), value), max(max(highs), value)
    return CleanShare(float(value), float(low), float(high), float(upper), float(explained), method, clean_p)


def tail_curve(pool: np.ndarray, trusted: np.ndarray, clean_share: float, points: int = 101) -> dict[str, np.ndarray]:
    """For thresholds at the pool's quantiles: kept share, estimated recall and precision of the kept set."""
    pool, trusted = np.sort(pool), np.sort(trusted)
    thresholds = np.unique(np.quantile(pool, np.linspace(0.0, 1.0, points)))
    kept = _tail_shares(pool, thresholds)
    recall = _tail_shares(trusted, thresholds)
    precision = np.minimum(1.0, clean_share * recall / np.maximum(kept, 1e-12))
    return {"threshold": thresholds, "kept": kept, "recall": recall, "precision": precision}


def threshold_for_recall(trusted: np.ndarray, recall: float) -> float:
    """The highest threshold keeping at least ``recall`` of the trusted sample (``S ≥ t``)."""
    ordered = np.sort(trusted)
    index = min(len(ordered) - 1, max(0, int(math.floor((1.0 - recall) * len(ordered) + 1e-9))))
    return float(ordered[index])


def threshold_for_precision(pool: np.ndarray, trusted: np.ndarray, clean_share: float, precision: float) -> float | None:
    """The lowest threshold whose kept set reaches ``precision`` (the most recall at that precision);
    None when no threshold does."""
    curve = tail_curve(pool, trusted, clean_share, points=1001)
    reached = np.nonzero((curve["precision"] >= precision) & (curve["kept"] > 0))[0]
    return float(curve["threshold"][reached[0]]) if len(reached) else None
