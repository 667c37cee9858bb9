"""What extrapolation compares samples by: the image alone, or the image–text pair.

A sample's stored embedding (:mod:`mimicfilter.mimic.embedder`) is the reference's image
embedding ``e`` and, since pair embeddings, its caption's (or label's) embedding ``t``, both
L2-normalised in the reference's space. Feature sets:

* ``image``: neighbours by cos(e, e'). Blind to the caption: in image–text pools a swapped or
  boilerplate caption sits next to the right one.
* ``pair``: neighbours by the mean of the two sides' cosines, cos([e, t], [e', t']) — a neighbour
  must look alike *and* be described alike — and the pair's own agreement a = e·t (the reference
  CLIP score; for labels, the cosine behind the reference's logit of the given label) as an input:
  the GNN gets [e, t, a] per node, and kNN blends the neighbours' mean with a
  (:class:`~mimicfilter.extrapolate.knn.Blend`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

FEATURE_SETS = ("image", "pair")
FEATURE_CHOICES = ("auto", *FEATURE_SETS)


@dataclass(frozen=True)
class Embedded:
    """The embeddings of N samples: image [N, D] and text [N, D] or None, float32, L2-normalised."""

    image: torch.Tensor
    text: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.image.shape[0]

    @property
    def has_pairs(self) -> bool:
        return self.text is not None

    def take(self, index: torch.Tensor) -> Embedded:
        return Embedded(self.image[index], None if self.text is None else self.text[index])

    def agreement(self) -> torch.Tensor:
        """a = e·t per sample [N] (float64)."""
        return (self.image.double() * self.text.double()).sum(dim=1)

    def neighbour_vectors(self, features: str) -> torch.Tensor:
        """Unit vectors whose dot products are the similarity of ``features``."""
        if features == "image":
            return self.image
        return torch.cat([self.image, self.text], dim=1) * (0.5**0.5)

    def signal(self, features: str) -> torch.Tensor | None:
        """The sample's own low-dimensional signal [N, S] (float64): pairs their agreement, images none."""
        return self.agreement()[:, None] if features == "pair" else None

    def node_inputs(self, features: str) -> torch.Tensor:
        """Per-node inputs of the GNN [N, F] (standardised later on the scored nodes): the embedding
        sides, then the :meth:`signal` columns last."""
        if features == "image":
            return self.image
        return torch.cat([self.image, self.text, self.signal(features).float()], dim=1)


def available_features(embedded: Embedded) -> tuple[str, ...]:
    return FEATURE_SETS if embedded.has_pairs else ("image",)
