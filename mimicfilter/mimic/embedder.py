"""Pair embeddings for score extrapolation (``score --save-embeddings`` and ``mimicfilter embed``).

A sample's pair embedding is two L2-normalised vectors in the **reference's** space, stored as
float16: the image side (column ``embedding``) is the reference image tower's output, and the
text side (``text_embedding``) is the reference text tower's output for the caption — or, for
labelled images, the label's class embedding (its normalised row of the reference head; for a
zero-shot head, the class prompts' text embedding). Their dot product, the pair's agreement, is
the reference CLIP score (for labelled images: the cosine that the reference's logit of the
given label is made of).

Why the reference's space: the reference never moves (a trajectory changes only the proxy), so
the embeddings of a trajectory and of the cheap ``embed`` pass over the rest of a pool agree
without keeping copies of anything; its two towers are aligned, so the agreement of image and
caption means something (the proxy's mimic layers are re-initialised at random by default, which
leaves its image and text sides unrelated); and the scorer computes both embeddings anyway for its
baselines (``clip_score``, ``ref_loss``), so a score run stores them at no extra model cost.
In image–text pools the caption, not the image, usually carries the error: an image-only
embedding cannot tell a swapped or boilerplate caption from the right one, the pair can.

Which space a run's embeddings live in is recorded in its run.json (``embedding``, see
:func:`embedding_space`); ``extrapolate`` refuses to mix spaces. Runs of mimicfilter before pair
embeddings (no ``format`` in that record) hold only the initial proxy's image embedding.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mimicfilter.mimic.heads import image_size, label_embeddings
from mimicfilter.mimic.models import LoadedModels
from mimicfilter.mimic.scorer import BatchScores

EMBEDDING_FORMAT = 2  # 1 (implicit): the initial proxy's image embedding only


@dataclass(frozen=True)
class PairEmbeddings:
    """The ok samples' pair embeddings of one batch: float16 [B, D] each, on the CPU."""

    image: torch.Tensor
    text: torch.Tensor


def _weights_sha256(module: nn.Module) -> str:
    digest = hashlib.sha256()
    for name, value in sorted(module.state_dict().items()):
        tensor = value.detach().to("cpu").contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def _preprocess_description(preprocess: Any) -> str:
    """The preprocessing's repr without memory addresses (``<function f at 0x7f…>``)."""
    return re.sub(r" at 0x[0-9a-fA-F]+", "", repr(preprocess))


def _half_cpu(pair: tuple[torch.Tensor, torch.Tensor]) -> PairEmbeddings:
    image, text = (F.normalize(value.detach().float(), dim=-1).to(torch.float16).cpu() for value in pair)
    return PairEmbeddings(image, text)


def _reference_image(models: LoadedModels, images: torch.Tensor) -> torch.Tensor:
    if models.task == "classify":
        return models.reference.features(images)
    return models.reference.encode_image(images)


def embedding_space(models: LoadedModels) -> dict[str, Any]:
    """The run.json record of the space the pair embeddings live in (its ``dim`` from a probe)."""
    reference = models.reference
    dtype = next(reference.parameters()).dtype
    with torch.no_grad():
        probe = _reference_image(models, torch.zeros(1, 3, *image_size(reference), dtype=dtype, device=models.device))
    dim = int(probe.shape[-1])
    text = "label" if models.task == "classify" else "caption"
    return {
        "format": EMBEDDING_FORMAT,
        "dim": dim,
        "reference_sha256": _weights_sha256(models.reference),
        "preprocess": _preprocess_description(models.preprocess),
        "text": text,
        "what": f"L2-normalised reference image embedding and {text} embedding, float16",
    }


class PairEmbedder:
    """Forward-only pair embeddings from the reference (``mimicfilter embed``): image tower plus
    text tower (captions) or the head's class embeddings (labels). No proxy, no JVP."""

    def __init__(self, models: LoadedModels, autocast_dtype: torch.dtype | None = None):
        self.models = models
        self.autocast_dtype = autocast_dtype if models.device.type == "cuda" else None
        self.dtype = next(models.reference.parameters()).dtype
        self.space = embedding_space(models)
        self.dim = self.space["dim"]

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, targets: torch.Tensor) -> PairEmbeddings:
        """``targets``: token ids (image–text) or labels (classification), as in a batch."""
        models = self.models
        device = models.device
        images = models.normalization.to_model(images, device, self.dtype)  # uint8 batches, as the scorer's
        targets = targets.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
            image = _reference_image(models, images)
            if models.task == "classify":
                text = label_embeddings(models.reference.head.weight, targets)
            else:
                text = models.reference.encode_text(targets)
        return _half_cpu((image, text))


class EmbeddingsFromScores:
    """The pair embeddings of a scored batch: the reference embeddings the scorer computed for its
    baselines (no extra forward pass, whatever the route or training mode)."""

    def __init__(self, models: LoadedModels):
        self.space = embedding_space(models)
        self.dim = self.space["dim"]

    def __call__(self, scores: BatchScores) -> PairEmbeddings:
        if scores.reference_embeddings is None:
            raise RuntimeError("the scorer returned no reference embeddings")  # every scorer does
        return _half_cpu(scores.reference_embeddings)
