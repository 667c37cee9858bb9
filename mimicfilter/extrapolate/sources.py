"""Reading the runs extrapolation starts from: the scored run (one row per sample, by the shared
per-sample SQL), its embeddings, and the embeddings runs of the samples to extrapolate to."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from mimicfilter.curate.duck import connect, load_scores, per_sample_sql
from mimicfilter.errors import MimicfilterError
from mimicfilter.extrapolate.features import Embedded
from mimicfilter.store.parts import part_paths, read_part
from mimicfilter.store.paths import RUN_FILE, SUCCESS_FILE
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
    info = json.loads((path / RUN_FILE).read_text())
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


@dataclass
class Scored:
    """The scored run, one entry per sample (shard, key), as numpy/arrow columns."""

    table: pa.Table  # shard, key, uid, index, status, error, mimic_score, mimic_weight, loss, clip_score, ref_loss, label, epochs
    position: dict[tuple[str, str], int]


def read_scored(source: Source) -> Scored:
    """The scored run, one row per sample (the per-sample SQL shared with filter and report)."""
    parts = [str(part) for part in part_paths(source.path)]
    if not parts:
        raise MimicfilterError(f"scored run {source.path} holds no score parts", hint="pass a `score --out` directory")
    connection = connect()
    load_scores(connection, parts)
    table = connection.sql(per_sample_sql(connection) + ' ORDER BY shard, "index", key').to_arrow_table()
    connection.close()
    shards, keys = table.column("shard").to_pylist(), table.column("key").to_pylist()
    return Scored(table, {(shard, key): row for row, (shard, key) in enumerate(zip(shards, keys))})


def embedded_of(table: pa.Table, columns: tuple[str, ...], dim: int) -> Embedded:
    """The embeddings of a table's rows (every row must have them), as float32 tensors."""
    sides = [torch.from_numpy(embeddings_numpy(table.column(name), dim).astype(np.float32)) for name in columns]
    return Embedded(sides[0], sides[1] if len(sides) > 1 else None)


def scored_run_embeddings(source: Source, scored: Scored) -> dict[int, np.ndarray]:
    """Scored-table position → embedding [sides, D] from the scored run's own columns (first epoch)."""
    found: dict[int, np.ndarray] = {}
    dim = source.space["dim"]
    for part in part_paths(source.path):
        table = read_part(part, columns=["shard", "key", "epoch", *source.columns])
        table = table.filter(pc.is_valid(table.column(EMBEDDING_COLUMN)))
        if not table.num_rows:
            continue
        vectors = np.stack([embeddings_numpy(table.column(name), dim) for name in source.columns], axis=1)
        for row, (shard, key) in enumerate(zip(table.column("shard").to_pylist(), table.column("key").to_pylist())):
            position = scored.position.get((shard, key))
            if position is not None and position not in found:
                found[position] = vectors[row]
    return found


def embed_parts(source: Source) -> list[Path]:
    parts = part_paths(source.path)
    if not parts:
        raise MimicfilterError(f"embeddings run {source.path} holds no parts", hint="pass an `embed --out` directory")
    return parts


def read_embed_part(path: Path, columns: tuple[str, ...]) -> pa.Table:
    table = pq.read_table(path)
    missing = [name for name in columns if name not in table.column_names]
    if missing:
        raise MimicfilterError(f"{path} has no {', '.join(missing)} column", hint="pass an `embed --out` directory")
    return table


def iter_embed_parts(sources: list[Source]) -> Iterator[tuple[Source, Path]]:
    for source in sources:
        for part in embed_parts(source):
            yield source, part

