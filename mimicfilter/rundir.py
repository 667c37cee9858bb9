"""The run directory: provenance (run.json), resume rules, stats.json and the _SUCCESS marker.

A run directory belongs to one command. Re-running the same command resumes it (finished parts
are kept); a different command is refused unless ``--overwrite`` wipes the old results first.
"Same command" means the same *fingerprint*: every option that changes a score (inputs, models and
their checkpoint hashes, mimic layers, batch size, temperature, seed, device type, decoding), but
none that only changes speed or display (workers, progress, --json).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from mimicfilter.errors import MimicfilterError
from mimicfilter.tables import atomic_write_json

RUN_FILE = "run.json"
STATS_FILE = "stats.json"
SUCCESS_FILE = "_SUCCESS"
SCORES_DIR = "scores"
CHECKPOINTS_DIR = "checkpoints"


def _differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    changed = []
    for key in sorted(set(old) | set(new)):
        before, after = old.get(key), new.get(key)
        if isinstance(before, dict) and isinstance(after, dict):
            changed.extend(_differences(before, after, f"{prefix}{key}."))
        elif before != after:
            changed.append(f"{prefix}{key}")
    return changed


def prepare_run_dir(run_dir: Path, fingerprint: dict[str, Any], provenance: dict[str, Any], overwrite: bool) -> bool:
    """Create or reopen ``run_dir`` for this command; returns True when resuming an earlier run.

    Writes run.json atomically on first use. Refuses a directory made by a different command
    (naming what differs) unless ``overwrite``, which deletes the earlier results first.
    """
    run_file = run_dir / RUN_FILE
    if run_dir.exists() and not run_dir.is_dir():
        raise MimicfilterError(f"--out {run_dir} exists and is not a directory", hint="choose another --out")
    resuming = False
    if run_file.exists():
        try:
            earlier = json.loads(run_file.read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise MimicfilterError(f"cannot read {run_file}: {error}", hint="use --overwrite to start afresh") from error
        same = earlier.get("fingerprint") == json.loads(json.dumps(fingerprint, default=str))
        if same and not overwrite:
            resuming = True
        elif not overwrite:
            changed = _differences(earlier.get("fingerprint", {}), json.loads(json.dumps(fingerprint, default=str)))
            raise MimicfilterError(
                f"{run_dir} holds a run of a different command (differs in: {', '.join(changed[:6]) or 'format'})",
                hint="re-run the original command to resume, pass --overwrite to replace it, or choose another --out",
            )
    elif run_dir.is_dir() and any(run_dir.iterdir()) and not overwrite:
        raise MimicfilterError(
            f"--out {run_dir} is not empty and holds no run.json", hint="choose an empty or new directory, or --overwrite"
        )
    if overwrite and run_dir.is_dir():
        for name in (SCORES_DIR, CHECKPOINTS_DIR):
            shutil.rmtree(run_dir / name, ignore_errors=True)
        for name in (RUN_FILE, STATS_FILE, SUCCESS_FILE):
            (run_dir / name).unlink(missing_ok=True)
    (run_dir / SCORES_DIR).mkdir(parents=True, exist_ok=True)
    if not resuming:
        (run_dir / SUCCESS_FILE).unlink(missing_ok=True)
        atomic_write_json(run_file, {**provenance, "fingerprint": fingerprint})
    return resuming


def finish_run_dir(run_dir: Path, stats: dict[str, Any]) -> None:
    atomic_write_json(run_dir / STATS_FILE, stats)
    (run_dir / SUCCESS_FILE).write_text("")


def read_run_info(run_dir: Path) -> dict[str, Any]:
    run_file = Path(run_dir) / RUN_FILE
    if not run_file.is_file():
        raise MimicfilterError(f"{run_dir} is not a mimicfilter run directory (no run.json)", hint="pass a `score --out` dir")
    return json.loads(run_file.read_text())
