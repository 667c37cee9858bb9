"""Shard discovery (specs -> shard URLs) and raw, streaming sample iteration over one shard.

A raw sample is a plain dict::

    {"shard": url, "key": str, "index": int, "files": {ext: bytes},
     "status": "ok" | "too_large" | "decode_error" | "shard_error", "error": str | None}

Nothing here raises for a bad shard: a broken stream becomes exactly one ``shard_error`` row so
the caller can account for every sample it could not read.
"""

from __future__ import annotations

import glob
import hashlib
import lzma
import os
import re
import sys
import tarfile
import zlib
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from typing import IO, TextIO

from braceexpand import UnbalancedBracesError, braceexpand

from mimicfilter.errors import MimicfilterError

DEFAULT_MAX_MEMBER_BYTES = 64 * 2**20
MAX_ERROR_CHARS = 300

PIPE_REFUSED = "pipe: shard URLs run shell commands and are disabled"
PIPE_HINT = "pass --allow-pipe if you trust the command"

# "s3://", "gs://", "https://", "file://" ... but not a Windows drive ("C:\\") or "pipe:".
_URL_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")
_GLOB_CHARS = re.compile(r"[*?\[]")
_SHARD_SUFFIX = re.compile(r"(\.tar(\.(gz|bz2|xz|zst|lz4))?|\.tgz)$", re.IGNORECASE)
_UNSAFE_NAME_CHARS = re.compile(r"[^A-Za-z0-9._-]+")

# What a broken/unreadable stream can raise: tarfile, compression, I/O, and fsspec's
# "unknown protocol" (ValueError) / "backend not installed" (ImportError).
STREAM_ERRORS: tuple[type[BaseException], ...] = (
    tarfile.TarError,
    EOFError,
    OSError,
    ValueError,
    ImportError,
    zlib.error,
    lzma.LZMAError,
)


def one_line(text: object, limit: int = MAX_ERROR_CHARS) -> str:
    """Collapse whitespace/newlines and cap the length: error strings go into one table cell."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


_MEMBER_NAME = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")


def base_plus_ext(name: str) -> tuple[str | None, str | None]:
    """(key, extensions) of a tar member name, split as webdataset does (its regex, without
    importing webdataset, which pulls in torch: `filter` and `report` start without it)."""
    match = _MEMBER_NAME.match(name)
    return (match.group(1), match.group(2)) if match else (None, None)


def is_url(spec: str) -> bool:
    return bool(_URL_SCHEME.match(spec))


# --------------------------------------------------------------------------------------------
# Discovery
# --------------------------------------------------------------------------------------------


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
        return [spec]
    if os.path.isdir(spec):
        tars = sorted(
            os.path.join(spec, name) for name in os.listdir(spec) if name.endswith(".tar") and os.path.isfile(os.path.join(spec, name))
        )
        if not tars:
            raise MimicfilterError(f"no .tar files in directory {spec}", hint="point at the folder that holds the shards")
        return tars
    if _GLOB_CHARS.search(spec):
        matches = sorted(path for path in glob.glob(spec) if os.path.isfile(path))
        if not matches:
            raise MimicfilterError(f"glob pattern matched no files: {spec}", hint="check the directory and pattern")
        return matches
    if os.path.exists(spec):
        raise MimicfilterError(f"not a regular file: {spec}", hint="pass tar files or directories of tar files")
    raise MimicfilterError(f"shard not found: {spec}", hint="check the path, or use s3://, gs://, https:// for remote shards")


# --------------------------------------------------------------------------------------------
# Names
# --------------------------------------------------------------------------------------------


def shard_display_name(url: str) -> str:
    """Short human name of a shard: basename without .tar / .tar.gz (used in messages)."""
    text = url[len("pipe:") :].split()[-1] if url.startswith("pipe:") and url[5:].split() else url
    if is_url(text):
        text = re.split(r"[?#]", text, maxsplit=1)[0]  # drop query strings such as signed-URL tokens
    base = text.rstrip("/\\").replace("\\", "/").rsplit("/", 1)[-1]
    return _SHARD_SUFFIX.sub("", base) or base or "shard"


def part_name(url: str) -> str:
    """Stable, filesystem-safe part-file stem: ``{basename}-{sha1(url)[:10]}``.

    The hash keeps equal basenames from different folders/buckets apart; the basename keeps it readable.
    """
    stem = _UNSAFE_NAME_CHARS.sub("_", shard_display_name(url)).strip("._")[:80] or "shard"
    return f"{stem}-{hashlib.sha1(url.encode('utf-8')).hexdigest()[:10]}"


# --------------------------------------------------------------------------------------------
# Streaming samples
# --------------------------------------------------------------------------------------------


def _open_stream(url: str, allow_pipe: bool) -> AbstractContextManager[IO[bytes]]:
    if url.startswith("pipe:"):
        if not allow_pipe:
            raise MimicfilterError(PIPE_REFUSED, hint=PIPE_HINT)
        from webdataset import gopen  # imported lazily: only pipe: shards need it

        return gopen(url, "rb")
    if is_url(url):
        import fsspec

        return fsspec.open(url, "rb")
    return open(url, "rb")


def _recording_tarinfo(header_errors: list[tarfile.HeaderError]) -> type[tarfile.TarInfo]:
    """A TarInfo class that remembers why tarfile stopped reading headers.

    Streaming tarfile treats a short or garbage header after the first member as a normal end of
    archive; only an all-zero block is a real end marker. Recording the header error lets us tell
    a clean end from a truncated or corrupt tail, which would otherwise lose samples silently.
    """

    class RecordingTarInfo(tarfile.TarInfo):
        @classmethod
        def fromtarfile(cls, tar: tarfile.TarFile) -> tarfile.TarInfo:
            try:
                return super().fromtarfile(tar)
            except tarfile.HeaderError as exc:
                header_errors.append(exc)
                raise

    return RecordingTarInfo


def _end_problem(header_errors: list[tarfile.HeaderError]) -> str | None:
    """Why a tar that stopped yielding members did not end cleanly, or None if it did."""
    if not header_errors or isinstance(header_errors[-1], tarfile.EOFHeaderError):
        return None
    last = header_errors[-1]
    if isinstance(last, (tarfile.EmptyHeaderError, tarfile.TruncatedHeaderError)):
        return "unexpected end of data"
    return f"invalid header ({last})"


def _describe_failure(url: str, exc: BaseException, *, done: str | None, reading: str | None) -> str:
    """One-line description of a stream failure, naming where in the tar it happened."""
    message = one_line(exc) or type(exc).__name__
    where = f" in member {reading}" if reading else (f" after member {done}" if done else "")
    if isinstance(exc, FileNotFoundError):
        return one_line(f"shard not found: {url}")
    if url.startswith("pipe:") and isinstance(exc, OSError) and (status := re.search(r"exit (-?\d+)", message)):
        # webdataset's Pipe error repeats Popen's arguments; the command and status are what matter.
        return one_line(f"pipe command failed with exit status {status.group(1)}{where}: {url[5:]}")
    compressed = isinstance(exc, (zlib.error, lzma.LZMAError)) or re.search(r"zlib|gzip|bz2|lzma|compress", message)
    if compressed:
        return one_line(f"corrupt compressed stream: {message}{where}")
    if isinstance(exc, (tarfile.TarError, EOFError)):
        if reading is None and done is None:
            kind = "not a tar archive"
        elif isinstance(exc, EOFError) or "end of data" in message or "truncated" in message:
            kind = "truncated tar"
        else:
            kind = "corrupt tar"
        return one_line(f"{kind}: {message}{where}")
    return one_line(f"cannot read shard{where}: {type(exc).__name__}: {message}")


def _split_member(member: tarfile.TarInfo) -> tuple[str | None, str | None]:
    """(key, lowercased ext) the WebDataset way, or (None, None) for members that are not sample files."""
    if not member.isreg():
        return None, None
    key, ext = base_plus_ext(member.name)
    if key is None or not ext:
        return None, None
    return key, ext.lower()


def _read_member(sample: dict, seen_exts: set[str], tar: tarfile.TarFile, member: tarfile.TarInfo, ext: str, limit: int) -> None:
    """Add one member's bytes to ``sample``, or mark the sample; skipped data is never loaded."""
    if ext in seen_exts:
        _mark(sample, "decode_error", f"duplicate member {sample['key']}.{ext}")
        return
    seen_exts.add(ext)
    if member.size > limit:
        # Left unread: streaming tarfile skips the data when it advances to the next header.
        _mark(sample, "too_large", f"member {member.name} is {member.size} bytes, over the {limit}-byte limit")
        return
    handle = tar.extractfile(member)
    sample["files"][ext] = handle.read() if handle is not None else b""


def _new_sample(url: str, key: str, index: int) -> dict:
    return {"shard": url, "key": key, "index": index, "files": {}, "status": "ok", "error": None}


def _mark(sample: dict, status: str, error: str) -> None:
    # First problem wins: a later one must not hide the reason the sample was first rejected.
    if sample["status"] == "ok":
        sample["status"] = status
        sample["error"] = one_line(error)


def iter_shard_samples(url: str, *, allow_pipe: bool = False, max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES) -> Iterator[dict]:
    """Stream one shard and yield its samples in order (see the module docstring for the row shape).

    A stream failure yields the samples completed before it, then exactly one ``shard_error`` row
    (carrying the in-progress sample's key/index, or key "" and the next index).
    """
    pending: dict | None = None  # the sample being assembled; complete only once the key changes
    next_index = 0
    done: str | None = None  # last member fully handled, for error messages
    reading: str | None = None  # member whose data is being read right now
    seen_exts: set[str] = set()  # extensions of the pending sample, including unread too-large ones
    header_errors: list[tarfile.HeaderError] = []
    abandoned = False  # the consumer closed us early: close quietly, yield nothing more
    try:
        with _open_stream(url, allow_pipe) as stream, tarfile.open(
            fileobj=stream, mode="r|*", tarinfo=_recording_tarinfo(header_errors)
        ) as tar:
            while (member := tar.next()) is not None:
                tar.members = []  # streaming: do not accumulate TarInfo objects for huge shards
                key, ext = _split_member(member)
                if key is None or ext is None:
                    done = member.name
                    continue  # directories, links, extension-less names belong to no sample
                if pending is None or key != pending["key"]:
                    if pending is not None:
                        try:
                            yield pending
                        except GeneratorExit:
                            abandoned = True
                            raise
                        next_index += 1
                    pending = _new_sample(url, key, next_index)
                    seen_exts = set()
                reading = member.name
                _read_member(pending, seen_exts, tar, member, ext, max_member_bytes)
                reading = None
                done = member.name
            problem = _end_problem(header_errors)
            if problem is not None:
                raise tarfile.ReadError(problem)
    except STREAM_ERRORS as exc:
        if abandoned:
            return  # e.g. a pipe's SIGPIPE exit status after the consumer stopped reading
        if pending is not None:
            row = {**pending, "files": {}, "status": "shard_error"}
        else:
            row = _new_sample(url, "", next_index) | {"status": "shard_error"}
        row["error"] = _describe_failure(url, exc, done=done, reading=reading)
        yield row
        return
    if pending is not None:
        yield pending
