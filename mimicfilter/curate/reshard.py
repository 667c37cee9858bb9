"""Copy kept samples out of source shards into new WebDataset shards plus a wids index.

Members are copied byte for byte under their original names, so ``__key__`` and every file of a
kept sample survive unchanged. Each source shard is streamed once, member by member; nothing is
buffered beyond tarfile's own copy chunk. Output shards are written under temp names and only
renamed into place once every source shard has been copied, so a failure leaves no final file.

Output tar headers keep name, size, mode and mtime; owner is normalised to uid/gid 0 and
uname/gname "root" so the same input gives byte-identical shards on any machine.
"""

from __future__ import annotations

import hashlib
import os
import re
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from mimicfilter.errors import MimicfilterError, one_line
from mimicfilter.shards.discover import MOVED_HINT, PIPE_HINT, PIPE_REFUSED
from mimicfilter.shards.tar_stream import STREAM_ERRORS, TarStream
from mimicfilter.store.atomic import atomic_write_json, temp_path_beside

WIDS_KIND = "wids-shard-index-v1"
RUN_ID_FIELD = "mimicfilter_run_id"  # the filter run that wrote the shards (readers of wids ignore it)
SHARD_DIGITS = 6

_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")
_SAFE_PREFIX = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


@dataclass(frozen=True)
class CuratedShard:
    """One finished output shard; ``url`` is its name relative to the wids index."""

    url: str
    path: str
    nsamples: int
    filesize: int
    md5sum: str

    def index_entry(self) -> dict[str, Any]:
        return {"url": self.url, "nsamples": self.nsamples, "filesize": self.filesize, "md5sum": self.md5sum}


@dataclass(frozen=True)
class _SourcePlan:
    """What to copy from one source shard: samples by position (``indices``: index → key), or, for
    pairs without a position, every sample whose key is in ``keys``."""

    url: str
    keys: frozenset[str]
    indices: dict[int, str]


def shard_file_name(prefix: str, number: int) -> str:
    return f"{prefix}-{number:0{SHARD_DIGITS}d}.tar"


def index_file_name(prefix: str) -> str:
    return f"{prefix}.wids.json"


def write_curated_shards(
    kept: Iterable[tuple[str, str] | tuple[str, str, int]],
    out_dir: Path,
    *,
    maxcount: int = 10000,
    prefix: str = "curated",
    allow_pipe: bool = False,
    run_id: str | None = None,
) -> list[CuratedShard]:
    """Copy the kept (shard url, sample key[, sample index]) into ``{prefix}-NNNNNN.tar`` shards and a wids index.

    With an index, exactly the sample at that position is copied (a shard may hold one key twice);
    without, every sample with the key. ``kept`` must be grouped by shard, in each shard's sample
    order; output order is source order.
    Raises MimicfilterError (before writing anything) for unsafe keys or ungrouped input, and
    (leaving no output shard behind) for unreadable shards or kept keys a shard does not hold.
    """
    _check_options(maxcount, prefix)
    plans = _plan_sources(kept, allow_pipe=allow_pipe)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sink = _ShardSink(out_dir, prefix, maxcount)
    try:
        for plan in plans:
            _copy_source(plan, sink, allow_pipe=allow_pipe)
        shards = sink.commit()
    except BaseException:
        sink.discard()
        raise
    index = {"__kind__": WIDS_KIND, "wids_version": 1, "name": prefix, "shardlist": [shard.index_entry() for shard in shards],
             **({RUN_ID_FIELD: run_id} if run_id is not None else {})}
    atomic_write_json(out_dir / index_file_name(prefix), index)
    return shards


# --------------------------------------------------------------------------------------------
# Validation (before anything is written)
# --------------------------------------------------------------------------------------------


def _check_options(maxcount: int, prefix: str) -> None:
    if isinstance(maxcount, bool) or not isinstance(maxcount, int) or maxcount < 1:
        raise MimicfilterError(f"maxcount must be a positive integer, got {maxcount!r}", hint="use e.g. 10000 samples per shard")
    if not _SAFE_PREFIX.fullmatch(prefix):
        raise MimicfilterError(f"unsafe output shard prefix {one_line(repr(prefix), 80)}",
                               hint="use letters, digits, '.', '_' or '-', starting with a letter or digit")


def unsafe_key_reason(key: str) -> str | None:
    """Why ``key`` cannot be a member-name stem inside the output directory, or None if it can."""
    if not key:
        return "empty key"
    if _CONTROL_CHARS.search(key):
        return "control character in key"
    if "\\" in key:
        return "backslash in key"
    if key.startswith("/"):
        return "absolute path"
    if any(part in ("", ".", "..") for part in key.split("/")):
        return "'.', '..' or empty path component"
    return None


def _plan_sources(kept: Iterable[tuple], *, allow_pipe: bool) -> list[_SourcePlan]:
    """Group and vet the kept samples; the whole list is checked before the first byte is written."""
    groups: dict[str, set[str]] = {}
    positions: dict[str, dict[int, str]] = {}
    current: str | None = None
    for url, key, *index in kept:
        reason = unsafe_key_reason(key)
        if reason is not None:
            raise MimicfilterError(
                f"refusing unsafe sample key {one_line(repr(key), 120)} from {url}: {reason}",
                hint="sample keys must be relative names without '..', backslashes or control characters",
            )
        if url != current:
            if url in groups:
                raise MimicfilterError(
                    f"kept samples are not grouped by shard: {url} reappears after {current}",
                    hint="sort the kept rows by shard, then by sample index",
                )
            if url.startswith("pipe:") and not allow_pipe:
                raise MimicfilterError(PIPE_REFUSED, hint=PIPE_HINT)
            groups[url] = set()
            positions[url] = {}
            current = url
        if index and index[0] is not None:
            positions[url][int(index[0])] = key
        else:
            groups[url].add(key)
    return [_SourcePlan(url, frozenset(keys), positions[url]) for url, keys in groups.items()]


# --------------------------------------------------------------------------------------------
# Reading a source shard
# --------------------------------------------------------------------------------------------


class _SourceReadError(Exception):
    """A read failure of the source stream, kept apart from write failures of the output."""

    def __init__(self, cause: BaseException):
        super().__init__(str(cause))
        self.cause = cause


class _GuardedReader:
    """Member data reader whose failures surface as _SourceReadError (tarfile.addfile mixes reads and writes)."""

    def __init__(self, handle: IO[bytes]):
        self._handle = handle

    def read(self, size: int = -1) -> bytes:
        try:
            data = self._handle.read(size)
        except STREAM_ERRORS as exc:
            raise _SourceReadError(exc) from exc
        if size > 0 and len(data) < size:
            # tarfile.addfile asks for exact counts and would report a short read as a bare OSError.
            raise _SourceReadError(tarfile.ReadError("unexpected end of data"))
        return data


def _copy_source(plan: _SourcePlan, sink: _ShardSink, *, allow_pipe: bool) -> None:
    """Stream one source shard once, copying every regular member of its kept samples into ``sink``
    (a link, FIFO or device never: nothing is followed). Samples are counted as the scorer counts
    them (consecutive members with one key, whatever their type): its index is the score table's."""
    found: set[str] = set()
    found_indices: set[int] = set()
    sample_key: str | None = None  # key of the sample whose members are being read
    sample_index = -1
    stream = TarStream(plan.url, allow_pipe)
    try:
        with stream.open() as members:
            for member in members:
                if member.key is None:
                    continue  # directories and names without an extension belong to no sample
                starts = member.key != sample_key
                if starts:
                    sample_index += 1
                    sample_key = member.key
                wanted = plan.indices.get(sample_index) == member.key or member.key in plan.keys
                if wanted:
                    if starts:
                        sink.start_sample()
                        found.add(member.key)
                        found_indices.add(sample_index)
                    if member.regular:
                        with stream.member_data(member) as data:
                            sink.add_member(member.info, _GuardedReader(data))
    except _SourceReadError as exc:
        _raise_read_error(stream, exc.cause)
    except WriteRefused:
        raise  # the output's fault, not the shard's
    except STREAM_ERRORS as exc:
        if isinstance(exc.__context__, (MimicfilterError, WriteRefused)):
            # e.g. a pipe's exit status raised while closing after an output write error
            raise exc.__context__ from None
        _raise_read_error(stream, exc)
    _check_all_found(plan, found, found_indices)


class WriteRefused(OSError):
    """A refused write of the curated shards (exit 1, naming the directory), never a bad source shard."""


def _raise_read_error(stream: TarStream, exc: BaseException) -> None:
    detail = stream.describe(exc)
    if detail.startswith("shard not found"):
        raise MimicfilterError(one_line(detail), hint=MOVED_HINT) from None
    raise MimicfilterError(one_line(f"cannot read shard {stream.url}: {detail}"),
                           hint="re-download or drop the shard, then run filter again") from None


def _check_all_found(plan: _SourcePlan, found: set[str], found_indices: set[int]) -> None:
    changed = sorted(index for index in plan.indices if index not in found_indices)
    if changed:
        more = f" and {len(changed) - 1} more" if len(changed) > 1 else ""
        raise MimicfilterError(
            one_line(f"kept sample {plan.indices[changed[0]]!r} (index {changed[0]}){more} not found in shard {plan.url}"),
            hint="the shard changed since it was scored; score it again",
        )
    missing = sorted(plan.keys - found)
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise MimicfilterError(
            one_line(f"kept sample {missing[0]!r}{more} not found in shard {plan.url}"),
            hint="the shard changed since it was scored; score it again",
        )


# --------------------------------------------------------------------------------------------
# Writing output shards
# --------------------------------------------------------------------------------------------


class _HashingWriter:
    """File wrapper that counts and md5-hashes what tarfile writes, so no second read is needed."""

    def __init__(self, handle: IO[bytes]):
        self._handle = handle
        self.md5 = hashlib.md5(usedforsecurity=False)  # an index checksum, not security
        self.size = 0
        self.discarding = False

    def write(self, data: bytes) -> int:
        if self.discarding:
            return len(data)  # an aborted shard: its file is deleted, its tail need not be written
        self._handle.write(data)
        self.md5.update(data)
        self.size += len(data)
        return len(data)


@dataclass(frozen=True)
class _PendingShard:
    temp_path: Path
    final_path: Path
    nsamples: int
    filesize: int
    md5sum: str


class _OpenShard:
    """The output shard being filled: a temp file, its hashing wrapper and a streaming tar writer."""

    def __init__(self, temp_path: Path):
        self.temp_path = temp_path
        self.handle = open(temp_path, "wb")  # noqa: SIM115 - closed in finish()/abort()
        self.writer = _HashingWriter(self.handle)
        self.tar = tarfile.open(fileobj=self.writer, mode="w|", format=tarfile.PAX_FORMAT)
        self.nsamples = 0

    def finish(self) -> tuple[int, str]:
        self.tar.close()
        self.handle.flush()
        os.fsync(self.handle.fileno())
        self.handle.close()
        return self.writer.size, self.writer.md5.hexdigest()

    def abort(self) -> None:
        # Close the tar too, or its __del__ later writes a trailer into the closed file.
        self.writer.discarding = True
        try:
            self.tar.close()
        finally:
            self.handle.close()


class _ShardSink:
    """Receives kept samples in order and rolls over to a new output shard every ``maxcount`` samples."""

    def __init__(self, out_dir: Path, prefix: str, maxcount: int):
        self._out_dir = out_dir
        self._prefix = prefix
        self._maxcount = maxcount
        self._open: _OpenShard | None = None
        self._pending: list[_PendingShard] = []

    def start_sample(self) -> None:
        try:
            if self._open is not None and self._open.nsamples >= self._maxcount:
                self._close_current()
            if self._open is None:
                self._open = _OpenShard(self._new_temp_path())
        except OSError as exc:
            raise self._write_error(exc) from None
        self._open.nsamples += 1

    def add_member(self, member: tarfile.TarInfo, data: _GuardedReader) -> None:
        if self._open is None:
            raise RuntimeError("add_member before start_sample")
        try:
            self._open.tar.addfile(_output_info(member), data)
        except OSError as exc:
            raise self._write_error(exc) from None

    def commit(self) -> list[CuratedShard]:
        """Close the last shard and rename every temp shard to its final name, in order."""
        try:
            if self._open is not None:
                self._close_current()
            shards = []
            for pending in self._pending:
                os.replace(pending.temp_path, pending.final_path)
                shards.append(
                    CuratedShard(pending.final_path.name, str(pending.final_path), pending.nsamples, pending.filesize, pending.md5sum)
                )
        except OSError as exc:
            raise self._write_error(exc) from None
        self._pending = []
        return shards

    def discard(self) -> None:
        """Delete every temp file of this run (never a final file of an earlier run)."""
        if self._open is not None:
            self._open.abort()
            self._open.temp_path.unlink(missing_ok=True)
            self._open = None
        for pending in self._pending:
            pending.temp_path.unlink(missing_ok=True)
        self._pending = []

    def _close_current(self) -> None:
        assert self._open is not None
        current = self._open
        self._open = None
        try:
            filesize, md5sum = current.finish()
        except BaseException:
            current.abort()
            current.temp_path.unlink(missing_ok=True)
            raise
        final = self._out_dir / shard_file_name(self._prefix, len(self._pending))
        self._pending.append(_PendingShard(current.temp_path, final, current.nsamples, filesize, md5sum))

    def _new_temp_path(self) -> Path:
        return temp_path_beside(self._out_dir / shard_file_name(self._prefix, len(self._pending)))

    def _write_error(self, exc: OSError) -> "WriteRefused":
        return WriteRefused(exc.errno, exc.strerror or one_line(exc), str(self._out_dir))


def _output_info(member: tarfile.TarInfo) -> tarfile.TarInfo:
    """A fresh header with the source's name/size/mode/mtime; owner normalised for reproducibility."""
    info = tarfile.TarInfo(member.name)
    info.size = member.size
    info.mode = member.mode
    info.mtime = member.mtime
    info.type = tarfile.REGTYPE
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    return info
