"""Local uncompressed tars read straight from their 512-byte headers, as tarfile would read them.

Almost every WebDataset shard is a plain POSIX or GNU tar with short ASCII names. Reading those
through :mod:`tarfile` costs ~0.12 ms a sample of two files, mostly Python bookkeeping (a TarInfo
and a file object per member): a tenth of the fast decoder's whole time per sample. :class:`PlainTar`
parses each header with tarfile's own rules (checksum, number fields, name and prefix, which
types carry data) and reads each member's data with one positional read: ~0.03 ms a sample.

Pax extended headers that carry only timestamps are read too: webdataset's ``TarWriter`` (and so
img2dataset) writes one before every member, for its fractional mtime. It reads only what it is
sure tarfile reads the same way. Anything else — a compressed file, other pax records (paths,
sizes), global pax or GNU long-name headers, sparse or unknown member types, base-256 numbers, a
header that fails a check, data or headers cut short — raises :class:`NeedsTarfile`, and the caller reads the shard
with tarfile instead (:func:`mimicfilter.shards.samples.iter_shard_samples` then skips the samples
it already gave). So a broken shard's status rows and messages stay tarfile's, exactly.

An archive appended after the end-of-archive marker (``cat a.tar b.tar``) is read on, as GNU ``tar
--ignore-zeros`` and :class:`~mimicfilter.shards.tar_stream.TarStream` read it: the zero blocks are
skipped a megabyte at a time (:func:`skip_zero_blocks`), and the block after them is the next header.
"""

from __future__ import annotations

import os
import re
import stat
import zlib
from collections.abc import Callable, Iterator
from typing import NamedTuple

BLOCK = 512
_ZERO_BLOCK = bytes(BLOCK)
_DIRECTORY = ord("5")
_REGULAR = frozenset(b"07\0")  # tarfile.REGULAR_TYPES less the sparse "S" (which needs tarfile)
_NO_DATA = frozenset(b"123456")  # links, devices, directories, FIFOs: tarfile skips no data for them
_PAX = ord("x")  # a pax extended header (webdataset's TarWriter writes one per member for its float mtime)
MAX_EXTENDED_BYTES = 1 << 16
# The only pax records read here: timestamps, which change nothing this reader gives. Anything else
# (a path, a size, a charset, sparse maps) is tarfile's to read.
_TIMESTAMP_RECORD = re.compile(rb"(\d+) [acm]time=-?\d+(?:\.\d+)?\n")
# Leading bytes that make tarfile's "r|*" (or "r:*") try a decompressor: gzip, bzip2, xz/lzma, zstd.
_COMPRESSED = (b"\x1f\x8b", b"BZh", b"\x5d\x00\x00", b"\xfd7zXZ", b"\x28\xb5\x2f\xfd")
# Zero blocks after an end-of-archive marker are read this much at a time: a tar padded to a 1 MiB
# record (``tar -b 2048``) is one read, and the usual 10 KiB record's padding one short read.
ZERO_CHUNK = 1 << 20
_NUMBER_FIELDS = ((100, 108), (108, 116), (116, 124), (136, 148), (329, 337), (337, 345))  # size: parsed below


class NeedsTarfile(Exception):
    """The file holds something only tarfile reads, or reads differently: read it with tarfile."""


class PlainHeader(NamedTuple):
    """A header as tarfile would read it: the member's full name, its type flag and its data's size."""

    name: str
    kind: int  # the type flag's byte
    size: int

    @property
    def regular(self) -> bool:
        return self.kind in _REGULAR

    @property
    def directory(self) -> bool:
        return self.kind == _DIRECTORY

    @property
    def extended(self) -> bool:
        """A pax extended header: its data describes the next member."""
        return self.kind == _PAX

    @property
    def stored_bytes(self) -> int:
        """How far tarfile moves past the header: the data of regular members and extended headers,
        rounded up to a block."""
        return (self.size + BLOCK - 1) // BLOCK * BLOCK if self.regular or self.extended else 0


def _text(field: bytes) -> str:
    """tarfile's ``nts`` with its default encoding on this platform (UTF-8, surrogateescape)."""
    return field.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def _octal(field: bytes) -> int:
    """tarfile's ``nti`` for ASCII octal numbers; base-256 or malformed numbers need tarfile."""
    if field[0] in (0o200, 0o377):
        raise NeedsTarfile("base-256 number")
    digits = field.split(b"\0", 1)[0]
    try:
        return int(digits.decode("ascii").strip() or "0", 8)
    except ValueError:
        raise NeedsTarfile("malformed number field") from None


def _checksum_holds(block: bytes, stored: int) -> bool:
    """tarfile's unsigned checksum: the bytes' sum with the checksum field read as spaces. zlib's
    adler32 sums them in C, modulo 65521; the sum is below that (so exact) when few bytes are set."""
    field = block[148:156]
    if ((zlib.adler32(block) & 0xFFFF) - 1 - sum(field) + 256) % 65521 != stored % 65521:
        return False
    if 255 * (BLOCK - block.count(0) + 8) < 65521:  # the field's 8 spaces included
        return True
    return sum(block) - sum(field) + 256 == stored


_OCTAL_OR_NUL = b"01234567\0"


def _numbers_surely_parse(block: bytes) -> bool:
    """A quick sufficient test that tarfile parses every number field: nothing but octal digits
    and NULs (spaces and the rest are left to the exact test, field by field)."""
    return not (block[100:148].translate(None, _OCTAL_OR_NUL) or block[329:345].translate(None, _OCTAL_OR_NUL))


def parse_header(block: bytes) -> PlainHeader | None:
    """A 512-byte header block → its member, None for the end-of-archive (all-zero) block; raises
    :class:`NeedsTarfile` for whatever tarfile would read differently or reject."""
    if len(block) != BLOCK:
        raise NeedsTarfile("short header")
    if block == _ZERO_BLOCK:
        return None
    if not _checksum_holds(block, _octal(block[148:156])):  # tarfile also accepts old Sun/NeXT
        raise NeedsTarfile("checksum")  # tars' signed-char sum: let it decide
    if not _numbers_surely_parse(block):
        for start, end in _NUMBER_FIELDS:  # tarfile rejects the header when any of these does not parse
            _octal(block[start:end])
    kind = block[156]
    size = _octal(block[124:136])
    name = _text(block[0:100])
    if kind == 0 and name.endswith("/"):  # an old-style directory (tarfile makes it a DIRTYPE)
        kind = _DIRECTORY
    if kind not in _REGULAR and kind not in _NO_DATA and kind != _PAX:
        raise NeedsTarfile(f"member type {chr(kind)!r}")  # global pax, GNU long names, sparse, unknown types
    if kind == _DIRECTORY:
        name = name.rstrip("/")
    prefix = _text(block[345:500])
    if prefix:  # tarfile joins a ustar prefix, whatever the header's magic says
        name = prefix + "/" + name
    return PlainHeader(name, kind, size)


def _zero_blocks_at_front(data: bytes) -> int:
    """How many whole all-zero blocks ``data`` starts with: compared a half at a time (memcmp), not
    byte by byte in Python."""
    low, high = 0, len(data) // BLOCK  # data[:low blocks] is all zero; data[:high blocks] is not, once checked
    if data[:high * BLOCK] == bytes(high * BLOCK):
        return high
    while high - low > 1:
        middle = (low + high) // 2
        if data[low * BLOCK:middle * BLOCK] == bytes((middle - low) * BLOCK):
            low = middle
        else:
            high = middle
    return low


def skip_zero_blocks(read: Callable[[int], bytes], ahead: bytes = b"") -> tuple[int, bytes]:
    """Skip the all-zero blocks that follow a tar's end-of-archive marker, as GNU ``tar
    --ignore-zeros`` does: ``ahead`` (bytes already read there), then what ``read(size)`` gives
    (``b""`` at the end of the data), in chunks of :data:`ZERO_CHUNK`. Returns how many bytes the
    skipped blocks hold and the bytes read past them: a whole block that is not all zero (the header
    of an archive appended to this one, or something else) and whatever was read after it, or fewer
    than a block's bytes where the data ends."""
    skipped = 0
    while True:
        zeros = _zero_blocks_at_front(ahead) * BLOCK
        skipped, ahead = skipped + zeros, ahead[zeros:]
        if len(ahead) >= BLOCK:
            return skipped, ahead
        more = read(ZERO_CHUNK)
        if not more:
            return skipped, ahead
        ahead += more


def timestamps_only(data: bytes, size: int) -> bool:
    """Whether a pax extended header's data (``size`` bytes of records, then the block's NUL
    padding, as tarfile reads it) holds nothing but well-formed atime/ctime/mtime records."""
    position = 0
    while position < size:
        match = _TIMESTAMP_RECORD.match(data, position, size)
        if match is None or int(match.group(1)) != match.end() - position:
            return False
        position = match.end()
    return not data[size:].strip(b"\0")


class PlainTar:
    """One local plain tar read member by member: ``headers()`` yields each member's header, and
    ``read()`` returns its data when asked before the next header (else it is never read). Reads
    are positional (``os.pread``): one system call per header and one per member's data."""

    def __init__(self, descriptor: int):
        self._descriptor = descriptor
        self._data_at = 0  # where the current member's data starts
        self._unread_data = 0  # its size while the caller may still read it

    @classmethod
    def open(cls, path: str) -> PlainTar:
        try:
            if not stat.S_ISREG(os.stat(path).st_mode):  # a FIFO's bytes cannot be read twice
                raise NeedsTarfile("not a regular file")
            return cls(os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0)))
        except OSError as exc:
            raise NeedsTarfile(f"cannot open: {exc}") from None

    def close(self) -> None:
        os.close(self._descriptor)

    def __enter__(self) -> PlainTar:
        return self

    def __exit__(self, *_exc) -> None:
        self.close()

    def headers(self) -> Iterator[PlainHeader]:
        """The members' headers (pax extended headers read, not given)."""
        offset, extended = 0, False
        while True:
            block = os.pread(self._descriptor, BLOCK, offset)
            if offset == 0 and block.startswith(_COMPRESSED):
                raise NeedsTarfile("may be compressed")
            header = parse_header(block)  # past the end (data cut short, skipped): a short header
            if extended and (header is None or header.extended):
                raise NeedsTarfile("an extended header not followed by a member")
            if header is None:  # an end-of-archive marker: an archive may follow (``cat a.tar b.tar``)
                offset = self._after_zero_blocks(offset)
                if offset is None:
                    return
                continue
            data_at, offset = offset + BLOCK, offset + BLOCK + header.stored_bytes
            extended = header.extended
            if extended:
                if header.size > MAX_EXTENDED_BYTES:
                    raise NeedsTarfile("a large extended header")
                records = os.pread(self._descriptor, header.stored_bytes, data_at)
                if len(records) != header.stored_bytes or not timestamps_only(records, header.size):
                    raise NeedsTarfile("an extended header with more than timestamps")
                continue
            self._data_at, self._unread_data = data_at, header.size if header.regular else 0
            yield header

    def _after_zero_blocks(self, offset: int) -> int | None:
        """Where the block after the zero blocks from ``offset`` (an all-zero block) lies, or None when the
        file ends first, or less than a block follows them (tarfile stops there too). Whatever that block
        is, it is read as the next header: one that fails a check is tarfile's (garbage after the end
        is no archive to it, and then no error)."""
        at = offset + BLOCK

        def read(size: int) -> bytes:
            nonlocal at
            chunk = os.pread(self._descriptor, size, at)
            at += len(chunk)
            return chunk

        skipped, rest = skip_zero_blocks(read)
        return offset + BLOCK + skipped if len(rest) >= BLOCK else None

    def read(self) -> bytes:
        """The current member's data (once)."""
        size, self._unread_data = self._unread_data, 0
        data = os.pread(self._descriptor, size, self._data_at)
        if len(data) != size:
            raise NeedsTarfile("data cut short")
        return data
