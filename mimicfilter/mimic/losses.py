"""Per-sample losses of the three tasks (their mean is the usual batch loss), and the CLIP score."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Anchors:
    """The anchors of a batch (``score --trusted``): which samples they are, and which pool samples
    each must not be contrasted with because they share its image or its caption (its twins: the
    two pool samples a synthetic negative was made from, or a trusted sample's own copy in the pool)."""

    mask: torch.Tensor  # [N] bool over the batch's samples
    twins: torch.Tensor | None = None  # [A, B] bool: anchor × pool sample
    # [N] bool: labelled confusable negatives, scored with the reference's most likely other class
    confusable: torch.Tensor | None = None

    def to(self, device) -> Anchors:
        return Anchors(self.mask.to(device), None if self.twins is None else self.twins.to(device),
                       None if self.confusable is None else self.confusable.to(device))


def contrastive_per_sample_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor | None = None,
    anchors: Anchors | None = None,
) -> torch.Tensor:
    """Per-sample CLIP (softmax) or SigLIP (sigmoid, when ``logit_bias`` is given) loss.

    Features must already be L2-normalised. Softmax: l_i = (CE(row i -> i) + CE(col i -> i)) / 2,
    so mean_i l_i is CLIP's batch loss. Sigmoid: l_i = (sum of row i's and column i's pairwise
    sigmoid-loss terms) / 2, so mean_i l_i is SigLIP's batch loss (sum over pairs / B).

    ``anchors``: anchors ride along without touching the others' losses. The pool samples' losses
    are those of the pool samples alone; each anchor's loss is the one it would have as the only
    extra member of the pool's batch (its row and column against the pool's pairs and itself, its
    twins left out), so anchors never contrast with each other.
    """
    if anchors is not None and bool(anchors.mask.any()):
        return _with_anchors(image_features, text_features, logit_scale, logit_bias, anchors)
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


def _with_anchors(image, text, logit_scale, logit_bias, anchors: Anchors) -> torch.Tensor:
    mask = anchors.mask
    pool = ~mask
    pool_image, pool_text, anchor_image, anchor_text = image[pool], text[pool], image[mask], text[mask]
    pool_loss = contrastive_per_sample_loss(pool_image, pool_text, logit_scale, logit_bias)
    rows = logit_scale * anchor_image @ pool_text.T  # [A, B]: each anchor's image against the pool's captions
    columns = logit_scale * anchor_text @ pool_image.T  # [A, B]: each anchor's caption against the pool's images
    own = logit_scale * (anchor_image * anchor_text).sum(dim=-1)  # [A]
    kept = None if anchors.twins is None else ~anchors.twins
    if logit_bias is None:
        if kept is not None:
            rows, columns = rows.masked_fill(~kept, float("-inf")), columns.masked_fill(~kept, float("-inf"))
        row = torch.logsumexp(torch.cat([rows, own[:, None]], dim=1), dim=1) - own
        column = torch.logsumexp(torch.cat([columns, own[:, None]], dim=1), dim=1) - own
        anchor_loss = 0.5 * (row + column)
    else:  # the negatives of its row and column, and its positive once (counted in both, halved)
        terms = -F.logsigmoid(-(rows + logit_bias)) - F.logsigmoid(-(columns + logit_bias))
        anchor_loss = 0.5 * (terms if kept is None else terms * kept).sum(dim=1) - F.logsigmoid(own + logit_bias)
    order = torch.cat([torch.nonzero(pool)[:, 0], torch.nonzero(mask)[:, 0]])
    return torch.cat([pool_loss, anchor_loss])[torch.argsort(order)]


def classification_per_sample_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, labels, reduction="none")


def clip_similarity(image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of each matching pair (features already normalised)."""
    return (image_features * text_features).sum(dim=-1)
