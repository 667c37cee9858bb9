"""What `filter` and `embed` say about inputs they cannot use: one line on stderr, exit 2, nothing
written; and `embed`'s --json, resume and --overwrite."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from helpers import image_text_run, image_text_samples, write_tar

from mimicfilter.store.parts import read_scores
from mimicfilter_cli.main import cli


def invoke(*args):
    return CliRunner().invoke(cli, [str(arg) for arg in args])


def one_line_usage_error(result) -> str:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and len(result.stderr.strip().splitlines()) == 1, result.stderr
    return result.stderr


@pytest.fixture
def inputs(tmp_path) -> dict[str, Path]:
    """A real run, and things that are not one."""
    run, _ = image_text_run(tmp_path, shards=1)
    (tmp_path / "empty").mkdir()
    (tmp_path / "no-parts" / "scores").mkdir(parents=True)
    pq.write_table(pa.table({"a": [1, 2]}), tmp_path / "other.parquet")
    pq.write_table(pa.table({"id": ["x"], "extra_score": [1.0]}), tmp_path / "no-keys.parquet")
    return {"run": run, "tmp": tmp_path}


@pytest.mark.parametrize("args, message", [
    (["{tmp}/nope"], "{tmp}/nope does not exist"),
    (["{tmp}/empty"], "{tmp}/empty holds no score parts"),
    (["{tmp}/no-parts"], "{tmp}/no-parts holds no score parts"),
    (["{tmp}/other.parquet"], "not a mimicfilter score table: no column epoch"),
    (["{tmp}/*.nothing"], "no Parquet files match {tmp}/*.nothing"),
    (["{run}", "--join", "{tmp}/missing.parquet"], "--join {tmp}/missing.parquet does not exist"),
    (["{run}", "--join", "{tmp}/no-keys.parquet"], "--join {tmp}/no-keys.parquet has no column uid to join --on uid"),
    (["{run}", "--join", "{tmp}/no-keys.parquet", "--on", "shard,key"], "has no column shard, key to join --on shard,key"),
], ids=["missing path", "empty folder", "folder without parts", "not a score table", "glob matching nothing",
        "missing join file", "join without uid", "join without shard and key"])
def test_filter_input_errors_are_one_line(inputs, args, message):
    places = {"tmp": inputs["tmp"], "run": inputs["run"]}
    out = inputs["tmp"] / "out"
    line = one_line_usage_error(invoke("filter", *[arg.format(**places) for arg in args], "--out", out))
    assert message.format(**places) in line
    assert not out.exists()


@pytest.fixture
def shard(tmp_path) -> Path:
    (tmp_path / "empty").mkdir()
    (tmp_path / "a-file").write_text("not a directory")
    return write_tar(tmp_path / "a.tar", image_text_samples(6))


@pytest.mark.parametrize("change, message", [
    ({"shards": ["{tmp}/nope.tar"]}, "shard not found: {tmp}/nope.tar"),
    ({"shards": ["{tmp}/empty"]}, "no shards (.tar"),
    ({"shards": ["pipe:cat {tmp}/a.tar"]}, "pipe: shard URLs run shell commands and are disabled"),
    ({"--model": "NoSuchNet-7"}, "unknown model 'NoSuchNet-7'"),
    ({"--reference": "{tmp}/missing.pt"}, "reference checkpoint {tmp}/missing.pt does not exist"),
    ({"--out": "{tmp}/a-file/run"}, "{tmp}/a-file is not a directory"),
    ({"--decoder": "gpu", "--device": "cpu"}, "--decoder gpu decodes JPEGs on the scoring GPU"),
    ({"--task": "classify"}, "classification needs a reference head"),
], ids=["missing shard", "folder without shards", "pipe refused", "unknown model", "missing reference",
        "out through a file", "gpu decoder on the cpu", "classification without a head"])
def test_embed_usage_errors_are_one_line(shard, tiny_config, reference_checkpoint, tmp_path, change, message):
    options = {"--model": str(tiny_config), "--reference": str(reference_checkpoint), "--out": "{tmp}/run", **change}
    shards = [item.format(tmp=tmp_path) for item in options.pop("shards", [str(shard)])]
    args = [part for option, value in options.items() for part in (option, value.format(tmp=tmp_path))]
    line = one_line_usage_error(invoke("embed", *shards, *args, "--quiet"))
    assert message.format(tmp=tmp_path) in line and "(hint:" in line
    assert not (tmp_path / "run" / "run.json").exists()


def test_embed_reports_json_resumes_and_overwrites(shard, tiny_config, reference_checkpoint, tmp_path):
    out = tmp_path / "run"
    base = ["embed", shard, "--model", tiny_config, "--reference", reference_checkpoint, "--out", out, "--workers", "0",
            "--quiet"]
    first = invoke(*base, "--json")
    assert first.exit_code == 0 and first.stderr == ""
    stats = json.loads(first.stdout)
    assert stats["command"] == "embed" and stats["rows"] == 6 and stats["embedding_dim"] == 16
    assert stats["samples_embedded_now"] == 6 and stats["shards_resumed"] == 0
    table = read_scores(out)
    again = json.loads(invoke(*base, "--json").stdout)  # the same command: the finished shard is kept
    assert again["shards_resumed"] == 1 and again["samples_embedded_now"] == 0 and again["rows"] == 6
    assert read_scores(out).equals(table)

    other = ["--image-key", "png"]  # another command: refused, then replaced with --overwrite
    line = one_line_usage_error(invoke(*base, *other))
    assert "holds a run of a different command (differs in: decode.image_keys)" in line and "--overwrite" in line
    replaced = json.loads(invoke(*base, *other, "--overwrite", "--json").stdout)
    assert replaced["samples_embedded_now"] == 6 and replaced["status_counts"]["missing_image"] == 6
    run = json.loads((out / "run.json").read_text())
    assert run["fingerprint"]["decode"]["image_keys"] == ["png"]
