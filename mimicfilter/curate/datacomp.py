"""DataComp subset files: the sorted ``u8,u8`` uid array that DataComp's resharder reads.

DataComp identifies a sample by a 128-bit uid written as 32 hex characters. Its resharder takes
the chosen subset as a NumPy structured array of dtype ``u8,u8`` holding each uid as
(high 64 bits, low 64 bits), in lexicographic sorted order, saved with ``np.save``.
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from mimicfilter.errors import MimicfilterError, one_line
from mimicfilter.store.atomic import atomic_write_bytes

UID_DTYPE = np.dtype("u8,u8")
UID_HEX_CHARS = 32

_UID_PATTERN = re.compile(r"[0-9A-Fa-f]{32}")


def uids_to_array(uids: Iterable[str]) -> np.ndarray:
    """Uids as DataComp's sorted, duplicate-free ``u8,u8`` array; raises for a malformed uid."""
    checked = _checked_uids(uids)
    if not checked:
        return np.empty(0, dtype=UID_DTYPE)
    # One hex decode of the joined uids is far faster than int() per uid at pool scale;
    # each uid is 16 big-endian bytes = (high u64, low u64).
    halves = np.frombuffer(bytes.fromhex("".join(checked)), dtype=">u8").reshape(-1, 2)
    array = np.empty(len(checked), dtype=UID_DTYPE)
    array["f0"] = halves[:, 0]
    array["f1"] = halves[:, 1]
    return np.unique(array)  # sorts by (f0, f1) and drops duplicates


def write_datacomp_npy(uids: Iterable[str], path: Path) -> int:
    """Write the subset file atomically (exactly at ``path``: no ``.npy`` is appended); returns the uid count."""
    return save_uid_array(uids_to_array(uids), path)


def save_uid_array(array: np.ndarray, path: Path, stream: bool = False) -> int:
    """Save (high, low) uid halves as the subset file: sorted, duplicates dropped, written atomically
    (``stream``: written in place into a FIFO or character device)."""
    array = np.unique(np.asarray(array, dtype=UID_DTYPE))
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    if stream:
        with open(path, "wb") as handle:
            handle.write(buffer.getvalue())
    else:
        atomic_write_bytes(Path(path), buffer.getvalue())
    return int(array.shape[0])


def read_datacomp_npy(path: Path) -> list[str]:
    """A subset file back to 32-character lowercase hex uids, in file order."""
    try:
        array = np.load(Path(path), allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise MimicfilterError(f"cannot read DataComp subset {path}: {exc}", hint="pass a .npy written by np.save") from None
    if array.dtype != UID_DTYPE or array.ndim != 1:
        raise MimicfilterError(
            f"{path} is not a DataComp subset: dtype {array.dtype}, shape {array.shape}",
            hint='expected a 1-D array of dtype np.dtype("u8,u8")',
        )
    return [f"{int(high):016x}{int(low):016x}" for high, low in zip(array["f0"], array["f1"])]


def _checked_uids(uids: Iterable[str]) -> list[str]:
    """The uids as a list, or one error naming the first malformed uid and how many there are."""
    good: list[str] = []
    bad: list[object] = []
    for uid in uids:
        if isinstance(uid, str) and _UID_PATTERN.fullmatch(uid):
            good.append(uid)
        else:
            bad.append(uid)
    if bad:
        raise MimicfilterError(
            f"{len(bad)} uid(s) are not {UID_HEX_CHARS} hex characters, e.g. {one_line(repr(bad[0]), 80)}",
            hint="DataComp uids are the 128-bit hex strings from the pool metadata",
        )
    return good
