"""Names and numbers a shard or a command line can hold that the tables cannot: a member name or a
shard path that is not UTF-8, a NaN weight decay, a worker count no machine runs; and a run
directory of one command reopened by another, or at another batch size."""

import io
import json
import os
import tarfile

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from helpers import image_bytes, image_text_samples, write_tar

from mimicfilter_cli.main import cli


def invoke(*args):
    return CliRunner().invoke(cli, [str(arg) for arg in args], catch_exceptions=False)


def one_line(result, code=2) -> str:
    assert result.exit_code == code and "Traceback" not in result.output, result.output
    assert len(result.stderr.strip().splitlines()) == 1 and result.stderr.startswith("Error: "), result.stderr
    return result.stderr


@pytest.fixture
def models(tiny_config, reference_checkpoint):
    return ["--model", tiny_config, "--reference", reference_checkpoint]


def test_a_member_name_that_is_not_utf8_is_a_status_row_and_the_run_finishes(tmp_path, models):
    shard = tmp_path / "names.tar"
    with tarfile.open(shard, "w", format=tarfile.GNU_FORMAT, encoding="latin-1") as tar:
        for number, key in enumerate(("good0", "bad_\xff\xfe", "good1")):
            for name, data in ((f"{key}.jpg", image_bytes(number)), (f"{key}.txt", b"a caption")):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    for command, extra in (("score", ["--epochs", "2"]), ("embed", [])):
        out = tmp_path / command
        result = invoke(command, shard, *models, *extra, "--workers", "0", "--quiet", "--out", out)
        assert result.exit_code == 0, result.output
        rows = pq.read_table(out / "scores").to_pylist()
        bad = [row for row in rows if row["key"] == "bad_\\xff\\xfe"]
        assert bad and all(row["status"] == "decode_error" and "not valid UTF-8" in row["error"] for row in bad)
        assert {row["key"] for row in rows if row["status"] == "ok"} == {"good0", "good1"}
        assert (out / "_SUCCESS").exists()


def test_a_shard_path_that_is_not_utf8_is_one_line_before_any_model_loads(tmp_path):
    folder = tmp_path / "shards"
    folder.mkdir()
    source = write_tar(tmp_path / "pool.tar", image_text_samples(3))
    os.link(source, os.path.join(os.fsencode(folder), b"sh\xff.tar"))
    result = invoke("score", folder, "--model", tmp_path / "never-read.json", "--reference", tmp_path / "never-read.pt",
                    "--out", tmp_path / "out")
    assert "is not valid UTF-8" in one_line(result) and not (tmp_path / "out").exists()


@pytest.mark.parametrize("option, named", [(["--weight-decay", "nan"], "--weight-decay nan"),
                                           (["--lr", "inf"], "--lr inf"),
                                           (["--workers", "100000"], "--workers 100000")])
def test_numbers_no_run_can_use_are_usage_errors(tmp_path, models, option, named):
    shard = write_tar(tmp_path / "pool.tar", image_text_samples(3))
    assert named in one_line(invoke("score", shard, *models, *option, "--out", tmp_path / "out"))


def test_a_run_directory_of_another_command_or_batch_size_is_not_reopened(tmp_path, models):
    shard = write_tar(tmp_path / "pool.tar", image_text_samples(6))
    out = tmp_path / "embedded"
    assert invoke("embed", shard, *models, "--batch-size", "4", "--quiet", "--out", out).exit_code == 0
    assert "differs in: batch_size" in one_line(invoke("embed", shard, *models, "--batch-size", "3", "--quiet",
                                                       "--out", out))
    assert "holds a `mimicfilter embed` run, not a `score` one" in one_line(
        invoke("score", shard, *models, "--quiet", "--out", out))
    assert json.loads((out / "run.json").read_text())["command"] == "embed"


def test_a_caption_the_tokenizer_reads_as_empty_is_missing_text_not_a_score(tmp_path, models):
    samples = [(f"{i:04d}", {"jpg": image_bytes(i), "txt": caption})
               for i, caption in enumerate([b"a red apple", b"\x00", b"\x01\x02\x03", b"a green pear"])]
    out = tmp_path / "run"
    result = invoke("score", write_tar(tmp_path / "pool.tar", samples), *models, "--train", "none", "--workers", "0",
                    "--quiet", "--out", out)
    assert result.exit_code == 0, result.output
    status = {row["key"]: (row["status"], row["mimic_score"]) for row in pq.read_table(out / "scores").to_pylist()}
    assert status["0001"][0] == status["0002"][0] == "missing_text" and status["0001"][1] is None
    assert status["0000"][0] == status["0003"][0] == "ok"


def test_a_uid_that_is_not_a_string_is_kept_as_json_not_as_a_python_repr():
    from mimicfilter.shards.decode import DecodeConfig, decode_sample
    from mimicfilter.shards.images import ImageGeometry
    from mimicfilter.shards.records import RawSample

    def uid_of(value):
        raw = RawSample("s.tar", "k", 0, {"jpg": image_bytes(0), "txt": b"a cat", "json": json.dumps({"uid": value}).encode()})
        return decode_sample(raw, DecodeConfig(), ImageGeometry()).uid

    assert [uid_of(value) for value in ("abc", 12345, {"a": 1}, [1, 2], None)] == ["abc", "12345", '{"a": 1}', "[1, 2]", None]
