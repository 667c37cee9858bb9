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

from mimicfilter.curate.duck import connect, load_scores, per_sample_sql
from mimicfilter.errors import MimicfilterError
from mimicfilter.store.parts import part_paths, read_part
from mimicfilter.store.paths import RUN_FILE, SUCCESS_FILE
from mimicfilter.store.schema import EMBEDDING_COLUMN


@dataclass
class Source:
    path: Path
    info: dict[str, Any]
    space: dict[str, Any] | None


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
    """Every embedding source must be in the same space (same dim, image tower, preprocessing)."""
    first = sources[0]
    for other in sources[1:]:
        if other.space["dim"] != first.space["dim"]:
            raise MimicfilterError(
                f"embedding dimension mismatch: {first.path} has {first.space['dim']}, {other.path} has {other.space['dim']}",
                hint="embed with the same --model/--reference/--proxy options as the scored run",
            )
        if other.space != first.space:
            what = [name for name in ("image_tower_sha256", "preprocess") if other.space.get(name) != first.space.get(name)]
            raise MimicfilterError(
                f"{first.path} and {other.path} hold embeddings of different models (differ in {', '.join(what) or 'space'})",
                hint="embed with the same --model/--reference/--proxy/--mimic-layers/--seed options as the scored run",
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


def scored_run_embeddings(source: Source, scored: Scored) -> dict[int, np.ndarray]:
    """Scored-table position → embedding, from the scored run's own ``embedding`` column (first epoch)."""
    found: dict[int, np.ndarray] = {}
    dim = source.space["dim"]
    for part in part_paths(source.path):
        table = read_part(part, columns=["shard", "key", "epoch", EMBEDDING_COLUMN])
        table = table.filter(pc.is_valid(table.column(EMBEDDING_COLUMN)))
        if not table.num_rows:
            continue
        vectors = embeddings_numpy(table.column(EMBEDDING_COLUMN), dim)
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


def read_embed_part(path: Path) -> pa.Table:
    table = pq.read_table(path)
    if EMBEDDING_COLUMN not in table.column_names:
        raise MimicfilterError(f"{path} has no embedding column", hint="pass an `embed --out` directory")
    return table


def iter_embed_parts(sources: list[Source]) -> Iterator[tuple[Source, Path]]:
    for source in sources:
        for part in embed_parts(source):
            yield source, part

