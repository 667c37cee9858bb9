"""Streaming tar shards member by member, and the raw samples of one shard.

:class:`TarStream` is the one tar reader: it opens a shard (local file, fsspec URL or allowed
``pipe:``), yields its members in order without accumulating headers, tells a clean end from a
truncated or corrupt tail, and describes a failure in one line naming where it happened. Both
:func:`iter_shard_samples` (scoring) and :mod:`mimicfilter.curate.reshard` (curated shards) read
through it.

Nothing here raises for a bad shard during sample iteration: a broken stream becomes exactly one
``shard_error`` row so the caller can account for every sample it could not read.
"""

from __future__ import annotations

import contextlib
import lzma
import os
import re
import tarfile
import zlib
from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import IO

from mimicfilter.errors import MimicfilterError, one_line
from mimicfilter.shards.discover import PIPE_HINT, PIPE_REFUSED
from mimicfilter.shards.records import RawSample
from mimicfilter.store.paths import is_url

DEFAULT_MAX_MEMBER_BYTES = 64 * 2**20

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

_MEMBER_NAME = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")


def base_plus_ext(name: str) -> tuple[str | None, str | None]:
    """(key, extensions) of a tar member name, split as webdataset does (its regex, without
    importing webdataset, which pulls in torch: `filter` and `report` start without it)."""
    match = _MEMBER_NAME.match(name)
    return (match.group(1), match.group(2)) if match else (None, None)


def open_stream(url: str, allow_pipe: bool) -> AbstractContextManager[IO[bytes]]:
    """A binary stream of a shard: a local file, an fsspec URL, or (when allowed) a ``pipe:`` command."""
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


def describe_failure(url: str, exc: BaseException, *, done: str | None, reading: str | None) -> str:
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


@dataclass(frozen=True)
class TarMember:
    """One member of a shard; ``key``/``ext`` are None for members that are not sample files."""

    info: tarfile.TarInfo
    key: str | None
    ext: str | None  # lower case


def _split_member(member: tarfile.TarInfo) -> tuple[str | None, str | None]:
    """(key, lowercased ext) the WebDataset way, or (None, None) for members that are not sample files."""
    return _split_name(member.name) if member.isreg() else (None, None)


def _split_name(name: str) -> tuple[str | None, str | None]:
    """(key, lowercased ext) of a regular member's name, or (None, None) when it names no sample file."""
    key, ext = base_plus_ext(name)
    if key is None or not ext:
        return None, None
    return key, ext.lower()


class TarStream:
    """One shard read member by member; remembers where it is, so a failure can say where.

    Usage::

        stream = TarStream(url)
        try:
            with stream.open() as members:
                for member in members:
                    with stream.member_data(member) as data: ...
        except STREAM_ERRORS as exc:
            message = stream.describe(exc)
    """

    def __init__(self, url: str, allow_pipe: bool = False, seeking: bool = False):
        self.url = url
        self.allow_pipe = allow_pipe
        self.seeking = seeking  # a local file read with seeks over the data (for headers only)
        self.done: str | None = None  # last member fully handled
        self.reading: str | None = None  # member whose data is being read right now
        self._header_errors: list[tarfile.HeaderError] = []
        self._tar: tarfile.TarFile | None = None

    @contextlib.contextmanager
    def open(self) -> Iterator[Iterator[TarMember]]:
        with open_stream(self.url, self.allow_pipe) as raw, tarfile.open(
            fileobj=raw, mode="r:*" if self.seeking else "r|*", tarinfo=_recording_tarinfo(self._header_errors)
        ) as tar:
            self._tar = tar
            yield self._members(tar)

    def _members(self, tar: tarfile.TarFile) -> Iterator[TarMember]:
        while (info := tar.next()) is not None:
            tar.members = []  # streaming: do not accumulate TarInfo objects for huge shards
            key, ext = _split_member(info)
            yield TarMember(info, key, ext)
            self.done = info.name
        problem = _end_problem(self._header_errors)
        if problem is not None:
            raise tarfile.ReadError(problem)

    @contextlib.contextmanager
    def member_data(self, member: TarMember) -> Iterator[IO[bytes]]:
        """The member's data as a file (read it before the next member)."""
        handle = self._tar.extractfile(member.info) if self._tar is not None else None
        if handle is None:  # cannot happen for regular members; guards against a tarfile change
            raise tarfile.ReadError(f"no data for member {member.info.name}")
        self.reading = member.info.name
        yield handle
        self.reading = None

    def describe(self, exc: BaseException) -> str:
        return describe_failure(self.url, exc, done=self.done, reading=self.reading)


def _add_member(sample: RawSample, seen_exts: set[str], stream: TarStream, member: TarMember, limit: int) -> None:
    """Add one member's bytes to ``sample``, or mark the sample; skipped data is never loaded."""
    ext = member.ext
    if ext in seen_exts:
        sample.mark("decode_error", f"duplicate member {sample.key}.{ext}")
        return
    seen_exts.add(ext)
    if member.info.size > limit:
        # Left unread: streaming tarfile skips the data when it advances to the next header.
        sample.mark("too_large", f"member {member.info.name} is {member.info.size} bytes, over the {limit}-byte limit")
        return
    with stream.member_data(member) as data:
        sample.files[ext] = data.read()


def iter_shard_samples(url: str, *, allow_pipe: bool = False, max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES) -> Iterator[RawSample]:
    """Stream one shard and yield its samples in order.

    A stream failure yields the samples completed before it, then exactly one ``shard_error`` row
    (carrying the in-progress sample's key/index, or key "" and the next index).
    """
    pending: RawSample | None = None  # the sample being assembled; complete only once the key changes
    next_index = 0
    seen_exts: set[str] = set()  # extensions of the pending sample, including unread too-large ones
    abandoned = False  # the consumer closed us early: close quietly, yield nothing more
    stream = TarStream(url, allow_pipe)
    try:
        with stream.open() as members:
            for member in members:
                if member.key is None:
                    continue  # directories, links, extension-less names belong to no sample
                if pending is None or member.key != pending.key:
                    if pending is not None:
                        try:
                            yield pending
                        except GeneratorExit:
                            abandoned = True
                            raise
                        next_index += 1
                    pending = RawSample(url, member.key, next_index)
                    seen_exts = set()
                _add_member(pending, seen_exts, stream, member, max_member_bytes)
    except STREAM_ERRORS as exc:
        if abandoned:
            return  # e.g. a pipe's SIGPIPE exit status after the consumer stopped reading
        if pending is not None:
            row = RawSample(url, pending.key, pending.index, {}, "shard_error")
        else:
            row = RawSample(url, "", next_index, {}, "shard_error")
        row.error = stream.describe(exc)
        yield row
        return
    if pending is not None:
        yield pending


def count_shard_samples(url: str, *, allow_pipe: bool = False) -> int:
    """How many samples a shard holds (consecutive members sharing a key), reading headers only.

    A local uncompressed tar is read block header by block header, seeking over the data
    (:func:`_plain_tar_keys`); anything else goes through tarfile (a URL or ``pipe:`` streamed). A
    shard that cannot be read to its end counts the samples before the failure (scoring then
    reports the failure as a ``shard_error`` row).
    """
    count, key = 0, None
    local = not (is_url(url) or url.startswith("pipe:"))
    try:
        with contextlib.ExitStack() as stack:
            keys = _plain_tar_keys(stack.enter_context(open(url, "rb"))) if local else None
            if keys is None:  # a URL, a compressed tar, an extension header: tarfile reads it
                keys = (member.key for member in stack.enter_context(TarStream(url, allow_pipe, seeking=local).open()))
            for member_key in keys:
                if member_key is not None and member_key != key:
                    count, key = count + 1, member_key
    except STREAM_ERRORS:
        pass
    return count


_REGULAR = frozenset(b"07\0")  # regular-file type flags (tarfile.REGULAR_TYPES less the sparse "S")
_PLAIN = frozenset(b"01234567\0")  # types without extension data (no pax "x"/"g", no GNU long names "L"/"K")


def _plain_tar_keys(handle: IO[bytes]) -> list[str | None] | None:
    """The sample key of every member of a plain POSIX/GNU tar (None for members of no sample),
    parsing the 512-byte headers directly (a sixth of tarfile's time: benchmarks/bench_count.py),
    or None when the file needs tarfile: compressed, pax or GNU long-name headers, base-256
    sizes. Stops at the end marker or at the first header whose checksum fails, as tarfile does."""
    keys: list[str | None] = []
    descriptor, offset = handle.fileno(), 0
    while True:
        header = os.pread(descriptor, 512, offset)
        if len(header) < 512:
            return keys if offset else None  # shorter than one block: compressed, or tarfile says what it is
        if header == _ZERO_BLOCK:
            return keys
        if not _checksum_holds(header):
            return keys if keys else None  # garbage after members (tarfile stops too); a first one: compressed?
        kind, size_field = header[156], header[124:136]
        if kind not in _PLAIN or size_field[0] & 0x80:
            return None
        name = header[:100].split(b"\0", 1)[0]
        if header[257:263] == b"ustar\0" and header[345] != 0:
            name = header[345:500].split(b"\0", 1)[0] + b"/" + name
        size = int(size_field.split(b"\0", 1)[0].strip() or b"0", 8)
        keys.append(_split_name(name.decode("utf-8", "surrogateescape"))[0] if kind in _REGULAR else None)
        offset += 512 + (size + 511) // 512 * 512


_ZERO_BLOCK = bytes(512)


def _checksum_holds(header: bytes) -> bool:
    """The header's checksum: the sum of its bytes with the checksum field read as spaces (zlib's
    adler32 sums them in C; the sum is compared modulo its 65521)."""
    stored = header[148:156].split(b"\0", 1)[0].strip()
    if not stored or not all(48 <= c <= 55 for c in stored):
        return False
    total = (zlib.adler32(header[:148] + b"        " + header[156:]) & 0xFFFF) - 1
    return total % 65521 == int(stored, 8) % 65521

