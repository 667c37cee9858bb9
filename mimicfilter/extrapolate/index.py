"""Neighbour search over the scored samples on faiss: exact below a size, IVF beyond, on the GPU
where faiss has one, and one index per label for ``--same-label``.

Which index (:func:`plan_index`, recorded in stats.json with its parameters):

* ``exact`` (``IndexFlatIP``, float32 inner products = cosine on unit vectors) while the whole
  search costs at most :data:`EXACT_PAIR_BUDGET` query–reference pairs (about five minutes on two
  cores), or the scored set is too small to cluster; an IVF asked for by name on fewer than
  :data:`IVF_MIN_VECTORS` samples is exact too (its 4-bit PQ could not be trained: faiss would
  warn, and an IVF over so few samples is slower than exact search anyway);
* ``ivf-sq8`` beyond: ``nlist`` ≈ 2·√M k-means cells; within the ``nprobe`` cells searched, a
  4-bit fast-scan product quantiser (d/8 bytes per vector, SIMD table lookups) proposes
  ``k_factor`` × k candidates that are re-ranked on 8-bit scalar codes (d bytes) — table lookups
  over 4-bit codes scan several times faster than SQ8 codes, and the re-ranking restores recall;
* ``ivf-sq4`` beyond :data:`SQ8_MAX_VECTORS` scored samples: the same with 4-bit re-ranking codes
  (d/2 bytes) behind an HNSW coarse search, so a hundred million 512-d samples take 32 GB.

``nprobe`` and ``k_factor`` are raised until recall@10 against exact search reaches the target on
calibration queries drawn from the scored samples (:mod:`~mimicfilter.extrapolate.recall`). For a
GPU (``--device cuda`` with faiss-gpu) the IVF kinds scan their SQ codes directly (faiss has no
fast-scan on the GPU).

Every sub-index stores its members' vectors in order; :class:`ScoredIndex` maps its local ids back
to positions in the scored set (the *global* ids every caller sees), and ``allowed`` (a mask over
global ids: the training split while the held-out split is predicted) restricts a search to those
samples on the CPU index. Slots without a neighbour hold −inf and id −1.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable

import faiss
import numpy as np

from mimicfilter.errors import MimicfilterError

INDEX_KINDS = ("auto", "exact", "ivf-sq8", "ivf-sq4")
EXACT_PAIR_BUDGET = 2e10  # queries × scored samples below which exact search is used (~5 min on 2 cores)
MIN_IVF_VECTORS = 4096  # fewer scored samples (per label) are searched exactly: too few to cluster
SQ8_MAX_VECTORS = 20_000_000  # 8-bit re-ranking codes up to this many scored samples (d bytes each); 4-bit beyond
TRAINING_POINTS_PER_CELL = 39  # the k-means sample (faiss's minimum)
PQ_CENTROIDS = 16  # a 4-bit fast-scan sub-quantiser's centroids, each trained on TRAINING_POINTS_PER_CELL points
IVF_MIN_VECTORS = PQ_CENTROIDS * TRAINING_POINTS_PER_CELL  # fewer (per label): exact, whatever --index asks
KMEANS_ITERATIONS = 10
HNSW_COARSE_ABOVE = 4096  # cells: beyond this many the coarse search is an HNSW graph, not a flat scan
ADD_BLOCK = 65536  # vectors converted to float32 and added (or compared exactly) at a time


@dataclass(frozen=True)
class IndexPlan:
    """Which faiss index the scored samples get, and why (recorded in stats.json)."""

    kind: str  # exact | ivf-sq8 | ivf-sq4
    nlist: int = 0
    nprobe: int = 0
    k_factor: int = 0  # fast scan: candidates re-ranked per neighbour wanted
    fast_scan: bool = False  # candidates from a 4-bit fast-scan PQ (CPU); else the SQ codes are scanned (GPU)
    coarse: str = "flat"  # flat | hnsw
    reason: str = ""
    recall: float = 0.0  # recall@recall_k against exact search at this nprobe, on calibration queries
    recall_k: int = 0
    calibration_queries: int = 0

    def factory_string(self, dim: int) -> str:
        if self.kind == "exact":
            return "Flat"
        cells = f"IVF{self.nlist}" + ("_HNSW32" if self.coarse == "hnsw" else "")
        codes = "SQ8" if self.kind == "ivf-sq8" else "SQ4"
        return f"{cells},PQ{dim // 4}x4fs,Refine({codes})" if self.fast_scan else f"{cells},{codes}"

    def describe(self) -> dict[str, Any]:
        return {name: value for name, value in asdict(self).items() if value not in (0, "", False)}


def _cells(count: int) -> int:
    """≈ 2·√count cells (a power of two), and at least 39 training points per cell."""
    cells = 2 ** round(math.log2(max(1.0, 2 * math.sqrt(count))))
    return max(1, min(cells, count // TRAINING_POINTS_PER_CELL))


def plan_index(reference_count: int, query_count: int, dim: int, requested: str = "auto", gpu: bool = False) -> IndexPlan:
    """The index for ``reference_count`` scored vectors searched by about ``query_count`` queries."""
    if requested not in INDEX_KINDS:
        raise MimicfilterError(f"--index {requested}: choose one of {', '.join(INDEX_KINDS)}")
    pairs = float(reference_count) * float(query_count)
    if requested == "exact" or (requested == "auto" and (reference_count < MIN_IVF_VECTORS or pairs <= EXACT_PAIR_BUDGET)):
        why = "asked for" if requested == "exact" else (
            f"{reference_count} scored samples: too few to cluster" if reference_count < MIN_IVF_VECTORS
            else f"{pairs:.2g} query-reference pairs <= {EXACT_PAIR_BUDGET:.0g}")
        return IndexPlan("exact", reason=why)
    if reference_count < IVF_MIN_VECTORS:  # asked for by name: k-means and the PQ would train on too few points
        return IndexPlan("exact", reason=f"{requested} asked for, but {reference_count} scored samples are too few "
                                         f"to train it (at least {IVF_MIN_VECTORS})")
    kind = requested if requested != "auto" else ("ivf-sq8" if reference_count <= SQ8_MAX_VECTORS else "ivf-sq4")
    nlist = _cells(reference_count)
    why = "asked for" if requested != "auto" else (
        f"{pairs:.2g} query-reference pairs > {EXACT_PAIR_BUDGET:.0g}"
        + ("" if kind == "ivf-sq8" else f"; {reference_count} scored samples > {SQ8_MAX_VECTORS} (memory)"))
    fast_scan = not gpu and dim % 8 == 0  # 4-dim sub-quantisers, codes packed two per byte
    return IndexPlan(kind, nlist, 1, 2 if fast_scan else 0, fast_scan,
                     "hnsw" if nlist > HNSW_COARSE_ABOVE else "flat", why)


def as_float32(vectors: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(vectors, dtype=np.float32)


Vectors = Callable[[np.ndarray], np.ndarray]  # global ids → their float32 unit vectors [n, d]


def _build(vectors: Vectors, members: np.ndarray, dim: int, plan: IndexPlan, seed: int) -> faiss.Index:
    """A CPU index holding the vectors of ``members`` in order (added a block at a time)."""
    index = faiss.index_factory(dim, plan.factory_string(dim), faiss.METRIC_INNER_PRODUCT)
    if plan.kind != "exact":
        ivf = faiss.extract_index_ivf(index)
        ivf.cp.niter = KMEANS_ITERATIONS
        ivf.cp.seed = seed
        # 4 × 39 points per cell, and enough for the PQ's 16 centroids per sub-quantiser (plan_index
        # never plans an IVF on fewer members, nor more cells than 1 per 39 of them)
        wanted = max(4 * TRAINING_POINTS_PER_CELL * plan.nlist, IVF_MIN_VECTORS if plan.fast_scan else 0)
        sample = min(len(members), wanted)
        chosen = np.sort(np.random.default_rng(seed).choice(len(members), sample, replace=False))
        index.train(as_float32(vectors(members[chosen])))
    for start in range(0, len(members), ADD_BLOCK):
        index.add(as_float32(vectors(members[start : start + ADD_BLOCK])))
    _set_search(index, plan)
    return index


def exact_search(queries: np.ndarray, vectors: Vectors, members: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` (inner products, positions into ``members``) of ``queries`` [Q, d], a block of
    members at a time (BLAS products; no float32 copy of them all)."""
    heap = faiss.ResultHeap(len(queries), k, keep_max=True)
    queries = as_float32(queries)
    for start in range(0, len(members), ADD_BLOCK):
        block = as_float32(vectors(members[start : start + ADD_BLOCK]))
        sims, ids = faiss.knn(queries, block, min(k, len(block)), metric=faiss.METRIC_INNER_PRODUCT)
        heap.add_result(sims, np.where(ids >= 0, ids + start, -1))
    heap.finalize()
    return heap.D, heap.I


def _set_search(index: faiss.Index, plan: IndexPlan) -> None:
    """The plan's nprobe (and k_factor) on the index."""
    if plan.kind == "exact":
        return
    ivf = faiss.extract_index_ivf(index)
    ivf.nprobe = max(1, plan.nprobe)
    if plan.coarse == "hnsw":  # the graph must return at least nprobe cells
        faiss.downcast_index(ivf.quantizer).hnsw.efSearch = max(64, 2 * ivf.nprobe)
    if plan.fast_scan:
        faiss.downcast_index(index).k_factor = max(1, plan.k_factor)


def _search_parameters(plan: IndexPlan, selector: faiss.IDSelector) -> faiss.SearchParameters:
    if plan.kind == "exact":
        return faiss.SearchParameters(sel=selector)
    cells = faiss.SearchParametersIVF(sel=selector, nprobe=max(1, plan.nprobe))
    return faiss.IndexRefineSearchParameters(k_factor=plan.k_factor, base_index_params=cells) if plan.fast_scan else cells


def gpu_count() -> int:
    """GPUs faiss can use (0 with faiss-cpu)."""
    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


class SubIndex:
    """One faiss index over some scored samples (``members``: their global ids, in index order)."""

    def __init__(self, index: faiss.Index, members: np.ndarray, plan: IndexPlan):
        self.cpu = index
        self.members = np.asarray(members, dtype=np.int64)
        self.plan = plan
        self.gpu: faiss.Index | None = None
        self._gpu_resources = None

    @classmethod
    def build(cls, vectors: Vectors, members: np.ndarray, dim: int, plan: IndexPlan, seed: int) -> SubIndex:
        return cls(_build(vectors, members, dim, plan, seed), members, plan)

    def with_search(self, nprobe: int, k_factor: int) -> None:
        self.plan = replace(self.plan, nprobe=nprobe, k_factor=k_factor if self.plan.fast_scan else 0)
        _set_search(self.cpu, self.plan)

    def to_gpu(self, device: int) -> str | None:
        """Search on GPU ``device`` from now on; returns why not, or None."""
        try:
            self._gpu_resources = faiss.StandardGpuResources()
            self.gpu = faiss.index_cpu_to_gpu(self._gpu_resources, device, self.cpu)
            if self.plan.kind != "exact":
                faiss.GpuParameterSpace().set_index_parameter(self.gpu, "nprobe", max(1, self.plan.nprobe))
            return None
        except (AttributeError, RuntimeError) as error:  # faiss-cpu, or an index kind the GPU lacks
            self.gpu = None
            return " ".join(str(error).split())[:200]

    def search(self, queries: np.ndarray, k: int, allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(similarities, global ids) [Q, k]; ``allowed``: a mask over global ids (CPU search)."""
        queries = as_float32(queries)
        if allowed is None:
            sims, local = (self.cpu if self.gpu is None else self.gpu).search(queries, k)
        elif self.plan.kind == "exact":  # faiss's selector path skips BLAS: compare the allowed rows in blocks
            rows = np.flatnonzero(allowed[self.members])
            sims, found = exact_search(queries, self.cpu.reconstruct_batch, rows, k)
            local = np.where(found >= 0, rows[np.clip(found, 0, None)], -1)
        else:
            bits = np.packbits(allowed[self.members], bitorder="little")
            selector = faiss.IDSelectorBitmap(len(self.members), faiss.swig_ptr(bits))
            sims, local = self.cpu.search(queries, k, params=_search_parameters(self.plan, selector))
            del bits
        found = local >= 0
        ids = np.where(found, self.members[np.clip(local, 0, None)], -1)
        return np.where(found, sims, -np.inf).astype(np.float32), ids


class ScoredIndex:
    """The scored samples' index: one :class:`SubIndex`, or one per label (``--same-label``)."""

    def __init__(self, parts: dict[int | None, SubIndex], count: int, dim: int):
        self.parts = parts
        self.count = count
        self.dim = dim
        self.device = "cpu"
        self.where: dict[str, str] = {}  # a GPU in use, or why none is

    @property
    def labelled(self) -> bool:
        return None not in self.parts

    @classmethod
    def build(cls, vectors: Vectors, count: int, dim: int, labels: np.ndarray | None, query_count: int,
              requested: str, seed: int, tune: Callable[[SubIndex, Vectors], None] | None = None,
              gpu: bool = False) -> ScoredIndex:
        """Index the ``count`` scored vectors (per label with ``labels``); ``tune`` sets an IVF's nprobe."""
        groups = {None: np.arange(count)} if labels is None else \
            {int(label): np.flatnonzero(labels == label) for label in np.unique(labels)}
        parts = {}
        for label, members in groups.items():
            share = query_count * len(members) / max(1, count)  # queries go to their label's index
            plan = plan_index(len(members), int(share), dim, requested, gpu)
            parts[label] = SubIndex.build(vectors, members, dim, plan, seed)
            if tune is not None and plan.kind != "exact":
                tune(parts[label], vectors)
        return cls(parts, count, dim)

    def use_device(self, device: str) -> dict[str, Any]:
        """Move the indexes to the CUDA device ``device`` names when faiss has GPU support."""
        self.where = self._move(device)
        return self.where

    def _move(self, device: str) -> dict[str, Any]:
        if not device.startswith("cuda"):
            return {"search_device": "cpu"}
        if gpu_count() < 1:
            return {"search_device": "cpu", "gpu_unused": "faiss has no GPU support here (install faiss-gpu)"}
        number = int(device.split(":")[1]) if ":" in device else 0
        for sub in self.parts.values():
            why = sub.to_gpu(number)
            if why is not None:
                for moved in self.parts.values():
                    moved.gpu = None
                return {"search_device": "cpu", "gpu_unused": why}
        self.device = device
        return {"search_device": device}

    def search(self, queries: np.ndarray, k: int, labels: np.ndarray | None = None,
               allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` (cosine similarities, global ids) of each query, best first; −inf / −1 where none."""
        if queries.shape[1] != self.dim:
            raise MimicfilterError(f"embedding dimension mismatch: {queries.shape[1]} vs {self.dim}")
        if not self.labelled:
            return self.parts[None].search(queries, k, allowed)
        if labels is None:
            raise MimicfilterError("--same-label: the queries have no labels")
        sims = np.full((len(queries), k), -np.inf, dtype=np.float32)
        ids = np.full((len(queries), k), -1, dtype=np.int64)
        for label in np.unique(labels):
            rows = np.flatnonzero(labels == label)
            sub = self.parts.get(int(label))
            if sub is not None:
                sims[rows], ids[rows] = sub.search(queries[rows], k, allowed)
        return sims, ids

    def describe(self) -> dict[str, Any]:
        """What stats.json records: the plan of each index (one, or per label summarised)."""
        plans = [sub.plan.describe() for sub in self.parts.values()]
        device = {name: value for name, value in self.where.items() if name == "gpu_unused" or value != "cpu"}
        if not self.labelled:
            return {**plans[0], "vectors": self.count, "dim": self.dim, **device}
        kinds = sorted({plan["kind"] for plan in plans})
        return {"kind": "per-label", "labels": len(plans), "kinds": kinds, "vectors": self.count, "dim": self.dim,
                "largest": max(plans, key=lambda plan: plan.get("nlist", 0)), **device}

    # --------------------------------------------------------------------------------- on disk

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        manifest = []
        for number, (label, sub) in enumerate(self.parts.items()):
            faiss.write_index(sub.cpu, str(directory / f"index-{number}.faiss"))
            np.save(directory / f"members-{number}.npy", sub.members)
            manifest.append({"label": label, "plan": asdict(sub.plan)})
        (directory / "indexes.json").write_text(json.dumps({"count": self.count, "dim": self.dim, "parts": manifest}))

    @classmethod
    def load(cls, directory: Path) -> ScoredIndex:
        """The saved indexes; IVF inverted lists are memory-mapped (shared by the processes that load them)."""
        manifest = json.loads((directory / "indexes.json").read_text())
        parts = {}
        for number, entry in enumerate(manifest["parts"]):
            plan = IndexPlan(**entry["plan"])
            flags = faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY if plan.kind != "exact" else 0
            index = faiss.read_index(str(directory / f"index-{number}.faiss"), flags)
            _set_search(index, plan)
            parts[entry["label"]] = SubIndex(index, np.load(directory / f"members-{number}.npy"), plan)
        return cls(parts, manifest["count"], manifest["dim"])
