"""``mimicfilter embed``: the reference's pair embedding of every sample, for score extrapolation.

Forward only, through the same read → decode → batch stages and the same local-executor loop as
static scoring, with the same decoding options, so a sample gets the same status in both (a sample
``score`` would not score is not embedded either). One atomic part per shard
(``scores/{part name}.parquet``) with the columns of ``store.schema.EMBED_COLUMNS``; re-running the
same command resumes. The embedding space is :mod:`mimicfilter.mimic.embedder`'s.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import Any

from mimicfilter.mimic.device import resolve_device
from mimicfilter.mimic.embedder import PairEmbedder
from mimicfilter.mimic.models import load_models_on_device
from mimicfilter.pipeline.batch_scorer import autocast_dtype, embed_rows
from mimicfilter.pipeline.batches import Batch
from mimicfilter.pipeline.config import EmbedConfig, Progress, use_threads
from mimicfilter.pipeline.decoder import Decoder, check_decoder
from mimicfilter.pipeline.static import local_shard_rows, shard_stream
from mimicfilter.pipeline.stream import open_input
from mimicfilter.store.guard import guard_run_directory
from mimicfilter.store.parts import table_stats, write_part
from mimicfilter.store.paths import part_path
from mimicfilter.store.rundir import RunDirectory, unfinish_for
from mimicfilter.store.schema import embed_rows_to_table


def run_embed(config: EmbedConfig, progress: Progress | None = None) -> dict[str, Any]:
    """Embed every shard into ``config.out_dir`` (resuming an earlier identical run); returns the stats."""
    use_threads(config)
    check_decoder(config.decode, resolve_device(config.model.device).type)
    run = RunDirectory(config.out_dir, "embed", config.argv)
    spec = config.model
    guard_run_directory(config.out_dir, config.shards,
                        (spec.model, spec.reference, spec.proxy, spec.reference_head, spec.classnames))
    models = load_models_on_device(config.model)
    embedder = PairEmbedder(models, autocast_dtype(models.device))
    fingerprint = {
        "format": 1,
        "kind": "embed",
        "task": models.task,
        "shards": list(config.shards),
        "embedding": embedder.space,
        "device_type": models.device.type,
        "decode": asdict(config.decode),
        # a batch's size moves float16 embeddings in their last bit: a resume at another size would mix tables
        "batch_size": config.batch_size,
    }
    provenance = {"models": models.provenance, "embedding": embedder.space, "batch_size": config.batch_size,
                  "device": str(models.device), "shards": list(config.shards)}
    run.open(fingerprint, provenance, config.overwrite)
    pending = [shard for shard in config.shards if not part_path(config.out_dir, shard).exists()]
    unfinish_for(config.out_dir, pending)
    if progress:
        progress.start(len(config.shards), len(config.shards) - len(pending))
    loop_started = time.time()
    try:
        embedded = _embed_shards(config, pending, embedder, progress)
    finally:
        if progress:
            progress.close()
    elapsed = time.time() - loop_started
    return run.finish(run.stats({
        **table_stats(config.out_dir, score_column=None),
        "embedding_dim": embedder.dim,
        "shards": len(config.shards),
        "shards_resumed": len(config.shards) - len(pending),
        "samples_embedded_now": embedded,
        "embedding_seconds": round(elapsed, 3),
        "samples_per_second": round(embedded / elapsed, 2) if embedded else None,
        "device": str(models.device),
        "workers": config.workers,
    }))


def _embed_shards(config: EmbedConfig, shards: list[str], embedder: PairEmbedder, progress: Progress | None) -> int:
    """One part per shard, on the local executor; returns the rows written."""
    models = embedder.models

    def rows_of_batch(batch: Batch) -> list[dict[str, Any]]:
        return embed_rows(batch, embedder(batch.images, batch.targets) if batch.images is not None else None)

    decoder = Decoder.for_models(config.decode, models)
    pool, batches = open_input(decoder, shard_stream(config, shards, models.device.type), config.workers)
    embedded = 0
    with pool:
        for finished in local_shard_rows(batches, decoder, models.device, rows_of_batch, progress):
            write_part(embed_rows_to_table(finished.rows, embedder.dim), part_path(config.out_dir, finished.shard))
            embedded += len(finished.rows)
    return embedded
