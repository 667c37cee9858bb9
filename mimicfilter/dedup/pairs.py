"""Near-duplicate pairs inside one cell, and the edges a range of cells writes.

Within a cell: byte-identical vectors are collapsed first (a banner copied 10,000 times costs one
comparison, not 10⁸); the rest are compared all against all on the image side, a block of rows
against the rows after it (each pair once: about half a similarity matrix, never held whole), for
pairs at or above the floor cosine 1 − ``max_epsilon``. With ``pair`` the candidates' captions are
compared too and must be ``caption_factor`` times as close: cos ≥ 1 − caption_factor × ε, so one
number, the pair's similarity min(image cos, 1 − (1 − caption cos) / caption_factor), says at
which ε the pair is a duplicate — unless the text tower cut either caption at its context length:
then the captions must also read the same after folding case and whitespace (``long_caption_sha1``
of the score table), since the embedding saw only their start. Of all those pairs only a maximum
spanning forest is written (:func:`~mimicfilter.curate.groups.spanning_forest`): at most one edge
per sample, and for every ε ≤ max_epsilon its edges of similarity ≥ 1 − ε connect exactly the
samples all pairs would, so ``filter`` picks ε afterwards without a new search.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from mimicfilter.curate.dedup import EDGE_SCHEMA
from mimicfilter.curate.groups import spanning_forest
from mimicfilter.dedup.buckets import CellBlock, identities, read_range
from mimicfilter.dedup.sources import Unit
from mimicfilter.extrapolate.index import ADD_BLOCK
from mimicfilter.store.parts import write_part

EDGES_DIR = "edges"
BLOCK = 1024  # rows compared with every later row at a time (a 1024 × n float32 block)


@dataclass
class CellEdges:
    """Edges between positions of a cell's samples: ends, similarity (the pair's), image and text cosines."""

    a: np.ndarray
    b: np.ndarray
    similarity: np.ndarray
    image: np.ndarray
    text: np.ndarray

    @classmethod
    def empty(cls) -> CellEdges:
        return cls(*(np.zeros(0, dtype=np.int64),) * 2, *(np.zeros(0, dtype=np.float32),) * 3)

    def take(self, positions: np.ndarray) -> CellEdges:
        return CellEdges(self.a[positions], self.b[positions], self.similarity[positions], self.image[positions],
                         self.text[positions])

    @classmethod
    def concat(cls, parts: list[CellEdges]) -> CellEdges:
        return cls(*(np.concatenate([getattr(part, name) for part in parts]) for name in ("a", "b", "similarity", "image", "text")))


def _identical(vectors: np.ndarray, long_captions: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(representatives, each row's representative): rows with the same bytes (vectors, and long
    captions' digests when given) share the first of them."""
    rows = np.ascontiguousarray(vectors).reshape(len(vectors), -1).view(np.uint8)
    if long_captions is not None:
        rows = np.hstack([rows, long_captions])
    keys = np.ascontiguousarray(rows).view(np.dtype((np.void, rows.shape[1])))[:, 0]
    _, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
    return np.sort(first), first[inverse.reshape(-1)]


def _dots(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Row-wise cosines of unit rows (float16 in, float32 out), a block at a time."""
    out = np.empty(len(left), dtype=np.float32)
    for start in range(0, len(left), ADD_BLOCK):
        stop = start + ADD_BLOCK
        out[start:stop] = np.einsum("nd,nd->n", left[start:stop].astype(np.float32), right[start:stop].astype(np.float32))
    return out


def _above(images: np.ndarray, floor: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs (i < j) of unit rows whose cosine is at least ``floor``: a block of rows against every
    row after its start (torch BLAS), so about half the similarity matrix is computed, a block at a time."""
    rows = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
    lower = torch.ones(BLOCK, BLOCK, dtype=torch.bool).tril()  # the pairs (i, j ≤ i) of a block with itself
    found_a, found_b, found_s = [], [], []
    for start in range(0, len(rows), BLOCK):
        sims = rows[start : start + BLOCK] @ rows[start:].T
        size = len(sims)
        sims[:, :size].masked_fill_(lower[:size, :size], 0.0)  # each pair once (0 never reaches a floor > 0)
        hits = (sims >= floor).nonzero()
        found_a.append(hits[:, 0].numpy() + start)
        found_b.append(hits[:, 1].numpy() + start)
        found_s.append(sims[hits[:, 0], hits[:, 1]].numpy())
    if not found_a:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    return np.concatenate(found_a), np.concatenate(found_b), np.concatenate(found_s)


def pair_similarity(image: np.ndarray, text: np.ndarray, caption_factor: float) -> np.ndarray:
    """One number per pair on the image's scale: ≥ 1 − ε exactly when the images are within ε and
    the captions within caption_factor × ε."""
    return np.minimum(image, 1.0 - (1.0 - text) / caption_factor).astype(np.float32)


def same_text(long_captions: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per pair: may its captions' embeddings decide? Yes when the text tower saw both whole (zero
    digests); else only when both are long and their folded texts are the same."""
    left, right = long_captions[a], long_captions[b]
    whole = ~left.any(axis=1) & ~right.any(axis=1)
    return whole | (left == right).all(axis=1)


def cell_edges(vectors: np.ndarray, floor: float, pair: bool, caption_factor: float = 1.0,
               long_captions: np.ndarray | None = None) -> CellEdges:
    """The spanning forest of the pairs of one cell's samples ([n, sides, d] float16) above ``floor``.
    With ``pair`` and ``long_captions`` ([n, 20] digests, zeros when whole), two captions the text
    tower cut are near-duplicates only when their folded texts are equal: embeddings of their first
    tokens cannot tell "kiss: woman, man, dark skin tone, light skin tone" from its other skin tones."""
    count = len(vectors)
    if count < 2:
        return CellEdges.empty()
    long_captions = long_captions if pair else None
    keyed = vectors if pair else vectors[:, :1]
    representatives, representative_of = _identical(keyed, long_captions)
    copies = np.flatnonzero(representative_of != np.arange(count))
    ones = np.ones(len(copies), dtype=np.float32)
    found = [CellEdges(copies, representative_of[copies], ones, ones, ones if pair else np.full(len(copies), np.nan, np.float32))]
    if len(representatives) > 1:
        a, b, image = _above(vectors[representatives, 0], floor)
        a, b, image = representatives[a], representatives[b], np.minimum(image, 1.0)
        text = np.full(len(a), np.nan, dtype=np.float32)
        similarity = image
        if pair and len(a):
            text = np.minimum(_dots(vectors[a, 1], vectors[b, 1]), 1.0)
            similarity = pair_similarity(image, text, caption_factor)
            passed = similarity >= floor
            if long_captions is not None:
                passed &= same_text(long_captions, a, b)
            a, b, image, text, similarity = a[passed], b[passed], image[passed], text[passed], similarity[passed]
        found.append(CellEdges(a, b, similarity, image, text))
    edges = CellEdges.concat(found)
    return edges.take(spanning_forest(count, edges.a, edges.b, edges.similarity))


def range_part(out_dir: Path, start: int, stop: int) -> Path:
    return Path(out_dir) / EDGES_DIR / f"cells-{start:08d}-{stop:08d}.parquet"


def write_range(out_dir: Path, units: list[Unit], start: int, stop: int, floor: float, pair: bool,
                caption_factor: float = 1.0) -> int:
    """The edges of cells [start, stop) as one Parquet part (skipped when it exists); returns its edges."""
    path = range_part(out_dir, start, stop)
    if path.exists():
        return 0
    block: CellBlock = read_range(out_dir, units, start, stop)
    boundaries = np.flatnonzero(np.diff(block.cells)) + 1
    found, offsets = [], []
    for low, high in zip(np.r_[0, boundaries], np.r_[boundaries, len(block.cells)]):
        edges = cell_edges(block.vectors[low:high], floor, pair, caption_factor,
                           None if block.long_captions is None else block.long_captions[low:high])
        found.append(edges)
        offsets.append(np.full(len(edges.a), low, dtype=np.int64))
    edges = CellEdges.concat(found) if found else CellEdges.empty()
    shift = np.concatenate(offsets) if offsets else np.zeros(0, dtype=np.int64)
    ends = [identities(out_dir, units, block.units[positions + shift], block.rows[positions + shift])
            for positions in (edges.a, edges.b)]
    columns = {f"{name}_{side}": end.column(name) for side, end in zip("ab", ends) for name in end.column_names}
    columns |= {"similarity": edges.similarity, "image_similarity": edges.image, "text_similarity": edges.text}
    table = pa.table({field.name: pa.array(columns[field.name]).cast(field.type)
                      if not isinstance(columns[field.name], pa.ChunkedArray) else columns[field.name].cast(field.type)
                      for field in EDGE_SCHEMA}, schema=EDGE_SCHEMA)
    write_part(table, path)
    return table.num_rows
