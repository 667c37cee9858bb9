"""The k-means cells the pair search runs in: their number from the pool's size, trained once on a
sample of the image embeddings and saved, and each sample's cells.

* **How many**: ⌈N / ``cell_size``⌉ cells (one cell, i.e. every pair compared, below two cells'
  worth). The pair search costs about N × cell_size × d multiply-adds, the assignment N × (cells
  searched) × d: with ≈ 2,000 samples per cell neither dominates at 10M samples.
* **Training** (spherical k-means, faiss): flat up to :data:`FLAT_CELLS` cells; beyond, two levels —
  √K coarse cells on the sample, then each coarse cell's share of the K fine cells on its own
  points — so training costs the sample × 2√K instead of the sample × K.
* **Assignment**: a sample's nearest cell by cosine (numpy matrix products; beyond FLAT_CELLS only the
  fine cells of its :data:`COARSE_PROBES` nearest coarse cells are compared), **plus every other of
  its :data:`ASSIGNED_CELLS` nearest cells within ``margin`` of the nearest**. Two
  near-duplicates on either side of a cell boundary then share a cell: measured on clustered 512-d
  data, pairs at cosine 0.95–0.99 fell into one cell 98.9–99.3 % of the time with nearest-cell
  assignment alone and 100 % with a margin of 0.01, which copied 5 % of the samples into a second cell.
* Samples are clustered by their image embedding in both modes: a pair near-duplicate is an image
  near-duplicate too, and the caption is checked pair by pair afterwards.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

import faiss
import numpy as np

from mimicfilter.extrapolate.index import KMEANS_ITERATIONS, TRAINING_POINTS_PER_CELL, as_float32
from mimicfilter.store.owners import leftover_name

FLAT_CELLS = 1024  # beyond this many cells: two-level training and an IVF over the centroids
COARSE_PROBES = 4  # coarse cells whose fine cells a sample is compared with (two levels)
QUERY_BLOCK = 65536  # samples assigned at a time
ASSIGNED_CELLS = 3  # a sample joins at most this many cells
CELLS_DIR = "cells"


@dataclass(frozen=True)
class CellPlan:
    cells: int  # the number of cells asked for (the trained number may be a few lower)
    samples: int  # rows of the input (the plan follows it)
    training_points: int
    levels: int  # 1 (flat) or 2


def plan_cells(rows: int, cell_size: int) -> CellPlan:
    cells = 1 if rows < 2 * cell_size else math.ceil(rows / cell_size)
    return CellPlan(cells, rows, min(rows, TRAINING_POINTS_PER_CELL * cells) if cells > 1 else 0,
                    1 if cells <= FLAT_CELLS else 2)


def _kmeans(points: np.ndarray, count: int, seed: int) -> np.ndarray:
    """``count`` unit centroids of ``points`` (float32), by spherical k-means."""
    count = max(1, min(count, len(points)))
    if count == 1:
        centre = points.mean(axis=0, keepdims=True)
        return centre / max(float(np.linalg.norm(centre)), 1e-12)
    kmeans = faiss.Kmeans(points.shape[1], count, niter=KMEANS_ITERATIONS, seed=seed, spherical=True,
                          min_points_per_centroid=1, max_points_per_centroid=1 << 30)
    kmeans.train(points)
    return kmeans.centroids


def train_cells(sample: np.ndarray, plan: CellPlan, seed: int) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """(fine centroids [K, d], and for two levels the coarse centroids [√K, d] and each fine
    centroid's coarse cell [K]) from the image sample."""
    sample = as_float32(sample)
    if plan.levels == 1:
        return _kmeans(sample, plan.cells, seed), None, None
    coarse = _kmeans(sample, round(math.sqrt(plan.cells)), seed)
    _, nearest = faiss.knn(sample, coarse, 1, metric=faiss.METRIC_INNER_PRODUCT)
    nearest = nearest[:, 0]
    fine, parents = [], []
    for cell in range(len(coarse)):
        points = sample[nearest == cell]
        if len(points):
            share = max(1, round(plan.cells * len(points) / len(sample)))
            fine.append(_kmeans(points, min(share, max(1, len(points) // 8)), seed + 1 + cell))
            parents.append(np.full(len(fine[-1]), cell, dtype=np.int64))
    return np.concatenate(fine), coarse, np.concatenate(parents)


def _best(sims: np.ndarray, ids: np.ndarray, wanted: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``wanted`` highest of each row (nearest first), with their ids."""
    wanted = min(wanted, sims.shape[1])
    top = np.argpartition(-sims, wanted - 1, axis=1)[:, :wanted]
    top_sims = np.take_along_axis(sims, top, 1)
    order = np.argsort(-top_sims, axis=1, kind="stable")
    return np.take_along_axis(top_sims, order, 1), np.take_along_axis(np.take_along_axis(ids, top, 1), order, 1)


class Cells:
    """The trained cells: each image embedding's nearest cells by cosine (matrix products, then a few
    whole-array operations per coarse cell: no per-sample Python)."""

    def __init__(self, centroids: np.ndarray, coarse: np.ndarray | None, parents: np.ndarray | None, margin: float):
        self.centroids = as_float32(centroids)
        self.coarse = None if coarse is None else as_float32(coarse)
        self.parents = None if parents is None else np.asarray(parents, dtype=np.int64)
        self.members = None if parents is None else [np.flatnonzero(self.parents == cell) for cell in range(len(coarse))]
        self.margin = margin

    @property
    def count(self) -> int:
        return len(self.centroids)

    def _nearest(self, queries: np.ndarray, wanted: int) -> tuple[np.ndarray, np.ndarray]:
        """(cosines, cells) of each query's ``wanted`` nearest cells, nearest first."""
        if self.coarse is None:
            sims = queries @ self.centroids.T
            return _best(sims, np.broadcast_to(np.arange(self.count), sims.shape), wanted)
        probes = _best(queries @ self.coarse.T, np.broadcast_to(np.arange(len(self.coarse)), (len(queries), len(self.coarse))),
                       min(COARSE_PROBES, len(self.coarse)))[1]
        best_sims = np.full((len(queries), wanted), -np.inf, dtype=np.float32)
        best_ids = np.full((len(queries), wanted), -1, dtype=np.int64)
        flat = probes.reshape(-1)
        order = np.argsort(flat, kind="stable")
        query_of = np.repeat(np.arange(len(queries)), probes.shape[1])[order]
        starts = np.searchsorted(flat[order], np.arange(len(self.coarse) + 1))
        for cell in np.flatnonzero(np.diff(starts)):
            rows, members = query_of[starts[cell] : starts[cell + 1]], self.members[cell]
            if not len(members):
                continue
            sims = queries[rows] @ self.centroids[members].T
            best_sims[rows], best_ids[rows] = _best(np.concatenate([best_sims[rows], sims], 1), np.concatenate(
                [best_ids[rows], np.broadcast_to(members, sims.shape)], 1), wanted)
        return best_sims, best_ids

    def assign(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(rows, cells): every sample's nearest cell, and its other near cells within the margin;
        sorted by (cell, row)."""
        rows = np.arange(len(images), dtype=np.int64)
        if self.count == 1 or not len(images):
            return rows, np.zeros(len(images), dtype=np.int64)
        wanted = min(ASSIGNED_CELLS, self.count)
        parts = [self._nearest(as_float32(images[start : start + QUERY_BLOCK]), wanted)
                 for start in range(0, len(images), QUERY_BLOCK)]
        sims, cells = (np.concatenate([part[i] for part in parts]) for i in (0, 1))
        near = (cells >= 0) & (sims >= sims[:, :1] - self.margin)
        near[:, 0] = True
        row_of = np.broadcast_to(rows[:, None], cells.shape)[near]
        cell_of = cells[near].astype(np.int64)
        order = np.lexsort((row_of, cell_of))
        return row_of[order], cell_of[order]

    def save(self, directory: Path, record: dict) -> None:
        """Into ``directory`` once: built beside it and renamed (the first of two racing writers wins)."""
        if directory.exists():
            return
        staging = directory.with_name(leftover_name(directory.name, uuid.uuid4().hex))
        staging.mkdir(parents=True)
        np.save(staging / "centroids.npy", self.centroids)
        if self.coarse is not None:
            np.save(staging / "coarse.npy", self.coarse)
            np.save(staging / "parents.npy", self.parents)
        (staging / "cells.json").write_text(json.dumps(record | {"margin": self.margin, "cells": self.count}))
        try:
            os.rename(staging, directory)
        except OSError:  # another process published first: theirs stands
            shutil.rmtree(staging, ignore_errors=True)

    @classmethod
    def load(cls, directory: Path) -> tuple[Cells, dict]:
        record = json.loads((directory / "cells.json").read_text())
        two_level = (directory / "coarse.npy").is_file()
        coarse, parents = (np.load(directory / "coarse.npy"), np.load(directory / "parents.npy")) if two_level else (None, None)
        return cls(np.load(directory / "centroids.npy"), coarse, parents, record["margin"]), record


def plan_record(plan: CellPlan, trained: int) -> dict:
    return asdict(plan) | {"trained_cells": trained}
