"""Samples that share a name: one key twice in a shard, one uid on several samples.

A sample is (shard, index), so neither case merges two samples; both are counted and shown by an
example, and ``--dedupe-uid`` decides what a shared uid means for the kept set:

* ``off`` (default): decisions unchanged, duplicates reported;
* ``keep-first``: of the kept samples sharing a uid, only the first (shard, index) stays kept;
* ``drop-all``: no sample whose uid another sample shares is kept, so a DataComp subset (which
  names uids, and makes DataComp's resharder copy every sample carrying one) selects exactly the
  kept samples.
"""

from __future__ import annotations

from typing import Any

DEDUPE_UID = ("off", "keep-first", "drop-all")
DUPLICATE_REASON = "duplicate uid"


def _shared(connection, column: str, table: str) -> dict[str, Any]:
    """Names (``key`` within a shard, or ``uid``) carried by more than one sample of ``table``.

    One hash aggregate counts them; only when there are some is an example listed (a string per
    group for every name would cost more than the count).
    """
    group = ["shard", "key"] if column == "key" else ["uid"]
    where = "" if column == "key" else "WHERE uid IS NOT NULL"
    names, samples, first = connection.execute(
        f"SELECT count(*), coalesce(sum(n), 0), min(row({', '.join(group)})) FROM ("
        f"SELECT {', '.join(group)}, count(*) AS n FROM {table} {where} GROUP BY ALL HAVING count(*) > 1)"
    ).fetchone()
    found = {"names": names, "samples": int(samples)}
    if names:
        values = list(first)
        condition = " AND ".join(f"{name} = ?" for name in group)
        (places,) = connection.execute(
            f"SELECT string_agg(shard || ' #' || \"index\", ', ' ORDER BY shard, \"index\") FROM {table} "
            f"WHERE {condition}", values).fetchone()
        found["example"] = {"name": " / ".join(values), "samples": places[:300]}
    return found


def find_duplicates(connection, table: str = "samples") -> dict[str, Any]:
    """Duplicate keys within a shard and duplicate uids across the table: counts and an example."""
    return {"keys": _shared(connection, "key", table), "uids": _shared(connection, "uid", table)}


def dedupe_uids(connection, mode: str) -> int:
    """Apply ``--dedupe-uid`` to table ``decisions``; returns how many kept samples it dropped."""
    if mode == "off":
        return 0
    before = connection.execute("SELECT count(*) FROM decisions WHERE kept").fetchone()[0]
    if mode == "keep-first":
        chosen = ("SELECT shard, \"index\" FROM (SELECT shard, \"index\", row_number() OVER "
                  "(PARTITION BY uid ORDER BY shard, \"index\") AS position FROM decisions "
                  "WHERE kept AND uid IS NOT NULL) WHERE position > 1")
        condition = "d.shard = c.shard AND d.\"index\" = c.\"index\""
    else:
        chosen = "SELECT uid FROM decisions WHERE uid IS NOT NULL GROUP BY uid HAVING count(*) > 1"
        condition = "d.uid = c.uid AND d.kept"
    connection.execute(f"UPDATE decisions d SET kept = false, reason = '{DUPLICATE_REASON}' "
                       f"FROM ({chosen}) c WHERE {condition}")
    return before - connection.execute("SELECT count(*) FROM decisions WHERE kept").fetchone()[0]


def shared_kept_uids(connection) -> int:
    """Samples not kept whose uid a kept sample carries: a DataComp subset would select them too."""
    return connection.execute(
        "SELECT count(*) FROM decisions d WHERE NOT d.kept AND d.uid IN (SELECT uid FROM decisions WHERE kept)"
    ).fetchone()[0]
