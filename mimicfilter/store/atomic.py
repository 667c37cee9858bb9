"""Atomic writes: every output file appears whole or not at all.

Local files are written under a temp name in the target's directory (``.NAME.PID@HOST-XXXX.tmp``:
readers skip dot files; the next run removes those of killed processes, store/scratch.py) and
renamed into place, so a crash leaves the old file or no file, never half of one. Remote (fsspec)
paths are written with one upload, which object stores publish only once it is complete.

Files get the mode a plain ``open(path, "w")`` would give them (0666 less the umask): the temp
files ``mkstemp`` makes are private (0600), and a rename keeps that mode, which would hide every
output from other accounts, training jobs and web servers.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mimicfilter.store.owners import owner_tag
from mimicfilter.store.paths import RunPath, is_remote


def current_umask() -> int:
    """The process umask. Read from /proc where there is one: ``os.umask`` can only read it by
    setting it, which races with other threads creating files."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode ``open(path, "w")`` gives a new file: 0666 less the umask."""
    return 0o666 & ~current_umask()


def temp_path_beside(path: Path) -> Path:
    """A new, empty temp file next to ``path`` (same filesystem, so a rename is atomic), with the
    mode a plain new file would have, so the renamed output is as readable as any other."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, name = tempfile.mkstemp(prefix=f".{path.name}.{owner_tag()}-", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(descriptor, file_mode())
    finally:
        os.close(descriptor)
    return Path(name)


@contextlib.contextmanager
def atomic_path(path: Path, *, exclusive: bool = False) -> Iterator[Path]:
    """Yield a temp path to write; on success it becomes ``path``, on any failure it is deleted.

    ``exclusive``: publish with a hard link, which never replaces an existing file (raises
    FileExistsError instead): create-if-absent for files that several processes may race to write.
    """
    temp = temp_path_beside(path)
    try:
        try:
            yield temp
        except OSError as error:
            if error.filename is not None or error.errno is None:
                raise
            raise OSError(error.errno, error.strerror, str(path)) from error  # a failed write names its file
        if exclusive:
            os.link(temp, path)
        else:
            os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)  # after a rename there is nothing left; after a link, the temp name


def _write_synced(target: Path, data: bytes) -> None:
    with open(target, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def atomic_write_bytes(path: RunPath, data: bytes, *, exclusive: bool = False) -> None:
    """Write ``data`` to ``path`` atomically (``exclusive``: only if ``path`` does not exist yet, local only)."""
    if is_remote(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("wb") as handle:
            handle.write(data)
        return
    with atomic_path(path, exclusive=exclusive) as temp:
        _write_synced(temp, data)


def json_bytes(payload: Any) -> bytes:
    return (json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n").encode()


def atomic_write_json(path: RunPath, payload: Any, *, exclusive: bool = False) -> None:
    atomic_write_bytes(path, json_bytes(payload), exclusive=exclusive)
