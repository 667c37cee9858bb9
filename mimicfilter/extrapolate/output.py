"""The extrapolate run's parts: one per shard, the scored samples' own (epoch-mean) scores and the
predictions of a fitted method for the unscored ones; a part that exists is kept (resume)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from mimicfilter.errors import MimicfilterError
from mimicfilter.extrapolate.methods import Fitted, ReferenceSet
from mimicfilter.extrapolate.sources import Scored, Source, embedded_of, iter_embed_parts, read_embed_part
from mimicfilter.store.parts import write_part
from mimicfilter.store.paths import part_path
from mimicfilter.store.schema import EMBEDDING_COLUMN, score_schema

TARGETS = ("mimic_score", "mimic_weight")  # what is extrapolated, in this order
IDENTITY = ("shard", "key", "uid", "index", "status", "error", "label")


def _fill(count: int, value: Any) -> list:
    return [value] * count


def _output_table(columns: dict[str, list], count: int) -> pa.Table:
    schema = score_schema(extrapolated=True)
    arrays = {}
    for name in schema.names:
        values = columns.get(name)
        arrays[name] = pa.array(values if values is not None else _fill(count, None), type=schema.field(name).type)
    table = pa.table(arrays, schema=schema)
    return table.sort_by([("index", "ascending"), ("key", "ascending")])


def _scored_rows(scored: Scored, rows: list[int]) -> dict[str, list]:
    taken = scored.table.take(pa.array(rows, type=pa.int64()))
    count = len(rows)
    columns = {name: taken.column(name).to_pylist() for name in (*IDENTITY, *TARGETS, "loss", "clip_score", "ref_loss")}
    columns |= {"epoch": _fill(count, 0), "step": _fill(count, -1), "extrapolated": _fill(count, False)}
    return columns


def _concat(first: dict[str, list], second: dict[str, list]) -> dict[str, list]:
    names = set(first) | set(second)
    n1 = len(next(iter(first.values()))) if first else 0
    n2 = len(next(iter(second.values()))) if second else 0
    return {name: first.get(name, _fill(n1, None)) + second.get(name, _fill(n2, None)) for name in names}


@dataclass
class Written:
    parts_written: int = 0
    extrapolated: int = 0
    fallbacks: int = 0  # samples without a valid neighbour: they get the scored set's mean


def _predict(new: pa.Table, part: Path, fitted: Fitted, reference: ReferenceSet, columns: tuple[str, ...], dim: int,
             counts: Written) -> tuple[np.ndarray, np.ndarray]:
    """(predicted [N, 2] with NaN where nothing is predicted, extrapolated mask) for the unscored rows ``new``."""
    ok = np.array([status == "ok" for status in new.column("status").to_pylist()], dtype=bool) & \
        np.asarray(new.column(EMBEDDING_COLUMN).is_valid().to_numpy(zero_copy_only=False), dtype=bool)
    predicted = np.full((new.num_rows, len(TARGETS)), np.nan)
    if not ok.any():
        return predicted, ok
    queries = new.filter(pa.array(ok))
    query_labels = None
    if reference.labels is not None:
        labels = np.asarray(queries.column("label").to_numpy(zero_copy_only=False), dtype=float)
        if np.isnan(labels).any():
            raise MimicfilterError(f"--same-label: {part} has ok samples without a label",
                                   hint="--same-label is for classification runs")
        query_labels = torch.from_numpy(labels.astype(np.int64))
    values = fitted.predict(embedded_of(queries, columns, dim), query_labels)
    missing = torch.isnan(values[:, 0])
    counts.fallbacks += int(missing.sum())
    values[missing] = reference.values.mean(dim=0)
    predicted[ok] = values.numpy()
    counts.extrapolated += int(ok.sum())
    return predicted, ok


def write_predictions(run_dir: Path, embedding_sources: list[Source], scored: Scored, reference: ReferenceSet,
                      fitted: Fitted, columns: tuple[str, ...], dim: int) -> Written:
    """One output part per shard: predictions for unscored samples (embedding ``columns`` of width
    ``dim``), the scored samples' own scores; parts that exist are kept (resume)."""
    counts = Written()
    scored_by_shard: dict[str, list[int]] = {}
    for position, shard in enumerate(scored.table.column("shard").to_pylist()):
        scored_by_shard.setdefault(shard, []).append(position)
    done_shards: set[str] = set()
    for _, part in iter_embed_parts(embedding_sources):
        table = read_embed_part(part, columns)
        if not table.num_rows:
            continue
        shard = table.column("shard")[0].as_py()
        if shard in done_shards:
            continue  # the same shard in two embeddings runs: the first wins
        done_shards.add(shard)
        out_path = part_path(run_dir, shard)
        if out_path.exists():
            continue  # resume
        keys = table.column("key").to_pylist()
        new = table.filter(pa.array([(shard, key) not in scored.position for key in keys], type=pa.bool_()))
        predicted, extrapolated = _predict(new, part, fitted, reference, columns, dim, counts)
        count = new.num_rows
        cells = {name: new.column(name).to_pylist() for name in IDENTITY}
        cells |= {
            "epoch": _fill(count, 0),
            "step": _fill(count, -1),
            **{name: [None if np.isnan(v) else float(v) for v in predicted[:, i]] for i, name in enumerate(TARGETS)},
            "extrapolated": extrapolated.tolist(),
        }
        rows = scored_by_shard.pop(shard, [])
        if rows:
            cells = _concat(cells, _scored_rows(scored, rows))
        write_part(_output_table(cells, count + len(rows)), out_path)
        counts.parts_written += 1
    for shard, rows in scored_by_shard.items():  # shards only the scored run has
        out_path = part_path(run_dir, shard)
        if shard not in done_shards and not out_path.exists():
            write_part(_output_table(_scored_rows(scored, rows), len(rows)), out_path)
            counts.parts_written += 1
    return counts
