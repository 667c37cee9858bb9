"""Near-duplicate pairs inside one cell, and the edges a range of cells writes.

Within a cell: byte-identical vectors are collapsed first (a banner copied 10,000 times costs one
comparison, not 10⁸); the rest are compared all against all by a faiss range search on the image
side at the floor cosine 1 − ``max_epsilon`` (BLAS blocks, no n × n matrix kept); with ``pair``
the candidates' captions are compared too, and a pair's similarity is the lower of the two cosines
(both must pass). Of all those pairs only a maximum spanning forest is written
(:func:`~mimicfilter.curate.groups.spanning_forest`): at most one edge per sample, and for every
ε ≤ max_epsilon its edges of similarity ≥ 1 − ε connect exactly the samples all pairs would, so
``filter`` picks ε afterwards without a new search.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa

from mimicfilter.curate.dedup import EDGE_SCHEMA
from mimicfilter.curate.groups import spanning_forest
from mimicfilter.dedup.buckets import CellBlock, identities, read_range
from mimicfilter.dedup.sources import Unit
from mimicfilter.extrapolate.index import ADD_BLOCK, as_float32
from mimicfilter.store.parts import write_part

EDGES_DIR = "edges"


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


def _identical(vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(representatives, each row's representative): rows with the same bytes share the first of them."""
    keys = np.ascontiguousarray(vectors).reshape(len(vectors), -1).view(np.dtype((np.void, vectors[0].nbytes)))[:, 0]
    _, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
    return np.sort(first), first[inverse.reshape(-1)]


def _dots(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Row-wise cosines of unit rows (float16 in, float32 out), a block at a time."""
    out = np.empty(len(left), dtype=np.float32)
    for start in range(0, len(left), ADD_BLOCK):
        stop = start + ADD_BLOCK
        out[start:stop] = np.einsum("nd,nd->n", left[start:stop].astype(np.float32), right[start:stop].astype(np.float32))
    return out


def cell_edges(vectors: np.ndarray, floor: float, pair: bool) -> CellEdges:
    """The spanning forest of the pairs of one cell's samples ([n, sides, d] float16) above ``floor``."""
    count = len(vectors)
    if count < 2:
        return CellEdges.empty()
    keyed = vectors if pair else vectors[:, :1]
    representatives, representative_of = _identical(keyed)
    copies = np.flatnonzero(representative_of != np.arange(count))
    ones = np.ones(len(copies), dtype=np.float32)
    found = [CellEdges(copies, representative_of[copies], ones, ones, ones if pair else np.full(len(copies), np.nan, np.float32))]
    if len(representatives) > 1:
        images = as_float32(vectors[representatives, 0])
        index = faiss.IndexFlatIP(images.shape[1])
        index.add(images)
        limits, sims, neighbours = index.range_search(images, floor)
        queries = np.repeat(np.arange(len(representatives)), np.diff(limits).astype(np.int64))
        upper = neighbours > queries  # each pair once, no self pairs
        a, b, image = representatives[queries[upper]], representatives[neighbours[upper]], sims[upper].astype(np.float32)
        text = np.full(len(a), np.nan, dtype=np.float32)
        similarity = image
        if pair and len(a):
            text = _dots(vectors[a, 1], vectors[b, 1])
            passed = text >= floor
            a, b, image, text = a[passed], b[passed], image[passed], text[passed]
            similarity = np.minimum(image, text)
        found.append(CellEdges(a, b, np.minimum(similarity, 1.0), np.minimum(image, 1.0), np.minimum(text, 1.0)))
    edges = CellEdges.concat(found)
    return edges.take(spanning_forest(count, edges.a, edges.b, edges.similarity))


def range_part(out_dir: Path, start: int, stop: int) -> Path:
    return Path(out_dir) / EDGES_DIR / f"cells-{start:08d}-{stop:08d}.parquet"


def write_range(out_dir: Path, units: list[Unit], start: int, stop: int, floor: float, pair: bool) -> int:
    """The edges of cells [start, stop) as one Parquet part (skipped when it exists); returns its edges."""
    path = range_part(out_dir, start, stop)
    if path.exists():
        return 0
    block: CellBlock = read_range(out_dir, units, start, stop)
    boundaries = np.flatnonzero(np.diff(block.cells)) + 1
    found, offsets = [], []
    for low, high in zip(np.r_[0, boundaries], np.r_[boundaries, len(block.cells)]):
        edges = cell_edges(block.vectors[low:high], floor, pair)
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
