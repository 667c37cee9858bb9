"""Issue 17, red-team item 11: `filter` and `report` killed (SIGKILL) again and again never leave
outputs of two runs side by side. Each loop alternates two different commands on one output
directory, kills 20 of them (half once their staging directory exists, i.e. while they write; half
at a random moment), and checks after every kill that what a reader finds is one complete run, and at
the end that no killed run's scratch (DuckDB spill) directory is left behind."""

import hashlib
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from helpers import image_text_run

from mimicfilter.store import owners, scratch, swap

KILLS = 20


def filter_mixed(out: Path) -> str | None:
    """Why the filter outputs in ``out`` are not one run's, or None."""
    summary = json.loads((out / "summary.json").read_text())
    run_id = summary["run_id"]
    manifest = pq.read_table(out / "manifest.parquet")
    index = json.loads((out / "shards" / "curated.wids.json").read_text())
    problems = [
        (out / "_SUCCESS").read_text().strip() != run_id and "_SUCCESS",
        pq.read_schema(out / "manifest.parquet").metadata[b"mimicfilter_run_id"].decode() != run_id and "manifest",
        sorted(os.listdir(out)) != summary["files"] and f"files {sorted(os.listdir(out))}",
        sum(manifest.column("kept").to_pylist()) != summary["kept"] and "kept count",
        sum(entry["nsamples"] for entry in index["shardlist"]) != summary["kept"] and "index",
        sorted(os.listdir(out / "shards")) != sorted([entry["url"] for entry in index["shardlist"]]
                                                      + ["curated.wids.json"]) and "shard files",
        [entry["md5sum"] for entry in index["shardlist"]] != [s["md5sum"] for s in summary["curated_shards"]] and "md5",
        any(hashlib.md5((out / "shards" / entry["url"]).read_bytes()).hexdigest() != entry["md5sum"]
            for entry in index["shardlist"]) and "shard bytes",
    ]
    return ", ".join(problem for problem in problems if problem) or None


def report_mixed(out: Path) -> str | None:
    """Why the report in ``out`` is not one run's, or None."""
    summary = json.loads((out / "report.json").read_text())
    page = (out / "index.html").read_text()
    quality = summary["headline"]["value"]
    thumbnails = {card["thumbnail"] for cards in summary.get("sheets", {}).values() for card in cards if card["thumbnail"]}
    expected = {"index.html", "report.json", "_SUCCESS", *summary["images"].values(), *({"thumbs"} if thumbnails else ())}
    shown = {f"thumbs/{name}" for name in os.listdir(out / "thumbs")} if (out / "thumbs").is_dir() else set()
    problems = [
        (out / "_SUCCESS").read_text().strip() != summary["run_id"] and "_SUCCESS",
        f"(report {summary['run_id']})" not in page and "index.html",
        f"{100 * quality:.1f}%" not in page and "quality on the page",
        set(os.listdir(out)) != expected and "files",
        shown != thumbnails and "thumbnails",
    ]
    return ", ".join(problem for problem in problems if problem) or None


def staging_exists(out: Path) -> bool:
    return any(name.startswith(f".{out.name}.staging-") for name in os.listdir(out.parent))


def kill_loop(commands: list[list[str]], out: Path, mixed, seed: int = 17) -> dict:
    """Run ``commands`` alternately, killing most of them; returns counts, fails on any mixed state or
    a scratch directory left once the last run has finished."""
    rng = random.Random(seed)
    temporary = out.parent / "tmp"  # the runs' TMPDIR, where their DuckDB spill directories go
    temporary.mkdir()
    env = {**os.environ, "TMPDIR": str(temporary)}
    started = time.monotonic()
    subprocess.run(commands[0], check=True, capture_output=True, timeout=300, env=env)
    full = time.monotonic() - started
    assert mixed(out) is None
    counts = {"killed_while_writing": 0, "killed_at_random": 0, "finished": 0, "mixed": []}
    for number in range(KILLS):
        process = subprocess.Popen(commands[number % 2 - 1], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                   env=env)
        if number % 2:  # wait until it writes, then kill it a little later
            deadline = time.monotonic() + 120
            while not staging_exists(out) and process.poll() is None and time.monotonic() < deadline:
                time.sleep(0.002)
            time.sleep(rng.uniform(0, 0.15 * full))
            kind = "killed_while_writing"
        else:
            time.sleep(rng.uniform(0.05, 0.6) * full)  # before the end even when a warm run is faster than the first
            kind = "killed_at_random"
        if process.poll() is None:
            process.kill()
            counts[kind] += 1
        else:
            counts["finished"] += 1
        process.wait()
        assert out.is_dir(), f"kill {number}: the outputs are gone"
        if (problem := mixed(out)) is not None:
            counts["mixed"].append(f"kill {number}: {problem}")
    subprocess.run(commands[1], check=True, capture_output=True, timeout=300, env=env)  # cleans up after the killed ones
    assert mixed(out) is None and not staging_exists(out)
    assert list(temporary.iterdir()) == [], "a killed run's scratch directory outlived the next run"
    return counts


@pytest.mark.slow
def test_filter_killed_20_times_never_mixes_two_runs(tmp_path):
    run, _ = image_text_run(tmp_path, shards=4, per_shard=60)
    out = tmp_path / "curated"
    base = [sys.executable, "-m", "mimicfilter", "filter", str(run), "--out", str(out), "--write-shards",
            str(out / "shards"), "--maxcount", "25"]
    counts = kill_loop([base + ["--top-frac", "mimic_score=0.3"], base + ["--top-frac", "mimic_score=0.7"]], out,
                       filter_mixed)
    assert counts["mixed"] == []
    assert counts["killed_while_writing"] + counts["killed_at_random"] >= KILLS * 3 // 4, counts


@pytest.mark.slow
def test_report_killed_20_times_never_mixes_two_runs(tmp_path):
    run, _ = image_text_run(tmp_path, shards=2, per_shard=40)
    out = tmp_path / "report"
    base = [sys.executable, "-m", "mimicfilter", "report", str(run), "--out", str(out), "--sheet-size", "6"]
    counts = kill_loop([base + ["--binarize", "sign"], base + ["--binarize", "gmm"]], out, report_mixed)
    assert counts["mixed"] == []
    assert counts["killed_while_writing"] + counts["killed_at_random"] >= KILLS * 3 // 4, counts


def _dead_pid() -> int:
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                              check=True)
    return int(finished.stdout)


def test_a_run_removes_only_the_scratch_of_killed_runs_of_this_user_on_this_host(tmp_path):
    host = owners.host_tag()
    killed = tmp_path / f"mimicfilter-duckdb-{_dead_pid()}@{host}-ab_c12x9"
    (killed / "duckdb_temp_storage").mkdir(parents=True)
    (killed / "duckdb_temp_storage" / "spill.tmp").write_bytes(b"x" * 100)
    live = tmp_path / f"mimicfilter-report-{os.getppid()}@{host}-k2j4h5l6"  # a process that is still running
    elsewhere = tmp_path / f"mimicfilter-duckdb-{_dead_pid()}@another.host-q1w2e3r4"  # a TMPDIR shared by hosts
    unrelated = tmp_path / "mimicfilter-duckdb-0qa8c1b2"  # no owner in the name (an older version's)
    for directory in (live, elsewhere, unrelated):
        directory.mkdir()
    assert scratch.sweep_stale(tmp_path) == [killed]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in (live, elsewhere, unrelated))


def test_a_scratch_directory_names_its_owner_and_is_removed_on_exit(tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr("tempfile.tempdir", None)
    with scratch.scratch_directory("duckdb") as path:
        assert Path(path).parent == tmp_path and Path(path).is_dir()
        assert scratch._owner(Path(path).name) == (owners.host_tag(), os.getpid())
        assert scratch.sweep_stale(tmp_path) == []  # its own, live
    assert list(tmp_path.iterdir()) == []


def test_an_output_directory_recovers_only_the_leftovers_of_killed_runs_on_this_host(tmp_path):
    host, dead = owners.host_tag(), _dead_pid()
    target = tmp_path / "out"
    target.mkdir()
    killed = tmp_path / f".out.staging-{dead}@{host}-11ee11ee"
    older = tmp_path / f".out.old-{dead}-22dd22dd"  # an older version's name: the PID alone
    live = tmp_path / f".out.staging-{os.getppid()}@{host}-33cc33cc"
    elsewhere = tmp_path / f".out.staging-{dead}@another.host-44bb44bb"  # an output on a shared filesystem
    for directory in (killed, older, live, elsewhere):
        directory.mkdir()
    with swap.replaced_directory(target, lambda name: False, "--out") as staging:
        assert staging.name.startswith(f".out.staging-{os.getpid()}@{host}-")
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in (target, live, elsewhere, staging))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in (target, live, elsewhere))
