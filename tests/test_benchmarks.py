"""The benchmark scripts still import, answer --help, do no work at import, and each has a make target.

Nothing else runs them (they take minutes to hours); this keeps a rename in the package from
silently breaking them. Every module is imported the way a script sees its neighbours: with
benchmarks/ first on sys.path (``python benchmarks/NAME.py`` puts it there).
"""

from __future__ import annotations

import fcntl
import importlib.util
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "benchmarks"
MODULES = sorted(BENCHMARKS.rglob("*.py"))
SCRIPTS = [path for path in MODULES if 'if __name__ == "__main__":' in path.read_text()]


def make_target(script: Path) -> str:
    """`make bench-NAME` for benchmarks/bench_NAME.py, benchmarks/NAME.py and benchmarks/gpu/bench_NAME.py."""
    return "bench-" + script.stem.removeprefix("bench_").replace("_", "-")


@pytest.fixture
def benchmark_path(monkeypatch):
    """benchmarks/ first on sys.path, and the modules imported from it forgotten afterwards."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # (sys.path is restored whole: common.py's scripts/ goes too)
    before = set(sys.modules)
    yield
    for name in set(sys.modules) - before:
        module_file = getattr(sys.modules[name], "__file__", None) or ""
        if name.startswith("benchmark_") or module_file.startswith((str(BENCHMARKS), str(ROOT / "scripts"))):
            del sys.modules[name]


def load(path: Path):
    spec = importlib.util.spec_from_file_location(f"benchmark_{path.stem}", path)
    module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_there_are_scripts_and_libraries():
    names = {path.name for path in SCRIPTS}
    assert {"bench_defaults.py", "quality_imagetext.py", "quality_fashion_mnist.py", "stage1.py", "bench_gpu.py"} <= names
    assert {"common.py", "fmnist_data.py", "imagetext_data.py", "defaults_suite.py"} <= {p.name for p in MODULES} - names


@pytest.mark.parametrize("path", MODULES, ids=lambda path: str(path.relative_to(BENCHMARKS)))
def test_every_benchmark_imports_without_doing_work_and_scripts_answer_help(path, benchmark_path, capsys):
    module = load(path)
    assert capsys.readouterr() == ("", ""), "a benchmark printed (so worked) while being imported"
    if path not in SCRIPTS:
        return
    with pytest.raises(SystemExit) as exit_:
        module.main(["--help"])
    assert exit_.value.code == 0
    help_text = capsys.readouterr().out
    assert help_text.startswith("usage: ") and "--help" in help_text


def test_every_script_has_a_make_target():
    targets = [make_target(script) for script in SCRIPTS]
    assert len(set(targets)) == len(targets), "two scripts would answer to one make target"
    plan = subprocess.run(["make", "-n", "-C", str(ROOT), *targets, "ARGS=--given"], capture_output=True, text=True,
                          check=True).stdout
    for script in SCRIPTS:
        assert f"benchmarks/{script.relative_to(BENCHMARKS)} --given" in plan, make_target(script)
    assert "benchmarks/bench_score.py" in subprocess.run(["make", "-n", "-C", str(ROOT), "bench"], capture_output=True,
                                                         text=True, check=True).stdout
    unknown = subprocess.run(["make", "-C", str(ROOT), "bench-no-such-benchmark"], capture_output=True, text=True)
    assert unknown.returncode != 0 and "no benchmark script for bench-no-such-benchmark" in unknown.stderr


@pytest.mark.parametrize("script", ["quality_imagetext.py", "gpu/bench_gpu.py"])
def test_scripts_run_as_scripts(script):
    """As `python benchmarks/...`: the scripts find their neighbours (and scripts/) by themselves."""
    done = subprocess.run([sys.executable, str(BENCHMARKS / script), "--help"], capture_output=True, text=True,
                          cwd=ROOT / "docs", timeout=120)
    assert done.returncode == 0 and done.stdout.startswith("usage: "), done.stderr


def test_the_suite_stamps_a_run_by_what_it_reads_not_where_out_lies(benchmark_path, tmp_path):
    """A copied or moved output directory keeps its runs (no 14-minute re-score), and a reference
    trained again under the same path scores again."""
    suite = load(BENCHMARKS / "defaults_suite.py")
    out = tmp_path / "defaults"
    assert suite.relative_to_roots(str(out / "pools" / "emoji-clean" / "shards"), out) == "$OUT/pools/emoji-clean/shards"
    assert suite.relative_to_roots(str(ROOT / "demo" / "tiny-clip.json"), out) == "$ROOT/demo/tiny-clip.json"
    weights = tmp_path / "reference.safetensors"
    weights.write_bytes(b"first")
    first = suite.file_digest(weights)
    weights.write_bytes(b"again")
    assert suite.file_digest(weights) != first


@pytest.fixture
def fake_apt(benchmark_path, tmp_path, monkeypatch):
    """A root user whose apt-get (on PATH) logs its arguments and exits with $FAKE_APT_EXIT; the module."""
    log, bin_dir = tmp_path / "apt.log", tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "apt-get").write_text(f'#!/bin/sh\necho "$*" >> {log}\nexit "${{FAKE_APT_EXIT:-0}}"\n')
    (bin_dir / "apt-get").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    return load(ROOT / "scripts" / "debian_packages.py"), log


def test_debian_packages_update_then_install_one_program_at_a_time(fake_apt, tmp_path):
    debian, log = fake_apt
    lock_path = tmp_path / "apt.lock"
    with open(lock_path, "a") as held:  # another of our programs is installing
        fcntl.flock(held, fcntl.LOCK_EX)
        installer = threading.Thread(target=debian.install, args=(["pkg-a", "pkg-b"], "a test", lock_path))
        installer.start()
        installer.join(0.5)
        assert installer.is_alive() and not log.exists(), "apt-get ran while another installer held the lock"
    installer.join(30)
    assert not installer.is_alive()
    lines = log.read_text().splitlines()
    assert lines[0] == "update -qq" and lines[1].startswith("install -y -qq") and lines[1].endswith("pkg-a pkg-b")


def test_debian_packages_say_in_one_line_what_to_run(fake_apt, tmp_path, monkeypatch):
    debian, log = fake_apt
    monkeypatch.setenv("FAKE_APT_EXIT", "100")  # e.g. apt's own lock held by a package manager
    with pytest.raises(SystemExit) as failed:
        debian.install(["pkg-a"], "a test", tmp_path / "apt.lock")
    assert log.read_text().splitlines() == ["update -qq"]  # no install after a failed update
    message = str(failed.value.code)
    assert "\n" not in message and "`apt-get update` failed (exit 100)" in message and "sudo apt-get install pkg-a" in message
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(SystemExit) as not_root:
        debian.install(["pkg-a"], "a test", tmp_path / "apt.lock")
    assert str(not_root.value.code) == "error: missing Debian packages needed for a test; run: sudo apt-get install pkg-a"
    assert len(log.read_text().splitlines()) == 1
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    (tmp_path / "planted.lock").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(SystemExit) as planted:
        debian.install(["pkg-a"], "a test", tmp_path / "planted.lock")
    assert str(planted.value.code).startswith(f"error: cannot open the install lock {tmp_path / 'planted.lock'} (")
    assert not (tmp_path / "elsewhere").exists() and len(log.read_text().splitlines()) == 1


def test_the_input_benchmark_takes_each_wallpaper_once_whatever_its_sizes(benchmark_path):
    picture_name = load(BENCHMARKS / "bench_input.py").picture_name
    plasma = Path("/usr/share/wallpapers/Autumn/contents")
    assert {picture_name(plasma / "images" / "1920x1080.jpg"), picture_name(plasma / "images_dark" / "5120x2880.jpg")} == {"Autumn"}
    mate = Path("/usr/share/backgrounds/mate/nature")
    assert {picture_name(mate / "Elephants.jpg"), picture_name(mate / "Elephants_3840x2160.jpg")} == {"Elephants"}
    assert picture_name(mate / "Dune.jpg") == "Dune"
