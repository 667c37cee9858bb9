"""`mimicfilter dedup`: planted near-duplicates found in cells, the same pairs whatever the executor,
resumable ranks, --dedup-on pair vs image, and the whole path from `score --save-embeddings`."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from helpers import image_text_samples, score_row, write_score_run, write_tar

from mimicfilter.dedup import cells as cells_module
from mimicfilter.dedup.cells import Cells, plan_cells, train_cells
from mimicfilter.dedup.pairs import cell_edges
from mimicfilter.store.parts import read_scores
from mimicfilter_cli.main import cli

DIM = 32


def _unit(vectors: np.ndarray) -> np.ndarray:
    return vectors / np.linalg.norm(vectors, axis=-1, keepdims=True)


def planted(count: int, copies: int, seed: int = 0):
    """``count`` random pairs (image, text) [n, 2, DIM], the last ``copies`` of them near-copies of
    earlier ones (image cosine ≈ 0.995, caption cosine ≈ 0.99995), and a few "same image, other
    caption" samples."""
    rng = np.random.default_rng(seed)
    vectors = _unit(rng.standard_normal((count, 2, DIM)))
    sources = rng.choice(count - copies - 20, copies, replace=False)
    noise = np.array([0.1, 0.01])[None, :, None] / np.sqrt(DIM)  # captions of near-duplicates barely differ
    noisy = vectors[sources] + noise * rng.standard_normal((copies, 2, DIM))
    vectors[count - copies:] = _unit(noisy)
    recaptioned = np.arange(count - copies - 10, count - copies)  # same image as sample i - 10, another caption
    vectors[recaptioned, 0] = vectors[recaptioned - 10, 0]
    truth = {(int(s), count - copies + i) for i, s in enumerate(sources)}
    return vectors.astype(np.float16), truth, {(int(r) - 10, int(r)) for r in recaptioned}


def write_features(folder, vectors: np.ndarray, per_file: int = 700) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    uids = [f"{i:032x}" for i in range(len(vectors))]
    for number, start in enumerate(range(0, len(vectors), per_file)):
        part = slice(start, start + per_file)
        table = pa.table({"uid": uids[part],
                          "image": pa.FixedSizeListArray.from_arrays(pa.array(vectors[part, 0].reshape(-1)), DIM),
                          "text": pa.FixedSizeListArray.from_arrays(pa.array(vectors[part, 1].reshape(-1)), DIM)})
        pq.write_table(table, folder / f"{number:05d}.parquet")
    return uids


def _dedup(*arguments) -> dict:
    result = CliRunner().invoke(cli, ["dedup", *map(str, arguments), "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def _edges(folder) -> list[tuple]:
    table = pq.read_table(folder / "edges").to_pylist()
    return sorted((row["uid_a"], row["uid_b"], round(row["similarity"], 5)) for row in table)


def _found(edges, threshold: float) -> set[tuple[int, int]]:
    from mimicfilter.curate.groups import components

    pairs = [(int(a, 16), int(b, 16)) for a, b, similarity in edges if similarity >= threshold]
    if not pairs:
        return set()
    a, b = np.array(pairs).T
    labels = components(int(max(a.max(), b.max())) + 1, a, b)
    groups: dict[int, list[int]] = {}
    for node in np.unique(np.r_[a, b]):
        groups.setdefault(int(labels[node]), []).append(int(node))
    return {(x, y) for members in groups.values() for i, x in enumerate(members) for y in members[i + 1:]}


def uid_run(run_dir, uids):
    """A score run whose samples carry these uids (what --features-from files are matched to)."""
    return write_score_run(run_dir, [score_row("/data/s.tar", f"k{i}", i, 0, float(i), uid=uid)
                                     for i, uid in enumerate(uids)], ["/data/s.tar"])


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    folder = tmp_path_factory.mktemp("features")
    vectors, truth, recaptioned = planted(3000, 150)
    uid_run(folder / "run", write_features(folder / "files", vectors))
    return folder, vectors, truth, recaptioned


def test_planted_pairs_are_found_in_cells_and_pair_mode_checks_the_caption(pool, tmp_path):
    folder, _, truth, recaptioned = pool
    features = ["--features-from", folder / "files", "--embedding-column", "image,text", "--cell-size", "256",
                "--margin", "0.05"]  # 32-d random vectors: wider cell boundaries than real embeddings
    stats = _dedup(folder / "run", *features, "--out", tmp_path / "pairs")
    assert stats["cells"] > 4 and stats["samples"] == 3000
    found = _found(_edges(tmp_path / "pairs"), 0.95)
    assert truth <= found and not found & recaptioned
    assert found == truth  # random vectors: nothing else is alike
    image = _dedup(folder / "run", *features, "--dedup-on", "image", "--out", tmp_path / "image")
    assert truth | recaptioned <= _found(_edges(tmp_path / "image"), 0.95)
    assert image["at_default"]["groups"] == len(truth | recaptioned)
    assert not (tmp_path / "pairs" / "buckets").exists() and (tmp_path / "pairs" / "_SUCCESS").exists()


def test_the_same_pairs_whatever_the_executor_and_ranks_resume(pool, tmp_path):
    folder, *_ = pool
    features = ["--features-from", folder / "files", "--embedding-column", "image,text", "--cell-size", "256",
                "--margin", "0.05"]  # 32-d random vectors: wider cell boundaries than real embeddings
    _dedup(folder / "run", *features, "--out", tmp_path / "local")
    _dedup(folder / "run", *features, "--out", tmp_path / "workers", "--workers", "2")
    first = _dedup(folder / "run", *features, "--out", tmp_path / "ranks", "--rank", "0", "--world-size", "2")
    assert first["buckets_missing"] > 0 and not (tmp_path / "ranks" / "_SUCCESS").exists()
    _dedup(folder / "run", *features, "--out", tmp_path / "ranks", "--rank", "1", "--world-size", "2")
    _dedup(folder / "run", *features, "--out", tmp_path / "ranks", "--rank", "0", "--world-size", "2")
    assert (tmp_path / "ranks" / "_SUCCESS").exists()
    assert _edges(tmp_path / "local") == _edges(tmp_path / "workers") == _edges(tmp_path / "ranks")
    if importlib.util.find_spec("ray") is not None:
        ray = _dedup(folder / "run", *features, "--out", tmp_path / "ray", "--ray", "--ray-actors", "2")
        assert ray["executor"] == "ray (2 actors)" and _edges(tmp_path / "ray") == _edges(tmp_path / "local")
    again = _dedup(folder / "run", *features, "--out", tmp_path / "local")  # finished: nothing redone
    assert again["edges"] == len(_edges(tmp_path / "local"))
    result = CliRunner().invoke(cli, ["dedup", str(folder / "run"), *map(str, features), "--out",
                                      str(tmp_path / "local"), "--cell-size", "512"])
    assert result.exit_code == 2 and "different command" in result.output


def test_two_runs_at_once_on_one_out_both_finish_with_the_same_result(pool, tmp_path, monkeypatch):
    """A second identical command (or another rank) that ends while this one still reads the buckets:
    it finishes the run and leaves the buckets; this one then reads its stats and removes them."""
    from mimicfilter.dedup import run as dedup_run

    folder, *_ = pool
    arguments = [folder / "run", "--features-from", folder / "files", "--embedding-column", "image,text",
                 "--cell-size", "256", "--out", tmp_path / "both"]
    original, inner = dedup_run.saved_ranges, []

    def the_other_run_ends_first(*args, **kwargs):
        if not inner:
            inner.append(None)  # first: the inner run calls this too, and must go straight on
            inner.append(_dedup(*arguments))  # runs whole while this one holds the buckets
            assert (tmp_path / "both" / "_SUCCESS").exists()
        return original(*args, **kwargs)

    monkeypatch.setattr(dedup_run, "saved_ranges", the_other_run_ends_first)
    outer = _dedup(*arguments)
    assert outer == inner[1] and outer["samples"] == 3000
    assert not (tmp_path / "both" / "buckets").exists()  # the last reader removed them
    assert not [p.name for p in (tmp_path / "both").iterdir() if p.name.endswith(".lock")]
    monkeypatch.undo()
    _dedup(*arguments[:-1], tmp_path / "alone")
    assert _edges(tmp_path / "both") == _edges(tmp_path / "alone")


def test_on_a_filesystem_without_locks_dedup_and_filter_run_unlocked(pool, tmp_path, monkeypatch):
    import errno
    import fcntl

    def no_locks(*_):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    folder, *_ = pool
    stats = _dedup(folder / "run", "--features-from", folder / "files", "--embedding-column", "image,text",
                   "--cell-size", "256", "--out", tmp_path / "pairs")
    assert stats["samples"] == 3000 and not (tmp_path / "pairs" / "buckets").exists()
    result = CliRunner().invoke(cli, ["filter", str(folder / "run"), "--dedup", "--dedup-from",
                                      str(tmp_path / "pairs"), "--out", str(tmp_path / "curated")])
    assert result.exit_code == 0, result.output


def test_filter_matches_features_from_pairs_by_uid(pool, tmp_path):
    folder, vectors, truth, _ = pool
    rows = [score_row("/data/s.tar", f"k{i}", i, 0, float(i), uid=f"{i:032x}") for i in range(len(vectors))]
    run = write_score_run(tmp_path / "run", rows, ["/data/s.tar"])
    _dedup(run, "--features-from", folder / "files", "--embedding-column", "image,text", "--cell-size", "256")
    result = CliRunner().invoke(cli, ["filter", str(run), "--dedup", "--out", str(tmp_path / "out"), "--json"])
    assert result.exit_code == 0, result.output
    manifest = pq.read_table(tmp_path / "out" / "manifest.parquet").to_pylist()
    dropped = {row["index"] for row in manifest if row["duplicate_of"]}
    assert dropped == {min(pair) for pair in truth}  # the higher score (later index) of each pair stays


def test_cells_share_boundary_pairs_within_the_margin():
    rng = np.random.default_rng(1)
    images = _unit(rng.standard_normal((4000, DIM))).astype(np.float32)
    plan = plan_cells(4000, 100)
    centroids, coarse, parents = train_cells(images, plan, 0)
    near = _unit(images + 0.1 / np.sqrt(DIM) * rng.standard_normal(images.shape)).astype(np.float32)

    def shared(margin: float) -> float:
        cells = Cells(centroids, coarse, parents, margin)
        rows, of = cells.assign(images)
        rows_near, of_near = cells.assign(near)
        mine = {(int(r), int(c)) for r, c in zip(rows, of)}
        return np.mean([any((int(r), int(c)) in mine for c in of_near[rows_near == r]) for r in range(len(images))])

    without, within = shared(0.0), shared(0.05)
    assert without < 0.97 and within > 0.999


def test_two_level_cells_assign_like_flat_ones(monkeypatch):
    monkeypatch.setattr(cells_module, "FLAT_CELLS", 8)
    rng = np.random.default_rng(2)
    images = _unit(rng.standard_normal((6000, DIM))).astype(np.float32)
    plan = plan_cells(6000, 200)
    assert plan.levels == 2 and plan.cells == 30
    centroids, coarse, parents = train_cells(images, plan, 0)
    cells = Cells(centroids, coarse, parents, 0.0)
    rows, assigned = cells.assign(images)
    exact = np.argmax(images @ cells.centroids.T, axis=1)
    assert np.mean(assigned == exact[rows]) > 0.97 and len(np.unique(assigned)) > 20


def test_identical_vectors_collapse_and_pairs_need_both_sides():
    rng = np.random.default_rng(3)
    base = _unit(rng.standard_normal((5, 2, DIM)))
    vectors = np.concatenate([base, np.repeat(base[:1], 4, axis=0), base[1:2]]).astype(np.float16)
    vectors[-1, 1] = _unit(rng.standard_normal(DIM))  # sample 1's image, another caption
    edges = cell_edges(vectors, 0.9, pair=True)
    assert sorted(zip(edges.a.tolist(), edges.b.tolist())) == [(5, 0), (6, 0), (7, 0), (8, 0)]
    assert np.all(edges.similarity == 1)
    image = cell_edges(vectors, 0.9, pair=False)
    assert len(image.a) == 5 and (9 in image.a.tolist() or 9 in image.b.tolist())


def test_score_save_embeddings_dedup_filter(tmp_path, tiny_config, reference_checkpoint):
    samples = image_text_samples(12)
    samples += [("copy-a", dict(samples[3][1])), ("copy-b", dict(samples[3][1]))]  # byte-identical twice
    shard = write_tar(tmp_path / "pool.tar", samples)
    run = tmp_path / "run"
    result = CliRunner().invoke(cli, ["score", str(shard), "--model", str(tiny_config), "--reference",
                                      str(reference_checkpoint), "--train", "none", "--save-embeddings", "--workers",
                                      "0", "--batch-size", "7", "--out", str(run), "--quiet"])
    assert result.exit_code == 0, result.output
    table = read_scores(run).to_pylist()
    hashes = {row["key"]: (row["image_sha1"], row["caption_sha1"]) for row in table}
    assert hashes["copy-a"] == hashes["copy-b"] == hashes["00000003"] != hashes["00000004"]
    assert all(len(value) == 20 for pair in hashes.values() for value in pair)
    stats = _dedup(run, "--max-threshold", "0.1")
    assert stats["samples"] == 14 and (run / "dedup" / "_SUCCESS").exists()
    result = CliRunner().invoke(cli, ["filter", str(run), "--dedup", "--dedup-threshold", "0.0", "--out",
                                      str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    manifest = pq.read_table(tmp_path / "out" / "manifest.parquet").to_pylist()
    group = [row for row in manifest if row["key"] in ("copy-a", "copy-b", "00000003")]
    assert len({row["duplicate_group"] for row in group}) == 1 and sum(row["duplicate_of"] is None for row in group) == 1


def test_long_captions_are_told_apart_by_their_text(tmp_path, tiny_config, reference_checkpoint):
    """Captions past the text tower's context (16 tokens here) embed alike whatever their ends say:
    dedup --dedup-on pair compares them by their folded text (long_caption_sha1) instead."""
    start = "couple with heart: woman, man, medium-light skin tone, and a few more words to fill the context"
    picture = image_text_samples(1)[0][1]["jpg"]
    captions = {"long-a": start + ", dark skin tone", "long-b": start + ", light skin tone",
                "long-c": "  " + (start + ",  DARK skin tone").upper(), "short-a": "a red apple", "short-b": "A  red apple"}
    samples = image_text_samples(6, start=1) + [(key, {"jpg": picture, "txt": text.encode()}) for key, text in captions.items()]
    run = tmp_path / "run"
    result = CliRunner().invoke(cli, ["score", str(write_tar(tmp_path / "pool.tar", samples)), "--model", str(tiny_config),
                                      "--reference", str(reference_checkpoint), "--train", "none", "--save-embeddings",
                                      "--workers", "0", "--out", str(run), "--quiet"])
    assert result.exit_code == 0, result.output
    rows = {row["key"]: row for row in read_scores(run, columns=["key", "long_caption_sha1", "text_embedding"]).to_pylist()}
    assert rows["long-a"]["long_caption_sha1"] == rows["long-c"]["long_caption_sha1"] != rows["long-b"]["long_caption_sha1"]
    assert rows["short-a"]["long_caption_sha1"] is None and rows["00000001"]["long_caption_sha1"] is None
    assert rows["long-a"]["text_embedding"] == rows["long-b"]["text_embedding"]  # the tower never saw the ends
    _dedup(run, "--max-threshold", "0.1")
    edges = pq.read_table(run / "dedup" / "edges").to_pylist()
    linked = {frozenset((row["key_a"], row["key_b"])) for row in edges}
    assert {frozenset(("long-a", "long-c")), frozenset(("short-a", "short-b"))} <= linked
    assert not any("long-b" in pair for pair in linked)


def test_dedup_refuses_what_it_cannot_use(tmp_path):
    run = write_score_run(tmp_path / "run", [score_row("/s.tar", "k", 0, 0, 1.0)], ["/s.tar"])
    result = CliRunner().invoke(cli, ["dedup", str(run)])
    assert result.exit_code == 2 and "holds no embeddings" in result.output
    vectors, _, _ = planted(50, 5)
    write_features(tmp_path / "files", vectors)
    result = CliRunner().invoke(cli, ["dedup", str(run), "--features-from", str(tmp_path / "files"),
                                      "--embedding-column", "image"])
    assert result.exit_code == 2 and "--dedup-on pair needs the text side" in result.output


def test_embeddings_of_another_model_than_the_runs_are_refused(tmp_path, tiny_config, reference_checkpoint):
    """--embeddings made with another reference than the run's saved ones: their neighbours are not the
    run's; refused as extrapolate refuses them."""
    from helpers import write_random_checkpoint

    shard = write_tar(tmp_path / "pool.tar", image_text_samples(12))
    run, embedded = tmp_path / "run", tmp_path / "embedded"
    common = ["--model", str(tiny_config), "--workers", "0", "--quiet"]
    assert CliRunner().invoke(cli, ["score", str(shard), "--reference", str(reference_checkpoint), "--train", "none",
                                    "--save-embeddings", *common, "--out", str(run)]).exit_code == 0
    other = write_random_checkpoint(tmp_path / "other.pt", seed=1)
    assert CliRunner().invoke(cli, ["embed", str(shard), "--reference", str(other), *common,
                                    "--out", str(embedded)]).exit_code == 0
    result = CliRunner().invoke(cli, ["dedup", str(run), "--embeddings", str(embedded), "--out", str(tmp_path / "d")])
    assert result.exit_code == 2 and "hold embeddings of different models" in result.stderr, result.output


def test_inputs_without_one_usable_embedding_are_an_error_not_no_duplicates(tmp_path):
    vectors, _, _ = planted(50, 5)
    with np.errstate(over="ignore"):
        uids = write_features(tmp_path / "files", vectors * 1e30)  # every row overflows float16
    run = uid_run(tmp_path / "run", uids)
    result = CliRunner().invoke(cli, ["dedup", str(run), "--features-from", str(tmp_path / "files"),
                                      "--embedding-column", "image,text", "--out", str(tmp_path / "d")])
    assert result.exit_code == 2 and "no sample of the inputs has a usable embedding" in result.stderr, result.output
    assert not (tmp_path / "d" / "_SUCCESS").exists()


def test_the_command_line_defaults_are_the_librarys():
    from mimicfilter.dedup import config
    from mimicfilter_cli import dedup

    assert (dedup.MAX_EPSILON, dedup.CAPTION_FACTOR, dedup.CELL_SIZE, dedup.MARGIN) == (
        config.DEFAULT_MAX_EPSILON, config.DEFAULT_CAPTION_FACTOR, config.DEFAULT_CELL_SIZE, config.DEFAULT_MARGIN)


def test_out_never_replaces_an_input(pool, tmp_path):
    folder, *_ = pool
    run = write_score_run(tmp_path / "run", [score_row("/s.tar", "k", 0, 0, 1.0)], ["/s.tar"])
    for out in (run, run / "scores", folder / "files"):
        result = CliRunner().invoke(cli, ["dedup", str(run), "--features-from", str(folder / "files"),
                                          "--embedding-column", "image,text", "--out", str(out)])
        assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, result.output


def _refused(*arguments) -> str:
    result = CliRunner().invoke(cli, ["dedup", *map(str, arguments)])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "Traceback" not in result.output, result.output
    return lines[0]


def test_features_of_another_pool_are_refused_not_read_as_no_duplicates(pool, tmp_path):
    """Files whose ids name none of RUN's samples would give pairs filter --dedup can match to nothing
    (the run looks duplicate-free): refused from a sample of their ids, naming an id of each side."""
    folder, vectors, *_ = pool
    features = ["--features-from", folder / "files", "--embedding-column", "image,text", "--out", tmp_path / "d"]
    other = uid_run(tmp_path / "other", [f"other-{i}" for i in range(len(vectors))])
    error = _refused(other, *features)
    assert error == (f"Error: none of the samples of {other} can be used: no uid of it is in the --features-from "
                     f"files (none of 3000 read from them; e.g. files: '{0:032x}', run: 'other-0') (hint: files of "
                     "another pool, or the wrong --id-column (uid or key)? the files must embed the run's samples too)")
    assert not (tmp_path / "d").exists()
    nameless = uid_run(tmp_path / "nameless", [None] * 5)  # shards without uids: match by key
    assert "run's samples have no uid) (hint: match by key: --id-column key" in _refused(nameless, *features)
    assert "is not a mimicfilter run directory" in _refused(tmp_path / "missing", *features)
    # some of the files' samples are the run's: searched as before (filter matches those it has)
    half = uid_run(tmp_path / "half", [f"{i:032x}" for i in range(0, len(vectors), 2)])
    assert _dedup(half, *features)["samples"] == len(vectors)


def test_an_id_twice_in_the_features_is_refused(tmp_path):
    vectors, _, _ = planted(1400, 50)
    uids = write_features(tmp_path / "files", vectors)  # two files of 700
    run = uid_run(tmp_path / "run", uids)
    first, second = sorted((tmp_path / "files").glob("*.parquet"))
    table = pq.read_table(second)
    pq.write_table(table.set_column(0, "uid", pa.array([uids[3], *uids[701:]])), second)  # sample 3 in both files
    features = ["--features-from", tmp_path / "files", "--embedding-column", "image,text", "--out", tmp_path / "d"]
    assert _refused(run, *features) == (
        f"Error: --features-from: uid '{uids[3]}' is in the files more than once (in {first} and {second}) "
        "(hint: one row per sample: a sample embedded twice would count as two; drop the repeated rows or the "
        "repeated file)")
    pq.write_table(table.set_column(0, "uid", pa.array([uids[702], *uids[701:]])), second)  # twice in one file
    assert f"uid '{uids[702]}' is in the files more than once (2 times in {second})" in _refused(run, *features)
    assert not (tmp_path / "d").exists()
