"""Score extrapolation: predict the mimic scores of unscored samples from their scored neighbours.

Score a subset with the (expensive) trajectory; embed the rest (``embed``, ``score
--save-embeddings``) or bring the embeddings the pool already has (``--features-from``: DataComp
.npz files or Parquet, :mod:`~mimicfilter.extrapolate.external`); then predict each unscored
sample's per-sample mean mimic score and relative weight from the scored samples most like it
(:mod:`~mimicfilter.extrapolate.features`), by kNN or by a small GNN over the kNN graph.

The steps (:func:`run_extrapolate`):

1. **Inputs**: the scored run, the embedding source and its one space, the work units (one per input
   file; the scored rows of shards no input covers are units too).
2. **Reference set**: the scored samples' targets (epoch means) and embeddings; a scored sample
   without one is counted and reported (it keeps its scored row). ``--features-from`` files with
   an id twice, or without any scored sample, are refused here, before anything is written.
3. **Fit**, on a held-out split of the scored samples only: the faiss index over the scored side
   (:mod:`~mimicfilter.extrapolate.index`), k or the GNN's epoch, the feature set; the held-out
   Spearman ρ is printed and stored, and below ``--min-rho`` the run is marked untrusted.
4. **Save** the extrapolator in the run directory (:mod:`~mimicfilter.extrapolate.saved`), once.
5. **Stream** the units through the local loop, forked workers, Ray actors or this rank's share
   (:mod:`~mimicfilter.extrapolate.stream`): one part per unit, exactly once.
6. **Stats** from the parts; ``_SUCCESS`` once every unit's part exists.

The output is a score run (one row per sample, epoch 0, step −1, an ``extrapolated`` column) that
``filter`` and ``report`` read like any other.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from mimicfilter.errors import MimicfilterError
from mimicfilter.execute.local import OrderedPool
from mimicfilter.execute.ray import run_with_ray
from mimicfilter.extrapolate import saved as saved_module
from mimicfilter.extrapolate.config import ExtrapolateConfig, files_digest
from mimicfilter.extrapolate.external import ExternalFile, open_features, row_count, scored_vectors_from_files
from mimicfilter.extrapolate.external_ids import check_unique_ids, first_id, no_match_error, sample_ids
from mimicfilter.extrapolate.fit import describe, fit, fit_record
from mimicfilter.extrapolate.methods import ReferenceSet, SearchSettings
from mimicfilter.extrapolate.features import Embedded
from mimicfilter.extrapolate.sources import Scored, Source, check_spaces, open_run, read_scored, scored_vectors_from_runs
from mimicfilter.extrapolate.stream import LazyWorker, Reading, Unit, UnitWorkerFactory, part_counts
from mimicfilter.mimic.device import resolve_device
from mimicfilter.store.parts import part_paths, table_stats
from mimicfilter.store.guard import Inputs as GuardedInputs, Output, guard_outputs
from mimicfilter.store.paths import RUN_FILE, part_path
from mimicfilter.store.rundir import RunDirectory, run_record, unfinish_for, write_rank_stats
from mimicfilter.store.schema import EXTRAPOLATED_COLUMN


@dataclass
class Inputs:
    """Step 1: the scored run, the embedding source, its space, and the work units."""

    scored_source: Source
    embedding_sources: list[Source]
    files: list[ExternalFile]
    reading: Reading
    space: dict[str, Any]
    units: list[Unit]
    duplicate_units: int  # input files naming a shard an earlier input already covers (the first wins)
    query_count: int  # samples in the input units

    @property
    def external(self) -> bool:
        return bool(self.files)


def _run_units(source: Source) -> list[Unit]:
    if (source.info.get("train") or {}).get("mode", "none") != "none":
        raise MimicfilterError(f"--embeddings {source.path} is a trajectory run (its parts are epochs, not shards)",
                               hint="pass it as --scored; --embeddings takes `embed` or `score --train none` runs")
    units = []
    for shard in source.info.get("shards", []):
        part = part_path(source.path, shard)
        if not part.exists():
            raise MimicfilterError(f"--embeddings {source.path} has no part for {shard}",
                                   hint="re-run the command that made it to complete it")
        units.append(Unit("embed", str(part), shard))
    return units


def open_inputs(config: ExtrapolateConfig, scored: Scored | None = None) -> tuple[Inputs, Scored]:
    scored_source = open_run(Path(config.scored), "--scored run")
    if scored_source.info.get("command") != "score":
        raise MimicfilterError(f"--scored {config.scored} was written by `mimicfilter "
                               f"{scored_source.info.get('command')}`: only measured scores can be extrapolated",
                               hint="pass the `mimicfilter score --out` directory")
    embedding_sources = [open_run(Path(path), "--embeddings run") for path in config.embeddings]
    files: list[ExternalFile] = []
    if config.features_from is not None:
        opened = open_features(config.features_from)
        files = opened.files
        space = opened.space | {"files_sha1": files_digest([f.path for f in files])}
        reading = Reading(opened.columns, opened.dim, config.features_from.id_column)
        units = [Unit(file.layout, file.path, file.path) for file in files]
    else:
        for source in embedding_sources:
            if source.space is None:
                raise MimicfilterError(f"{source.path} holds no embeddings",
                                       hint="make it with `mimicfilter embed` or `score --save-embeddings`")
        spaced = [source for source in [scored_source, *embedding_sources] if source.space is not None]
        if not spaced:
            raise MimicfilterError(
                f"no embeddings: {config.scored} was scored without --save-embeddings and no --embeddings run is given",
                hint="embed the pool with `mimicfilter embed` and pass --embeddings RUN, or --features-from FILES")
        space = check_spaces(spaced)
        reading = Reading(spaced[0].columns, int(space["dim"]))
        units = [unit for source in embedding_sources for unit in _run_units(source)]
    scored = scored or read_scored(scored_source)
    kept: dict[str, Unit] = {}
    for unit in units:
        kept.setdefault(unit.shard, unit)
    query_count = sum(row_count(ExternalFile(u.path, u.kind)) if u.kind != "embed" else pq.ParquetFile(u.path).metadata.num_rows
                      for u in kept.values())
    covered = set(kept)
    scored_only = [Unit("scored", shard, shard) for shard in sorted(scored.table.column("shard").unique().to_pylist())
                   if shard not in covered]
    return Inputs(scored_source, embedding_sources, files, reading, space, [*kept.values(), *scored_only],
                  len(units) - len(kept), query_count), scored


def reference_set(config: ExtrapolateConfig, inputs: Inputs, scored: Scored) -> tuple[ReferenceSet, np.ndarray]:
    """Step 2: the scored samples' targets, embeddings and (with --same-label) labels; and the
    positions of scored samples with a score but no embedding."""
    reading = inputs.reading
    if inputs.external:
        found = scored_vectors_from_files(inputs.files, scored, reading.columns, reading.id_column, reading.dim)
    else:
        found = scored_vectors_from_runs(inputs.scored_source, inputs.embedding_sources, scored, reading.columns,
                                         reading.dim)
    if not len(found.rows):
        what = f"none of the {int(scored.wanted().sum())} scored samples of {config.scored} can be used"
        if inputs.external:  # every file's ids were read: none is a scored sample's
            wanted = scored.table.column(reading.id_column).filter(pa.array(scored.wanted()))
            raise no_match_error(what, reading.id_column, first_id(sample_ids(inputs.files, reading.id_column)),
                                 first_id(wanted))
        raise MimicfilterError(f"{what}: none has an embedding",
                               hint="score with --save-embeddings, or embed the scored shards too (same shard paths "
                               "as when scoring)")
    vectors = torch.from_numpy(found.vectors)
    embedded = Embedded(vectors[:, 0], vectors[:, 1] if vectors.shape[1] > 1 else None)
    positions = found.rows
    column = lambda name: np.asarray(scored.table.column(name).to_numpy(zero_copy_only=False), dtype=np.float64)[positions]
    values = torch.from_numpy(np.stack([column("mimic_score"), column("mimic_weight")], 1))
    labels = None
    if config.same_label:
        label_values = column("label")
        if np.isnan(label_values).any():
            raise MimicfilterError("--same-label needs labels, and scored samples without one were found",
                                   hint="--same-label is for classification runs (shards with .cls)")
        labels = torch.from_numpy(label_values.astype(np.int64))
    shards = np.asarray(scored.table.column("shard").to_pylist(), dtype=object)[positions]
    return ReferenceSet(positions, embedded, values, labels, int(scored.wanted().sum()), shards), found.missing


def _fingerprint(config: ExtrapolateConfig, inputs: Inputs, device: torch.device) -> dict:
    return json.loads(json.dumps({
        "format": 3,
        "kind": "extrapolate",
        "scored": inputs.scored_source.info.get("fingerprint"),
        "embeddings": [source.info.get("fingerprint") for source in inputs.embedding_sources],
        **({"features_from": inputs.space} if inputs.external else {}),
        **config.choices(),
        "device_type": device.type,
    }, default=str))


def _execute(config: ExtrapolateConfig, inputs: Inputs, pending: list[Unit], settings: SearchSettings) -> tuple[str, tuple[str, ...]]:
    """Step 5: every pending unit's part, on Ray, forked workers or in this process."""
    if config.ray is not None:  # actors get a picklable copy, and never touch a GPU Ray did not assign
        ray_settings = dataclasses.replace(settings, observer=None,
                                           device=settings.device if config.ray.gpus_per_task else "cpu")
        factory = UnitWorkerFactory(config.out_dir, inputs.reading, ray_settings, max(1, int(config.ray.cpus_per_task)))
        result = run_with_ray(pending, factory, config.ray)
        return f"ray ({result.actors} actors)", result.failures
    if config.workers:
        factory = UnitWorkerFactory(config.out_dir, inputs.reading, settings, config.threads or 1)
        with OrderedPool(LazyWorker(factory), config.workers, window=2 * config.workers) as pool:
            for _ in pool.map(pending):
                pass
        return f"local ({config.workers} workers)", ()
    worker = UnitWorkerFactory(config.out_dir, inputs.reading, settings, config.threads)()
    for unit in pending:
        worker(unit)
    return "local", ()


def _counts(run_dir: Path) -> dict[str, int]:
    totals = {"overlap": 0, "fallbacks": 0}
    for part in part_paths(run_dir):
        counts = part_counts(part)
        for name in totals:
            totals[name] += int(counts.get(name, 0))
    return totals


def run_extrapolate(config: ExtrapolateConfig, observer: Callable[[int], None] | None = None,
                    echo: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Extrapolate the scored run's per-sample scores to the embedded samples; returns the stats.

    ``observer`` (tests) is told the size of every block of queries searched; ``echo`` gets progress lines.
    """
    say = echo or (lambda message: None)
    run = RunDirectory(config.out_dir, "extrapolate", config.argv)
    external = config.features_from.paths if config.features_from is not None else ()
    guard_outputs([Output("--out", config.out_dir, directory=True, run=True)],
                  GuardedInputs.of(runs=[config.scored, *config.embeddings], embeddings_file=external))
    device = resolve_device(config.device)
    inputs, scored = open_inputs(config)
    say(f"scored run: {scored.table.num_rows} samples; {len(inputs.units)} units of work")
    fingerprint = _fingerprint(config, inputs, device)
    run_file = Path(config.out_dir) / RUN_FILE
    if run_file.is_file() and not config.overwrite and run_record(run_file).get("fingerprint") != fingerprint:
        run.open(fingerprint, {}, overwrite=False)  # refuses, naming what differs, before any fitting
    settings = SearchSettings(config.index, inputs.query_count, config.recall_target, str(device), config.seed,
                              config.block_size, observer)
    record = None if config.overwrite else saved_module.saved_fit(config.out_dir)
    resumed = record is not None and record.get("fingerprint") == fingerprint
    fit_started = time.time()
    fitted = None
    if not resumed:  # the process that fits checks the files once (ranks and resumed runs load its fit)
        if inputs.external:
            check_unique_ids(inputs.files, inputs.reading.id_column)
        reference, missing = reference_set(config, inputs, scored)
        fitted, by_features, split = fit(config, reference, settings)
        say(describe(fitted, by_features, split))
        record = fit_record(config, fitted, by_features, split, reference, scored, missing, fingerprint)
        del reference
    else:
        say(f"resuming with the saved extrapolator ({record['method']} on {record['features']} features)")
    provenance = {"scored_run": str(config.scored), "embeddings_runs": [str(path) for path in config.embeddings],
                  "embedding": inputs.space, **config.choices(), "chosen": record["chosen"], "min_rho": config.min_rho,
                  "index": record["index"], "device": str(device)}
    if fitted is not None and config.overwrite:  # before run.json names this command: never its extrapolator
        saved_module.remove(config.out_dir)
    run.open(fingerprint, provenance, config.overwrite, concurrent=config.partition.partitioned)
    if fitted is not None:
        saved_module.save(config.out_dir, fitted, scored.table, record)
        record = saved_module.saved_fit(config.out_dir)  # the published one (another rank's, if it won)
        del fitted
    fit_seconds = time.time() - fit_started

    mine = config.partition.select(inputs.units)
    pending = [unit for unit in mine if not part_path(config.out_dir, unit.shard).exists()]
    unfinish_for(config.out_dir, pending)
    executor, failures = ("none (--fit-only)", ()) if config.fit_only else _execute(config, inputs, pending, settings)
    counted = table_stats(config.out_dir, flag_column=EXTRAPOLATED_COLUMN)
    stats = run.stats({
        **counted,
        **{name: value for name, value in record.items() if name not in ("fingerprint", "predictor", "chosen")},
        "extrapolated_samples": counted.pop(f"{EXTRAPOLATED_COLUMN}_rows"),
        "overlap_samples": 0, "fallback_samples": 0, **{f"{name}_samples": n for name, n in _counts(config.out_dir).items()},
        "trusted": bool(record["heldout_spearman"] >= config.min_rho),  # NaN: not trusted
        "min_rho": config.min_rho,
        "embedding_source": "features-from" if inputs.external else "embeddings",
        "embedding_columns": list(inputs.reading.columns),
        "units": len(inputs.units), "units_this_process": len(mine), "parts_written_now": 0 if config.fit_only else len(pending),
        "duplicate_units": inputs.duplicate_units, "executor": executor,
        "rank": config.partition.rank, "world_size": config.partition.world_size,
        "resumed_fit": resumed, "extrapolate_seconds": round(fit_seconds, 3), "device": str(device),
    })
    stats.pop(f"{EXTRAPOLATED_COLUMN}_rows", None)
    if config.partition.partitioned:
        write_rank_stats(config.out_dir, config.partition.rank, config.partition.world_size, stats)
    if failures:
        raise MimicfilterError(f"{len(failures)} unit(s) failed after --max-retries {config.ray.max_retries}: {failures[0]}",
                               hint="re-run the same command to retry them (finished parts are kept)")
    missing_parts = sum(not part_path(config.out_dir, unit.shard).exists() for unit in inputs.units)
    if missing_parts:  # other ranks (or the prediction after --fit-only) still to come
        return stats | {"units_missing": missing_parts}
    return run.finish(stats)
