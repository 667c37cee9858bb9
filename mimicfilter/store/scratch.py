"""Scratch that a killed run does not leave behind for good: private scratch directories (DuckDB's spill
files), and the temp files and staging folders in a run directory.

A run removes its scratch directory when it ends, but a run killed with SIGKILL (or by the OOM killer)
cannot, and at a billion samples DuckDB's spill can be gigabytes. So each directory's name carries the
host (and PID namespace) and process that made it (store/owners.py), and every run first removes the
ones whose process is gone: made on this host, owned by this user, by a process that no longer exists.
A directory of a live process, of another user, or of another host or container sharing the temporary
directory is never touched.

In a run directory, the temp files of atomic writes (store/atomic.py) and the staging folders of whole
folders (a dedup bucket, the cells, a saved extrapolator) are named by :func:`owners.leftover_name`;
a run that opens the directory removes those of killed processes (:func:`sweep_run_leftovers`).
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from mimicfilter.store.owners import OWNER_PATTERN, left_by_dead_process, owner_tag, stale_leftover

PREFIX = "mimicfilter-"


def _owner(name: str) -> tuple[str, int] | None:
    """(host, pid) of a scratch directory's name; None for any other name."""
    match = re.fullmatch(rf"{re.escape(PREFIX)}[a-z]+-{OWNER_PATTERN}-[A-Za-z0-9_]+", name)
    return (match["host"], int(match["pid"])) if match else None


def sweep_stale(directory: Path | None = None) -> list[Path]:
    """Remove the scratch directories left by killed runs of this user on this host; returns them."""
    directory = Path(directory or tempfile.gettempdir())
    uid, removed = os.getuid(), []
    try:
        entries = list(directory.iterdir())
    except OSError:
        return removed
    for entry in entries:
        owner = _owner(entry.name)
        if owner is None or not left_by_dead_process(owner[1], owner[0]):
            continue
        try:
            if entry.is_symlink() or not entry.is_dir() or entry.stat().st_uid != uid:
                continue
        except OSError:
            continue
        shutil.rmtree(entry, ignore_errors=True)
        removed.append(entry)
    return removed


def _listing(directory: Path) -> list[Path]:
    try:
        return list(directory.iterdir())
    except OSError:
        return []


def sweep_run_leftovers(run_dir: Path) -> list[Path]:
    """Remove the temp files and staging folders that killed processes of this host left in a local run
    directory, in it and in its folders one level down (parts, checkpoints, buckets, edges); returns them."""
    run_dir = Path(run_dir)
    folders = [run_dir] + [entry for entry in _listing(run_dir)
                           if not entry.name.startswith(".") and entry.is_dir() and not entry.is_symlink()]
    removed = []
    for folder in folders:
        for entry in _listing(folder):
            if not stale_leftover(entry.name):
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


@contextmanager
def scratch_directory(stage: str) -> Iterator[str]:
    """A new private directory in the temporary directory (``TMPDIR``) for ``stage``'s scratch files,
    removed on exit; the ones killed runs left are removed first."""
    sweep_stale()
    with tempfile.TemporaryDirectory(prefix=f"{PREFIX}{stage}-{owner_tag()}-") as path:
        yield path
