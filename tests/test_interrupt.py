"""Ctrl-C: `score`, `filter` and `report` interrupted while they work exit 130 with one line on
stderr, leave no half-written output, and the same command run again gives the table of an
uninterrupted run.

Each command runs as a process in its own session and gets SIGINT on its whole process group, as a
terminal's Ctrl-C sends it (decode workers included), once it has started its work: polled for
with a deadline, never slept for.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from helpers import image_text_run, image_text_samples, score_row, write_score_run, write_tar

from mimicfilter.store.parts import read_scores
from mimicfilter_cli.main import cli

INTERRUPTED = "Interrupted: finished parts are kept; re-run the same command to resume."


def default_sigint() -> None:
    """Ctrl-C's default in the child: a test run in the background (``make test &``) inherits SIGINT
    ignored, and Python then leaves it ignored."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def interrupt_once_working(args: list[str], working: Callable[[], bool], env: dict | None = None) -> str:
    """Run ``mimicfilter ARGS``, Ctrl-C it as soon as ``working()``; its stderr, checked for exit 130."""
    process = subprocess.Popen([sys.executable, "-m", "mimicfilter", *map(str, args)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True, env=env, start_new_session=True,
                               preexec_fn=default_sigint)
    deadline = time.monotonic() + 240
    try:
        while not working():
            assert process.poll() is None, f"it ended (exit {process.returncode}) before it could be interrupted"
            assert time.monotonic() < deadline, "it never started working"
            time.sleep(0.005)
        os.killpg(process.pid, signal.SIGINT)
        stderr = process.communicate(timeout=120)[1]
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    assert process.returncode == 130, stderr
    assert stderr.strip() == INTERRUPTED, stderr  # one line, no traceback (not even a worker's)
    return stderr


def invoke(*args):
    result = CliRunner().invoke(cli, [str(arg) for arg in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


def leftovers(out: Path) -> list[str]:
    """Staging directories and temp files of an interrupted write."""
    return [name for name in os.listdir(out.parent) if name.startswith(f".{out.name}.")]


@pytest.mark.slow
def test_score_interrupted_exits_130_and_resumes_to_the_same_table(tmp_path, tiny_config, reference_checkpoint):
    shards = [write_tar(tmp_path / f"{i:03d}.tar", image_text_samples(16, start=100 * i)) for i in range(8)]
    listing = tmp_path / "shards.txt"
    listing.write_text("\n".join(map(str, shards)))

    def args(out):
        return ["score", f"@{listing}", "--model", tiny_config, "--reference", reference_checkpoint, "--out", out,
                "--batch-size", "8", "--workers", "1", "--quiet", "--train", "none"]

    invoke(*args(tmp_path / "whole"))
    out = tmp_path / "interrupted"
    interrupt_once_working(args(out), lambda: any((out / "scores").glob("[!.]*.parquet")))
    assert not (out / "_SUCCESS").exists()
    done = sorted(path.name for path in (out / "scores").iterdir())
    assert 1 <= len(done) < len(shards) and all(name.endswith(".parquet") for name in done)  # no temp part left
    resumed = json.loads(invoke(*args(out), "--json").stdout)
    assert resumed["shards_resumed"] >= len(done)
    assert read_scores(out).equals(read_scores(tmp_path / "whole"))


@pytest.mark.slow
def test_filter_interrupted_exits_130_and_runs_again_to_the_same_manifest(tmp_path):
    rows = [score_row("pool/s.tar", f"{i:06d}", i, epoch, float((i * 7919 + epoch * 104729) % 2000 - 700))
            for i in range(20_000) for epoch in range(3)]
    run = write_score_run(tmp_path / "run", rows, ["pool/s.tar"], epochs=3)
    spill = tmp_path / "tmp"  # where filter's DuckDB spills: made when its work starts
    spill.mkdir()

    def args(out):
        return ["filter", run, "--out", out, "--keys", out / "keys.tsv"]

    invoke(*args(tmp_path / "whole"))
    out = tmp_path / "interrupted"
    interrupt_once_working(args(out), lambda: any(spill.iterdir()), env={**os.environ, "TMPDIR": str(spill)})
    assert not out.exists() and leftovers(out) == []
    invoke(*args(out))
    assert pq.read_table(out / "manifest.parquet").equals(pq.read_table(tmp_path / "whole" / "manifest.parquet"))
    assert (out / "keys.tsv").read_text() == (tmp_path / "whole" / "keys.tsv").read_text()


@pytest.mark.slow
def test_report_interrupted_exits_130_and_runs_again_to_the_same_numbers(tmp_path):
    run, _ = image_text_run(tmp_path, shards=4, per_shard=50, epochs=2)

    def args(out):
        return ["report", run, "--out", out, "--sheet-size", "12"]

    invoke(*args(tmp_path / "whole"))
    out = tmp_path / "interrupted"
    interrupt_once_working(args(out), lambda: bool(leftovers(out)))  # its staging directory: the page is being made
    assert not out.exists() and leftovers(out) == []
    invoke(*args(out))

    def numbers(report: Path) -> dict:
        summary = json.loads((report / "report.json").read_text())
        return {key: value for key, value in summary.items() if key not in ("run_id", "created_at")}

    assert numbers(out) == numbers(tmp_path / "whole")
    assert sorted(os.listdir(out)) == sorted(os.listdir(tmp_path / "whole"))
