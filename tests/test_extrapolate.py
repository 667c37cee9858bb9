"""Score extrapolation: score --save-embeddings, embed, the blocked kNN, choosing k, the extrapolate run."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner
from helpers import TINY_CLIP_CONFIG, image_text_samples, write_random_checkpoint, write_tar, write_tiny_config

from mimicfilter.extrapolate import run as extrapolate_module
from mimicfilter.errors import MimicfilterError
from mimicfilter.extrapolate.knn import choose_k, knn_predict, knn_search
from mimicfilter.extrapolate.run import ExtrapolateConfig, run_extrapolate
from mimicfilter.metrics import spearman
from mimicfilter.store.parts import read_scores
from mimicfilter.store.schema import SCORE_SCHEMA, score_schema
from mimicfilter_cli.main import cli


def invoke(args):
    return CliRunner().invoke(cli, [str(arg) for arg in args], catch_exceptions=False)


def unit_rows(count, dim, generator):
    return torch.nn.functional.normalize(torch.randn(count, dim, generator=generator), dim=1)


# ------------------------------------------------------------------------------------------ kernels


def clusters(n_clusters=6, per_cluster=12, dim=16, seed=0):
    """Well-separated clusters of unit vectors; every member of a cluster has its cluster's score."""
    generator = torch.Generator().manual_seed(seed)
    centres = unit_rows(n_clusters, dim, generator) * 10
    members = centres.repeat_interleave(per_cluster, 0) + 0.05 * torch.randn(n_clusters * per_cluster, dim, generator=generator)
    scores = torch.arange(n_clusters, dtype=torch.float64).repeat_interleave(per_cluster) * 1.5 - 2.0
    values = torch.stack([scores, scores.exp()], dim=1)
    return torch.nn.functional.normalize(members, dim=1), values, torch.arange(n_clusters).repeat_interleave(per_cluster)


@pytest.mark.parametrize("weighted", [False, True])
def test_exact_recovery_when_neighbours_share_scores(weighted):
    embeddings, values, cluster = clusters()
    choice = choose_k(embeddings, values, (1, 2, 5), holdout_fraction=0.25, seed=3, weighted=weighted)
    assert choice.spearman == pytest.approx(1.0)
    assert choice.spearman_by_k == {1: pytest.approx(1.0), 2: pytest.approx(1.0), 5: pytest.approx(1.0)}
    assert choice.k == 1  # ties go to the smallest k
    # new members of the same clusters get exactly their cluster's scores, for every k up to the cluster size
    queries, _, query_cluster = clusters(seed=0)
    queries = torch.nn.functional.normalize(queries + 0.01, dim=1)
    for k in (1, 5, 12):
        sims, index = knn_search(queries, embeddings, k, block_size=7, reference_block=11)
        predicted = knn_predict(values, sims, index, weighted)
        torch.testing.assert_close(predicted, values[query_cluster * 12], rtol=0, atol=1e-12)


def test_blocked_search_equals_brute_force_and_stays_in_its_blocks():
    generator = torch.Generator().manual_seed(1)
    queries, reference = unit_rows(53, 8, generator), unit_rows(97, 8, generator)
    shapes = []
    sims, index = knn_search(queries, reference, 5, block_size=10, reference_block=16, observer=shapes.append)
    full = (queries @ reference.T).topk(5, dim=1)
    torch.testing.assert_close(sims, full.values)
    assert torch.equal(index, full.indices)
    assert shapes and max(rows * columns for rows, columns in shapes) <= 10 * 16
    assert all(rows <= 10 and columns <= 16 for rows, columns in shapes)
    # with the reference in one block, the largest block is block_size x M, never N x M
    shapes.clear()
    knn_search(queries, reference, 5, block_size=10, reference_block=10**6, observer=shapes.append)
    assert max(rows * columns for rows, columns in shapes) == 10 * 97 < 53 * 97


def test_same_label_neighbours_and_too_few_neighbours():
    generator = torch.Generator().manual_seed(2)
    reference = unit_rows(20, 4, generator)
    labels = torch.arange(20) % 2
    queries = unit_rows(6, 4, generator)
    query_labels = torch.tensor([0, 1, 0, 1, 0, 2])  # label 2 has no scored sample
    sims, index = knn_search(queries, reference, 3, query_labels=query_labels, reference_labels=labels, block_size=4,
                             reference_block=7)
    for row in range(5):
        assert (labels[index[row]] == query_labels[row]).all()
    assert (index[5] == -1).all() and torch.isneginf(sims[5]).all()
    values = torch.randn(20, 2, dtype=torch.float64)
    predicted = knn_predict(values, sims, index, weighted=False)
    assert torch.isnan(predicted[5]).all() and not torch.isnan(predicted[:5]).any()
    sims, index = knn_search(queries, reference[:2], 5)  # k larger than the reference: padded
    assert (index[:, 2:] == -1).all()


def test_spearman():
    assert spearman(np.array([1, 2, 3, 4.0]), np.array([10, 20, 30, 40.0])) == pytest.approx(1)
    assert spearman(np.array([1, 2, 3, 4.0]), np.array([4, 3, 2, 1.0])) == pytest.approx(-1)
    assert np.isnan(spearman(np.ones(4), np.arange(4.0)))


def test_choose_k_refuses_k_larger_than_the_scored_set():
    embeddings, values, _ = clusters(n_clusters=2, per_cluster=5)
    with pytest.raises(MimicfilterError, match="larger than the scored set"):
        choose_k(embeddings, values, (20, 50))
    choice = choose_k(embeddings, values, (1, 50))
    assert choice.k == 1 and choice.skipped_candidates == (50,)


def test_config_is_validated_up_front(tmp_path):
    for bad in ({"k_candidates": (0, 2)}, {"holdout_fraction": 1.0}, {"block_size": 0}, {"out_dir": tmp_path / "s"}):
        with pytest.raises(MimicfilterError):
            ExtrapolateConfig(**{"scored": tmp_path / "s", "out_dir": tmp_path / "o", **bad})


# ----------------------------------------------------------------------------------- CLI end to end


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    """Tiny image-text shards (one with bad samples), a tiny CLIP config and a random reference."""
    root = tmp_path_factory.mktemp("pool")
    config = write_tiny_config(root / "tiny-clip.json")
    reference = write_random_checkpoint(root / "reference.pt")
    shards = []
    for number in range(4):
        samples = image_text_samples(24, start=number * 100)
        if number == 3:
            samples[2][1]["jpg"] = b"not an image"
            del samples[5][1]["txt"]
        shards.append(write_tar(root / f"shard-{number}.tar", samples))
    return {"root": root, "config": config, "reference": reference, "shards": shards}


def model_args(pool):
    return ["--model", pool["config"], "--reference", pool["reference"], "--workers", "0", "--quiet"]


@pytest.fixture(scope="module")
def subset_run(pool):
    """Shards 0-1 scored by a 2-epoch trajectory with --save-embeddings."""
    out = pool["root"] / "subset"
    result = invoke(["score", *pool["shards"][:2], *model_args(pool), "--batch-size", "8", "--epochs", "2",
                     "--save-embeddings", "--out", out])
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def rest_embeddings(pool):
    out = pool["root"] / "rest-embed"
    result = invoke(["embed", *pool["shards"][2:], *model_args(pool), "--batch-size", "16", "--out", out])
    assert result.exit_code == 0, result.output
    return out


def test_save_embeddings_round_trip(pool, subset_run, tmp_path):
    dim = TINY_CLIP_CONFIG["embed_dim"]
    for part in sorted((subset_run / "scores").glob("*.parquet")):
        assert pq.read_schema(part).remove_metadata().equals(score_schema(embedding_dim=dim))
    # default readers see the default schema; the column is there when asked for
    assert read_scores(subset_run).schema.equals(SCORE_SCHEMA)
    table = read_scores(subset_run, columns=["shard", "key", "epoch", "status", "embedding"])
    assert table.schema.field("embedding").type == pa.list_(pa.float16(), dim)
    rows = table.to_pylist()
    assert rows and all(row["embedding"] is not None for row in rows if row["status"] == "ok")
    norms = [np.linalg.norm(np.array(row["embedding"], dtype=float)) for row in rows]
    assert np.allclose(norms, 1, atol=2e-3)
    run = json.loads((subset_run / "run.json").read_text())
    assert run["fingerprint"]["save_embeddings"] is True and run["embedding"]["dim"] == dim
    # the trajectory's embeddings (a frozen copy of the initial proxy tower) equal `embed`'s
    out = tmp_path / "embed-0"
    assert invoke(["embed", pool["shards"][0], *model_args(pool), "--out", out]).exit_code == 0
    embedded = pq.read_table(next((out / "scores").glob("*.parquet"))).to_pylist()
    by_key = {(row["key"], row["epoch"]): row["embedding"] for row in rows if row["shard"] == str(pool["shards"][0])}
    assert len(by_key) == 2 * len(embedded)
    for row in embedded:
        for epoch in (0, 1):
            assert by_key[(row["key"], epoch)] == row["embedding"]
    assert json.loads((out / "run.json").read_text())["embedding"] == run["embedding"]
    # the flag is part of the fingerprint: the same command without it is another command
    result = CliRunner().invoke(cli, [str(a) for a in ["score", *pool["shards"][:2], *model_args(pool), "--batch-size", "8",
                                                       "--epochs", "2", "--out", subset_run]])
    assert result.exit_code == 2 and "save_embeddings" in result.output


def test_static_save_embeddings_marks_bad_rows_null(pool, tmp_path):
    out = tmp_path / "static"
    result = invoke(["score", pool["shards"][3], *model_args(pool), "--batch-size", "8", "--train", "none",
                     "--save-embeddings", "--out", out])
    assert result.exit_code == 0, result.output
    rows = read_scores(out, columns=["status", "embedding"]).to_pylist()
    assert {row["status"] for row in rows} == {"ok", "decode_error", "missing_text"}
    assert all((row["embedding"] is None) == (row["status"] != "ok") for row in rows)


def test_embed_then_extrapolate_then_filter(pool, subset_run, rest_embeddings, tmp_path):
    embedded = [row for part in sorted((rest_embeddings / "scores").glob("*.parquet")) for row in pq.read_table(part).to_pylist()]
    assert len(embedded) == 48 and sum(row["status"] != "ok" for row in embedded) == 2
    assert all((row["embedding"] is None) == (row["status"] != "ok") for row in embedded)

    out = tmp_path / "extrapolated"
    result = invoke(["extrapolate", "--scored", subset_run, "--embeddings", rest_embeddings, "--out", out,
                     "--k", "1,2,5", "--block-size", "5", "--json"])
    assert result.exit_code == 0, result.output
    stats = json.loads(result.stdout)
    assert (out / "_SUCCESS").exists() and json.loads((out / "stats.json").read_text()) == stats
    assert stats["k"] in (1, 2, 5) and -1 <= stats["heldout_spearman"] <= 1
    assert stats["scored_samples"] == stats["reference_samples"] == 48 and stats["extrapolated_samples"] == 46

    expected_schema = SCORE_SCHEMA.append(pa.field("extrapolated", pa.bool_(), nullable=False))
    for part in (out / "scores").glob("*.parquet"):
        assert pq.read_schema(part).remove_metadata().equals(expected_schema)
    rows = read_scores(out, columns=[*SCORE_SCHEMA.names, "extrapolated"]).to_pylist()
    assert len(rows) == 96 and len({(row["shard"], row["key"]) for row in rows}) == 96
    assert all(row["epoch"] == 0 and row["step"] == -1 for row in rows)
    scored_shards = {str(shard) for shard in pool["shards"][:2]}
    truth = {}
    for row in read_scores(subset_run).to_pylist():
        truth.setdefault((row["shard"], row["key"]), []).append(row["mimic_score"])
    for row in rows:
        if row["shard"] in scored_shards:
            assert not row["extrapolated"]
            assert row["mimic_score"] == pytest.approx(np.mean(truth[(row["shard"], row["key"])]), rel=1e-5)
        else:
            assert row["extrapolated"] == (row["status"] == "ok")
            assert (row["mimic_score"] is None) == (row["status"] != "ok")
            assert row["loss"] is None and row["clip_score"] is None
    # filter works on it unchanged
    curated = tmp_path / "curated"
    result = invoke(["filter", out, "--out", curated, "--top-frac", "mimic_score=0.5"])
    assert result.exit_code == 0, result.output
    manifest = pq.read_table(curated / "manifest.parquet").to_pylist()
    assert len(manifest) == 96 and all(row["epochs"] == 1 for row in manifest)
    # re-running resumes (same output); the parts are not rewritten
    before = {part.name: part.stat().st_mtime_ns for part in (out / "scores").glob("*.parquet")}
    result = invoke(["extrapolate", "--scored", subset_run, "--embeddings", rest_embeddings, "--out", out,
                     "--k", "1,2,5", "--block-size", "5", "--json"])
    assert result.exit_code == 0 and json.loads(result.stdout)["parts_written_now"] == 0
    assert before == {part.name: part.stat().st_mtime_ns for part in (out / "scores").glob("*.parquet")}


def test_holdout_is_built_from_scored_rows_only(pool, subset_run, rest_embeddings, tmp_path, monkeypatch):
    seen = []
    real_choose_k = extrapolate_module.choose_k

    def spy(embeddings, values, *args, **kwargs):
        seen.append((embeddings.clone(), values.clone()))
        return real_choose_k(embeddings, values, *args, **kwargs)

    monkeypatch.setattr(extrapolate_module, "choose_k", spy)
    config = dict(scored=subset_run, k_candidates=(1, 3, 10), holdout_fraction=0.3, seed=5)
    with_rest = run_extrapolate(ExtrapolateConfig(out_dir=tmp_path / "a", embeddings=(rest_embeddings,), **config))
    alone = run_extrapolate(ExtrapolateConfig(out_dir=tmp_path / "b", **config))  # no unscored samples at all
    # the choice saw exactly the scored samples (values = their epoch means), whatever the unscored set
    assert len(seen) == 2 and torch.equal(seen[0][0], seen[1][0]) and torch.equal(seen[0][1], seen[1][1])
    scored_means = {}
    for row in read_scores(subset_run).to_pylist():
        scored_means.setdefault((row["shard"], row["key"]), []).append(row["mimic_score"])
    assert sorted(seen[0][1][:, 0].tolist()) == pytest.approx(sorted(np.mean(v) for v in scored_means.values()), rel=1e-6)
    for name in ("k", "heldout_spearman", "heldout_spearman_by_k", "heldout_size"):
        assert with_rest[name] == alone[name]
    assert alone["extrapolated_samples"] == 0 and alone["rows"] == 48


def test_one_line_errors(pool, subset_run, rest_embeddings, tmp_path):
    def error_of(*args):
        result = CliRunner().invoke(cli, ["extrapolate", *map(str, args)])
        assert result.exit_code == 2, result.output
        errors = [line for line in result.output.splitlines() if line.startswith("Error: ")]
        assert len(errors) == 1 and errors[0] == result.output.strip().splitlines()[-1]  # one line, no traceback
        return errors[0]

    assert "no run.json" in error_of("--scored", tmp_path / "missing", "--out", tmp_path / "o1")
    assert "larger than the scored set" in error_of("--scored", subset_run, "--embeddings", rest_embeddings,
                                                    "--k", "100", "--out", tmp_path / "o2")
    plain = tmp_path / "plain"
    assert invoke(["score", pool["shards"][0], *model_args(pool), "--batch-size", "8", "--train", "none",
                   "--out", plain]).exit_code == 0
    assert "no embeddings" in error_of("--scored", plain, "--out", tmp_path / "o3")
    assert "holds no embeddings" in error_of("--scored", subset_run, "--embeddings", plain, "--out", tmp_path / "o4")
    # a model with another embedding width
    wide_config = write_tiny_config(tmp_path / "wide.json", {**TINY_CLIP_CONFIG, "embed_dim": 8})
    wide_reference = write_random_checkpoint(tmp_path / "wide.pt", {**TINY_CLIP_CONFIG, "embed_dim": 8})
    wide = tmp_path / "wide-embed"
    assert invoke(["embed", pool["shards"][2], "--model", wide_config, "--reference", wide_reference,
                   "--workers", "0", "--quiet", "--out", wide]).exit_code == 0
    assert "dimension mismatch" in error_of("--scored", subset_run, "--embeddings", wide, "--out", tmp_path / "o5")
    # same width, other weights
    other = tmp_path / "other-embed"
    other_reference = write_random_checkpoint(tmp_path / "other.pt", seed=7)
    assert invoke(["embed", pool["shards"][2], "--model", pool["config"], "--reference", other_reference,
                   "--workers", "0", "--quiet", "--out", other]).exit_code == 0
    assert "different models" in error_of("--scored", subset_run, "--embeddings", other, "--out", tmp_path / "o6")
    assert "--same-label" in error_of("--scored", subset_run, "--embeddings", rest_embeddings, "--same-label",
                                      "--out", tmp_path / "o7")
    assert "--holdout" in error_of("--scored", subset_run, "--holdout", "1.5", "--out", tmp_path / "o8")


def test_help_has_examples():
    for command in ("embed", "extrapolate"):
        result = invoke([command, "--help"])
        assert result.exit_code == 0 and "Example:" in result.output
    assert "--save-embeddings" in invoke(["score", "--help"]).output


def test_classification_embeddings_match_embed_and_same_label_runs(pool, tmp_path):
    from helpers import image_bytes

    samples = [(f"{i:05d}", {"png": image_bytes(i, fmt="PNG"), "cls": str(i % 3).encode()}) for i in range(40)]
    samples.append(("00099", {"png": image_bytes(99, fmt="PNG")}))  # no label
    first = write_tar(tmp_path / "labelled-0.tar", samples[:20])
    second = write_tar(tmp_path / "labelled-1.tar", samples[20:])
    classnames = tmp_path / "classes.txt"
    classnames.write_text("cat\ndog\nbird\n")
    common = [*model_args(pool), "--classnames", classnames]
    scored, embedded = tmp_path / "cls-run", tmp_path / "cls-embed"
    result = invoke(["score", first, *common, "--batch-size", "4", "--epochs", "2", "--lr", "1e-2",
                     "--save-embeddings", "--out", scored])
    assert result.exit_code == 0, result.output
    assert invoke(["embed", first, second, *common, "--out", embedded]).exit_code == 0
    # the head route's features give the same embeddings as the forward-only pass
    saved = {row["key"]: row["embedding"] for row in read_scores(scored, columns=["key", "embedding"]).to_pylist()}
    embeddings = {row["key"]: row for part in (embedded / "scores").glob("*.parquet") for row in pq.read_table(part).to_pylist()}
    for key, vector in saved.items():
        assert np.allclose(np.array(vector, dtype=float), np.array(embeddings[key]["embedding"], dtype=float), atol=1e-3)
    assert embeddings["00099"]["status"] == "missing_label" and embeddings["00099"]["embedding"] is None
    assert embeddings["00021"]["label"] == 0
    out = tmp_path / "cls-extrapolated"
    result = invoke(["extrapolate", "--scored", scored, "--embeddings", embedded, "--same-label", "--weighted",
                     "--k", "1,3", "--out", out, "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["extrapolated_samples"] == 20
    rows = read_scores(out).to_pylist()
    assert len(rows) == 41 and {row["status"] for row in rows} == {"ok", "missing_label"}


@pytest.mark.gpu
def test_blocked_search_on_cuda_equals_cpu():
    generator = torch.Generator().manual_seed(4)
    queries, reference = unit_rows(300, 32, generator), unit_rows(700, 32, generator)
    labels_q, labels_r = torch.randint(0, 3, (300,), generator=generator), torch.randint(0, 3, (700,), generator=generator)
    cpu = knn_search(queries, reference, 7, query_labels=labels_q, reference_labels=labels_r, block_size=64,
                     reference_block=128)
    cuda = knn_search(queries, reference, 7, query_labels=labels_q, reference_labels=labels_r, block_size=64,
                      reference_block=128, device="cuda")
    torch.testing.assert_close(cuda[0], cpu[0], rtol=1e-5, atol=1e-5)
    assert (cuda[1] == cpu[1]).float().mean() > 0.99  # near-ties may swap
