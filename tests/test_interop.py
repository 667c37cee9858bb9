"""Issue 17, items 1-8: outputs others can read, runs that move, one stdout consumer, duplicate uids,
fast offline failure, the install path."""

import gzip
import json
import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from helpers import image_text_run, image_text_samples, score_row, write_score_run, write_tar

from mimicfilter.curate.datacomp import read_datacomp_npy
from mimicfilter.errors import MimicfilterError
from mimicfilter.shards.discover import expand_shards
from mimicfilter.shards.samples import iter_shard_samples
from mimicfilter_cli.main import cli

ROOT = Path(__file__).resolve().parent.parent


def invoke(*args):
    return CliRunner().invoke(cli, [str(arg) for arg in args], catch_exceptions=False)


@pytest.fixture
def umask_027():
    previous = os.umask(0o027)
    yield
    os.umask(previous)


def modes(directory: Path) -> dict[str, int]:
    """Relative path → permission bits of everything below ``directory``."""
    return {str(path.relative_to(directory)): stat.S_IMODE(path.stat().st_mode) for path in directory.rglob("*")}


# 1 ------------------------------------------------------------------------------------------------


def test_every_output_follows_the_umask(tmp_path, tiny_config, reference_checkpoint, umask_027):
    shards = tmp_path / "pool"
    shards.mkdir()
    write_tar(shards / "a.tar", image_text_samples(6))
    run = tmp_path / "run"
    result = invoke("score", shards, "--model", tiny_config, "--reference", reference_checkpoint, "--out", run,
                    "--train", "none", "--batch-size", "4", "--workers", "0", "--quiet")
    assert result.exit_code == 0, result.output
    out = tmp_path / "curated"
    result = invoke("filter", run, "--out", out, "--write-shards", out / "shards", "--keys", out / "keys.txt",
                    "--datacomp-npy", tmp_path / "subset.npy", "--where", "true")
    assert result.exit_code == 0, result.output
    assert invoke("report", run, "--sheet-size", "2").exit_code == 0
    files = {"subset.npy": stat.S_IMODE((tmp_path / "subset.npy").stat().st_mode)}
    for base, prefix in ((run, ""), (out, "curated/")):
        files |= {prefix + name: mode for name, mode in modes(base).items() if (base / name).is_file()}
    assert {"run.json", "stats.json", "_SUCCESS", "report/index.html", "report/_SUCCESS", "curated/manifest.parquet",
            "curated/summary.json", "curated/shards/curated-000000.tar", "curated/shards/curated.wids.json",
            "curated/keys.txt", "subset.npy"} <= set(files)
    assert {name: mode for name, mode in files.items() if mode != 0o640} == {}
    directories = [run / "report", out, out / "shards"]
    assert [stat.S_IMODE(path.stat().st_mode) for path in directories] == [0o750] * 3


# 2 ------------------------------------------------------------------------------------------------


def test_local_shards_are_recorded_by_absolute_path(tmp_path, monkeypatch):
    (tmp_path / "pool").mkdir()
    write_tar(tmp_path / "pool" / "a.tar", image_text_samples(2))
    monkeypatch.chdir(tmp_path)
    expected = [str(tmp_path / "pool" / "a.tar")]
    for spec in ("pool", "pool/a.tar", "pool/*.tar", "pool/{a,a}.tar", "./pool/../pool/a.tar"):
        assert expand_shards([spec]) == expected, spec


def test_curated_shards_are_written_from_another_directory_and_after_a_move(tmp_path, monkeypatch):
    run, shards = image_text_run(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert invoke("filter", run, "--out", "out", "--write-shards", "out/shards", "--where", "true").exit_code == 0
    assert (elsewhere / "out" / "shards" / "curated-000000.tar").exists()

    shutil.move(tmp_path / "shards", tmp_path / "moved")
    result = invoke("filter", run, "--out", "out", "--write-shards", "out/shards", "--where", "true")
    assert result.exit_code == 2
    assert f"shard not found: {shards[0]}" in result.output and "--shard-root" in result.output
    assert "re-download" not in result.output
    for root in (f"{tmp_path / 'shards'}={tmp_path / 'moved'}", str(tmp_path / "moved")):
        result = invoke("filter", run, "--out", "out", "--write-shards", "out/shards", "--where", "true",
                        "--shard-root", root)
        assert result.exit_code == 0, result.output
        index = json.loads((elsewhere / "out" / "shards" / "curated.wids.json").read_text())
        assert sum(entry["nsamples"] for entry in index["shardlist"]) == 20
    # the report's contact sheets read the moved shards too
    result = invoke("report", run, "--out", "report", "--sheet-size", "3", "--shard-root", tmp_path / "moved")
    assert result.exit_code == 0, result.output
    assert "shard not found" not in json.dumps(json.loads((elsewhere / "report" / "report.json").read_text()))


# 3 ------------------------------------------------------------------------------------------------


def test_a_folder_of_compressed_shards_is_read(tmp_path):
    folder = tmp_path / "pool"
    folder.mkdir()
    plain = write_tar(tmp_path / "plain.tar", image_text_samples(3))
    for name in ("a.tar.gz", "b.tgz"):
        (folder / name).write_bytes(gzip.compress(plain.read_bytes()))
    (folder / "notes.txt").write_text("not a shard")
    found = expand_shards([str(folder)])
    assert found == [str(folder / "a.tar.gz"), str(folder / "b.tgz")]
    assert [sample.key for sample in iter_shard_samples(found[1])] == ["00000000", "00000001", "00000002"]


# 4 ------------------------------------------------------------------------------------------------


@pytest.fixture
def unfinished_run(tmp_path):
    """A trajectory run killed in epoch 1 of 3: parts for epochs 0 (finished) and 1, no _SUCCESS."""
    run = tmp_path / "run"
    shard = str(tmp_path / "s.tar")
    for epoch in (0, 1):
        rows = [score_row(shard, f"k{i}", i, epoch, float(i)) for i in range(8 if epoch == 0 else 3)]
        write_score_run(run, rows, [shard], epochs=3, finished=False)
        (run / "scores" / "part.parquet").rename(run / "scores" / f"epoch-{epoch:04d}-chunk-00000.parquet")
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "epoch-0000.pt").write_bytes(b"")
    return run


@pytest.mark.parametrize("command", ["filter", "report"])
def test_unfinished_runs_are_named_and_refused_with_strict(unfinished_run, tmp_path, command):
    out = ["--out", tmp_path / "out"]
    result = invoke(command, unfinished_run, *out, *(["--sheet-size", "0"] if command == "report" else []))
    assert result.exit_code == 0, result.output
    assert "unfinished (no _SUCCESS; epochs with scores: 0, 1 (partial) of 3" in result.stderr
    written = json.loads((tmp_path / "out" / ("summary.json" if command == "filter" else "report.json")).read_text())
    assert any("unfinished" in warning for warning in written["warnings"])
    result = invoke(command, unfinished_run, *out, "--strict")
    assert result.exit_code == 2 and "unfinished" in result.stderr


# 5 ------------------------------------------------------------------------------------------------


def test_one_stdout_consumer_and_summaries_on_stderr(tmp_path):
    run, _ = image_text_run(tmp_path, shards=1)
    result = invoke("filter", run, "--out", tmp_path / "out", "--keys", "-", "--json")
    assert result.exit_code == 2 and "both want stdout" in result.stderr and result.stdout == ""
    result = invoke("filter", run, "--dry-run", "--keys", "-", "--min", "mimic_score=7")
    assert result.exit_code == 0
    assert result.stdout.splitlines() == [f"{tmp_path / 'shards' / 's0.tar'}\t0000000{i}" for i in (7, 8, 9)]
    assert "dry run" in result.stderr and not (tmp_path / "out").exists()
    assert invoke("filter", run, "--dry-run", "--keys", tmp_path / "k.txt").exit_code == 2
    result = invoke("filter", run, "--out", tmp_path / "out", "--keys", "-")
    assert len(result.stdout.splitlines()) == json.loads((tmp_path / "out" / "summary.json").read_text())["kept"]
    assert "mimicfilter filter" in result.stderr
    result = invoke("report", run, "--json", "--sheet-size", "0")
    assert result.exit_code == 0 and json.loads(result.stdout)["samples"] == 10
    assert "Quality estimate" not in result.stderr


def test_a_reader_that_stops_early_leaves_complete_outputs(tmp_path):
    shard = str(tmp_path / "s.tar")
    rows = [score_row(shard, f"key-{i:06d}-{'x' * 40}", i, 0, float(i)) for i in range(6000)]  # > a pipe buffer
    run = write_score_run(tmp_path / "run", rows, [shard])
    command = (f"{sys.executable} -m mimicfilter filter {run} --out {tmp_path / 'out'} --where true --keys - "
               f"| head -1; echo \"status=${{PIPESTATUS[0]}}\"")
    result = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=300)
    first, status = result.stdout.splitlines()
    assert first.endswith("key-000000-" + "x" * 40) and status == "status=0", result.stderr
    assert "Traceback" not in result.stderr and "Exception ignored" not in result.stderr
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["keys_reader_closed"] is True and summary["kept"] == 6000
    assert pq.read_metadata(tmp_path / "out" / "manifest.parquet").num_rows == 6000


def test_score_summary_goes_to_stderr_and_tells_rows_from_samples(tmp_path, tiny_config, reference_checkpoint):
    write_tar(tmp_path / "a.tar", image_text_samples(6))
    result = invoke("score", tmp_path / "a.tar", "--model", tiny_config, "--reference", reference_checkpoint,
                    "--out", tmp_path / "run", "--epochs", "2", "--batch-size", "3", "--workers", "0")
    assert result.exit_code == 0, result.output
    assert result.stdout == ""
    assert "samples" in result.stderr and "rows in table (samples × epochs)" in result.stderr
    filtered = invoke("filter", tmp_path / "run", "--out", tmp_path / "out", "--json")
    summary = json.loads(filtered.stdout)
    assert summary["samples"] == 6 and summary["score_rows"] == 12


# 6 ------------------------------------------------------------------------------------------------


@pytest.fixture
def shared_uid_run(tmp_path):
    """Five samples; s3 carries the uid of s1 (scores: s0 < s1 < ... < s4)."""
    uids = [f"{i:032x}" for i in (0, 1, 2, 1, 4)]
    rows = [score_row("x.tar", f"s{i}", i, 0, float(i), uid=uid) for i, uid in enumerate(uids)]
    return write_score_run(tmp_path / "run", rows, ["x.tar"])


@pytest.mark.parametrize("mode, kept, warned, uids", [
    ("off", ["s1", "s2", "s3", "s4"], False, 3),  # s1 and s3 collapse into one uid of the subset
    ("keep-first", ["s1", "s2", "s4"], True, 3),  # s3 dropped, but the subset's uid still selects it
    ("drop-all", ["s2", "s4"], False, 2),  # the subset selects exactly the kept samples
])
def test_duplicate_uids_are_reported_and_deduped_on_request(shared_uid_run, tmp_path, mode, kept, warned, uids):
    out = tmp_path / "out"
    result = invoke("filter", shared_uid_run, "--out", out, "--top-k", "mimic_score=4", "--dedupe-uid", mode,
                    "--datacomp-npy", out / "subset.npy")
    assert result.exit_code == 0, result.output
    manifest = pq.read_table(out / "manifest.parquet").to_pylist()
    assert [row["key"] for row in manifest if row["kept"]] == kept
    assert [row["reason"] for row in manifest if row["reason"] == "duplicate uid"] == ["duplicate uid"] * (4 - len(kept))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["duplicates"]["uids"] | {"example": None} == {"names": 1, "samples": 2, "example": None}
    assert summary["duplicates"]["uids"]["example"] == {"name": f"{1:032x}", "samples": "x.tar #1, x.tar #3"}
    assert "1 uid(s) shared by 2 samples" in result.stderr
    assert ("carry the uid of a kept sample" in result.stderr) == warned
    assert len(read_datacomp_npy(out / "subset.npy")) == uids == summary["datacomp_uids"]


# 7 ------------------------------------------------------------------------------------------------


@pytest.fixture
def empty_hub_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return tmp_path / "hub"


def test_an_uncached_tag_fails_at_once_offline(empty_hub_cache, monkeypatch):
    from huggingface_hub import constants

    from mimicfilter.mimic.architectures import instantiate, resolve_architecture

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    started = time.monotonic()
    with pytest.raises(MimicfilterError) as info:
        instantiate(resolve_architecture("ViT-B-32"), "openai", "reference", False)
    assert time.monotonic() - started < 5
    text = str(info.value)
    assert "timm/vit_base_patch32_clip_224.openai/open_clip_pytorch_model.bin" in text
    assert "HF_HUB_OFFLINE" in text and "\n" not in text


def test_an_unreachable_hub_fails_after_one_short_probe(empty_hub_cache, monkeypatch):
    import socket

    from huggingface_hub import constants

    from mimicfilter.mimic.hub import pretrained_access

    with socket.socket() as closed:  # a port nothing listens on: connection refused at once
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    started = time.monotonic()
    with pytest.raises(MimicfilterError, match="cannot be reached .*open_clip_pytorch_model.bin|not cached .*reached"):
        pretrained_access("ViT-B-32", "openai")
    assert time.monotonic() - started < 10


def test_a_cached_tag_is_loaded_without_asking_the_network(empty_hub_cache):
    from huggingface_hub import constants

    from mimicfilter.mimic.hub import pretrained_access

    snapshot = empty_hub_cache / "models--timm--vit_base_patch32_clip_224.openai" / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "open_clip_pytorch_model.bin").write_bytes(b"weights")
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("a" * 40)
    before = constants.HF_HUB_OFFLINE
    with pretrained_access("ViT-B-32", "openai"):
        assert constants.HF_HUB_OFFLINE is True  # huggingface_hub serves the cached file, asks nothing
    assert constants.HF_HUB_OFFLINE == before


@pytest.mark.parametrize("typed", ["ViT-B32", "vit-b-32", "vitb32"])
def test_model_name_typos_suggest_the_name(typed):
    from mimicfilter.mimic.architectures import resolve_architecture

    with pytest.raises(MimicfilterError, match="did you mean ViT-B-32\\?"):
        resolve_architecture(typed)


# 8 ------------------------------------------------------------------------------------------------


def test_make_install_is_for_users_and_make_test_adds_the_dev_extras():
    def plan(*targets):
        return subprocess.run(["make", "-n", "-B", "-C", str(ROOT), *targets], capture_output=True, text=True,
                              check=True).stdout

    install = plan("install")
    assert "--quiet" not in install and "[dev]" not in install and "pip install -e ." in install
    assert "--index-url https://download.pytorch.org/whl/cpu" in plan(
        "install", "TORCH_INDEX=https://download.pytorch.org/whl/cpu")
    assert "'.[dev]'" in plan("test") and "pytest" in plan("test")
    assert "import pytest, pytest_timeout, ray" in plan("test")  # a clone without the per-test timeout gets it
    assert "[dev]" not in plan("demo")
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_a_hung_test_fails_instead_of_blocking_the_run(request, tmp_path):
    """pytest-timeout gives every test a deadline (pyproject.toml); past it the test fails and the run goes on."""
    assert float(request.config.getini("timeout")) >= 60
    (tmp_path / "test_hung.py").write_text("import time\n\n\ndef test_hangs():\n    time.sleep(120)\n\n\n"
                                          "def test_after():\n    pass\n")
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--timeout", "2",
                           "test_hung.py"], capture_output=True, text=True, cwd=tmp_path, timeout=100)
    assert done.returncode == 1 and "Timeout" in done.stdout and "1 failed, 1 passed" in done.stdout, done.stdout


def test_report_without_out_writes_into_the_run(tmp_path):
    run, _ = image_text_run(tmp_path, shards=1)
    result = invoke("report", run, "--sheet-size", "0")
    assert result.exit_code == 0, result.output
    assert (run / "report" / "index.html").exists() and (run / "report" / "_SUCCESS").exists()
    assert str(run / "report" / "index.html") in result.stderr
    assert np.isclose(json.loads((run / "report" / "report.json").read_text())["samples"], 10)
