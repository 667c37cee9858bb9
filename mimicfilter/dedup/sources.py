"""Where the embeddings to deduplicate come from, as units of work (one input file each): the parts of
a run with embeddings (``score --save-embeddings``, ``embed``), or files the pool already has
(``--features-from``: DataComp .npz, Parquet; read by :mod:`~mimicfilter.extrapolate.external`).

A unit reads as the usable samples' identity (shard, key, uid, index) and their unit vectors
[n, sides, d] (float16; sides: the image, and the caption's or label's embedding when present).
Not usable: rows whose status is not ``ok``, without an embedding, the anchors of ``score
--trusted`` (never pool samples), and rows of later epochs (a sample's embedding is the same in
every epoch's row).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mimicfilter.dedup.config import DedupConfig
from mimicfilter.errors import MimicfilterError
from mimicfilter.extrapolate.external import ExternalFile, open_features, read_file, row_count
from mimicfilter.extrapolate.external_ids import check_some_match, check_unique_ids
from mimicfilter.extrapolate.features import unit_rows
from mimicfilter.extrapolate.sources import Source, check_spaces, open_run, vectors_of
from mimicfilter.extrapolate.stream import Reading  # how units are read: the columns (image first), width, id column
from mimicfilter.store.parts import part_paths
from mimicfilter.store.paths import part_name, trajectory_part_epoch
from mimicfilter.store.schema import ANCHOR_COLUMN, DIGEST_BYTES, EMBEDDING_COLUMN, LONG_CAPTION_COLUMN

IDENTITY = ("shard", "key", "uid", "index")


@dataclass(frozen=True)
class Unit:
    """One input file: ``kind`` run (a run's part) or npz / parquet (--features-from)."""

    kind: str
    path: str

    @property
    def name(self) -> str:
        return part_name(self.path)

    def __str__(self) -> str:
        return self.path


@dataclass
class UnitRows:
    identity: pa.Table  # IDENTITY columns of the usable rows
    vectors: np.ndarray  # [n, sides, d] float16 unit rows
    # [n, 20] uint8: each caption's long_caption_sha1 (zeros when the embedding saw it whole); pair mode
    # on a run's parts only, else None
    long_captions: np.ndarray | None = None


@dataclass(frozen=True)
class Inputs:
    units: list[Unit]
    reading: Reading
    space: dict[str, Any]  # the embedding space, recorded in run.json
    match: tuple[str, ...]  # how filter finds a sample of the run: ("shard", "index") or the id column
    rows: int  # rows in the units (an upper bound of the samples: the cell count follows it)
    run: Source | None = None  # --features-from: the run whose samples the files' ids must name


def _run_units(source: Source) -> list[Unit]:
    parts = part_paths(source.path)
    if (source.info.get("train") or {}).get("mode", "none") != "none":  # trajectory: epoch 0's parts hold every sample
        parts = [part for part in parts if trajectory_part_epoch(part.name) == 0]
    return [Unit("run", str(part)) for part in parts]


def open_inputs(config: DedupConfig) -> Inputs:
    """The units and how to read them; refuses sources without embeddings, or of two spaces."""
    if config.features_from is not None:
        run = open_run(Path(config.run), "run")
        spec, opened = config.features_from, open_features(config.features_from)
        units = [Unit(file.layout, file.path) for file in opened.files]
        return _checked(config, Inputs(units, Reading(opened.columns, opened.dim, spec.id_column), opened.space,
                                       (spec.id_column,), sum(row_count(file) for file in opened.files), run))
    sources = [open_run(Path(path), "--embeddings run") for path in config.embeddings] or \
        [open_run(Path(config.run), "run")]
    for source in sources:
        if source.space is None:
            raise MimicfilterError(f"{source.path} holds no embeddings",
                                   hint="score with --save-embeddings, embed the shards (`mimicfilter embed`) and pass "
                                   "--embeddings, or pass --features-from FILES")
    run = open_run(Path(config.run), "run") if config.embeddings else None
    # the run's own embeddings, where it saved them, say its space: --embeddings of another model
    # would find duplicates among vectors the run's scores never saw
    space = check_spaces(([run] if run is not None and run.space is not None else []) + sources)
    units = [unit for source in sources for unit in _run_units(source)]
    rows = sum(pq.ParquetFile(unit.path).metadata.num_rows for unit in units)
    return _checked(config, Inputs(units, Reading(sources[0].columns, int(space["dim"])), space, ("shard", "index"), rows))


def check_features_ids(config: DedupConfig, inputs: Inputs) -> None:
    """``--features-from``: some of the files' ids (a bounded sample) are RUN's, and none is there
    twice (:mod:`~mimicfilter.extrapolate.external_ids`)."""
    run = inputs.run
    files = [ExternalFile(unit.path, unit.kind) for unit in inputs.units]
    id_column = inputs.reading.id_column
    check_some_match(files, id_column, [unit.path for unit in _run_units(run)], run.info.get("shards", []),
                     f"none of the samples of {config.run} can be used")
    check_unique_ids(files, id_column)


def _checked(config: DedupConfig, inputs: Inputs) -> Inputs:
    """The inputs as the mode reads them: both sides for ``pair``, the image alone for ``image``."""
    if config.dedup_on == "pair" and len(inputs.reading.columns) < 2:
        raise MimicfilterError(f"--dedup-on pair needs the text side of the embeddings; these hold the image only "
                               f"({', '.join(inputs.reading.columns)})",
                               hint="use --dedup-on image, or name both columns with --embedding-column IMAGE,TEXT")
    if not inputs.units:
        raise MimicfilterError(f"{config.run} has no parts to read", hint="finish the run first")
    if config.dedup_on == "image":
        return dataclasses.replace(inputs, reading=dataclasses.replace(inputs.reading, columns=inputs.reading.columns[:1]))
    return inputs


def read_unit(unit: Unit, reading: Reading) -> UnitRows:
    """The usable samples of one unit."""
    if unit.kind in ("npz", "parquet"):
        rows = read_file(ExternalFile(unit.path, unit.kind), reading.columns, reading.id_column, reading.dim)
        usable = pa.array(rows.usable)
        return UnitRows(rows.identity.select(list(IDENTITY)).filter(usable), rows.vectors[rows.usable])
    names = set(pq.read_schema(unit.path).names)
    extra = [name for name in ("epoch", ANCHOR_COLUMN) if name in names]
    if len(reading.columns) > 1 and LONG_CAPTION_COLUMN in names:
        extra.append(LONG_CAPTION_COLUMN)
    table = pq.read_table(unit.path, columns=[*IDENTITY, "status", *extra, *reading.columns])
    keep = pc.and_(pc.equal(table.column("status"), "ok"), pc.is_valid(table.column(EMBEDDING_COLUMN)))
    if "epoch" in extra:
        keep = pc.and_(keep, pc.equal(table.column("epoch"), 0))
    if ANCHOR_COLUMN in extra:
        keep = pc.and_(keep, pc.is_null(table.column(ANCHOR_COLUMN)))
    table = table.filter(keep)
    vectors, usable = unit_rows(vectors_of(table, reading.columns, reading.dim))
    long_captions = None
    if LONG_CAPTION_COLUMN in extra:
        long_captions = digests(table.column(LONG_CAPTION_COLUMN))[usable]
    return UnitRows(table.select(list(IDENTITY)).filter(pa.array(usable)), vectors[usable], long_captions)


def digests(column: pa.ChunkedArray) -> np.ndarray:
    """A nullable binary(20) column as [n, 20] uint8, zeros for null."""
    out = np.zeros((len(column), DIGEST_BYTES), dtype=np.uint8)
    valid = np.asarray(column.is_valid())
    if valid.any():
        present = column.filter(column.is_valid()).combine_chunks()
        out[valid] = np.frombuffer(present.buffers()[1], dtype=np.uint8,
                                   offset=present.offset * DIGEST_BYTES,
                                   count=len(present) * DIGEST_BYTES).reshape(-1, DIGEST_BYTES)
    return out
