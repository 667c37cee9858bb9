"""The faiss index over the scored samples: the plan by size, exact search equal to brute force
(restricted to a training split, per label), IVF tuned to its recall target and within 0.01 of the
exact held-out rho, saved and loaded (memory-mapped), and the GPU where faiss has one."""

import numpy as np
import pytest
import torch

from mimicfilter.extrapolate.features import Embedded
from mimicfilter.extrapolate.index import (
    EXACT_PAIR_BUDGET,
    IVF_MIN_VECTORS,
    MIN_IVF_VECTORS,
    SQ8_MAX_VECTORS,
    ScoredIndex,
    exact_search,
    gpu_count,
    plan_index,
)
from mimicfilter.extrapolate.methods import ReferenceSet, SearchSettings, fit_knn, holdout_split
from mimicfilter.extrapolate.recall import recall_at


def clustered(count, dim=32, clusters=64, seed=0):
    """Unit vectors around random centres, and a planted score: the centre's plus a smooth direction."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    which = rng.integers(0, clusters, count)
    vectors = centres[which] + 0.6 * rng.standard_normal((count, dim)).astype(np.float32) / np.sqrt(dim)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    score = rng.standard_normal(clusters)[which] + 2 * vectors @ centres[0] + 0.2 * rng.standard_normal(count)
    return vectors, score


def rows_of(vectors):
    return lambda rows: vectors[rows]


def test_the_plan_follows_the_size():
    assert plan_index(MIN_IVF_VECTORS - 1, 10**9, 512).kind == "exact"  # too few to cluster
    small = plan_index(100_000, int(EXACT_PAIR_BUDGET / 100_000), 512)
    assert small.kind == "exact" and "pairs" in small.reason
    large = plan_index(1_000_000, 10_000_000, 512)
    assert large.kind == "ivf-sq8" and large.nlist == 2048 and large.coarse == "flat" and large.fast_scan
    assert large.factory_string(512) == "IVF2048,PQ128x4fs,Refine(SQ8)"
    assert plan_index(1_000_000, 10_000_000, 512, gpu=True).factory_string(512) == "IVF2048,SQ8"  # no fast scan on GPUs
    huge = plan_index(SQ8_MAX_VECTORS + 1, 10**9, 512)
    assert huge.kind == "ivf-sq4" and huge.coarse == "hnsw" and "memory" in huge.reason
    assert huge.factory_string(512) == f"IVF{huge.nlist}_HNSW32,PQ128x4fs,Refine(SQ4)"
    assert plan_index(10**6, 1, 16, "exact").kind == "exact"
    # an IVF asked for on too few samples to train it (its 4-bit PQ needs 16 x 39 points): exact, and why
    few = plan_index(IVF_MIN_VECTORS - 1, 1, 16, "ivf-sq8")
    assert few.kind == "exact" and few.reason == f"ivf-sq8 asked for, but {IVF_MIN_VECTORS - 1} scored samples are " \
        f"too few to train it (at least {IVF_MIN_VECTORS})"
    assert plan_index(IVF_MIN_VECTORS, 1, 16, "ivf-sq4").kind == "ivf-sq4"


def test_exact_search_equals_brute_force_restricted_and_per_label():
    vectors, _ = clustered(3000, dim=16)
    queries = vectors[:200] + 0.01
    index = ScoredIndex.build(rows_of(vectors), len(vectors), 16, None, 10, "auto", 0)
    assert index.describe()["kind"] == "exact"
    sims, ids = index.search(queries, 7)
    brute = queries @ vectors.T
    assert np.array_equal(ids, np.argsort(-brute, axis=1, kind="stable")[:, :7])
    np.testing.assert_allclose(sims, np.sort(brute, axis=1)[:, ::-1][:, :7], rtol=1e-5, atol=1e-5)
    allowed = np.arange(3000) % 4 != 0
    _, ids = index.search(queries, 7, allowed=allowed)
    assert allowed[ids].all() and np.array_equal(ids, np.flatnonzero(allowed)[np.argsort(-brute[:, allowed], axis=1)[:, :7]])
    labels = np.arange(3000) % 3
    labelled = ScoredIndex.build(rows_of(vectors), 3000, 16, labels, 10, "auto", 0)
    query_labels = np.array([0, 1, 2, 5] * 50)  # label 5 has no scored sample
    sims, ids = labelled.search(queries, 4, labels=query_labels)
    known = query_labels != 5
    assert (labels[ids[known]] == query_labels[known, None]).all()
    assert (ids[~known] == -1).all() and np.isneginf(sims[~known]).all()
    assert labelled.describe()["kind"] == "per-label" and labelled.describe()["labels"] == 3


def reference_of(vectors, score):
    values = torch.from_numpy(np.stack([score, score], axis=1))
    return ReferenceSet(np.arange(len(vectors)), Embedded(torch.from_numpy(vectors).half()), values, None, len(vectors))


def test_ivf_reaches_its_recall_target_and_the_exact_rho(tmp_path):
    everything, score = clustered(20_500)
    vectors, score, queries = everything[:20_000], score[:20_000], everything[20_000:]  # queries: same pool, not indexed
    reference = reference_of(vectors, score)
    split = holdout_split(len(vectors), 0.2, seed=0)
    exact = fit_knn(reference, "image", split, (5, 10, 20), False, SearchSettings(index="exact"))
    approximate = fit_knn(reference, "image", split, (5, 10, 20), False, SearchSettings(index="ivf-sq8", recall_target=0.95))
    plan = approximate.index.describe()
    assert plan["kind"] == "ivf-sq8" and plan["recall"] >= 0.95 and plan["recall_k"] == 10 and plan["fast_scan"]
    assert plan["calibration_queries"] == 1000 and 1 <= plan["nprobe"] <= plan["nlist"] and plan["k_factor"] >= 2
    assert exact.heldout_spearman > 0.5
    assert abs(approximate.heldout_spearman - exact.heldout_spearman) <= 0.01
    # the recall it claims holds on queries it was not tuned on
    _, truth = exact_search(queries, rows_of(vectors), np.arange(len(vectors)), 10)
    assert recall_at(approximate.index.search(queries, 10)[1], truth) >= 0.9
    # saved and loaded (inverted lists memory-mapped): the same neighbours
    approximate.index.save(tmp_path / "index")
    loaded = ScoredIndex.load(tmp_path / "index")
    assert loaded.describe() == plan
    for one, other in zip(approximate.index.search(queries, 10), loaded.search(queries, 10)):
        assert np.array_equal(one, other)


def test_ivf_sq4_and_untuned_indexes():
    vectors, _ = clustered(4000, dim=16)
    index = ScoredIndex.build(rows_of(vectors), len(vectors), 16, None, 10, "ivf-sq4", 0)
    plan = index.describe()
    assert plan["kind"] == "ivf-sq4" and plan["nprobe"] == 1 and "recall" not in plan  # untuned without a tuner
    sims, ids = index.search(vectors[:5], 3)
    assert ids.shape == (5, 3) and (ids >= 0).all()


@pytest.mark.parametrize("count", [IVF_MIN_VECTORS, 700, 1000])
@pytest.mark.parametrize("kind", ["ivf-sq8", "ivf-sq4"])
def test_an_ivf_on_few_samples_trains_without_faiss_warnings(capfd, kind, count):
    """faiss warns from C++ (on the file descriptor) when k-means gets fewer than 39 points per
    centroid: the plan never asks for more cells, nor for a PQ, than the samples can train."""
    vectors, _ = clustered(count, dim=32)
    capfd.readouterr()
    index = ScoredIndex.build(rows_of(vectors), count, 32, None, 10, kind, 0)
    assert index.describe()["kind"] == kind
    assert "WARNING" not in capfd.readouterr().err
    labels = np.arange(count) % 3  # --same-label: each label's index is planned on its own members
    labelled = ScoredIndex.build(rows_of(vectors), count, 32, labels, 10, kind, 0)
    assert labelled.describe()["kinds"] == ["exact"] and "WARNING" not in capfd.readouterr().err


@pytest.mark.skipif(gpu_count() < 1, reason="faiss has no GPU support here (faiss-cpu)")
def test_gpu_index_equals_cpu():
    vectors, _ = clustered(5000)
    queries = vectors[:300] + 0.01
    cpu = ScoredIndex.build(rows_of(vectors), len(vectors), 32, None, 10, "exact", 0)
    gpu = ScoredIndex.build(rows_of(vectors), len(vectors), 32, None, 10, "exact", 0)
    assert gpu.use_device("cuda") == {"search_device": "cuda"}
    (cpu_sims, cpu_ids), (gpu_sims, gpu_ids) = cpu.search(queries, 7), gpu.search(queries, 7)
    np.testing.assert_allclose(gpu_sims, cpu_sims, rtol=1e-4, atol=1e-4)
    assert (gpu_ids == cpu_ids).mean() > 0.99  # near-ties may swap


def test_without_gpu_support_the_search_stays_on_the_cpu():
    vectors, _ = clustered(100, dim=8)
    index = ScoredIndex.build(rows_of(vectors), 100, 8, None, 10, "exact", 0)
    where = index.use_device("cuda:0")
    if gpu_count() < 1:
        assert where["search_device"] == "cpu" and "faiss-gpu" in where["gpu_unused"]
        assert "faiss-gpu" in index.describe()["gpu_unused"]  # stats.json says why the GPU went unused
    assert index.use_device("cpu") == {"search_device": "cpu"} and "gpu_unused" not in index.describe()
