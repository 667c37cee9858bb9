"""Score extrapolation: predict the mimic scores of unscored samples from their scored neighbours.

Score a subset with the (expensive) trajectory, embed the rest with the proxy's image tower (the
cheap ``embed`` pass, or ``score --save-embeddings``), then predict each unscored sample's
per-sample mimic score and relative weight as the mean of its k nearest scored neighbours by cosine
similarity (optionally distance-weighted, optionally only neighbours with the same label).

* **Per-sample targets.** A scored sample's target is its mean ``mimic_score`` and mean
  ``mimic_weight`` over the scored run's epochs.
* **Choosing k** on a held-out split *of the scored samples only*: a seeded fraction of them is
  predicted from the rest for every candidate k, and the k with the highest Spearman ρ between
  predicted and true mean scores wins (ties: the smaller k). Unscored samples never enter that
  choice. The split's ρ is printed and stored in stats.json.
* **Blocked search.** Similarities are computed block by block (``block_size`` queries ×
  ``reference_block`` scored samples at most), each block's top-k merged into a running top-k, so
  the full N×M similarity matrix never exists. Torch on the CPU, or CUDA with ``--device cuda``.
* **Output**: a normal run directory (run.json, scores/ parts, stats.json, _SUCCESS) with the score
  schema plus a boolean ``extrapolated`` column, one row per sample at epoch 0 (step −1): scored
  samples keep their true (epoch-mean) scores, unscored ok samples get predictions
  (``loss``/``clip_score``/``ref_loss`` null), bad samples keep their status and null scores.
  ``filter`` and ``report`` read it like any score run.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from mimicfilter import __version__
from mimicfilter.errors import MimicfilterError
from mimicfilter.metrics import spearman
from mimicfilter.models import resolve_device
from mimicfilter.rundir import RUN_FILE, SUCCESS_FILE, finish_run_dir, prepare_run_dir
from mimicfilter.shards import part_name
from mimicfilter.tables import (
    EMBEDDING_COLUMN,
    EXTRAPOLATED_COLUMN,
    part_paths,
    read_part,
    score_schema,
    table_stats,
    write_part,
)

DEFAULT_K_CANDIDATES = (1, 2, 5, 10, 20, 50)
TARGETS = ("mimic_score", "mimic_weight")  # what is extrapolated, in this order
MIN_HOLDOUT = 3  # Spearman ρ needs a few points
DISTANCE_EPSILON = 1e-6


@dataclass(frozen=True)
class ExtrapolateConfig:
    """Everything ``mimicfilter extrapolate`` needs; validated once, up front."""

    scored: Path
    out_dir: Path
    embeddings: tuple[Path, ...] = ()
    k_candidates: tuple[int, ...] = DEFAULT_K_CANDIDATES
    weighted: bool = False
    same_label: bool = False
    holdout_fraction: float = 0.2
    block_size: int = 4096  # queries per similarity block
    reference_block: int = 65536  # scored samples per similarity block
    device: str = "cpu"
    seed: int = 0
    overwrite: bool = False
    argv: tuple[str, ...] = ()

    def __post_init__(self):
        if not self.k_candidates:
            raise MimicfilterError("--k: no candidate given", hint="e.g. --k 1,2,5,10,20,50 or --k 10")
        if any(k < 1 for k in self.k_candidates):
            raise MimicfilterError(f"--k {','.join(map(str, self.k_candidates))}: every k must be at least 1")
        object.__setattr__(self, "k_candidates", tuple(sorted(set(self.k_candidates))))
        if not 0 < self.holdout_fraction < 1:
            raise MimicfilterError(f"--holdout {self.holdout_fraction}: must lie strictly between 0 and 1")
        if self.block_size < 1 or self.reference_block < 1:
            raise MimicfilterError("--block-size and --reference-block must be at least 1")
        out = self.out_dir.resolve()
        for source in (self.scored, *self.embeddings):
            if Path(source).resolve() == out:
                raise MimicfilterError(f"--out {self.out_dir} is also an input run", hint="write to a new directory")


# ------------------------------------------------------------------------------------- kNN kernels


def knn_search(
    queries: torch.Tensor,
    reference: torch.Tensor,
    k: int,
    *,
    query_labels: torch.Tensor | None = None,
    reference_labels: torch.Tensor | None = None,
    block_size: int = 4096,
    reference_block: int = 65536,
    device: torch.device | str = "cpu",
    observer: Callable[[tuple[int, int]], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` cosine similarities of each query among ``reference`` (rows L2-normalised).

    Returns (similarities [Q, k] float32, indices [Q, k] int64) on the CPU, best first; slots
    without a neighbour (fewer than k reference rows, or none with the query's label when labels
    are given) hold −inf and index −1. Memory: one ``block_size`` × ``reference_block`` similarity
    block at a time (``observer`` is told each block's shape), plus the reference on ``device``.
    """
    device = torch.device(device)
    n_queries, n_reference = queries.shape[0], reference.shape[0]
    if queries.shape[1] != reference.shape[1]:
        raise MimicfilterError(f"embedding dimension mismatch: {queries.shape[1]} vs {reference.shape[1]}")
    reference = reference.to(device, torch.float32)
    labelled = query_labels is not None and reference_labels is not None
    if labelled:
        reference_labels = reference_labels.to(device)
    out_sims = torch.full((n_queries, k), float("-inf"))
    out_index = torch.full((n_queries, k), -1, dtype=torch.long)
    for q_start in range(0, n_queries, block_size):
        q = queries[q_start : q_start + block_size].to(device, torch.float32)
        best_sims = torch.full((q.shape[0], k), float("-inf"), device=device)
        best_index = torch.full((q.shape[0], k), -1, dtype=torch.long, device=device)
        q_labels = query_labels[q_start : q_start + block_size].to(device) if labelled else None
        for r_start in range(0, n_reference, reference_block):
            block = reference[r_start : r_start + reference_block]
            sims = q @ block.T
            if observer is not None:
                observer(tuple(sims.shape))
            if labelled:
                sims.masked_fill_(q_labels[:, None] != reference_labels[None, r_start : r_start + block.shape[0]],
                                  float("-inf"))
            top = sims.topk(min(k, sims.shape[1]), dim=1)
            merged_sims = torch.cat([best_sims, top.values], dim=1)
            merged_index = torch.cat([best_index, top.indices + r_start], dim=1)
            keep = merged_sims.topk(k, dim=1)
            best_sims = keep.values
            best_index = merged_index.gather(1, keep.indices)
            del sims, top, merged_sims, merged_index
        best_index[torch.isneginf(best_sims)] = -1
        out_sims[q_start : q_start + q.shape[0]] = best_sims.cpu()
        out_index[q_start : q_start + q.shape[0]] = best_index.cpu()
    return out_sims, out_index


def knn_predict(values: torch.Tensor, sims: torch.Tensor, index: torch.Tensor, weighted: bool) -> torch.Tensor:
    """Mean (or 1/(1−cos)-weighted mean) of the neighbours' ``values`` [M, C] → [Q, C].

    Rows with no valid neighbour get NaN.
    """
    valid = torch.isfinite(sims) & (index >= 0)
    if weighted:
        distance = (1.0 - sims.double()).clamp(min=0.0)
        weights = torch.where(valid, 1.0 / (distance + DISTANCE_EPSILON), torch.zeros((), dtype=torch.float64))
    else:
        weights = valid.double()
    neighbour_values = values.double()[index.clamp(min=0)]  # [Q, k, C]
    total = weights.sum(dim=1, keepdim=True)
    # first neighbour + weighted mean of the differences: exactly that value when all neighbours agree
    base = neighbour_values[:, 0, :]
    predicted = base + (weights[..., None] * (neighbour_values - base[:, None, :])).sum(dim=1) / total
    return torch.where(total > 0, predicted, torch.full_like(predicted, float("nan")))


@dataclass(frozen=True)
class KChoice:
    """The k chosen on the held-out split of the scored samples, and how every candidate did."""

    k: int
    spearman: float  # mimic_score, at k
    spearman_weight: float  # mimic_weight, at k
    spearman_by_k: dict[int, float]
    holdout: np.ndarray  # positions into the scored reference arrays
    train_size: int
    skipped_candidates: tuple[int, ...] = ()


def choose_k(
    embeddings: torch.Tensor,
    values: torch.Tensor,
    candidates: tuple[int, ...],
    *,
    labels: torch.Tensor | None = None,
    holdout_fraction: float = 0.2,
    seed: int = 0,
    weighted: bool = False,
    block_size: int = 4096,
    reference_block: int = 65536,
    device: torch.device | str = "cpu",
    observer: Callable | None = None,
) -> KChoice:
    """Pick k by Spearman ρ of predicted vs true mean score on a held-out split of the scored set.

    Takes only the scored samples (their embeddings, values [M, 2] and labels): the split is built
    from them alone.
    """
    count = embeddings.shape[0]
    holdout_size = max(MIN_HOLDOUT, int(round(count * holdout_fraction)))
    if count - holdout_size < 1:
        raise MimicfilterError(
            f"only {count} scored samples with embeddings: too few to hold out {MIN_HOLDOUT}+ and keep neighbours",
            hint="score more samples (or check that the scored run's samples have embeddings)",
        )
    train_size = count - holdout_size
    usable = tuple(k for k in candidates if k <= train_size)
    if not usable:
        raise MimicfilterError(
            f"--k {min(candidates)} is larger than the scored set's training split ({train_size} of {count} "
            f"scored samples; {holdout_size} are held out to choose k)",
            hint=f"pass --k {train_size} or less, or score more samples",
        )
    order = np.random.default_rng(seed).permutation(count)
    holdout, train = np.sort(order[:holdout_size]), np.sort(order[holdout_size:])
    hold_t, train_t = torch.as_tensor(holdout), torch.as_tensor(train)
    sims, index = knn_search(
        embeddings[hold_t], embeddings[train_t], max(usable),
        query_labels=None if labels is None else labels[hold_t],
        reference_labels=None if labels is None else labels[train_t],
        block_size=block_size, reference_block=reference_block, device=device, observer=observer,
    )
    train_values, true_values = values[train_t], values[hold_t].numpy()
    by_k, by_k_weight = {}, {}
    for k in usable:
        predicted = knn_predict(train_values, sims[:, :k], index[:, :k], weighted).numpy()
        predicted = np.where(np.isnan(predicted), np.nanmean(train_values.numpy(), axis=0), predicted)
        by_k[k] = spearman(predicted[:, 0], true_values[:, 0])
        by_k_weight[k] = spearman(predicted[:, 1], true_values[:, 1])
    best = max(usable, key=lambda k: (np.nan_to_num(by_k[k], nan=-2.0), -k))
    return KChoice(best, by_k[best], by_k_weight[best], by_k, holdout, train_size,
                   tuple(k for k in candidates if k not in usable))


# ----------------------------------------------------------------------------------- reading runs


@dataclass
class _Source:
    path: Path
    info: dict[str, Any]
    space: dict[str, Any] | None


def _open_run(path: Path, role: str) -> _Source:
    if not path.is_dir() or not (path / RUN_FILE).is_file():
        raise MimicfilterError(f"{role} {path} is not a mimicfilter run directory (no run.json)",
                               hint="pass a `score --out` / `embed --out` directory")
    if not (path / SUCCESS_FILE).exists():
        raise MimicfilterError(f"{role} {path} has not finished (no _SUCCESS)",
                               hint="re-run the command that made it to complete it")
    info = json.loads((path / RUN_FILE).read_text())
    return _Source(path, info, info.get("embedding"))


def _embeddings_numpy(column: pa.ChunkedArray | pa.Array, dim: int) -> np.ndarray:
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    flat = array.flatten().to_numpy(zero_copy_only=False)
    return np.asarray(flat, dtype=np.float16).reshape(-1, dim)


def _check_spaces(sources: list[_Source]) -> dict[str, Any]:
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
class _Scored:
    """The scored run, one entry per sample (shard, key), as numpy/arrow columns."""

    table: pa.Table  # shard, key, uid, index, status, error, mimic_score, mimic_weight, loss, clip_score, ref_loss, label, epochs
    position: dict[tuple[str, str], int]


def _read_scored(source: _Source) -> _Scored:
    from mimicfilter.aggregate import connect, sql_string

    parts = [str(part) for part in part_paths(source.path)]
    if not parts:
        raise MimicfilterError(f"scored run {source.path} holds no score parts", hint="pass a `score --out` directory")
    connection = connect()
    listing = ", ".join(sql_string(part) for part in parts)
    table = connection.sql(
        f"""
        SELECT shard, key, any_value(uid) AS uid, min("index")::INTEGER AS "index",
               arg_max(status, epoch) AS status, arg_max(error, epoch) AS error,
               avg(mimic_score) AS mimic_score, avg(mimic_weight) AS mimic_weight, avg(loss) AS loss,
               avg(clip_score) AS clip_score, avg(ref_loss) AS ref_loss, any_value(label)::INTEGER AS label,
               count(*)::INTEGER AS epochs
        FROM read_parquet([{listing}], union_by_name = true)
        GROUP BY shard, key ORDER BY shard, "index", key
        """
    ).to_arrow_table()
    shards, keys = table.column("shard").to_pylist(), table.column("key").to_pylist()
    return _Scored(table, {(shard, key): row for row, (shard, key) in enumerate(zip(shards, keys))})


def _scored_run_embeddings(source: _Source, scored: _Scored) -> dict[int, np.ndarray]:
    """Scored-table position → embedding, from the scored run's own ``embedding`` column (first epoch)."""
    found: dict[int, np.ndarray] = {}
    dim = source.space["dim"]
    for part in part_paths(source.path):
        table = read_part(part, columns=["shard", "key", "epoch", EMBEDDING_COLUMN])
        table = table.filter(pc.is_valid(table.column(EMBEDDING_COLUMN)))
        if not table.num_rows:
            continue
        vectors = _embeddings_numpy(table.column(EMBEDDING_COLUMN), dim)
        for row, (shard, key) in enumerate(zip(table.column("shard").to_pylist(), table.column("key").to_pylist())):
            position = scored.position.get((shard, key))
            if position is not None and position not in found:
                found[position] = vectors[row]
    return found


def _embed_parts(source: _Source) -> list[Path]:
    parts = part_paths(source.path)
    if not parts:
        raise MimicfilterError(f"embeddings run {source.path} holds no parts", hint="pass an `embed --out` directory")
    return parts


def _read_embed_part(path: Path) -> pa.Table:
    table = pq.read_table(path)
    if EMBEDDING_COLUMN not in table.column_names:
        raise MimicfilterError(f"{path} has no embedding column", hint="pass an `embed --out` directory")
    return table


def _iter_embed_parts(sources: list[_Source]) -> Iterator[tuple[_Source, Path]]:
    for source in sources:
        for part in _embed_parts(source):
            yield source, part


# ------------------------------------------------------------------------------------------ output


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


def _scored_rows(scored: _Scored, rows: list[int]) -> dict[str, list]:
    taken = scored.table.take(pa.array(rows, type=pa.int64()))
    count = len(rows)
    columns = {name: taken.column(name).to_pylist()
               for name in ("shard", "key", "uid", "index", "status", "error", "mimic_score", "mimic_weight", "loss",
                            "clip_score", "ref_loss", "label")}
    columns |= {"epoch": _fill(count, 0), "step": _fill(count, -1), "extrapolated": _fill(count, False)}
    return columns


def _concat(first: dict[str, list], second: dict[str, list]) -> dict[str, list]:
    names = set(first) | set(second)
    n1 = len(next(iter(first.values()))) if first else 0
    n2 = len(next(iter(second.values()))) if second else 0
    return {name: first.get(name, _fill(n1, None)) + second.get(name, _fill(n2, None)) for name in names}


# ------------------------------------------------------------------------------------------- driver


def _fingerprint(config: ExtrapolateConfig, scored: _Source, embedding_sources: list[_Source], device: torch.device) -> dict:
    return {
        "format": 1,
        "kind": "extrapolate",
        "scored": scored.info.get("fingerprint"),
        "embeddings": [source.info.get("fingerprint") for source in embedding_sources],
        "k_candidates": list(config.k_candidates),
        "weighted": config.weighted,
        "same_label": config.same_label,
        "holdout_fraction": config.holdout_fraction,
        "seed": config.seed,
        "device_type": device.type,
    }


def run_extrapolate(config: ExtrapolateConfig, observer: Callable | None = None, echo: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Extrapolate the scored run's per-sample scores to the embedded samples; returns the stats.

    ``observer`` (tests) is told the shape of every similarity block; ``echo`` gets progress lines.
    """
    started = time.time()
    say = echo or (lambda message: None)
    device = resolve_device(config.device)
    scored_source = _open_run(Path(config.scored), "--scored run")
    embedding_sources = [_open_run(Path(path), "--embeddings run") for path in config.embeddings]
    for source in embedding_sources:
        if source.space is None:
            raise MimicfilterError(f"{source.path} holds no embeddings",
                                   hint="make it with `mimicfilter embed` or `score --save-embeddings`")
    spaces = [source for source in [scored_source, *embedding_sources] if source.space is not None]
    if not spaces:
        raise MimicfilterError(
            f"no embeddings: {config.scored} was scored without --save-embeddings and no --embeddings run is given",
            hint="embed the pool with `mimicfilter embed` and pass --embeddings RUN",
        )
    space = _check_spaces(spaces)
    dim = int(space["dim"])

    # 1. the scored samples: per-sample means, and their embeddings
    scored = _read_scored(scored_source)
    say(f"scored run: {scored.table.num_rows} samples")
    vectors: dict[int, np.ndarray] = {}
    if scored_source.space is not None:
        vectors = _scored_run_embeddings(scored_source, scored)
    mean_score = scored.table.column("mimic_score").to_numpy(zero_copy_only=False)
    mean_weight = scored.table.column("mimic_weight").to_numpy(zero_copy_only=False)
    statuses = scored.table.column("status").to_pylist()
    has_score = np.array([status == "ok" for status in statuses]) & ~np.isnan(np.asarray(mean_score, dtype=float))
    wanted = {position for position in np.flatnonzero(has_score).tolist() if position not in vectors}
    if wanted:  # scored samples without a saved embedding: look them up in the embeddings runs
        for _, part in _iter_embed_parts(embedding_sources):
            table = _read_embed_part(part)
            table = table.filter(pc.is_valid(table.column(EMBEDDING_COLUMN)))
            if not table.num_rows:
                continue
            rows = [(row, scored.position.get(pair)) for row, pair in
                    enumerate(zip(table.column("shard").to_pylist(), table.column("key").to_pylist()))]
            rows = [(row, position) for row, position in rows if position in wanted]
            if rows:
                block = _embeddings_numpy(table.column(EMBEDDING_COLUMN), dim)
                for row, position in rows:
                    vectors[position] = block[row]
                    wanted.discard(position)
    reference_positions = np.array(sorted(p for p in vectors if has_score[p]), dtype=np.int64)
    if not len(reference_positions):
        raise MimicfilterError(
            f"none of the {int(has_score.sum())} scored samples of {config.scored} has an embedding",
            hint="score with --save-embeddings, or embed the scored shards too (same shard paths as when scoring)",
        )
    reference = torch.from_numpy(np.stack([vectors[p] for p in reference_positions]).astype(np.float32))
    reference_values = torch.from_numpy(np.stack([np.asarray(mean_score, dtype=np.float64)[reference_positions],
                                                  np.asarray(mean_weight, dtype=np.float64)[reference_positions]], 1))
    reference_labels = None
    if config.same_label:
        labels = scored.table.column("label").to_numpy(zero_copy_only=False)
        labels = np.asarray(labels, dtype=float)[reference_positions]
        if np.isnan(labels).any():
            raise MimicfilterError("--same-label needs labels, and scored samples without one were found",
                                   hint="--same-label is for classification runs (shards with .cls)")
        reference_labels = torch.from_numpy(labels.astype(np.int64))
    del vectors

    # 2. k, on a held-out split of the scored samples only
    knn_started = time.time()
    choice = choose_k(reference, reference_values, config.k_candidates, labels=reference_labels,
                      holdout_fraction=config.holdout_fraction, seed=config.seed, weighted=config.weighted,
                      block_size=config.block_size, reference_block=config.reference_block, device=device,
                      observer=observer)
    say(f"held-out split: {len(choice.holdout)} of {len(reference_positions)} scored samples; Spearman rho by k: "
        + ", ".join(f"k={k}: {rho:.3f}" for k, rho in choice.spearman_by_k.items())
        + f" -> k = {choice.k} (rho {choice.spearman:.3f})")

    # 3. the run directory
    provenance = {
        "mimicfilter_version": __version__,
        "command": "extrapolate",
        "argv": list(config.argv) or sys.argv,
        "scored_run": str(config.scored),
        "embeddings_runs": [str(path) for path in config.embeddings],
        "embedding": space,
        "k": choice.k,
        "k_candidates": list(config.k_candidates),
        "weighted": config.weighted,
        "same_label": config.same_label,
        "holdout_fraction": config.holdout_fraction,
        "seed": config.seed,
        "device": str(device),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    run_dir = config.out_dir
    prepare_run_dir(run_dir, _fingerprint(config, scored_source, embedding_sources, device), provenance,
                    config.overwrite)

    # 4. predict, one output part per shard
    fallback_value = reference_values.mean(dim=0)
    scored_by_shard: dict[str, list[int]] = {}
    for position, shard in enumerate(scored.table.column("shard").to_pylist()):
        scored_by_shard.setdefault(shard, []).append(position)
    done_shards: set[str] = set()
    extrapolated = fallbacks = written = 0
    for _, part in _iter_embed_parts(embedding_sources):
        table = _read_embed_part(part)
        if not table.num_rows:
            continue
        shard = table.column("shard")[0].as_py()
        if shard in done_shards:
            continue  # the same shard in two embeddings runs: the first wins
        done_shards.add(shard)
        out_path = run_dir / "scores" / f"{part_name(shard)}.parquet"
        if out_path.exists():
            continue  # resume
        keys = table.column("key").to_pylist()
        unscored = np.array([(shard, key) not in scored.position for key in keys], dtype=bool)
        new = table.filter(pa.array(unscored))
        ok = np.array([status == "ok" for status in new.column("status").to_pylist()], dtype=bool) & \
            np.asarray(new.column(EMBEDDING_COLUMN).is_valid().to_numpy(zero_copy_only=False), dtype=bool)
        count = new.num_rows
        predicted = np.full((count, len(TARGETS)), np.nan)
        if ok.any():
            queries = new.filter(pa.array(ok))
            query_vectors = torch.from_numpy(_embeddings_numpy(queries.column(EMBEDDING_COLUMN), dim).astype(np.float32))
            query_labels = None
            if reference_labels is not None:
                labels = np.asarray(queries.column("label").to_numpy(zero_copy_only=False), dtype=float)
                if np.isnan(labels).any():
                    raise MimicfilterError(f"--same-label: {part} has ok samples without a label",
                                           hint="--same-label is for classification runs")
                query_labels = torch.from_numpy(labels.astype(np.int64))
            sims, index = knn_search(query_vectors, reference, choice.k, query_labels=query_labels,
                                     reference_labels=reference_labels, block_size=config.block_size,
                                     reference_block=config.reference_block, device=device, observer=observer)
            values = knn_predict(reference_values, sims, index, config.weighted)
            missing = torch.isnan(values[:, 0])
            fallbacks += int(missing.sum())
            values[missing] = fallback_value
            predicted[ok] = values.numpy()
            extrapolated += int(ok.sum())
        columns = {name: new.column(name).to_pylist() for name in ("shard", "key", "uid", "index", "status", "error", "label")}
        columns |= {
            "epoch": _fill(count, 0),
            "step": _fill(count, -1),
            "mimic_score": [None if np.isnan(v) else float(v) for v in predicted[:, 0]],
            "mimic_weight": [None if np.isnan(v) else float(v) for v in predicted[:, 1]],
            "extrapolated": ok.tolist(),
        }
        rows = scored_by_shard.pop(shard, [])
        if rows:
            columns = _concat(columns, _scored_rows(scored, rows))
        write_part(_output_table(columns, count + len(rows)), out_path)
        written += 1
    for shard, rows in scored_by_shard.items():  # shards only the scored run has
        if shard in done_shards:
            continue
        out_path = run_dir / "scores" / f"{part_name(shard)}.parquet"
        if not out_path.exists():
            write_part(_output_table(_scored_rows(scored, rows), len(rows)), out_path)
            written += 1
    knn_seconds = time.time() - knn_started

    # 5. stats
    counted = table_stats(run_dir, flag_column=EXTRAPOLATED_COLUMN)
    flagged = counted.pop(f"{EXTRAPOLATED_COLUMN}_rows")
    finished = time.time()
    stats = {
        "command": "extrapolate",
        **counted,
        "scored_samples": int(has_score.sum()),
        "reference_samples": int(len(reference_positions)),
        "extrapolated_samples": flagged,
        "extrapolated_now": extrapolated,
        "fallback_samples": fallbacks,
        "k": choice.k,
        "k_candidates": list(config.k_candidates),
        "k_skipped": list(choice.skipped_candidates),
        "heldout_size": int(len(choice.holdout)),
        "heldout_train_size": choice.train_size,
        "heldout_spearman": choice.spearman,
        "heldout_spearman_weight": choice.spearman_weight,
        "heldout_spearman_by_k": {str(k): rho for k, rho in choice.spearman_by_k.items()},
        "weighted": config.weighted,
        "same_label": config.same_label,
        "embedding_dim": dim,
        "parts_written_now": written,
        "knn_seconds": round(knn_seconds, 3),
        "wall_seconds": round(finished - started, 3),
        "device": str(device),
        "run_dir": str(run_dir),
        "cpu_count": os.cpu_count(),
    }
    finish_run_dir(run_dir, stats)
    return stats

