"""Start-up phases: where the seconds before the first batch go (``score --verbose``, stats.json).

:func:`recording` collects the phases timed with :func:`phase` inside it (in this thread) and
returns them; outside a recording, :func:`phase` only runs its block.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from typing import Iterator

_local = threading.local()


@contextlib.contextmanager
def recording() -> Iterator[list[tuple[str, float]]]:
    """Collect ``(phase, seconds)`` of every :func:`phase` run inside, in order."""
    previous = getattr(_local, "phases", None)
    _local.phases = phases = []
    try:
        yield phases
    finally:
        _local.phases = previous


@contextlib.contextmanager
def phase(name: str) -> Iterator[None]:
    started = time.perf_counter()
    try:
        yield
    finally:
        phases = getattr(_local, "phases", None)
        if phases is not None:
            phases.append((name, time.perf_counter() - started))


def add(name: str, seconds: float) -> None:
    """Record a phase measured elsewhere (e.g. before the recording started)."""
    phases = getattr(_local, "phases", None)
    if phases is not None:
        phases.append((name, seconds))


def seconds_since_process_start() -> float | None:
    """Wall seconds since this process started (Linux /proc), or None where unknown."""
    try:
        with open("/proc/self/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
        with open("/proc/uptime") as handle:
            uptime = float(handle.read().split()[0])
        return uptime - int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def current() -> list[tuple[str, float]] | None:
    """The phases recorded so far in this thread's recording, or None outside one."""
    return getattr(_local, "phases", None)
