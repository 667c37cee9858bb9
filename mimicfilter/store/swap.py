"""Replacing a directory of outputs as one unit: build the new set beside it, then swap.

``filter`` and ``report`` write files that belong together (a manifest and its summary, a page and
its plots, curated shards and their index). Written one by one into place, a failure or a kill
leaves new files beside old ones, or an index naming shards that are gone. Instead the new set is
built in a hidden staging directory next to the target (same filesystem) and swapped in once it is
complete: on Linux by one atomic exchange (``renameat2(RENAME_EXCHANGE)``), elsewhere by two
renames, between which the target is briefly absent but never mixed. The old set is deleted only
after the swap; a set that a kill left half-swapped is put back by the next run.

Staging and retired directories are named ``.{name}.staging-{pid}@{host}-{token}`` and
``.{name}.old-{pid}@{host}-{token}``; those of this host's processes that no longer run are cleaned up
(or, for a retired set whose target is missing, restored) before a new unit starts. Another host's are
left alone: on a shared filesystem its PIDs say nothing here. (Names without ``@{host}``, written by
older versions, are judged by the PID alone, as those versions did.)
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import secrets
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

from mimicfilter.errors import MimicfilterError, one_line
from mimicfilter.store.locks import flocked
from mimicfilter.store.owners import OWNER_PATTERN, left_by_dead_process, owner_tag

STAGING, RETIRED = "staging", "old"
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _sibling_pattern(target: Path) -> re.Pattern:
    legacy = r"(?P<legacy>\d+)"  # older versions named the PID alone
    return re.compile(rf"^\.{re.escape(target.name)}\.(?P<role>{STAGING}|{RETIRED})-(?:{OWNER_PATTERN}|{legacy})-[0-9a-f]+$")


def _stale(match: re.Match) -> bool:
    if match["legacy"] is not None:
        return left_by_dead_process(int(match["legacy"]), None)
    return left_by_dead_process(int(match["pid"]), match["host"])


def recover(target: Path) -> None:
    """Tidy up after killed runs: restore a retired set whose target is missing, delete the rest."""
    parent = target.parent
    if not parent.is_dir():
        return
    pattern = _sibling_pattern(target)
    leftovers = sorted((match["role"], entry) for entry in parent.iterdir()
                       if (match := pattern.match(entry.name)) and _stale(match))
    for role, entry in leftovers:
        if role == RETIRED and not target.exists():
            os.rename(entry, target)  # killed between the two renames of the fallback swap
        else:
            shutil.rmtree(entry, ignore_errors=True)


def check_replaceable(target: Path, owned: Callable[[str], bool], option: str) -> None:
    """Refuse a target that is not a directory or holds files this unit did not write."""
    if not target.exists():
        return
    if not target.is_dir():
        raise MimicfilterError(f"{option} {target} exists and is not a directory", hint="choose another path")
    foreign = sorted(entry.name for entry in target.iterdir() if not owned(entry.name))
    if foreign:
        more = f" and {len(foreign) - 3} more" if len(foreign) > 3 else ""
        raise MimicfilterError(
            one_line(f"{option} {target} holds other files ({', '.join(foreign[:3])}{more})"),
            hint="choose an empty or new directory: it is replaced as a whole",
        )


def _exchange(first: Path, second: Path) -> bool:
    """Swap two directories atomically (Linux renameat2); False where the system cannot."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    renameat2.restype = ctypes.c_int
    if renameat2(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False  # e.g. a filesystem without exchange support
    raise OSError(code, os.strerror(code), str(second))


def _new_sibling(target: Path, role: str) -> Path:
    while True:
        candidate = target.parent / f".{target.name}.{role}-{owner_tag()}-{secrets.token_hex(4)}"
        try:
            candidate.mkdir()  # 0777 less the umask, like any directory the user makes
            return candidate
        except FileExistsError:
            continue


def swap_in(staging: Path, target: Path) -> None:
    """Make ``staging`` the new ``target``; the old set is deleted after the swap."""
    if not target.exists():
        os.rename(staging, target)
        return
    if _exchange(staging, target):
        shutil.rmtree(staging, ignore_errors=True)  # now holds the old set
        return
    retired = _new_sibling(target, RETIRED)
    retired.rmdir()
    os.rename(target, retired)
    os.rename(staging, target)
    shutil.rmtree(retired, ignore_errors=True)


@contextlib.contextmanager
def replaced_directory(target: Path, owned: Callable[[str], bool], option: str) -> Iterator[Path]:
    """Yield an empty staging directory; when the block succeeds it becomes ``target`` in one swap.

    On any failure (or a kill) ``target`` keeps its earlier contents. ``owned(name)`` says whether
    an entry of an existing ``target`` was written by this kind of unit; any other entry makes the
    target refused (``option`` names it in the message), since the whole directory is replaced.
    """
    target = Path(os.path.realpath(target))  # a symlinked target: swap where it points
    target.parent.mkdir(parents=True, exist_ok=True)
    recover(target)
    check_replaceable(target, owned, option)
    staging = _new_sibling(target, STAGING)
    try:
        yield staging
        swap_in(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


@contextlib.contextmanager
def sole_writer(targets: list[tuple[Path, str]]) -> Iterator[None]:
    """Hold each target's writer lock (``.{name}.lock`` beside it, ``flock``) for the block: outputs
    replaced as two units (``filter``'s --out and curated shards outside it) come from one run even
    when two runs write them at once. A target another process holds is refused (``option`` names it).
    The lock file is removed while still held; one taken after its removal is taken again."""
    with contextlib.ExitStack() as held:
        for target, option in targets:
            target = Path(os.path.realpath(target))
            target.parent.mkdir(parents=True, exist_ok=True)
            held.enter_context(_locked(target.parent / f".{target.name}.lock", f"{option} {target}"))
        yield


@contextlib.contextmanager
def _locked(lock: Path, what: str) -> Iterator[None]:
    with flocked(lock, wait=False, remove=True) as held:
        if not held:
            raise MimicfilterError(f"{what} is being written by another mimicfilter run now",
                                   hint="wait for it to finish, or choose another path", exit_code=1)
        yield


def is_temp_name(name: str) -> bool:
    """A temp file of an interrupted atomic write (``.NAME.XXXX.tmp``)."""
    return name.startswith(".") and name.endswith(".tmp")
