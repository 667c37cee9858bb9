"""What a killed run leaves in its run directory, and what the next run makes of it: a run killed
before its run.json resumes; temp files and staging folders of killed processes on this host are
removed by the next run (never a live process's or another host's); a killed `--overwrite` never
leaves a finished-looking run without its results, nor a fit of the earlier command to be loaded;
a dedup killed between its _SUCCESS and the buckets' removal has them removed by the next run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import score_row, write_score_run
from test_dedup_command import planted, uid_run, write_features

from mimicfilter.errors import MimicfilterError
from mimicfilter.store import owners, rundir
from mimicfilter.store.atomic import atomic_write_json
from mimicfilter.store.parts import read_scores
from mimicfilter.store.rundir import prepare_run_dir, unfinished_run
from mimicfilter_cli.main import cli

FINGERPRINT = {"format": 1, "kind": "test"}


class Killed(BaseException):
    """Stands for SIGKILL at this point: nothing after it runs, and nothing catches it."""


def kill(*_, **__):
    raise Killed


def dead_pid() -> int:
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                              check=True)
    return int(finished.stdout)


def left_by(pid: int, name: str, host: str | None = None, token: str = "a1b2c3d4") -> str:
    return f".{name}.{pid}@{host or owners.host_tag()}-{token}.tmp"


def test_a_temp_file_names_its_writer(tmp_path):
    written = []
    original = os.replace
    try:
        os.replace = lambda source, target: (written.append(Path(source).name), original(source, target))[1]
        atomic_write_json(tmp_path / "run.json", {})
    finally:
        os.replace = original
    assert written[0].startswith(f".run.json.{owners.owner_tag()}-") and written[0].endswith(".tmp")
    assert not owners.stale_leftover(written[0])  # this process runs
    assert owners.stale_leftover(left_by(dead_pid(), "run.json"))


def test_a_run_killed_before_its_run_json_resumes(tmp_path):
    out = tmp_path / "run"
    (out / "scores").mkdir(parents=True)  # what a kill between the skeleton and run.json leaves
    (out / left_by(dead_pid(), "run.json")).write_bytes(b'{"half"')
    assert prepare_run_dir(out, FINGERPRINT, {}, overwrite=False) is False
    assert sorted(p.name for p in out.iterdir()) == ["run.json", "scores"]
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")  # a directory of something else is still refused
    with pytest.raises(MimicfilterError, match="not empty and holds no run.json"):
        prepare_run_dir(tmp_path / "other", FINGERPRINT, {}, overwrite=False)


def test_the_next_run_removes_only_what_killed_processes_of_this_host_left(tmp_path):
    out = tmp_path / "run"
    prepare_run_dir(out, FINGERPRINT, {}, overwrite=False)
    dead = dead_pid()
    stale = [out / "scores" / left_by(dead, "shard-0.parquet"), out / left_by(dead, "stats.json"),
             out / left_by(dead, "extrapolator"), out / "buckets" / left_by(dead, "unit-0")]
    kept = [out / "scores" / left_by(os.getppid(), "shard-1.parquet"),  # a process that runs
            out / "scores" / left_by(dead, "shard-2.parquet", host="another.host"),  # a shared filesystem
            out / "scores" / ".shard-3.parquet.ab12cd.tmp"]  # no owner in the name (an older version's)
    for path in stale + kept:
        path.parent.mkdir(parents=True, exist_ok=True)
        if "extrapolator" in path.name or "unit" in path.name:
            path.mkdir()
            (path / "fit.json").write_text("{}")
        else:
            path.write_bytes(b"half")
    assert prepare_run_dir(out, FINGERPRINT, {}, overwrite=False) is True
    assert [path for path in stale if path.exists()] == []
    assert all(path.exists() for path in kept)


def test_an_overwrite_killed_while_it_removes_the_parts_leaves_no_finished_run(tmp_path, monkeypatch):
    out = tmp_path / "run"
    write_score_run(out, [score_row("/data/s.tar", f"k{i}", i, 0, float(i)) for i in range(4)], ["/data/s.tar"])
    assert (out / "_SUCCESS").exists() and unfinished_run(out) is None

    monkeypatch.setattr(rundir, "remove_tree", kill)
    with pytest.raises(Killed):
        prepare_run_dir(out, {"format": 2}, {}, overwrite=True)
    assert not (out / "_SUCCESS").exists() and unfinished_run(out) is not None


def _dedup(*arguments):
    return CliRunner().invoke(cli, ["dedup", *map(str, arguments), "--json", "--cell-size", "64"])


@pytest.fixture(scope="module")
def features(tmp_path_factory):
    folder = tmp_path_factory.mktemp("leftover-features")
    vectors, _, _ = planted(400, 20)
    uid_run(folder / "run", write_features(folder / "files", vectors, per_file=200))
    return folder


def test_a_dedup_killed_after_finishing_has_its_buckets_removed_by_the_next_run(features, tmp_path, monkeypatch):
    from mimicfilter.dedup import run as dedup_run

    out = tmp_path / "dedup"
    args = [features / "run", "--features-from", features / "files", "--embedding-column", "image,text", "--out", out]
    monkeypatch.setattr(dedup_run, "remove_buckets", kill)
    with pytest.raises(Killed):
        CliRunner().invoke(cli, ["dedup", *map(str, args), "--cell-size", "64"], catch_exceptions=False)
    assert (out / "_SUCCESS").exists() and (out / "buckets").is_dir()
    monkeypatch.undo()
    again = _dedup(*args)
    assert again.exit_code == 0, again.output
    assert not (out / "buckets").exists() and not (out / "ranges.json").exists()


def test_a_dedup_overwrite_killed_before_its_run_opens_leaves_no_finished_run(features, tmp_path, monkeypatch):
    from mimicfilter.dedup import run as dedup_run

    out = tmp_path / "dedup"
    args = [features / "run", "--features-from", features / "files", "--embedding-column", "image,text", "--out", out]
    assert _dedup(*args).exit_code == 0 and (out / "_SUCCESS").exists()
    monkeypatch.setattr(dedup_run.RunDirectory, "open", kill)
    with pytest.raises(Killed):
        CliRunner().invoke(cli, ["dedup", *map(str, args), "--max-threshold", "0.2", "--cell-size", "64",
                                 "--overwrite"], catch_exceptions=False)
    assert not (out / "edges").exists()
    assert not (out / "_SUCCESS").exists()  # filter --dedup refuses it, instead of reading "no duplicates"


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    from bench_extrapolate_scale import write_pool

    workdir = tmp_path_factory.mktemp("leftover-synthetic")
    write_pool(workdir, scored=400, unscored=1200, dim=16, per_file=300)
    return workdir


def _extrapolate(workdir, out, *extra):
    from bench_extrapolate_scale import ARRAY

    result = CliRunner().invoke(cli, [str(a) for a in ["extrapolate", "--scored", workdir / "scored", "--features-from",
                                                       workdir / "pool", "--embedding-column", ARRAY, "--out", out,
                                                       "--json", *extra]])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_an_extrapolator_of_another_command_is_never_loaded(synthetic, tmp_path, monkeypatch):
    from mimicfilter.extrapolate import saved

    fresh, out = tmp_path / "fresh", tmp_path / "out"
    _extrapolate(synthetic, fresh, "--k", "20")
    _extrapolate(synthetic, out, "--k", "3")
    # an --overwrite killed as it removes the earlier fit: run.json still names the earlier command
    monkeypatch.setattr(saved, "remove", kill)
    with pytest.raises(Killed):
        CliRunner().invoke(cli, [str(a) for a in ["extrapolate", "--scored", synthetic / "scored", "--features-from",
                                                  synthetic / "pool", "--embedding-column", "l14_img", "--out", out,
                                                  "--k", "20", "--overwrite"]], catch_exceptions=False)
    monkeypatch.undo()
    assert json.loads((out / "run.json").read_text())["fingerprint"]["k_candidates"] == [3]
    # what older versions left when killed there: this command's run.json beside the earlier fit
    for name in ("_SUCCESS", "stats.json"):
        (out / name).unlink()
    for part in (out / "scores").iterdir():
        part.unlink()
    (out / "run.json").write_text((fresh / "run.json").read_text())
    stats = _extrapolate(synthetic, out, "--k", "20")
    assert stats["resumed_fit"] is False and stats["k"] == json.loads((fresh / "stats.json").read_text())["k"]
    columns = ["shard", "index", "mimic_score", "extrapolated"]
    assert read_scores(out, columns=columns).equals(read_scores(fresh, columns=columns))
    assert np.isfinite(stats["heldout_spearman"])
