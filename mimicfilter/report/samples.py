"""What the report draws and shows, taken from the ``samples`` table of tally.py (or the view over a
filter manifest that stands for it): a deterministic hash sample of the samples for the plots (with
the optional pool columns), drawn in one pass, and the samples of each contact sheet (lowest,
highest, borderline, random kept, random dropped)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from mimicfilter.curate.duck import hash_condition
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


@dataclass(frozen=True)
class Drawn:
    """Everything the plots stand on: the hash samples and the score rows behind them."""

    scores: Sampled  # usable samples: mean mimic score, CLIP score (NaN where absent), kept
    pool: Sampled | None  # every sample: kept and the pool columns (None: the table has none of them)
    score_rows_used: int  # score rows (epochs) of the sampled usable samples
    score_rows_total: int  # score rows of all usable samples


_USABLE = "status = 'ok' AND mimic_score IS NOT NULL"


def draw_samples(connection, wanted: int) -> Drawn:
    """Two passes over ``samples``, whatever it holds: one counts, one draws both hash samples.

    The usable samples behind the score plots and every sample behind the pool plots are each a
    deterministic hash sample of about ``wanted`` (by the sample's identity, so the same run draws
    the same samples), fetched in (shard, index) order, so scatters overplot alike every time.
    """
    columns = [column for column in POOL_COLUMNS if column in score_columns(connection)]
    counts = connection.execute(
        f"SELECT count(*), count(*) FILTER (WHERE {_USABLE}), coalesce(sum(epochs) FILTER (WHERE {_USABLE}), 0)"
        + "".join(f", count({column})" for column in columns) + " FROM samples").fetchone()
    total, usable, rows_total = counts[:3]
    present = [column for column, count in zip(columns, counts[3:]) if count]  # all null: the table predates them
    for_scores = f"({_USABLE} AND {hash_condition(usable, wanted, _IDENTITY)})"
    for_pool = hash_condition(total, wanted, _IDENTITY) if present else "false"
    connection.execute(
        'CREATE OR REPLACE TEMP TABLE drawn AS SELECT shard, "index", mimic_score::DOUBLE AS mimic_score, '
        "clip_score::DOUBLE AS clip_score, kept, epochs, "
        + "".join(f"{column}::DOUBLE AS {column}, " for column in present)
        + f"{for_scores} AS for_scores, {for_pool} AS for_pool FROM samples WHERE {for_scores} OR {for_pool}")
    order = 'ORDER BY shard, "index"'  # the connection does not keep insertion order
    scores = _as_arrays(connection.execute(f"SELECT mimic_score, clip_score, kept FROM drawn WHERE for_scores {order}")
                        .fetchnumpy(), ("mimic_score", "clip_score"))
    scores["kept"] = scores["kept"].astype(bool)
    rows_used = connection.execute("SELECT coalesce(sum(epochs), 0) FROM drawn WHERE for_scores").fetchone()[0]
    pool = None
    if present:
        data = _as_arrays(connection.execute(f"SELECT kept, {', '.join(present)} FROM drawn WHERE for_pool {order}")
                          .fetchnumpy(), tuple(present))
        data["kept"] = data["kept"].astype(bool)
        pool = Sampled(data, len(data["kept"]), total)
    return Drawn(Sampled(scores, len(scores["kept"]), usable), pool, int(rows_used), int(rows_total))


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
