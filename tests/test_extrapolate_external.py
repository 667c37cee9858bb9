"""extrapolate --features-from: a DataComp-layout pool (NNNNNNNN.npz beside NNNNNNNN.parquet and the
tar) and plain Parquet embedding files, matched to the scored run by uid; the table equals the one
from `embed` runs given the same vectors; bad files give one-line errors."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from extrapolate_pool import invoke, pool, rest_embeddings, subset_run  # noqa: F401  (fixtures)
from helpers import score_row, write_score_run

from mimicfilter.store.parts import read_scores
from mimicfilter_cli.main import cli

PAIR = ("embedding", "text_embedding")


def pool_vectors(subset_run, rest_embeddings):
    """uid → (shard, key, image, text) as the --embeddings route uses them: the scored run's own
    first-epoch embeddings for its samples, the embed run's for the rest (None where not ok)."""
    found = {}
    for run in (subset_run, rest_embeddings):
        for part in sorted((run / "scores").glob("*.parquet")):
            table = pq.read_table(part)
            epochs = table.column("epoch").to_pylist() if "epoch" in table.column_names else [0] * table.num_rows
            for row, epoch in zip(table.select(["shard", "key", "uid", *PAIR]).to_pylist(), epochs):
                if epoch == 0:
                    found[row["uid"]] = row
    return found


def write_datacomp(folder, vectors, shards, arrays=("b32_img", "b32_txt"), dim=16):
    """NNNNNNNN.npz + NNNNNNNN.parquet per shard (beside the tar when ``folder`` holds it)."""
    folder.mkdir(exist_ok=True)
    by_shard = {}
    for uid, row in vectors.items():
        by_shard.setdefault(row["shard"], []).append((row["key"], uid, row))
    paths = []
    for shard in shards:
        rows = sorted(by_shard[str(shard)])
        stem = folder / shard.stem
        sides = [np.array([row[name] if row[name] is not None else [0.0] * dim for _, _, row in rows], dtype=np.float16)
                 for name in PAIR]
        np.savez(stem.with_suffix(".npz"), **dict(zip(arrays, sides)))
        pq.write_table(pa.table({"uid": [uid for _, uid, _ in rows], "key": [key for key, _, _ in rows],
                                 "url": [f"https://example.com/{key}.jpg" for key, _, _ in rows]}),
                       stem.with_suffix(".parquet"))
        paths.append(stem.with_suffix(".npz"))
    return paths


def by_uid(run_dir):
    return {row["uid"]: row for row in read_scores(run_dir, columns=["shard", "uid", "status", "mimic_score", "mimic_weight",
                                                                     "extrapolated"]).to_pylist()}


def test_datacomp_layout_equals_embed_runs_with_the_same_vectors(pool, subset_run, rest_embeddings, tmp_path):
    vectors = pool_vectors(subset_run, rest_embeddings)
    write_datacomp(pool["root"], vectors, pool["shards"])  # beside the tars, as DataComp ships them
    common = ["--scored", subset_run, "--k", "1,2,5", "--json"]
    result = invoke(["extrapolate", *common, "--embeddings", rest_embeddings, "--out", tmp_path / "embed-route"])
    assert result.exit_code == 0, result.output
    via_runs = json.loads(result.stdout)
    result = invoke(["extrapolate", *common, "--features-from", pool["root"], "--out", tmp_path / "npz-route"])
    assert result.exit_code == 0, result.output
    via_npz = json.loads(result.stdout)
    for name in ("method", "features", "k", "heldout_spearman", "heldout_spearman_by_features", "reference_samples",
                 "extrapolated_samples", "rows"):
        assert via_npz[name] == via_runs[name], name
    # the run records which space it used; the scored shards' npz rows are the scored samples themselves
    assert via_npz["embedding_source"] == "features-from" and via_npz["embedding_columns"] == ["b32_img", "b32_txt"]
    run = json.loads((tmp_path / "npz-route" / "run.json").read_text())
    assert run["embedding"]["layout"] == "npz" and run["embedding"]["columns"] == ["b32_img", "b32_txt"]
    assert via_npz["overlap_samples"] == 48 and via_npz["scored_without_embedding"] == 0
    expected, got = by_uid(tmp_path / "embed-route"), by_uid(tmp_path / "npz-route")
    assert set(got) == set(expected) and len(got) == 96
    for uid, row in expected.items():
        other = got[uid]
        assert (other["mimic_score"], other["mimic_weight"], other["extrapolated"]) == \
            (row["mimic_score"], row["mimic_weight"], row["extrapolated"]), uid
        if row["extrapolated"]:
            assert other["shard"].endswith(".npz")  # the file is the unscored sample's shard
        elif row["status"] == "ok":
            assert other["shard"] == row["shard"]  # the scored samples keep their rows
        else:
            assert other["status"] == "missing_image"  # no usable vector: never extrapolated
    # an embed run's parts are Parquet with uid and embedding columns: the same table again
    result = invoke(["extrapolate", *common, "--features-from", rest_embeddings / "scores",
                     "--features-from", pool["root"] / "shard-0.npz", "--features-from", str(pool["root"] / "shard-1.npz"),
                     "--out", tmp_path / "mixed"])
    assert result.exit_code == 2 and "mixes .npz and .parquet" in result.output


def test_parquet_embeddings_and_scored_samples_without_one(pool, subset_run, rest_embeddings, tmp_path):
    vectors = pool_vectors(subset_run, rest_embeddings)
    folder = tmp_path / "parquet"
    folder.mkdir()
    rows = [row | {"uid": uid} for uid, row in vectors.items() if row["key"] != "00000003"]  # one scored sample lacks one
    pq.write_table(pa.table({"uid": [row["uid"] for row in rows], "vec": [row["embedding"] for row in rows]}),
                   folder / "embeddings.parquet")
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, [str(a) for a in ["extrapolate", "--scored", subset_run, "--features-from", folder,
                                                       "--embedding-column", "vec", "--k", "1,2", "--out", out]])
    assert result.exit_code == 0, result.output
    stats = json.loads((out / "stats.json").read_text())
    assert stats["features"] == "image" and stats["embedding_columns"] == ["vec"]
    assert stats["scored_without_embedding"] == 1 and "00000003" in stats["scored_without_embedding_examples"][0]
    assert "1 scored samples have no embedding" in result.output
    assert stats["reference_samples"] == 47 and stats["overlap_samples"] == 47 and stats["extrapolated_samples"] == 46
    rows = read_scores(out, columns=["key", "uid", "mimic_score", "extrapolated"]).to_pylist()
    assert len(rows) == 96 and len({row["uid"] for row in rows}) == 96  # 48 scored + the file's 48 others
    lacking = [row for row in rows if row["key"] == "00000003" and not row["extrapolated"]]
    assert len(lacking) == 1 and lacking[0]["mimic_score"] is not None  # kept with its true score


def test_a_features_row_without_its_id_is_a_status_row_not_a_score(pool, subset_run, rest_embeddings, tmp_path):
    """Such a row names no sample: it gets a row with a status and an error, and no score to keep."""
    vectors = pool_vectors(subset_run, rest_embeddings)
    folder = tmp_path / "parquet"
    folder.mkdir()
    uids = list(vectors)
    scored = {row["uid"] for row in read_scores(subset_run, columns=["uid"]).to_pylist()}
    unscored = next(uid for uid in uids if uid not in scored)
    ids = [None if uid == unscored else uid for uid in uids]
    pq.write_table(pa.table({"uid": pa.array(ids, pa.string()), "vec": [vectors[uid]["embedding"] for uid in uids]}),
                   folder / "embeddings.parquet")
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, [str(a) for a in ["extrapolate", "--scored", subset_run, "--features-from", folder,
                                                       "--embedding-column", "vec", "--k", "1,2", "--out", out]])
    assert result.exit_code == 0, result.output
    rows = read_scores(out, columns=["uid", "status", "error", "mimic_score", "extrapolated"]).to_pylist()
    nameless = [row for row in rows if row["uid"] is None]
    assert len(nameless) == 1 and nameless[0]["status"] == "decode_error" and nameless[0]["mimic_score"] is None
    assert nameless[0]["error"] == "no uid in embeddings.parquet"
    assert unscored not in {row["uid"] for row in rows}


def error_of(*args):
    result = CliRunner().invoke(cli, ["extrapolate", *map(str, args)])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1 and errors[0] == result.output.strip().splitlines()[-1]  # one line, no traceback
    assert not args[3].exists()  # refused before the run directory is made
    return errors[0]


def test_bad_files_give_one_line_errors(pool, subset_run, rest_embeddings, tmp_path):
    vectors = pool_vectors(subset_run, rest_embeddings)
    good = tmp_path / "good"
    write_datacomp(good, vectors, pool["shards"])
    common = ["--scored", subset_run, "--out", tmp_path / "out"]

    wrong = tmp_path / "wrong-dim"
    write_datacomp(wrong, vectors, pool["shards"][:1])
    np.savez(wrong / "shard-9.npz", b32_img=np.ones((3, 8), np.float16), b32_txt=np.ones((3, 8), np.float16))
    pq.write_table(pa.table({"uid": ["a", "b", "c"]}), wrong / "shard-9.parquet")
    assert "holds 8-d embeddings, expected 16" in error_of(*common, "--features-from", wrong)

    no_uid = tmp_path / "no-uid"
    write_datacomp(no_uid, vectors, pool["shards"][:1])
    pq.write_table(pa.table({"key": ["x"]}), no_uid / "shard-0.parquet")
    assert "has no uid column" in error_of(*common, "--features-from", no_uid)

    empty = tmp_path / "empty"
    empty.mkdir()
    np.savez(empty / "00000000.npz")
    pq.write_table(pa.table({"uid": pa.array([], pa.string())}), empty / "00000000.parquet")
    assert "is empty: it holds no arrays" in error_of(*common, "--features-from", empty)
    (empty / "00000000.npz").write_bytes(b"")
    assert "not a readable .npz" in error_of(*common, "--features-from", empty / "00000000.npz")

    alone = tmp_path / "alone"
    alone.mkdir()
    np.savez(alone / "00000001.npz", b32_img=np.zeros((1, 16), np.float16))
    assert "has no 00000001.parquet beside it" in error_of(*common, "--features-from", alone)

    rows = tmp_path / "rows"
    write_datacomp(rows, vectors, pool["shards"][:1])
    np.savez(rows / "shard-0.npz", b32_img=np.zeros((5, 16), np.float16), b32_txt=np.zeros((5, 16), np.float16))
    assert "expected (24, d)" in error_of(*common, "--features-from", rows)

    assert "has no l14_img" in error_of(*common, "--features-from", good, "--embedding-column", "l14_img")
    assert "no such file or folder" in error_of(*common, "--features-from", tmp_path / "missing")
    assert "no file matches" in error_of(*common, "--features-from", tmp_path / "nothing-*.npz")
    assert "two embedding spaces" in error_of(*common, "--features-from", good, "--embeddings", rest_embeddings)
    assert "are for --features-from" in error_of(*common, "--embeddings", rest_embeddings, "--embedding-column", "x")
    unrelated = tmp_path / "unrelated"
    unrelated.mkdir()
    np.savez(unrelated / "a.npz", b32_img=np.ones((2, 16), np.float16))
    pq.write_table(pa.table({"uid": ["nobody", "nobody-else"]}), unrelated / "a.parquet")
    scored = read_scores(subset_run, columns=["shard", "index", "uid", "status"]).to_pylist()
    scored_uid = min((row["shard"], row["index"], row["uid"]) for row in scored if row["status"] == "ok")[2]
    assert error_of(*common, "--features-from", unrelated).startswith(
        f"Error: none of the 48 scored samples of {subset_run} can be used: no uid of it is in the --features-from "
        f"files (e.g. files: 'nobody', run: '{scored_uid}') (hint: files of another pool, or the wrong --id-column")


def test_only_a_score_run_can_be_the_scored_run(pool, subset_run, rest_embeddings, tmp_path):
    """An embed run (or an extrapolate run: predicted scores) given as --scored is refused in one line."""
    result = CliRunner().invoke(cli, [str(a) for a in ["extrapolate", "--scored", rest_embeddings, "--embeddings",
                                                       rest_embeddings, "--out", tmp_path / "out"]])
    assert result.exit_code == 2 and "only measured scores can be extrapolated" in result.stderr, result.output
    assert len(result.stderr.strip().splitlines()) == 1


def synthetic_pool(tmp_path, scored=300, unscored=300, dim=32, ids=None):
    """A hand-written score run of ``scored`` samples (uid u0, u1, ...) and one Parquet file of
    embeddings for them and ``unscored`` more (``ids``: the file's uids instead); no model."""
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((scored + unscored, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    score = vectors @ rng.standard_normal(dim)
    run = write_score_run(tmp_path / "scored", [score_row("/data/s.tar", f"k{i}", i, 0, float(score[i]), uid=f"u{i}")
                                                for i in range(scored)], ["/data/s.tar"])
    folder = tmp_path / "features"
    folder.mkdir()
    uids = ids if ids is not None else [f"u{i}" for i in range(scored + unscored)]
    pq.write_table(pa.table({"uid": uids, "embedding": list(vectors.astype(np.float16))}), folder / "0.parquet")
    return run, folder


@pytest.mark.parametrize("kind", ["ivf-sq8", "ivf-sq4"])
def test_an_ivf_asked_for_on_a_small_pool_is_exact_and_quiet(tmp_path, capfd, kind):
    """faiss prints "WARNING clustering N points to K centroids" from C++ when an index trains on too
    few points: a pool too small for the IVF asked for is searched exactly, and the plan says why."""
    run, features = synthetic_pool(tmp_path)
    result = invoke(["extrapolate", "--scored", run, "--features-from", features, "--index", kind, "--k", "5",
                     "--out", tmp_path / "out", "--json"])
    assert result.exit_code == 0, result.output
    index = json.loads(result.stdout)["index"]
    assert index["kind"] == "exact" and index["reason"] == \
        f"{kind} asked for, but 300 scored samples are too few to train it (at least 624)"
    assert "WARNING" not in capfd.readouterr().err


def test_an_id_twice_in_the_features_is_refused(tmp_path):
    """A sample embedded twice would be two neighbours, or two rows with two predictions."""
    uids = [f"u{i}" for i in range(600)]
    run, features = synthetic_pool(tmp_path, ids=uids[:450] + ["u7"] + uids[451:])  # u7: scored, twice
    common = ["--scored", run, "--out", tmp_path / "out", "--features-from", features]
    assert error_of(*common) == (
        f"Error: --features-from: uid 'u7' is in the files more than once (2 times in {features / '0.parquet'}) "
        "(hint: one row per sample: a sample embedded twice would count as two; drop the repeated rows or the "
        "repeated file)")
    table = pq.read_table(features / "0.parquet")
    pq.write_table(table.slice(500), features / "1.parquet")  # u500.. in two files: unscored samples twice
    pq.write_table(table.slice(0, 501).set_column(0, "uid", pa.array(uids[:501])), features / "0.parquet")
    assert f"uid 'u500' is in the files more than once (in {features / '0.parquet'} and {features / '1.parquet'})" \
        in error_of(*common)


def test_a_scored_run_without_uids_is_told_to_match_by_key(tmp_path):
    run, features = synthetic_pool(tmp_path)
    rows = [score_row("/data/s.tar", f"k{i}", i, 0, float(i)) for i in range(300)]  # shards without uids
    run = write_score_run(tmp_path / "nameless", rows, ["/data/s.tar"])
    assert error_of("--scored", run, "--out", tmp_path / "out", "--features-from", features).endswith(
        "(e.g. files: 'u0', the run's samples have no uid) (hint: match by key: --id-column key (the run's shards "
        "gave no uid))")
