"""Detection metrics for benchmarks and reports (numpy only)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks, ties sharing their average rank."""
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values), dtype=float)
    sorted_values = values[order]
    _, first, counts = np.unique(sorted_values, return_index=True, return_counts=True)
    for start, count in zip(first, counts):
        ranks[order[start : start + count]] = start + (count + 1) / 2
    return ranks


def auroc(scores: np.ndarray, positives: np.ndarray) -> float:
    """P(a random positive scores above a random negative); ties count half."""
    scores, positives = np.asarray(scores, dtype=float), np.asarray(positives, dtype=bool)
    n_pos, n_neg = int(positives.sum()), int((~positives).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = average_ranks(scores)
    return float((ranks[positives].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


@dataclass(frozen=True)
class Detection:
    precision: float
    recall: float
    f1: float


def detection(flagged: np.ndarray, positives: np.ndarray) -> Detection:
    """Precision, recall and F1 of ``flagged`` as a detector of ``positives``."""
    flagged, positives = np.asarray(flagged, dtype=bool), np.asarray(positives, dtype=bool)
    hits = int((flagged & positives).sum())
    precision = hits / flagged.sum() if flagged.sum() else 0.0
    recall = hits / positives.sum() if positives.sum() else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return Detection(float(precision), float(recall), float(f1))


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation (average ranks for ties); NaN when either side is constant."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if len(a) < 2:
        return float("nan")
    ra, rb = average_ranks(a), average_ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denominator = np.sqrt((ra * ra).sum() * (rb * rb).sum())
    return float((ra * rb).sum() / denominator) if denominator > 0 else float("nan")
