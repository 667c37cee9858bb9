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

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import torch

from mimicfilter.errors import MimicfilterError
from mimicfilter.extrapolate.knn import KChoice, choose_k, knn_predict, knn_search
from mimicfilter.extrapolate.sources import (
    Scored,
    Source,
    check_spaces,
    embeddings_numpy,
    iter_embed_parts,
    open_run,
    read_embed_part,
    read_scored,
    scored_run_embeddings,
)
from mimicfilter.mimic.device import resolve_device
from mimicfilter.store.parts import part_path, table_stats, write_part
from mimicfilter.store.rundir import RunDirectory
from mimicfilter.store.schema import EMBEDDING_COLUMN, EXTRAPOLATED_COLUMN, score_schema

DEFAULT_K_CANDIDATES = (1, 2, 5, 10, 20, 50)


TARGETS = ("mimic_score", "mimic_weight")  # what is extrapolated, in this order



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


def _fingerprint(config: ExtrapolateConfig, scored: Source, embedding_sources: list[Source], device: torch.device) -> dict:
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



# ------------------------------------------------------------------------------------- the steps


@dataclass
class ReferenceSet:
    """The scored samples that have an embedding: the neighbours every prediction is drawn from."""

    positions: np.ndarray  # rows of the scored table
    embeddings: torch.Tensor  # [M, D] float32
    values: torch.Tensor  # [M, 2]: mean mimic score, mean relative weight
    labels: torch.Tensor | None  # with --same-label
    scored_samples: int  # scored samples with a score (some may lack an embedding)


def open_sources(config: ExtrapolateConfig) -> tuple[Source, list[Source], dict[str, Any]]:
    """Step 1: the scored run, the embeddings runs, and the one embedding space they share."""
    scored_source = open_run(Path(config.scored), "--scored run")
    embedding_sources = [open_run(Path(path), "--embeddings run") for path in config.embeddings]
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
    return scored_source, embedding_sources, check_spaces(spaces)


def _embeddings_of_scored(scored_source: Source, embedding_sources: list[Source], scored: Scored,
                          has_score: np.ndarray, dim: int) -> dict[int, np.ndarray]:
    """Scored-table position → embedding: the scored run's own, else looked up in the embeddings runs."""
    vectors = scored_run_embeddings(scored_source, scored) if scored_source.space is not None else {}
    wanted = {position for position in np.flatnonzero(has_score).tolist() if position not in vectors}
    if not wanted:
        return vectors
    for _, part in iter_embed_parts(embedding_sources):
        table = read_embed_part(part)
        table = table.filter(table.column(EMBEDDING_COLUMN).is_valid())
        if not table.num_rows:
            continue
        rows = [(row, scored.position.get(pair)) for row, pair in
                enumerate(zip(table.column("shard").to_pylist(), table.column("key").to_pylist()))]
        rows = [(row, position) for row, position in rows if position in wanted]
        if rows:
            block = embeddings_numpy(table.column(EMBEDDING_COLUMN), dim)
            for row, position in rows:
                vectors[position] = block[row]
                wanted.discard(position)
    return vectors


def reference_set(config: ExtrapolateConfig, scored_source: Source, embedding_sources: list[Source], scored: Scored,
                  dim: int) -> ReferenceSet:
    """Step 2: the scored samples' targets (epoch means), embeddings and (with --same-label) labels."""
    mean_score = np.asarray(scored.table.column("mimic_score").to_numpy(zero_copy_only=False), dtype=np.float64)
    mean_weight = np.asarray(scored.table.column("mimic_weight").to_numpy(zero_copy_only=False), dtype=np.float64)
    statuses = scored.table.column("status").to_pylist()
    has_score = np.array([status == "ok" for status in statuses]) & ~np.isnan(mean_score)
    vectors = _embeddings_of_scored(scored_source, embedding_sources, scored, has_score, dim)
    positions = np.array(sorted(p for p in vectors if has_score[p]), dtype=np.int64)
    if not len(positions):
        raise MimicfilterError(
            f"none of the {int(has_score.sum())} scored samples of {config.scored} has an embedding",
            hint="score with --save-embeddings, or embed the scored shards too (same shard paths as when scoring)",
        )
    embeddings = torch.from_numpy(np.stack([vectors[p] for p in positions]).astype(np.float32))
    values = torch.from_numpy(np.stack([mean_score[positions], mean_weight[positions]], 1))
    labels = None
    if config.same_label:
        label_values = np.asarray(scored.table.column("label").to_numpy(zero_copy_only=False), dtype=float)[positions]
        if np.isnan(label_values).any():
            raise MimicfilterError("--same-label needs labels, and scored samples without one were found",
                                   hint="--same-label is for classification runs (shards with .cls)")
        labels = torch.from_numpy(label_values.astype(np.int64))
    return ReferenceSet(positions, embeddings, values, labels, int(has_score.sum()))


@dataclass
class _Predicted:
    parts_written: int = 0
    extrapolated: int = 0
    fallbacks: int = 0  # samples without a valid neighbour: they get the scored set's mean


def _predict(new: pa.Table, part: Path, reference: ReferenceSet, choice: KChoice, config: ExtrapolateConfig, dim: int,
             device: torch.device, observer: Callable | None, counts: _Predicted) -> tuple[np.ndarray, np.ndarray]:
    """(predicted [N, 2] with NaN where nothing is predicted, extrapolated mask) for the unscored rows ``new``."""
    ok = np.array([status == "ok" for status in new.column("status").to_pylist()], dtype=bool) & \
        np.asarray(new.column(EMBEDDING_COLUMN).is_valid().to_numpy(zero_copy_only=False), dtype=bool)
    predicted = np.full((new.num_rows, len(TARGETS)), np.nan)
    if not ok.any():
        return predicted, ok
    queries = new.filter(pa.array(ok))
    query_vectors = torch.from_numpy(embeddings_numpy(queries.column(EMBEDDING_COLUMN), dim).astype(np.float32))
    query_labels = None
    if reference.labels is not None:
        labels = np.asarray(queries.column("label").to_numpy(zero_copy_only=False), dtype=float)
        if np.isnan(labels).any():
            raise MimicfilterError(f"--same-label: {part} has ok samples without a label",
                                   hint="--same-label is for classification runs")
        query_labels = torch.from_numpy(labels.astype(np.int64))
    sims, index = knn_search(query_vectors, reference.embeddings, choice.k, query_labels=query_labels,
                             reference_labels=reference.labels, block_size=config.block_size,
                             reference_block=config.reference_block, device=device, observer=observer)
    values = knn_predict(reference.values, sims, index, config.weighted)
    missing = torch.isnan(values[:, 0])
    counts.fallbacks += int(missing.sum())
    values[missing] = reference.values.mean(dim=0)
    predicted[ok] = values.numpy()
    counts.extrapolated += int(ok.sum())
    return predicted, ok


def write_predictions(run_dir: Path, config: ExtrapolateConfig, embedding_sources: list[Source], scored: Scored,
                      reference: ReferenceSet, choice: KChoice, dim: int, device: torch.device,
                      observer: Callable | None) -> _Predicted:
    """Step 4: one output part per shard: predictions for unscored samples, the scored samples' own
    scores; parts that exist are kept (resume)."""
    counts = _Predicted()
    scored_by_shard: dict[str, list[int]] = {}
    for position, shard in enumerate(scored.table.column("shard").to_pylist()):
        scored_by_shard.setdefault(shard, []).append(position)
    done_shards: set[str] = set()
    for _, part in iter_embed_parts(embedding_sources):
        table = read_embed_part(part)
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
        predicted, extrapolated = _predict(new, part, reference, choice, config, dim, device, observer, counts)
        count = new.num_rows
        columns = {name: new.column(name).to_pylist() for name in ("shard", "key", "uid", "index", "status", "error", "label")}
        columns |= {
            "epoch": _fill(count, 0),
            "step": _fill(count, -1),
            "mimic_score": [None if np.isnan(v) else float(v) for v in predicted[:, 0]],
            "mimic_weight": [None if np.isnan(v) else float(v) for v in predicted[:, 1]],
            "extrapolated": extrapolated.tolist(),
        }
        rows = scored_by_shard.pop(shard, [])
        if rows:
            columns = _concat(columns, _scored_rows(scored, rows))
        write_part(_output_table(columns, count + len(rows)), out_path)
        counts.parts_written += 1
    for shard, rows in scored_by_shard.items():  # shards only the scored run has
        out_path = part_path(run_dir, shard)
        if shard not in done_shards and not out_path.exists():
            write_part(_output_table(_scored_rows(scored, rows), len(rows)), out_path)
            counts.parts_written += 1
    return counts


def run_extrapolate(config: ExtrapolateConfig, observer: Callable | None = None,
                    echo: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Extrapolate the scored run's per-sample scores to the embedded samples; returns the stats.

    ``observer`` (tests) is told the shape of every similarity block; ``echo`` gets progress lines.
    """
    say = echo or (lambda message: None)
    run = RunDirectory(config.out_dir, "extrapolate", config.argv)
    device = resolve_device(config.device)
    scored_source, embedding_sources, space = open_sources(config)
    dim = int(space["dim"])
    scored = read_scored(scored_source)
    say(f"scored run: {scored.table.num_rows} samples")
    reference = reference_set(config, scored_source, embedding_sources, scored, dim)

    # step 3: k, on a held-out split of the scored samples only
    knn_started = time.time()
    choice = choose_k(reference.embeddings, reference.values, config.k_candidates, labels=reference.labels,
                      holdout_fraction=config.holdout_fraction, seed=config.seed, weighted=config.weighted,
                      block_size=config.block_size, reference_block=config.reference_block, device=device,
                      observer=observer)
    say(f"held-out split: {len(choice.holdout)} of {len(reference.positions)} scored samples; Spearman rho by k: "
        + ", ".join(f"k={k}: {rho:.3f}" for k, rho in choice.spearman_by_k.items())
        + f" -> k = {choice.k} (rho {choice.spearman:.3f})")

    provenance = {
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
    }
    run.open(_fingerprint(config, scored_source, embedding_sources, device), provenance, config.overwrite)
    counts = write_predictions(config.out_dir, config, embedding_sources, scored, reference, choice, dim, device,
                               observer)
    knn_seconds = time.time() - knn_started

    # step 5: stats
    counted = table_stats(config.out_dir, flag_column=EXTRAPOLATED_COLUMN)
    flagged = counted.pop(f"{EXTRAPOLATED_COLUMN}_rows")
    return run.finish(run.stats({
        **counted,
        "scored_samples": reference.scored_samples,
        "reference_samples": int(len(reference.positions)),
        "extrapolated_samples": flagged,
        "extrapolated_now": counts.extrapolated,
        "fallback_samples": counts.fallbacks,
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
        "parts_written_now": counts.parts_written,
        "knn_seconds": round(knn_seconds, 3),
        "device": str(device),
    }))
