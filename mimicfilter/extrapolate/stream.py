"""The unscored side, streamed: one work unit per input file (an ``embed`` part, a DataComp .npz, a
Parquet file of embeddings), one output part per unit, through the same executors as ``score``.

:func:`predict_unit` is the pure, idempotent unit of work: a part that exists is done, so a run
killed at any moment (SIGKILL included) and started again writes each part exactly once and gives
the same table. Memory is one unit's samples plus the saved extrapolator, whatever the number of
units. Samples already in the scored run (the same shard and key, or the same id) are never
extrapolated: their scored row stands for them, and each part records how many there were.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from mimicfilter.errors import MimicfilterError
from mimicfilter.extrapolate.external import ExternalFile, read_file
from mimicfilter.extrapolate.features import Embedded, unit_rows
from mimicfilter.extrapolate.methods import SearchSettings
from mimicfilter.extrapolate.overlap import ScoredMembers
from mimicfilter.extrapolate.saved import Saved, load
from mimicfilter.extrapolate.sources import vectors_of
from mimicfilter.store.parts import write_part
from mimicfilter.store.paths import part_path
from mimicfilter.store.schema import EMBEDDING_COLUMN, score_schema

TARGETS = ("mimic_score", "mimic_weight")  # what is extrapolated, in this order
IDENTITY = ("shard", "key", "uid", "index", "status", "error", "label")
SCORED_VALUES = ("loss", "clip_score", "ref_loss")
PART_COUNTS = b"mimicfilter.extrapolate"  # per-part counts, in the part's Parquet metadata


@dataclass(frozen=True)
class Unit:
    """One output part: ``kind`` embed (an embed run's part), npz or parquet (--features-from files),
    or scored (the scored rows of a shard no input covers); ``shard`` names the part."""

    kind: str
    path: str
    shard: str

    def __str__(self) -> str:
        return self.path


@dataclass(frozen=True)
class Reading:
    """How units are read: the embedding columns, their width, and the id column of external files."""

    columns: tuple[str, ...]
    dim: int
    id_column: str = "uid"


@dataclass
class UnitRows:
    identity: pa.Table
    vectors: np.ndarray  # [n, sides, D] float16
    usable: np.ndarray
    ids: pa.Array | None  # the id column matched against the scored run's (uid or key)


def read_unit(unit: Unit, reading: Reading) -> UnitRows:
    if unit.kind in ("npz", "parquet"):
        rows = read_file(ExternalFile(unit.path, unit.kind), reading.columns, reading.id_column, reading.dim)
        return UnitRows(rows.identity, rows.vectors, rows.usable, rows.ids)
    table = pq.read_table(unit.path)
    missing = [name for name in (*IDENTITY, *reading.columns) if name not in table.column_names]
    if missing:
        raise MimicfilterError(f"{unit.path} has no {', '.join(missing)} column", hint="pass an `embed --out` directory")
    vectors, usable = unit_rows(vectors_of(table, reading.columns, reading.dim))
    usable &= np.asarray(pc.equal(table.column("status"), "ok").to_numpy(zero_copy_only=False), dtype=bool)
    usable &= np.asarray(table.column(EMBEDDING_COLUMN).is_valid().to_numpy(zero_copy_only=False), dtype=bool)
    return UnitRows(table.select(list(IDENTITY)), vectors, usable, table.column("uid").combine_chunks().cast(pa.string()))


def scored_rows(scored: pa.Table, shard: str) -> pa.Table:
    """The scored samples of ``shard``, as output rows (their true epoch-mean scores)."""
    rows = scored.filter(pc.equal(scored.column("shard"), shard))
    return output_table({name: rows.column(name) for name in (*IDENTITY, *TARGETS, *SCORED_VALUES)}, rows.num_rows, False)


def output_table(columns: dict[str, Any], count: int, extrapolated: Any) -> pa.Table:
    """Output rows in the extrapolate schema (epoch 0, step −1); missing columns are null."""
    schema = score_schema(extrapolated=True)
    fixed = {"epoch": pa.array(np.zeros(count, np.int16)), "step": pa.array(np.full(count, -1, np.int32)),
             "extrapolated": pa.array(np.broadcast_to(np.asarray(extrapolated, dtype=bool), (count,)))}
    arrays = []
    for field in schema:
        value = fixed.get(field.name, columns.get(field.name))
        arrays.append(pa.nulls(count, field.type) if value is None else pa.array(value, field.type)
                      if not isinstance(value, (pa.Array, pa.ChunkedArray)) else value.cast(field.type))
    return pa.Table.from_arrays(arrays, schema=schema)


def _predict(saved: Saved, rows: UnitRows, todo: np.ndarray, settings: SearchSettings) -> tuple[np.ndarray, int]:
    """Predictions [n, 2] (NaN where none) for the rows ``todo``; and how many had no neighbour
    (they get the scored samples' mean)."""
    predicted = np.full((rows.identity.num_rows, len(TARGETS)), np.nan)
    if not todo.any():
        return predicted, 0
    vectors = torch.from_numpy(rows.vectors[todo])
    queries = Embedded(vectors[:, 0], vectors[:, 1] if vectors.shape[1] > 1 else None)
    labels = None
    if saved.index.labelled:
        label = np.asarray(rows.identity.column("label").to_numpy(zero_copy_only=False), dtype=float)[todo]
        if np.isnan(label).any():
            raise MimicfilterError("--same-label: samples without a label were found", hint="--same-label is for classification runs")
        labels = torch.from_numpy(label.astype(np.int64))
    values = saved.predictor.predict(saved.index, queries, labels, settings)
    missing = torch.isnan(values[:, 0])
    values[missing] = torch.tensor(saved.fit["scored_mean"], dtype=values.dtype)
    predicted[todo] = values.numpy()
    return predicted, int(missing.sum())


def predict_unit(unit: Unit, saved: Saved, members: ScoredMembers, reading: Reading, settings: SearchSettings,
                 run_dir: Path) -> int:
    """Write the unit's part (skipped when it exists); returns the rows written."""
    path = part_path(run_dir, unit.shard)
    if path.exists():
        return 0
    counts = {"source": unit.path, "overlap": 0, "extrapolated": 0, "fallbacks": 0}
    if unit.kind == "scored":
        table = scored_rows(saved.scored, unit.shard)
    else:
        rows = read_unit(unit, reading)
        overlap = members.in_scored(unit.shard, rows.identity.column("key"), rows.ids)
        new = ~overlap
        todo = rows.usable & new
        predicted, counts["fallbacks"] = _predict(saved, rows, todo, settings)
        keep = pa.array(new)
        columns = {name: rows.identity.column(name).filter(keep) for name in IDENTITY}
        columns |= {name: pa.array(predicted[new, i], pa.float32(), mask=np.isnan(predicted[new, i]))
                    for i, name in enumerate(TARGETS)}
        table = output_table(columns, int(new.sum()), todo[new])
        if unit.kind == "embed":  # the scored samples of the same shard go into its part
            table = pa.concat_tables([table, scored_rows(saved.scored, unit.shard)])
        counts |= {"overlap": int(overlap.sum()), "extrapolated": int(todo.sum())}
    table = table.sort_by([("index", "ascending"), ("key", "ascending")])
    write_part(table.replace_schema_metadata({PART_COUNTS: json.dumps(counts)}), path)
    return table.num_rows


def part_counts(path: Path) -> dict[str, Any]:
    metadata = pq.read_schema(path).metadata or {}
    return json.loads(metadata.get(PART_COUNTS, b"{}"))


@dataclass(frozen=True)
class UnitWorkerFactory:
    """A picklable worker factory for the executors: loads the saved extrapolator once per process
    (or Ray actor), then predicts unit after unit."""

    run_dir: Path
    reading: Reading
    settings: SearchSettings
    threads: int | None = None

    def __call__(self) -> Callable[[Unit], int]:
        import faiss

        if self.threads:
            faiss.omp_set_num_threads(self.threads)
        saved = load(self.run_dir)
        saved.index.use_device(self.settings.device)
        members = ScoredMembers(saved.scored, self.reading.id_column)
        run_dir, reading, settings = self.run_dir, self.reading, self.settings
        return lambda unit: predict_unit(unit, saved, members, reading, settings, run_dir)


class LazyWorker:
    """The factory's worker, built on first use in the process that uses it (forked local workers)."""

    def __init__(self, factory: UnitWorkerFactory):
        self.factory = factory
        self.worker: Callable[[Unit], int] | None = None

    def __call__(self, unit: Unit) -> int:
        if self.worker is None:
            self.worker = self.factory()
        return self.worker(unit)
