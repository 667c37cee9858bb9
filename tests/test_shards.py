import gzip
import io
import os
import tarfile

import pytest
from helpers import image_text_samples, write_tar

from mimicfilter.errors import MimicfilterError
from mimicfilter.shards.discover import expand_shards
from mimicfilter.shards.samples import iter_shard_samples
from mimicfilter.store.paths import part_name, shard_display_name


@pytest.fixture
def pool(tmp_path):
    """A directory with three small shards (and a non-tar file that must be ignored)."""
    folder = tmp_path / "pool"
    folder.mkdir()
    for n in range(3):
        write_tar(folder / f"{n:03d}.tar", image_text_samples(2, start=2 * n))
    (folder / "notes.txt").write_text("not a shard")
    return folder


def names(paths):
    return [os.path.basename(p) for p in paths]


# ------------------------------------------------------------------------------ expand_shards


def test_file_is_returned_as_given(pool):
    spec = str(pool / "001.tar")
    assert expand_shards([spec]) == [spec]


def test_directory_lists_tars_sorted(pool):
    assert names(expand_shards([str(pool)])) == ["000.tar", "001.tar", "002.tar"]


def test_brace_pattern(pool):
    assert names(expand_shards([f"{pool}/{{000..001}}.tar"])) == ["000.tar", "001.tar"]


def test_glob_sorted(pool):
    assert names(expand_shards([f"{pool}/*.tar"])) == ["000.tar", "001.tar", "002.tar"]
    assert names(expand_shards([f"{pool}/00?.tar"])) == ["000.tar", "001.tar", "002.tar"]


def test_list_file_with_comments_blank_lines_and_braces(pool, tmp_path):
    listing = tmp_path / "shards.txt"
    listing.write_text(f"# my shards\n\n{pool}/002.tar\n   \n{pool}/{{000..001}}.tar\n  # indented comment\n")
    assert names(expand_shards([f"@{listing}"])) == ["002.tar", "000.tar", "001.tar"]


def test_stdin_list(pool):
    stdin = io.StringIO(f"{pool}/001.tar\n# skip\n\ns3://bucket/a.tar\n")
    assert expand_shards(["-"], stdin=stdin) == [f"{pool}/001.tar", "s3://bucket/a.tar"]


def test_urls_pass_through_unchecked():
    urls = ["s3://b/x.tar", "gs://b/y.tar", "https://h/z.tar", "http://h/w.tar", "file:///nowhere/v.tar"]
    assert expand_shards(urls) == urls


def test_brace_pattern_in_url_expands():
    assert expand_shards(["s3://b/{0..2}.tar"]) == ["s3://b/0.tar", "s3://b/1.tar", "s3://b/2.tar"]


def test_pipe_refused_without_flag():
    with pytest.raises(MimicfilterError) as info:
        expand_shards(["pipe:cat a.tar"])
    assert "pipe:" in info.value.message and "--allow-pipe" in info.value.hint


def test_pipe_refused_inside_list(tmp_path):
    listing = tmp_path / "l.txt"
    listing.write_text("pipe:cat a.tar\n")
    with pytest.raises(MimicfilterError, match="disabled"):
        expand_shards([f"@{listing}"])


def test_pipe_allowed_with_flag():
    assert expand_shards(["pipe:cat a.tar"], allow_pipe=True) == ["pipe:cat a.tar"]


def test_duplicates_removed_order_kept(pool):
    a, b = str(pool / "000.tar"), str(pool / "001.tar")
    assert expand_shards([b, a, b, f"{pool}/{{000..001}}.tar"]) == [b, a]


def test_missing_file_named(tmp_path):
    missing = str(tmp_path / "nope.tar")
    with pytest.raises(MimicfilterError) as info:
        expand_shards([missing])
    assert missing in info.value.message and info.value.hint


def test_directory_without_tars(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.md").write_text("x")
    with pytest.raises(MimicfilterError, match="no shards") as info:
        expand_shards([str(empty)])
    assert str(empty) in info.value.message


def test_glob_without_match(tmp_path):
    with pytest.raises(MimicfilterError, match="glob") as info:
        expand_shards([f"{tmp_path}/*.tar"])
    assert str(tmp_path) in info.value.message


def test_brace_without_any_match(tmp_path):
    pattern = f"{tmp_path}/{{000..003}}.tar"
    with pytest.raises(MimicfilterError, match="brace pattern") as info:
        expand_shards([pattern])
    assert pattern in info.value.message


def test_brace_with_one_missing_names_it(pool):
    with pytest.raises(MimicfilterError) as info:
        expand_shards([f"{pool}/{{000..005}}.tar"])
    assert "003.tar" in info.value.message


def test_missing_list_file(tmp_path):
    with pytest.raises(MimicfilterError, match="list file not found") as info:
        expand_shards([f"@{tmp_path}/list.txt"])
    assert "list.txt" in info.value.message


def test_self_including_list(tmp_path):
    listing = tmp_path / "l.txt"
    listing.write_text(f"@{listing}\n")
    with pytest.raises(MimicfilterError, match="includes itself"):
        expand_shards([f"@{listing}"])


def test_empty_result(tmp_path):
    with pytest.raises(MimicfilterError, match="no shards given"):
        expand_shards([])
    listing = tmp_path / "l.txt"
    listing.write_text("# nothing here\n")
    with pytest.raises(MimicfilterError, match="no shards matched"):
        expand_shards([f"@{listing}"])


# ------------------------------------------------------------------------------ iter_shard_samples


def test_good_tar(tmp_path):
    samples = image_text_samples(3)
    shard = str(write_tar(tmp_path / "good.tar", samples))
    rows = list(iter_shard_samples(shard))
    assert [r.key for r in rows] == ["00000000", "00000001", "00000002"]
    assert [r.index for r in rows] == [0, 1, 2]
    assert all(r.status == "ok" and r.error is None and r.shard == shard for r in rows)
    assert rows[1].files == samples[1][1]


def test_extension_lowercased_and_non_sample_members_skipped(tmp_path):
    path = tmp_path / "mixed.tar"
    with tarfile.open(path, "w") as tar:
        directory = tarfile.TarInfo("sub")
        directory.type = tarfile.DIRTYPE
        tar.addfile(directory)
        for name, data in [("README", b"no extension"), ("sub/a.JPG", b"1"), ("sub/a.txt", b"2"), ("sub/b.txt", b"3")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    rows = list(iter_shard_samples(str(path)))
    assert [(r.key, r.index, r.files) for r in rows] == [
        ("sub/a", 0, {"jpg": b"1", "txt": b"2"}),
        ("sub/b", 1, {"txt": b"3"}),
    ]


def test_truncated_tar_mid_member(tmp_path):
    good = write_tar(tmp_path / "good.tar", image_text_samples(5)).read_bytes()
    # Cut inside the jpg data of sample 3 (the 4th sample).
    with tarfile.open(tmp_path / "good.tar") as tar:
        offsets = {m.name: m.offset_data for m in tar}
    cut = offsets["00000003.jpg"] + 100
    bad = tmp_path / "bad.tar"
    bad.write_bytes(good[:cut])
    rows = list(iter_shard_samples(str(bad)))
    assert [r.status for r in rows] == ["ok", "ok", "ok", "shard_error"]
    assert [r.index for r in rows] == [0, 1, 2, 3]
    error_row = rows[-1]
    assert error_row.key == "00000003" and error_row.files == {}
    assert error_row.error.startswith("truncated tar") and "00000003.jpg" in error_row.error
    assert "\n" not in error_row.error and len(error_row.error) <= 300


def test_truncated_tar_at_header_boundary(tmp_path):
    """Python's streaming tarfile treats a missing header as end of archive; we must not."""
    write_tar(tmp_path / "good.tar", image_text_samples(3))
    with tarfile.open(tmp_path / "good.tar") as tar:
        members = {m.name: m for m in tar}
    cut = members["00000001.json"].offset  # exactly before a header
    bad = tmp_path / "bad.tar"
    bad.write_bytes((tmp_path / "good.tar").read_bytes()[:cut])
    rows = list(iter_shard_samples(str(bad)))
    assert [(r.key, r.status) for r in rows] == [("00000000", "ok"), ("00000001", "shard_error")]
    assert "after member 00000001.txt" in rows[-1].error


def test_empty_tar_yields_nothing(tmp_path):
    path = write_tar(tmp_path / "empty.tar", [])
    assert list(iter_shard_samples(str(path))) == []


def test_random_bytes_one_shard_error(tmp_path):
    path = tmp_path / "random.tar"
    path.write_bytes(os.urandom(4096))
    rows = list(iter_shard_samples(str(path)))
    assert len(rows) == 1
    assert rows[0].status == "shard_error" and rows[0].key == "" and rows[0].index == 0
    assert rows[0].error.startswith("not a tar archive")


def test_zero_byte_file(tmp_path):
    path = tmp_path / "zero.tar"
    path.write_bytes(b"")
    rows = list(iter_shard_samples(str(path)))
    assert [(r.status, r.key, r.index) for r in rows] == [("shard_error", "", 0)]
    assert "empty" in rows[0].error


def test_missing_local_and_file_url(tmp_path):
    for url in [str(tmp_path / "gone.tar"), f"file://{tmp_path}/gone.tar"]:
        rows = list(iter_shard_samples(url))
        assert len(rows) == 1 and rows[0].status == "shard_error"
        assert "not found" in rows[0].error


def test_file_url(tmp_path):
    path = write_tar(tmp_path / "good.tar", image_text_samples(2))
    rows = list(iter_shard_samples(f"file://{path}"))
    assert [r.status for r in rows] == ["ok", "ok"]


def test_member_over_limit_is_too_large(tmp_path):
    samples = [("a", {"jpg": b"x" * 2000, "txt": b"caption"}), ("b", {"jpg": b"y" * 10, "txt": b"ok"})]
    path = write_tar(tmp_path / "big.tar", samples)
    rows = list(iter_shard_samples(str(path), max_member_bytes=1000))
    assert rows[0].status == "too_large"
    assert "a.jpg" in rows[0].error and "2000" in rows[0].error
    assert rows[0].files == {"txt": b"caption"}
    assert rows[1].status == "ok" and rows[1].files == {"jpg": b"y" * 10, "txt": b"ok"}


def test_duplicate_member(tmp_path):
    path = tmp_path / "dup.tar"
    with tarfile.open(path, "w") as tar:
        for name, data in [("k.txt", b"first"), ("k.txt", b"second"), ("k.jpg", b"img")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    (row,) = list(iter_shard_samples(str(path)))
    assert row.status == "decode_error" and row.error == "duplicate member k.txt"
    assert row.files == {"txt": b"first", "jpg": b"img"}


def test_tar_gz(tmp_path):
    tar_bytes = write_tar(tmp_path / "plain.tar", image_text_samples(3)).read_bytes()
    path = tmp_path / "shard.tar.gz"
    path.write_bytes(gzip.compress(tar_bytes))
    rows = list(iter_shard_samples(str(path)))
    assert [(r.key, r.status) for r in rows] == [("00000000", "ok"), ("00000001", "ok"), ("00000002", "ok")]


def test_truncated_tar_gz(tmp_path):
    tar_bytes = write_tar(tmp_path / "plain.tar", image_text_samples(5)).read_bytes()
    path = tmp_path / "cut.tar.gz"
    compressed = gzip.compress(tar_bytes)
    path.write_bytes(compressed[: len(compressed) // 2])
    rows = list(iter_shard_samples(str(path)))
    assert rows[-1].status == "shard_error"
    assert all(r.status == "ok" for r in rows[:-1])
    assert [r.index for r in rows] == list(range(len(rows)))


def test_pipe_url(tmp_path):
    path = write_tar(tmp_path / "good.tar", image_text_samples(2))
    rows = list(iter_shard_samples(f"pipe:cat {path}", allow_pipe=True))
    assert [(r.key, r.status) for r in rows] == [("00000000", "ok"), ("00000001", "ok")]


def test_pipe_url_refused_without_flag(tmp_path):
    with pytest.raises(MimicfilterError, match="disabled"):
        list(iter_shard_samples(f"pipe:cat {tmp_path}/x.tar"))


def test_failing_pipe_is_one_shard_error(tmp_path):
    rows = list(iter_shard_samples(f"pipe:cat {tmp_path}/missing.tar 2>/dev/null", allow_pipe=True))
    assert len(rows) == 1 and rows[0].status == "shard_error"
    assert "\n" not in rows[0].error


def test_early_close_of_pipe_is_quiet(tmp_path):
    path = write_tar(tmp_path / "good.tar", image_text_samples(50))
    rows = iter_shard_samples(f"pipe:cat {path}", allow_pipe=True)
    assert next(rows).status == "ok"
    rows.close()  # must not raise (the pipe exits with SIGPIPE)


def test_unknown_protocol_is_shard_error():
    (row,) = list(iter_shard_samples("nosuchproto://bucket/a.tar"))
    assert row.status == "shard_error" and row.error


# ------------------------------------------------------------------------------ names


def test_shard_display_name():
    assert shard_display_name("/data/pool/00000003.tar") == "00000003"
    assert shard_display_name("s3://b/x/00000004.tar.gz") == "00000004"
    assert shard_display_name("https://h/p/0005.tar?token=abc") == "0005"
    assert shard_display_name("pipe:curl -s https://h/0006.tar") == "0006"


def test_part_name_stable_and_safe():
    first = part_name("/data/pool/00000003.tar")
    assert first == part_name("/data/pool/00000003.tar")
    stem, digest = first.rsplit("-", 1)
    assert stem == "00000003" and len(digest) == 10 and all(c in "0123456789abcdef" for c in digest)
    # Same basename, different location: different part names.
    assert part_name("/other/00000003.tar") != first
    weird = part_name("pipe:cat 'my shard;rm -rf ~'/..  x?.tar")
    assert all(c.isalnum() or c in "._-" for c in weird)
    assert not weird.startswith(".")
    assert part_name("s3://bucket/").startswith("bucket-")
    assert part_name("").startswith("shard-")


def test_unbalanced_braces_is_a_clean_error(tmp_path):
    with pytest.raises(MimicfilterError, match="bad brace pattern"):
        expand_shards([f"{tmp_path}/{{000..003.tar"])


def test_garbage_after_members_is_shard_error(tmp_path):
    write_tar(tmp_path / "good.tar", image_text_samples(2))
    with tarfile.open(tmp_path / "good.tar") as tar:
        end = max(m.offset_data + m.size for m in tar)
    data = (tmp_path / "good.tar").read_bytes()
    bad = tmp_path / "garbage.tar"
    bad.write_bytes(data[: (end + 511) // 512 * 512] + b"\x7f" * 1024)
    rows = list(iter_shard_samples(str(bad)))
    assert [(r.key, r.status) for r in rows] == [("00000000", "ok"), ("00000001", "shard_error")]
    assert rows[-1].error.startswith("corrupt tar") and "00000001.json" in rows[-1].error
