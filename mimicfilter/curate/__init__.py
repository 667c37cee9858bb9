"""Curating scored data, torch-free: DuckDB over the parts, per-epoch votes, keep/drop rules, the
``filter`` command and its outputs (manifest, keys, DataComp subsets, curated shards)."""
