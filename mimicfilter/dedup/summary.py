"""What a finished ``dedup`` found, for stats.json: samples searched, edges kept, and for a ladder of
ε the groups they form (connected components of the edges with similarity ≥ 1 − ε), the samples
in them, the duplicates one-per-group dedup drops and the largest groups."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa

from mimicfilter.curate.duck import sql_string
from mimicfilter.curate.groups import components
from mimicfilter.dedup.buckets import bucket_dir
from mimicfilter.dedup.pairs import EDGES_DIR
from mimicfilter.dedup.sources import Unit

EPSILON_LADDER = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3)


def searched_samples(out_dir: Path, units: list[Unit]) -> int:
    """Samples with an embedding over every bucket (each once, whatever its cells)."""
    total = 0
    for unit in units:
        with pa.memory_map(str(bucket_dir(out_dir, unit) / "identity.arrow")) as source:
            total += pa.ipc.open_file(source).read_all().num_rows
    return total


def groups_at(a: np.ndarray, b: np.ndarray, count: int) -> dict[str, Any]:
    """Groups of the nodes 0..count-1 joined by the edges (a, b)."""
    labels = components(count, a, b)
    sizes = np.bincount(labels, minlength=count)
    sizes = np.sort(sizes[sizes > 1])[::-1]
    return {"groups": int(len(sizes)), "samples_in_groups": int(sizes.sum()), "duplicates": int(sizes.sum() - len(sizes)),
            "largest": sizes[:5].tolist()}


def edge_counts(out_dir: Path, units: list[Unit], max_epsilon: float, default_epsilon: float) -> dict[str, Any]:
    files = sorted((Path(out_dir) / EDGES_DIR).glob("[!.]*.parquet"))
    counts: dict[str, Any] = {"samples": searched_samples(out_dir, units), "edges": 0, "by_epsilon": {}}
    if not files:
        return counts | {"at_default": groups_at(np.zeros(0, np.int64), np.zeros(0, np.int64), 0)}
    connection = duckdb.connect()
    listing = ", ".join(sql_string(str(path)) for path in files)
    connection.execute(f"CREATE VIEW edges AS SELECT * FROM read_parquet([{listing}])")
    connection.execute("CREATE TABLE ends AS SELECT row_number() OVER (ORDER BY shard, \"index\") - 1 AS node, shard, "
                       "\"index\" FROM (SELECT shard_a AS shard, index_a AS \"index\" FROM edges UNION "
                       "SELECT shard_b, index_b FROM edges)")
    table = connection.execute(
        "SELECT ea.node AS a, eb.node AS b, similarity FROM edges e JOIN ends ea ON ea.shard = e.shard_a AND "
        "ea.\"index\" = e.index_a JOIN ends eb ON eb.shard = e.shard_b AND eb.\"index\" = e.index_b").fetchnumpy()
    count = connection.execute("SELECT count(*) FROM ends").fetchone()[0]
    connection.close()
    a, b, similarity = (np.asarray(table[name]) for name in ("a", "b", "similarity"))
    counts["edges"] = int(len(a))
    for epsilon in sorted({*(e for e in EPSILON_LADDER if e <= max_epsilon), default_epsilon, max_epsilon}):
        keep = similarity >= 1.0 - epsilon
        counts["by_epsilon"][f"{epsilon:g}"] = groups_at(a[keep], b[keep], count)
    return counts | {"at_default": counts["by_epsilon"][f"{default_epsilon:g}"]}
