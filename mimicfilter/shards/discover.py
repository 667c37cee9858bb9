"""Shard discovery: user specs (files, directories, braces, globs, @lists, ``-``, URLs) -> shard URLs,
and where recorded shards are found again once the data has moved (``--shard-root``).

Nothing is read here; a spec that names local shards that do not exist fails before any scoring starts.
Local shards come out as absolute paths: they are recorded in run.json and in every score row, and
``filter --write-shards`` or ``report`` may read them back from another working directory.
"""

from __future__ import annotations

import glob
import os
import re
import sys
from collections.abc import Callable, Sequence
from typing import TextIO

from braceexpand import UnbalancedBracesError, braceexpand

from mimicfilter.errors import MimicfilterError, one_line
from mimicfilter.store.paths import is_url

PIPE_REFUSED = "pipe: shard URLs run shell commands and are disabled"
PIPE_HINT = "pass --allow-pipe if you trust the command"
MOVED_HINT = "if the shards moved since they were scored, pass --shard-root OLD=NEW (or --shard-root NEW)"
# Shards in a directory: plain and compressed tars (tarfile reads gzip, bz2 and xz transparently).
SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")

_GLOB_CHARS = re.compile(r"[*?\[]")

def expand_shards(specs: Sequence[str], *, allow_pipe: bool = False, stdin: TextIO | None = None) -> list[str]:
    """Turn user shard specs (files, dirs, braces, globs, @lists, ``-``, URLs) into a shard list.

    Order is preserved and duplicates removed. Raises MimicfilterError for anything that names
    local shards that do not exist, so a typo fails before any scoring starts.
    """
    found: list[str] = []
    for spec in specs:
        found.extend(_expand_spec(spec, allow_pipe=allow_pipe, stdin=stdin, list_stack=()))
    shards = list(dict.fromkeys(found))
    if not shards:
        what = "no shards matched" if specs else "no shards given"
        raise MimicfilterError(what, hint="pass tar files, directories, brace patterns, globs or @list.txt")
    for shard in shards:  # every table names its shard in UTF-8: a name that is not cannot be written down
        try:
            shard.encode("utf-8")
        except UnicodeEncodeError:
            readable = shard.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
            raise MimicfilterError(f"shard path {readable} is not valid UTF-8",
                                   hint="rename it (or link it under a UTF-8 name)") from None
    return shards


def _expand_spec(spec: str, *, allow_pipe: bool, stdin: TextIO | None, list_stack: tuple[str, ...]) -> list[str]:
    if not spec.strip():
        return []
    if spec == "-":
        source = stdin if stdin is not None else sys.stdin
        return _expand_lines(source.read().splitlines(), allow_pipe=allow_pipe, stdin=stdin, list_stack=list_stack)
    if spec.startswith("@"):
        return _expand_list_file(spec[1:], allow_pipe=allow_pipe, stdin=stdin, list_stack=list_stack)
    if spec.startswith("pipe:") and not allow_pipe:
        # Refused before brace expansion so one bad spec gives one message, not N.
        raise MimicfilterError(PIPE_REFUSED, hint=PIPE_HINT)
    expanded = _brace_expand(spec)
    if expanded != [spec]:
        return _expand_brace_results(spec, expanded, allow_pipe=allow_pipe, stdin=stdin, list_stack=list_stack)
    return _expand_single(spec)


def _brace_expand(spec: str) -> list[str]:
    try:
        return list(braceexpand(spec))
    except UnbalancedBracesError as exc:
        raise MimicfilterError(
            f"bad brace pattern {spec!r}: {one_line(exc)}", hint="use a form like shards/{000000..000099}.tar"
        ) from None


def _expand_brace_results(
    pattern: str, expanded: list[str], *, allow_pipe: bool, stdin: TextIO | None, list_stack: tuple[str, ...]
) -> list[str]:
    local = [item for item in expanded if not is_url(item) and not item.startswith("pipe:")]
    if local and not any(_GLOB_CHARS.search(item) or os.path.exists(item) for item in local):
        raise MimicfilterError(
            f"brace pattern matched no existing files: {pattern} (e.g. {local[0]} does not exist)",
            hint="check the directory and the numeric range",
        )
    result: list[str] = []
    for item in expanded:
        try:
            result.extend(_expand_spec(item, allow_pipe=allow_pipe, stdin=stdin, list_stack=list_stack))
        except MimicfilterError as exc:
            # Name the pattern too: the user typed the pattern, not the expansion.
            raise MimicfilterError(f"{exc.message} (from pattern {pattern})", hint=exc.hint) from None
    return result


def _expand_list_file(path: str, *, allow_pipe: bool, stdin: TextIO | None, list_stack: tuple[str, ...]) -> list[str]:
    if not path:
        raise MimicfilterError("'@' needs a list file name", hint="write @shards.txt with one shard spec per line")
    real = os.path.realpath(path)
    if real in list_stack:
        raise MimicfilterError(f"shard list includes itself: @{path}", hint="remove the recursive @ line")
    try:
        with open(path, encoding="utf-8") as handle:
            lines = handle.read().splitlines()
    except FileNotFoundError:
        raise MimicfilterError(f"shard list file not found: {path}", hint="check the path after '@'") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise MimicfilterError(f"cannot read shard list {path}: {one_line(exc)}", hint="pass a UTF-8 text file") from None
    return _expand_lines(lines, allow_pipe=allow_pipe, stdin=stdin, list_stack=(*list_stack, real))


def _expand_lines(lines: Sequence[str], *, allow_pipe: bool, stdin: TextIO | None, list_stack: tuple[str, ...]) -> list[str]:
    result: list[str] = []
    for line in lines:
        entry = line.strip()
        if entry and not entry.startswith("#"):
            result.extend(_expand_spec(entry, allow_pipe=allow_pipe, stdin=stdin, list_stack=list_stack))
    return result


def _expand_single(spec: str) -> list[str]:
    """A spec without braces: URL, pipe, file, directory or glob."""
    if is_url(spec) or spec.startswith("pipe:"):
        return [spec]  # remote: existence is checked when the shard is read, not here (no network)
    if os.path.isfile(spec):
        return [os.path.abspath(spec)]
    if os.path.isdir(spec):
        tars = sorted(
            os.path.abspath(os.path.join(spec, name)) for name in os.listdir(spec)
            if name.lower().endswith(SHARD_SUFFIXES) and os.path.isfile(os.path.join(spec, name))
        )
        if not tars:
            raise MimicfilterError(f"no shards ({', '.join(SHARD_SUFFIXES)}) in directory {spec}",
                                   hint="point at the folder that holds the shards")
        return tars
    if _GLOB_CHARS.search(spec):
        matches = sorted(os.path.abspath(path) for path in glob.glob(spec) if os.path.isfile(path))
        if not matches:
            raise MimicfilterError(f"glob pattern matched no files: {spec}", hint="check the directory and pattern")
        return matches
    if os.path.exists(spec):
        raise MimicfilterError(f"not a regular file: {spec}", hint="pass tar files or directories of tar files")
    raise MimicfilterError(f"shard not found: {spec}", hint="check the path, or use s3://, gs://, https:// for remote shards")


def shard_locator(roots: Sequence[str], recorded: Sequence[str]) -> Callable[[str], str]:
    """Where to read each recorded shard now (``--shard-root``, repeatable).

    ``OLD=NEW`` reads a shard recorded under the prefix OLD from NEW instead; a bare ``NEW``
    replaces the deepest directory that all the recorded local shards share. Shards no rule
    matches are read where they were recorded (relative paths, from tables written before shard
    paths were recorded absolute, from the current directory).
    """
    rules: list[tuple[str, str]] = []
    for root in roots:
        old, separator, new = root.rpartition("=")
        if not new.strip():
            raise MimicfilterError(f"--shard-root {root!r}: no new location", hint="write --shard-root OLD=NEW or NEW")
        if not separator:
            local = [os.path.dirname(path) for path in recorded if path and not is_url(path) and not path.startswith("pipe:")]
            if not local:
                raise MimicfilterError(f"--shard-root {root}: the run records no local shard paths to move",
                                       hint="write --shard-root OLD=NEW with the recorded prefix")
            old = os.path.commonpath(local)
        rules.append((old.rstrip("/") or "/", new if is_url(new) else os.path.abspath(new)))

    def locate(shard: str) -> str:
        for old, new in rules:
            if shard == old or shard.startswith(old.rstrip("/") + "/"):
                return new.rstrip("/") + shard[len(old.rstrip("/")):]
        return shard

    return locate
