"""The local executor: ordered parallel map, read-ahead, and workers that die with their parent."""

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from helpers import image_text_samples, write_tar

from mimicfilter.errors import MimicfilterError
from mimicfilter.execute.local import OrderedPool, read_ahead

ROOT = Path(__file__).resolve().parent.parent


def slow_square(value: int) -> int:
    time.sleep(random.random() * 0.01)  # results finish out of order
    return value * value


@pytest.mark.parametrize("workers", [0, 1, 3])
def test_results_come_back_in_submission_order(workers):
    with OrderedPool(slow_square, workers, window=5) as pool:
        assert list(pool.map(range(40))) == [value * value for value in range(40)]
        assert list(pool.map(iter([]))) == []
        assert list(pool.map(range(3))) == [0, 1, 4]


def fails_on_seven(value: int) -> int:
    if value == 7:
        raise MimicfilterError("seven is not allowed", hint="skip it")
    return value


def test_a_worker_exception_reaches_the_caller_with_its_type():
    with OrderedPool(fails_on_seven, 2) as pool:
        with pytest.raises(MimicfilterError, match="seven"):
            list(pool.map(range(20)))
        assert list(pool.map(range(5))) == list(range(5))  # the pool still works


def test_a_reader_exception_reaches_the_caller():
    def items():
        yield 1
        raise MimicfilterError("refused pipe: URL")

    with OrderedPool(slow_square, 2) as pool:
        with pytest.raises(MimicfilterError, match="refused"):
            list(pool.map(items()))


def test_an_abandoned_map_does_not_leak_into_the_next():
    with OrderedPool(slow_square, 2, window=8) as pool:
        for value in pool.map(range(1000)):
            if value == 9:
                break
        assert list(pool.map(range(10, 14))) == [100, 121, 144, 169]


def touch_and_square(item: tuple[str, int]) -> int:
    marker, value = item
    Path(f"{marker}-{value}").touch()
    return value * value


def test_a_map_starts_working_before_its_first_result_is_asked_for(tmp_path):
    """Decoding runs while the caller does something else (score loads its models meanwhile)."""
    marker = str(tmp_path / "done")
    with OrderedPool(touch_and_square, 2, window=4) as pool:
        results = pool.map((marker, value) for value in range(10))
        deadline = time.time() + 30
        while len(list(tmp_path.glob("done-*"))) < 4 and time.time() < deadline:
            time.sleep(0.05)
        assert len(list(tmp_path.glob("done-*"))) == 4  # the window's worth, and no more, before any read
        unread = pool.map((marker, value) for value in range(100, 103))  # abandons `results` unread
        assert list(unread) == [100 * 100, 101 * 101, 102 * 102]
        assert list(pool.map(range(0))) == []
    with pytest.raises(RuntimeError, match="abandoned"):  # reading it later fails, never hangs
        list(results)


def test_read_ahead_keeps_the_order_and_reports_errors():
    sources = [lambda i=i: iter(range(i * 10, i * 10 + i)) for i in range(6)]
    expected = [v for i in range(6) for v in range(i * 10, i * 10 + i)]
    assert list(read_ahead(sources, depth=1)) == expected
    assert list(read_ahead(sources, depth=3, buffer=2)) == expected

    def broken():
        yield 1
        raise OSError("connection reset")

    with pytest.raises(OSError, match="reset"):
        list(read_ahead([lambda: iter([0]), broken, lambda: iter([5])], depth=2))


def _children(pid: int) -> set[int]:
    found = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            text = (task / "children").read_text().split()
        except FileNotFoundError:  # a thread that ended since the listing
            continue
        found |= {int(child) for child in text}
    return found


def _alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "State:\tZ" not in status  # a zombie has exited; only its parent (init here) has not reaped it


def _wait_for_children(process: subprocess.Popen, count: int, timeout: float = 120) -> set[int]:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert process.poll() is None, process.stderr.read()
        children = _children(process.pid)
        if len(children) >= count:
            return children
        time.sleep(0.05)
    raise AssertionError("the workers did not start")


def _assert_gone_within(pids: set[int], seconds: float) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline and any(_alive(pid) for pid in pids):
        time.sleep(0.05)
    assert not [pid for pid in pids if _alive(pid)]


def _kill_parent_then_expect_workers_gone(process: subprocess.Popen, workers: int, busy_for: float = 0.0) -> None:
    """SIGKILL ``process`` once its ``workers`` children exist (``busy_for`` s later): they must exit within 2 s."""
    try:
        children = _wait_for_children(process, workers)
        time.sleep(busy_for)
        process.send_signal(signal.SIGKILL)
        process.wait()
        _assert_gone_within(children, 2.0)
    finally:
        if process.poll() is None:
            process.kill()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_workers_exit_within_two_seconds_of_a_kill_minus_nine_of_the_parent():
    script = textwrap.dedent("""
        import time
        from mimicfilter.execute.local import OrderedPool
        def work(x):
            time.sleep(0.2)
            return x
        with OrderedPool(work, 3) as pool:
            for _ in pool.map(range(10**6)):
                pass
    """)
    process = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE, text=True)
    _kill_parent_then_expect_workers_gone(process, workers=3, busy_for=0.5)


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_score_decoders_exit_within_two_seconds_of_a_kill_minus_nine(tmp_path, tiny_config, reference_checkpoint):
    shard = write_tar(tmp_path / "pool.tar", image_text_samples(4000))
    command = [sys.executable, "-m", "mimicfilter", "score", str(shard), "--model", str(tiny_config),
               "--reference", str(reference_checkpoint), "--out", str(tmp_path / "run"), "--batch-size", "16",
               "--workers", "2", "--quiet", "--device", "cpu", "--threads", "1"]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                               env={**os.environ, "PYTHONPATH": str(ROOT)})
    _kill_parent_then_expect_workers_gone(process, workers=2)
