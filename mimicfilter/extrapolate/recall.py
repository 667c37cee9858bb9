"""How close an approximate index comes to exact search: exact top-k by blocks (no float32 copy of
the scored set), recall@k, and ``nprobe`` raised until the recall reaches the target."""

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


def tune_nprobe(sub: SubIndex, vectors: Vectors, seed: int, target: float = RECALL_TARGET,
                calibration: int = CALIBRATION_QUERIES, k: int = RECALL_AT) -> None:
    """Double ``nprobe`` from 1 until recall@k of the sub-index's own members, each searched for its
    k nearest others, reaches ``target`` against exact search (or every cell is searched); the plan
    records the nprobe and the recall it measured."""
    members = sub.members
    k = min(k, len(members) - 1)
    if k < 1:
        return
    rows = np.sort(np.random.default_rng(seed).choice(len(members), min(calibration, len(members)), replace=False))
    queries = as_float32(vectors(members[rows]))
    _, truth = exact_search(queries, vectors, members, k + 1)
    truth = drop_own(truth, rows, k)
    nprobe, nlist = 1, sub.plan.nlist
    while True:
        sub.with_nprobe(nprobe)
        _, found = sub.cpu.search(queries, k + 1)
        recall = recall_at(drop_own(found, rows, k), truth)
        if recall >= target or nprobe >= nlist:
            break
        nprobe = min(nlist, nprobe * 2)
    sub.plan = replace(sub.plan, recall=round(recall, 4), recall_k=k, calibration_queries=len(rows))
