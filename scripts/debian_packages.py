"""Installing the Debian packages the demo data and the benchmarks read (fonts, Unicode data,
Fashion-MNIST, wallpapers), the same way from every script.

As root with apt-get: ``apt-get update`` then ``apt-get install``, holding a lock of our own
meanwhile. apt-get takes its locks without waiting (``apt-get update`` fails at once on the lists
lock another apt-get holds, whatever ``DPkg::Lock::Timeout`` says), so two of our scripts that
prepare data side by side would otherwise fail each other. Otherwise, or when apt-get fails, the
program exits with one line naming the command to run.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

# the lock our scripts take around apt-get (in the temporary directory: every user may create it)
LOCK_PATH = Path(tempfile.gettempdir()) / "mimicfilter-apt.lock"
# how long an install waits for dpkg's own lock (another package manager at work), in seconds
DPKG_LOCK_TIMEOUT = 600


def install(packages: Sequence[str], needed_for: str, lock_path: Path = LOCK_PATH) -> None:
    """Install ``packages`` (as root, one of our programs at a time), or exit saying how.

    ``needed_for`` ends the error line: "… needed for {needed_for}"."""
    command = f"sudo apt-get install {' '.join(packages)}"
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        sys.exit(f"error: missing Debian packages needed for {needed_for}; run: {command}")
    print(f"installing {', '.join(packages)} with apt-get ...", file=sys.stderr, flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:  # O_NOFOLLOW: root opens a name in a directory everyone writes to, never through a planted link
        descriptor = os.open(lock_path, os.O_RDONLY | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as error:
        sys.exit(f"error: cannot open the install lock {lock_path} ({error.strerror}); remove it and run again")
    with os.fdopen(descriptor) as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        for step in (["apt-get", "update", "-qq"],
                     ["apt-get", "install", "-y", "-qq", "-o", f"DPkg::Lock::Timeout={DPKG_LOCK_TIMEOUT}", *packages]):
            done = subprocess.run(step, env=env, stdin=subprocess.DEVNULL)
            if done.returncode != 0:
                sys.exit(f"error: `{' '.join(step[:2])}` failed (exit {done.returncode}) installing the Debian "
                         f"packages needed for {needed_for}; its message is above; run: {command}")
