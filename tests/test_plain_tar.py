"""The plain-tar reader gives exactly the rows tarfile gives, on good tars and on broken ones."""

from __future__ import annotations

import gzip
import io
import random
import tarfile
from pathlib import Path

import pytest
from helpers import image_text_samples, write_tar

from mimicfilter.shards.tar_headers import NeedsTarfile, PlainTar, parse_header
from mimicfilter.shards.samples import _tarfile_samples, count_shard_samples, iter_shard_samples


def rows(samples) -> list[tuple]:
    return [(s.shard, s.key, s.index, dict(s.files), s.status, s.error) for s in samples]


def same_as_tarfile(path, limit: int = 64 * 2**20) -> list[tuple]:
    ours = rows(iter_shard_samples(str(path), max_member_bytes=limit))
    assert ours == rows(_tarfile_samples(str(path), False, limit))
    return ours


def read_plainly(path) -> bool:
    """Whether the plain reader reads the whole file (no fall back to tarfile)."""
    try:
        with PlainTar.open(str(path)) as tar:
            for header in tar.headers():
                if header.regular:
                    tar.read()
        return True
    except NeedsTarfile:
        return False


def webdataset_tar(path, count: int = 4):
    """As webdataset's TarWriter (img2dataset, DataComp) writes shards: a pax header with a
    fractional mtime before every member."""
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for key, files in image_text_samples(count):
            for ext, data in files.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime = len(data), 1796022512.5130124 + len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def odd_tar(path, form=tarfile.USTAR_FORMAT):
    """Directories, links, a prefixed long name, duplicates, an extension-less file, upper case."""
    with tarfile.open(path, "w", format=form) as tar:
        def add(name, data=b"", kind=tarfile.REGTYPE):
            info = tarfile.TarInfo(name)
            info.type, info.size, info.mtime = kind, len(data), 0
            tar.addfile(info, io.BytesIO(data) if data else None)

        add("dir/", kind=tarfile.DIRTYPE)
        add("a.jpg", b"jpeg bytes")
        add("a.TXT", b"caption")
        add("a.txt", b"again")  # a duplicate extension
        add("README", b"no extension")
        add("link.jpg", kind=tarfile.SYMTYPE)
        add("b.jpg", b"x" * 3000)  # over the limit below
        add("b.txt", b"b")
        add("deep/" * 20 + "c.jpg", b"c")  # over 100 characters: a ustar prefix
        add("d.tar.gz", b"d")
    return path


def test_plain_tars_are_read_without_tarfile_and_agree(tmp_path):
    good = write_tar(tmp_path / "good.tar", image_text_samples(6))
    assert read_plainly(good)
    assert [row[4] for row in same_as_tarfile(good)] == ["ok"] * 6
    odd = odd_tar(tmp_path / "odd.tar")
    assert read_plainly(odd)
    table = same_as_tarfile(odd, limit=1000)
    assert [(key, status) for _, key, _, _, status, _ in table] == [
        ("a", "decode_error"), ("link", "decode_error"), ("b", "too_large"), ("deep/" * 19 + "deep/c", "ok"), ("d", "ok")]
    assert table[1][5] == "member link.jpg is a symbolic link, not a regular file (links are not followed)"
    shard = webdataset_tar(tmp_path / "webdataset.tar")
    assert read_plainly(shard) and b"mtime=" in shard.read_bytes()
    assert [row[4] for row in same_as_tarfile(shard)] == ["ok"] * 4
    gnu = odd_tar(tmp_path / "gnu.tar", tarfile.GNU_FORMAT)  # long names as GNU "L" members: tarfile's
    pax = odd_tar(tmp_path / "pax.tar", tarfile.PAX_FORMAT)
    assert not read_plainly(gnu) and not read_plainly(pax)
    assert [row[1:] for row in same_as_tarfile(gnu, limit=1000)] == [row[1:] for row in same_as_tarfile(pax, limit=1000)]
    assert same_as_tarfile(write_tar(tmp_path / "empty.tar", [])) == []


@pytest.mark.parametrize("seed", range(3))
def test_broken_tars_give_tarfiles_rows(tmp_path, seed):
    """Cut anywhere, or with bytes changed anywhere: the rows (and messages) are tarfile's."""
    good = write_tar(tmp_path / "good.tar", image_text_samples(4)).read_bytes()
    odd = odd_tar(tmp_path / "odd.tar").read_bytes()
    pax = webdataset_tar(tmp_path / "webdataset.tar").read_bytes()
    rng = random.Random(seed)
    path = tmp_path / "broken.tar"
    for source in (good, odd, pax):
        for cut in sorted(rng.sample(range(len(source)), 40)) + [0, 511, 512, 1024]:
            path.write_bytes(source[:cut])
            same_as_tarfile(path, limit=1000)
        for _ in range(60):
            data = bytearray(source)
            for _ in range(rng.choice((1, 3))):
                data[rng.randrange(len(data) // 2)] = rng.randrange(256)  # headers lie in the first half too
            path.write_bytes(bytes(data))
            same_as_tarfile(path, limit=1000)


@pytest.mark.parametrize("records", [
    b"30 path=a-longer-name-000.jpg\n",  # a path: tarfile's to apply
    b"12 size=999\n",
    b"27 mtime=1796022512.51301\n",  # a length that does not match the record
    b"28 mtime=1796022512.513012\n" + b"\x01",  # something after the records
])
def test_extended_headers_beyond_timestamps_are_tarfiles(tmp_path, records):
    from mimicfilter.shards.tar_headers import timestamps_only

    assert timestamps_only(b"28 mtime=1796022512.5130124\n" + bytes(484), 28)
    padded = records + bytes(-len(records) % 512)
    assert not timestamps_only(padded, len(records.rstrip(b"\x01")))
    shard = bytearray(webdataset_tar(tmp_path / "webdataset.tar").read_bytes())
    with tarfile.open(tmp_path / "webdataset.tar") as tar:
        offset = [member.offset for member in tar][3]  # sample 1's first member: its pax header
    header = bytearray(shard[offset:offset + 512])
    header[124:136] = b"%011o\0" % len(records.rstrip(b"\x01"))
    shard[offset:offset + 1024] = with_checksum(header) + padded
    path = tmp_path / "changed.tar"
    path.write_bytes(bytes(shard))
    assert not read_plainly(path)
    same_as_tarfile(path)


def test_an_extended_header_at_the_end_is_a_broken_tar(tmp_path):
    shard = webdataset_tar(tmp_path / "webdataset.tar").read_bytes()
    with tarfile.open(tmp_path / "webdataset.tar") as tar:
        offset = [member.offset for member in tar][3]  # sample 1's first member: its pax header
    for tail in (bytes(1024), shard[offset:offset + 1024] * 2 + shard[offset + 1024:]):
        (tmp_path / "cut.tar").write_bytes(shard[:offset + 1024] + tail)
        table = same_as_tarfile(tmp_path / "cut.tar")
        assert [status for *_, status, _ in table] == (["shard_error"] if len(tail) == 1024 else ["ok"] * 4)


def test_what_the_plain_reader_leaves_to_tarfile(tmp_path):
    import gzip

    good = write_tar(tmp_path / "good.tar", image_text_samples(3))
    packed = tmp_path / "good.tar.gz"
    packed.write_bytes(gzip.compress(good.read_bytes()))
    assert not read_plainly(packed)
    assert [row[1:] for row in same_as_tarfile(packed)] == [row[1:] for row in same_as_tarfile(good)]
    assert not read_plainly(tmp_path / "missing.tar")
    assert same_as_tarfile(tmp_path / "missing.tar")[0][4] == "shard_error"
    header = bytearray(good.read_bytes()[:512])
    header[124:136] = b"\x80" + bytes(10) + b"\x05"  # a base-256 size
    with pytest.raises(NeedsTarfile):
        parse_header(bytes(header))
    assert parse_header(bytes(512)) is None  # the end-of-archive block


def with_checksum(header: bytearray) -> bytearray:
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header)
    return header


def test_the_checksum_of_a_header_with_many_high_bytes(tmp_path):
    """Sums of 65,521 and more are checked exactly (zlib's adler32 sums modulo 65,521)."""
    from mimicfilter.shards.tar_headers import _checksum_holds

    data = bytearray(write_tar(tmp_path / "good.tar", image_text_samples(2)).read_bytes())
    header = bytearray(data[:512])
    for start, end in ((157, 257), (265, 297), (297, 329), (345, 512)):  # link name, owner, group, prefix
        header[start:end] = b"\xff" * (end - start)
    total = 256 + sum(header[:148]) + sum(header[156:])
    assert total > 65521 and _checksum_holds(bytes(header), total)
    assert not _checksum_holds(bytes(header), total - 65521)
    for stored in (total, total - 65521):
        header[148:156] = b"%06o\0 " % stored
        data[:512] = header
        (tmp_path / "high.tar").write_bytes(bytes(data))
        # read, the member's name (its prefix of 0xff bytes) is not UTF-8: a decode_error row, as from tarfile
        assert same_as_tarfile(tmp_path / "high.tar")[0][4] == ("decode_error" if stored == total else "shard_error")


@pytest.mark.parametrize("field", [(100, 108), (108, 116), (116, 124), (124, 136), (136, 148), (329, 337), (337, 345)])
def test_a_header_tarfile_rejects_despite_its_checksum(tmp_path, field):
    """A number field that is not octal fails tarfile's header even with a right checksum."""
    data = bytearray(write_tar(tmp_path / "good.tar", image_text_samples(3)).read_bytes())
    with tarfile.open(tmp_path / "good.tar") as tar:
        offset = [member.offset for member in tar][4]  # sample 1's second member
    header = bytearray(data[offset:offset + 512])
    header[field[0]:field[1]] = b"9z" + bytes(field[1] - field[0] - 2)
    data[offset:offset + 512] = with_checksum(header)
    path = tmp_path / "bad.tar"
    path.write_bytes(bytes(data))
    table = same_as_tarfile(path)
    assert [status for *_, status, _ in table] == ["ok", "shard_error"] and "invalid header" in table[-1][5]


def test_a_consumer_that_stops_early_closes_the_file(tmp_path):
    path = write_tar(tmp_path / "good.tar", image_text_samples(5))
    samples = iter_shard_samples(str(path))
    assert next(samples).key == "00000000"
    samples.close()  # no error, nothing more
    assert count_shard_samples(str(path)) == 5


def test_a_fifo_is_read_once_by_tarfile(tmp_path):
    import os
    import threading

    good = write_tar(tmp_path / "good.tar", image_text_samples(3))
    fifo = tmp_path / "shard.tar"
    os.mkfifo(fifo)
    writer = threading.Thread(target=lambda: fifo.write_bytes(good.read_bytes()), daemon=True)
    writer.start()
    assert [row[1:] for row in rows(iter_shard_samples(str(fifo)))] == [row[1:] for row in same_as_tarfile(good)]
    writer.join(timeout=10)


def appended(tmp_path, *tails: bytes) -> tuple[Path, list[tuple]]:
    """a.tar with ``tails`` after it, and a's rows (the shard's name left out)."""
    a = write_tar(tmp_path / "a.tar", image_text_samples(3))
    good = [row[1:] for row in same_as_tarfile(a)]
    path = tmp_path / "joined.tar"
    path.write_bytes(a.read_bytes() + b"".join(tails))
    return path, good


def every_reader(path) -> list[tuple]:
    """The rows of the fast reader, which tarfile, a pipe and the sample count agree with."""
    table = [row[1:] for row in same_as_tarfile(path)]
    assert [row[1:] for row in rows(iter_shard_samples(f"pipe:cat {path}", allow_pipe=True))] == table
    assert count_shard_samples(str(path)) == count_shard_samples(f"pipe:cat {path}", allow_pipe=True) == len(table)
    return table


def test_after_the_end_marker_only_a_valid_header_starts_another_archive(tmp_path):
    """Zero padding, or anything that is no tar header, after the end-of-archive marker ends the shard
    cleanly, as it always did (it is never read as samples); an archive appended after it is read on."""
    b = write_tar(tmp_path / "b.tar", image_text_samples(2, start=3)).read_bytes()
    b_rows = [row[1:] for row in same_as_tarfile(tmp_path / "b.tar")]
    b_rows = [(key, 3 + index, *rest) for key, index, *rest in b_rows]
    noise = random.Random(0).randbytes(2048)
    tails = {"zeros": bytes(5000), "a 1 MiB record's zeros": bytes(1 << 20), "a line": b"hello world\n",
             "random bytes": noise, "zero blocks, then random bytes": bytes(1024) + noise[:700],
             "less than a block": b"\x01" * 100, "a gzip stream": gzip.compress(b)}
    for name, tail in tails.items():
        path, good = appended(tmp_path, tail)
        assert every_reader(path) == good, name
        path, good = appended(tmp_path, b, tail)
        assert every_reader(path) == good + b_rows, name
    path, good = appended(tmp_path, bytes(5000))
    assert read_plainly(path)  # no fall back to tarfile for the padding


def test_a_tar_padded_to_a_1_mib_record_then_another_archive_is_read_a_megabyte_at_a_time(tmp_path, monkeypatch):
    """`tar -b 2048` pads to a 1 MiB record: its zero blocks are skipped in one or two reads, not one
    read (of a block) each."""
    a = write_tar(tmp_path / "a.tar", image_text_samples(3)).read_bytes()
    b = write_tar(tmp_path / "b.tar", image_text_samples(2, start=3)).read_bytes()
    path = tmp_path / "padded.tar"
    path.write_bytes(a + bytes(-len(a) % (1 << 20)) + b + bytes(1 << 20))
    assert read_plainly(path)
    assert [(key, index, status) for key, index, _, status, _ in every_reader(path)] == [
        (f"{i:08d}", i, "ok") for i in range(5)]
    import os

    from mimicfilter.shards import tar_headers

    reads, pread = [], os.pread
    monkeypatch.setattr(tar_headers.os, "pread", lambda *args: reads.append(args[1]) or pread(*args))
    assert count_shard_samples(str(path)) == 5
    # 15 headers and 2 end-of-archive markers, then the zero blocks after each marker in a few 1 MiB reads
    assert reads.count(512) == 15 + 2 and len(reads) <= 15 + 2 + 6 and max(reads) == tar_headers.ZERO_CHUNK


def test_zero_blocks_are_skipped_in_large_chunks():
    from mimicfilter.shards.tar_headers import ZERO_CHUNK, skip_zero_blocks

    data = io.BytesIO(bytes(3 * ZERO_CHUNK + 1024) + b"\x01" * 1000 + bytes(5000))
    sizes = []

    def read(size):
        sizes.append(size)
        return data.read(size)

    assert skip_zero_blocks(read, bytes(100)) == (3 * ZERO_CHUNK + 1024, (bytes(100) + data.getvalue())[3 * ZERO_CHUNK + 1024:4 * ZERO_CHUNK + 100])
    assert sizes == [ZERO_CHUNK] * 4
    assert skip_zero_blocks(io.BytesIO(bytes(700)).read) == (512, bytes(188))  # the data ends first
    assert skip_zero_blocks(io.BytesIO(bytes(512) + b"\x01" + bytes(600)).read) == (512, b"\x01" + bytes(600))
