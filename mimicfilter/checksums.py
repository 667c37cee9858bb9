"""Checkpoint checksums (sha256, recorded in run.json and part of a run's fingerprint), each file
hashed once per process, in background threads.

hashlib releases the GIL on large blocks, so a hash runs on another core beside whatever the main
thread does. ``score`` starts hashing the checkpoints it was given before it imports torch
(:func:`start_hashing`); by the time the models load, the ~0.6 s a ViT-B-32 checkpoint takes is
spent. Torch-free, so the CLI can call it first.
"""

from __future__ import annotations

import hashlib
import os
import stat
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

BLOCK_BYTES = 1 << 22

_lock = threading.Lock()
_digests: dict[tuple[str, int, int], Future[str]] = {}  # (real path, size, mtime) -> its sha256
_hasher: ThreadPoolExecutor | None = None


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(BLOCK_BYTES), b""):
            digest.update(block)
    return digest.hexdigest()


def start_hashing(path: str | Path) -> Future[str] | None:
    """Begin hashing a local file in the background (once per path, size and mtime); None for
    anything that is not a regular file (a pretrained tag, a path that does not exist)."""
    global _hasher
    try:
        status = os.stat(path)
    except (OSError, ValueError):
        return None
    if not stat.S_ISREG(status.st_mode):
        return None
    key = (os.path.realpath(path), status.st_size, status.st_mtime_ns)
    with _lock:
        known = _digests.get(key)
        if known is None or (known.done() and known.exception() is not None):  # a failed read is tried again
            if _hasher is None:
                _hasher = ThreadPoolExecutor(max_workers=2, thread_name_prefix="mimicfilter-sha256")
            _digests[key] = _hasher.submit(_sha256, key[0])
        return _digests[key]


def sha256_of_file(path: str | Path) -> str:
    """The file's sha256 (waits for a hash already under way); OSError as ``open`` raises it."""
    future = start_hashing(path)
    return future.result() if future is not None else _sha256(str(path))


def _forget_in_child() -> None:
    # A forked process has none of the parent's threads: a hash still under way there would never
    # finish, so a child starts with no hasher and no pending digests (finished ones stay valid).
    global _hasher, _lock
    _lock = threading.Lock()
    _hasher = None
    for key in [key for key, future in _digests.items() if not future.done()]:
        del _digests[key]


os.register_at_fork(after_in_child=_forget_in_child)
