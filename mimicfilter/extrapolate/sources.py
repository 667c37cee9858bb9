"""Reading the runs extrapolation starts from: the scored run (one row per sample, by the shared
per-sample SQL), its embeddings, and the embeddings runs of the samples to extrapolate to."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mimicfilter.curate.duck import connect, load_scores, per_sample_sql
from mimicfilter.errors import MimicfilterError
from mimicfilter.extrapolate.features import unit_rows
from mimicfilter.extrapolate.overlap import SortedIds
from mimicfilter.store.parts import part_paths
from mimicfilter.store.paths import RUN_FILE, SUCCESS_FILE
from mimicfilter.store.rundir import run_record
from mimicfilter.store.schema import EMBEDDING_COLUMN, PAIR_COLUMNS


@dataclass
class Source:
    path: Path
    info: dict[str, Any]
    space: dict[str, Any] | None  # run.json's `embedding`: None when the run stores no embeddings

    @property
    def columns(self) -> tuple[str, ...]:
        """The embedding columns its parts hold: both sides of the pair, or (older runs) the image only."""
        return PAIR_COLUMNS if self.space and self.space.get("format", 1) >= 2 else (EMBEDDING_COLUMN,)


def open_run(path: Path, role: str) -> Source:
    if not path.is_dir() or not (path / RUN_FILE).is_file():
        raise MimicfilterError(f"{role} {path} is not a mimicfilter run directory (no run.json)",
                               hint="pass a `score --out` / `embed --out` directory")
    if not (path / SUCCESS_FILE).exists():
        raise MimicfilterError(f"{role} {path} has not finished (no _SUCCESS)",
                               hint="re-run the command that made it to complete it")
    info = run_record(path / RUN_FILE)
    return Source(path, info, info.get("embedding"))


def embeddings_numpy(column: pa.ChunkedArray | pa.Array, dim: int) -> np.ndarray:
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    flat = array.flatten().to_numpy(zero_copy_only=False)
    return np.asarray(flat, dtype=np.float16).reshape(-1, dim)


def check_spaces(sources: list[Source]) -> dict[str, Any]:
    """Every embedding source must be in the same space (same format, dim, reference, preprocessing)."""
    first = sources[0]
    for other in sources[1:]:
        if other.columns != first.columns:
            old, new = (first, other) if len(first.columns) < len(other.columns) else (other, first)
            raise MimicfilterError(
                f"{old.path} holds image-only embeddings of an older mimicfilter (the proxy's image tower), "
                f"{new.path} holds pair embeddings (the reference's image and text): they cannot be compared",
                hint=f"re-run the command that made {old.path} with this version",
            )
        if other.space["dim"] != first.space["dim"]:
            raise MimicfilterError(
                f"embedding dimension mismatch: {first.path} has {first.space['dim']}, {other.path} has {other.space['dim']}",
                hint="embed with the same --model/--reference options as the scored run",
            )
        if other.space != first.space:
            what = [name for name in sorted(set(first.space) | set(other.space))
                    if name not in ("dim", "what") and other.space.get(name) != first.space.get(name)]
            raise MimicfilterError(
                f"{first.path} and {other.path} hold embeddings of different models (differ in {', '.join(what) or 'space'})",
                hint="embed with the same --model/--reference/--reference-head/--classnames options as the scored run",
            )
    return first.space


def places(shards: pa.Array | pa.ChunkedArray, keys: pa.Array | pa.ChunkedArray) -> pa.Array:
    """One string per sample naming its place: shard and key (for joins in Arrow)."""
    return pc.binary_join_element_wise(shards, keys, "\x00")


@dataclass
class Scored:
    """The scored run, one row per sample (shard, key), as Arrow columns."""

    table: pa.Table  # shard, key, uid, index, status, error, mimic_score, mimic_weight, loss, clip_score, ref_loss, label, epochs

    def wanted(self) -> np.ndarray:
        """The samples with a score (ok and not NaN): the ones extrapolation can learn from."""
        score = np.asarray(self.table.column("mimic_score").to_numpy(zero_copy_only=False), dtype=np.float64)
        ok = np.asarray(pc.equal(self.table.column("status"), "ok").to_numpy(zero_copy_only=False), dtype=bool)
        return ok & ~np.isnan(score)


def read_scored(source: Source) -> Scored:
    """The scored run, one row per sample (the per-sample SQL shared with filter and report)."""
    parts = [str(part) for part in part_paths(source.path)]
    if not parts:
        raise MimicfilterError(f"scored run {source.path} holds no score parts", hint="pass a `score --out` directory")
    connection = connect()
    load_scores(connection, parts)
    table = connection.sql(per_sample_sql(connection) + ' ORDER BY shard, "index", key').to_arrow_table()
    connection.close()
    return Scored(table)


@dataclass
class ScoredVectors:
    """The embeddings found for the scored samples with a score: ``rows`` (positions in the scored
    table) and their vectors [len(rows), sides, D] float16, in the order of ``rows``."""

    rows: np.ndarray
    vectors: np.ndarray
    missing: np.ndarray  # positions of scored samples with a score but no embedding


class VectorCollector:
    """Collects embeddings for the wanted scored positions, into one preallocated array."""

    def __init__(self, wanted: np.ndarray, sides: int, dim: int):
        self.rows = np.flatnonzero(wanted)
        self.slot = np.full(len(wanted) + 1, -1, dtype=np.int64)  # position → row of the array (−1: not wanted)
        self.slot[self.rows] = np.arange(len(self.rows))
        self.vectors = np.zeros((len(self.rows), sides, dim), dtype=np.float16)
        self.found = np.zeros(len(self.rows), dtype=bool)

    @property
    def complete(self) -> bool:
        return bool(self.found.all())

    def add(self, positions: np.ndarray, vectors: np.ndarray) -> None:
        """``positions`` (scored-table positions, −1 for none) of ``vectors``: the first found of each wins."""
        slots = self.slot[positions]
        take = slots >= 0
        slots, vectors = slots[take], vectors[take]
        fresh = ~self.found[slots]
        self.vectors[slots[fresh]] = vectors[fresh]
        self.found[slots[fresh]] = True

    def result(self) -> ScoredVectors:
        if self.complete:
            return ScoredVectors(self.rows, self.vectors, self.rows[:0])
        return ScoredVectors(self.rows[self.found], self.vectors[self.found], self.rows[~self.found])


def vectors_of(table: pa.Table, columns: tuple[str, ...], dim: int) -> np.ndarray:
    """A table's embedding columns as [rows, sides, D] float16 (null cells read as zeros)."""
    sides = []
    for name in columns:
        column = table.column(name).combine_chunks()
        if column.null_count:
            column = pc.if_else(column.is_valid(), column, pa.scalar([0.0] * dim, type=column.type))
        sides.append(embeddings_numpy(column, dim))
    return np.stack(sides, axis=1)


def scored_vectors_from_runs(scored_source: Source, embedding_sources: list[Source], scored: Scored,
                             columns: tuple[str, ...], dim: int) -> ScoredVectors:
    """The scored samples' embeddings: the scored run's own (first epoch), else from the embeddings runs."""
    collector = VectorCollector(scored.wanted(), len(columns), dim)
    scored_places = SortedIds(places(scored.table.column("shard"), scored.table.column("key")))
    runs = ([(scored_source, part) for part in part_paths(scored_source.path)] if scored_source.space else []) + \
        [(source, part) for source in embedding_sources for part in part_paths(source.path)]
    for source, part in runs:
        if collector.complete:
            break
        table = pq.read_table(part, columns=["shard", "key", "status", *columns])
        table = table.filter(pc.and_(pc.equal(table.column("status"), "ok"), pc.is_valid(table.column(EMBEDDING_COLUMN))))
        positions = scored_places.positions(places(table.column("shard"), table.column("key")))
        hit = positions >= 0
        if hit.any():
            vectors, usable = unit_rows(vectors_of(table.filter(pa.array(hit)), columns, dim))
            collector.add(positions[hit][usable], vectors[usable])
    return collector.result()
