"""The raw samples of one shard, how many it holds, and which task its samples are for.

:func:`iter_shard_samples` reads a local plain tar — most shards — with the fast header reader
(:mod:`mimicfilter.shards.tar_headers`) and anything else, or whatever that reader hands back, with
:class:`~mimicfilter.shards.tar_stream.TarStream`, so the rows are the same either way.

Nothing here raises for a bad shard during sample iteration: a broken stream becomes exactly one
``shard_error`` row so the caller can account for every sample it could not read.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator

from mimicfilter.shards.decode import DecodeConfig
from mimicfilter.shards.records import RawSample
from mimicfilter.shards.tar_headers import NeedsTarfile, PlainTar
from mimicfilter.shards.tar_stream import STREAM_ERRORS, TarMember, TarStream, not_regular, split_name
from mimicfilter.store.paths import is_url

DEFAULT_MAX_MEMBER_BYTES = 64 * 2**20


def readable_key(name: str) -> str:
    """A key as text every table can hold: tar names that are not UTF-8 come with their bytes escaped
    (``\\xff``), the rest unchanged."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


class _Samples:
    """Members → samples: consecutive members sharing a key form a sample, which is complete only
    once the key changes (the shard's last sample is yielded by its reader, after a clean end)."""

    def __init__(self, url: str, limit: int):
        self.url = url
        self.limit = limit
        self.pending: RawSample | None = None  # the sample being assembled
        self._name: str | None = None  # its key as tar read it (escaped in ``pending`` when not UTF-8)
        self.next_index = 0
        self._seen_exts: set[str] = set()  # extensions of the pending sample, including unread too-large ones

    def begin(self, key: str) -> RawSample | None:
        """A member of sample ``key`` is next: returns the sample this completes (when the key changes)."""
        if self.pending is not None and key == self._name:
            return None
        done = self.pending
        if done is not None:
            self.next_index += 1
        self._name, self._seen_exts = key, set()
        self.pending = RawSample(self.url, readable_key(key), self.next_index)
        if self.pending.key != key:  # a name tar read as bytes that are not UTF-8: a row, not a crash at the write
            self.pending.mark("decode_error", f"member name {self.pending.key} is not valid UTF-8")
        return done

    def add(self, ext: str, name: str, size: int, read: Callable[[], bytes]) -> None:
        """Add one file to the pending sample; skipped data is never read."""
        if not self._first(ext):
            return
        if size > self.limit:  # left unread: the reader skips the data when it moves to the next header
            self.pending.mark("too_large", f"member {name} is {size} bytes, over the {self.limit}-byte limit")
            return
        self.pending.files[ext] = read()

    def add_not_regular(self, ext: str, name: str, kind: bytes) -> None:
        """A member named like one of the sample's files that is a link, FIFO or device
        (tar type ``kind``): the sample is a decode_error naming it, not one without that file.
        Nothing is read from it and no link is followed."""
        if self._first(ext):
            self.pending.mark("decode_error", not_regular(name, kind))

    def _first(self, ext: str) -> bool:
        """Whether ``ext`` is new to the pending sample (a second member with it is a decode_error)."""
        if ext in self._seen_exts:
            self.pending.mark("decode_error", f"duplicate member {self.pending.key}.{ext}")
            return False
        self._seen_exts.add(ext)
        return True

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
    is read by :class:`~mimicfilter.shards.tar_headers.PlainTar`; whatever it leaves to tarfile
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
                key, ext = split_name(header.name, header.directory)
                if key is None:
                    continue
                if (done := samples.begin(key)) is not None:
                    yield done
                if header.regular:
                    samples.add(ext, header.name, header.size, tar.read)
                else:
                    samples.add_not_regular(ext, header.name, bytes((header.kind,)))
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
                    continue  # directories and names without an extension belong to no sample
                if (done := samples.begin(member.key)) is not None:
                    try:
                        yield done
                    except GeneratorExit:
                        abandoned = True
                        raise
                if member.regular:
                    samples.add(member.ext, member.info.name, member.info.size, reader(member))
                else:
                    samples.add_not_regular(member.ext, member.info.name, member.info.type)
    except STREAM_ERRORS as exc:
        if not abandoned:  # (e.g. a pipe's SIGPIPE exit status after the consumer stopped reading)
            yield samples.failed(stream.describe(exc))
        return
    if samples.pending is not None:
        yield samples.pending


def count_shard_samples(url: str, *, allow_pipe: bool = False) -> int:
    """How many samples a shard holds (consecutive members sharing a key), reading headers only.

    A local plain tar is read header by header, seeking over the data (:class:`PlainTar`, or
    tarfile for what it leaves); anything else goes through tarfile, streamed (a compressed file, a
    URL, ``pipe:``). Archives appended after the end-of-archive marker (``cat a.tar b.tar``) are
    counted, as scoring reads them. A shard that cannot be read to its end counts the samples
    before the failure (scoring then reports the failure as a ``shard_error`` row). The checks at
    the end of a compressed shard's data, after the tar's end-of-archive marker, cannot change the
    count: a failed one takes the last sample's row.
    """
    local = not (is_url(url) or url.startswith("pipe:"))
    if local:
        try:
            with PlainTar.open(url) as tar:
                return _count_keys(split_name(header.name, header.directory)[0] for header in tar.headers())
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


def detect_task(shards: tuple[str, ...], decode: DecodeConfig, allow_pipe: bool, sample_limit: int = 16) -> str:
    """``classify`` when the first readable samples carry a label and no caption, else ``contrastive``."""
    text_ext = "json" if decode.json_field else decode.text_key.lower()
    for shard in shards[:2]:
        for raw in itertools.islice(iter_shard_samples(shard, allow_pipe=allow_pipe), sample_limit):
            if raw.status == "ok" and raw.files:
                has_label, has_text = decode.label_key in raw.files, text_ext in raw.files
                return "classify" if has_label and not has_text else "contrastive"
    return "contrastive"
