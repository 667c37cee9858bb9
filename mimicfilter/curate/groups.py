"""Graphs over samples in numpy: connected components and maximum spanning forests, vectorised (no
Python loop per edge), deterministic whatever the order the edges arrive in. Torch-free.

* :func:`components`: each node's component, named by its smallest node id (hook every edge's
  larger root under its smaller one, then jump pointers until every node points at a root; a few
  rounds even for long chains).
* :func:`spanning_forest`: a maximum spanning forest by Borůvka's rounds (every component takes its
  heaviest outgoing edge; ties broken by a total order, so no cycle forms). Its edges of weight ≥ t
  connect exactly what all the edges of weight ≥ t connect, for every t at once: near-duplicate
  search keeps only these, and ``filter`` picks the threshold later.
"""

from __future__ import annotations

import numpy as np


def _roots(parent: np.ndarray) -> np.ndarray:
    """Pointer jumping until every node points at its root."""
    while True:
        jumped = parent[parent]
        if np.array_equal(jumped, parent):
            return parent
        parent = jumped


def components(count: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Component labels [count] of the graph on nodes 0..count-1 with edges (a[i], b[i]); a label is
    the smallest node id of its component."""
    parent = np.arange(count, dtype=np.int64)
    a, b = np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64)
    while len(a):
        root_a, root_b = parent[a], parent[b]
        apart = root_a != root_b
        if not apart.any():
            break
        low, high = np.minimum(root_a[apart], root_b[apart]), np.maximum(root_a[apart], root_b[apart])
        np.minimum.at(parent, high, low)  # roots only (parents are roots after each jump): no cycle
        parent = _roots(parent)
        a, b = a[apart], b[apart]
    return parent


def spanning_forest(count: int, a: np.ndarray, b: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """Positions of the edges of a maximum spanning forest (heaviest first; ties by (a, b)).

    Deterministic for a given set of edges whatever their order: edges are ranked by (−weight,
    smaller end, larger end), and equal edges (the same pair twice) by position.
    """
    a, b = np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64)
    if not len(a):
        return np.zeros(0, dtype=np.int64)
    low, high = np.minimum(a, b), np.maximum(a, b)
    order = np.lexsort((np.arange(len(a)), high, low, -np.asarray(weight, dtype=np.float64)))
    rank = np.empty(len(a), dtype=np.int64)
    rank[order] = np.arange(len(a))
    label = np.arange(count, dtype=np.int64)
    chosen = np.zeros(len(a), dtype=bool)
    live = np.flatnonzero(low != high)
    none = np.iinfo(np.int64).max
    while len(live):
        end_a, end_b = label[a[live]], label[b[live]]
        crossing = end_a != end_b
        live, end_a, end_b = live[crossing], end_a[crossing], end_b[crossing]
        if not len(live):
            break
        best = np.full(count, none, dtype=np.int64)
        np.minimum.at(best, end_a, rank[live])
        np.minimum.at(best, end_b, rank[live])
        chosen[order[np.unique(best[best != none])]] = True
        label = components(count, a[chosen], b[chosen])
    return np.flatnonzero(chosen)
