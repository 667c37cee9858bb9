"""Issue 17, red-team items 9-18 (the kill loops of item 11 are in test_kill_loops.py): outputs that
survive failures, duplicate keys, non-finite scores, SQL that stays in its lane, one-line errors,
keys that stay one per line."""

import errno
import hashlib
import json
import math
import os
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner
from helpers import (
    TINY_CLIP_CONFIG,
    image_text_run,
    image_text_samples,
    score_row,
    write_score_run,
    write_tar,
)

from mimicfilter.errors import MimicfilterError
from mimicfilter_cli.main import cli


def invoke(*args):
    return CliRunner().invoke(cli, [str(arg) for arg in args], catch_exceptions=False)


def one_line_error(result, code=2) -> str:
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    return lines[0]


def index_is_consistent(shards_dir: Path) -> int:
    """The wids index lists exactly the tars present, with their md5s; returns the samples listed."""
    index = json.loads((shards_dir / "curated.wids.json").read_text())
    listed = {entry["url"]: entry for entry in index["shardlist"]}
    assert set(listed) == {path.name for path in shards_dir.glob("*.tar")}
    for name, entry in listed.items():
        assert hashlib.md5((shards_dir / name).read_bytes()).hexdigest() == entry["md5sum"]
    return sum(entry["nsamples"] for entry in listed.values())


# 9, 10, 11 --------------------------------------------------------------------------------------


def test_a_failed_rewrite_keeps_the_previous_shards_and_outputs(tmp_path):
    run, shards = image_text_run(tmp_path)
    out = tmp_path / "out"
    args = ("filter", run, "--out", out, "--write-shards", out / "shards")
    assert invoke(*args, "--where", "true").exit_code == 0
    before = {path.name: path.read_bytes() for path in out.rglob("*") if path.is_file()}
    shards[1].write_bytes(shards[1].read_bytes()[:3000])  # the second source shard is now truncated
    result = invoke(*args, "--min", "mimic_score=2")
    assert result.exit_code == 2 and "cannot read shard" in result.stderr
    assert {path.name: path.read_bytes() for path in out.rglob("*") if path.is_file()} == before
    assert index_is_consistent(out / "shards") == 20
    assert [path.name for path in tmp_path.iterdir() if path.name.startswith(".")] == []  # no staging left


def test_a_killed_run_does_not_block_the_next_one(tmp_path):
    run, _ = image_text_run(tmp_path)
    shards_dir = tmp_path / "curated"
    assert invoke("filter", run, "--out", tmp_path / "out", "--write-shards", shards_dir, "--where", "true").exit_code == 0
    (shards_dir / ".curated-000001.tar.ab12cd.tmp").write_bytes(b"half a shard")  # an older version's temp file
    dead = 2**22 + 12345  # no such process
    for role in ("staging", "old"):
        (tmp_path / f".curated.{role}-{dead}-0a1b2c3d").mkdir()
    result = invoke("filter", run, "--out", tmp_path / "out", "--write-shards", shards_dir, "--max", "mimic_score=4")
    assert result.exit_code == 0, result.output
    assert index_is_consistent(shards_dir) == 5 and sorted(os.listdir(shards_dir)) == ["curated-000000.tar",
                                                                                       "curated.wids.json"]
    assert [path.name for path in tmp_path.iterdir() if path.name.startswith(".curated")] == []


def test_without_an_atomic_exchange_the_swap_is_two_renames_and_a_kill_between_is_repaired(tmp_path, monkeypatch):
    from mimicfilter.store import swap

    target = tmp_path / "out"
    target.mkdir()
    (target / "a.txt").write_text("old")
    monkeypatch.setattr(swap, "_exchange", lambda first, second: False)  # e.g. not Linux
    with swap.replaced_directory(target, lambda name: name == "a.txt", "--out") as staging:
        (staging / "a.txt").write_text("new")
    assert (target / "a.txt").read_text() == "new" and sorted(os.listdir(tmp_path)) == ["out"]
    # killed after the first rename: the old set sits in a retired directory, the target is gone
    retired = tmp_path / f".out.old-{2**22 + 7}-00ff00ff"
    os.rename(target, retired)
    (tmp_path / f".out.staging-{2**22 + 7}-11ee11ee").mkdir()
    swap.recover(target)
    assert (target / "a.txt").read_text() == "new" and sorted(os.listdir(tmp_path)) == ["out"]


def test_refiltering_to_nothing_leaves_no_old_shards(tmp_path):
    run, _ = image_text_run(tmp_path)
    out = tmp_path / "out"
    assert invoke("filter", run, "--out", out, "--write-shards", out / "shards", "--where", "true").exit_code == 0
    assert invoke("filter", run, "--out", out, "--write-shards", out / "shards", "--where", "false").exit_code == 0
    assert index_is_consistent(out / "shards") == 0 and list((out / "shards").glob("*.tar")) == []
    summary = json.loads((out / "summary.json").read_text())
    assert summary["kept"] == 0 and (out / "_SUCCESS").read_text().strip() == summary["run_id"]
    assert pq.read_schema(out / "manifest.parquet").metadata[b"mimicfilter_run_id"].decode() == summary["run_id"]


def test_directories_holding_other_files_are_refused_not_replaced(tmp_path):
    run, _ = image_text_run(tmp_path, shards=1)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    for args in (("filter", run, "--out", tmp_path / "mine"), ("report", run, "--out", tmp_path / "mine"),
                 ("filter", run, "--out", tmp_path / "o", "--write-shards", tmp_path / "mine")):
        assert "holds other files" in one_line_error(invoke(*args))
    # --out above the run directory: refused before anything is computed, as it holds an input
    assert "holds an input" in one_line_error(invoke("filter", run, "--out", tmp_path))
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "precious"


# 13 ---------------------------------------------------------------------------------------------


def test_a_key_twice_in_a_shard_is_two_samples(tmp_path):
    samples = image_text_samples(4)
    samples = samples[:3] + [("00000001", samples[3][1])]  # key 00000001 again, at index 3, not contiguous
    shard = write_tar(tmp_path / "dup.tar", samples)
    rows = [score_row(str(shard), key, index, epoch, float(index)) for epoch in (0, 1)
            for index, (key, _) in enumerate(samples)]
    run = write_score_run(tmp_path / "run", rows, [str(shard)], epochs=2)
    out = tmp_path / "out"
    result = invoke("filter", run, "--out", out, "--min", "mimic_score=2.5", "--write-shards", out / "shards")
    assert result.exit_code == 0, result.output
    manifest = pq.read_table(out / "manifest.parquet").to_pylist()
    assert [(row["key"], row["index"], row["epochs"], row["mimic_score"]) for row in manifest] == [
        ("00000000", 0, 2, 0.0), ("00000001", 1, 2, 1.0), ("00000002", 2, 2, 2.0), ("00000001", 3, 2, 3.0)]
    assert [row["key"] for row in manifest if row["kept"]] == ["00000001"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["samples"] == 4 and summary["duplicates"]["keys"]["names"] == 1
    assert "shared by 2 samples" in result.stderr
    import tarfile

    with tarfile.open(out / "shards" / "curated-000000.tar") as tar:  # the sample at index 3, not index 1's
        copied = {member.name: tar.extractfile(member).read() for member in tar.getmembers()}
    assert copied["00000001.jpg"] == samples[3][1]["jpg"] and len(copied) == 3


# 14 ---------------------------------------------------------------------------------------------


def test_score_rows_give_non_finite_scores_their_own_status():
    from mimicfilter.mimic.scorer import BatchScores
    from mimicfilter.pipeline.batch_scorer import score_rows
    from mimicfilter.pipeline.batches import Batch
    from mimicfilter.shards.records import SampleInfo

    samples = [SampleInfo("s.tar", f"k{i}", i, None, "ok", None, None) for i in range(3)]
    values = torch.tensor([0.5, float("nan"), float("inf")])
    scores = BatchScores(mimic_score=values, mimic_weight=torch.tensor([1.0, 1.0, 1.0]), loss=torch.ones(3),
                         ref_loss=torch.ones(3))
    rows = score_rows(Batch("s.tar", 0, True, samples), scores)
    assert [row["status"] for row in rows] == ["ok", "non_finite_score", "non_finite_score"]
    assert rows[1]["mimic_score"] is None and rows[1]["loss"] == 1.0 and "mimic_score=nan" in rows[1]["error"]


def test_a_diverging_proxy_gives_non_finite_rows_that_filter_and_report_skip(tmp_path, tiny_config,
                                                                             reference_checkpoint):
    write_tar(tmp_path / "a.tar", image_text_samples(12))
    run = tmp_path / "run"
    result = invoke("score", tmp_path / "a.tar", "--model", tiny_config, "--reference", reference_checkpoint,
                    "--out", run, "--lr", "1e30", "--batch-size", "4", "--workers", "0", "--quiet")
    assert result.exit_code == 0, result.output
    statuses = pq.read_table(run / "scores").column("status").to_pylist()
    assert "non_finite_score" in statuses
    scores = [value for value in pq.read_table(run / "scores").column("mimic_score").to_pylist() if value is not None]
    assert all(math.isfinite(value) for value in scores)
    for args in (("filter", run, "--out", tmp_path / "f"), ("report", run, "--sheet-size", "4")):
        result = invoke(*args)
        assert result.exit_code == 0, result.output


def test_nan_rows_marked_ok_by_an_older_table_are_skipped(tmp_path):
    rows = [score_row("x.tar", f"k{i}", i, 0, float(i)) for i in range(8)]
    rows[3]["mimic_score"] = float("nan")
    rows[5]["mimic_weight"] = float("inf")
    run = write_score_run(tmp_path / "run", rows, ["x.tar"])
    for binarize in ("gmm", "kmeans", "sign", "threshold"):
        result = invoke("filter", run, "--out", tmp_path / "out", "--binarize", binarize, "--top-frac", "mimic_score=1")
        assert result.exit_code == 0, result.output
        manifest = {row["key"]: row for row in pq.read_table(tmp_path / "out" / "manifest.parquet").to_pylist()}
        assert manifest["k3"]["reason"] == "status:non_finite_score" and manifest["k3"]["mimic_score"] is None
        assert not manifest["k5"]["kept"] and sum(row["kept"] for row in manifest.values()) == 6
    result = invoke("report", run, "--out", tmp_path / "report", "--sheet-size", "3")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["status_counts"]["non_finite_score"]["count"] == 2 and report["ok"] == 6


# 15 ---------------------------------------------------------------------------------------------


def test_memory_limit_is_not_sql(tmp_path):
    run, _ = image_text_run(tmp_path, shards=1)
    target = tmp_path / "pwned.csv"
    crafted = f"1GB'; COPY (SELECT 42) TO '{target}'; SET memory_limit='1GB"
    assert "not an amount of memory" in one_line_error(invoke("filter", run, "--dry-run", "--memory-limit", crafted))
    assert not target.exists()
    assert invoke("filter", run, "--dry-run", "--memory-limit", "512MB").exit_code == 0


@pytest.mark.parametrize("where", [
    "(SELECT count(*) FROM read_csv('{secret}')) > 0",
    "key IN (SELECT column0 FROM read_csv('{secret}', header = false))",
    "true) AND (SELECT count(*) FROM (COPY (SELECT 1) TO '{target}')) > 0 AND (true",
    "true); COPY (SELECT 1) TO '{target}'; SELECT (true",
])
def test_where_cannot_read_or_write_files(tmp_path, where):
    run, _ = image_text_run(tmp_path, shards=1)
    secret, target = tmp_path / "secret.txt", tmp_path / "written.csv"
    secret.write_text("the-content-of-a-secret-file")
    result = invoke("filter", run, "--out", tmp_path / "out", "--where", where.format(secret=secret, target=target))
    line = one_line_error(result)
    assert "the-content-of-a-secret-file" not in result.output and not target.exists()
    assert not (tmp_path / "out").exists()
    if "read_csv" in where:
        assert "disabled" in line and "not files" in line


# 16, 17 -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("args, message", [
    (("--memory-limit", "lots"), "not an amount of memory"),
    (("--top-k", "mimic_score=inf"), "not a finite number"),
    (("--min", "mimic_score=nan"), "nan is not a finite number"),
    (("--keys", "{tmp}"), "is a directory"),
    (("--where", "no_such_column > 1"), "cannot apply the rules"),
])
def test_filter_usage_errors_are_one_line(tmp_path, args, message):
    run, _ = image_text_run(tmp_path, shards=1)
    args = [arg.format(tmp=tmp_path) for arg in args]
    assert message in one_line_error(invoke("filter", run, "--out", tmp_path / "out", *args))


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS])
def test_a_full_or_read_only_disk_is_one_line_and_keeps_the_previous_outputs(tmp_path, monkeypatch, code):
    run, _ = image_text_run(tmp_path, shards=1)
    out = tmp_path / "out"
    assert invoke("filter", run, "--out", out).exit_code == 0
    before = (out / "summary.json").read_text()

    def refuse(*args, **kwargs):
        raise OSError(code, os.strerror(code), str(out / "manifest.parquet"))

    monkeypatch.setattr(pq.ParquetWriter, "write_batch", refuse)
    line = one_line_error(invoke("filter", run, "--out", out, "--where", "true"), code=1)
    assert os.strerror(code) in line and "manifest.parquet" in line
    assert (out / "summary.json").read_text() == before


def test_score_usage_errors_are_one_line(tmp_path, tiny_config, reference_checkpoint):
    write_tar(tmp_path / "a.tar", image_text_samples(2))
    base = ["score", tmp_path / "a.tar", "--model", tiny_config, "--reference", reference_checkpoint, "--quiet"]
    assert "2**63" in one_line_error(invoke(*base, "--out", tmp_path / "r", "--seed", "99999999999999999999999"))
    assert "/etc/passwd is not a directory" in one_line_error(invoke(*base, "--out", "/etc/passwd/sub"))
    json_reference = one_line_error(invoke("score", tmp_path / "a.tar", "--model", tiny_config, "--reference",
                                           tiny_config, "--out", tmp_path / "r"))
    assert "is a JSON file, not a checkpoint" in json_reference and "--trust-checkpoint" not in json_reference


@pytest.mark.parametrize("change", [
    {"embed_dim": "sixteen"}, {"embed_dim": -16}, {"vision_cfg": {**TINY_CLIP_CONFIG["vision_cfg"], "layers": -2}},
    {"text_cfg": {**TINY_CLIP_CONFIG["text_cfg"], "width": 0}}, {"vision_cfg": [1, 2]},
])
def test_broken_model_configs_are_one_line(tmp_path, change):
    from mimicfilter.mimic.architectures import instantiate, resolve_architecture

    path = tmp_path / "broken.json"
    path.write_text(json.dumps({**TINY_CLIP_CONFIG, **change}))
    with pytest.raises(MimicfilterError) as info:
        instantiate(resolve_architecture(str(path)), str(tmp_path / "missing.pt"), "reference", False)
    assert "broken.json" in str(info.value) and "\n" not in str(info.value)


class Unsafe:
    """Any class: pickling it makes a checkpoint that weights_only loading refuses."""


def test_a_pickled_reference_head_is_one_line_without_inviting_trust_blindly(tmp_path):
    from mimicfilter.mimic.heads import _load_reference_head

    torch.save({"weight": Unsafe()}, tmp_path / "head.pt")
    with pytest.raises(MimicfilterError) as info:
        _load_reference_head(str(tmp_path / "head.pt"), trust=False)
    assert "full pickle" in str(info.value) and "\n" not in str(info.value)
    assert "only if you trust" in str(info.value)


# 18 ---------------------------------------------------------------------------------------------


def test_keys_with_tabs_and_newlines_stay_one_line_each(tmp_path):
    keys = ["plain", "two\nlines", "three\tfields", "back\\slash", "carriage\rreturn"]
    rows = [score_row("dir\twith tab/x.tar", key, index, 0, 1.0) for index, key in enumerate(keys)]
    run = write_score_run(tmp_path / "run", rows, ["dir\twith tab/x.tar"])
    result = invoke("filter", run, "--out", tmp_path / "out", "--where", "true", "--keys", "-")
    lines = result.stdout.split("\n")[:-1]
    assert len(lines) == 5 and all(line.count("\t") == 1 for line in lines)

    def unescape(field: str) -> str:
        return field.encode().decode("unicode_escape")

    assert [unescape(line.split("\t")[1]) for line in lines] == keys
    assert {unescape(line.split("\t")[0]) for line in lines} == {"dir\twith tab/x.tar"}
    assert invoke("filter", run, "--out", tmp_path / "out", "--where", "true", "--keys",
                  tmp_path / "keys.txt").exit_code == 0
    assert (tmp_path / "keys.txt").read_text().split("\n")[:-1] == lines
