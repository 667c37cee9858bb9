"""``filter``'s outputs, published as one unit: a reader never sees files of two runs together.

The ``--out`` directory (manifest.parquet, summary.json, the ``_SUCCESS`` marker, and every
requested output whose path lies inside it: kept keys, the DataComp subset, curated shards) is
built in a staging directory and swapped in whole (store/swap.py). Curated shards outside
``--out`` are their own unit, swapped first; a keys file or subset outside it is one atomic file.
The old outputs stay until the new ones are complete, and re-filtering to nothing kept leaves an
empty shard set, not the previous one.

``_SUCCESS`` holds the run id that summary.json and the manifest's Parquet metadata also carry.
"""

from __future__ import annotations

import functools
import json
import os
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from mimicfilter.curate.outputs import is_curated_name, write_datacomp, write_keys, write_manifest, write_shards
from mimicfilter.store.atomic import atomic_write_bytes, atomic_write_json
from mimicfilter.store.guard import Target
from mimicfilter.store.paths import SUCCESS_FILE
from mimicfilter.store.swap import is_temp_name, replaced_directory, sole_writer

MANIFEST, SUMMARY = "manifest.parquet", "summary.json"


def new_run_id() -> str:
    return f"{time.strftime('%Y%m%dT%H%M%S')}-{secrets.token_hex(4)}"


def _inside(path: Path | None, directory: Path) -> Path | None:
    """``path`` relative to ``directory`` when it lies inside it (or is it), else None."""
    if path is None:
        return None
    relative = os.path.relpath(os.path.realpath(path), os.path.realpath(directory))
    return None if relative == ".." or relative.startswith(".." + os.sep) else Path(relative)


def _owned_by_filter(out: Path, requested: list[Path]) -> Callable[[str], bool]:
    """Entries of an existing --out this filter may replace: its own files, the outputs the last
    filter run listed, and the outputs asked for now (read when asked: after any recovery)."""

    @functools.cache
    def names() -> frozenset[str]:
        found = {MANIFEST, SUMMARY, SUCCESS_FILE} | {path.parts[0] for path in requested if path.parts}
        try:
            earlier = json.loads((out / SUMMARY).read_text())
        except (OSError, ValueError):
            earlier = {}
        found |= set(earlier.get("files", []))
        for value in (earlier.get("outputs") or {}).values():  # summaries written before "files" existed
            if (relative := _inside(Path(str(value)), out)) is not None and relative.parts:
                found.add(relative.parts[0])
        return frozenset(found)

    return lambda name: name in names() or is_temp_name(name)


def publish(connection, *, out: Path, keys: Target | str | None, datacomp_npy: Target | None, shards_dir: Path | None,
            maxcount: int, shard_order: list[str], locate: Callable[[str], str], summary: dict[str, Any],
            stdout: IO[str], manifest_metadata: dict[bytes, bytes] | None = None) -> dict[str, Any]:
    """Write every requested output as described above; returns the summary as written.

    ``keys`` is ``-`` (stdout) or a checked target (store/guard.py), like ``datacomp_npy``. Streams
    (stdout, a FIFO, a character device) are written after every file of the unit, so a failure
    while writing files never follows keys that already reached a reader.
    """
    run_id = new_run_id()
    summary = {**summary, "run_id": run_id}
    keys_file = keys.path if isinstance(keys, Target) and not keys.stream else None
    npy_file = datacomp_npy.path if datacomp_npy is not None and not datacomp_npy.stream else None
    inside = {name: _inside(path, out) for name, path in
              (("keys", keys_file), ("datacomp_npy", npy_file), ("curated_shards", shards_dir))}
    requested = [path for path in inside.values() if path is not None]
    outside = shards_dir is not None and inside["curated_shards"] is None
    with sole_writer([(out, "--out")] + ([(shards_dir, "--write-shards")] if outside else [])):
        outputs = {"manifest": str(out / MANIFEST)}
        if outside:
            with replaced_directory(shards_dir, is_curated_name, "--write-shards") as staging:
                summary["curated_shards"] = write_shards(connection, shard_order, staging, shards_dir, maxcount, locate,
                                                         run_id)
        with replaced_directory(out, _owned_by_filter(out, requested), "--out") as staging:
            def place(name: str, path: Path) -> Path:
                return staging / inside[name] if inside[name] is not None else path

            write_manifest(connection, staging / MANIFEST, run_id, manifest_metadata)
            if shards_dir is not None and inside["curated_shards"] is not None:
                summary["curated_shards"] = write_shards(connection, shard_order, place("curated_shards", shards_dir),
                                                         shards_dir, maxcount, locate, run_id)
            if npy_file is not None:
                summary["datacomp_uids"] = write_datacomp(connection, place("datacomp_npy", npy_file))
            if keys_file is not None:
                summary["keys_written"] = write_keys(connection, shard_order, place("keys", keys_file), None).lines
            # streams last: nothing but summary.json and _SUCCESS is written after them
            if datacomp_npy is not None and datacomp_npy.stream:
                summary["datacomp_uids"] = write_datacomp(connection, datacomp_npy.path, stream=True)
            if keys is not None and keys_file is None:
                written = write_keys(connection, shard_order, None if keys == "-" else keys.path, stdout, stream=True)
                summary["keys_written"] = written.lines
                if written.reader_closed:
                    summary["keys_reader_closed"] = True  # `| head`: the other outputs are complete all the same
            if keys is not None:
                outputs["keys"] = keys if keys == "-" else str(keys.path)
            if datacomp_npy is not None:
                outputs["datacomp_npy"] = str(datacomp_npy.path)
            if shards_dir is not None:
                outputs["curated_shards"] = str(shards_dir)
            summary["outputs"] = outputs
            summary["files"] = sorted({entry.name for entry in staging.iterdir()} | {SUMMARY, SUCCESS_FILE})
            atomic_write_json(staging / SUMMARY, summary)
            atomic_write_bytes(staging / SUCCESS_FILE, f"{run_id}\n".encode())
        return summary
