"""`mimicfilter filter`: aggregation, rules, joins and artefacts against hand-computed answers."""

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from mimicfilter.curate.votes import _gaussian_crossing, dawid_skene
from mimicfilter.store.parts import write_part
from mimicfilter.store.schema import rows_to_table
from mimicfilter_cli.main import cli


def row(key, epoch, score, weight=1.0, clip=0.5, status="ok", shard="s0.tar", uid=None):
    ok = status == "ok"
    return {
        "shard": shard, "key": key, "uid": uid, "index": int(key[1:]), "epoch": epoch, "step": 0, "status": status,
        "error": None if ok else "broken", "mimic_score": score if ok else None,
        "mimic_weight": weight if ok else None, "loss": 1.0 if ok else None, "clip_score": clip if ok else None,
        "ref_loss": 0.5 if ok else None, "label": None,
    }


def write_run(directory: Path, rows: list[dict]) -> Path:
    write_part(rows_to_table(rows), directory / "scores" / "part.parquet")
    return directory


@pytest.fixture
def run(tmp_path):
    """Ten ok samples k0..k9 with mimic scores 0..9 (epoch 0) and CLIP scores 9..0, plus one broken."""
    rows = [row(f"k{i}", 0, float(i), clip=float(9 - i), uid=f"{i:032x}") for i in range(10)]
    rows.append(row("k10", 0, None, status="decode_error", uid=f"{10:032x}"))
    return write_run(tmp_path / "run", rows)


def kept(manifest: Path) -> list[str]:
    table = pq.read_table(manifest).to_pylist()
    return sorted((r["key"] for r in table if r["kept"]), key=lambda k: int(k[1:]))


def filter_(run, tmp_path, *args):
    result = CliRunner().invoke(cli, ["filter", str(run), "--out", str(tmp_path / "out"), *args], catch_exceptions=False)
    return result


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--min", "mimic_score=7"], ["k7", "k8", "k9"]),
        (["--max", "mimic_score=1.5"], ["k0", "k1"]),
        (["--top-frac", "mimic_score=0.3"], ["k7", "k8", "k9"]),
        (["--bottom-frac", "mimic_score=0.25"], ["k0", "k1"]),  # floor(0.25 * 10) = 2
        (["--top-k", "clip_score=2"], ["k0", "k1"]),
        (["--top-frac", "clip_score=0.5", "--min", "mimic_score=3"], ["k3", "k4"]),
        (["--top-frac", "clip_score=0.2", "--min", "mimic_score=8", "--combine", "or"], ["k0", "k1", "k8", "k9"]),
        (["--top-frac", "clip_score=0.6", "--drop", "bottom-frac:mimic_score=0.2"], ["k2", "k3", "k4", "k5"]),
        (["--where", "mimic_score % 4 = 0"], ["k0", "k4", "k8"]),
    ],
)
def test_rules_match_hand_computation(run, tmp_path, args, expected):
    result = filter_(run, tmp_path, *args)
    assert result.exit_code == 0, result.output
    assert kept(tmp_path / "out" / "manifest.parquet") == expected


def test_broken_samples_are_never_kept_and_carry_their_status(run, tmp_path):
    assert filter_(run, tmp_path, "--where", "true").exit_code == 0
    manifest = {r["key"]: r for r in pq.read_table(tmp_path / "out" / "manifest.parquet").to_pylist()}
    assert not manifest["k10"]["kept"] and manifest["k10"]["reason"] == "status:decode_error"
    assert len(manifest) == 11
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["kept"] == 10 and summary["ok"] == 10
    assert summary["headline"] == {"label": "kept fraction", "value": 1.0}  # a rule that fixes the kept share
    assert summary["reasons"] == {"kept": 10, "status:decode_error": 1}


def test_reasons_name_the_failing_rule(run, tmp_path):
    assert filter_(run, tmp_path, "--min", "mimic_score=5", "--drop", "top-k:mimic_score=1").exit_code == 0
    reasons = {r["key"]: r["reason"] for r in pq.read_table(tmp_path / "out" / "manifest.parquet").to_pylist()}
    assert reasons["k2"] == "not min mimic_score=5"
    assert reasons["k9"] == "dropped by top-k mimic_score=1"
    assert reasons["k6"] == "kept"


def test_ties_at_a_cut_are_broken_by_shard_and_key(tmp_path):
    rows = [row(f"k{i}", 0, 1.0) for i in range(6)]  # all tied
    runs = []
    for name in ("a", "b"):
        runs.append(write_run(tmp_path / name, rows))
    outputs = []
    for number, run in enumerate(runs):
        out = tmp_path / f"out{number}"
        assert CliRunner().invoke(cli, ["filter", str(run), "--out", str(out), "--top-frac", "mimic_score=0.5"]).exit_code == 0
        outputs.append(kept(out / "manifest.parquet"))
    assert outputs[0] == outputs[1] == ["k0", "k1", "k2"]


def test_votes_by_majority_over_epochs(tmp_path):
    # k0: positive in 2 of 3 epochs; k1: 1 of 3; k2: 3 of 3
    signs = {"k0": [1, 1, -1], "k1": [-1, 1, -1], "k2": [1, 1, 1]}
    rows = [row(key, epoch, float(sign)) for key, values in signs.items() for epoch, sign in enumerate(values)]
    run = write_run(tmp_path / "run", rows)
    assert filter_(run, tmp_path, "--keep-votes", "--binarize", "sign").exit_code == 0
    assert kept(tmp_path / "out" / "manifest.parquet") == ["k0", "k2"]
    manifest = {r["key"]: r for r in pq.read_table(tmp_path / "out" / "manifest.parquet").to_pylist()}
    assert manifest["k0"]["votes"] == 2 and manifest["k0"]["epochs"] == 3
    assert manifest["k0"]["mimic_score"] == pytest.approx(1 / 3)
    assert manifest["k0"]["mimic_score_last"] == -1


def test_threshold_votes_use_relative_weight_above_one(tmp_path):
    rows = [row("k0", 0, 0.1, weight=1.5), row("k1", 0, 0.2, weight=0.9)]
    run = write_run(tmp_path / "run", rows)
    assert filter_(run, tmp_path, "--binarize", "threshold").exit_code == 0  # no rule: keep-votes
    assert kept(tmp_path / "out" / "manifest.parquet") == ["k0"]


@pytest.mark.parametrize("method", ["kmeans", "gmm"])
def test_clustering_votes_split_two_clusters(tmp_path, method):
    rng = np.random.default_rng(0)
    low, high = rng.normal(-2, 0.3, 30), rng.normal(3, 0.3, 30)
    rows = [row(f"k{i}", 0, float(v)) for i, v in enumerate(np.concatenate([low, high]))]
    run = write_run(tmp_path / "run", rows)
    result = filter_(run, tmp_path, "--binarize", method, "--json")
    assert result.exit_code == 0, result.output
    threshold = json.loads(result.stdout)["aggregation"]["thresholds"]["0"]
    assert low.max() < threshold < high.min()
    assert kept(tmp_path / "out" / "manifest.parquet") == [f"k{i}" for i in range(30, 60)]


def test_label_model_learns_which_epochs_to_trust():
    # epoch 0 votes right 95% of the time, epochs 1 and 2 only 60%: the majority follows the weak
    # pair whenever they agree, the label model learns to follow epoch 0
    rng = np.random.default_rng(0)
    truth = rng.random(4000) < 0.6
    accuracy = np.array([0.95, 0.6, 0.6])
    right = rng.random((4000, 3)) < accuracy
    votes = np.where(right, truth[:, None], ~truth[:, None]).astype(int)
    patterns = (votes * (1 << np.arange(3))).sum(axis=1)
    unique, counts = np.unique(patterns, return_counts=True)
    posterior = dict(zip(unique.tolist(), dawid_skene(unique, counts.astype(float), 3).tolist()))
    decided = np.array([posterior[p] > 0.5 for p in patterns])
    majority = votes.sum(axis=1) >= 2
    assert (decided == truth).mean() > 0.93 > 0.85 > (majority == truth).mean()


def test_label_model_end_to_end_follows_the_epoch_it_trusts(tmp_path):
    """`filter --combine-votes label-model` on a 3-epoch run whose epoch 0 votes right 95 % of the
    time and epochs 1 and 2 only 60 %: the label model keeps exactly what epoch 0 votes for (every
    vote pattern's posterior follows it), where the majority follows the weak pair."""
    rng = np.random.default_rng(0)
    truth = rng.random(4000) < 0.6
    right = rng.random((4000, 3)) < np.array([0.95, 0.6, 0.6])
    votes = np.where(right, truth[:, None], ~truth[:, None])
    scores = np.where(votes, 1.0, -1.0) * rng.uniform(0.5, 1.5, votes.shape)  # --binarize sign: vote = score > 0
    run = write_run(tmp_path / "run", [row(f"k{i}", epoch, float(scores[i, epoch])) for i in range(4000) for epoch in range(3)])
    decided = {}
    for combine in ("label-model", "majority"):
        result = CliRunner().invoke(cli, ["filter", str(run), "--binarize", "sign", "--combine-votes", combine, "--json",
                                          "--out", str(tmp_path / combine)], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout)["aggregation"]["combine_votes"] == combine
        table = pq.read_table(tmp_path / combine / "manifest.parquet").to_pylist()
        decided[combine] = np.array([r["kept"] for r in sorted(table, key=lambda r: int(r["key"][1:]))])
    assert (decided["label-model"] == votes[:, 0]).all()
    assert (decided["majority"] == (votes.sum(axis=1) >= 2)).all()
    assert (decided["label-model"] == truth).mean() > 0.93 > 0.85 > (decided["majority"] == truth).mean()


def test_gaussian_crossing_is_between_the_means():
    assert _gaussian_crossing([0.0, 4.0], [1.0, 1.0], [0.5, 0.5]) == pytest.approx(2.0)


def test_join_on_uid_adds_external_columns(run, tmp_path):
    external = pa.table({"uid": [f"{i:032x}" for i in range(10)], "clip_l14_similarity_score": [float(i) for i in range(10)]})
    path = tmp_path / "meta.parquet"
    pq.write_table(external, path)
    result = filter_(run, tmp_path, "--join", str(path), "--top-frac", "clip_l14_similarity_score=0.2", "--json")
    assert result.exit_code == 0, result.output
    assert kept(tmp_path / "out" / "manifest.parquet") == ["k8", "k9"]
    assert json.loads(result.stdout)["joins"][0]["matched"] == 10


def test_join_on_shard_and_key(run, tmp_path):
    external = pa.table({"shard": ["s0.tar"] * 2, "key": ["k3", "k4"], "flag": [1, 0]})
    path = tmp_path / "flags.parquet"
    pq.write_table(external, path)
    assert filter_(run, tmp_path, "--join", str(path), "--on", "shard,key", "--where", "flag = 1").exit_code == 0
    assert kept(tmp_path / "out" / "manifest.parquet") == ["k3"]


def test_join_with_duplicate_keys_is_refused(run, tmp_path):
    path = tmp_path / "dup.parquet"
    pq.write_table(pa.table({"uid": [f"{1:032x}"] * 2, "x": [1, 2]}), path)
    result = filter_(run, tmp_path, "--join", str(path))
    assert result.exit_code == 2 and "duplicate" in result.stderr


@pytest.mark.parametrize(
    "args, named",
    [
        (["--min", "no_such_column=1"], "no_such_column"),
        (["--top-frac", "mimic_score"], "top-frac"),
        (["--top-frac", "mimic_score=1.5"], "fraction"),
        (["--top-k", "mimic_score=x"], "not a number"),
        (["--drop", "bottom-frac"], "--drop"),
        (["--where", "nonsense((("], "not one SQL expression"),
        (["--where", "no_such_column > 0"], "rules"),
        # ends the rule's expression early and rewrites the query around it (keeps every sample, ok or not)
        (["--where", "true), false))) OR true) AS kept, CASE WHEN $x$ = '' AND coalesce(false, coalesce((true"],
         "not one SQL expression"),
        (["--where", "mimic_score > 0; SELECT 1"], "not one SQL expression"),
    ],
)
def test_bad_rules_exit_2_with_one_line(run, tmp_path, args, named):
    result = filter_(run, tmp_path, *args)
    assert result.exit_code == 2
    assert named in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_keys_to_stdout_for_pipelines(run, tmp_path):
    result = filter_(run, tmp_path, "--min", "mimic_score=8", "--keys", "-")
    assert result.exit_code == 0
    assert result.stdout.splitlines() == ["s0.tar\tk8", "s0.tar\tk9"]


def test_datacomp_npy_is_sorted_u8_pairs_of_kept_uids(run, tmp_path):
    target = tmp_path / "subset.npy"
    assert filter_(run, tmp_path, "--min", "mimic_score=5", "--datacomp-npy", str(target)).exit_code == 0
    array = np.load(target)
    assert array.dtype == np.dtype("u8,u8")
    pairs = [(int(a), int(b)) for a, b in array]
    assert pairs == [(0, i) for i in range(5, 10)] == sorted(pairs)


def test_datacomp_npy_needs_uids(tmp_path):
    run = write_run(tmp_path / "run", [row("k0", 0, 1.0)])
    result = filter_(run, tmp_path, "--datacomp-npy", str(tmp_path / "x.npy"), "--where", "true")
    assert result.exit_code == 2 and "uid" in result.stderr
    assert not (tmp_path / "x.npy").exists()


def test_dry_run_writes_nothing(run, tmp_path):
    result = CliRunner().invoke(cli, ["filter", str(run), "--min", "mimic_score=5", "--dry-run", "--json"])
    assert result.exit_code == 0 and json.loads(result.stdout)["kept"] == 5
    assert not (tmp_path / "out").exists()


def test_multiple_runs_and_parquet_globs(tmp_path):
    first = write_run(tmp_path / "a", [row("k0", 0, 1.0, shard="a.tar")])
    write_run(tmp_path / "b", [row("k0", 0, -1.0, shard="b.tar")])
    result = CliRunner().invoke(cli, ["filter", str(first), str(tmp_path / "b" / "scores" / "*.parquet"),
                                      "--out", str(tmp_path / "out"), "--min", "mimic_score=0", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["samples"] == 2 and json.loads(result.stdout)["kept"] == 1


def test_write_shards_copies_kept_samples_byte_for_byte(tmp_path):
    import tarfile

    import webdataset as wds
    from helpers import image_text_samples, write_tar

    sources = [write_tar(tmp_path / f"src{n}.tar", image_text_samples(5, start=10 * n)) for n in range(2)]
    rows = []
    for source, start in zip(sources, (0, 10)):
        for i in range(5):
            rows.append(dict(row(f"k{i}", 0, float(i % 2), shard=str(source)), key=f"{start + i:08d}", index=i))
    run = write_run(tmp_path / "run", rows)
    out = tmp_path / "curated"
    result = CliRunner().invoke(cli, ["filter", str(run), "--out", str(tmp_path / "out"), "--min", "mimic_score=1",
                                      "--write-shards", str(out), "--maxcount", "3", "--json"])
    assert result.exit_code == 0, result.output
    kept_keys = ["00000001", "00000003", "00000011", "00000013"]
    names = sorted(p.name for p in out.iterdir())
    assert names == ["curated-000000.tar", "curated-000001.tar", "curated.wids.json"]
    source_members = {}
    for source in sources:
        with tarfile.open(source) as tar:
            source_members.update({m.name: tar.extractfile(m).read() for m in tar.getmembers()})
    copied = {}
    for shard in sorted(out.glob("*.tar")):
        with tarfile.open(shard) as tar:
            copied.update({m.name: tar.extractfile(m).read() for m in tar.getmembers()})
    assert copied == {name: data for name, data in source_members.items() if name.split(".")[0] in kept_keys}
    keys = [sample["__key__"] for sample in wds.WebDataset([str(p) for p in sorted(out.glob("*.tar"))], shardshuffle=False)]
    assert keys == kept_keys
    index = json.loads((out / "curated.wids.json").read_text())
    assert [entry["nsamples"] for entry in index["shardlist"]] == [3, 1]


def test_write_shards_refuses_keys_that_escape_the_directory(tmp_path):
    from helpers import image_bytes, write_tar

    source = write_tar(tmp_path / "src.tar", [("../evil", {"jpg": image_bytes(0), "txt": b"x"})])
    run = write_run(tmp_path / "run", [dict(row("k0", 0, 1.0, shard=str(source)), key="../evil")])
    out = tmp_path / "curated"
    result = CliRunner().invoke(cli, ["filter", str(run), "--out", str(tmp_path / "out"), "--where", "true",
                                      "--write-shards", str(out)])
    assert result.exit_code == 2 and "../evil" in result.stderr
    assert not (tmp_path / "evil.jpg").exists()
    assert not out.exists() or not list(out.glob("*.tar"))
