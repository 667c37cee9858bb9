"""Which samples of a unit the scored run already has: the same (shard, key), or the same id.

Built once per worker from the scored table and asked once per unit, in time that does not grow
with the scored run: ids are sorted once as fixed-width byte strings and looked up by binary
search (exact — no hashing), and the keys of one shard are looked up among that shard's scored
rows only (grouped once).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


class SortedIds:
    """A list of strings (nulls never match), for exact vectorised lookups."""

    def __init__(self, values: pa.Array | pa.ChunkedArray):
        values = pa.chunked_array([values]) if isinstance(values, pa.Array) else values
        values = values.cast(pa.binary())
        valid = np.asarray(values.is_valid().to_numpy(), dtype=bool)
        present = values.filter(pa.array(valid))
        self.width = int(pc.max(pc.binary_length(present)).as_py() or 1) if len(present) else 1
        flat = np.asarray(present.to_numpy(), dtype=f"S{self.width}")
        order = np.argsort(flat, kind="stable")
        self.sorted = flat[order]
        self.rows = np.flatnonzero(valid)[order]  # each sorted value's position in the list

    def positions(self, values: pa.Array | pa.ChunkedArray) -> np.ndarray:
        """The first position of each value in the list, −1 where absent (or null)."""
        if not len(self.sorted) or not len(values):
            return np.full(len(values), -1, dtype=np.int64)
        values = values.cast(pa.binary())
        fits = np.asarray(pc.and_(values.is_valid(), pc.less_equal(pc.binary_length(values), self.width))
                          .fill_null(False).to_numpy(zero_copy_only=False), dtype=bool)
        # a value longer than the widest member is in no list, and would be cut to fit the array's width
        queries = np.asarray(pc.if_else(pa.array(fits), values, pa.scalar(b"", pa.binary())).to_numpy(zero_copy_only=False),
                             dtype=f"S{self.width}")
        found = np.searchsorted(self.sorted, queries).clip(max=len(self.sorted) - 1)
        return np.where(fits & (self.sorted[found] == queries), self.rows[found], -1)

    def contains(self, values: pa.Array | pa.ChunkedArray) -> np.ndarray:
        return self.positions(values) >= 0


class ScoredMembers:
    """The scored run's samples, for :meth:`in_scored` per unit."""

    def __init__(self, scored: pa.Table, id_column: str):
        self.ids = SortedIds(scored.column(id_column))
        encoded = scored.column("shard").combine_chunks().dictionary_encode()
        codes = np.asarray(encoded.indices.to_numpy(zero_copy_only=False), dtype=np.int64)
        self.order = np.argsort(codes, kind="stable")  # rows grouped by shard
        bounds = np.concatenate([[0], np.cumsum(np.bincount(codes, minlength=len(encoded.dictionary)))])
        self.spans = {name: (int(bounds[i]), int(bounds[i + 1])) for i, name in enumerate(encoded.dictionary.to_pylist())}
        self.keys = scored.column("key")

    def keys_of(self, shard: str) -> SortedIds | None:
        span = self.spans.get(shard)
        return None if span is None else SortedIds(self.keys.take(pa.array(self.order[span[0] : span[1]])))

    def in_scored(self, shard: str, keys: pa.Array | pa.ChunkedArray, ids: pa.Array | pa.ChunkedArray | None) -> np.ndarray:
        """Which of a unit's samples (all of ``shard``; ``keys``, ``ids``) the scored run has."""
        found = np.zeros(len(keys), dtype=bool)
        same_shard = self.keys_of(shard)
        if same_shard is not None:
            found |= same_shard.contains(keys)
        if ids is not None:
            found |= self.ids.contains(ids)
        return found
