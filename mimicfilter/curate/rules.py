"""Keep/drop rules over the aggregated ``samples`` table, as SQL, each with a reason.

Keep rules (combined with ``and`` or ``or``):
  min COL=X, max COL=X          COL >= X, COL <= X
  top-frac COL=F, bottom-frac COL=F
                                the ⌊F·N⌋ highest / lowest of the N ok samples with a COL value
  top-k COL=N                   the N highest
  keep-votes                    the combined per-epoch votes say keep (see votes.py)
  calibrated COL>=X (or <=)     the calibrated cut on the anchors' best signal (calibrate.py), the
                                default when the run has anchors
  where SQL                     any SQL expression over the columns
Drop rules (subtracted afterwards: "keep A AND NOT B"): the same kinds, given with ``--drop``.

Fractions and top-k are global over all inputs, computed by DuckDB window functions; ties at a
cut are broken by (shard, index), so the same table always gives the same subset. A sample whose
status is not ``ok`` is never kept and carries ``status:<status>`` as its reason.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import duckdb

from mimicfilter.curate.duck import sql_string
from mimicfilter.errors import MimicfilterError

RANKED_KINDS = ("top-frac", "bottom-frac", "top-k")
VALUE_KINDS = ("min", "max", *RANKED_KINDS)
KINDS = (*VALUE_KINDS, "keep-votes", "where")
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass(frozen=True)
class Rule:
    kind: str
    column: str | None = None
    value: float | None = None
    expression: str | None = None  # for ``where``

    @property
    def text(self) -> str:
        if self.kind == "keep-votes":
            return "keep-votes"
        if self.kind == "calibrated":
            return f"calibrated {self.column}{self.expression}{self.value:.6g}"
        if self.kind == "where":
            return f"where {self.expression}"
        value = int(self.value) if self.kind == "top-k" else self.value
        return f"{self.kind} {self.column}={value:g}" if self.kind != "top-k" else f"top-k {self.column}={value}"


def _one_expression(text: str) -> str:
    """``text`` if DuckDB parses it as exactly one expression: the rule is pasted into the filter's SQL,
    where a stray parenthesis or quote could otherwise end the expression and rewrite the query around it
    (keep samples whose status is not ok, say)."""
    try:
        duckdb.SQLExpression(text)
    except duckdb.Error as error:
        message = " ".join(str(error).split())
        raise MimicfilterError(f"--where {text!r} is not one SQL expression: {message[:200]}",
                               hint="e.g. --where 'clip_score > 0.25 AND mimic_score > 0'") from error
    return text


def parse_rule(kind: str, argument: str | None = None) -> Rule:
    """``parse_rule("top-frac", "clip_score=0.3")``; one-line errors naming the rule."""
    if kind == "keep-votes":
        return Rule(kind)
    if kind == "where":
        if not argument or not argument.strip():
            raise MimicfilterError("--where needs an SQL expression", hint="e.g. --where 'clip_score > 0.25'")
        return Rule(kind, expression=_one_expression(argument.strip()))
    if kind not in VALUE_KINDS:
        raise MimicfilterError(f"unknown rule {kind!r}", hint=f"one of {', '.join(KINDS)}")
    if not argument or "=" not in argument:
        raise MimicfilterError(f"malformed rule --{kind} {argument!r}", hint=f"write --{kind} COLUMN=VALUE")
    column, _, raw_value = argument.partition("=")
    column = column.strip()
    if not _IDENTIFIER.match(column):
        raise MimicfilterError(f"malformed rule --{kind} {argument!r}: bad column name {column!r}")
    try:
        value = float(raw_value)
    except ValueError:
        raise MimicfilterError(f"malformed rule --{kind} {argument!r}: {raw_value!r} is not a number") from None
    if not math.isfinite(value):
        raise MimicfilterError(f"rule --{kind} {argument}: {raw_value.strip()} is not a finite number",
                               hint=f"write --{kind} {column}=VALUE with an ordinary number")
    if kind in ("top-frac", "bottom-frac") and not 0 <= value <= 1:
        raise MimicfilterError(f"rule --{kind} {argument}: a fraction must lie in [0, 1]")
    if kind == "top-k" and (value < 0 or value != int(value)):
        raise MimicfilterError(f"rule --{kind} {argument}: k must be a whole number >= 0")
    return Rule(kind, column=column, value=value)


def parse_drop(argument: str) -> Rule:
    """A drop rule written ``KIND:COL=VALUE`` (``bottom-frac:mimic_score=0.2``) or ``where:SQL``."""
    kind, separator, rest = argument.partition(":")
    if not separator:
        raise MimicfilterError(f"malformed --drop {argument!r}", hint="write --drop bottom-frac:mimic_score=0.2")
    return parse_rule(kind.strip(), rest if kind.strip() != "keep-votes" else None)


def _sql_literal(value: float) -> str:
    return repr(float(value))


@dataclass(frozen=True)
class _CompiledRules:
    windows: list[str]  # rank columns the predicates refer to
    predicates: list[str]  # one boolean SQL expression per rule


def _compile(rules: list[Rule], prefix: str, table: str, excluded: str | None) -> _CompiledRules:
    windows, predicates = [], []
    for index, rule in enumerate(rules):
        column = f'"{rule.column}"' if rule.column else None
        if rule.kind == "min":
            predicates.append(f"coalesce({column} >= {_sql_literal(rule.value)}, false)")
        elif rule.kind == "max":
            predicates.append(f"coalesce({column} <= {_sql_literal(rule.value)}, false)")
        elif rule.kind == "keep-votes":
            predicates.append("coalesce(vote_keep, false)")
        elif rule.kind == "calibrated":  # expression: ">=" (higher is cleaner) or "<="
            predicates.append(f"coalesce({column} {rule.expression} {_sql_literal(rule.value)}, false)")
        elif rule.kind == "where":
            predicates.append(f"coalesce((\n{rule.expression}\n), false)")  # newlines: a trailing -- comment ends
        else:
            rank, eligible = f"{prefix}_rank_{index}", f"(status = 'ok' AND {column} IS NOT NULL"
            eligible += f" AND ({excluded}) IS NULL)" if excluded else ")"
            order = "ASC" if rule.kind == "bottom-frac" else "DESC"
            windows.append(
                f"CASE WHEN {eligible} THEN row_number() OVER (PARTITION BY {eligible} "
                f"ORDER BY {column} {order}, shard, \"index\") END AS {rank}"
            )
            if rule.kind == "top-k":
                limit = str(int(rule.value))
            else:
                limit = f"floor({_sql_literal(rule.value)} * (SELECT count(*) FROM {table} WHERE {eligible}))"
            predicates.append(f"coalesce({rank} <= {limit}, false)")
    return _CompiledRules(windows, predicates)


def check_columns(connection: duckdb.DuckDBPyConnection, rules: list[Rule], table: str = "samples") -> None:
    columns = {row[0] for row in connection.execute(f"DESCRIBE {table}").fetchall()}
    for rule in rules:
        if rule.column and rule.column not in columns:
            raise MimicfilterError(
                f"rule '{rule.text}': unknown column {rule.column!r}",
                hint=f"columns: {', '.join(sorted(columns))}",
            )


def apply_rules(connection, keep: list[Rule], drop: list[Rule], combine: str, table: str = "samples",
                excluded: str | None = None) -> None:
    """Create table ``decisions``: every column of ``table`` plus ``kept`` and ``reason``.

    ``excluded``: an SQL expression over a row giving a reason, or NULL; a row with a reason is
    never kept, carries it, and is left out before the rules (fractions and top-k count the others
    only): ``filter --dedup``'s duplicates.
    """
    if combine not in ("and", "or"):
        raise MimicfilterError(f"--combine {combine!r}", hint="and or or")
    check_columns(connection, keep + drop, table)
    compiled_keep, compiled_drop = _compile(keep, "keep", table, excluded), _compile(drop, "drop", table, excluded)
    keep_windows, keep_predicates = compiled_keep.windows, compiled_keep.predicates
    drop_windows, drop_predicates = compiled_drop.windows, compiled_drop.predicates
    joiner = " AND " if combine == "and" else " OR "
    keep_all = joiner.join(f"({p})" for p in keep_predicates) if keep_predicates else "true"
    drop_any = " OR ".join(f"({p})" for p in drop_predicates) if drop_predicates else "false"
    reasons = ["WHEN status <> 'ok' THEN 'status:' || status"]
    if excluded:
        reasons.append(f"WHEN ({excluded}) IS NOT NULL THEN ({excluded})")
        keep_all = f"({excluded}) IS NULL AND ({keep_all})"
    if combine == "and":
        reasons += [f"WHEN NOT ({p}) THEN {sql_string('not ' + rule.text)}" for rule, p in zip(keep, keep_predicates)]
    elif keep_predicates:
        reasons.append(f"WHEN NOT ({keep_all}) THEN {sql_string('no keep rule matched')}")
    reasons += [f"WHEN {p} THEN {sql_string('dropped by ' + rule.text)}" for rule, p in zip(drop, drop_predicates)]
    windows = ", ".join(keep_windows + drop_windows)
    ranked = f"SELECT *{', ' + windows if windows else ''} FROM {table}"
    internal = [f"keep_rank_{i}" for i in range(len(keep))] + [f"drop_rank_{i}" for i in range(len(drop))]
    present = [name for name in internal if name in windows]
    exclude = f" EXCLUDE ({', '.join(present)})" if present else ""
    try:
        connection.execute(
            f"""
            CREATE OR REPLACE TABLE decisions AS
            SELECT *{exclude},
                   (status = 'ok' AND ({keep_all}) AND NOT ({drop_any})) AS kept,
                   CASE {' '.join(reasons)} ELSE 'kept' END AS reason
            FROM ({ranked})
            """
        )
    except duckdb.Error as error:
        message = " ".join(str(error).split())
        hint = "check --where expressions"
        if isinstance(error, duckdb.PermissionException):
            hint = "--where may use the per-sample columns and SQL functions, not files"
        raise MimicfilterError(f"cannot apply the rules: {message[:300]}", hint=hint) from error
