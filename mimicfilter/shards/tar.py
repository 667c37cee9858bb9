"""Streaming tar shards member by member, and the raw samples of one shard.

:class:`TarStream` is the general tar reader: it opens a shard (local file, fsspec URL or allowed
``pipe:``), yields its members in order without accumulating headers, tells a clean end from a
truncated or corrupt tail, and describes a failure in one line naming where it happened. Both
:func:`iter_shard_samples` (scoring) and :mod:`mimicfilter.curate.reshard` (curated shards) read
through it. Local plain tars — most shards — are read for scoring by the faster
:mod:`mimicfilter.shards.plain_tar`, which hands anything unusual back to :class:`TarStream`, so
the rows are the same either way.

Nothing here raises for a bad shard during sample iteration: a broken stream becomes exactly one
``shard_error`` row so the caller can account for every sample it could not read.
"""

from __future__ import annotations

import contextlib
import itertools
import lzma
import re
import tarfile
import zlib
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import IO

from mimicfilter.errors import MimicfilterError, one_line
from mimicfilter.shards.discover import PIPE_HINT, PIPE_REFUSED
from mimicfilter.shards.plain_tar import NeedsTarfile, PlainHeader, PlainTar
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


def _split_header(header: PlainHeader) -> tuple[str | None, str | None]:
    """:func:`_split_member` for the plain reader's headers."""
    return _split_name(header.name) if header.regular else (None, None)


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


class _Samples:
    """Members → samples: consecutive members sharing a key form a sample, which is complete only
    once the key changes (the shard's last sample is yielded by its reader, after a clean end)."""

    def __init__(self, url: str, limit: int):
        self.url = url
        self.limit = limit
        self.pending: RawSample | None = None  # the sample being assembled
        self.next_index = 0
        self._seen_exts: set[str] = set()  # extensions of the pending sample, including unread too-large ones

    def begin(self, key: str) -> RawSample | None:
        """A member of sample ``key`` is next: returns the sample this completes (when the key changes)."""
        if self.pending is not None and key == self.pending.key:
            return None
        done = self.pending
        if done is not None:
            self.next_index += 1
        self.pending, self._seen_exts = RawSample(self.url, key, self.next_index), set()
        return done

    def add(self, ext: str, name: str, size: int, read: Callable[[], bytes]) -> None:
        """Add one file to the pending sample; skipped data is never read."""
        sample = self.pending
        if ext in self._seen_exts:
            sample.mark("decode_error", f"duplicate member {sample.key}.{ext}")
            return
        self._seen_exts.add(ext)
        if size > self.limit:  # left unread: the reader skips the data when it moves to the next header
            sample.mark("too_large", f"member {name} is {size} bytes, over the {self.limit}-byte limit")
            return
        sample.files[ext] = read()

    def failed(self, error: str) -> RawSample:
        """The one shard_error row of a broken stream: the in-progress sample's key and index, or
        key "" and the next index."""
        if self.pending is not None:
            return RawSample(self.url, self.pending.key, self.pending.index, {}, "shard_error", error)
        return RawSample(self.url, "", self.next_index, {}, "shard_error", error)


def iter_shard_samples(url: str, *, allow_pipe: bool = False, max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES) -> Iterator[RawSample]:
    """Stream one shard and yield its samples in order.

    A stream failure yields the samples completed before it, then exactly one ``shard_error`` row
    (carrying the in-progress sample's key/index, or key "" and the next index). A local plain tar
    is read by :class:`~mimicfilter.shards.plain_tar.PlainTar`; whatever it leaves to tarfile
    (compression, extension headers, a broken tail) is read again by tarfile, which gives the rows
    from the first one not yet given — so every row is the one tarfile would give.
    """
    given = 0
    if not (is_url(url) or url.startswith("pipe:")):
        plain = _plain_samples(url, max_member_bytes)
        try:
            for sample in plain:
                yield sample
                given += 1
            return
        except NeedsTarfile:
            pass
        finally:
            plain.close()
    yield from itertools.islice(_tarfile_samples(url, allow_pipe, max_member_bytes), given, None)


def _plain_samples(url: str, limit: int) -> Iterator[RawSample]:
    samples = _Samples(url, limit)
    with PlainTar.open(url) as tar:
        try:
            for header in tar.headers():
                key, ext = _split_header(header)
                if key is None:
                    continue
                if (done := samples.begin(key)) is not None:
                    yield done
                samples.add(ext, header.name, header.size, tar.read)
        except OSError as exc:  # tarfile reads it again and says what went wrong, and where
            raise NeedsTarfile(str(exc)) from None
    if samples.pending is not None:
        yield samples.pending


def _tarfile_samples(url: str, allow_pipe: bool, limit: int) -> Iterator[RawSample]:
    samples = _Samples(url, limit)
    abandoned = False  # the consumer closed us early: close quietly, yield nothing more
    stream = TarStream(url, allow_pipe)

    def reader(member: TarMember) -> Callable[[], bytes]:
        def read() -> bytes:
            with stream.member_data(member) as data:
                return data.read()
        return read

    try:
        with stream.open() as members:
            for member in members:
                if member.key is None:
                    continue  # directories, links, extension-less names belong to no sample
                if (done := samples.begin(member.key)) is not None:
                    try:
                        yield done
                    except GeneratorExit:
                        abandoned = True
                        raise
                samples.add(member.ext, member.info.name, member.info.size, reader(member))
    except STREAM_ERRORS as exc:
        if not abandoned:  # (e.g. a pipe's SIGPIPE exit status after the consumer stopped reading)
            yield samples.failed(stream.describe(exc))
        return
    if samples.pending is not None:
        yield samples.pending


def count_shard_samples(url: str, *, allow_pipe: bool = False) -> int:
    """How many samples a shard holds (consecutive members sharing a key), reading headers only.

    A local plain tar is read header by header, seeking over the data (:class:`PlainTar`);
    anything else goes through tarfile (a URL or ``pipe:`` streamed). A shard that cannot be read
    to its end counts the samples before the failure (scoring then reports the failure as a
    ``shard_error`` row).
    """
    local = not (is_url(url) or url.startswith("pipe:"))
    if local:
        try:
            with PlainTar.open(url) as tar:
                return _count_keys(_split_header(header)[0] for header in tar.headers())
        except (NeedsTarfile, OSError):
            pass  # tarfile reads it (and stops where it is broken)
    return _count_keys(_tarfile_keys(url, allow_pipe, local))


def _tarfile_keys(url: str, allow_pipe: bool, seeking: bool) -> Iterator[str | None]:
    try:
        with TarStream(url, allow_pipe, seeking=seeking).open() as members:
            yield from (member.key for member in members)
    except STREAM_ERRORS:
        return


def _count_keys(keys: Iterable[str | None]) -> int:
    count, last = 0, None
    for key in keys:
        if key is not None and key != last:
            count, last = count + 1, key
    return count
