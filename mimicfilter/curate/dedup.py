"""``filter --dedup``: one sample per group of duplicates, before any rule. Torch-free.

Groups are the connected components of two kinds of edges between the pool's usable samples:

* **exact**: the same image bytes (``image_sha1``) and, with ``pair``, the same caption
  (``caption_sha1``) and label — from the score table itself, no other input needed;
* **near**: the pairs of ``mimicfilter dedup`` (``RUN/dedup/edges/``, or ``--dedup-from DIR``) whose
  similarity is at least 1 − ε (``--dedup-threshold``; the search kept a spanning forest down to
  its own ``max_epsilon``, so any smaller ε gives the exact groups of a full search at that ε).

Of each group the best sample by the keep column (``--dedup-keep COL[:lowest]``; by default the
first keep rule's column, else ``mimic_score``; ties by shard and position) stays; the others get
the reason ``duplicate of SHARD/KEY``. The rest of ``filter`` then sees one sample per group: the
``scores`` view is narrowed to the survivors before the votes are fitted, so the relative score,
the calibrated estimate and every rule count groups, not copies (:func:`narrow`), and the
duplicates come back as rows the rules never keep (:func:`add_duplicates`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from mimicfilter.curate.duck import per_sample_sql, sql_string
from mimicfilter.curate.groups import components
from mimicfilter.errors import MimicfilterError
from mimicfilter.store.paths import RUN_FILE, SUCCESS_FILE, is_remote_url, run_path
from mimicfilter.store.rundir import run_record
from mimicfilter.store.schema import HASH_COLUMNS

DEDUP_ON = ("pair", "image")  # pair: the image AND the caption alike (another caption: another training pair)
DEFAULT_EPSILON = 0.1  # images at cosine ≥ 0.9 (captions ≥ 1 − caption_factor × 0.1 with pair); docs/filter.md#duplicates
EDGES_GLOB = "edges/[!.]*.parquet"
DEFAULT_PAIRS_DIR = "dedup"
DUPLICATE_PREFIX = "duplicate of "
MERGED_DUPLICATE_REASON = "duplicate of a kept sample"  # every ``duplicate of SHARD/KEY`` counted together
KEEP_DIRECTIONS = ("highest", "lowest")
LOWEST_FIRST_RULES = ("bottom-frac", "max")
# per-sample columns the kept member can be chosen by (the votes come later, from the survivors)
KEEP_COLUMNS = ("mimic_score", "mimic_score_last", "mimic_weight", "loss", "clip_score", "ref_loss", "negclip_score",
                "caption_chars", "image_width", "image_height", "epochs")
EDGE_SCHEMA = pa.schema([
    *(pa.field(f"{name}_{side}", kind) for side in "ab" for name, kind in
      (("shard", pa.string()), ("key", pa.string()), ("uid", pa.string()), ("index", pa.int32()))),
    pa.field("similarity", pa.float32()),  # the pair's: min(image, text) with pair, the image's with image
    pa.field("image_similarity", pa.float32()),
    pa.field("text_similarity", pa.float32()),  # NaN with image
])


@dataclass(frozen=True)
class DedupOptions:
    """``--dedup``, ``--dedup-from``, ``--dedup-threshold``, ``--dedup-keep``."""

    enabled: bool = False
    pairs: str | None = None  # a `mimicfilter dedup` directory; None: the dedup/ folder of each input run
    epsilon: float = DEFAULT_EPSILON
    keep: str | None = None  # COL[:lowest|:highest]

    def __post_init__(self):
        if not 0 <= self.epsilon < 1:
            raise MimicfilterError(f"--dedup-threshold {self.epsilon}: an ε in [0, 1)", hint="pairs with cosine ≥ 1 − ε are duplicates")
        if self.keep is not None:
            column, _, direction = self.keep.partition(":")
            if column not in KEEP_COLUMNS or (direction and direction not in KEEP_DIRECTIONS):
                raise MimicfilterError(f"--dedup-keep {self.keep}: not a column the kept duplicate can be chosen by",
                                       hint=f"one of {', '.join(KEEP_COLUMNS)}, optionally :lowest")
        if not self.enabled and (self.pairs is not None or self.keep is not None or self.epsilon != DEFAULT_EPSILON):
            raise MimicfilterError("--dedup-from, --dedup-threshold and --dedup-keep need --dedup")


@dataclass(frozen=True)
class PairsSource:
    path: Path
    info: dict[str, Any]

    @property
    def mode(self) -> str:
        return self.info["fingerprint"]["dedup_on"]

    @property
    def match(self) -> tuple[str, ...]:
        return tuple(self.info["match"])


@dataclass
class DedupState:
    """What filter's hooks share: the options, the groups' sources and counts."""

    options: DedupOptions
    sources: list[PairsSource]
    mode: str
    keep_column: str
    keep_lowest: bool
    exact: dict[str, Any] = field(default_factory=dict)  # exact duplicates of the whole pool, always counted
    counts: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


def pairs_sources(options: DedupOptions, inputs: tuple[str, ...]) -> list[PairsSource]:
    """The `mimicfilter dedup` outputs to read: --dedup-from, else each local input run's dedup/."""
    if options.pairs is not None:
        folders = [Path(options.pairs)]
        if not (folders[0] / RUN_FILE).is_file():
            raise MimicfilterError(f"--dedup-from {options.pairs} is not a `mimicfilter dedup` output (no run.json)")
    else:
        folders = [run_path(item) / DEFAULT_PAIRS_DIR for item in inputs if not is_remote_url(item)]
        folders = [folder for folder in folders if (folder / RUN_FILE).is_file()]
    sources = []
    for folder in folders:
        info = run_record(folder / RUN_FILE)
        if info.get("command") != "dedup":
            raise MimicfilterError(f"{folder} was written by `{info.get('command')}`, not `mimicfilter dedup`")
        if not (folder / SUCCESS_FILE).exists():
            raise MimicfilterError(f"{folder} has not finished (no _SUCCESS)",
                                   hint="re-run the `mimicfilter dedup` command that made it to complete it")
        if options.epsilon > info["fingerprint"]["max_epsilon"]:
            raise MimicfilterError(f"--dedup-threshold {options.epsilon} is looser than the search in {folder} kept "
                                   f"(max {info['fingerprint']['max_epsilon']})",
                                   hint="lower --dedup-threshold, or re-run `mimicfilter dedup` with a larger --max-threshold")
        sources.append(PairsSource(folder, info))
    if len({source.mode for source in sources}) > 1:
        raise MimicfilterError("the dedup outputs mix --dedup-on pair and image", hint="deduplicate every run one way")
    return sources


def keep_choice(options: DedupOptions, rules: list) -> tuple[str, bool]:
    """(column, lowest first) the kept member of a group is chosen by."""
    if options.keep is not None:
        column, _, direction = options.keep.partition(":")
        return column, direction == "lowest"
    for rule in rules:
        if rule.column in KEEP_COLUMNS:
            return rule.column, rule.kind in LOWEST_FIRST_RULES
    return "mimic_score", False


def _score_columns(connection) -> set[str]:
    return {row[0] for row in connection.execute("DESCRIBE scores").fetchall()}


def _hash_key(mode: str) -> list[str]:
    return ["image_sha1"] + (["caption_sha1", "label"] if mode == "pair" else [])


def _nodes(connection, state: DedupState) -> None:
    """``dedup_nodes``: the usable pool samples with the keep value and their content hashes; with
    ``--dedup`` a table numbered by (shard, index), else a view (counting needs no numbers)."""
    present = _score_columns(connection)
    hashes = [f"any_value({name}) AS {name}" for name in HASH_COLUMNS if name in present]
    per_sample = per_sample_sql(connection, extra=hashes)
    selected = ", ".join(["shard", '"index"', "key", "uid", "label", f"{state.keep_column} AS keep_value",
                          *(name for name in HASH_COLUMNS if name in present)])
    if state.options.enabled:
        connection.execute(f"CREATE OR REPLACE TEMP TABLE dedup_nodes AS SELECT row_number() OVER "
                           f"(ORDER BY shard, \"index\") - 1 AS node, {selected} FROM ({per_sample}) WHERE status = 'ok'")
    else:
        connection.execute(f"CREATE OR REPLACE TEMP VIEW dedup_nodes AS SELECT {selected} FROM ({per_sample}) "
                           "WHERE status = 'ok'")


def _has_hashes(connection) -> bool:
    return "image_sha1" in {row[0] for row in connection.execute("DESCRIBE dedup_nodes").fetchall()}


def _exact_edges(connection, mode: str) -> str | None:
    """SQL of (a, b) node pairs with the same content hash, or None when the table has no hashes."""
    if not _has_hashes(connection):
        return None
    key = ", ".join(_hash_key(mode))
    return (f"SELECT node AS a, min(node) OVER (PARTITION BY {key}) AS b FROM dedup_nodes "
            "WHERE image_sha1 IS NOT NULL")


def exact_counts(connection, mode: str) -> dict[str, Any]:
    """Exact duplicates among the usable samples: groups, samples in them, the largest, an example."""
    if not _has_hashes(connection):
        return {"counted": False, "why": "the score table has no content hashes (scored before they existed)"}
    groups, samples, largest, example = connection.execute(
        f"SELECT count(*), coalesce(sum(n), 0), coalesce(max(n), 0), min(example) FROM (SELECT count(*) AS n, "
        f"min(shard || '/' || key) AS example FROM dedup_nodes WHERE image_sha1 IS NOT NULL "
        f"GROUP BY {', '.join(_hash_key(mode))} HAVING count(*) > 1)").fetchone()
    return {"counted": True, "on": mode, "groups": groups, "samples": int(samples), "largest": largest,
            **({"example": example} if example else {})}


def _near_edges(connection, sources: list[PairsSource], epsilon: float) -> str | None:
    if not sources:
        return None
    files = ", ".join(sql_string(str(path)) for source in sources for path in sorted(source.path.glob(EDGES_GLOB)))
    if not files:
        return None
    match = sources[0].match

    def joined(side: str) -> str:
        return " AND ".join(f'n{side}."{name}" = e."{name}_{side}"' for name in match)

    return (f"SELECT na.node AS a, nb.node AS b FROM read_parquet([{files}], union_by_name = true) e "
            f"JOIN dedup_nodes na ON {joined('a')} JOIN dedup_nodes nb ON {joined('b')} "
            f"WHERE e.similarity >= {1.0 - epsilon!r}")


def _group_members(connection, edge_sql: list[str]) -> int:
    """Table ``dedup_members`` (node, grp: the smallest node of its component); returns the edges used."""
    union = " UNION ALL ".join(f"SELECT a, b FROM ({sql}) WHERE a <> b" for sql in edge_sql)
    edges = connection.execute(union).fetchnumpy() if union else {"a": np.zeros(0, np.int64), "b": np.zeros(0, np.int64)}
    a, b = np.asarray(edges["a"], dtype=np.int64), np.asarray(edges["b"], dtype=np.int64)
    nodes = np.unique(np.concatenate([a, b]))
    labels = components(len(nodes), np.searchsorted(nodes, a), np.searchsorted(nodes, b))
    members = pa.table({"node": nodes, "grp": nodes[labels]})
    connection.register("dedup_members_arrow", members)
    connection.execute("CREATE OR REPLACE TEMP TABLE dedup_members AS SELECT * FROM dedup_members_arrow")
    connection.unregister("dedup_members_arrow")
    return len(a)


def find_groups(connection, options: DedupOptions, inputs: tuple[str, ...], rules: list) -> DedupState:
    """Count the pool's exact duplicates (always) and, with ``--dedup``, find the groups and each
    one's kept sample: table ``dedup_groups`` (shard, index, duplicate_group, kept_name, position:
    1 for the kept member)."""
    sources = pairs_sources(options, inputs) if options.enabled else []
    mode = sources[0].mode if sources else "pair"
    column, lowest = keep_choice(options, rules)
    state = DedupState(options, sources, mode, column, lowest)
    _nodes(connection, state)
    state.exact = exact_counts(connection, mode)
    if not options.enabled:
        return state
    exact, near = _exact_edges(connection, mode), _near_edges(connection, sources, options.epsilon)
    if near is None:
        state.warnings.append("no near-duplicate pairs for this run (run `mimicfilter dedup RUN` first, or pass "
                              "--dedup-from DIR): --dedup removed exact duplicates only")
    if exact is None and near is None:
        raise MimicfilterError("--dedup has nothing to group by: no content hashes in the score table and no "
                               "`mimicfilter dedup` output", hint="run `mimicfilter dedup RUN` (it needs embeddings)")
    edges = _group_members(connection, [sql for sql in (exact, near) if sql is not None])
    order = "ASC" if lowest else "DESC"
    connection.execute(
        "CREATE OR REPLACE TEMP TABLE dedup_groups AS SELECT n.shard, n.\"index\", m.grp AS duplicate_group, "
        f"first(n.shard || '/' || n.key) OVER w AS kept_name, row_number() OVER w AS position "
        "FROM dedup_members m JOIN dedup_nodes n USING (node) "
        f"WINDOW w AS (PARTITION BY m.grp ORDER BY n.keep_value {order} NULLS LAST, n.shard, n.\"index\")")
    state.counts = _group_counts(connection, edges)
    return state


def prepare(connection, options: DedupOptions, inputs: tuple[str, ...], rules: list) -> DedupState:
    """Filter's first dedup hook, right after the score tables load: :func:`find_groups`, then
    ``scores`` narrowed to the survivors (one sample per group)."""
    state = find_groups(connection, options, inputs, rules)
    if options.enabled:
        narrow(connection)
    return state


def narrow(connection) -> None:
    """``scores`` from here on holds the survivors only; ``pool_scores`` keeps every pool row."""
    connection.execute('CREATE OR REPLACE TEMP TABLE dedup_dropped AS SELECT shard, "index" FROM dedup_groups '
                       "WHERE position > 1")
    connection.execute("ALTER VIEW scores RENAME TO pool_scores")
    connection.execute('CREATE VIEW scores AS SELECT s.* FROM pool_scores s ANTI JOIN dedup_dropped d '
                       'ON s.shard = d.shard AND s."index" = d."index"')


def _group_counts(connection, edges: int) -> dict[str, Any]:
    groups, members, largest = connection.execute(
        "SELECT count(DISTINCT duplicate_group), count(*), coalesce(max(position), 0) FROM dedup_groups").fetchone()
    sizes = [row[0] for row in connection.execute(
        "SELECT count(*) FROM dedup_groups GROUP BY duplicate_group ORDER BY 1 DESC LIMIT 5").fetchall()]
    return {"groups": groups, "samples_in_groups": members, "dropped": members - groups, "largest": sizes,
            "edges": edges}


def add_duplicates(connection, state: DedupState | None) -> None:
    """Filter's second hook, before joins and rules: the duplicates' rows back into ``samples`` (their
    aggregates from every epoch; no votes), and the columns ``duplicate_group`` (every member of a
    group) and ``duplicate_of`` (SHARD/KEY of the kept member, on the dropped ones)."""
    if state is None or not state.options.enabled:
        return
    rows = "(SELECT s.* FROM pool_scores s SEMI JOIN dedup_dropped d ON s.shard = d.shard AND s.\"index\" = d.\"index\")"
    connection.execute(f"CREATE OR REPLACE TEMP TABLE dedup_rows AS {per_sample_sql(connection, 'pool_scores', rows=rows)}")
    connection.execute(
        "CREATE OR REPLACE TABLE samples AS SELECT s.*, g.duplicate_group, "
        "CASE WHEN g.position > 1 THEN g.kept_name END AS duplicate_of "
        "FROM (SELECT * FROM samples UNION ALL BY NAME SELECT * FROM dedup_rows) s "
        'LEFT JOIN dedup_groups g ON s.shard = g.shard AND s."index" = g."index"')


EXCLUDED_REASON_SQL = f"CASE WHEN duplicate_of IS NOT NULL THEN {sql_string(DUPLICATE_PREFIX)} || duplicate_of END"


def excluded_reason(state: DedupState | None) -> str | None:
    """The rules' ``excluded`` reason: duplicates are dropped before any rule, with their own reason."""
    return EXCLUDED_REASON_SQL if state is not None and state.options.enabled else None


def summarise(summary: dict[str, Any], state: DedupState) -> dict[str, Any]:
    """summary.json's duplicate counts: exact ones always (``duplicates.content``), and with
    ``--dedup`` the groups (``dedup``); the per-sample reasons ``duplicate of X`` counted as one."""
    summary["duplicates"] = {**summary.get("duplicates", {}), "content": state.exact}
    if not state.options.enabled:
        return summary
    reasons: dict[str, int] = {}
    for reason, count in summary.get("reasons", {}).items():
        name = MERGED_DUPLICATE_REASON if reason.startswith(DUPLICATE_PREFIX) else reason
        reasons[name] = reasons.get(name, 0) + count
    summary["reasons"] = dict(sorted(reasons.items(), key=lambda item: (-item[1], item[0])))
    summary["dedup"] = {"on": state.mode, "epsilon": state.options.epsilon, "min_cosine": 1 - state.options.epsilon,
                        "keep": f"{state.keep_column}:{'lowest' if state.keep_lowest else 'highest'}",
                        "sources": [str(source.path) for source in state.sources], **state.counts}
    summary["warnings"] = state.warnings + summary.get("warnings", [])
    return summary
