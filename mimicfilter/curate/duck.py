"""DuckDB over score tables: finding the Parquet parts, one connection setup, the ``scores`` view,
and the one per-sample aggregation (a sample's epoch rows → one row) that filter, report and
extrapolate share. Torch-free.

A sample is identified by (``shard``, ``index``): keys are only names, and a shard may hold the same
key twice. The ``scores`` view gives rows whose scores are NaN or infinite (tables written before
that had a status of its own, or edited by hand) the status ``non_finite_score`` and null values,
so no rule, vote or plot ever sees them.
"""

from __future__ import annotations

import glob
import re
from pathlib import Path
from typing import Sequence

import duckdb

from mimicfilter.errors import MimicfilterError
from mimicfilter.store.parts import part_paths
from mimicfilter.store.paths import SCORES_DIR, is_remote_url, run_path
from mimicfilter.store.schema import ANCHOR_COLUMN, NON_FINITE, POOL_COLUMNS, SCORE_VALUE_COLUMNS

_MEMORY_LIMIT = re.compile(r"^\d+(\.\d+)?\s*(B|KB|MB|GB|TB|KIB|MIB|GIB|TIB)$", re.IGNORECASE)


def score_files(inputs: Sequence[str]) -> list[str]:
    """Parquet files of run directories (their finished parts), Parquet files or globs."""
    files: list[str] = []
    for item in inputs:
        if is_remote_url(item):
            files.extend(_remote_score_files(item))
            continue
        path = run_path(item)  # file:// URLs are local paths
        if path.is_dir():
            parts = part_paths(path) if (path / SCORES_DIR).is_dir() else sorted(path.glob("[!.]*.parquet"))
            if not parts:
                raise MimicfilterError(f"{item} holds no score parts", hint="pass a `mimicfilter score --out` directory")
            files.extend(str(part) for part in parts)
        elif any(char in str(path) for char in "*?["):
            matches = sorted(glob.glob(str(path)))
            if not matches:
                raise MimicfilterError(f"no Parquet files match {item}", hint="check the pattern")
            files.extend(matches)
        elif path.is_file():
            files.append(str(path))
        else:
            raise MimicfilterError(f"{item} does not exist", hint="pass run directories or Parquet files")
    return list(dict.fromkeys(files))


def _remote_score_files(url: str) -> list[str]:
    """The parts of a run directory at an fsspec URL, or the URL itself when it names a file."""
    path = run_path(url)
    if path.is_file():
        return [url]
    parts = part_paths(path) if (path / SCORES_DIR).is_dir() else sorted(path.glob("[!.]*.parquet"), key=str)
    if not parts:
        raise MimicfilterError(f"{url} holds no score parts", hint="pass a `mimicfilter score --out` location")
    return [str(part) for part in parts]


def sql_string(text: str) -> str:
    """A SQL string literal."""
    return "'" + text.replace("'", "''") + "'"


def sql_identifier(name: str) -> str:
    """A quoted SQL identifier: a column name taken from a user's file may hold any character."""
    return '"' + name.replace('"', '""') + '"'


def check_memory_limit(memory_limit: str | None) -> str | None:
    """``--memory-limit`` as DuckDB reads it (a number and a unit), or a one-line error."""
    if memory_limit is None:
        return None
    text = memory_limit.strip()
    if not _MEMORY_LIMIT.match(text):
        raise MimicfilterError(f"--memory-limit {memory_limit!r}: not an amount of memory",
                               hint="a number and a unit, e.g. 4GB, 512MB or 2GiB")
    return text


def connect(memory_limit: str | None = None, temp_directory: str | None = None) -> duckdb.DuckDBPyConnection:
    connection = duckdb.connect()
    # DuckDB draws its progress bar on stdout, which belongs to --keys - / --json
    connection.execute("SET enable_progress_bar = false")
    if memory_limit:
        connection.execute("SET memory_limit = ?", [check_memory_limit(memory_limit)])  # a parameter, never SQL
    if temp_directory:
        connection.execute("SET temp_directory = ?", [temp_directory])
    connection.execute("SET preserve_insertion_order = false")  # lets DuckDB stream big GROUP BYs
    return connection


def forbid_file_access(connection: duckdb.DuckDBPyConnection) -> None:
    """From here on, SQL cannot read or write files (user SQL such as ``--where`` runs after this).

    Everything the rules need is already in tables; DuckDB may still spill to its temp directory.
    One-way: DuckDB refuses to turn it back on.
    """
    connection.execute("SET enable_external_access = false")


# the score table's core columns and the kind of type each must have (a part of another kind of table
# would otherwise fail deep inside a query)
_SCORE_COLUMN_KINDS = {"shard": "text", "key": "text", "status": "text", "index": "integer", "epoch": "integer",
                       "mimic_score": "number", "mimic_weight": "number"}
_TYPES_OF_KIND = {"text": ("VARCHAR",), "integer": ("TINYINT", "SMALLINT", "INTEGER", "BIGINT", "HUGEINT", "UTINYINT",
                                                    "USMALLINT", "UINTEGER", "UBIGINT"),
                  "number": ("FLOAT", "DOUBLE", "DECIMAL", "TINYINT", "SMALLINT", "INTEGER", "BIGINT")}


def _of_kind(type_name: str, kind: str) -> bool:
    return type_name.split("(")[0] in _TYPES_OF_KIND[kind] or type_name.strip('"') == "NULL"


def load_scores(connection: duckdb.DuckDBPyConnection, files: Sequence[str]) -> None:
    """A view ``scores`` over the pool's rows of the given parts, and ``anchor_scores`` over the rows
    of the anchors scored beside it (score --trusted; empty when there are none)."""
    for protocol in sorted({file.split("://", 1)[0] for file in files if is_remote_url(file)}):
        import fsspec

        # DuckDB reads fsspec URLs through the same filesystem (and credentials) as the writers
        connection.register_filesystem(fsspec.filesystem(protocol))
    try:
        listing = ", ".join(sql_string(path) for path in files)  # views cannot take prepared parameters
        connection.execute(
            f"CREATE OR REPLACE VIEW score_rows AS SELECT * FROM read_parquet([{listing}], union_by_name = true)"
        )
        types = {row[0]: row[1] for row in connection.execute("DESCRIBE score_rows").fetchall()}
        # union_by_name fills a column one part lacks with nulls: a part without mimic_score would read
        # as rows of non-finite scores, not as the broken part it is (its footer says; no data is read)
        lacking = connection.execute(f"SELECT file_name, list(name) FROM parquet_schema([{listing}]) "
                                     "GROUP BY file_name ORDER BY file_name").fetchall()
    except duckdb.Error as error:
        raise MimicfilterError(f"cannot read the score tables: {' '.join(str(error).split())[:300]}") from error
    columns = set(types)
    missing = set(_SCORE_COLUMN_KINDS) - columns
    if missing:
        raise MimicfilterError(f"not a mimicfilter score table: no column {', '.join(sorted(missing))}")
    for file_name, names in lacking:
        if set(_SCORE_COLUMN_KINDS) - set(names):
            absent = ", ".join(sorted(set(_SCORE_COLUMN_KINDS) - set(names)))
            raise MimicfilterError(f"score part {file_name} lacks {absent}, which the other parts have",
                                   hint="a score part was written by another program, or edited")
    wrong = [f"{name} is {types[name]}" for name, kind in _SCORE_COLUMN_KINDS.items()
             if name in types and not _of_kind(types[name], kind)]
    if wrong:
        raise MimicfilterError(f"not a mimicfilter score table: {', '.join(wrong)}",
                               hint="a score part was written by another program, or edited")
    # a row without its identity would be a sample of its own (or break the report's shard order); the
    # Parquet statistics answer this without reading the columns
    identity = ("shard", "key", "index", "epoch", "status")
    unnamed = connection.execute("SELECT count(*) FROM score_rows WHERE "
                                 + " OR ".join(f'"{name}" IS NULL' for name in identity)).fetchone()[0]
    if unnamed:
        raise MimicfilterError(f"not a mimicfilter score table: {unnamed} row(s) without one of {', '.join(identity)}",
                               hint="a score part was written by another program, or edited")
    finite = _finite_rows_sql(columns)
    if ANCHOR_COLUMN not in columns:
        finite = f"SELECT *, NULL::VARCHAR AS {ANCHOR_COLUMN} FROM ({finite})"
    # anchors are never pool samples: no count, vote, rule, manifest, key or shard ever sees them
    connection.execute(f"CREATE OR REPLACE VIEW scores AS SELECT * FROM ({finite}) WHERE {ANCHOR_COLUMN} IS NULL")
    connection.execute(f"CREATE OR REPLACE VIEW anchor_scores AS SELECT * FROM ({finite}) WHERE {ANCHOR_COLUMN} IS NOT NULL")


def hash_condition(total: int, wanted: int, key_sql: str = 'shard, "index"') -> str:
    """A deterministic ~wanted/total sample by hash of the sample's identity (stable across epochs)."""
    if total <= wanted:
        return "true"
    fraction_ppm = max(1, int(1_000_000 * wanted / total))
    return f"(hash({key_sql}) % 1000000) < {fraction_ppm}"


# An ok row must carry these: a null there (a table edited by hand, a writer's bug) is no score at all.
REQUIRED_SCORE_COLUMNS = ("mimic_score", "mimic_weight")


def _finite_rows_sql(columns: set[str]) -> str:
    """``score_rows`` with non-finite values nulled, and ok rows with a non-finite value or a missing
    required score re-labelled ``non_finite_score``."""
    values = [column for column in SCORE_VALUE_COLUMNS if column in columns]
    bad = " OR ".join([f"NOT coalesce(isfinite({column}), true)" for column in values]
                      + [f"{column} IS NULL" for column in REQUIRED_SCORE_COLUMNS])
    replaced = [f"CASE WHEN status = 'ok' AND ({bad}) THEN '{NON_FINITE}' ELSE status END AS status",
                f"CASE WHEN status = 'ok' AND ({bad}) THEN 'non-finite or missing score in the table' ELSE error END "
                "AS error",
                *(f"CASE WHEN isfinite({column}) THEN {column} END AS {column}" for column in values)]
    if "error" not in columns:
        replaced.pop(1)
    return f"SELECT * REPLACE ({', '.join(replaced)}) FROM score_rows"


# A sample is usable only if every epoch's row is: one NaN, infinite or missing score in any epoch marks
# the whole sample ``non_finite_score`` (its other epochs' scores would describe a different trajectory),
# with the first such epoch named in its error.
SAMPLE_STATUS_SQL = (f"CASE WHEN bool_or(status = '{NON_FINITE}') THEN '{NON_FINITE}' "
                     "ELSE arg_max(status, epoch) END")
SAMPLE_ERROR_SQL = (f"CASE WHEN bool_or(status = '{NON_FINITE}') THEN 'epoch ' || "
                    f"min(epoch) FILTER (WHERE status = '{NON_FINITE}') || ': ' || "
                    f"coalesce(arg_min(error, epoch) FILTER (WHERE status = '{NON_FINITE}'), 'non-finite score') "
                    "ELSE arg_max(error, epoch) END")


def epoch_columns(epochs: Sequence[int]) -> list[str]:
    """Each epoch's mimic score as a per-sample column (``mimic_score_e0`` ...) when there are several."""
    if len(epochs) < 2:
        return []
    return [f"avg(mimic_score) FILTER (WHERE epoch = {epoch}) AS mimic_score_e{epoch}" for epoch in epochs]


def per_sample_sql(connection: duckdb.DuckDBPyConnection, source: str = "scores", extra: Sequence[str] = (),
                   rows: str | None = None) -> str:
    """SELECT one row per sample (shard, index) from the epoch rows of ``source``.

    Per sample: identity (key, uid), its status and error (the last epoch's, or ``non_finite_score``
    when any epoch's score is; see SAMPLE_STATUS_SQL), the number of epochs,
    the mean and last-epoch mimic score, the mean relative weight, loss, CLIP score and reference
    loss (NULL where the table lacks the column), and the label. ``extra`` adds aggregates;
    ``rows`` replaces the FROM clause's row source (e.g. a sub-query adding a vote column).
    """
    columns = {row[0] for row in connection.execute(f"DESCRIBE {source}").fetchall()}

    def optional(expression: str, column: str, name: str) -> str:
        return f"{expression} AS {name}" if column in columns else f"NULL AS {name}"

    selected = [
        "shard", "min(key) AS key",  # a sample's key is the same in every epoch
        "any_value(uid) AS uid",
        '"index"::INTEGER AS "index"',
        f"{SAMPLE_STATUS_SQL} AS status",
        f"{SAMPLE_ERROR_SQL} AS error",
        "count(*)::INTEGER AS epochs",
        "avg(mimic_score) AS mimic_score",
        "arg_max(mimic_score, epoch) AS mimic_score_last",
        "avg(mimic_weight) AS mimic_weight",
        optional("avg(loss)", "loss", "loss"),
        optional("avg(clip_score)", "clip_score", "clip_score"),
        optional("avg(ref_loss)", "ref_loss", "ref_loss"),
        optional("avg(negclip_score)", "negclip_score", "negclip_score"),
        optional("any_value(label)::INTEGER", "label", "label"),
        *(optional(f"max({name})::INTEGER", name, name) for name in POOL_COLUMNS),
        *extra,
    ]
    return f"SELECT {', '.join(selected)} FROM {rows or source} GROUP BY shard, \"index\""
