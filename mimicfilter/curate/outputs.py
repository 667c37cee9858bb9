"""What ``filter`` writes from its ``decisions`` table: the manifest, kept keys, a DataComp subset
file, curated shards. Every file is written atomically; kept keys are streamed, never listed."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import IO, Iterator

import numpy as np

from mimicfilter.curate.datacomp import UID_DTYPE, save_uid_array
from mimicfilter.curate.duck import sql_string
from mimicfilter.curate.reshard import index_file_name, write_curated_shards
from mimicfilter.errors import MimicfilterError
from mimicfilter.store.atomic import atomic_path

FETCH_ROWS = 100_000
CURATED_PREFIX = "curated"


def _manifest_columns(connection) -> str:
    columns = [row[0] for row in connection.execute("DESCRIBE decisions").fetchall()]
    leading = ["shard", "key", "uid", "kept", "reason"]
    rest = [column for column in columns if column not in leading and column != "vote_pattern"]
    return ", ".join(f'"{column}"' for column in leading + rest)


def write_manifest(connection, path: Path) -> None:
    """manifest.parquet: every sample with ``kept`` and its ``reason``, in shard order."""
    with atomic_path(path) as temp:
        connection.execute(
            f"COPY (SELECT {_manifest_columns(connection)} FROM decisions ORDER BY shard, \"index\", key) "
            f"TO {sql_string(str(temp))} (FORMAT parquet, COMPRESSION zstd)"
        )


def kept_keys(connection, shard_order: list[str]) -> Iterator[tuple[str, str]]:
    """(shard, key) of kept samples, shards in input order, samples in shard order; streamed."""
    connection.execute("CREATE OR REPLACE TEMP TABLE shard_order (shard VARCHAR, position INTEGER)")
    connection.executemany("INSERT INTO shard_order VALUES (?, ?)", [(s, i) for i, s in enumerate(shard_order)])
    cursor = connection.execute(
        "SELECT d.shard, d.key FROM decisions d LEFT JOIN shard_order o USING (shard) "
        "WHERE d.kept ORDER BY o.position NULLS LAST, d.shard, d.\"index\", d.key"
    )
    while rows := cursor.fetchmany(FETCH_ROWS):
        yield from rows


def write_keys(connection, shard_order: list[str], target: str, stdout: IO[str]) -> int:
    """Kept ``shard<TAB>key`` lines to a file (atomically) or ``-`` (stdout); returns how many."""
    count = 0
    if target == "-":
        for shard, key in kept_keys(connection, shard_order):
            stdout.write(f"{shard}\t{key}\n")
            count += 1
        stdout.flush()
        return count
    with atomic_path(Path(target)) as temp, open(temp, "w", encoding="utf-8") as handle:
        for shard, key in kept_keys(connection, shard_order):  # streamed: no list of all keys
            handle.write(f"{shard}\t{key}\n")
            count += 1
    return count


def write_datacomp(connection, path: Path) -> int:
    """The kept uids as a DataComp subset file; every kept sample needs a 32-hex-digit uid."""
    missing, bad = connection.execute(
        "SELECT count(*) FILTER (WHERE uid IS NULL), "
        "count(*) FILTER (WHERE uid IS NOT NULL AND NOT regexp_full_match(uid, '[0-9a-fA-F]{32}')) "
        "FROM decisions WHERE kept"
    ).fetchone()
    if missing or bad:
        raise MimicfilterError(
            f"--datacomp-npy: {missing} kept sample(s) without a uid and {bad} with a uid that is not 32 hex digits",
            hint="DataComp subsets need the 128-bit uid of each sample's .json",
        )
    # The 128-bit uids are split into (high, low) u64 halves by DuckDB: no Python string per uid.
    halves = connection.execute(
        "SELECT ('0x' || substr(uid, 1, 16))::UBIGINT AS high, ('0x' || substr(uid, 17, 16))::UBIGINT AS low "
        "FROM decisions WHERE kept"
    ).fetchnumpy()
    uids = np.empty(len(halves["high"]), dtype=UID_DTYPE)
    uids["f0"], uids["f1"] = halves["high"], halves["low"]
    return save_uid_array(uids, path)


def write_shards(connection, shard_order: list[str], directory: Path, maxcount: int, kept: int) -> list[dict]:
    """Curated shards of the kept samples; replaces the curated files of an earlier filter run."""
    if directory.exists():
        ours = {index_file_name(CURATED_PREFIX)}
        foreign = [p.name for p in directory.iterdir() if not (p.name in ours or
                   (p.name.startswith(f"{CURATED_PREFIX}-") and p.name.endswith(".tar")))]
        if foreign:
            raise MimicfilterError(
                f"--write-shards {directory} holds other files ({', '.join(sorted(foreign)[:3])})",
                hint="choose an empty or new directory",
            )
    if kept == 0:
        return []
    if directory.exists():
        for old in directory.iterdir():  # an earlier run may have written more shards than this one
            old.unlink()
    written = write_curated_shards(
        kept_keys(connection, shard_order), directory, maxcount=maxcount, prefix=CURATED_PREFIX
    )
    return [asdict(shard) for shard in written]

