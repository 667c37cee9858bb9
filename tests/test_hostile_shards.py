"""Hostile shards `score` must answer with a precise row: members that are links, FIFOs, devices or
directories where a sample's file should be (1); PNG decompression bombs (2); compressed shards cut
short or failing the checks at the end of their compressed data (3); shards of archives joined by
`cat a.tar b.tar`, read to their end (4)."""

import bz2
import gzip
import io
import lzma
import random
import struct
import tarfile
import zlib

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from helpers import image_bytes, image_text_samples, score_row, write_score_run, write_tar

from mimicfilter.shards.samples import _tarfile_samples, count_shard_samples, iter_shard_samples
from mimicfilter_cli.main import cli


def invoke(*args):
    return CliRunner().invoke(cli, [str(arg) for arg in args], catch_exceptions=False)


@pytest.fixture
def models(tiny_config, reference_checkpoint):
    return ["--model", tiny_config, "--reference", reference_checkpoint]


def rows(samples) -> list[tuple]:
    return [(s.key, s.index, dict(s.files), s.status, s.error) for s in samples]


def add(tar: tarfile.TarFile, name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE, linkname: str = "") -> None:
    """One tar entry; links, FIFOs and devices are only headers (nothing is made on disk)."""
    info = tarfile.TarInfo(name)
    info.type, info.size, info.mtime, info.linkname = kind, len(data), 0, linkname
    tar.addfile(info, io.BytesIO(data) if data else None)


# 1 ----------------------------------------------------------------------------------------------

NOT_REGULAR = {
    tarfile.SYMTYPE: "a symbolic link, not a regular file (links are not followed)",
    tarfile.LNKTYPE: "a hard link, not a regular file (links are not followed)",
    tarfile.FIFOTYPE: "a FIFO, not a regular file",
    tarfile.CHRTYPE: "a character device, not a regular file",
    tarfile.BLKTYPE: "a block device, not a regular file",
}


def shard_with_special_member(path, ext: str, kind: bytes, target: str, form=tarfile.USTAR_FORMAT):
    """Three samples (image, caption, label); the middle one's ``ext`` member is an entry of type
    ``kind`` pointing (links) at ``target``."""
    with tarfile.open(path, "w", format=form) as tar:
        for number in range(3):
            files = {"jpg": image_bytes(number), "txt": b"a caption", "cls": b"3"}
            for member_ext, data in files.items():
                name = f"{number:06d}.{member_ext}"
                if number == 1 and member_ext == ext:
                    add(tar, name, kind=kind, linkname=target if kind in (tarfile.SYMTYPE, tarfile.LNKTYPE) else "")
                else:
                    add(tar, name, data)
    return path


@pytest.mark.parametrize("kind", list(NOT_REGULAR))
@pytest.mark.parametrize("ext", ["jpg", "txt", "cls"])
def test_a_member_that_is_not_a_regular_file_is_named_not_missing(tmp_path, kind, ext):
    secret = tmp_path / "secret.jpg"  # a real file a symlink points at: never read
    secret.write_bytes(image_bytes(99))
    target = str(secret) if kind == tarfile.SYMTYPE else f"000000.{ext}"  # a hard link names another member
    for form in (tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT):
        shard = shard_with_special_member(tmp_path / f"special-{form}.tar", ext, kind, target, form)
        ours = rows(iter_shard_samples(str(shard)))
        assert ours == rows(_tarfile_samples(str(shard), False, 64 * 2**20))  # both readers agree
        assert [(key, index, status) for key, index, _, status, _ in ours] == [
            ("000000", 0, "ok"), ("000001", 1, "decode_error"), ("000002", 2, "ok")]
        assert ours[1][4] == f"member 000001.{ext} is {NOT_REGULAR[kind]}"
        assert ext not in ours[1][2] and image_bytes(99) not in ours[1][2].values()  # nothing read or followed
        assert count_shard_samples(str(shard)) == 3


def test_the_status_survives_decoding_for_captions_and_labels(tmp_path):
    from mimicfilter.shards.decode import DecodeConfig, decode_sample, format_problem
    from mimicfilter.shards.images import ImageGeometry

    for ext, task in (("txt", "contrastive"), ("cls", "classify")):
        shard = shard_with_special_member(tmp_path / f"{ext}.tar", ext, tarfile.SYMTYPE, "/etc/passwd")
        raw = list(iter_shard_samples(str(shard)))[1]
        decoded = decode_sample(raw, DecodeConfig(task=task), ImageGeometry())
        expected = f"member 000001.{ext} is a symbolic link, not a regular file (links are not followed)"
        assert (decoded.status, decoded.error) == ("decode_error", expected)
        assert format_problem(raw, DecodeConfig(task=task)) == ("decode_error", expected)


def test_a_sample_made_only_of_links_keeps_its_row_and_curated_shards_never_copy_links(tmp_path):
    from mimicfilter.curate.reshard import write_curated_shards

    shard = tmp_path / "links.tar"
    with tarfile.open(shard, "w") as tar:
        for key, files in image_text_samples(3):
            if key == "00000001":  # every member a link: still a sample, at its own index
                add(tar, f"{key}.jpg", kind=tarfile.SYMTYPE, linkname="00000000.jpg")
                add(tar, f"{key}.txt", kind=tarfile.LNKTYPE, linkname="00000000.txt")
                continue
            for ext, data in files.items():
                add(tar, f"{key}.{ext}", data)
    table = rows(iter_shard_samples(str(shard)))
    assert [(key, index, status) for key, index, _, status, _ in table] == [
        ("00000000", 0, "ok"), ("00000001", 1, "decode_error"), ("00000002", 2, "ok")]
    written = write_curated_shards([(str(shard), "00000002", 2), (str(shard), "00000001")], tmp_path / "curated")
    with tarfile.open(written[0].path) as tar:
        members = tar.getmembers()
    assert all(member.isreg() for member in members)  # the links were not copied, nor followed
    assert {member.name for member in members} == {"00000002.jpg", "00000002.txt", "00000002.json"}


def test_a_directory_entry_is_no_sample_whatever_its_name(tmp_path):
    """`tar cf shard.tar images.2024/` stores the directory first: it holds files, it is not one."""
    for form in (tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT):
        shard = tmp_path / f"dirs-{form}.tar"
        with tarfile.open(shard, "w", format=form) as tar:
            add(tar, "images.2024", kind=tarfile.DIRTYPE)
            for key, files in image_text_samples(2):
                for ext, data in files.items():
                    add(tar, f"images.2024/{key}.{ext}", data)
            add(tar, "00000009.jpg", kind=tarfile.DIRTYPE)  # named like a file: still none
        ours = rows(iter_shard_samples(str(shard)))
        assert ours == rows(_tarfile_samples(str(shard), False, 64 * 2**20))
        assert [(key, index, status) for key, index, _, status, _ in ours] == [
            ("images.2024/00000000", 0, "ok"), ("images.2024/00000001", 1, "ok")]
        assert count_shard_samples(str(shard)) == 2


def test_score_names_links_and_fifos_in_place_of_a_samples_files(tmp_path, models):
    shard = tmp_path / "hostile.tar"
    with tarfile.open(shard, "w") as tar:
        add(tar, "000000.jpg", image_bytes(0))
        add(tar, "000000.txt", b"a good one")
        add(tar, "000001.jpg", kind=tarfile.SYMTYPE, linkname="/etc/passwd")
        add(tar, "000001.txt", b"a symlink for an image")
        add(tar, "000002.jpg", kind=tarfile.LNKTYPE, linkname="000000.jpg")
        add(tar, "000002.txt", b"a hard link for an image")
        add(tar, "000003.jpg", image_bytes(3))
        add(tar, "000003.txt", kind=tarfile.SYMTYPE, linkname="000000.txt")
        add(tar, "000004.jpg", kind=tarfile.FIFOTYPE)
        add(tar, "000004.txt", b"a FIFO for an image")
        add(tar, "000005.jpg", kind=tarfile.DIRTYPE)
        add(tar, "000005.txt", b"a directory for an image")
        add(tar, "000006.jpg", image_bytes(6))
        add(tar, "000006.txt", b"another good one")
    out = tmp_path / "run"
    result = invoke("score", shard, *models, "--train", "none", "--workers", "0", "--batch-size", "4", "--quiet",
                    "--out", out)
    assert result.exit_code == 0 and "Traceback" not in result.output, result.output
    table = {row["key"]: (row["status"], row["error"]) for row in pq.read_table(out / "scores").to_pylist()}
    assert table == {
        "000000": ("ok", None),
        "000001": ("decode_error", "member 000001.jpg is a symbolic link, not a regular file (links are not followed)"),
        "000002": ("decode_error", "member 000002.jpg is a hard link, not a regular file (links are not followed)"),
        "000003": ("decode_error", "member 000003.txt is a symbolic link, not a regular file (links are not followed)"),
        "000004": ("decode_error", "member 000004.jpg is a FIFO, not a regular file"),
        "000005": ("missing_image", "no image file (looked for jpg, jpeg, png, webp)"),  # a directory holds no image
        "000006": ("ok", None),
    }
    assert (out / "_SUCCESS").exists()


# 2 ----------------------------------------------------------------------------------------------


def png_declaring(width: int, height: int) -> bytes:
    """A PNG of a few dozen bytes whose header declares ``width`` x ``height`` one-bit pixels (never decoded)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(bytes(64))) + chunk(b"IEND", b""))


@pytest.mark.parametrize("width, height", [(30000, 30000), (10000, 10000), (12000, 8000)])
def test_a_png_decompression_bomb_says_its_size(width, height):
    """Pillow refuses these in Image.open (over twice its limit: an error; over it: a warning made an
    error) before the size guards see them; the row still gives the size from the header."""
    from mimicfilter.shards.decode import DecodeConfig, decode_for_display, decode_sample
    from mimicfilter.shards.images import ImageGeometry
    from mimicfilter.shards.records import RawSample

    raw = RawSample("s.tar", "bomb", 0, {"png": png_declaring(width, height), "txt": b"a caption"})
    expected = f"image png: image is {width}x{height} pixels, over the 89478485-pixel limit"
    for decoder in ("fast", "pil", "gpu"):
        decoded = decode_sample(raw, DecodeConfig(decoder=decoder), ImageGeometry())
        assert (decoded.status, decoded.error) == ("too_large", expected)
        assert (decoded.image_width, decoded.image_height) == (width, height)
    assert decode_for_display(raw, DecodeConfig()).error == expected


def test_a_bomb_under_a_raised_limit_is_refused_by_pillow_with_its_size():
    from mimicfilter.shards.decode import DecodeConfig, decode_sample
    from mimicfilter.shards.images import ImageGeometry, header_size
    from mimicfilter.shards.records import RawSample

    config = DecodeConfig(decoder="pil", max_image_pixels=500_000_000)
    huge = decode_sample(RawSample("s.tar", "k", 0, {"png": png_declaring(30000, 30000)}), config, ImageGeometry())
    assert huge.error == "image png: image is 30000x30000 pixels, over the 500000000-pixel limit"
    # within the raised limit, but over twice Pillow's own: Pillow still refuses it, and the row says so
    big = decode_sample(RawSample("s.tar", "k", 0, {"png": png_declaring(15000, 12000)}), config, ImageGeometry())
    assert big.status == "too_large" and (big.image_width, big.image_height) == (15000, 12000)
    assert big.error.startswith("image png: image is 15000x12000 pixels, rejected by Pillow as a decompression bomb: ")
    assert header_size(png_declaring(30000, 7)) == (30000, 7)
    assert header_size(b"not an image") is None and header_size(b"") is None


def test_score_gives_a_bombs_size(tmp_path, models):
    samples = image_text_samples(3)
    samples[1][1].pop("jpg")
    samples[1][1]["png"] = png_declaring(30000, 30000)
    out = tmp_path / "run"
    result = invoke("score", write_tar(tmp_path / "bomb.tar", samples), *models, "--train", "none", "--workers", "0",
                    "--quiet", "--out", out)
    assert result.exit_code == 0, result.output
    table = {row["key"]: row for row in pq.read_table(out / "scores").to_pylist()}
    bomb = table["00000001"]
    assert (bomb["status"], bomb["error"]) == ("too_large", "image png: image is 30000x30000 pixels, over the 89478485-pixel limit")
    assert (bomb["image_width"], bomb["image_height"]) == (30000, 30000)
    assert table["00000000"]["status"] == table["00000002"]["status"] == "ok"


# 3 ----------------------------------------------------------------------------------------------

COMPRESSORS = {"gzip": gzip.compress, "bz2": lambda data: bz2.compress(data, 1), "xz": lzma.compress}


def payload_samples(count: int = 8) -> list[tuple[str, dict[str, bytes]]]:
    """Samples with 30 kB of incompressible bytes each: bz2 (level 1: 100 kB blocks) needs several blocks."""
    rng = random.Random(0)
    return [(key, {**files, "bin": rng.randbytes(30_000)}) for key, files in image_text_samples(count)]


@pytest.mark.parametrize("compression", list(COMPRESSORS))
def test_a_compressed_shard_cut_short_says_so_and_keeps_the_rows_before_the_cut(tmp_path, compression):
    plain = write_tar(tmp_path / "plain.tar", payload_samples())
    good = rows(iter_shard_samples(str(plain)))
    packed = COMPRESSORS[compression](plain.read_bytes())
    cut = tmp_path / f"cut.tar.{compression}"
    cut.write_bytes(packed[: len(packed) // 2])
    table = rows(iter_shard_samples(str(cut)))
    *before, broken = table
    assert before and before == good[: len(before)]  # every sample before the cut, as read from the whole shard
    assert broken[:4] == (good[len(before)][0], len(before), {}, "shard_error")
    assert broken[4].startswith(f"truncated tar: the {compression} data ends before its end-of-stream marker ")
    assert f"member {broken[0]}." in broken[4]


def test_a_small_tar_bz2_cut_in_half_is_truncated_not_empty(tmp_path):
    """One bz2 block: nothing decompresses before the cut, and the row says why."""
    plain = write_tar(tmp_path / "plain.tar", image_text_samples(4)).read_bytes()
    packed = bz2.compress(plain)
    cut = tmp_path / "cut.tar.bz2"
    cut.write_bytes(packed[: len(packed) // 2])
    assert rows(iter_shard_samples(str(cut))) == [
        ("", 0, {}, "shard_error", "truncated tar: the bz2 data ends before its end-of-stream marker")]


def test_concatenated_streams_are_one_shard_and_corrupt_data_is_named(tmp_path):
    plain = write_tar(tmp_path / "plain.tar", image_text_samples(6)).read_bytes()
    good = rows(iter_shard_samples(str(tmp_path / "plain.tar")))
    middle = len(plain) // 2  # as pbzip2 or `cat a.gz b.gz` write them
    for name, compress in (("gz", gzip.compress), ("bz2", bz2.compress), ("xz", lzma.compress)):
        path = tmp_path / f"joined.tar.{name}"
        path.write_bytes(compress(plain[:middle]) + compress(plain[middle:]))
        assert rows(iter_shard_samples(str(path))) == good
    packed = bytearray(lzma.compress(plain))
    packed[len(packed) // 2] ^= 0xFF
    (tmp_path / "corrupt.tar.xz").write_bytes(bytes(packed))
    *before, broken = rows(iter_shard_samples(str(tmp_path / "corrupt.tar.xz")))
    assert before == good[: len(before)] and broken[3] == "shard_error"
    assert broken[4].startswith("corrupt compressed stream: xz: Corrupt input data")


MAY_BE_CORRUPT = "samples read from this shard may hold corrupted bytes"
GZIP_CRC_FAILS = f"corrupt gzip data: the stream's CRC check fails at its end; {MAY_BE_CORRUPT}"


def test_a_gz_shard_with_a_byte_flipped_in_a_stored_block_ends_in_a_shard_error(tmp_path):
    """A stored deflate block holds its bytes as they are: the flipped byte inflates, and only the CRC
    at the stream's end, after the tar's end-of-archive marker, tells."""
    samples = payload_samples(4)
    plain = write_tar(tmp_path / "plain.tar", samples)
    good = rows(iter_shard_samples(str(plain)))
    packed = bytearray(gzip.compress(plain.read_bytes(), compresslevel=0))
    packed[packed.index(samples[1][1]["bin"][:64]) + 32] ^= 0x01
    shard = tmp_path / "flipped.tar.gz"
    shard.write_bytes(bytes(packed))
    for spec in (str(shard), f"pipe:cat {shard}"):
        table = rows(iter_shard_samples(spec, allow_pipe=True))
        assert [row[3] for row in table] == ["ok", "ok", "ok", "shard_error"]
        assert table[0] == good[0] and table[2] == good[2] and table[1][2] != good[1][2]  # sample 1 read the flip
        assert table[3] == (good[3][0], 3, {}, "shard_error", GZIP_CRC_FAILS)
        assert count_shard_samples(spec, allow_pipe=True) == len(table)


def wrong_isize(packed: bytes) -> bytes:
    return packed[:-4] + struct.pack("<I", struct.unpack("<I", packed[-4:])[0] + 1)


def flipped(packed: bytes, offset: int) -> bytes:
    broken = bytearray(packed)
    broken[offset] ^= 0x01
    return bytes(broken)


def xz_with_a_wrong_check(packed: bytes) -> bytes:
    """The block's CRC64 flipped: it lies just before the index, whose size the stream footer gives."""
    index_size = (struct.unpack("<I", packed[-8:-4])[0] + 1) * 4
    return flipped(packed, len(packed) - 12 - index_size - 8)


# A tar padded to a 1 MiB record (tar -b 2048): tarfile stops reading far from the end of its data
# (bz2 and xz check a block once all of it is read out; a small tar's last read often reaches that).
PADDED = 1 << 20
END_CHECKS = {
    "gzip-length": (0, lambda tar: wrong_isize(gzip.compress(tar)),
                    f"corrupt gzip data: the stream's length check fails at its end; {MAY_BE_CORRUPT}"),
    "gzip-last-stream-crc": (0, lambda tar: gzip.compress(tar[: len(tar) // 2]) + flipped(
        gzip.compress(tar[len(tar) // 2:]), -8), GZIP_CRC_FAILS),
    "gzip-cut-trailer": (0, lambda tar: gzip.compress(tar)[:-4],
                         "truncated gzip data: the stream ends after the tar's end-of-archive marker but before "
                         f"its end checks; {MAY_BE_CORRUPT}"),
    "bz2-stream-crc": (PADDED, lambda tar: flipped(bz2.compress(tar), -2),
                       "corrupt bz2 data at the stream's end, after the tar's end-of-archive marker: Invalid data "
                       f"stream; {MAY_BE_CORRUPT}"),
    "xz-check": (PADDED, lambda tar: xz_with_a_wrong_check(lzma.compress(tar)),
                 "corrupt xz data at the stream's end, after the tar's end-of-archive marker: Corrupt input data; "
                 f"{MAY_BE_CORRUPT}"),
}


@pytest.mark.parametrize("case", list(END_CHECKS))
def test_a_check_failing_after_the_tars_end_is_a_shard_error_in_place_of_the_last_sample(tmp_path, case):
    padding, make, message = END_CHECKS[case]
    plain = write_tar(tmp_path / "plain.tar", image_text_samples(4))
    good = rows(iter_shard_samples(str(plain)))
    shard = tmp_path / f"broken.tar.{case.split('-')[0]}"
    shard.write_bytes(make(plain.read_bytes() + bytes(padding)))
    assert rows(iter_shard_samples(str(shard))) == [*good[:-1], (good[-1][0], 3, {}, "shard_error", message)]


def test_clean_padded_and_concatenated_gz_shards_read_as_the_plain_tar(tmp_path):
    """No false alarm: the checks pass and the padding after the end-of-archive marker is no sample.
    The same bytes with the last check broken show that the checks were read, not skipped."""
    plain = write_tar(tmp_path / "plain.tar", payload_samples(4))
    good = rows(iter_shard_samples(str(plain)))
    tar = plain.read_bytes()
    middle = len(tar) // 2
    shards = {  # name: (the shard, where its last stream's check lies)
        "clean.tar.gz": (gzip.compress(tar), -8), "stored.tar.gz": (gzip.compress(tar, compresslevel=0), -8),
        "joined.tar.gz": (gzip.compress(tar[:middle]) + gzip.compress(tar[middle:]), -8),
        "padding-stream.tar.gz": (gzip.compress(tar) + gzip.compress(bytes(PADDED)), -8),
        "zeros-after.tar.gz": (gzip.compress(tar) + bytes(100), -108),  # zero padding after a stream, as gzip allows
        # bytes after the last stream, once its checks pass: ignored, as `gzip -d` (a warning) and bz2 and xz do
        "garbage-after.tar.gz": (gzip.compress(tar) + b"garbage", -15),
        "padded.tar.bz2": (bz2.compress(tar + bytes(PADDED)), -2)}
    for name, (packed, check) in shards.items():
        (tmp_path / name).write_bytes(packed)
        assert rows(iter_shard_samples(str(tmp_path / name))) == good, name
        (tmp_path / name).write_bytes(flipped(packed, check))
        assert rows(iter_shard_samples(str(tmp_path / name)))[-1][3:] != ("ok", None), name
    padded = lzma.compress(tar + bytes(PADDED))
    (tmp_path / "padded.tar.xz").write_bytes(padded)
    assert rows(iter_shard_samples(str(tmp_path / "padded.tar.xz"))) == good
    (tmp_path / "padded.tar.xz").write_bytes(xz_with_a_wrong_check(padded))
    assert rows(iter_shard_samples(str(tmp_path / "padded.tar.xz")))[-1][3] == "shard_error"


def test_more_data_after_the_tars_end_than_is_read_says_its_checks_are_unread(tmp_path, monkeypatch):
    from mimicfilter.shards import tar_stream

    monkeypatch.setattr(tar_stream, "MAX_AFTER_END_BYTES", PADDED)
    plain = write_tar(tmp_path / "plain.tar", image_text_samples(2))
    good = rows(iter_shard_samples(str(plain)))
    shard = tmp_path / "long.tar.gz"
    shard.write_bytes(gzip.compress(plain.read_bytes() + bytes(2 * PADDED)))
    assert rows(iter_shard_samples(str(shard))) == [*good[:-1], (good[-1][0], 1, {}, "shard_error", (
        "unchecked gzip data: more than 1 MiB follow the tar's end-of-archive marker, so the checks at the "
        f"stream's end are not read; {MAY_BE_CORRUPT}"))]


def test_score_keeps_a_cut_or_failing_compressed_shards_rows_and_says_why(tmp_path, models):
    plain = write_tar(tmp_path / "plain.tar", image_text_samples(6)).read_bytes()
    for name, packed in (("cut.tar.bz2", bz2.compress(plain)), ("cut.tar.gz", gzip.compress(plain))):
        (tmp_path / name).write_bytes(packed[: len(packed) // 2])
    (tmp_path / "crc.tar.gz").write_bytes(flipped(gzip.compress(plain), -8))
    out = tmp_path / "run"
    result = invoke("score", tmp_path / "cut.tar.bz2", tmp_path / "cut.tar.gz", tmp_path / "crc.tar.gz", *models,
                    "--train", "none", "--workers", "0", "--quiet", "--out", out)
    assert result.exit_code == 0 and "Traceback" not in result.output, result.output
    table = sorted((row["shard"].rsplit("/", 1)[1], row["index"], row["key"], row["status"], row["error"])
                   for row in pq.read_table(out / "scores").to_pylist())
    assert table == sorted([
        ("cut.tar.bz2", 0, "", "shard_error", "truncated tar: the bz2 data ends before its end-of-stream marker"),
        ("cut.tar.gz", 0, "00000000", "ok", None),
        ("cut.tar.gz", 1, "00000001", "ok", None),
        ("cut.tar.gz", 2, "00000002", "shard_error",
         "truncated tar: the gzip data ends before its end-of-stream marker in member 00000002.jpg"),
    ] + [("crc.tar.gz", index, f"{index:08d}", "ok", None) for index in range(5)] + [
        ("crc.tar.gz", 5, "00000005", "shard_error", GZIP_CRC_FAILS)])
    assert (out / "_SUCCESS").exists()


# 4 ----------------------------------------------------------------------------------------------

PACKERS = {"tar": lambda data: data, **COMPRESSORS}


def joined(tmp_path, pack, first: int = 3, second: int = 4):
    """`cat a.tar b.tar > joined.tar` (each packed by ``pack`` first, as `cat a.tar.gz b.tar.gz` joins
    them), and the rows scoring a.tar then b.tar gives, b's indices following a's."""
    a = write_tar(tmp_path / "a.tar", payload_samples(first))
    b = write_tar(tmp_path / "b.tar", image_text_samples(second, start=first))
    expected = rows(iter_shard_samples(str(a))) + [
        (key, first + index, files, status, error) for key, index, files, status, error in rows(iter_shard_samples(str(b)))]
    path = tmp_path / "joined.tar"
    path.write_bytes(pack(a.read_bytes()) + pack(b.read_bytes()))
    return path, expected


@pytest.mark.parametrize("packer", list(PACKERS))
def test_a_shard_of_two_archives_joined_by_cat_reads_both(tmp_path, packer):
    """Every reader reads on past a's end-of-archive marker, as `tar --ignore-zeros` does: nothing of b
    is dropped, by the fast reader, tarfile, a pipe or the sample count."""
    path, expected = joined(tmp_path, PACKERS[packer])
    assert len(expected) == 7 and [row[1] for row in expected] == list(range(7))
    assert rows(iter_shard_samples(str(path))) == expected
    assert rows(_tarfile_samples(str(path), False, 64 * 2**20)) == expected
    assert rows(iter_shard_samples(f"pipe:cat {path}", allow_pipe=True)) == expected
    assert count_shard_samples(str(path)) == count_shard_samples(f"pipe:cat {path}", allow_pipe=True) == 7


def test_the_checks_at_the_end_of_the_second_archives_stream_are_made(tmp_path):
    path, expected = joined(tmp_path, gzip.compress)
    path.write_bytes(flipped(path.read_bytes(), -8))  # b's stream's CRC32
    assert rows(iter_shard_samples(str(path))) == [*expected[:-1], (expected[-1][0], 6, {}, "shard_error", GZIP_CRC_FAILS)]


def test_curated_shards_from_a_joined_source_copy_the_kept_samples_of_both_archives(tmp_path):
    path, expected = joined(tmp_path, lambda data: data)
    score_rows = [score_row(str(path), key, index, 0, float(index)) for key, index, *_ in expected]
    run = write_score_run(tmp_path / "run", score_rows, [str(path)])
    out = tmp_path / "out"
    result = invoke("filter", run, "--out", out, "--where", "index % 2 = 0", "--write-shards", out / "shards")
    assert result.exit_code == 0, result.output
    copied = {}
    for shard in sorted((out / "shards").glob("*.tar")):
        with tarfile.open(shard) as tar:
            copied.update({member.name: tar.extractfile(member).read() for member in tar})
    assert copied == {f"{key}.{ext}": data for key, index, files, *_ in expected if index % 2 == 0
                      for ext, data in files.items()}
    assert {name.split(".")[0] for name in copied} == {"00000000", "00000002", "00000004", "00000006"}
