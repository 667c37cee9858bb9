"""Advisory locks between mimicfilter processes on one filesystem (``flock`` on a hidden lock file).

The kernel releases a lock when its process dies, so a killed run never leaves one held. A lock file
may be removed by the holder of its exclusive lock; a process that opened the removed file then takes
the lock again on the file now at the path (its inode is checked), so two processes never hold locks
on two different files for one path.

On a filesystem that keeps no locks (flock fails with ENOLCK, EOPNOTSUPP or ENOSYS) the block runs
unlocked rather than not at all: the command works there as it would without locks.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path


# flock's errors on a filesystem that keeps no locks (an NFS mount without a lock daemon, some FUSE ones)
NO_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS}


@contextlib.contextmanager
def flocked(lock: Path, *, shared: bool = False, wait: bool = True, remove: bool = False) -> Iterator[bool]:
    """Hold ``lock`` (exclusive, or ``shared``) for the block; yields False, holding nothing, when
    ``wait`` is off and another process holds a conflicting lock. ``remove``: an exclusive holder
    unlinks the lock file on leaving (the next taker makes it anew)."""
    mode = (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | (0 if wait else fcntl.LOCK_NB)
    while True:
        descriptor = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
        try:
            fcntl.flock(descriptor, mode)
        except BlockingIOError:
            os.close(descriptor)
            yield False
            return
        except OSError as exc:
            os.close(descriptor)
            if exc.errno not in NO_LOCKS:
                raise
            yield True  # a filesystem without locks (NFS without a lock daemon): unlocked, as before locks
            return
        try:
            current = os.stat(lock, follow_symlinks=False).st_ino
        except FileNotFoundError:
            current = None
        if current == os.fstat(descriptor).st_ino:
            break
        os.close(descriptor)  # its holder removed it as we opened it: take the one at the path now
    try:
        yield True
    finally:
        if remove and not shared:
            with contextlib.suppress(OSError):
                os.unlink(lock)
        os.close(descriptor)
