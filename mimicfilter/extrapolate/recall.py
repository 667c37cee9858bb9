"""How close an approximate index comes to exact search: recall@k against exact top-k (by blocks,
no float32 copy of the scored set), and ``nprobe`` / ``k_factor`` raised until the recall reaches
the target."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from mimicfilter.extrapolate.index import SubIndex, Vectors, as_float32, exact_search

RECALL_TARGET = 0.95
RECALL_AT = 10
CALIBRATION_QUERIES = 1000


def drop_own(ids: np.ndarray, own: np.ndarray, k: int) -> np.ndarray:
    """The first ``k`` ids of each row other than the row's own id ``own`` (−1 padded)."""
    keep = ids != own[:, None]
    rank = np.where(keep, np.arange(ids.shape[1])[None, :], ids.shape[1])
    order = np.argsort(rank, axis=1, kind="stable")[:, :k]
    taken = np.take_along_axis(ids, order, axis=1)
    return np.where(np.take_along_axis(keep, order, axis=1), taken, -1)


def recall_at(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean share of each row's true neighbours (ids >= 0) that ``found`` holds."""
    shares = []
    for got, want in zip(found, truth):
        want = want[want >= 0]
        if len(want):
            shares.append(len(np.intersect1d(got, want)) / len(want))
    return float(np.mean(shares)) if shares else 1.0


MAX_K_FACTOR = 64


def tune_search(sub: SubIndex, vectors: Vectors, seed: int, target: float = RECALL_TARGET,
                calibration: int = CALIBRATION_QUERIES, k: int = RECALL_AT) -> None:
    """Raise ``nprobe`` (and, for fast-scan indexes, ``k_factor``) from (1, 2) until recall@k of
    the sub-index's own members, each searched for its k nearest others, reaches ``target`` against
    exact search. Each step doubles whichever of the two gains more recall (nprobe on a tie); the
    search stops when neither can grow. Deterministic: the same index gives the same settings. The
    plan records them and the recall measured."""
    members = sub.members
    k = min(k, len(members) - 1)
    if k < 1:
        return
    rows = np.sort(np.random.default_rng(seed).choice(len(members), min(calibration, len(members)), replace=False))
    queries = as_float32(vectors(members[rows]))
    _, truth = exact_search(queries, vectors, members, k + 1)
    truth = drop_own(truth, rows, k)

    def recall_with(nprobe: int, k_factor: int) -> float:
        sub.with_search(nprobe, k_factor)
        _, found = sub.cpu.search(queries, k + 1)
        return recall_at(drop_own(found, rows, k), truth)

    nprobe, k_factor = 1, 2 if sub.plan.fast_scan else 0
    recall = recall_with(nprobe, k_factor)
    while recall < target:
        moves = []
        if nprobe < sub.plan.nlist:
            moves.append((min(sub.plan.nlist, 2 * nprobe), k_factor))
        if sub.plan.fast_scan and k_factor < MAX_K_FACTOR:
            moves.append((nprobe, 2 * k_factor))
        if not moves:
            break
        gains = [recall_with(*move) for move in moves]
        best = int(np.argmax(gains))
        (nprobe, k_factor), recall = moves[best], gains[best]
    sub.with_search(nprobe, k_factor)
    sub.plan = replace(sub.plan, recall=round(recall, 4), recall_k=k, calibration_queries=len(rows))
