"""Where a command may write: the one check every output option passes before anything is written.

Each output path is resolved (symlinks followed: a link is written through, to its target) and
refused with one line (exit 2) when it

* is an input of the command (a shard, a score table, a checkpoint, a manifest, a list file), or an
  input run directory, or lies inside an input run's own files (``run.json``, ``stats.json``,
  ``_SUCCESS``, ``scores/``, ``checkpoints/``, ``ranks/``). A folder *beside* those, such as
  ``RUN/curated`` or ``RUN/report``, is allowed: it is where the docs put curated outputs and reports;
* is a directory replaced as a whole (``filter --out``, ``--write-shards``, ``report --out``) that
  holds an input, or a run directory whose own files hold an input (``--overwrite`` deletes them);
* is a file another output of the same command writes: the same path, one of the names an output
  directory writes itself (``manifest.parquet``, ``summary.json``, ``_SUCCESS``), or a path inside an
  output directory that is replaced as a whole;
* exists and is not what the option writes: a directory for a file, a file for a directory, a
  socket or a block device.

FIFOs and character devices are never replaced: options that write a file may write into them as a
stream, as ``tee`` would (``--keys /dev/stdout``, a named pipe read by the next step of a pipeline).
A stream is not atomic; commands write streams last, after every other output is complete.
Remote (fsspec) outputs are only compared by URL. Torch-free.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from mimicfilter.errors import MimicfilterError
from mimicfilter.store.paths import (
    CHECKPOINTS_DIR,
    RANKS_DIR,
    RUN_FILE,
    SCORES_DIR,
    STATS_FILE,
    SUCCESS_FILE,
    is_url,
)

# What a run directory writes itself: an output there would be overwritten, deleted by --overwrite,
# or read back as part of the run.
RUN_OWN_NAMES = (RUN_FILE, STATS_FILE, SUCCESS_FILE, SCORES_DIR, CHECKPOINTS_DIR, RANKS_DIR)
REFUSED_HINT = "choose another path: outputs never replace inputs or each other"


@dataclass(frozen=True)
class Output:
    """One output option of a command and what it writes there."""

    option: str  # "--keys", "--out", ...
    path: str | Path
    directory: bool = False  # a directory of outputs (else one file)
    run: bool = False  # a run directory: it writes RUN_OWN_NAMES
    whole: bool = False  # replaced as a whole: nothing of anyone else may lie inside it
    own_names: tuple[str, ...] = ()  # names it writes at its top level that no other output may be
    stream_ok: bool = False  # a FIFO or a character device is written as a stream


@dataclass(frozen=True)
class Inputs:
    """What a command reads: files (with what they are, for the message) and run directories."""

    files: tuple[tuple[str, str], ...] = ()  # (what, path): ("shard", "/data/0.tar")
    runs: tuple[str, ...] = ()

    @staticmethod
    def of(runs: Iterable[str | Path] = (), **files: Iterable[str | Path] | str | Path | None) -> "Inputs":
        """``Inputs.of(runs=[...], shard=[...], checkpoint=path)``: None and URLs-with-no-file are kept as given."""
        listed: list[tuple[str, str]] = []
        for what, paths in files.items():
            if paths is None:
                continue
            for path in [paths] if isinstance(paths, (str, Path)) else paths:
                if path is not None:
                    listed.append((what.replace("_", " "), str(path)))
        return Inputs(tuple(listed), tuple(str(run) for run in runs if run is not None))


@dataclass(frozen=True)
class Target:
    """Where an output goes: the path to write (a symlink's target), and whether it is a stream."""

    path: Path | str  # a local path, resolved; a URL as given
    stream: bool = False


def _resolved(path: str | Path) -> str:
    return str(path) if is_url(str(path)) else os.path.realpath(path)


def _within(path: str, directory: str) -> bool:
    """``path`` is ``directory`` or lies below it (both resolved)."""
    return path == directory or path.startswith(directory.rstrip(os.sep) + os.sep)


def _in_run_files(path: str, run: str) -> bool:
    return any(_within(path, os.path.join(run, name)) for name in RUN_OWN_NAMES)


def _refuse(output: Output, why: str) -> MimicfilterError:
    return MimicfilterError(f"refusing {output.option} {output.path}: {why}", hint=REFUSED_HINT)


def _kind(output: Output, resolved: str) -> bool:
    """Whether the existing file at ``resolved`` is a stream; refuses what the option cannot write."""
    try:
        mode = os.stat(resolved).st_mode
    except FileNotFoundError:
        return False
    except OSError as error:
        raise _refuse(output, f"cannot look at it ({error.strerror})") from None
    if output.directory:
        if not stat.S_ISDIR(mode):
            raise _refuse(output, "it exists and is not a directory")
        return False
    if stat.S_ISDIR(mode):
        raise _refuse(output, "it is a directory (name a file)")
    if stat.S_ISREG(mode):
        return False
    if (stat.S_ISFIFO(mode) or stat.S_ISCHR(mode)) and output.stream_ok:
        return True
    what = "a socket" if stat.S_ISSOCK(mode) else "a block device" if stat.S_ISBLK(mode) else "a FIFO or device"
    raise _refuse(output, f"it is not a regular file ({what}) and this option cannot write a stream into it")


def _check_inputs(output: Output, resolved: str, files: list[tuple[str, str, str]], runs: list[tuple[str, str]]) -> None:
    for what, given, real in files:
        if resolved == real:
            raise _refuse(output, f"it is an input of this command (the {what} {given})")
        if output.directory and output.whole and _within(real, resolved):
            raise _refuse(output, f"it is replaced as a whole and holds an input (the {what} {given})")
        if output.run and _in_run_files(real, resolved):
            raise _refuse(output, f"the run directory's own files would replace an input (the {what} {given})")
    for given, real in runs:
        if resolved == real or _in_run_files(resolved, real):
            raise _refuse(output, f"it is the input run {given} or one of its files")
        if output.directory and output.whole and _within(real, resolved):
            raise _refuse(output, f"it is replaced as a whole and holds the input run {given}")


def _check_other_outputs(output: Output, resolved: str, others: list[tuple[Output, str]]) -> None:
    for other, other_resolved in others:
        if resolved == other_resolved:
            raise _refuse(output, f"{other.option} writes there too")
        if other.directory and _within(resolved, other_resolved):
            top = os.path.relpath(resolved, other_resolved).split(os.sep)[0]
            if other.whole and not other.own_names:
                raise _refuse(output, f"it lies inside {other.option} {other.path}, which is replaced as a whole")
            if top in other.own_names or (other.run and top in RUN_OWN_NAMES):
                raise _refuse(output, f"{other.option} writes {top} there itself")


def guard_outputs(outputs: Sequence[Output], inputs: Inputs) -> dict[str, Target]:
    """Check every output against the inputs and the other outputs; returns each option's target.

    Options whose path is None or ``-`` (stdout) are skipped. Raises MimicfilterError (one line).
    """
    chosen = [output for output in outputs if output.path is not None and str(output.path) != "-"]
    files = [(what, given, _resolved(given)) for what, given in inputs.files]
    runs = [(given, _resolved(given)) for given in inputs.runs]
    resolved = {output.option: _resolved(output.path) for output in chosen}
    targets: dict[str, Target] = {}
    for output in chosen:
        real = resolved[output.option]
        _check_inputs(output, real, files, runs)
        _check_other_outputs(output, real, [(other, resolved[other.option]) for other in chosen if other is not output])
        stream = False if is_url(real) else _kind(output, real)
        targets[output.option] = Target(real if is_url(real) else Path(real), stream)
    return targets


def guard_run_directory(out: str | Path, shards: Sequence[str], model_files: Iterable[str | None]) -> None:
    """``score``/``embed --out``: a run directory whose own files never hold a shard or a model file
    (``--overwrite`` deletes them), and never is one. Model arguments that name no file (architecture
    names, pretrained tags) are not paths and are left out."""
    files = [path for path in model_files if path and not is_url(str(path)) and os.path.exists(path)]
    guard_outputs([Output("--out", out, directory=True, run=True)], Inputs.of(shard=shards, model_file=files))
