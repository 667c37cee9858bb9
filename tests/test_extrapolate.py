"""Score extrapolation end to end: pair embeddings from score --save-embeddings and embed, the
extrapolate run (kNN and GNN), what it records, older runs, and its one-line errors."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner
from extrapolate_pool import invoke, model_args, pool, rest_embeddings, subset_run  # noqa: F401  (fixtures)
from helpers import TINY_CLIP_CONFIG, write_random_checkpoint, write_tar, write_tiny_config
from test_killed_leftovers import Killed, kill

from mimicfilter.errors import MimicfilterError
from mimicfilter.extrapolate import gnn
from mimicfilter.extrapolate import methods as methods_module
from mimicfilter.extrapolate.gnn import GnnSettings
from mimicfilter.extrapolate import run as extrapolate_run
from mimicfilter.extrapolate.run import ExtrapolateConfig, run_extrapolate
from mimicfilter.pipeline import embed as embed_module
from mimicfilter.store.parts import read_scores
from mimicfilter.store.rundir import unfinished_run
from mimicfilter.store.schema import SCORE_SCHEMA, score_schema
from mimicfilter_cli.main import cli


def test_config_is_validated_up_front(tmp_path):
    for bad in ({"k_candidates": (0, 2)}, {"holdout_fraction": 1.0}, {"block_size": 0}, {"out_dir": tmp_path / "s"},
                {"method": "svm"}, {"features": "text"}, {"graph_k": 0}, {"min_rho": 2.0}):
        with pytest.raises(MimicfilterError):
            ExtrapolateConfig(**{"scored": tmp_path / "s", "out_dir": tmp_path / "o", **bad})


# ----------------------------------------------------------------------------------- CLI end to end


PAIR = ["embedding", "text_embedding"]


def vectors(value):
    return np.array(value, dtype=np.float64)


def test_pair_embeddings_round_trip(pool, subset_run, tmp_path):
    dim = TINY_CLIP_CONFIG["embed_dim"]
    for part in sorted((subset_run / "scores").glob("*.parquet")):
        assert pq.read_schema(part).remove_metadata().equals(score_schema(embedding_dim=dim))
    # default readers see the default schema; the columns are there when asked for
    assert read_scores(subset_run).schema.equals(SCORE_SCHEMA)
    table = read_scores(subset_run, columns=["shard", "key", "epoch", "status", "clip_score", *PAIR])
    for name in PAIR:
        assert table.schema.field(name).type == pa.list_(pa.float16(), dim)
    rows = table.to_pylist()
    assert rows and all(row[name] is not None for row in rows if row["status"] == "ok" for name in PAIR)
    for row in rows:
        image, text = vectors(row["embedding"]), vectors(row["text_embedding"])
        assert np.linalg.norm(image) == pytest.approx(1, abs=2e-3) and np.linalg.norm(text) == pytest.approx(1, abs=2e-3)
        # the pair's agreement is the reference CLIP score: both sides live in the reference's space
        assert image @ text == pytest.approx(row["clip_score"], abs=3e-3)
    run = json.loads((subset_run / "run.json").read_text())
    assert run["fingerprint"]["save_embeddings"] is True
    assert run["embedding"]["format"] == 2 and run["embedding"]["dim"] == dim and run["embedding"]["text"] == "caption"
    # the trajectory's embeddings (the reference's, which never moves) equal `embed`'s forward-only pass
    out = tmp_path / "embed-0"
    assert invoke(["embed", pool["shards"][0], *model_args(pool), "--out", out]).exit_code == 0
    embedded = pq.read_table(next((out / "scores").glob("*.parquet"))).to_pylist()
    by_key = {(row["key"], row["epoch"]): row for row in rows if row["shard"] == str(pool["shards"][0])}
    assert len(by_key) == 2 * len(embedded)
    for row in embedded:
        for epoch in (0, 1):
            for name in PAIR:
                assert np.allclose(vectors(by_key[(row["key"], epoch)][name]), vectors(row[name]), atol=2e-3)
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
    rows = read_scores(out, columns=["status", *PAIR]).to_pylist()
    assert {row["status"] for row in rows} == {"ok", "decode_error", "missing_text"}
    assert all((row[name] is None) == (row["status"] != "ok") for row in rows for name in PAIR)


def test_embed_then_extrapolate_then_filter(pool, subset_run, rest_embeddings, tmp_path):
    embedded = [row for part in sorted((rest_embeddings / "scores").glob("*.parquet")) for row in pq.read_table(part).to_pylist()]
    assert len(embedded) == 48 and sum(row["status"] != "ok" for row in embedded) == 2
    assert all((row[name] is None) == (row["status"] != "ok") for row in embedded for name in PAIR)

    out = tmp_path / "extrapolated"
    result = invoke(["extrapolate", "--scored", subset_run, "--embeddings", rest_embeddings, "--out", out,
                     "--k", "1,2,5", "--block-size", "5", "--json"])
    assert result.exit_code == 0, result.output
    stats = json.loads(result.stdout)
    assert (out / "_SUCCESS").exists() and json.loads((out / "stats.json").read_text()) == stats
    assert stats["method"] == "knn" and stats["k"] in (1, 2, 5) and -1 <= stats["heldout_spearman"] <= 1
    # --features auto tried both and kept the better held-out rho
    assert set(stats["heldout_spearman_by_features"]) == {"image", "pair"}
    assert stats["heldout_spearman"] == max(stats["heldout_spearman_by_features"].values())
    assert stats["trusted"] == (stats["heldout_spearman"] >= 0.5)
    assert stats["scored_samples"] == stats["reference_samples"] == 48 and stats["extrapolated_samples"] == 46
    chosen = json.loads((out / "run.json").read_text())["chosen"]
    assert chosen["method"] == "knn" and chosen["features"] == stats["features"] and chosen["k"] == stats["k"]

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


def test_gnn_run_records_its_method_and_trust(pool, subset_run, rest_embeddings, tmp_path):
    out = tmp_path / "gnn"
    result = CliRunner().invoke(cli, [str(a) for a in [
        "extrapolate", "--scored", subset_run, "--embeddings", rest_embeddings, "--out", out, "--method", "gnn",
        "--features", "pair", "--graph-k", "4", "--gnn-epochs", "5", "--gnn-batch", "16", "--gnn-fanout", "2",
        "--min-rho", "1.0"]])
    assert result.exit_code == 0, result.output
    stats = json.loads((out / "stats.json").read_text())
    assert stats["method"] == "gnn" and stats["features"] == "pair" and stats["graph_k"] == 4
    assert stats["full_batch"] is False and 0 <= stats["best_epoch"] <= stats["epochs_run"] <= 5
    assert set(stats["heldout_spearman_by_features"]) == {"pair"} and stats["extrapolated_samples"] == 46
    run = json.loads((out / "run.json").read_text())
    assert run["method"] == "gnn" and run["chosen"]["method"] == "gnn" and run["gnn"]["batch_nodes"] == 16
    assert run["fingerprint"]["gnn"]["max_epochs"] == 5
    # printed: what was chosen, the held-out rho, and (below --min-rho) that the scores are not to be trusted
    assert "GNN, 4 neighbours" in result.output and "held-out" in result.output
    assert stats["trusted"] is False and "should not be trusted for filtering" in result.output
    rows = read_scores(out, columns=["status", "mimic_score", "extrapolated"]).to_pylist()
    assert all((row["mimic_score"] is None) == (row["status"] != "ok") for row in rows)
    # a threshold the run meets: trusted, no warning
    result = CliRunner().invoke(cli, [str(a) for a in [
        "extrapolate", "--scored", subset_run, "--embeddings", rest_embeddings, "--out", tmp_path / "knn", "--min-rho", "-1"]])
    assert result.exit_code == 0 and "should not be trusted" not in result.output
    assert json.loads((tmp_path / "knn" / "stats.json").read_text())["trusted"] is True


@pytest.mark.parametrize("method", ["knn", "gnn"])
def test_holdout_is_built_from_scored_rows_only(pool, subset_run, rest_embeddings, tmp_path, monkeypatch, method):
    """Whatever the unscored set, the choices see exactly the scored samples: same inputs, same results."""
    seen = []
    real_choose_k, real_train, real_neighbours = methods_module.choose_k, gnn.train, methods_module.Neighbours

    class SpyNeighbours(real_neighbours):
        def __init__(self, reference, features, settings):
            seen.append((reference.embedded.neighbour_vectors(features), reference.values.clone()))
            super().__init__(reference, features, settings)

    def spy_choose_k(search, values, candidates, holdout, train, **kwargs):
        seen.append((torch.cat([holdout, train]), values.clone()))
        return real_choose_k(search, values, candidates, holdout, train, **kwargs)

    def spy_train(pool_, heldout_inputs, *args, **kwargs):
        seen.append((torch.cat([pool_.inputs, heldout_inputs]), pool_.targets.clone()))
        return real_train(pool_, heldout_inputs, *args, **kwargs)

    monkeypatch.setattr(methods_module, "choose_k", spy_choose_k)
    monkeypatch.setattr(methods_module, "Neighbours", SpyNeighbours)
    monkeypatch.setattr(gnn, "train", spy_train)
    config = dict(scored=subset_run, method=method, features="pair", k_candidates=(1, 3, 10), holdout_fraction=0.3,
                  seed=5, graph_k=3, gnn=GnnSettings(max_epochs=3))
    with_rest = run_extrapolate(ExtrapolateConfig(out_dir=tmp_path / "a", embeddings=(rest_embeddings,), **config))
    alone = run_extrapolate(ExtrapolateConfig(out_dir=tmp_path / "b", **config))  # no unscored samples at all
    assert len(seen) == 4 and all(torch.equal(a, b) for a, b in zip(seen[0] + seen[1], seen[2] + seen[3]))
    assert len(seen[0][0]) == len(seen[1][0]) == 48  # the index and the split: the 48 scored samples only
    scored_means = {}
    for row in read_scores(subset_run).to_pylist():
        scored_means.setdefault((row["shard"], row["key"]), []).append(row["mimic_score"])
    expected = sorted(np.mean(v) for v in scored_means.values())
    assert sorted(seen[0][1][:, 0].tolist()) == pytest.approx(expected, rel=1e-6)
    for name in ("heldout_spearman", "heldout_spearman_weight", "heldout_size", "heldout_train_size", "heldout_by"):
        assert with_rest[name] == alone[name]
    assert alone["heldout_by"] == "shard" and alone["heldout_shards"] == 1  # of the two scored shards
    assert alone["extrapolated_samples"] == 0 and alone["rows"] == 48


def write_image_only_copy(run_dir, out_dir):
    """The run as an older mimicfilter wrote it: only the image `embedding` column, run.json
    without the embedding format (parts copied without `text_embedding`)."""
    import shutil

    shutil.copytree(run_dir, out_dir)
    for part in (out_dir / "scores").glob("*.parquet"):
        table = pq.read_table(part)
        pq.write_table(table.drop_columns(["text_embedding"]), part)
    run = json.loads((out_dir / "run.json").read_text())
    run["embedding"] = {"dim": run["embedding"]["dim"], "image_tower_sha256": "0" * 64, "preprocess": "old",
                        "what": "L2-normalised image-tower output of the initial proxy, float16"}
    (out_dir / "run.json").write_text(json.dumps(run))
    return out_dir


def test_older_image_only_runs_still_extrapolate_or_are_refused_clearly(pool, subset_run, rest_embeddings, tmp_path):
    old_scored = write_image_only_copy(subset_run, tmp_path / "old-subset")
    old_rest = write_image_only_copy(rest_embeddings, tmp_path / "old-rest")
    result = invoke(["extrapolate", "--scored", old_scored, "--embeddings", old_rest, "--out", tmp_path / "o1", "--json"])
    assert result.exit_code == 0, result.output
    stats = json.loads(result.stdout)
    assert stats["features"] == "image" and stats["embedding_columns"] == ["embedding"]
    assert set(stats["heldout_spearman_by_features"]) == {"image"} and stats["extrapolated_samples"] == 46

    def error_of(*args):
        result = CliRunner().invoke(cli, ["extrapolate", *map(str, args)])
        assert result.exit_code == 2, result.output
        return result.output.strip().splitlines()[-1]

    assert "image side only" in error_of("--scored", old_scored, "--embeddings", old_rest, "--features", "pair",
                                         "--out", tmp_path / "o2")
    message = error_of("--scored", old_scored, "--embeddings", rest_embeddings, "--out", tmp_path / "o3")
    assert "older mimicfilter" in message and str(old_scored) in message and "re-run" in message


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
    # a trajectory that trains the whole proxy (--train full) still stores the reference's embeddings
    full = tmp_path / "cls-full"
    result = invoke(["score", first, *common, "--batch-size", "4", "--epochs", "1", "--train", "full", "--lr", "1e-2",
                     "--save-embeddings", "--out", full])
    assert result.exit_code == 0, result.output
    # the scorer's reference features (head route, and full training) equal the forward-only pass
    embeddings = {row["key"]: row for part in (embedded / "scores").glob("*.parquet") for row in pq.read_table(part).to_pylist()}
    for run in (scored, full):
        for row in read_scores(run, columns=["key", "label", *PAIR]).to_pylist():
            for name in PAIR:
                assert np.allclose(vectors(row[name]), vectors(embeddings[row["key"]][name]), atol=2e-3), (run, name)
    assert embeddings["00099"]["status"] == "missing_label" and embeddings["00099"]["embedding"] is None
    assert embeddings["00021"]["label"] == 0
    # the text side of a labelled image is its label's class embedding: equal within a label, not across
    by_label = {}
    for row in embeddings.values():
        if row["label"] is not None:
            by_label.setdefault(row["label"], []).append(vectors(row["text_embedding"]))
    assert all(np.array_equal(rows[0], other) for rows in by_label.values() for other in rows)
    assert not np.allclose(by_label[0][0], by_label[1][0])
    assert json.loads((embedded / "run.json").read_text())["embedding"]["text"] == "label"
    out = tmp_path / "cls-extrapolated"
    result = invoke(["extrapolate", "--scored", scored, "--embeddings", embedded, "--same-label", "--weighted",
                     "--k", "1,3", "--out", out, "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["extrapolated_samples"] == 20
    rows = read_scores(out).to_pylist()
    assert len(rows) == 41 and {row["status"] for row in rows} == {"ok", "missing_label"}


def test_samples_of_the_scored_run_are_never_extrapolated(pool, subset_run, rest_embeddings, tmp_path):
    """--embeddings that also cover the scored samples (here: the scored shards reached through a
    symlinked folder, so their shard paths differ; the uids are the same samples) give each such
    sample one row, its true score, and the overlap is reported in stats.json and the summary."""
    linked = tmp_path / "linked-pool"
    linked.symlink_to(pool["root"], target_is_directory=True)
    overlapping = tmp_path / "overlap-embed"
    result = invoke(["embed", *(linked / shard.name for shard in pool["shards"][:2]), *model_args(pool),
                     "--out", overlapping])
    assert result.exit_code == 0, result.output
    out = tmp_path / "extrapolated"
    result = CliRunner().invoke(cli, [str(a) for a in ["extrapolate", "--scored", subset_run, "--embeddings", overlapping,
                                                       "--embeddings", rest_embeddings, "--out", out, "--k", "1,2"]])
    assert result.exit_code == 0, result.output
    stats = json.loads((out / "stats.json").read_text())
    assert stats["overlap_samples"] == 48 and stats["extrapolated_samples"] == 46
    assert "48 samples of the --embeddings runs are in the scored run" in result.output
    rows = read_scores(out, columns=["shard", "uid", "mimic_score", "extrapolated"]).to_pylist()
    assert len(rows) == 96 and len({row["uid"] for row in rows}) == 96
    assert not any(row["shard"].startswith(str(linked)) for row in rows)
    curated = tmp_path / "curated"
    assert invoke(["filter", out, "--out", curated, "--top-frac", "mimic_score=0.5"]).exit_code == 0
    manifest = pq.read_table(curated / "manifest.parquet").to_pylist()
    assert len(manifest) == 96 and all(row["epochs"] == 1 for row in manifest)


def test_a_part_removed_from_a_finished_run_unfinishes_it_while_it_is_written_again(pool, subset_run, tmp_path,
                                                                                      monkeypatch):
    """embed and extrapolate: the re-run removes _SUCCESS before it writes the missing part, so a kill
    meanwhile leaves a run that reads as unfinished (score's static runs: tests/test_early_start.py)."""
    embedded = tmp_path / "embedded"
    embed = ["embed", *pool["shards"][2:], *model_args(pool), "--batch-size", "16", "--out", embedded]
    assert invoke(embed).exit_code == 0
    extrapolated = tmp_path / "extrapolated"
    extrapolate = ["extrapolate", "--scored", subset_run, "--embeddings", embedded, "--out", extrapolated, "--quiet"]
    assert invoke(extrapolate).exit_code == 0
    for run, module, step, command in ((embedded, embed_module, "_embed_shards", embed),
                                       (extrapolated, extrapolate_run, "_execute", extrapolate)):
        sorted((run / "scores").iterdir())[0].unlink()  # after the run finished
        monkeypatch.setattr(module, step, kill)
        with pytest.raises(Killed):
            invoke(command)
        monkeypatch.undo()
        assert not (run / "_SUCCESS").exists() and "unfinished" in unfinished_run(run)
        assert invoke(command).exit_code == 0 and (run / "_SUCCESS").exists()
