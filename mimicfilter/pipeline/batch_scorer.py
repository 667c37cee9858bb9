"""From what the user asked for to output rows: the one entry point "model spec → scorer"
(:func:`build_batch_scorer`: the models on their device, the task's scorer, the embedder), and the
:class:`BatchScorer` that turns a :class:`~mimicfilter.pipeline.batches.Batch` into one row per
sample, bad samples included."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch

from mimicfilter.mimic.classify import ClassifierScorer
from mimicfilter.mimic.contrastive import ContrastiveScorer
from mimicfilter.mimic.embedder import EmbeddingsFromScores, PairEmbeddings
from mimicfilter.mimic.models import LoadedModels, ModelSpec, load_models_on_device
from mimicfilter.mimic.scorer import BatchScores, MimicScorer
from mimicfilter.pipeline.batches import Batch
from mimicfilter.store.schema import (EMBEDDING_COLUMN, NON_FINITE, NOT_CONFUSABLE, SCORE_VALUE_COLUMNS,
                                      TEXT_EMBEDDING_COLUMN)


def _pair_cells(embeddings: PairEmbeddings, position: int) -> dict[str, Any]:
    return {EMBEDDING_COLUMN: embeddings.image[position].numpy(), TEXT_EMBEDDING_COLUMN: embeddings.text[position].numpy()}


def score_rows(batch: Batch, scores: BatchScores | None, embeddings: PairEmbeddings | None = None,
               epoch: int = 0) -> list[dict[str, Any]]:
    """One score row per sample of the batch; samples that are not ok get null scores."""
    rows = []
    ok_position = 0
    for sample in batch.samples:
        row = {**asdict(sample), "epoch": epoch, "step": batch.step}
        if sample.ok and scores is not None:
            for column in SCORE_VALUE_COLUMNS:
                values = getattr(scores, column)
                row[column] = None if values is None else float(values[ok_position])
            if embeddings is not None:
                row |= _pair_cells(embeddings, ok_position)
            if scores.relabelled is not None:  # a confusable anchor's row names the label it was scored with
                _relabel(row, int(scores.relabelled[ok_position]))
            ok_position += 1
            _mark_non_finite(row)
        rows.append(row)
    return rows


def _relabel(row: dict[str, Any], label: int) -> None:
    if label >= 0:
        row["label"] = label
        return
    row["status"] = NOT_CONFUSABLE
    row["error"] = "no confusable negative: the reference ranks another class above the image's own label"
    for column in SCORE_VALUE_COLUMNS:
        row[column] = None


def _mark_non_finite(row: dict[str, Any]) -> None:
    """A NaN or infinite value is no score: the row gets its own status, naming the columns, and
    nulls there, so no rule, vote or plot downstream ever sees it."""
    bad = [column for column in SCORE_VALUE_COLUMNS if row.get(column) is not None and not math.isfinite(row[column])]
    if bad:
        row["status"] = NON_FINITE
        row["error"] = "non-finite " + ", ".join(f"{column}={row[column]}" for column in bad)
        for column in bad:
            row[column] = None


def embed_rows(batch: Batch, embeddings: PairEmbeddings | None) -> list[dict[str, Any]]:
    """One ``embed`` row per sample of the batch; the pair embedding for ok samples, null otherwise."""
    rows, position = [], 0
    for sample in batch.samples:
        row = asdict(sample)
        if sample.ok and embeddings is not None:
            row |= _pair_cells(embeddings, position)
            position += 1
        rows.append(row)
    return rows


@dataclass
class BatchScorer:
    """The scorer, and the embedder when the run stores embeddings."""

    scorer: MimicScorer
    embedder: EmbeddingsFromScores | None = None

    @property
    def embedding_dim(self) -> int | None:
        return self.embedder.dim if self.embedder is not None else None

    def _embeddings(self, scores: BatchScores) -> PairEmbeddings | None:
        return self.embedder(scores) if self.embedder is not None else None

    def score(self, batch: Batch, epoch: int = 0) -> list[dict[str, Any]]:
        """Static scores of the batch (the proxy does not change)."""
        if batch.images is None:
            return score_rows(batch, None, epoch=epoch)
        scores = self.scorer.score(batch.images, batch.targets, batch.anchors)
        return score_rows(batch, scores, self._embeddings(scores), epoch)

    def train(self, batch: Batch, optimizer: torch.optim.Optimizer, epoch: int) -> list[dict[str, Any]]:
        """Score the batch at the current proxy, then take one Grad-Mimic step on it."""
        if batch.images is None:
            return score_rows(batch, None, epoch=epoch)
        if batch.pool_samples > 1:
            scores = self.scorer.train_step(batch.images, batch.targets, optimizer, batch.anchors)
        else:  # a batch of one has no contrast and a zero gradient: score it, but take no step
            scores = self.scorer.score(batch.images, batch.targets, batch.anchors)
        return score_rows(batch, scores, self._embeddings(scores), epoch)


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The towers run in bf16 on CUDA (the JVP stays float32); CPU stays float32."""
    return torch.bfloat16 if device.type == "cuda" else None


def make_scorer(models: LoadedModels, temperature: float, autocast_dtype: torch.dtype | None = None) -> MimicScorer:
    """The task's scorer over loaded models."""
    scorer_class = ClassifierScorer if models.task == "classify" else ContrastiveScorer
    return scorer_class(models, temperature, autocast_dtype)


def build_batch_scorer(model: ModelSpec, temperature: float, save_embeddings: bool) -> BatchScorer:
    """Model spec → scorer: the models on their device, the task's scorer, and the embedder when asked for."""
    models = load_models_on_device(model)
    autocast = autocast_dtype(models.device)
    scorer = make_scorer(models, temperature, autocast_dtype=autocast)
    embedder = EmbeddingsFromScores(models) if save_embeddings else None
    return BatchScorer(scorer, embedder)
