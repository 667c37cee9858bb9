"""Per-sample losses of the three tasks (their mean is the usual batch loss), and the CLIP score."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def contrastive_per_sample_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-sample CLIP (softmax) or SigLIP (sigmoid, when ``logit_bias`` is given) loss.

    Features must already be L2-normalised. Softmax: l_i = (CE(row i -> i) + CE(col i -> i)) / 2,
    so mean_i l_i is CLIP's batch loss. Sigmoid: l_i = (sum of row i's and column i's pairwise
    sigmoid-loss terms) / 2, so mean_i l_i is SigLIP's batch loss (sum over pairs / B).
    """
    logits = logit_scale * image_features @ text_features.T
    batch = logits.shape[0]
    if logit_bias is None:
        targets = torch.arange(batch, device=logits.device)
        row = F.cross_entropy(logits, targets, reduction="none")
        column = F.cross_entropy(logits.T, targets, reduction="none")
        return 0.5 * (row + column)
    signs = 2.0 * torch.eye(batch, device=logits.device, dtype=logits.dtype) - 1.0
    terms = -F.logsigmoid(signs * (logits + logit_bias))
    return 0.5 * (terms.sum(dim=1) + terms.sum(dim=0))


def classification_per_sample_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, labels, reduction="none")


def clip_similarity(image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of each matching pair (features already normalised)."""
    return (image_features * text_features).sum(dim=-1)
