"""Mixture-proportion estimation with anchors (numpy): how much of a pool looks like the trusted sample.

The pool's per-sample signal (oriented: higher = cleaner) is a mixture ``pool = π·clean + (1-π)·noise``.
The trusted sample stands for the clean component; the synthetic negatives for one kind of noise, and
on labelled pools the confusable negatives for another (flips to the class the reference ranks second).

* :func:`best_bin` — Garg et al. 2021 ("Mixture Proportion Estimation and PU Learning: A Modern
  Approach"): for every upper tail ``S ≥ c``, ``pool(c) / trusted(c)`` bounds π from above (the noise's
  share of the tail is ≥ 0); the tail that minimises the bound plus its confidence term is used. Tight
  when the top scores hold (almost) no noise; never low by more than sampling error.
* :func:`two_component` — the share that best explains the pool's distribution as trusted plus the
  negatives' kinds (non-negative least squares over the upper 70 % of the anchors' pooled quantiles):
  unbiased when the pool's noise looks like a mix of the negatives, low when it is further from the
  clean data than they are, high when it is closer.
* :func:`clean_share` — the estimate filter reports: the two-component share (the median of its
  bootstrap) while it is consistent with best-bin's upper confidence bound (``BestBin.ceiling``);
  above it the pool's noise is unlike the negatives (milder: it scores closer to the clean data), and
  the best-bin estimate is reported. (The test is against the confidence bound, not the bootstrap of
  best-bin's point estimate: that point is the least of many noisy tail ratios, and a trusted sample
  that happens to over-fill one tail can read a clean pool 70 % through it.) The interval spans both
  estimators' 90 % bootstrap intervals. When a two-sample test cannot tell the pool from the trusted sample (p ≥ 0.1 %),
  a clean pool is not ruled out: the interval reaches 100 % and the estimate is at least the
  estimators' 90th bootstrap percentile — a small trusted sample's luck alone would otherwise read a
  clean pool 5–10 points low.
* :func:`tail_curve` — for thresholds on the signal: the kept share, the estimated recall (the trusted
  sample's tail) and precision (π · recall / kept share) of the kept set.
* :func:`kept_near` — the share a recall cut keeps, averaged over the recall targets the trusted
  sample cannot tell apart (what the cut compares signals on).

Everything is a pure function of arrays; the bootstrap is seeded.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

DELTA, GAMMA = 0.1, 0.01  # Garg et al.'s confidence level and slack
TAIL_QUANTILES = np.linspace(0.0, 0.99, 100)  # candidate tails: the trusted sample's quantiles
# where the two-component fit compares distributions: the upper 70 % of the anchors' pooled range. Below
# it lies noise alone, whose shape depends on its kind (a blank image, a boilerplate caption, a swapped
# one); the synthetic negatives stand for one kind, and fitting their lowest scores too read pools of
# other noise up to 9 points low on the validation suite (docs/filter.md)
FIT_QUANTILES = np.linspace(0.3, 0.99, 70)


def _tail_shares(values: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Share of ``values`` at or above each threshold (``values`` sorted)."""
    return 1.0 - np.searchsorted(values, thresholds, side="left") / len(values)


def _tails(pool: np.ndarray, trusted: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per candidate tail: pool(c)/trusted(c), that ratio plus its confidence term (Garg et al.'s upper
    bound on π, holding with probability 1 - DELTA), and the threshold c."""
    pool, trusted = np.sort(pool), np.sort(trusted)
    thresholds = np.unique(np.quantile(trusted, TAIL_QUANTILES))
    in_pool, in_trusted = _tail_shares(pool, thresholds), _tail_shares(trusted, thresholds)
    confidence = math.sqrt(math.log(4 / DELTA) / (2 * len(trusted))) + math.sqrt(math.log(4 / DELTA) / (2 * len(pool)))
    return in_pool / in_trusted, in_pool / in_trusted + (1 + GAMMA) / in_trusted * confidence, thresholds


class BestBin(NamedTuple):
    estimate: float  # π read from the best tail: pool(c) / trusted(c)
    threshold: float  # that tail's c
    ceiling: float  # the estimate plus its confidence term: an upper bound on π with probability 1 - DELTA


def best_bin(pool: np.ndarray, trusted: np.ndarray) -> BestBin:
    """Best-bin estimation over the candidate tails (the one minimising the bound); arrays need not be sorted."""
    ratio, bound, thresholds = _tails(pool, trusted)
    best = int(np.argmin(bound))
    return BestBin(float(min(1.0, ratio[best])), float(thresholds[best]), float(min(1.0, bound[best])))


def two_component(pool: np.ndarray, trusted: np.ndarray, synthetic: np.ndarray,
                  *more_negatives: np.ndarray) -> float:
    """π minimising Σ_c (F_pool(c) - π F_trusted(c) - Σ_k a_k F_negative_k(c))² over the anchors' pooled
    quantiles FIT_QUANTILES, with π and the a_k ≥ 0 summing to 1: the trusted sample plus the negatives'
    kinds (the synthetic negatives, and the confusable ones of labelled pools) explain the pool."""
    negatives = [synthetic, *(n for n in more_negatives if len(n))]
    grid = np.quantile(np.concatenate([trusted, *negatives]), FIT_QUANTILES)
    pool_cdf, trusted_cdf, *negative_cdfs = (np.searchsorted(np.sort(a), grid, side="right") / len(a)
                                             for a in (pool, trusted, *negatives))
    best, best_share = math.inf, float("nan")
    # the simplex's faces holding π: on each, the last negative's share is 1 - π - the others'
    for used in itertools.chain.from_iterable(itertools.combinations(range(len(negatives)), k)
                                              for k in range(1, len(negatives) + 1)):
        last = negative_cdfs[used[-1]]
        design = np.stack([trusted_cdf - last] + [negative_cdfs[k] - last for k in used[:-1]], axis=1)
        target = pool_cdf - last
        if np.linalg.matrix_rank(design) < design.shape[1]:
            continue
        shares = np.linalg.lstsq(design, target, rcond=None)[0]
        if len(used) == 1:
            shares = np.clip(shares, 0.0, 1.0)
        elif shares.min() < 0 or shares.sum() > 1:
            continue  # outside this face: a smaller face has the constrained optimum
        residual = float(np.sum((design @ shares - target) ** 2))
        if residual < best:
            best, best_share = residual, float(shares[0])
    return best_share


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
# ... and the estimate's lift (a pool that may be clean) holds down to this stricter one: on the validation
# suite (200 trusted samples) pools with 20 % noise or more are told apart below it, 10 % is not (the
# lift reads those 1.5–3.5 points high), while at 5 % one clean pool in twenty would lose the lift and
# read 5–7 points low
LIFT_TEST_LEVEL = 0.001
LIFT_QUANTILE = 0.9  # a pool that may be clean reads the estimators' 90th bootstrap percentile at least
BOOTSTRAP_POOL = 50_000  # pool values resampled per bootstrap round (the trusted sample's error dominates)
# kept_near averages over the recall targets this many standard errors either side of the target
# (chosen on the validation suite by the worst labelled F1 of the cut it picks the signal for)
NEAR_RECALL_ERRORS, NEAR_RECALL_TARGETS = 1.5, 13


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
                seed: int = 0, confusable: np.ndarray | None = None) -> CleanShare:
    """The pool's clean share (see the module docstring); arrays oriented higher = cleaner."""
    confusable = np.zeros(0) if confusable is None else confusable
    upper, _, ceiling = best_bin(pool, trusted)
    explained = two_component(pool, trusted, synthetic, confusable) if len(synthetic) else float("nan")
    resampled = pool if len(pool) <= BOOTSTRAP_POOL else np.random.default_rng(seed).choice(pool, BOOTSTRAP_POOL)

    def both(p, t, s, c):
        return best_bin(p, t).estimate, (two_component(p, t, s, c if len(confusable) else np.zeros(0)) if len(synthetic)
                                   else np.nan)

    rounds_of = bootstrap(both, (resampled, trusted, synthetic if len(synthetic) else np.zeros(1),
                                 confusable if len(confusable) else np.zeros(1)), rounds, seed)
    bounds, fits = rounds_of[:, 0], rounds_of[:, 1]
    fitted = not math.isnan(explained)
    if fitted:  # bagged: the bootstrap's median is steadier than one fit on a small trusted sample
        explained = float(np.median(fits))
    consistent = fitted and explained <= ceiling
    if consistent:
        value, method = explained, "two-component"
    else:  # no negatives, or a fit above what the pool's top tail allows: its noise is unlike the negatives
        value, method = upper, "best-bin"
    lows = [np.quantile(bounds, 0.05)] + ([np.quantile(fits, 0.05)] if consistent else [])
    # best-bin's point estimate, the least of many noisy tail ratios, runs low: its confidence bound is the top
    highs = [np.quantile(bounds, 0.95)] + ([np.quantile(fits, 0.95)] if consistent else [ceiling])
    clean_p = same_distribution_p(pool, trusted)
    if clean_p >= LIFT_TEST_LEVEL:  # the data cannot rule out a clean pool
        lift = [np.quantile(bounds, LIFT_QUANTILE)] + ([np.quantile(fits, LIFT_QUANTILE)] if consistent else [])
        value, method = max(value, max(lift)), method + ", consistent with clean"
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


def recall_error(recall: float, trusted_count: int) -> float:
    """The standard error of a recall measured on ``trusted_count`` trusted samples: √(r(1-r)/n)."""
    return math.sqrt(recall * (1 - recall) / trusted_count)


def kept_near(pool: np.ndarray, trusted: np.ndarray, recall: float) -> float:
    """The pool share the trusted sample's recall cut keeps, averaged over the recall targets within
    NEAR_RECALL_ERRORS standard errors (:func:`recall_error`) of ``recall``, NEAR_RECALL_TARGETS of them.

    One target's threshold is one order statistic of the trusted sample, and where noise is dense
    the kept share moves a lot with it: a trusted tail that happens to lie high makes a signal look as
    if it dropped more noise when it only drops more clean samples. Averaging over the targets that
    the trusted sample cannot tell apart from ``recall`` leaves less of that luck. NaN for an empty pool."""
    if not len(pool):
        return math.nan
    half = NEAR_RECALL_ERRORS * recall_error(recall, len(trusted))
    targets = np.clip(np.linspace(recall - half, recall + half, NEAR_RECALL_TARGETS), 0.0, 1.0)
    thresholds = np.array([threshold_for_recall(trusted, target) for target in targets])
    return float(np.mean(_tail_shares(np.sort(pool), thresholds)))


def threshold_for_precision(pool: np.ndarray, trusted: np.ndarray, clean_share: float, precision: float) -> float | None:
    """The lowest threshold whose kept set reaches ``precision`` (the most recall at that precision);
    None when no threshold does."""
    curve = tail_curve(pool, trusted, clean_share, points=1001)
    reached = np.nonzero((curve["precision"] >= precision) & (curve["kept"] > 0))[0]
    return float(curve["threshold"][reached[0]]) if len(reached) else None
