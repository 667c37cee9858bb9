"""Checkpoint sha256s: computed once per file in background threads, started before torch imports."""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import threading

from mimicfilter import checksums


def test_a_file_is_hashed_once_and_again_when_it_changes(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(os.urandom(5 * checksums.BLOCK_BYTES // 2))
    first = checksums.start_hashing(path)
    assert checksums.start_hashing(str(path)) is first  # the same file: the same hash under way
    assert checksums.sha256_of_file(path) == hashlib.sha256(path.read_bytes()).hexdigest()
    path.write_bytes(b"other weights")
    assert checksums.sha256_of_file(path) == hashlib.sha256(b"other weights").hexdigest()


def test_what_is_not_a_file_is_not_hashed(tmp_path):
    assert checksums.start_hashing("openai") is None  # a pretrained tag
    assert checksums.start_hashing(tmp_path) is None
    assert checksums.start_hashing(tmp_path / "missing.pt") is None


def test_a_forked_child_hashes_on_its_own(tmp_path, monkeypatch):
    """A hash under way in the parent at fork time has no thread in the child: the child hashes again."""
    path = tmp_path / "weights.bin"
    path.write_bytes(b"x" * 1000)
    parent, release, real = os.getpid(), threading.Event(), checksums._sha256

    def slow_in_the_parent(name):
        if os.getpid() == parent:
            release.wait(60)
        return real(name)

    monkeypatch.setattr(checksums, "_sha256", slow_in_the_parent)
    pending = checksums.start_hashing(path)
    assert not pending.done()
    with multiprocessing.get_context("fork").Pool(1) as pool:
        in_child = pool.apply_async(checksums.sha256_of_file, (str(path),)).get(timeout=60)
    release.set()
    assert in_child == pending.result() == hashlib.sha256(b"x" * 1000).hexdigest()


def test_a_failed_read_is_tried_again(tmp_path, monkeypatch):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"weights")
    real = checksums._sha256

    def unreadable(name):
        raise PermissionError(13, "Permission denied", name)

    monkeypatch.setattr(checksums, "_sha256", unreadable)
    assert isinstance(checksums.start_hashing(path).exception(timeout=30), PermissionError)
    monkeypatch.setattr(checksums, "_sha256", real)  # readable again, same size and mtime
    assert checksums.sha256_of_file(path) == hashlib.sha256(b"weights").hexdigest()
