"""Image embeddings for score extrapolation (``score --save-embeddings`` and ``mimicfilter embed``).

The embedding of a sample is the L2-normalised output of the proxy's image tower *as the proxy is
built from the command's model options* (before any trajectory step): ``normalize(visual(x))``,
stored as float16. Fixing it to the initial proxy makes the embedding a function of the image
alone, so embeddings written by a trajectory (whose mimic layers move) and by the cheap static
``embed`` pass over the rest of a pool live in the same space and can be compared by cosine
similarity.

Which space a run's embeddings live in is recorded in its run.json (``embedding``): the dimension,
a sha256 of the image tower's weights and the image preprocessing. ``extrapolate`` refuses to mix
embeddings from different spaces.
"""

from __future__ import annotations

import copy
import hashlib
import re
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mimicfilter.mimic.models import LoadedModels
from mimicfilter.mimic.scorer import BatchScores, MimicScorer


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
        self.normalization = models.normalization
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
        inputs = self.normalization.to_model(images, self.device, self.dtype)
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



class BatchEmbedder:
    """The embeddings of a scored batch: from the image features the scorer returned when its head
    route computed them with a frozen trunk (no second image-tower pass), else from an image-tower
    pass (of a frozen copy when the trajectory moves the tower)."""

    def __init__(self, scorer: MimicScorer, train_mode: str, autocast_dtype: torch.dtype | None = None):
        models = scorer.models
        self._from_features = scorer.embedding_from_features() if train_mode != "full" else None
        frozen_copy = needs_frozen_copy(models.mimic_layers, train_mode) and self._from_features is None
        self.embedder = ImageEmbedder(models, frozen_copy, autocast_dtype)

    @property
    def dim(self) -> int:
        return self.embedder.dim

    @property
    def space(self) -> dict[str, Any]:
        return self.embedder.space

    def __call__(self, images: torch.Tensor, scores: BatchScores) -> torch.Tensor:
        if self._from_features is not None and scores.image_features is not None:
            return self._from_features(scores.image_features)
        return self.embedder(images)
