"""The run directory: one skeleton for every command that writes one (score, embed, extrapolate).

A run directory belongs to one command. Re-running the same command resumes it (finished parts
are kept); a different command is refused unless ``--overwrite`` wipes the old results first.
"Same command" means the same *fingerprint*: every option that changes a result (inputs, models and
their checkpoint hashes, mimic layers, batch size, temperature, seed, device type, decoding), but
none that only changes speed or display (workers, progress, --json).

:class:`RunDirectory` writes the parts every run shares: provenance (run.json, with the version,
argv and start time), the closing statistics (stats.json, with wall time and machine) and the
``_SUCCESS`` marker written last.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from typing import Any, Sequence

import pyarrow.parquet as pq

from mimicfilter.errors import MimicfilterError, one_line
from mimicfilter.store.atomic import atomic_write_bytes, atomic_write_json
from mimicfilter.store.parts import part_paths
from mimicfilter.store.schema import SHARD_ERROR
from mimicfilter.store.scratch import sweep_run_leftovers
from mimicfilter.store.paths import (
    CHECKPOINTS_DIR,
    RANKS_DIR,
    RUN_FILE,
    SCORES_DIR,
    STATS_FILE,
    SUCCESS_FILE,
    RunPath,
    arrow_source,
    epoch_checkpoint_path,
    is_remote,
    rank_stats_path,
    remove_tree,
    run_path,
    trajectory_part_epoch,
)
from mimicfilter.version import __version__


class RunDirectory:
    """One command's run directory: ``open`` it (create or resume), write parts, ``finish`` it."""

    def __init__(self, path: RunPath, command: str, argv: Sequence[str] = ()):
        self.path = path
        self.command = command
        self.argv = list(argv) or list(sys.argv)
        self.started = time.time()

    def open(self, fingerprint: dict[str, Any], provenance: dict[str, Any], overwrite: bool,
             concurrent: bool = False) -> bool:
        """Create or reopen the directory for this command; True when resuming an earlier run."""
        shared = {
            "mimicfilter_version": __version__,
            "command": self.command,
            "argv": self.argv,
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(self.started)),
        }
        return prepare_run_dir(self.path, fingerprint, shared | provenance, overwrite, concurrent)

    def stats(self, counts: dict[str, Any]) -> dict[str, Any]:
        """The closing statistics: ``counts`` plus what every run reports."""
        return {
            "command": self.command,
            **counts,
            "wall_seconds": round(time.time() - self.started, 3),
            "run_dir": str(self.path),
            "cpu_count": os.cpu_count(),
        }

    def finish(self, stats: dict[str, Any]) -> dict[str, Any]:
        """Write stats.json, then ``_SUCCESS``: the run is complete. A run whose every shard failed
        (rows, but each a ``shard_error``) read nothing: stats.json is written, ``_SUCCESS`` is not,
        and the command fails (exit 1); re-running it retries the shards."""
        counts = stats.get("status_counts") or {}
        if stats.get("rows") and counts.get(SHARD_ERROR) == stats["rows"]:
            atomic_write_json(self.path / STATS_FILE, stats)
            raise MimicfilterError(f"every shard failed to read ({_first_shard_error(self.path)}): nothing was "
                                   f"{'scored' if self.command == 'score' else 'read'}",
                                   hint="check the shards (format, permissions, URLs) and re-run", exit_code=1)
        finish_run_dir(self.path, stats)
        return stats


def _first_shard_error(run_dir: RunPath) -> str:
    """``SHARD: error`` of the first failed shard in the parts, for the message."""
    for part in part_paths(run_dir):
        source = arrow_source(part)
        table = pq.read_table(source["source"], filesystem=source.get("filesystem"), columns=["shard", "error"])
        if table.num_rows:
            shard, error = table.column("shard")[0].as_py(), table.column("error")[0].as_py()
            return one_line(f"{shard}: {error}", 200)
    return "no parts"


def _differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    changed = []
    for key in sorted(set(old) | set(new)):
        before, after = old.get(key), new.get(key)
        if isinstance(before, dict) and isinstance(after, dict):
            changed.extend(_differences(before, after, f"{prefix}{key}."))
        elif before != after:
            changed.append(f"{prefix}{key}")
    return changed


def prepare_run_dir(
    run_dir: RunPath, fingerprint: dict[str, Any], provenance: dict[str, Any], overwrite: bool, concurrent: bool = False
) -> bool:
    """Create or reopen ``run_dir`` for this command; returns True when resuming an earlier run.

    Writes run.json atomically on first use. Refuses a directory made by a different command
    (naming what differs) unless ``overwrite``, which deletes the earlier results first.
    ``concurrent``: other ranks of the same job may be creating the directory at the same moment;
    run.json is then created exactly once (link-if-absent) and the others check their fingerprint
    against it.
    """
    run_file = run_dir / RUN_FILE
    if run_dir.exists() and not run_dir.is_dir():
        raise MimicfilterError(f"--out {run_dir} exists and is not a directory", hint="choose another --out")
    if not is_remote(run_dir) and os.path.islink(run_dir) and not os.path.exists(run_dir):
        raise MimicfilterError(f"--out {run_dir} is a link to {os.readlink(run_dir)}, which does not exist",
                               hint="create the directory it points to, or choose another --out")
    resuming = False
    normalised = json.loads(json.dumps(fingerprint, default=str))
    if run_file.exists():
        earlier = run_record(run_file, hint="use --overwrite to start afresh")
        same = earlier.get("fingerprint") == normalised
        if same and not overwrite:
            resuming = True
        elif not overwrite:
            theirs, ours = earlier.get("command"), provenance.get("command")
            if theirs and ours and theirs != ours:  # their fingerprints hold different things: say which command
                raise MimicfilterError(f"{run_dir} holds a `mimicfilter {theirs}` run, not a `{ours}` one",
                                       hint="choose another --out, or pass --overwrite to replace it")
            changed = _differences(earlier.get("fingerprint", {}), normalised)
            raise MimicfilterError(
                f"{run_dir} holds a run of a different command (differs in: {', '.join(changed[:6]) or 'format'})",
                hint="re-run the original command to resume, pass --overwrite to replace it, or choose another --out",
            )
    elif run_dir.is_dir() and _foreign_entries(run_dir, concurrent) and not overwrite:
        raise MimicfilterError(
            f"--out {run_dir} is not empty and holds no run.json", hint="choose an empty or new directory, or --overwrite"
        )
    if overwrite and run_dir.is_dir():
        (run_dir / SUCCESS_FILE).unlink(missing_ok=True)  # first: a kill while the rest goes leaves no finished run
        for name in (SCORES_DIR, CHECKPOINTS_DIR, RANKS_DIR):
            remove_tree(run_dir / name)
        for name in (RUN_FILE, STATS_FILE):
            (run_dir / name).unlink(missing_ok=True)
    if not is_remote(run_dir) and run_dir.is_dir():
        sweep_run_leftovers(run_dir)  # temp files and staging folders of killed runs on this host
    (run_dir / SCORES_DIR).mkdir(parents=True, exist_ok=True)
    if not resuming and concurrent:
        if not _create_once(run_file, {**provenance, "fingerprint": fingerprint}):
            # another rank won the race: same job (resume together) or a different command (refuse)
            return prepare_run_dir(run_dir, fingerprint, provenance, overwrite=False, concurrent=True)
    elif not resuming:
        (run_dir / SUCCESS_FILE).unlink(missing_ok=True)
        atomic_write_json(run_file, {**provenance, "fingerprint": fingerprint})
    return resuming


def _foreign_entries(run_dir: RunPath, concurrent: bool) -> list[str]:
    """Entries that make ``run_dir`` someone else's; with concurrent ranks, theirs are expected. A run
    killed before its run.json was written leaves only its own: an empty scores/, a temp file."""
    ours = {RUN_FILE, SCORES_DIR, RANKS_DIR} if concurrent else set()
    return [p.name for p in run_dir.iterdir()
            if p.name not in ours and not (concurrent and p.name.startswith(".")) and not _left_before_run_file(p)]


def _left_before_run_file(entry: RunPath) -> bool:
    if entry.name == SCORES_DIR:
        return entry.is_dir() and not any(entry.iterdir())
    return entry.name.startswith(".") and entry.name.endswith(".tmp")


def _create_once(path: RunPath, payload: dict[str, Any]) -> bool:
    """Write ``path`` only if it does not exist, atomically (a hard link cannot overwrite).

    Object stores have no create-if-absent: there the first writer's run.json may be replaced by
    another rank's, which is harmless because ranks that get this far share the fingerprint.
    """
    if is_remote(path):
        if path.exists():
            return False
        atomic_write_json(path, payload)
        return True
    try:
        atomic_write_json(path, payload, exclusive=True)
        return True
    except FileExistsError:
        return False


def write_rank_stats(run_dir: RunPath, rank: int, world_size: int, stats: dict[str, Any]) -> RunPath:
    """Each rank's own stats (ranks/rank-RRRRR-of-WWWWW.json); stats.json is the last rank's."""
    path = rank_stats_path(run_dir, rank, world_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, stats)
    return path


def finish_run_dir(run_dir: RunPath, stats: dict[str, Any]) -> None:
    atomic_write_json(run_dir / STATS_FILE, stats)
    atomic_write_bytes(run_dir / SUCCESS_FILE, b"")


def unfinish_for(run_dir: RunPath, pending: Sequence[Any]) -> None:
    """A finished run whose parts are not all there (one removed after it finished) is not finished
    while ``pending`` ones are written again: its ``_SUCCESS`` goes first, so that no reader takes the
    run for whole meanwhile, nor after a kill."""
    if pending:
        (run_path(run_dir) / SUCCESS_FILE).unlink(missing_ok=True)


def unfinished_run(run_dir: RunPath | str) -> str | None:
    """Why a run directory is not finished (what it holds so far), or None when it has ``_SUCCESS``.

    Readers (filter, report) warn with this, or refuse with ``--strict``: a run still being
    written, or killed, gives a filter over part of the data (e.g. one epoch of three).
    """
    path = run_path(run_dir)
    if (path / SUCCESS_FILE).exists() or not (path / RUN_FILE).exists():
        return None
    try:
        info = run_record(path / RUN_FILE)
    except MimicfilterError:  # (an unreadable run.json included)
        info = {}
    parts = [part.name for part in part_paths(path)]
    train = info.get("train") or {}
    if train.get("mode", "none") != "none":
        epochs = sorted({epoch for name in parts if (epoch := trajectory_part_epoch(name)) is not None})
        finished = [epoch for epoch in epochs if epoch_checkpoint_path(path, epoch).exists()]
        present = ", ".join(f"{epoch}{'' if epoch in finished else ' (partial)'}" for epoch in epochs) or "none"
        held = f"epochs with scores: {present} of {train.get('epochs', '?')} (0-based)"
    elif info.get("shards") and info.get("command") in ("score", "embed"):
        held = f"{len(parts)} of {len(info['shards'])} shard parts"
    else:
        held = f"{len(parts)} parts"
    return f"{run_dir} is unfinished (no {SUCCESS_FILE}; {held})"


def epochs_missing(run_dir: RunPath | str, info: dict[str, Any], present: set[int]) -> str | None:
    """For a finished trajectory run (``info``: its run.json): the epochs it promises that no score row
    holds (``present``: the epochs a reader found), as a warning; None when every one is there. A part
    removed or emptied after the run finished would otherwise read as a run of fewer epochs."""
    if not (run_path(run_dir) / SUCCESS_FILE).exists():
        return None  # unfinished runs are reported as such
    train = info.get("train") or {}
    if train.get("mode", "none") == "none" or not isinstance(train.get("epochs"), int):
        return None
    missing = sorted(set(range(train["epochs"])) - present)
    if not missing:
        return None
    return (f"{run_dir} finished {train['epochs']} epochs, but its score parts hold no row of epoch "
            f"{', '.join(map(str, missing))} (0-based): a part was removed or emptied; the votes read the other epochs")


def read_run_info(run_dir: RunPath | str) -> dict[str, Any]:
    run_file = run_path(run_dir) / RUN_FILE
    if not run_file.is_file():
        raise MimicfilterError(f"{run_dir} is not a mimicfilter run directory (no run.json)", hint="pass a `score --out` dir")
    return run_record(run_file)


def run_identity(info: dict[str, Any]) -> dict[str, Any]:
    """What tells one run from another wherever its directory lies (moved or copied, it is the same run):
    when it started and a digest of its fingerprint."""
    fingerprint = json.dumps(info.get("fingerprint"), sort_keys=True, default=str).encode()
    return {"started_at": info.get("started_at"), "fingerprint_sha256": hashlib.sha256(fingerprint).hexdigest()}


def run_record(run_file: RunPath, hint: str = "re-run the command that wrote it, or restore the file") -> dict[str, Any]:
    """A run.json's record; a file that cannot be read, is cut short or was edited into something else
    is a one-line error (``hint``: what to do about it)."""
    try:
        info = json.loads(run_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise MimicfilterError(f"cannot read {run_file}: {error}", hint=hint) from error
    if not isinstance(info, dict):
        raise MimicfilterError(f"cannot read {run_file}: not a run record (a JSON {type(info).__name__})", hint=hint)
    return info
