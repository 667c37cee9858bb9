"""Samples by cell, on disk: one bucket per input unit, then ranges of cells read across all buckets.

A bucket (``buckets/{unit name}/``) holds the unit's usable samples sorted by cell — ``cells.npy``
(int64), ``rows.npy`` (the sample's row in ``identity.arrow``), ``vectors.npy`` ([m, sides, d]
float16; a sample in two cells is there twice) — and ``identity.arrow`` (shard, key, uid, index).
It is built in a hidden folder and renamed: a bucket that exists is complete, so a killed run
redoes only the missing ones. Ranges of consecutive cells (:func:`plan_ranges`) hold at most
:data:`RANGE_BYTES` of vectors (or one cell): the pair search's memory, whatever the pool's size.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from mimicfilter.dedup.cells import Cells
from mimicfilter.dedup.sources import Reading, Unit, read_unit
from mimicfilter.store.atomic import atomic_write_json
from mimicfilter.store.owners import leftover_name
from mimicfilter.store.schema import DIGEST_BYTES

BUCKETS_DIR = "buckets"
RANGES_FILE = "ranges.json"
RANGE_BYTES = 256 << 20  # vectors read per range of cells (float16)
LONG_CAPTIONS_FILE = "long_captions.npy"  # pair mode on a run's parts: [m, 20] uint8 long_caption_sha1


def bucket_dir(out_dir: Path, unit: Unit) -> Path:
    return Path(out_dir) / BUCKETS_DIR / unit.name


def write_bucket(unit: Unit, reading: Reading, cells: Cells, out_dir: Path) -> int:
    """The unit's bucket (skipped when it exists); returns the samples it holds."""
    target = bucket_dir(out_dir, unit)
    if target.exists():
        return 0
    rows = read_unit(unit, reading)
    positions, cell_of = cells.assign(rows.vectors[:, 0])
    staging = target.with_name(leftover_name(target.name, uuid.uuid4().hex))
    staging.mkdir(parents=True)
    np.save(staging / "cells.npy", cell_of)
    np.save(staging / "rows.npy", positions)
    np.save(staging / "vectors.npy", rows.vectors[positions])
    if rows.long_captions is not None:
        np.save(staging / LONG_CAPTIONS_FILE, rows.long_captions[positions])
    with pa.OSFile(str(staging / "identity.arrow"), "wb") as sink, pa.ipc.new_file(sink, rows.identity.schema) as writer:
        writer.write_table(rows.identity)
    try:
        os.rename(staging, target)
    except OSError:  # another worker finished the same unit first
        shutil.rmtree(staging, ignore_errors=True)
    return rows.identity.num_rows


def cell_counts(out_dir: Path, units: list[Unit], cell_count: int) -> np.ndarray:
    """Samples per cell over every bucket (copies in a second cell included)."""
    counts = np.zeros(cell_count, dtype=np.int64)
    for unit in units:
        counts += np.bincount(np.load(bucket_dir(out_dir, unit) / "cells.npy", mmap_mode="r"), minlength=cell_count)
    return counts


def plan_ranges(counts: np.ndarray, row_bytes: int) -> list[tuple[int, int]]:
    """Consecutive cells [start, stop) holding at most RANGE_BYTES of vectors each (a larger cell alone)."""
    ranges, start, held = [], 0, 0
    for cell, count in enumerate(counts.tolist()):
        if held and held + count * row_bytes > RANGE_BYTES:
            ranges.append((start, cell))
            start, held = cell, 0
        held += count * row_bytes
    ranges.append((start, len(counts)))
    return [(a, b) for a, b in ranges if counts[a:b].sum()]


def saved_ranges(out_dir: Path, units: list[Unit], cell_count: int, row_bytes: int) -> list[tuple[int, int]]:
    """The ranges, planned once from the buckets' counts (the same plan whoever computes it)."""
    path = Path(out_dir) / RANGES_FILE
    if path.is_file():
        return [tuple(pair) for pair in json.loads(path.read_text())["ranges"]]
    counts = cell_counts(out_dir, units, cell_count)
    ranges = plan_ranges(counts, row_bytes)
    atomic_write_json(path, {"ranges": ranges, "largest_cell": int(counts.max(initial=0)),
                             "assigned": int(counts.sum())})
    return ranges


@dataclass
class CellBlock:
    """The samples of a range of cells: per copy its cell, its unit (position in the unit list), its
    row in that unit's identity, and its vectors; sorted by (cell, unit, row)."""

    cells: np.ndarray
    units: np.ndarray
    rows: np.ndarray
    vectors: np.ndarray  # [m, sides, d] float16
    long_captions: np.ndarray | None = None  # [m, 20] uint8 when the buckets hold them (zeros: whole)


def read_range(out_dir: Path, units: list[Unit], start: int, stop: int) -> CellBlock:
    """The range's samples from every bucket. The vectors are copied once, straight into their sorted
    place, one bucket's slice at a time (its mapping dropped after): the range's vectors are held
    once, not as pieces, a concatenation and a sorted copy (3× the range at 10M samples)."""
    spans, cells, owners, rows = [], [], [], []
    for number, unit in enumerate(units):
        folder = bucket_dir(out_dir, unit)
        assigned = np.load(folder / "cells.npy", mmap_mode="r")
        low, high = (int(bound) for bound in np.searchsorted(assigned, [start, stop]))
        if high > low:
            spans.append((folder, low, high))
            cells.append(np.array(assigned[low:high]))
            owners.append(np.full(high - low, number, dtype=np.int64))
            rows.append(np.array(np.load(folder / "rows.npy", mmap_mode="r")[low:high]))
    if not spans:
        return CellBlock(*(np.zeros(0, dtype=np.int64),) * 3, np.zeros((0, 1, 1), dtype=np.float16))
    cells, owners, rows = np.concatenate(cells), np.concatenate(owners), np.concatenate(rows)
    order = np.lexsort((rows, owners, cells))
    destination = np.empty_like(order)
    destination[order] = np.arange(len(order))
    vectors = long_captions = None
    offset = 0
    for folder, low, high in spans:
        into = destination[offset : offset + high - low]
        mapped = np.load(folder / "vectors.npy", mmap_mode="r")
        if vectors is None:
            vectors = np.empty((len(order), *mapped.shape[1:]), dtype=mapped.dtype)
        vectors[into] = mapped[low:high]
        del mapped
        if (folder / LONG_CAPTIONS_FILE).is_file():
            if long_captions is None:
                long_captions = np.zeros((len(order), DIGEST_BYTES), dtype=np.uint8)
            long_captions[into] = np.load(folder / LONG_CAPTIONS_FILE, mmap_mode="r")[low:high]
        offset += high - low
    return CellBlock(cells[order], owners[order], rows[order], vectors, long_captions)


def identities(out_dir: Path, units: list[Unit], owners: np.ndarray, rows: np.ndarray) -> pa.Table:
    """The identity rows of (unit, row) pairs, in the order given."""
    if not len(owners):
        return pa.table({name: pa.array([], type) for name, type in
                         (("shard", pa.string()), ("key", pa.string()), ("uid", pa.string()), ("index", pa.int32()))})
    parts, order = [], []
    for number in np.unique(owners):
        picked = np.flatnonzero(owners == number)
        with pa.memory_map(str(bucket_dir(out_dir, units[int(number)]) / "identity.arrow")) as source:
            table = pa.ipc.open_file(source).read_all()
        parts.append(table.take(pa.array(rows[picked])))
        order.append(picked)
    merged = pa.concat_tables(parts)
    return merged.take(pa.array(np.argsort(np.concatenate(order), kind="stable")))


def remove_buckets(out_dir: Path) -> None:
    shutil.rmtree(Path(out_dir) / BUCKETS_DIR, ignore_errors=True)
    (Path(out_dir) / RANGES_FILE).unlink(missing_ok=True)
