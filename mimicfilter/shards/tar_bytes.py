"""A streamed shard's bytes as :class:`~mimicfilter.shards.tar_stream.TarStream` hands them to tarfile.

The shard's first bytes tell its compression (as tarfile's ``r|*`` tells it) and are put back
(:class:`Source`, which also remembers a failed read, so that a decompressor's error is told from
an I/O error); a compressed shard is decompressed by the stdlib's file readers. tarfile reads the
result through :class:`TarBytes` rather than its own stream: forward only, never more than it asks
for, with the bytes read ahead past an end-of-archive marker (to skip its zero blocks, a megabyte at
a time, and find whether another archive follows) put back in front.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import tarfile
from collections.abc import Callable
from typing import IO

from mimicfilter.shards.tar_headers import ZERO_CHUNK

# tarfile's "r|*" tells compression by these leading bytes (tarfile._StreamProxy); the shard is then
# decompressed here, by the stdlib's file readers, which (unlike tarfile's stream) raise EOFError when
# the compressed data ends before its end-of-stream marker: a cut .tar.bz2 is not an "empty file".
HEAD_BYTES = 10
DECOMPRESSORS = {"gzip": lambda source: gzip.GzipFile(fileobj=source, mode="rb"), "bz2": bz2.BZ2File,
                 "xz": lzma.LZMAFile}


def compression_of(head: bytes) -> str | None:
    """``gzip``, ``bz2`` or ``xz`` (also legacy .lzma) by a stream's first bytes, as tarfile's "r|*" tells them; else None."""
    if head.startswith(b"\x1f\x8b\x08"):
        return "gzip"
    if head[0:3] == b"BZh" and head[4:10] == b"1AY&SY":
        return "bz2"
    if head.startswith((b"\x5d\x00\x00\x80", b"\xfd7zXZ")):
        return "xz"
    return None


def plain_file(raw: IO[bytes]) -> bool:
    """Whether a local file's first bytes say no compression (it is then read with seeks)."""
    head = raw.read(HEAD_BYTES)
    raw.seek(0)
    return compression_of(head) is None


class Source:
    """A shard's byte stream with its first bytes (read to tell its compression) put back; it
    remembers a failed read, so that a decompressor's error is told apart from an I/O error."""

    def __init__(self, raw: IO[bytes]):
        self._raw = raw
        self.failed = False
        head = b""
        while len(head) < HEAD_BYTES and (more := self._read(HEAD_BYTES - len(head))):
            head += more
        self.head = self._unread = head

    def _read(self, size: int) -> bytes:
        try:
            return self._raw.read(size)
        except BaseException:
            self.failed = True
            raise

    def read(self, size: int = -1) -> bytes:
        if not self._unread:
            return self._read(size)
        head, self._unread = self._unread, b""
        if size is None or size < 0:
            return head + self._read(-1)
        if size < len(head):
            head, self._unread = head[:size], head[size:]
        return head


class TarBytes:
    """A shard's tar bytes as tarfile reads them, in place of its own stream (``r|``): read forward
    only (tarfile's member data by seeks forward), never more than tarfile asks for, with the bytes
    read ahead past an end-of-archive marker (to skip its zero blocks) put back in front.

    ``read_source`` is the shard's own reader, or its decompressor's ``read1``: a decompressing
    reader is read one step at a time, as its buffered ``read(n)`` loops until it has ``n`` bytes and,
    when the data ends part way, drops what it had decompressed — and with it the last samples
    before the cut."""

    def __init__(self, read_source: Callable[[int], bytes]):
        self.read_source = read_source
        self._ahead = b""  # read from the source, not yet given to tarfile
        self._position = 0

    def read(self, size: int = -1) -> bytes:
        whole = size is None or size < 0  # (tarfile always gives a size)
        size = 1 << 62 if whole else size
        parts, have = [], 0
        if self._ahead:
            parts.append(self._ahead[:size])
            self._ahead, have = self._ahead[size:], len(parts[0])
        while have < size and (chunk := self.read_source(ZERO_CHUNK if whole else size - have)):
            parts.append(chunk)
            have += len(chunk)
        self._position += have
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def tell(self) -> int:
        return self._position

    def seek(self, position: int) -> int:
        if position < self._position:
            raise tarfile.StreamError("seeking backwards is not allowed")
        while self._position < position and self.read(min(position - self._position, ZERO_CHUNK)):
            pass
        return self._position

    def take_ahead(self) -> bytes:
        """The bytes read ahead (given back by :meth:`put_back`)."""
        ahead, self._ahead = self._ahead, b""
        return ahead

    def put_back(self, skipped: int, rest: bytes) -> None:
        """``skipped`` bytes were read ahead and dropped, then ``rest``: tarfile reads ``rest`` next."""
        self._position += skipped
        self._ahead = rest
