import numpy as np
import pytest

from mimicfilter.curate.datacomp import UID_DTYPE, read_datacomp_npy, uids_to_array, write_datacomp_npy
from mimicfilter.errors import MimicfilterError

KNOWN = "0123456789abcdef" + "fedcba9876543210"


def test_round_trip_gives_sorted_unique_lowercase(tmp_path):
    uids = ["ff" * 16, KNOWN, "00" * 16, KNOWN.upper(), "ff" * 16, f"{7:032x}"]
    path = tmp_path / "subset.npy"
    count = write_datacomp_npy(uids, path)
    expected = sorted({uid.lower() for uid in uids})
    assert count == len(expected) == 4
    assert read_datacomp_npy(path) == expected


def test_dtype_shape_and_sort_order(tmp_path):
    path = tmp_path / "subset.npy"
    # Same high half, different low halves, and a larger high half with a smaller low half.
    uids = ["0" * 15 + "2" + "0" * 16, "0" * 15 + "1" + "f" * 16, "0" * 15 + "1" + "0" * 16]
    write_datacomp_npy(uids, path)
    array = np.load(path, allow_pickle=False)
    assert array.dtype == np.dtype("u8,u8") == UID_DTYPE
    assert array.shape == (3,)
    assert np.array_equal(array, np.sort(array))
    assert [tuple(int(x) for x in row) for row in array] == [(1, 0), (1, 2**64 - 1), (2, 0)]


def test_high_low_split_matches_datacomp_convention(tmp_path):
    path = tmp_path / "subset.npy"
    write_datacomp_npy([KNOWN], path)
    array = np.load(path)
    assert int(array["f0"][0]) == 0x0123456789ABCDEF == int(KNOWN[:16], 16)
    assert int(array["f1"][0]) == 0xFEDCBA9876543210 == int(KNOWN[16:], 16)
    reference = np.array([(int(KNOWN[:16], 16), int(KNOWN[16:32], 16))], np.dtype("u8,u8"))
    assert array.tobytes() == reference.tobytes()


def test_matches_reference_construction_on_many_uids():
    rng = np.random.default_rng(0)
    uids = [f"{int(v):016x}{int(w):016x}" for v, w in rng.integers(0, 2**63, size=(200, 2), dtype=np.int64)]
    reference = np.array([(int(u[:16], 16), int(u[16:32], 16)) for u in uids], np.dtype("u8,u8"))
    reference.sort()
    assert uids_to_array(uids).tobytes() == reference.tobytes()


def test_exact_path_no_npy_suffix_added(tmp_path):
    path = tmp_path / "subset.bin"
    write_datacomp_npy([KNOWN], path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["subset.bin"]


def test_empty_subset(tmp_path):
    path = tmp_path / "subset.npy"
    assert write_datacomp_npy([], path) == 0
    assert read_datacomp_npy(path) == []


@pytest.mark.parametrize("bad", ["abc", KNOWN + "0", KNOWN[:-1] + "g", " " + KNOWN[1:], None])
def test_bad_uid_refused_and_nothing_written(tmp_path, bad):
    path = tmp_path / "subset.npy"
    with pytest.raises(MimicfilterError) as info:
        write_datacomp_npy([KNOWN, bad, "zz"], path)
    message = str(info.value)
    assert "2 uid(s)" in message and repr(bad) in message
    assert "\n" not in message
    assert list(tmp_path.iterdir()) == []


def test_read_rejects_other_dtype(tmp_path):
    path = tmp_path / "other.npy"
    np.save(path, np.arange(3))
    with pytest.raises(MimicfilterError, match="not a DataComp subset"):
        read_datacomp_npy(path)
