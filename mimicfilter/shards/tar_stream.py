"""Any tar shard read member by member: :class:`TarStream`, the general tar reader.

It opens a shard (local file, fsspec URL or allowed ``pipe:``), yields its members in order without
accumulating headers, reads on past an end-of-archive marker when another archive follows (``cat
a.tar b.tar``, as GNU ``tar --ignore-zeros`` does), tells a clean end from a truncated or corrupt
tail (of the tar, or of its gzip, bz2 or xz compression, read past the tar's end to the checks
stored at the end of the compressed data), and describes a failure in one line naming where it
happened. Both :mod:`mimicfilter.shards.samples` (scoring) and :mod:`mimicfilter.curate.reshard`
(curated shards) read through it; local plain tars — most shards — are read for scoring by the
faster :mod:`mimicfilter.shards.tar_headers`, which hands anything unusual back to it, so the rows
are the same either way. A streamed shard's bytes reach tarfile through :mod:`mimicfilter.shards.tar_bytes`.
"""

from __future__ import annotations

import contextlib
import gzip
import lzma
import re
import tarfile
import zlib
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import IO

from mimicfilter.errors import MimicfilterError, one_line
from mimicfilter.shards.discover import PIPE_HINT, PIPE_REFUSED
from mimicfilter.shards.tar_bytes import DECOMPRESSORS, Source, TarBytes, compression_of, plain_file
from mimicfilter.shards.tar_headers import BLOCK, skip_zero_blocks
from mimicfilter.store.paths import is_url

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


def _recording_tarinfo(header_errors: list[tarfile.HeaderError],
                       next_header: Callable[[tarfile.TarFile], bool] | None = None) -> type[tarfile.TarInfo]:
    """A TarInfo class that remembers why tarfile stopped reading headers, and reads on past an
    end-of-archive marker when ``next_header`` finds another archive after it.

    Streaming tarfile treats a short or garbage header after the first member as a normal end of
    archive; only an all-zero block is a real end marker. Recording the header error lets us tell
    a clean end from a truncated or corrupt tail, which would otherwise lose samples silently.

    An all-zero block where a member's header should be calls ``next_header(tar)``: it skips the zero
    blocks that follow and says whether a valid header comes next, which is then read as the next
    member (``cat a.tar b.tar``: b's members follow a's, as with GNU ``tar --ignore-zeros``). Anything
    else after the zero blocks — garbage, a short block, the end of the data — ends the archive there,
    cleanly, as the marker alone did. (tarfile's own ``ignore_zeros`` skips garbage blocks too, one
    block at a time.) Only a member's own header is looked for so: a zero block where a pax or GNU
    long-name header's member should be stays tarfile's error.
    """
    depth = 0  # 1 for a member's header; more for the header that a pax or long-name header describes

    class RecordingTarInfo(tarfile.TarInfo):
        @classmethod
        def fromtarfile(cls, tar: tarfile.TarFile) -> tarfile.TarInfo:
            nonlocal depth
            depth += 1
            try:
                while True:
                    try:
                        return super().fromtarfile(tar)
                    except tarfile.EOFHeaderError as exc:
                        if depth > 1 or next_header is None or not next_header(tar):
                            header_errors.append(exc)
                            raise
                    except tarfile.HeaderError as exc:
                        header_errors.append(exc)
                        raise
            finally:
                depth -= 1

    return RecordingTarInfo


def _end_problem(header_errors: list[tarfile.HeaderError]) -> str | None:
    """Why a tar that stopped yielding members did not end cleanly, or None if it did."""
    if not header_errors or isinstance(header_errors[-1], tarfile.EOFHeaderError):
        return None
    last = header_errors[-1]
    if isinstance(last, (tarfile.EmptyHeaderError, tarfile.TruncatedHeaderError)):
        return "unexpected end of data"
    return f"invalid header ({last})"


class StreamEndError(tarfile.ReadError):
    """The compressed data after a tar's end-of-archive marker failed its checks (or could not be
    read to its end); the message is the whole one-line description."""


# Gzip's end checks, as the stdlib words their failures (gzip.BadGzipFile).
_GZIP_END_CHECKS = {"CRC check failed": "the stream's CRC check fails at its end",
                    "Incorrect length of data produced": "the stream's length check fails at its end"}
_MAY_BE_CORRUPT = "samples read from this shard may hold corrupted bytes"


def end_failure(compression: str, exc: BaseException) -> str:
    """One line for a decompressor's failure after the tar's end-of-archive marker: a stream's check
    (gzip's CRC32 or length, bz2's CRCs, xz's checks and index) failed, its data is corrupt or cut short."""
    message = one_line(exc) or type(exc).__name__
    if isinstance(exc, EOFError):
        return (f"truncated {compression} data: the stream ends after the tar's end-of-archive marker but "
                f"before its end checks; {_MAY_BE_CORRUPT}")
    check = next((problem for start, problem in _GZIP_END_CHECKS.items() if message.startswith(start)), None)
    if check is not None:
        return f"corrupt {compression} data: {check}; {_MAY_BE_CORRUPT}"
    return (f"corrupt {compression} data at the stream's end, after the tar's end-of-archive marker: "
            f"{message}; {_MAY_BE_CORRUPT}")


def describe_failure(url: str, exc: BaseException, *, done: str | None, reading: str | None,
                     compression: str | None = None) -> str:
    """One-line description of a stream failure, naming where in the tar it happened; ``compression``
    names the shard's compression when ``exc`` may come from its decompressor (not from reading the file)."""
    if isinstance(exc, StreamEndError):
        return one_line(str(exc))
    message = one_line(exc) or type(exc).__name__
    where = f" in member {reading}" if reading else (f" after member {done}" if done else "")
    if isinstance(exc, FileNotFoundError):
        return one_line(f"shard not found: {url}")
    if url.startswith("pipe:") and isinstance(exc, OSError) and (status := re.search(r"exit (-?\d+)", message)):
        # webdataset's Pipe error repeats Popen's arguments; the command and status are what matter.
        return one_line(f"pipe command failed with exit status {status.group(1)}{where}: {url[5:]}")
    if compression is not None and isinstance(exc, EOFError):  # the decompressor's: the file was cut short
        return one_line(f"truncated tar: the {compression} data ends before its end-of-stream marker{where}")
    if compression is not None and (isinstance(exc, (OSError, zlib.error, lzma.LZMAError)) or message.startswith("zlib")):
        return one_line(f"corrupt compressed stream: {compression}: {message}{where}")
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
    """One member of a shard; ``key``/``ext`` are None for members whose name is no sample file's
    (``KEY.EXT``; never a directory). A member so named that is not a regular file (``regular`` False:
    a link, a FIFO, a device) still belongs to its sample, which it makes a ``decode_error``; its
    data is never read and a link is never followed."""

    info: tarfile.TarInfo
    key: str | None
    ext: str | None  # lower case
    regular: bool = True


def split_name(name: str, directory: bool = False) -> tuple[str | None, str | None]:
    """(key, lowercased ext) of a member's name, or (None, None) when it names no sample file. A
    directory never does, whatever its name (``images.2024/``, say): it holds files, it is not one."""
    if directory:
        return None, None
    key, ext = base_plus_ext(name)
    if key is None or not ext:
        return None, None
    return key, ext.lower()


_NOT_REGULAR = {tarfile.SYMTYPE: "a symbolic link", tarfile.LNKTYPE: "a hard link", tarfile.FIFOTYPE: "a FIFO",
                tarfile.CHRTYPE: "a character device", tarfile.BLKTYPE: "a block device"}


def not_regular(name: str, kind: bytes) -> str:
    """Why a member named like a sample's file, of tar type ``kind``, is not one: nothing is read from
    it and no link is followed (a link may point at any file, inside the tar or outside it)."""
    what = _NOT_REGULAR.get(kind) or f"a tar entry of type {kind.decode('latin-1')!r}"
    links = " (links are not followed)" if kind in (tarfile.SYMTYPE, tarfile.LNKTYPE) else ""
    return f"member {name} is {what}, not a regular file{links}"


# What follows a tar's end-of-archive marker in its compressed data: the marker's second zero block
# and the padding to the tar's record (10 KiB by default), or another archive. It is read, in chunks
# that are dropped, up to this much: the checks stored at the end of the compressed data lie beyond it.
MAX_AFTER_END_BYTES = 64 * 2**20
_AFTER_END_CHUNK = 2**16


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
        self.seeking = seeking  # a local plain file read with seeks over the data (for headers only)
        self.done: str | None = None  # last member fully handled
        self.reading: str | None = None  # member whose data is being read right now
        self._header_errors: list[tarfile.HeaderError] = []
        self._tar: tarfile.TarFile | None = None
        self._source: Source | None = None
        self._bytes: TarBytes | None = None  # what tarfile reads (streaming only)
        self._decompressed: IO[bytes] | None = None  # the decompressor's reader (compressed shards only)
        self.compression: str | None = None  # gzip, bz2 or xz: decompressed here (streaming only)
        self._after_marker = 0  # bytes of the decompressed data read past the last end-of-archive marker
        self._end_error: BaseException | None = None  # the decompressor's, raised there: its end checks failed

    @contextlib.contextmanager
    def open(self) -> Iterator[Iterator[TarMember]]:
        tarinfo = _recording_tarinfo(self._header_errors, self._next_header)
        with contextlib.ExitStack() as stack:
            raw = stack.enter_context(open_stream(self.url, self.allow_pipe))
            if self.seeking and plain_file(raw):  # seeks over the data (a compressed file is streamed)
                tar = stack.enter_context(tarfile.open(fileobj=raw, mode="r:", tarinfo=tarinfo))
            else:
                self._bytes = self._tar_bytes(raw, stack)
                tar = stack.enter_context(tarfile.open(fileobj=self._bytes, mode="r:", tarinfo=tarinfo))
            self._tar = tar
            yield self._members(tar)

    def _tar_bytes(self, raw: IO[bytes], stack: contextlib.ExitStack) -> TarBytes:
        """The stream's tar bytes: decompressed here when its first bytes say gzip, bz2 or xz."""
        self._source = Source(raw)
        self.compression = compression_of(self._source.head)
        if self.compression is None:
            return TarBytes(self._source.read)
        self._decompressed = stack.enter_context(DECOMPRESSORS[self.compression](self._source))
        return TarBytes(self._decompressed.read1)

    def _next_header(self, tar: tarfile.TarFile) -> bool:
        """After an all-zero block where a header should be: skip the zero blocks that follow, in large
        chunks, and say whether a valid tar header comes next (tarfile then reads it)."""
        if self._bytes is None:  # a local plain file, read with seeks
            start = tar.fileobj.tell()
            skipped, rest = skip_zero_blocks(tar.fileobj.read)
            tar.fileobj.seek(start + skipped)
        else:
            self._after_marker = 0
            skipped, rest = skip_zero_blocks(self._read_past_marker, self._bytes.take_ahead())
            self._bytes.put_back(skipped, rest)
        try:
            tarfile.TarInfo.frombuf(rest[:BLOCK], tar.encoding, tar.errors)
        except tarfile.HeaderError:
            return False
        return True

    def _read_past_marker(self, size: int) -> bytes:
        """The stream's bytes after an end-of-archive marker. Past a compressed shard's, a failure of
        the decompressor ends them: it is its end checks', told once the tar has ended
        (:meth:`_read_to_stream_end`); and at most :data:`MAX_AFTER_END_BYTES` are read there."""
        try:
            chunk = self._bytes.read_source(size)
        except STREAM_ERRORS as exc:
            if self._decompressed is None or self._source.failed:
                raise
            self._end_error = exc
            return b""
        if self._decompressed is not None:
            self._after_marker += len(chunk)
            if self._after_marker > MAX_AFTER_END_BYTES:
                raise StreamEndError(self._unchecked())
        return chunk

    def _members(self, tar: tarfile.TarFile) -> Iterator[TarMember]:
        while (info := tar.next()) is not None:
            tar.members = []  # streaming: do not accumulate TarInfo objects for huge shards
            key, ext = split_name(info.name, info.isdir())
            yield TarMember(info, key, ext, info.isreg())
            self.done = info.name
        problem = _end_problem(self._header_errors)
        if problem is not None:
            raise tarfile.ReadError(problem)
        if self._decompressed is not None:
            self._read_to_stream_end(self._decompressed)

    def _read_to_stream_end(self, reader: IO[bytes]) -> None:
        """Read the decompressed data after the tar's end-of-archive marker to its end, dropping it, so
        that the decompressor makes the checks stored there: gzip's CRC32 and length of every stream,
        bz2's block and stream CRCs, xz's block checks and index. Without them a byte flipped in the
        compressed data (in a stored deflate block, say) gives wrong samples and no error. (Skipping
        the marker's zero blocks has often read to the end already.)"""
        while self._end_error is None:
            try:
                chunk = reader.read(_AFTER_END_CHUNK)
            except STREAM_ERRORS as exc:
                if self._source is not None and self._source.failed:
                    raise  # reading the file failed, not its checks: described as such
                self._end_error = exc
                break
            if not chunk:
                return
            self._after_marker += len(chunk)
            if self._after_marker > MAX_AFTER_END_BYTES:
                raise StreamEndError(self._unchecked())
        exc = self._end_error
        if isinstance(exc, gzip.BadGzipFile) and str(exc).startswith("Not a gzipped file"):
            return  # bytes after the last stream, whose checks passed: ignored, as gzip -d and bz2/xz do
        raise StreamEndError(end_failure(self.compression or "compressed", exc)) from exc

    def _unchecked(self) -> str:
        return (f"unchecked {self.compression} data: more than {MAX_AFTER_END_BYTES / 2**20:g} MiB follow the "
                f"tar's end-of-archive marker, so the checks at the stream's end are not read; {_MAY_BE_CORRUPT}")

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
        from_decompressor = self._source is not None and not self._source.failed
        return describe_failure(self.url, exc, done=self.done, reading=self.reading,
                                compression=self.compression if from_decompressor else None)
