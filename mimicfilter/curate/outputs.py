"""What ``filter`` writes from its ``decisions`` table: the manifest, kept keys, a DataComp subset
file, curated shards. Every file is written atomically; kept keys are streamed, never listed."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO

import numpy as np
import pyarrow.parquet as pq

from mimicfilter.curate.datacomp import UID_DTYPE, save_uid_array
from mimicfilter.curate.duck import sql_identifier
from mimicfilter.curate.reshard import index_file_name, write_curated_shards
from mimicfilter.errors import MimicfilterError
from mimicfilter.store.atomic import atomic_path
from mimicfilter.store.swap import is_temp_name

FETCH_ROWS = 100_000
CURATED_PREFIX = "curated"


def _manifest_columns(connection) -> str:
    columns = [row[0] for row in connection.execute("DESCRIBE decisions").fetchall()]
    leading = ["shard", "key", "uid", "kept", "reason"]
    rest = [column for column in columns if column not in leading and column != "vote_pattern"]
    return ", ".join(sql_identifier(column) for column in leading + rest)


def write_manifest(connection, path: Path, run_id: str, metadata: dict[bytes, bytes] | None = None) -> None:
    """manifest.parquet: every sample with ``kept`` and its ``reason``, in shard order.

    Streamed from DuckDB in Arrow batches (DuckDB itself may no longer touch files once user SQL
    has run); the file's metadata carries the filter run's id, as summary.json does, and
    ``metadata`` (the record of its per-sample table: curate/samples_cache.py).
    """
    reader = connection.sql(
        f"SELECT {_manifest_columns(connection)} FROM decisions ORDER BY shard, \"index\", key"
    ).to_arrow_reader(FETCH_ROWS)
    schema = reader.schema.with_metadata({**(reader.schema.metadata or {}), **(metadata or {}),
                                         b"mimicfilter_run_id": run_id.encode()})
    with atomic_path(path) as temp, pq.ParquetWriter(str(temp), schema, compression="zstd") as writer:
        for batch in reader:
            writer.write_batch(batch.replace_schema_metadata(schema.metadata))


def kept_keys(connection, shard_order: list[str]) -> Iterator[tuple[str, str, int]]:
    """(shard, key, index) of kept samples, shards in input order, samples in shard order; streamed."""
    connection.execute("CREATE OR REPLACE TEMP TABLE shard_order (shard VARCHAR, position INTEGER)")
    connection.executemany("INSERT INTO shard_order VALUES (?, ?)", [(s, i) for i, s in enumerate(shard_order)])
    cursor = connection.execute(
        "SELECT d.shard, d.key, d.\"index\" FROM decisions d LEFT JOIN shard_order o USING (shard) "
        "WHERE d.kept ORDER BY o.position NULLS LAST, d.shard, d.\"index\""
    )
    while rows := cursor.fetchmany(FETCH_ROWS):
        yield from rows


# A key (or shard name) holding a tab or a line break would split one sample over several fields
# or lines; escaped like PostgreSQL's text format, every line is exactly one sample.
_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})


def key_line(shard: str, key: str) -> str:
    """One ``shard<TAB>key`` line, with backslash, tab, newline and carriage return escaped."""
    return f"{shard.translate(_ESCAPES)}\t{key.translate(_ESCAPES)}\n"


@dataclass(frozen=True)
class KeysWritten:
    lines: int
    reader_closed: bool = False  # stdout's reader stopped early (``| head``): the rest was not written


def _stream_keys(connection, shard_order: list[str], stream: IO[str]) -> KeysWritten:
    count = 0
    try:
        for shard, key, _ in kept_keys(connection, shard_order):
            stream.write(key_line(shard, key))
            count += 1
        stream.flush()
    except BrokenPipeError:
        return KeysWritten(count, reader_closed=True)
    return KeysWritten(count)


def write_keys(connection, shard_order: list[str], target: Path | None, stdout: IO[str] | None,
               stream: bool = False) -> KeysWritten:
    """Kept ``shard<TAB>key`` lines to a file (atomically), to ``stdout`` (``target`` None), or into a
    FIFO or character device (``stream``: written in place, as ``tee`` would)."""
    if target is None:
        return _stream_keys(connection, shard_order, stdout)
    if stream:
        with open(target, "w", encoding="utf-8") as handle:
            return _stream_keys(connection, shard_order, handle)
    count = 0
    with atomic_path(Path(target)) as temp, open(temp, "w", encoding="utf-8") as handle:
        for shard, key, _ in kept_keys(connection, shard_order):  # streamed: no list of all keys
            handle.write(key_line(shard, key))
            count += 1
    return KeysWritten(count)


def write_datacomp(connection, path: Path, stream: bool = False) -> int:
    """The kept uids as a DataComp subset file (``stream``: into a FIFO or character device in place);
    every kept sample needs a 32-hex-digit uid."""
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
    return save_uid_array(uids, path, stream=stream)


def is_curated_name(name: str) -> bool:
    """Files a curated-shards directory of ``filter`` holds (temp files of a killed run included)."""
    return (name == index_file_name(CURATED_PREFIX) or is_temp_name(name)
            or (name.startswith(f"{CURATED_PREFIX}-") and name.endswith(".tar")))


def write_shards(connection, shard_order: list[str], staging: Path, final: Path, maxcount: int,
                 locate: Callable[[str], str], run_id: str | None = None) -> list[dict]:
    """Curated shards of the kept samples (and their index) into the empty directory ``staging``,
    which becomes ``final``; ``locate`` says where each recorded shard is read from now."""
    staging.mkdir(parents=True, exist_ok=True)
    kept = ((locate(shard), key, index) for shard, key, index in kept_keys(connection, shard_order))
    try:
        written = write_curated_shards(kept, staging, maxcount=maxcount, prefix=CURATED_PREFIX, run_id=run_id)
    except OSError as error:
        if error.filename is None or not str(error.filename).startswith(str(staging)):
            raise
        raise OSError(error.errno, error.strerror, str(final)) from error  # the directory the user named
    return [asdict(shard) | {"path": str(final / shard.url)} for shard in written]
