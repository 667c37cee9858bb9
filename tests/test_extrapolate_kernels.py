"""Score extrapolation's kernels on synthetic data: kNN over the faiss index, choosing k, pair
features, the GNN (planted graphs, full-batch and mini-batched), and the held-out split. The index
itself (exact against brute force, IVF recall, labels, saving) is tested in test_extrapolate_index.py."""

import numpy as np
import pytest
import torch

from mimicfilter.errors import MimicfilterError
from mimicfilter.extrapolate import gnn
from mimicfilter.extrapolate.features import Embedded, available_features
from mimicfilter.extrapolate.knn import choose_k, knn_predict, without_self
from mimicfilter.extrapolate.methods import (
    Neighbours,
    ReferenceSet,
    SearchSettings,
    fit_gnn,
    fit_knn,
    holdout_split,
    query_neighbours,
)
from mimicfilter.metrics import spearman


def unit_rows(count, dim, generator):
    return torch.nn.functional.normalize(torch.randn(count, dim, generator=generator), dim=1)


def clusters(n_clusters=6, per_cluster=12, dim=16, seed=0):
    """Well-separated clusters of unit vectors; every member of a cluster has its cluster's score."""
    generator = torch.Generator().manual_seed(seed)
    centres = unit_rows(n_clusters, dim, generator) * 10
    members = centres.repeat_interleave(per_cluster, 0) + 0.05 * torch.randn(n_clusters * per_cluster, dim, generator=generator)
    scores = torch.arange(n_clusters, dtype=torch.float64).repeat_interleave(per_cluster) * 1.5 - 2.0
    values = torch.stack([scores, scores.exp()], dim=1)
    return torch.nn.functional.normalize(members, dim=1), values, torch.arange(n_clusters).repeat_interleave(per_cluster)


def neighbours_of(embeddings, values=None, labels=None, **settings):
    """The exact index over ``embeddings`` as a reference set (image features)."""
    values = torch.zeros(len(embeddings), 2, dtype=torch.float64) if values is None else values
    reference = ReferenceSet(np.arange(len(embeddings)), Embedded(embeddings), values, labels, len(embeddings))
    return Neighbours(reference, "image", SearchSettings(**settings))


# ------------------------------------------------------------------------------------------------ kNN


@pytest.mark.parametrize("weighted", [False, True])
def test_exact_recovery_when_neighbours_share_scores(weighted):
    embeddings, values, cluster = clusters()
    split = holdout_split(len(embeddings), 0.25, seed=3)
    neighbours = neighbours_of(embeddings, values)
    choice = choose_k(neighbours.of_rows, values, (1, 2, 5), split.holdout, split.train, weighted=weighted)
    assert choice.spearman == pytest.approx(1.0)
    assert choice.spearman_by_k == {1: pytest.approx(1.0), 2: pytest.approx(1.0), 5: pytest.approx(1.0)}
    assert choice.k == 1  # ties go to the smallest k
    # new members of the same clusters get exactly their cluster's scores, for every k up to the cluster size
    queries, _, query_cluster = clusters(seed=0)
    queries = torch.nn.functional.normalize(queries + 0.01, dim=1)
    for k in (1, 5, 12):
        sims, index = query_neighbours(neighbours.index, Embedded(queries), "image", k, None, SearchSettings(block_size=7))
        predicted = knn_predict(values, sims, index, weighted)
        torch.testing.assert_close(predicted, values[query_cluster * 12], rtol=0, atol=1e-12)


def test_held_out_rows_find_neighbours_among_training_rows_only():
    generator = torch.Generator().manual_seed(1)
    embeddings = unit_rows(60, 8, generator)
    allowed = np.arange(60) % 3 != 0
    blocks = []
    sims, index = neighbours_of(embeddings, block_size=7, observer=blocks.append).of_rows(np.arange(60), 5, allowed)
    assert blocks and max(blocks) <= 7 and sum(blocks) == 60  # searched 7 queries at a time
    brute = embeddings @ embeddings[torch.from_numpy(allowed)].T
    expected = torch.from_numpy(np.flatnonzero(allowed))[brute.topk(5, dim=1).indices]
    assert torch.equal(index, expected)
    torch.testing.assert_close(sims, brute.topk(5, dim=1).values)


def test_same_label_neighbours_and_too_few_neighbours():
    generator = torch.Generator().manual_seed(2)
    reference = unit_rows(20, 4, generator)
    labels = torch.arange(20) % 2
    queries = unit_rows(6, 4, generator)
    query_labels = torch.tensor([0, 1, 0, 1, 0, 2])  # label 2 has no scored sample
    index = neighbours_of(reference, labels=labels).index
    sims, found = query_neighbours(index, Embedded(queries), "image", 3, query_labels, SearchSettings(block_size=4))
    for row in range(5):
        assert (labels[found[row]] == query_labels[row]).all()
    assert (found[5] == -1).all() and torch.isneginf(sims[5]).all()
    values = torch.randn(20, 2, dtype=torch.float64)
    predicted = knn_predict(values, sims, found, weighted=False)
    assert torch.isnan(predicted[5]).all() and not torch.isnan(predicted[:5]).any()
    small = neighbours_of(reference[:2]).index
    sims, found = query_neighbours(small, Embedded(queries), "image", 5, None, SearchSettings())  # k > the reference: padded
    assert (found[:, 2:] == -1).all() and torch.isneginf(sims[:, 2:]).all()


def test_spearman():
    assert spearman(np.array([1, 2, 3, 4.0]), np.array([10, 20, 30, 40.0])) == pytest.approx(1)
    assert spearman(np.array([1, 2, 3, 4.0]), np.array([4, 3, 2, 1.0])) == pytest.approx(-1)
    assert np.isnan(spearman(np.ones(4), np.arange(4.0)))


def test_choose_k_refuses_k_larger_than_the_scored_set():
    embeddings, values, _ = clusters(n_clusters=2, per_cluster=5)
    split = holdout_split(len(embeddings), 0.2, seed=0)
    search = neighbours_of(embeddings, values).of_rows
    with pytest.raises(MimicfilterError, match="larger than the scored set"):
        choose_k(search, values, (20, 50), split.holdout, split.train)
    choice = choose_k(search, values, (1, 50), split.holdout, split.train)
    assert choice.k == 1 and choice.skipped_candidates == (50,)
    with pytest.raises(MimicfilterError, match="too few"):
        holdout_split(3, 0.2, seed=0)


def test_holdout_split_is_seeded_and_disjoint():
    first, again, other = holdout_split(50, 0.2, 4), holdout_split(50, 0.2, 4), holdout_split(50, 0.2, 5)
    assert torch.equal(first.holdout, again.holdout) and not torch.equal(first.holdout, other.holdout)
    assert len(first.holdout) == 10 and sorted(first.holdout.tolist() + first.train.tolist()) == list(range(50))
    assert first.by == "sample"


def test_holdout_split_by_shard_holds_out_whole_shards():
    shards = np.array(["a"] * 12 + ["b"] * 12 + ["c"] * 12 + ["d"] * 12, dtype=object)
    split = holdout_split(48, 0.2, 0, shards)
    held = set(shards[split.holdout.numpy()])
    assert split.by == "shard" and split.shards_held_out == len(held) == 1 and len(split.holdout) == 12
    assert held.isdisjoint(shards[split.train.numpy()])  # no shard on both sides
    assert sorted(split.holdout.tolist() + split.train.tolist()) == list(range(48))
    big = holdout_split(48, 0.6, 0, shards)  # 60 %: three shards, and one always stays for training
    assert big.shards_held_out == 3 and len(set(shards[big.train.numpy()])) == 1
    # one shard only: held out by sample
    assert holdout_split(48, 0.2, 0, np.array(["a"] * 48, dtype=object)).by == "sample"
    # shards too small to hold out 3 samples while keeping one: by sample too
    assert holdout_split(4, 0.2, 0, np.array(["a", "a", "b", "b"], dtype=object)).by == "sample"


# -------------------------------------------------------------------------------------- pair features


def mismatch_pool(count=240, dim=12, seed=0):
    """Pairs whose score is their image–text agreement: half matched (text = image + noise), half
    mismatched (text from another image). Images alone cannot tell them apart; the pair can."""
    generator = torch.Generator().manual_seed(seed)
    image = unit_rows(count, dim, generator)
    text = torch.nn.functional.normalize(image + 0.15 * torch.randn(count, dim, generator=generator), dim=1)
    swapped = torch.arange(count) % 2 == 1
    text[swapped] = text[swapped].roll(1, dims=0)
    embedded = Embedded(image, text)
    score = embedded.agreement() + 0.01 * torch.randn(count, generator=generator, dtype=torch.float64)
    return embedded, torch.stack([score, score], dim=1), swapped


def test_pair_features():
    embedded, _, swapped = mismatch_pool()
    assert available_features(embedded) == ("image", "pair") and available_features(Embedded(embedded.image)) == ("image",)
    vectors = embedded.neighbour_vectors("pair")
    # unit rows whose dot product is the mean of the image and the text cosines
    torch.testing.assert_close(vectors.norm(dim=1), torch.ones(len(vectors)))
    torch.testing.assert_close(vectors @ vectors.T, (embedded.image @ embedded.image.T + embedded.text @ embedded.text.T) / 2)
    inputs = embedded.node_inputs("pair")
    assert inputs.shape == (len(embedded), 2 * embedded.image.shape[1] + 1)
    torch.testing.assert_close(inputs[:, -1].double(), embedded.agreement(), rtol=1e-6, atol=1e-6)
    assert embedded.agreement()[~swapped].mean() > 0.8 > 0.2 > embedded.agreement()[swapped].mean()
    assert torch.equal(embedded.take(torch.tensor([3, 1])).text, embedded.text[[3, 1]])


def test_gnn_sees_a_mismatch_that_image_neighbours_cannot():
    embedded, values, swapped = mismatch_pool()
    scored = torch.arange(0, 240, 3)  # a third scored
    unscored = torch.tensor([i for i in range(240) if i % 3])
    reference = ReferenceSet(np.arange(len(scored)), embedded.take(scored), values[scored], None, len(scored))
    split = holdout_split(len(scored), 0.25, seed=0)
    search = SearchSettings()
    image_knn = fit_knn(reference, "image", split, (1, 5, 10), False, search)
    pair_gnn = fit_gnn(reference, "pair", split, 5, gnn.GnnSettings(max_epochs=40, patience=10), search)
    assert image_knn.heldout_spearman < 0.4 < 0.8 < pair_gnn.heldout_spearman
    predicted = pair_gnn.predict(embedded.take(unscored), None)[:, 0].numpy()
    assert spearman(predicted, values[unscored, 0].numpy()) > 0.8


# ------------------------------------------------------------------------------------------------ GNN


def planted(n_clusters=8, per_cluster=30, dim=16, seed=0):
    """A planted partition: clusters with a random score each; neighbours share their cluster's score."""
    embeddings, _, cluster = clusters(n_clusters, per_cluster, dim, seed)
    generator = torch.Generator().manual_seed(seed + 1)
    cluster_score = torch.randn(n_clusters, generator=generator, dtype=torch.float64)
    score = cluster_score[cluster]
    return Embedded(embeddings), torch.stack([score, score.exp()], dim=1), cluster


@pytest.mark.parametrize("settings", [gnn.GnnSettings(max_epochs=60, patience=10),
                                      gnn.GnnSettings(max_epochs=30, patience=10, batch_nodes=16, fanout=3)],
                         ids=["full-batch", "mini-batch"])
def test_gnn_recovers_scores_on_a_planted_graph(settings):
    embedded, values, cluster = planted()
    generator = torch.Generator().manual_seed(5)
    order = torch.randperm(len(cluster), generator=generator)
    scored, unscored = order[:80], order[80:]
    reference = ReferenceSet(np.arange(80), embedded.take(scored), values[scored], None, 80)
    split = holdout_split(80, 0.2, seed=1)
    blocks = []
    fitted = fit_gnn(reference, "image", split, 4, settings, SearchSettings(block_size=7, observer=blocks.append))
    # every graph search (training split, held-out split, all scored samples) ran in small blocks
    assert blocks and max(blocks) <= 7 and sum(blocks) == 64 + 16 + 80
    assert fitted.method == "gnn" and fitted.details["full_batch"] == (settings.batch_nodes >= 64)
    assert fitted.heldout_spearman > 0.9 and fitted.heldout_spearman_weight > 0.9
    predicted = fitted.predict(embedded.take(unscored), None)
    assert spearman(predicted[:, 0].numpy(), values[unscored, 0].numpy()) > 0.95
    error = (predicted[:, 0] - values[unscored, 0]).abs()
    spread = values[:, 0].max() - values[:, 0].min()
    assert float(error.median()) < 0.1 * spread


def test_gnn_is_deterministic():
    embedded, values, _ = planted(n_clusters=4, per_cluster=15)
    reference = ReferenceSet(np.arange(60), embedded, values, None, 60)
    split = holdout_split(60, 0.2, seed=0)
    runs = [fit_gnn(reference, "image", split, 4, gnn.GnnSettings(max_epochs=4, batch_nodes=8, fanout=2), SearchSettings())
            for _ in range(2)]
    queries = Embedded(unit_rows(9, 16, torch.Generator().manual_seed(3)))
    assert torch.equal(runs[0].predict(queries, None), runs[1].predict(queries, None))
    assert runs[0].heldout_spearman == runs[1].heldout_spearman


def test_mini_batches_touch_only_their_sampled_neighbourhood():
    generator = torch.Generator().manual_seed(0)
    count, k = 500, 8
    everything = np.arange(count)
    edges = without_self(*neighbours_of(unit_rows(count, 6, generator), block_size=64).of_rows(everything, k + 1, None),
                         everything, k)[1]
    pool = gnn.Pool(torch.randn(count, 5, generator=generator), torch.randn(count, 2, generator=generator), edges)
    model = gnn.SageRegressor(5, 8, 2)
    touched = []
    batch = torch.arange(10)
    out = gnn.forward_targets(model, pool, pool.inputs[batch], pool.neighbours[batch], fanout=2,
                              generator=torch.Generator().manual_seed(1), observer=touched.append)
    assert out.shape == (10, 2)
    assert touched == [touched[0]] and touched[0] <= 10 * 2 + 10 * 2 * 2  # two hops of fanout 2, not the graph
    # without sampling, exactly the two-hop neighbourhood
    touched.clear()
    gnn.forward_targets(model, pool, pool.inputs[batch], pool.neighbours[batch], fanout=0, observer=touched.append)
    hop1 = pool.neighbours[batch].unique()
    assert touched[0] == len(torch.cat([hop1, pool.neighbours[hop1].flatten()]).unique())


def test_neighbours_without_self_and_labels():
    generator = torch.Generator().manual_seed(2)
    vectors = unit_rows(30, 4, generator)
    vectors[6] = vectors[3]  # a duplicate of the same label: the row itself must still be dropped, its twin kept
    labels = torch.arange(30) % 3
    assert labels[3] == labels[6]
    everything = np.arange(30)
    _, index = without_self(*neighbours_of(vectors, labels=labels, block_size=8).of_rows(everything, 5, None), everything, 4)
    assert index.shape == (30, 4)
    assert not (index == torch.arange(30)[:, None]).any()
    assert (labels[index] == labels[:, None]).all()
    assert index[3, 0] == 6 and index[6, 0] == 3  # each other's nearest (similarity 1), never themselves
    # a node without any same-label neighbour gets none, and the GNN predicts nothing (NaN) for it
    lonely = Embedded(unit_rows(1, 4, generator))
    reference = ReferenceSet(np.arange(30), Embedded(vectors), torch.randn(30, 2, generator=generator, dtype=torch.float64),
                             labels, 30)
    fitted = fit_gnn(reference, "image", holdout_split(30, 0.2, 0), 3, gnn.GnnSettings(max_epochs=3), SearchSettings())
    assert torch.isnan(fitted.predict(lonely, torch.tensor([5]))).all()
    assert not torch.isnan(fitted.predict(lonely, torch.tensor([1]))).any()


def test_gnn_settings_are_validated():
    for bad in ({"hidden": 0}, {"batch_nodes": 0}, {"fanout": 0}, {"lr": 0.0}, {"patience": 0}):
        with pytest.raises(MimicfilterError):
            gnn.GnnSettings(**bad)


def test_gnn_refuses_beyond_its_size_in_one_line(monkeypatch):
    from mimicfilter.extrapolate import methods

    embedded, values, _ = planted(n_clusters=4, per_cluster=15)
    reference = ReferenceSet(np.arange(60), embedded, values, None, 60)
    monkeypatch.setattr(methods, "GNN_MAX_SCORED", 59)
    with pytest.raises(MimicfilterError, match="60 scored samples is beyond its 59") as error:
        fit_gnn(reference, "image", holdout_split(60, 0.2, 0), 4, gnn.GnnSettings(max_epochs=2), SearchSettings())
    assert "\n" not in str(error.value) and "--method knn" in error.value.hint
