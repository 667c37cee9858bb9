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

import numpy as np
import torch

FEATURE_SETS = ("image", "pair")
BLOCK = 65536  # rows converted to a wider type at a time
FEATURE_CHOICES = ("auto", *FEATURE_SETS)


@dataclass(frozen=True)
class Embedded:
    """The embeddings of N samples: image [N, D] and text [N, D] or None, L2-normalised; float16 as
    stored (a million 512-d samples take 1 GB), or float32. Every product is taken in float32."""

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
        return torch.cat([(self.image[start : start + BLOCK].double() * self.text[start : start + BLOCK].double()).sum(dim=1)
                          for start in range(0, len(self), BLOCK)]) if len(self) else torch.zeros(0, dtype=torch.float64)

    def neighbour_vectors(self, features: str, rows: torch.Tensor | np.ndarray | None = None) -> torch.Tensor:
        """Unit vectors (float32) whose dot products are the similarity of ``features``, of ``rows`` (all by default)."""
        pick = (lambda side: side) if rows is None else (lambda side: side[torch.as_tensor(rows)])
        if features == "image":
            return pick(self.image).float()
        return torch.cat([pick(self.image).float(), pick(self.text).float()], dim=1) * (0.5**0.5)

    def dim(self, features: str) -> int:
        return self.image.shape[1] * (1 if features == "image" else 2)

    def signal(self, features: str) -> torch.Tensor | None:
        """The sample's own low-dimensional signal [N, S] (float64): pairs their agreement, images none."""
        return self.agreement()[:, None] if features == "pair" else None

    def node_inputs(self, features: str) -> torch.Tensor:
        """Per-node inputs of the GNN [N, F] (standardised later on the scored nodes): the embedding
        sides, then the :meth:`signal` columns last."""
        if features == "image":
            return self.image.float()
        return torch.cat([self.image.float(), self.text.float(), self.signal(features).float()], dim=1)


def available_features(embedded: Embedded) -> tuple[str, ...]:
    return FEATURE_SETS if embedded.has_pairs else ("image",)


NORM_TOLERANCE = 1e-2  # float16 storage moves a unit vector's norm by ~1e-3


def unit_rows(vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(float16 unit rows, which rows are usable): rows whose norm is off 1 by more than float16
    rounding are normalised (in float32); zero or non-finite rows are not usable. Every source of
    embeddings goes through here, so the same vectors give the same neighbours whatever the source."""
    vectors = np.asarray(vectors)
    with np.errstate(all="ignore"):  # rows of inf or NaN are found unusable below, not warned of
        return _unit_rows(vectors, vectors.astype(np.float32))


def _unit_rows(vectors: np.ndarray, wide: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    norms = np.sqrt(np.einsum("...d,...d->...", wide, wide))
    usable = np.isfinite(norms) & (norms > 0)
    if vectors.ndim == 3:
        usable = usable.all(axis=1)
    norms = norms[..., None]
    off = ~np.isclose(norms, 1.0, atol=NORM_TOLERANCE, rtol=0)
    if off.any():
        vectors = np.where(off & (norms > 0), wide / np.where(norms > 0, norms, 1), vectors).astype(np.float16)
    return np.asarray(vectors, dtype=np.float16), usable
