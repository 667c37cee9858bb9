import gzip
import hashlib
import io
import json
import os
import tarfile

import pytest
import webdataset as wds
from helpers import image_text_samples, write_tar

from mimicfilter.errors import MimicfilterError
from mimicfilter.curate.reshard import CuratedShard, write_curated_shards


def tar_members(path) -> dict[str, bytes]:
    """Member name -> data, in archive order."""
    with tarfile.open(path) as tar:
        return {member.name: tar.extractfile(member).read() for member in tar.getmembers() if member.isreg()}


def key_of(name: str) -> str:
    return name.split(".", 1)[0]


@pytest.fixture
def sources(tmp_path):
    (tmp_path / "src").mkdir()
    shard_a = write_tar(tmp_path / "src" / "a.tar", image_text_samples(5, start=0))
    shard_b = write_tar(tmp_path / "src" / "b.tar", image_text_samples(4, start=5))
    return str(shard_a), str(shard_b)


def kept_pairs(sources, keys_a=(0, 1, 3, 4), keys_b=(5, 7, 8)):
    shard_a, shard_b = sources
    return [(shard_a, f"{i:08d}") for i in keys_a] + [(shard_b, f"{i:08d}") for i in keys_b]


def listing(directory):
    return sorted(p.name for p in directory.iterdir())


def test_kept_samples_land_in_maxcount_sized_shards(sources, tmp_path):
    out = tmp_path / "out"
    shards = write_curated_shards(kept_pairs(sources), out, maxcount=3)
    assert [shard.nsamples for shard in shards] == [3, 3, 1]
    assert [shard.url for shard in shards] == ["curated-000000.tar", "curated-000001.tar", "curated-000002.tar"]
    assert all(isinstance(shard, CuratedShard) and shard.path == str(out / shard.url) for shard in shards)
    # Nothing but the shards and the index: no temp file survives.
    assert listing(out) == ["curated-000000.tar", "curated-000001.tar", "curated-000002.tar", "curated.wids.json"]


def test_members_are_byte_identical_and_dropped_samples_absent(sources, tmp_path):
    out = tmp_path / "out"
    shards = write_curated_shards(kept_pairs(sources), out, maxcount=3)
    source = {**tar_members(sources[0]), **tar_members(sources[1])}
    copied: dict[str, bytes] = {}
    for shard in shards:
        members = tar_members(shard.path)
        assert len({key_of(name) for name in members}) == shard.nsamples
        copied.update(members)
    kept_keys = {f"{i:08d}" for i in (0, 1, 3, 4, 5, 7, 8)}
    expected = {name: data for name, data in source.items() if key_of(name) in kept_keys}
    assert copied == expected
    assert not {"00000002", "00000006"} & {key_of(name) for name in copied}


def test_headers_keep_name_size_mode_mtime_and_normalise_owner(tmp_path):
    source = tmp_path / "src.tar"
    with tarfile.open(source, "w") as tar:
        for name, mode, mtime in [("k1.jpg", 0o600, 1_700_000_000), ("k1.txt", 0o644, 1_600_000_000)]:
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = 3, mode, mtime
            info.uid, info.gid, info.uname, info.gname = 1234, 99, "alice", "staff"
            tar.addfile(info, io.BytesIO(b"abc"))
    (shard,) = write_curated_shards([(str(source), "k1")], tmp_path / "out")
    with tarfile.open(source) as src, tarfile.open(shard.path) as dst:
        for before, after in zip(src.getmembers(), dst.getmembers(), strict=True):
            assert (after.name, after.size, after.mode, after.mtime) == (before.name, before.size, before.mode, before.mtime)
            assert (after.uid, after.gid, after.uname, after.gname) == (0, 0, "root", "root")


def test_output_readable_by_webdataset_in_order(sources, tmp_path):
    shards = write_curated_shards(kept_pairs(sources), tmp_path / "out", maxcount=3)
    dataset = wds.WebDataset([shard.path for shard in shards], shardshuffle=False)
    samples = list(dataset)
    assert [sample["__key__"] for sample in samples] == [f"{i:08d}" for i in (0, 1, 3, 4, 5, 7, 8)]
    assert all({"jpg", "txt", "json"} <= set(sample) for sample in samples)
    assert json.loads(samples[4]["json"]) == {"uid": f"{5:032x}"}


def test_wids_index_describes_every_shard(sources, tmp_path):
    out = tmp_path / "out"
    shards = write_curated_shards(kept_pairs(sources), out, maxcount=3, prefix="best")
    index = json.loads((out / "best.wids.json").read_text())
    assert index["__kind__"] == "wids-shard-index-v1"
    assert index["wids_version"] == 1
    assert index["name"] == "best"
    assert [entry["url"] for entry in index["shardlist"]] == ["best-000000.tar", "best-000001.tar", "best-000002.tar"]
    for entry, shard in zip(index["shardlist"], shards, strict=True):
        data = (out / entry["url"]).read_bytes()  # relative to the index's directory
        assert entry["filesize"] == len(data) == os.path.getsize(shard.path) == shard.filesize
        assert entry["md5sum"] == hashlib.md5(data).hexdigest() == shard.md5sum
        with tarfile.open(out / entry["url"]) as tar:
            assert entry["nsamples"] == len({key_of(m.name) for m in tar.getmembers()}) == shard.nsamples


def test_a_sample_is_never_split_and_output_is_reproducible(sources, tmp_path):
    first = write_curated_shards(kept_pairs(sources), tmp_path / "one", maxcount=1)
    second = write_curated_shards(kept_pairs(sources), tmp_path / "two", maxcount=1)
    assert len(first) == 7
    for shard in first:
        members = tar_members(shard.path)
        assert len({key_of(name) for name in members}) == 1
        assert len(members) == 3  # jpg, txt and json stay together
    assert [s.md5sum for s in first] == [s.md5sum for s in second]


def test_compressed_and_pipe_sources(tmp_path):
    plain = write_tar(tmp_path / "s.tar", image_text_samples(3))
    packed = tmp_path / "s.tar.gz"
    packed.write_bytes(gzip.compress(plain.read_bytes()))
    kept = [(str(packed), "00000001"), (f"pipe:cat {plain}", "00000002")]
    shards = write_curated_shards(kept, tmp_path / "out", allow_pipe=True)
    assert [key_of(name) for name in tar_members(shards[0].path)] == ["00000001"] * 3 + ["00000002"] * 3


def test_a_compressed_source_failing_its_end_check_is_a_read_error(tmp_path):
    """The CRC at the end of a gzip stream, after the tar's end-of-archive marker, is checked before
    the curated shards are written: copied bytes may be corrupt."""
    plain = write_tar(tmp_path / "s.tar", image_text_samples(3)).read_bytes()
    packed = bytearray(gzip.compress(plain))
    packed[-8] ^= 0x01  # the stream's CRC32
    source = tmp_path / "s.tar.gz"
    source.write_bytes(bytes(packed))
    with pytest.raises(MimicfilterError) as info:
        write_curated_shards([(str(source), "00000001")], tmp_path / "out")
    assert str(info.value).startswith(f"cannot read shard {source}: corrupt gzip data: the stream's CRC check "
                                      "fails at its end; samples read from this shard may hold corrupted bytes (hint: ")
    assert listing(tmp_path / "out") == []


def test_pipe_refused_without_flag(tmp_path):
    plain = write_tar(tmp_path / "s.tar", image_text_samples(1))
    with pytest.raises(MimicfilterError, match="pipe"):
        write_curated_shards([(f"pipe:cat {plain}", "00000000")], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_nothing_kept_writes_an_empty_index(tmp_path):
    assert write_curated_shards([], tmp_path / "out") == []
    assert listing(tmp_path / "out") == ["curated.wids.json"]
    assert json.loads((tmp_path / "out" / "curated.wids.json").read_text())["shardlist"] == []


@pytest.mark.parametrize("key", ["../evil", "/abs", "a/../../b", "a\\b", "", "a\x00b", "a\nb", "a//b", "./a"])
def test_unsafe_key_refused_before_anything_is_written(sources, tmp_path, key):
    kept = kept_pairs(sources) + [(sources[1], key)]
    with pytest.raises(MimicfilterError) as info:
        write_curated_shards(kept, tmp_path / "out", maxcount=3)
    assert "unsafe sample key" in str(info.value) and repr(key) in str(info.value)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "out").exists()


def test_missing_key_raises_and_leaves_no_file(sources, tmp_path):
    out = tmp_path / "out"
    kept = kept_pairs(sources)[:5] + [(sources[1], "00000099")] + kept_pairs(sources)[5:]
    with pytest.raises(MimicfilterError) as info:
        write_curated_shards(kept, out, maxcount=3)
    assert "'00000099'" in str(info.value) and sources[1] in str(info.value)
    assert listing(out) == []  # shards finished before the error were temp files, now removed


def test_ungrouped_input_refused(sources, tmp_path):
    shard_a, shard_b = sources
    kept = [(shard_a, "00000000"), (shard_b, "00000005"), (shard_a, "00000001")]
    with pytest.raises(MimicfilterError, match="not grouped by shard"):
        write_curated_shards(kept, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_truncated_source_names_the_shard_and_leaves_no_file(sources, tmp_path):
    broken = tmp_path / "broken.tar"
    data = open(sources[0], "rb").read()
    broken.write_bytes(data[: len(data) // 2])
    out = tmp_path / "out"
    kept = [(sources[1], "00000005"), (str(broken), "00000000")]
    with pytest.raises(MimicfilterError) as info:
        write_curated_shards(kept, out, maxcount=1)
    assert str(broken) in str(info.value) and "\n" not in str(info.value)
    assert listing(out) == []


def test_missing_source_shard(tmp_path):
    with pytest.raises(MimicfilterError, match="not found"):
        write_curated_shards([(str(tmp_path / "nope.tar"), "k")], tmp_path / "out")
    assert listing(tmp_path / "out") == []


@pytest.mark.parametrize("options", [{"maxcount": 0}, {"prefix": "../x"}, {"prefix": ".hidden"}, {"prefix": ""}])
def test_bad_options_refused(sources, tmp_path, options):
    with pytest.raises(MimicfilterError):
        write_curated_shards(kept_pairs(sources), tmp_path / "out", **options)
    assert not (tmp_path / "out").exists()


def test_source_cut_inside_a_kept_member_is_a_read_error(tmp_path):
    source = write_tar(tmp_path / "s.tar", image_text_samples(2))
    cut = tmp_path / "cut.tar"
    cut.write_bytes(source.read_bytes()[: 512 + 100])  # first header plus part of 00000000.jpg
    with pytest.raises(MimicfilterError) as info:
        write_curated_shards([(str(cut), "00000000")], tmp_path / "out")
    assert str(info.value).startswith(f"cannot read shard {cut}: truncated tar")
    assert "00000000.jpg" in str(info.value)
    assert listing(tmp_path / "out") == []
