"""`mimicfilter score` end to end: run directory, statuses, resume, refusals, one-line errors."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from helpers import TINY_CLIP_CONFIG, image_bytes, image_text_samples, write_random_checkpoint, write_tar

from mimicfilter.store.parts import read_scores
from mimicfilter.store.schema import SCORE_SCHEMA
from mimicfilter_cli.main import cli


@pytest.fixture
def shard_dir(tmp_path):
    directory = tmp_path / "shards"
    directory.mkdir()
    write_tar(directory / "a.tar", image_text_samples(10, start=0))
    bad = image_text_samples(6, start=100)
    bad[1][1]["jpg"] = image_bytes(1)[:200]  # a truncated (corrupt) JPEG
    del bad[2][1]["txt"]  # a sample without text
    bad[3][1]["jpg"] = b"this is not an image"
    write_tar(directory / "b.tar", bad)
    write_tar(directory / "c.tar", [])  # an empty shard
    return directory


def score_args(shards, tiny_config, reference_checkpoint, out, *extra):
    return ["score", *map(str, shards), "--model", str(tiny_config), "--reference", str(reference_checkpoint),
            "--out", str(out), "--batch-size", "4", "--workers", "0", "--quiet", "--train", "none", *extra]


def invoke(args):
    return CliRunner().invoke(cli, args, catch_exceptions=False)


def test_score_writes_a_complete_run_directory(shard_dir, tiny_config, reference_checkpoint, tmp_path):
    out = tmp_path / "run"
    result = invoke(score_args([shard_dir], tiny_config, reference_checkpoint, out, "--json"))
    assert result.exit_code == 0, result.output
    stats = json.loads(result.stdout)
    assert (out / "_SUCCESS").exists()
    run = json.loads((out / "run.json").read_text())
    assert run["models"]["mimic_layers"]["shapes"] == {"visual.proj": [32, 16]}
    assert run["models"]["reference"]["sha256"] and run["models"]["direction_norm"] > 0
    assert len(run["shards"]) == 3 and run["batch_size"] == 4
    parts = sorted((out / "scores").glob("*.parquet"))
    assert len(parts) == 3  # one per shard, the empty shard included
    assert pq.read_schema(parts[0]).remove_metadata().equals(SCORE_SCHEMA)

    table = read_scores(out).to_pylist()
    assert len(table) == 16 and stats["rows"] == 16
    by_key = {(Path(row["shard"]).name, row["key"]): row for row in table}
    assert by_key[("b.tar", "00000101")]["status"] == "decode_error"
    assert by_key[("b.tar", "00000102")]["status"] == "missing_text"
    assert by_key[("b.tar", "00000103")]["status"] == "decode_error"
    assert by_key[("a.tar", "00000003")]["uid"] == f"{3:032x}"
    ok_rows = [row for row in table if row["status"] == "ok"]
    assert len(ok_rows) == 13 == stats["status_counts"]["ok"]
    assert all(row["mimic_score"] is not None and row["clip_score"] is not None for row in ok_rows)
    assert all(row["mimic_score"] is None for row in table if row["status"] != "ok")
    assert all(row["error"] for row in table if row["status"] != "ok")
    # relative weights average to 1 within each batch
    batches = {}
    for row in ok_rows:
        batches.setdefault((row["shard"], row["step"]), []).append(row["mimic_weight"])
    for weights in batches.values():
        assert sum(weights) == pytest.approx(len(weights), rel=1e-5)


def test_same_inputs_and_seed_give_the_same_scores(shard_dir, tiny_config, reference_checkpoint, tmp_path):
    for name in ("one", "two"):
        assert invoke(score_args([shard_dir], tiny_config, reference_checkpoint, tmp_path / name)).exit_code == 0
    assert read_scores(tmp_path / "one").equals(read_scores(tmp_path / "two"))
    assert invoke(score_args([shard_dir], tiny_config, reference_checkpoint, tmp_path / "seed", "--seed", "7")).exit_code == 0
    assert read_scores(tmp_path / "seed").column("mimic_score") != read_scores(tmp_path / "one").column("mimic_score")


def test_workers_do_not_change_the_table(shard_dir, tiny_config, reference_checkpoint, tmp_path):
    assert invoke(score_args([shard_dir], tiny_config, reference_checkpoint, tmp_path / "w0")).exit_code == 0
    args = score_args([shard_dir], tiny_config, reference_checkpoint, tmp_path / "w2")
    args[args.index("--workers") + 1] = "2"
    assert invoke(args).exit_code == 0
    assert read_scores(tmp_path / "w0").equals(read_scores(tmp_path / "w2"))


def test_parts_do_not_depend_on_workers_or_work_unit_size(shard_dir, tiny_config, reference_checkpoint, tmp_path):
    from mimicfilter.mimic.models import ModelSpec
    from mimicfilter.pipeline.config import ScoreConfig
    from mimicfilter.pipeline.run import run_score

    shards = tuple(str(path) for path in sorted(shard_dir.glob("*.tar")))
    model = ModelSpec(str(tiny_config), str(reference_checkpoint))
    parts = {}
    for workers, chunk_size in [(0, 64), (2, 1), (2, 3), (1, 5)]:
        out = tmp_path / f"w{workers}-c{chunk_size}"
        run_score(ScoreConfig(shards, out, model, batch_size=4, workers=workers, chunk_size=chunk_size))
        parts[(workers, chunk_size)] = {path.name: pq.read_table(path) for path in (out / "scores").glob("*.parquet")}
    first = parts[(0, 64)]
    assert len(first) == 3
    for other in parts.values():
        assert other.keys() == first.keys()
        assert all(other[name].equals(first[name]) for name in first)


def test_decoder_gpu_on_the_cpu_is_a_one_line_usage_error(shard_dir, tiny_config, reference_checkpoint, tmp_path):
    result = invoke(score_args([shard_dir], tiny_config, reference_checkpoint, tmp_path / "run", "--decoder", "gpu",
                               "--device", "cpu"))
    assert result.exit_code == 2
    assert "--decoder gpu" in result.output and "hint" in result.output and len(result.output.strip().splitlines()) == 1


def test_the_decoder_is_part_of_the_fingerprint(shard_dir, tiny_config, reference_checkpoint, tmp_path):
    out = tmp_path / "run"
    assert invoke(score_args([shard_dir], tiny_config, reference_checkpoint, out)).exit_code == 0
    other = invoke(score_args([shard_dir], tiny_config, reference_checkpoint, out, "--decoder", "pil"))
    assert other.exit_code == 2 and "different" in other.output


def test_rerunning_skips_finished_parts_and_a_different_command_is_refused(shard_dir, tiny_config, reference_checkpoint, tmp_path):
    out = tmp_path / "run"
    assert invoke(score_args([shard_dir], tiny_config, reference_checkpoint, out)).exit_code == 0
    first = read_scores(out)
    again = invoke(score_args([shard_dir], tiny_config, reference_checkpoint, out, "--json"))
    assert json.loads(again.stdout)["shards_resumed"] == 3
    assert read_scores(out).equals(first)

    changed = invoke(score_args([shard_dir], tiny_config, reference_checkpoint, out, "--seed", "3"))
    assert changed.exit_code == 2
    assert "different command" in changed.stderr and "seed" in changed.stderr and len(changed.stderr.strip().splitlines()) == 1
    replaced = invoke(score_args([shard_dir], tiny_config, reference_checkpoint, out, "--seed", "3", "--overwrite"))
    assert replaced.exit_code == 0
    assert not read_scores(out).equals(first)


def test_truncated_and_non_tar_shards_keep_their_rows(tiny_config, reference_checkpoint, tmp_path):
    good = write_tar(tmp_path / "good.tar", image_text_samples(6))
    data = good.read_bytes()
    truncated = tmp_path / "truncated.tar"
    truncated.write_bytes(data[: len(data) // 2 + 100])
    not_tar = tmp_path / "garbage.tar"
    not_tar.write_bytes(os.urandom(3000))
    out = tmp_path / "run"
    result = invoke(score_args([truncated, not_tar, good], tiny_config, reference_checkpoint, out))
    assert result.exit_code == 0, result.output
    rows = read_scores(out).to_pylist()
    truncated_rows = [row for row in rows if row["shard"].endswith("truncated.tar")]
    assert truncated_rows[-1]["status"] == "shard_error" and "truncat" in truncated_rows[-1]["error"].lower()
    assert sum(row["status"] == "shard_error" for row in truncated_rows) == 1
    assert any(row["status"] == "ok" for row in truncated_rows)
    garbage_rows = [row for row in rows if row["shard"].endswith("garbage.tar")]
    assert [row["status"] for row in garbage_rows] == ["shard_error"]
    assert sum(row["shard"].endswith("good.tar") and row["status"] == "ok" for row in rows) == 6


@pytest.mark.slow
def test_killed_run_resumes_to_the_uninterrupted_table(tiny_config, reference_checkpoint, tmp_path):
    shards = [write_tar(tmp_path / f"{i:03d}.tar", image_text_samples(24, start=100 * i)) for i in range(16)]
    spec = tmp_path / "shards.txt"
    spec.write_text("\n".join(map(str, shards)))
    baseline = tmp_path / "baseline"
    assert invoke(score_args([f"@{spec}"], tiny_config, reference_checkpoint, baseline)).exit_code == 0

    out = tmp_path / "killed"
    command = [sys.executable, "-m", "mimicfilter", *score_args([f"@{spec}"], tiny_config, reference_checkpoint, out)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and not list((out / "scores").glob("[!.]*.parquet")):
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (out / "_SUCCESS").exists(), "the run finished before it could be killed"
    done_before = len(list((out / "scores").glob("[!.]*.parquet")))
    assert 1 <= done_before < len(shards)

    resumed = invoke(score_args([f"@{spec}"], tiny_config, reference_checkpoint, out, "--json"))
    assert resumed.exit_code == 0
    assert json.loads(resumed.stdout)["shards_resumed"] >= done_before
    assert read_scores(out).equals(read_scores(baseline))


@pytest.mark.parametrize(
    "change, message",
    [
        (["--model", "NoSuchNet-7"], "unknown model"),
        (["--reference", "missing.pt"], "does not exist"),
        (["--reference", "notatag"], "is not a checkpoint file"),
        (["--mimic-layers", "no.such.*"], "matches no parameter"),
        (["--batch-size", "1"], "at least 2"),
        (["--device", "cuda:7"], "CUDA"),
    ],
)
def test_usage_errors_exit_2_with_one_line(shard_dir, tiny_config, reference_checkpoint, tmp_path, change, message):
    args = score_args([shard_dir], tiny_config, reference_checkpoint, tmp_path / "run")
    option = change[0]
    if option in args:
        args[args.index(option) + 1] = change[1]
    else:
        args += change
    result = invoke(args)
    assert result.exit_code == 2
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.output


def test_builtin_architecture_with_unknown_tag_is_a_usage_error(shard_dir, tmp_path):
    result = invoke(["score", str(shard_dir), "--model", "ViT-B-32", "--reference", "no-such-tag", "--out", str(tmp_path / "r")])
    assert result.exit_code == 2 and "known tags" in result.stderr and "openai" in result.stderr


def test_shape_mismatch_names_both_shapes(shard_dir, tiny_config, reference_checkpoint, tmp_path):
    other = dict(TINY_CLIP_CONFIG, embed_dim=8)
    proxy = write_random_checkpoint(tmp_path / "proxy.pt", other)
    result = invoke(score_args([shard_dir], tiny_config, reference_checkpoint, tmp_path / "run", "--proxy", str(proxy)))
    assert result.exit_code == 2
    assert "[32, 8]" in result.stderr.replace("torch.Size(", "").replace(")", "") or "(32, 8)" in result.stderr
    assert "visual.proj" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_full_pickle_checkpoint_needs_trust(shard_dir, tiny_config, tmp_path):
    import torch

    from helpers import build_tiny_clip

    pickle_path = tmp_path / "full.pt"
    torch.save(build_tiny_clip(), pickle_path)  # a whole pickled module, not a state dict
    result = invoke(score_args([shard_dir], tiny_config, pickle_path, tmp_path / "run"))
    assert result.exit_code == 2 and "--trust-checkpoint" in result.stderr


def test_empty_input_is_a_usage_error(tiny_config, reference_checkpoint, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    result = invoke(score_args([empty], tiny_config, reference_checkpoint, tmp_path / "run"))
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1


def test_stdin_shard_list_and_version(shard_dir, tiny_config, reference_checkpoint, tmp_path):
    listing = "\n".join(str(path) for path in sorted(shard_dir.glob("*.tar")))
    result = CliRunner().invoke(cli, score_args(["-"], tiny_config, reference_checkpoint, tmp_path / "run"), input=listing)
    assert result.exit_code == 0, result.output
    assert len(list((tmp_path / "run" / "scores").glob("*.parquet"))) == 3
    version = invoke(["--version"])
    assert version.exit_code == 0 and "mimicfilter" in version.output


def test_the_program_skips_only_the_teardown(shard_dir, tiny_config, reference_checkpoint, tmp_path):
    """``python -m mimicfilter`` exits without the interpreter's teardown once torch is loaded: exit
    handlers still run after the output, the output is whole, the status is the command's."""
    program = ("import atexit, sys; atexit.register(lambda: print('exit handler ran', flush=True)); "
               "sys.argv[0] = 'mimicfilter'; from mimicfilter_cli.main import main; main()")
    args = score_args(sorted(shard_dir.glob("*.tar")), tiny_config, reference_checkpoint, tmp_path / "run", "--json")
    done = subprocess.run([sys.executable, "-c", program, *args], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    output, handler = done.stdout.rsplit("}", 1)
    assert json.loads(output + "}")["rows"] == 16 and handler.strip() == "exit handler ran"
    args[args.index("--reference") + 1] = str(tmp_path / "missing.pt")
    failed = subprocess.run([sys.executable, "-m", "mimicfilter", *args], capture_output=True, text=True, timeout=300)
    assert failed.returncode == 2 and "does not exist" in failed.stderr and "Traceback" not in failed.stderr


def test_help_has_examples():
    for args in (["--help"], ["score", "--help"]):
        assert "Example:" in invoke(args).output
