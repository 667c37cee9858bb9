"""Outputs that can never destroy inputs (issue 28): the output-path guard, non-finite and null scores
in any epoch, remote shards without their fsspec driver, runs that read nothing, and one-line errors."""

import errno
import json
import os
import stat
import sys
import threading
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from helpers import image_text_run, image_text_samples, score_row, write_score_run, write_tar

from mimicfilter_cli.main import cli


def invoke(*args):
    return CliRunner().invoke(cli, [str(arg) for arg in args], catch_exceptions=False)


def one_line_error(result, code=2) -> str:
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error:"), result.stderr
    return lines[0]


def snapshot(*roots: Path) -> dict[str, bytes]:
    return {str(path): path.read_bytes() for root in roots for path in sorted(Path(root).rglob("*")) if path.is_file()}


class FifoReader:
    """Reads a FIFO in a thread, as a downstream process of a shell pipeline would."""

    def __init__(self, path: Path):
        self.path, self.data = path, b""
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self):
        with open(self.path, "rb") as handle:  # blocks until a writer opens the FIFO
            self.data = handle.read()

    def finish(self) -> bytes:
        self.thread.join(timeout=30)
        if self.thread.is_alive():  # nobody opened the FIFO for writing: release the reader
            with open(self.path, "wb"):
                pass
            self.thread.join(timeout=10)
        return self.data


# 1: never replace a non-regular file; write through symlinks ----------------------------------------


def test_keys_into_a_fifo_are_streamed_and_the_fifo_stays(tmp_path):
    run, _ = image_text_run(tmp_path)
    fifo = tmp_path / "keys.fifo"
    os.mkfifo(fifo)
    reader = FifoReader(fifo)
    result = invoke("filter", run, "--out", tmp_path / "out", "--where", "mimic_score < 3", "--keys", fifo)
    data = reader.finish()
    assert result.exit_code == 0, result.output
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert data.decode().splitlines() == [f"{tmp_path / 'shards' / 's0.tar'}\t0000000{i}" for i in range(3)]
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["keys_written"] == 3


def test_a_datacomp_subset_into_a_fifo_is_streamed(tmp_path):
    run, _ = image_text_run(tmp_path)
    fifo = tmp_path / "subset.fifo"
    os.mkfifo(fifo)
    reader = FifoReader(fifo)
    result = invoke("filter", run, "--out", tmp_path / "out", "--where", "mimic_score < 2", "--datacomp-npy", fifo)
    data = reader.finish()
    assert result.exit_code == 0, result.output
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    (tmp_path / "copy.npy").write_bytes(data)
    uids = np.load(tmp_path / "copy.npy")
    assert uids.dtype == np.dtype("u8,u8") and uids.tolist() == [(0, 0), (0, 1)]


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="making a device node needs root")
def test_a_character_device_is_written_as_a_stream_not_replaced(tmp_path):
    device = tmp_path / "null"  # a scratch node with /dev/null's numbers: the machine's own /dev is never touched
    os.mknod(device, stat.S_IFCHR | 0o666, os.makedev(1, 3))
    run, _ = image_text_run(tmp_path)
    for option in ("--keys", "--datacomp-npy"):
        result = invoke("filter", run, "--out", tmp_path / "out", option, device)
        assert result.exit_code == 0, result.output
        assert stat.S_ISCHR(os.lstat(device).st_mode) and os.stat(device).st_rdev == os.makedev(1, 3)


def test_a_socket_is_refused(tmp_path):
    import socket

    run, _ = image_text_run(tmp_path)
    path = tmp_path / "s.sock"
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(path))
        line = one_line_error(invoke("filter", run, "--out", tmp_path / "out", "--keys", path))
    assert "not a regular file" in line and stat.S_ISSOCK(os.lstat(path).st_mode)


@pytest.mark.parametrize("option", ["--keys", "--datacomp-npy"])
def test_outputs_are_written_through_symlinks(tmp_path, option):
    run, _ = image_text_run(tmp_path)
    (tmp_path / "elsewhere").mkdir()
    target, link = tmp_path / "elsewhere" / "kept.out", tmp_path / "kept.link"
    target.write_text("old")
    link.symlink_to(target)
    dangling_target, dangling = tmp_path / "elsewhere" / "new.out", tmp_path / "new.link"
    dangling.symlink_to(dangling_target)
    for path, real in ((link, target), (dangling, dangling_target)):
        result = invoke("filter", run, "--out", tmp_path / "out", option, path)
        assert result.exit_code == 0, result.output
        assert path.is_symlink() and os.readlink(path) == str(real)
        assert real.read_bytes() not in (b"", b"old")
        assert stat.S_IMODE(real.stat().st_mode) & 0o044 == 0o044  # readable by others under umask 022
    assert [p.name for p in (tmp_path / "elsewhere").iterdir() if p.name.startswith(".")] == []


# 2, 3: never an input, never another output's file --------------------------------------------------


def _filter_refusals(tmp_path):
    run, shards = image_text_run(tmp_path)
    out = tmp_path / "out"
    part = next((run / "scores").glob("*.parquet"))
    return run, shards, [
        (("--keys", shards[0]), "input"),
        (("--keys", run / "stats.json"), "input"),
        (("--keys", run / "run.json"), "input"),
        (("--datacomp-npy", part), "input"),
        (("--datacomp-npy", run / "scores" / "new.npy"), "input run"),
        (("--write-shards", run / "scores"), "input"),
        (("--write-shards", tmp_path / "shards"), "input"),
        (("--keys", out / "manifest.parquet"), "--out"),
        (("--datacomp-npy", out / "summary.json"), "--out"),
        (("--keys", out / "_SUCCESS"), "--out"),
        (("--keys", tmp_path / "same.txt", "--datacomp-npy", tmp_path / "same.txt"), "--keys"),
        (("--write-shards", tmp_path / "cs", "--keys", tmp_path / "cs" / "keys.txt"), "--write-shards"),
    ]


def test_filter_never_writes_over_an_input_or_another_output(tmp_path):
    run, shards, cases = _filter_refusals(tmp_path)
    before = snapshot(run, tmp_path / "shards")
    for args, named in cases:
        line = one_line_error(invoke("filter", run, "--out", tmp_path / "out", *args))
        assert named in line and "refus" in line, (args, line)
        assert snapshot(run, tmp_path / "shards") == before, args
        assert not (tmp_path / "out").exists(), args


def test_out_may_not_be_an_input_run_or_hold_one(tmp_path):
    run, _ = image_text_run(tmp_path)
    before = snapshot(run)
    for out in (run, run / "scores", tmp_path):
        line = one_line_error(invoke("filter", run, "--out", out))
        assert "refus" in line, line
    line = one_line_error(invoke("report", run, "--out", run / "scores", "--sheet-size", "0"))
    assert "refus" in line
    assert snapshot(run) == before
    # a folder beside the run's own files is the documented place for curated outputs and reports
    assert invoke("filter", run, "--out", run / "curated", "--write-shards", run / "curated" / "shards").exit_code == 0
    assert invoke("report", run, "--out", run / "report", "--sheet-size", "0").exit_code == 0


def test_report_out_may_not_hold_its_manifest(tmp_path):
    run, _ = image_text_run(tmp_path)
    assert invoke("filter", run, "--out", tmp_path / "curated").exit_code == 0
    manifest = tmp_path / "curated" / "manifest.parquet"
    before = manifest.read_bytes()
    line = one_line_error(invoke("report", run, "--filter-manifest", manifest, "--out", tmp_path / "curated"))
    assert "refus" in line and manifest.read_bytes() == before


def test_score_overwrite_never_deletes_its_own_proxy_checkpoint(tmp_path, tiny_config, reference_checkpoint):
    write_tar(tmp_path / "a.tar", image_text_samples(4))
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    proxy = run / "checkpoints" / "proxy.pt"
    proxy.write_bytes(reference_checkpoint.read_bytes())
    line = one_line_error(invoke("score", tmp_path / "a.tar", "--model", tiny_config, "--reference",
                                 reference_checkpoint, "--proxy", proxy, "--out", run, "--overwrite", "--quiet"))
    assert "refus" in line and proxy.exists()


# 4, 5: non-finite and null scores in any epoch --------------------------------------------------------


def _three_epoch_run(tmp_path, change):
    rows = [score_row("x.tar", f"k{i}", i, epoch, float(i) + epoch, clip=0.5) for epoch in range(3) for i in range(6)]
    change(rows)
    return write_score_run(tmp_path / "run", rows, ["x.tar"], epochs=3)


@pytest.mark.parametrize("epoch, value", [(0, float("nan")), (1, float("inf")), (0, None), (1, -float("inf"))])
def test_a_bad_score_in_any_epoch_marks_the_sample(tmp_path, epoch, value):
    def change(rows):
        rows[epoch * 6 + 2]["mimic_score"] = value

    run = _three_epoch_run(tmp_path, change)
    for rule in (("--where", "clip_score > 0.1"), ("--top-frac", "mimic_score=1"), ()):
        result = invoke("filter", run, "--out", tmp_path / "out", *rule, "--json")
        assert result.exit_code == 0, result.output
        manifest = {row["key"]: row for row in pq.read_table(tmp_path / "out" / "manifest.parquet").to_pylist()}
        assert manifest["k2"]["reason"] == "status:non_finite_score" and not manifest["k2"]["kept"], rule
        assert manifest["k2"]["error"] and f"epoch {epoch}" in manifest["k2"]["error"]
        summary = json.loads(result.stdout)
        assert summary["non_finite_scores"] == 1 and summary["ok"] == 5
    report = invoke("report", run, "--out", tmp_path / "report", "--sheet-size", "0")
    assert report.exit_code == 0, report.output
    data = json.loads((tmp_path / "report" / "report.json").read_text())
    assert data["status_counts"]["non_finite_score"]["count"] == 1 and data["ok"] == 5
    assert any(reason["reason"] == "status:non_finite_score" for reason in data["drop_reasons"])


def test_a_null_weight_on_an_ok_row_marks_the_sample(tmp_path):
    rows = [score_row("x.tar", f"k{i}", i, 0, float(i), clip=0.5) for i in range(5)]
    rows[1]["mimic_weight"] = None
    run = write_score_run(tmp_path / "run", rows, ["x.tar"])
    result = invoke("filter", run, "--out", tmp_path / "out", "--where", "clip_score > 0.1", "--json")
    manifest = {row["key"]: row for row in pq.read_table(tmp_path / "out" / "manifest.parquet").to_pylist()}
    assert manifest["k1"]["reason"] == "status:non_finite_score"
    assert json.loads(result.stdout)["kept"] == 4


# 7: remote shards without their driver; runs that read nothing ----------------------------------------


@pytest.mark.parametrize("url, extra", [("s3://bucket/pool/0.tar", "s3"), ("gs://bucket/pool/0.tar", "gcs"),
                                        ("https://example.invalid/pool/0.tar", "http")])
def test_a_remote_shard_without_its_driver_is_a_usage_error(tmp_path, tiny_config, reference_checkpoint, url, extra,
                                                             monkeypatch):
    for module in ("s3fs", "gcsfs", "aiohttp"):
        monkeypatch.setitem(sys.modules, module, None)  # not installed, whatever this machine has
    result = invoke("score", url, "--model", tiny_config, "--reference", reference_checkpoint,
                    "--out", tmp_path / "run", "--quiet")
    line = one_line_error(result)
    assert f"mimicfilter[{extra}]" in line and url.split("://")[0] in line
    assert not (tmp_path / "run").exists()


def test_a_run_that_read_nothing_fails_and_is_not_marked_done(tmp_path, tiny_config, reference_checkpoint):
    (tmp_path / "a.tar").write_bytes(b"not a tar at all" * 64)
    (tmp_path / "b.tar").write_bytes(b"")
    result = invoke("score", tmp_path / "a.tar", tmp_path / "b.tar", "--model", tiny_config, "--reference",
                    reference_checkpoint, "--out", tmp_path / "run", "--quiet", "--train", "none")
    line = one_line_error(result, code=1)
    assert "every shard failed" in line and "a.tar" in line
    assert not (tmp_path / "run" / "_SUCCESS").exists()
    # one readable shard is a run that read something: it finishes, the broken one keeps its row
    write_tar(tmp_path / "c.tar", image_text_samples(3))
    result = invoke("score", tmp_path / "a.tar", tmp_path / "c.tar", "--model", tiny_config, "--reference",
                    reference_checkpoint, "--out", tmp_path / "run2", "--quiet", "--train", "none")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "run2" / "_SUCCESS").exists()


# 8: the minor items -------------------------------------------------------------------------------------


def test_write_shards_refuses_an_unsafe_key_before_any_key_reaches_stdout(tmp_path):
    shard = write_tar(tmp_path / "s.tar", [("../escape", {"jpg": b"x", "txt": b"y"}), ("fine", {"jpg": b"x", "txt": b"y"})])
    rows = [score_row(str(shard), "../escape", 0, 0, 1.0), score_row(str(shard), "fine", 1, 0, 2.0)]
    run = write_score_run(tmp_path / "run", rows, [str(shard)])
    for shards_dir in (tmp_path / "out" / "shards", tmp_path / "cs"):  # inside --out, and a unit of its own
        result = invoke("filter", run, "--out", tmp_path / "out", "--where", "true", "--keys", "-",
                        "--write-shards", shards_dir)
        assert "unsafe sample key" in one_line_error(result)
        assert result.stdout == ""


def test_a_refused_shard_write_is_exit_1_naming_the_path(tmp_path, monkeypatch):
    from mimicfilter.curate import reshard

    run, _ = image_text_run(tmp_path)

    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(reshard.tarfile.TarFile, "addfile", full)
    line = one_line_error(invoke("filter", run, "--out", tmp_path / "out", "--where", "true",
                                 "--write-shards", tmp_path / "cs"), code=1)
    assert os.strerror(errno.ENOSPC) in line and str(tmp_path / "cs") in line


def test_a_disk_full_error_without_a_file_name_names_the_path(tmp_path, monkeypatch):
    run, _ = image_text_run(tmp_path)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(pq.ParquetWriter, "write_batch", full)
    line = one_line_error(invoke("filter", run, "--out", tmp_path / "out"), code=1)
    assert "No space left on device" in line and "manifest.parquet" in line


def test_click_usage_errors_are_one_line(tmp_path, tiny_config, reference_checkpoint):
    run, _ = image_text_run(tmp_path)
    (tmp_path / "a-file").write_text("x")
    lines = [
        one_line_error(invoke("score", tmp_path / "a.tar", "--model", tiny_config, "--reference",
                              reference_checkpoint, "--out", tmp_path / "r", "--seed", "1e23")),
        one_line_error(invoke("filter", run, "--out", tmp_path / "o", "--datacomp-npy", tmp_path)),
        one_line_error(invoke("filter", run, "--out", tmp_path / "a-file")),
        one_line_error(invoke("filter", run, "--no-such-option")),
    ]
    assert all("--help" in line for line in lines), lines


def test_top_k_above_the_pool_says_so(tmp_path):
    run, _ = image_text_run(tmp_path)
    result = invoke("filter", run, "--out", tmp_path / "out", "--top-k", "mimic_score=1e30")
    assert result.exit_code == 0, result.output
    assert "--top-k mimic_score" in result.stderr and "20" in result.stderr and "every one" in result.stderr
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["kept"] == 20


def test_large_transparent_images_become_rgb_band_by_band_with_the_same_pixels(monkeypatch):
    from PIL import Image

    from mimicfilter.shards import decode

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(300, 200, 4), dtype=np.uint8)
    for mode in ("RGBA", "LA", "P"):
        image = Image.fromarray(pixels, "RGBA").convert(mode)
        if mode == "P":
            image.info["transparency"] = 3
        whole = np.asarray(decode._to_rgb(image.copy()))
        monkeypatch.setattr(decode, "_BANDED_PIXELS", 1000)
        monkeypatch.setattr(decode, "_BAND_ROWS", 7)
        banded = np.asarray(decode._to_rgb(image.copy()))
        monkeypatch.undo()
        assert banded.shape == whole.shape == (300, 200, 3) and np.array_equal(banded, whole), mode


def test_extrapolate_never_writes_into_its_inputs(tmp_path):
    run, _ = image_text_run(tmp_path)
    before = snapshot(run)
    for out in (run, run / "scores"):
        line = one_line_error(invoke("extrapolate", "--scored", run, "--embeddings", run, "--out", out))
        assert "input run" in line
    assert snapshot(run) == before
