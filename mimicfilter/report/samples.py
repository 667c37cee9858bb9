"""What the report draws and shows, taken from the ``samples`` table of tally.py: a deterministic hash
sample of the samples for the plots (with the optional pool columns), and the samples of each
contact sheet (lowest, highest, borderline, random kept, random dropped)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from mimicfilter.store.schema import POOL_COLUMNS  # nullable: tables written before them have none

SHEETS = ("lowest", "borderline", "highest", "random_kept", "random_dropped")

# A sample is (shard, index): a shard may hold one key twice (curate/duck.py per_sample_sql).
_IDENTITY = 'shard || chr(0) || "index"::VARCHAR'


@dataclass(frozen=True)
class SheetEntry:
    shard: str
    key: str
    mimic_score: float
    label: int | None
    kept: bool
    reason: str
    index: int  # position in the shard: the sample's identity (keys may repeat)


@dataclass(frozen=True)
class Sampled:
    """Columns of the sampled rows (numpy arrays; float columns with NaN for NULL), and counts."""

    data: dict[str, np.ndarray]
    used: int  # rows drawn
    total: int  # rows the sample was drawn from


def hash_condition(total: int, wanted: int, key_sql: str = _IDENTITY) -> str:
    """A deterministic ~wanted/total sample by hash of the sample's identity (stable across epochs)."""
    if total <= wanted:
        return "true"
    fraction_ppm = max(1, int(1_000_000 * wanted / total))
    return f"(hash({key_sql}) % 1000000) < {fraction_ppm}"


def _as_arrays(data: dict[str, Any], floats: tuple[str, ...]) -> dict[str, np.ndarray]:
    arrays = {}
    for name, values in data.items():
        if name in floats:
            mask = np.asarray(np.broadcast_to(getattr(values, "mask", False), np.shape(values)))
            column = np.asarray(np.ma.getdata(values), dtype=float).copy()
            column[mask] = np.nan
            arrays[name] = column
        else:
            arrays[name] = np.asarray(values)
    return arrays


def score_columns(connection) -> set[str]:
    return {row[0] for row in connection.execute("DESCRIBE scores").fetchall()}


def sample_scores(connection, wanted: int) -> Sampled:
    """Usable samples' mean mimic score, CLIP score (NaN where absent) and keep decision, hash-sampled."""
    total = connection.execute("SELECT count(*) FROM samples WHERE status = 'ok' AND mimic_score IS NOT NULL").fetchone()[0]
    where = hash_condition(total, wanted)
    data = connection.execute(
        "SELECT mimic_score::DOUBLE AS mimic_score, clip_score::DOUBLE AS clip_score, kept FROM samples "
        f"WHERE status = 'ok' AND mimic_score IS NOT NULL AND {where}"
    ).fetchnumpy()
    arrays = _as_arrays(data, ("mimic_score", "clip_score"))
    arrays["kept"] = arrays["kept"].astype(bool)
    return Sampled(arrays, len(arrays["kept"]), total)


def score_rows_sampled(connection, wanted: int) -> tuple[int, int]:
    """(score rows of the hash-sampled usable samples, score rows of all usable samples): what the
    plots stand on, counted from the per-sample table (no second pass over the score parts)."""
    usable = "status = 'ok' AND mimic_score IS NOT NULL"
    total_samples = connection.execute(f"SELECT count(*) FROM samples WHERE {usable}").fetchone()[0]
    where = hash_condition(total_samples, wanted)
    used, total = connection.execute(
        f"SELECT coalesce(sum(epochs) FILTER (WHERE {where}), 0), coalesce(sum(epochs), 0) FROM samples WHERE {usable}"
    ).fetchone()
    return int(used), int(total)


def sample_pool(connection, wanted: int) -> Sampled | None:
    """Caption length and image size per sample (all statuses) with its keep decision; None when the
    score table has no value in any pool column (the per-sample table carries them: no second pass)."""
    columns = [column for column in POOL_COLUMNS if column in score_columns(connection)]
    counts = connection.execute(f"SELECT {', '.join(f'count({c})' for c in columns)} FROM samples").fetchone() if columns else ()
    present = [column for column, count in zip(columns, counts) if count]  # all null: the table predates them
    if not present:
        return None
    total = connection.execute("SELECT count(*) FROM samples").fetchone()[0]
    where = hash_condition(total, wanted)
    data = connection.execute(
        f"SELECT kept, {', '.join(f'{column}::DOUBLE AS {column}' for column in present)} FROM samples WHERE {where}"
    ).fetchnumpy()
    arrays = _as_arrays(data, tuple(present))
    arrays["kept"] = arrays["kept"].astype(bool)
    return Sampled(arrays, len(arrays["kept"]), total)


def _entries(connection, condition: str, order: str, count: int, parameters: list | None = None) -> list[SheetEntry]:
    rows = connection.execute(
        f"SELECT shard, key, mimic_score, label, kept, reason, \"index\" FROM samples "
        f"WHERE status = 'ok' AND mimic_score IS NOT NULL AND {condition} ORDER BY {order}, shard, \"index\" LIMIT ?",
        [*(parameters or []), count],
    ).fetchall()
    return [SheetEntry(shard, key, float(score), label, bool(kept), reason, index)
            for shard, key, score, label, kept, reason, index in rows]


def sheet_entries(connection, count: int, cut: float | None) -> dict[str, list[SheetEntry]]:
    """The samples of each contact sheet, ``count`` each, over every row (DuckDB top-n, out of core).

    Borderline: the samples whose mean mimic score lies nearest the rule's cut (shown in score
    order). Random: a deterministic hash order of (shard, index), so the same run shows the same samples.
    """
    if not count:
        return {}
    sheets = {
        "lowest": _entries(connection, "true", "mimic_score ASC", count),
        "highest": _entries(connection, "true", "mimic_score DESC", count),
        "random_kept": _entries(connection, "kept", f"hash({_IDENTITY})", count),
        "random_dropped": _entries(connection, "NOT kept", f"hash({_IDENTITY})", count),
    }
    if cut is not None:
        nearest = _entries(connection, "true", "abs(mimic_score - ?)", count, [cut])
        sheets["borderline"] = sorted(nearest, key=lambda entry: (entry.mimic_score, entry.shard, entry.index))
    return {name: sheets[name] for name in SHEETS if sheets.get(name)}
