"""Image embeddings for score extrapolation: ``score --save-embeddings`` and ``mimicfilter embed``.

The embedding of a sample is the L2-normalised output of the proxy's image tower *as the proxy is
built from the command's model options* (before any trajectory step): ``normalize(visual(x))``,
stored as float16. Fixing it to the initial proxy makes the embedding a function of the image
alone, so embeddings written by a trajectory (whose mimic layers move) and by the cheap static
``embed`` pass over the rest of a pool live in the same space and can be compared by cosine
similarity.

Which space a run's embeddings live in is recorded in its run.json (``embedding``): the dimension,
a sha256 of the image tower's weights and the image preprocessing. ``extrapolate`` refuses to mix
embeddings from different spaces.

``embed`` reuses the score pipeline's read → decode → batch stages with the same decoding options
as ``score``, so a sample gets the same status in both (a sample ``score`` would not score is not
embedded either); it writes one atomic part per shard (``scores/{part name}.parquet``) with the
columns of :data:`EMBED_COLUMNS`, and re-running the same command resumes.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import os
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import pyarrow as pa
import torch
import torch.nn.functional as F
from torch import nn

from mimicfilter import __version__
from mimicfilter.decode import DecodeConfig
from mimicfilter.errors import MimicfilterError
from mimicfilter.models import LoadedModels, ModelSpec, load_models, resolve_device
from mimicfilter.rundir import finish_run_dir, prepare_run_dir
from mimicfilter.scorer import BatchScores, MimicScorer
from mimicfilter.tables import EMBEDDING_COLUMN, embedding_array, embedding_field, table_stats, write_part

EMBED_COLUMNS = ("shard", "key", "uid", "index", "status", "error", "label", EMBEDDING_COLUMN)


def embed_schema(dim: int) -> pa.Schema:
    """Parts written by ``mimicfilter embed``: who the sample is, its status, label, embedding."""
    return pa.schema(
        [
            pa.field("shard", pa.string(), nullable=False),
            pa.field("key", pa.string(), nullable=False),
            pa.field("uid", pa.string()),
            pa.field("index", pa.int32(), nullable=False),
            pa.field("status", pa.string(), nullable=False),
            pa.field("error", pa.string()),
            pa.field("label", pa.int32()),
            embedding_field(dim),
        ]
    )


def _tower_sha256(module: nn.Module) -> str:
    digest = hashlib.sha256()
    for name, value in sorted(module.state_dict().items()):
        tensor = value.detach().to("cpu").contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def _preprocess_description(preprocess: Any) -> str:
    """The preprocessing's repr without memory addresses (``<function f at 0x7f…>``)."""
    return re.sub(r" at 0x[0-9a-fA-F]+", "", repr(preprocess))


class ImageEmbedder:
    """``normalize(visual(images))`` of the proxy's image tower, as float16 on the CPU.

    ``frozen_copy``: embed with a private copy of the tower, so trajectory steps that move the
    proxy's image tower (its projection is a mimic layer, or ``--train full``) do not move the
    embeddings. Costs one more no-grad forward pass of the image tower per batch in a score run.
    """

    def __init__(self, models: LoadedModels, frozen_copy: bool = False, autocast_dtype: torch.dtype | None = None):
        visual = models.proxy.visual
        self.visual = copy.deepcopy(visual).requires_grad_(False) if frozen_copy else visual
        self.device = models.device
        self.autocast_dtype = autocast_dtype if models.device.type == "cuda" else None
        self.dtype = next(self.visual.parameters()).dtype
        size = getattr(visual, "image_size", 224)
        height, width = size if isinstance(size, (tuple, list)) else (size, size)
        with torch.no_grad():
            probe = self.visual(torch.zeros(1, 3, height, width, dtype=self.dtype, device=self.device))
        self.dim = int(probe.shape[-1])
        self.space = {
            "dim": self.dim,
            "image_tower_sha256": _tower_sha256(self.visual),
            "preprocess": _preprocess_description(models.preprocess),
            "what": "L2-normalised image-tower output of the initial proxy, float16",
        }

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        inputs = images.to(self.device, dtype=self.dtype, non_blocking=True)
        if self.autocast_dtype is not None:
            with torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype):
                features = self.visual(inputs)
        else:
            features = self.visual(inputs)
        return F.normalize(features.float(), dim=-1).to(torch.float16).cpu()


def needs_frozen_copy(mimic_layers: tuple[str, ...], train_mode: str) -> bool:
    """Whether a trajectory changes the proxy's image tower (then the embedder keeps its own copy)."""
    if train_mode == "none":
        return False
    return train_mode == "full" or any(name.startswith("visual.") for name in mimic_layers)


def _from_trunk_features(scorer: MimicScorer) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """Embeddings from the image features the scorer's head route already computed, when it has one.

    Classification head route: the features are the image tower's output. CLIP head route: the
    features are the input of the image projection, so the *initial* projection (cloned now) is
    applied. Either way no second image-tower pass is needed.
    """
    heads = getattr(scorer, "heads", None)
    if getattr(scorer, "head_only", False):
        return lambda features: F.normalize(features.float(), dim=-1).to(torch.float16).cpu()
    if heads is None:
        return None
    if "image" not in heads:
        return lambda features: F.normalize(features.float(), dim=-1).to(torch.float16).cpu()
    head = heads["image"]
    current = scorer.mimic_parameters()
    initial = {name: current[name].detach().clone() for name in (head.weight, head.bias) if name}

    def project(features: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return F.normalize(head.apply(initial, features).float(), dim=-1).to(torch.float16).cpu()

    return project


class EmbeddingScorer:
    """A scorer whose BatchScores also carry the batch's embeddings; delegates everything else."""

    def __init__(self, scorer: MimicScorer, embedder: ImageEmbedder,
                 from_features: Callable[[torch.Tensor], torch.Tensor] | None = None):
        self._scorer = scorer
        self.embedder = embedder
        self._from_features = from_features

    def _embedding(self, images: torch.Tensor) -> torch.Tensor:
        features = self._scorer.last_image_features
        if self._from_features is not None and features is not None:
            return self._from_features(features)
        return self.embedder(images)

    def __getattr__(self, name: str):
        return getattr(self._scorer, name)

    @property
    def embedding_dim(self) -> int:
        return self.embedder.dim

    @property
    def embedding_space(self) -> dict[str, Any]:
        return self.embedder.space

    def score(self, images: torch.Tensor, targets: torch.Tensor) -> BatchScores:
        self._scorer.last_image_features = None
        scores = self._scorer.score(images, targets)
        return dataclasses.replace(scores, embedding=self._embedding(images))

    def train_step(self, images: torch.Tensor, targets: torch.Tensor, optimizer) -> BatchScores:
        self._scorer.last_image_features = None
        scores = self._scorer.train_step(images, targets, optimizer)  # features come from before the step
        return dataclasses.replace(scores, embedding=self._embedding(images))


def with_embeddings(scorer: MimicScorer, train_mode: str, autocast_dtype: torch.dtype | None = None) -> EmbeddingScorer:
    """Wrap ``scorer`` so its batches carry embeddings: reused from the head route's trunk pass when
    the trunk stays frozen (``none``/``head``), else from an image-tower pass (of a frozen copy when
    the trajectory moves the tower)."""
    models = scorer.models
    from_features = _from_trunk_features(scorer) if train_mode != "full" else None
    frozen_copy = needs_frozen_copy(models.mimic_layers, train_mode) and from_features is None
    embedder = ImageEmbedder(models, frozen_copy, autocast_dtype)
    return EmbeddingScorer(scorer, embedder, from_features)


# ------------------------------------------------------------------------------------ embed command


@dataclass(frozen=True)
class EmbedConfig:
    """Everything ``mimicfilter embed`` needs; validated once, up front."""

    shards: tuple[str, ...]
    out_dir: Path
    model: ModelSpec
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    batch_size: int = 256
    workers: int = 0
    allow_pipe: bool = False
    overwrite: bool = False
    argv: tuple[str, ...] = ()

    def __post_init__(self):
        if not self.shards:
            raise MimicfilterError("no shards to embed", hint="pass shard files, a directory, a pattern or @list.txt")
        if self.batch_size < 1:
            raise MimicfilterError(f"--batch-size {self.batch_size}: must be at least 1")
        if self.workers < 0:
            raise MimicfilterError(f"--workers {self.workers}: must be 0 or more")
        if self.decode.task != self.model.task:
            raise MimicfilterError(f"decoding for {self.decode.task!r} but models for {self.model.task!r}")


def embed_rows(batch: dict[str, Any], embeddings: torch.Tensor | None) -> list[dict[str, Any]]:
    """One row per sample of the batch; the embedding for ok samples, null otherwise."""
    rows, position = [], 0
    for meta in batch["rows"]:
        row = {name: meta.get(name) for name in EMBED_COLUMNS if name != EMBEDDING_COLUMN}
        if meta["status"] == "ok" and embeddings is not None:
            row[EMBEDDING_COLUMN] = embeddings[position].numpy()
            position += 1
        rows.append(row)
    return rows


def embed_table(rows: list[dict[str, Any]], dim: int) -> pa.Table:
    ordered = sorted(rows, key=lambda row: row["index"])
    schema = embed_schema(dim)
    columns = {name: [row.get(name) for row in ordered] for name in EMBED_COLUMNS if name != EMBEDDING_COLUMN}
    table = pa.table(columns, schema=pa.schema([schema.field(name) for name in columns]))
    return table.append_column(schema.field(EMBEDDING_COLUMN),
                               embedding_array([row.get(EMBEDDING_COLUMN) for row in ordered], dim))


def run_embed(config: EmbedConfig, progress=None) -> dict[str, Any]:
    """Embed every shard into ``config.out_dir`` (resuming an earlier identical run); returns the stats."""
    # the score pipeline's read/decode/batch stages and its local executor loop
    from mimicfilter.scoring import LocalBatches, decode_config_for, local_shard_rows, part_path

    started = time.time()
    device = resolve_device(config.model.device)
    torch.manual_seed(config.model.seed)
    models = load_models(dataclasses.replace(config.model, device=str(device)))
    embedder = ImageEmbedder(models, frozen_copy=False,
                             autocast_dtype=torch.bfloat16 if device.type == "cuda" else None)
    decode = decode_config_for(config.decode, models)
    fingerprint = {
        "format": 1,
        "kind": "embed",
        "task": models.task,
        "shards": list(config.shards),
        "embedding": embedder.space,
        "device_type": device.type,
        "decode": asdict(config.decode),
    }
    provenance = {
        "mimicfilter_version": __version__,
        "command": "embed",
        "argv": list(config.argv) or sys.argv,
        "models": models.provenance,
        "embedding": embedder.space,
        "batch_size": config.batch_size,
        "device": str(device),
        "shards": list(config.shards),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    run_dir = config.out_dir
    prepare_run_dir(run_dir, fingerprint, provenance, config.overwrite)
    pending = [shard for shard in config.shards if not part_path(run_dir, shard).exists()]
    if progress:
        progress.start(len(config.shards), len(config.shards) - len(pending))
    loop_started = time.time()
    embedded = 0
    try:
        source = LocalBatches(pending, decode, models.preprocess, models.tokenizer, config.batch_size, config.workers,
                              config.allow_pipe, pin_memory=device.type == "cuda")

        def rows_of_batch(batch):
            return embed_rows(batch, embedder(batch["images"]) if batch["images"] is not None else None)

        for finished in local_shard_rows(source, rows_of_batch, progress):
            write_part(embed_table(finished.rows, embedder.dim), part_path(run_dir, finished.shard))
            embedded += len(finished.rows)
    finally:
        if progress:
            progress.close()
    finished = time.time()
    stats = {
        "command": "embed",
        **table_stats(run_dir, score_column=None),
        "embedding_dim": embedder.dim,
        "shards": len(config.shards),
        "shards_resumed": len(config.shards) - len(pending),
        "samples_embedded_now": embedded,
        "wall_seconds": round(finished - started, 3),
        "embedding_seconds": round(finished - loop_started, 3),
        "samples_per_second": round(embedded / (finished - loop_started), 2) if embedded else None,
        "device": str(device),
        "workers": config.workers,
        "run_dir": str(run_dir),
        "cpu_count": os.cpu_count(),
    }
    finish_run_dir(run_dir, stats)
    return stats
