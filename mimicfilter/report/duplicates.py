"""The report's duplicates: how many groups, the samples in them, the largest groups as contact
sheets with their members side by side, and the funnel's step when a filter removed them.

Where the groups come from: the ``duplicate_group`` column of a ``--filter-manifest`` written by
``filter --dedup`` (what that filter dropped), else the run itself — exact duplicates from the
content hashes and near ones from ``RUN/dedup`` at filter's default ε — shown as what ``filter
--dedup`` would drop (the default rule keeps them). Exact duplicates of the pool are always counted.
"""

from __future__ import annotations

import html
from dataclasses import asdict
from pathlib import Path
from typing import Any

from mimicfilter.curate.dedup import DEFAULT_EPSILON, DUPLICATE_PREFIX, MERGED_DUPLICATE_REASON, DedupOptions, find_groups
from mimicfilter.curate.duck import sql_string
from mimicfilter.errors import MimicfilterError
from mimicfilter.report.page_parts import sample_card
from mimicfilter.report.samples import SheetEntry
from mimicfilter.report.sheets import contact_sheets
from mimicfilter.report.tally import DropReason
from mimicfilter.shards.decode import DecodeConfig

GROUPS_SHOWN = 4  # the largest groups on the page
MEMBERS_SHOWN = 8  # members of each, the kept one first
e = html.escape


def _manifest_has_groups(manifest: Path | None) -> bool:
    if manifest is None:
        return False
    import pyarrow.parquet as pq

    return "duplicate_group" in pq.read_schema(manifest).names


def _group_table(connection, run_dir: Path, manifest: Path | None) -> dict[str, Any]:
    """Table ``report_groups`` (shard, index, duplicate_group, duplicate_of) and where it came from."""
    if _manifest_has_groups(manifest):
        state = find_groups(connection, DedupOptions(), (), [])
        connection.execute(
            "CREATE OR REPLACE TEMP TABLE report_groups AS SELECT shard, \"index\", duplicate_group, duplicate_of "
            f"FROM read_parquet({sql_string(str(manifest))}) WHERE duplicate_group IS NOT NULL")
        return {"source": "manifest", "removed": True, "exact": state.exact}
    try:
        state = find_groups(connection, DedupOptions(enabled=True), (str(run_dir),), [])
    except MimicfilterError as error:  # no hashes, no pairs, or an unfinished dedup: say so
        return {"source": None, "removed": False, "note": str(error), "exact": {"counted": False}}
    connection.execute(
        "CREATE OR REPLACE TEMP TABLE report_groups AS SELECT shard, \"index\", duplicate_group, "
        "CASE WHEN position > 1 THEN kept_name END AS duplicate_of FROM dedup_groups")
    return {"source": "run", "removed": False, "epsilon": DEFAULT_EPSILON, "exact": state.exact,
            "pairs": [str(source.path) for source in state.sources], "warnings": state.warnings}


def duplicate_groups(connection, run_dir: Path, manifest: Path | None, members: int) -> dict[str, Any]:
    """The counts, and the largest groups' members as sheet entries (``members`` each at most; 0:
    none). Needs the ``samples`` table with ``kept`` and ``reason`` (report/tally.py)."""
    found = _group_table(connection, run_dir, manifest)
    if found["source"] is None:
        return found | {"groups": 0, "samples_in_groups": 0, "duplicates": 0, "largest": []}
    groups, in_groups, duplicates = connection.execute(
        "SELECT count(DISTINCT duplicate_group), count(*), count(duplicate_of) FROM report_groups").fetchone()
    largest = connection.execute(
        "SELECT duplicate_group, count(*) FROM report_groups GROUP BY 1 ORDER BY 2 DESC, 1 LIMIT ?",
        [GROUPS_SHOWN]).fetchall()
    shown = []
    for group, size in largest:
        rows = connection.execute(
            "SELECT s.shard, s.key, s.mimic_score, s.label, s.kept, s.reason, s.\"index\" FROM report_groups g "
            "JOIN samples s ON s.shard = g.shard AND s.\"index\" = g.\"index\" WHERE g.duplicate_group = ? "
            "ORDER BY g.duplicate_of IS NOT NULL, s.mimic_score DESC NULLS LAST, s.shard, s.\"index\" LIMIT ?",
            [group, min(members, MEMBERS_SHOWN)]).fetchall()
        shown.append({"group": int(group), "size": int(size),
                      "entries": [SheetEntry(shard, key, float("nan") if score is None else float(score), label,
                                             bool(kept), reason, int(index))
                                  for shard, key, score, label, kept, reason, index in rows]})
    return found | {"groups": groups, "samples_in_groups": in_groups, "duplicates": duplicates, "largest": shown}


def group_sheets(duplicates: dict[str, Any], decode: DecodeConfig, out_dir: Path, locate) -> dict[str, Any]:
    """The largest groups' members read back from their shards as cards (thumbnails into ``out_dir``)."""
    sheets = {str(group["group"]): [SheetEntry(**{**asdict(entry), "shard": locate(entry.shard)})
                                    for entry in group["entries"]] for group in duplicates["largest"]}
    cards = contact_sheets({name: entries for name, entries in sheets.items() if entries}, decode, out_dir)
    largest = [{"group": group["group"], "size": group["size"],
                "cards": [asdict(each) for each in cards.get(str(group["group"]), [])]} for group in duplicates["largest"]]
    return {**duplicates, "largest": largest}


def merge_duplicate_reasons(reasons: list[DropReason]) -> list[DropReason]:
    """One drop reason for every ``duplicate of SHARD/KEY`` (a manifest of ``filter --dedup`` has one
    per kept sample), with the first examples; the list stays most common first."""
    duplicates = [reason for reason in reasons if reason.reason.startswith(DUPLICATE_PREFIX)]
    if not duplicates:
        return reasons
    examples = [example for reason in duplicates for example in reason.examples][:3]
    merged = DropReason(MERGED_DUPLICATE_REASON, "rule", sum(reason.count for reason in duplicates), examples)
    others = [reason for reason in reasons if not reason.reason.startswith(DUPLICATE_PREFIX)]
    return sorted([*others, merged], key=lambda reason: (-reason.count, reason.reason))


def funnel_step(duplicates: dict[str, Any]) -> dict[str, int]:
    """The funnel's extra count when the filter removed duplicates (``funnel.duplicates``)."""
    return {"duplicates": duplicates["duplicates"]} if duplicates.get("removed") else {}


def duplicates_section(summary: dict[str, Any]) -> str:
    """The page's section: counts, where the groups come from, the largest groups side by side."""
    found = summary.get("duplicates") or {}
    parts = ["<section id='duplicates'><h2>Duplicates</h2>"]
    exact = found.get("exact") or {}
    if exact.get("counted"):
        parts.append(f"<p>Exact duplicates (the same image bytes and caption): <span data-key='duplicates.exact.groups'>"
                     f"{exact['groups']:,}</span> groups holding {exact['samples']:,} usable samples.</p>")
    if found.get("source") is None:
        parts.append(f"<p class='muted'>No duplicate groups: {e(found.get('note', 'none found'))}</p></section>")
        return "".join(parts)
    count = (f"<span data-key='duplicates.groups'>{found['groups']:,}</span> groups hold {found['samples_in_groups']:,} "
             f"samples, <span data-key='duplicates.duplicates'>{found['duplicates']:,}</span> of them duplicates of the "
             "kept member of their group")
    if found["removed"]:
        parts.append(f"<p>{count}, dropped by <code>filter --dedup</code> before the rule (reason <code>duplicate of "
                     "SHARD/KEY</code>).</p>")
    else:
        near = "and the near-duplicate pairs of <code>mimicfilter dedup</code>" if found.get("pairs") else \
            "(no <code>mimicfilter dedup</code> output: exact duplicates only)"
        parts.append(f"<p>By the content hashes {near} at ε {found['epsilon']:g}: {count}. The rule here keeps them; "
                     "<code>filter --dedup</code> would drop them.</p>")
    parts.append("<p class='muted'>The largest groups, the member kept by <code>--dedup</code> first. See "
                 "docs/filter.md#duplicates.</p>")
    for group in found["largest"]:
        parts.append(f"<h3>Group {group['group']} <span class='muted'>({group['size']:,} samples)</span></h3>"
                     "<div class='sheet'>" + "".join(sample_card(each, None) for each in group.get("cards", [])) + "</div>")
    parts.append("</section>")
    return "".join(parts)
