"""The unscored side streamed: one part per input file on every executor (this process, forked
workers, --rank/--world-size, Ray) with the same table, and a run killed with SIGKILL — while
fitting, while predicting — resumes to the identical table, each part written exactly once."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from mimicfilter.store.parts import part_paths, read_scores
from mimicfilter_cli.main import cli

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from bench_extrapolate_scale import ARRAY, write_pool  # noqa: E402  (the benchmark's synthetic pool, small)

COLUMNS = ["shard", "key", "uid", "index", "status", "mimic_score", "mimic_weight", "extrapolated"]


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """2,000 scored samples in 4 shards and 20,000 unscored in 40 npz files, 32-d."""
    workdir = tmp_path_factory.mktemp("synthetic")
    write_pool(workdir, scored=2000, unscored=20_000, dim=32, per_file=500)
    return workdir


def args(workdir, out, *extra):
    return ["extrapolate", "--scored", workdir / "scored", "--features-from", workdir / "pool", "--embedding-column",
            ARRAY, "--index", "ivf-sq8", "--k", "5,10", "--out", out, "--json", *extra]


def run(*arguments):
    result = CliRunner().invoke(cli, [str(a) for a in arguments], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def table(out):
    return read_scores(out, columns=COLUMNS).sort_by([("shard", "ascending"), ("index", "ascending")])


@pytest.fixture(scope="module")
def reference(synthetic, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference") / "run"
    stats = run(*args(synthetic, out))
    assert stats["units"] == 48 and len(part_paths(out)) == 48  # 44 npz files + the 4 scored shards and (out / "_SUCCESS").exists()
    assert stats["index"]["kind"] == "ivf-sq8" and stats["index"]["recall"] >= 0.95
    assert stats["extrapolated_samples"] == 20_000 and stats["overlap_samples"] == 2000 and stats["rows"] == 22_000
    return out


def test_workers_and_ranks_give_the_same_table(synthetic, reference, tmp_path):
    expected = table(reference)
    workers = tmp_path / "workers"
    assert run(*args(synthetic, workers, "--workers", "2"))["executor"] == "local (2 workers)"
    assert table(workers).equals(expected)
    ranks = tmp_path / "ranks"
    first = run(*args(synthetic, ranks, "--rank", "0", "--world-size", "2"))
    assert first["units_this_process"] == 24 and first["units_missing"] == 24 and not (ranks / "_SUCCESS").exists()
    second = run(*args(synthetic, ranks, "--rank", "1", "--world-size", "2"))
    assert second["resumed_fit"] is True  # the second rank loads the first one's extrapolator
    assert (ranks / "_SUCCESS").exists() and table(ranks).equals(expected)
    assert sorted(path.name for path in (ranks / "ranks").iterdir()) == [
        "rank-00000-of-00002.json", "rank-00001-of-00002.json"]


def test_fit_only_then_ranks(synthetic, reference, tmp_path):
    out = tmp_path / "fit-first"
    stats = run(*args(synthetic, out, "--fit-only"))
    assert stats["parts_written_now"] == 0 and stats["units_missing"] == 48 and (out / "extrapolator" / "fit.json").exists()
    assert not part_paths(out) and not (out / "_SUCCESS").exists()
    assert run(*args(synthetic, out))["resumed_fit"] is True
    assert table(out).equals(table(reference))


def command_line(workdir, out):
    return [sys.executable, "-m", "mimicfilter", *map(str, args(workdir, out)), "--quiet"]


def kill_when(process, ready, timeout=300):
    deadline = time.monotonic() + timeout
    while not ready() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    assert process.poll() is None, "the run finished before it could be killed"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()


@pytest.mark.slow
def test_killed_runs_resume_to_the_identical_table(synthetic, reference, tmp_path):
    out = tmp_path / "killed"
    # killed once the run is open, before its extrapolator is published (the fit takes a fraction of a
    # second here, so waiting for its staging folder races with the whole run): nothing is published
    process = subprocess.Popen(command_line(synthetic, out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    kill_when(process, lambda: (out / "run.json").exists() or any(out.glob(".extrapolator.*")) if out.exists() else False)
    published = out / "extrapolator"
    if published.exists():  # the kill came late (a loaded machine): then the extrapolator is whole, never a part
        assert (published / "fit.json").is_file() and (published / "predictor.pt").is_file()
    else:
        assert not part_paths(out)
    # killed while predicting: some parts written, the rest not
    process = subprocess.Popen(command_line(synthetic, out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    kill_when(process, lambda: len(part_paths(out)) >= 5)
    written = {path.name: path.stat().st_mtime_ns for path in part_paths(out)}
    assert 5 <= len(written) < 48 and not (out / "_SUCCESS").exists()
    finished = subprocess.run(command_line(synthetic, out), capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr
    assert (out / "_SUCCESS").exists() and table(out).equals(table(reference))
    assert all(path.stat().st_mtime_ns == written[path.name] for path in part_paths(out) if path.name in written)
    stats = json.loads((out / "stats.json").read_text())
    assert stats["resumed_fit"] is True and stats["parts_written_now"] == 48 - len(written)


@pytest.mark.slow
def test_ray_gives_the_same_table(synthetic, reference, tmp_path):
    pytest.importorskip("ray")
    out = tmp_path / "ray"
    stats = run(*args(synthetic, out, "--ray", "--ray-actors", "2"))
    assert stats["executor"] == "ray (2 actors)" and table(out).equals(table(reference))
