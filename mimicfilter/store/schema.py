"""The tables a run directory holds: the score schema (plus its optional columns) and the embed schema.

Rows cross into this module as plain dicts keyed by column name (one per output row), the one
place where records become Arrow tables.
"""

from __future__ import annotations

from typing import Any, Iterable

import numpy as np
import pyarrow as pa

STATUSES = ("ok", "decode_error", "missing_image", "missing_text", "missing_label", "too_large", "shard_error",
            "non_finite_score")
SHARD_ERROR = "shard_error"  # a shard could not be read (any further): one row for the failure
DIGEST_BYTES = 20  # SHA-1: the hash columns' width
NON_FINITE = "non_finite_score"  # a score column came out NaN or infinite (diverged proxy, NaN weights)
# anchors only (never a pool row): a confusable negative not made, its image misclassified by the reference
NOT_CONFUSABLE = "not_confusable"

SCORE_SCHEMA = pa.schema(
    [
        pa.field("shard", pa.string(), nullable=False),
        pa.field("key", pa.string(), nullable=False),
        pa.field("uid", pa.string()),
        pa.field("index", pa.int32(), nullable=False),
        pa.field("epoch", pa.int16(), nullable=False),
        pa.field("step", pa.int32(), nullable=False),
        pa.field("status", pa.string(), nullable=False),
        pa.field("error", pa.string()),
        pa.field("mimic_score", pa.float32()),
        pa.field("mimic_weight", pa.float32()),
        pa.field("loss", pa.float32()),
        pa.field("clip_score", pa.float32()),
        pa.field("ref_loss", pa.float32()),
        # the reference's CLIP score less its contrastive normaliser over the batch (negCLIPLoss, Wang et al.
        # 2024): -ref_loss / the reference's logit scale for softmax CLIP; null for SigLIP and classification
        pa.field("negclip_score", pa.float32()),
        pa.field("label", pa.int32()),
        # the pool's shape, per sample (repeated in every epoch; null when unknown): caption length in
        # characters and the original image size; tables written before these existed read as null
        pa.field("caption_chars", pa.int32()),
        pa.field("image_width", pa.int32()),
        pa.field("image_height", pa.int32()),
        # exact-duplicate keys (null when unknown): SHA-1 of the image file's bytes and of the caption as
        # scored (UTF-8, stripped), 20 bytes each — hex strings would take 40 — so 40 bytes per row, 40 GB
        # per billion rows before compression (hashes do not compress); a 64-bit digest would collide
        # somewhere in a billion samples with odds of about 3 %, 160 bits practically never
        pa.field("image_sha1", pa.binary(DIGEST_BYTES)),
        pa.field("caption_sha1", pa.binary(DIGEST_BYTES)),
        # SHA-1 of the caption folded (case, whitespace) when the text tower cut it at its context
        # length, null when the embedding saw all of it: near-duplicate captions are then told apart
        # by their whole text, not by an embedding of their first tokens
        pa.field("long_caption_sha1", pa.binary(DIGEST_BYTES)),
        # "trusted", "synthetic" or "confusable" on the rows of score --trusted's anchors; null on pool samples
        pa.field("anchor", pa.string()),
    ]
)
SCORE_COLUMNS = tuple(SCORE_SCHEMA.names)
POOL_COLUMNS = ("caption_chars", "image_width", "image_height")
HASH_COLUMNS = ("image_sha1", "caption_sha1")  # the exact-duplicate keys
LONG_CAPTION_COLUMN = "long_caption_sha1"  # read by dedup --dedup-on pair only
SCORE_VALUE_COLUMNS = ("mimic_score", "mimic_weight", "loss", "clip_score", "ref_loss", "negclip_score")
ANCHOR_COLUMN = "anchor"
# its values: what an anchor row is (pipeline/anchors.py makes them, curate/calibrate.py reads them)
TRUSTED, SYNTHETIC, CONFUSABLE = "trusted", "synthetic", "confusable"

# Optional columns, appended after SCORE_SCHEMA's only when a run asks for them: the default schema
# (and every reader of it) is unchanged. ``read_part``/``read_scores`` drop them unless named.
EMBEDDING_COLUMN = "embedding"  # score --save-embeddings, and every `embed` part: the image side
TEXT_EMBEDDING_COLUMN = "text_embedding"  # the caption's (or the label's) side of the pair, next to it
EXTRAPOLATED_COLUMN = "extrapolated"  # `extrapolate` output: true where the scores are predictions
# Both sides of the pair, in this order. Runs written before mimicfilter stored pairs have only
# `embedding` (then the initial proxy's image embedding; run.json's `embedding` says which).
PAIR_COLUMNS = (EMBEDDING_COLUMN, TEXT_EMBEDDING_COLUMN)

# `embed` parts: who the sample is, its status, label and pair embedding.
EMBED_COLUMNS = ("shard", "key", "uid", "index", "status", "error", "label", *HASH_COLUMNS, LONG_CAPTION_COLUMN,
                 *PAIR_COLUMNS)


def embedding_field(dim: int, name: str = EMBEDDING_COLUMN) -> pa.Field:
    """An L2-normalised embedding column: a fixed-size list of ``dim`` float16 (null unless ok)."""
    return pa.field(name, pa.list_(pa.float16(), dim))


def score_schema(embedding_dim: int | None = None, extrapolated: bool = False) -> pa.Schema:
    """SCORE_SCHEMA, plus the pair columns (with ``embedding_dim``) and/or ``extrapolated`` when asked."""
    schema = SCORE_SCHEMA
    if embedding_dim is not None:
        for name in PAIR_COLUMNS:
            schema = schema.append(embedding_field(embedding_dim, name))
    if extrapolated:
        schema = schema.append(pa.field(EXTRAPOLATED_COLUMN, pa.bool_(), nullable=False))
    return schema


def embed_schema(dim: int) -> pa.Schema:
    """Parts written by ``mimicfilter embed``."""
    return pa.schema([SCORE_SCHEMA.field(name) for name in EMBED_COLUMNS if name not in PAIR_COLUMNS]
                     + [embedding_field(dim, name) for name in PAIR_COLUMNS])


def embedding_array(values: list[Any], dim: int) -> pa.FixedSizeListArray:
    """Per-row embeddings (array-likes of length ``dim``, or None) as a float16 fixed-size list array."""
    mask = np.array([value is None for value in values], dtype=bool)
    flat = np.zeros((len(values), dim), dtype=np.float16)
    for row, value in enumerate(values):
        if value is not None:
            flat[row] = np.asarray(value, dtype=np.float16)
    return pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1)), dim, mask=pa.array(mask))


def rows_to_table(rows: Iterable[dict[str, Any]], embedding_dim: int | None = None) -> pa.Table:
    """Score rows (dicts with the schema's columns; missing columns are null) as a table in index order.

    With ``embedding_dim``, the table has the pair columns too (from each row's values of them).
    """
    ordered = sorted(rows, key=lambda row: (row["epoch"], row["index"]))
    columns = {name: [row.get(name) for row in ordered] for name in SCORE_COLUMNS}
    table = pa.table(columns, schema=SCORE_SCHEMA)
    if embedding_dim is not None:
        table = _append_pair_columns(table, ordered, embedding_dim)
    return table


def _append_pair_columns(table: pa.Table, ordered: list[dict[str, Any]], dim: int) -> pa.Table:
    for name in PAIR_COLUMNS:
        table = table.append_column(embedding_field(dim, name), embedding_array([row.get(name) for row in ordered], dim))
    return table


def embed_rows_to_table(rows: list[dict[str, Any]], dim: int) -> pa.Table:
    """`embed` rows as a table in index order."""
    ordered = sorted(rows, key=lambda row: row["index"])
    schema = embed_schema(dim)
    columns = {name: [row.get(name) for row in ordered] for name in EMBED_COLUMNS if name not in PAIR_COLUMNS}
    table = pa.table(columns, schema=pa.schema([schema.field(name) for name in columns]))
    return _append_pair_columns(table, ordered, dim)
