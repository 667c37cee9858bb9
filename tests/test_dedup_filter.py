"""`filter --dedup` on hand-written score tables and pairs: the groups, the kept member, the reasons,
the composition with the rules, anchors, and the exact duplicates counted from the content hashes."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from helpers import score_row, write_score_run

from mimicfilter.curate.dedup import EDGE_SCHEMA
from mimicfilter.curate.groups import components, spanning_forest
from mimicfilter_cli.main import cli

SHARD = "/data/pool-00000.tar"


def sha1(text: str) -> bytes:
    return hashlib.sha1(text.encode()).digest()


def _rows(count: int = 20, epochs: int = 1) -> list[dict]:
    """Sample i scores i / 10 (clip score: the reverse order); 0, 1, 2 are byte-identical pairs."""
    rows = []
    for index in range(count):
        image, caption = ("same-image", "same caption") if index < 3 else (f"image {index}", f"caption {index}")
        for epoch in range(epochs):
            row = score_row(SHARD, f"k{index:03d}", index, epoch, index / 10, clip=1 - index / 100)
            rows.append(row | {"image_sha1": sha1(image), "caption_sha1": sha1(caption)})
    return rows


def _pairs_dir(path, edges: list[tuple[int, int, float]], mode: str = "pair", max_epsilon: float = 0.15):
    """A finished `mimicfilter dedup` output holding ``edges`` (index a, index b, similarity)."""
    (path / "edges").mkdir(parents=True)
    columns = {name: [] for name in EDGE_SCHEMA.names}
    for a, b, similarity in edges:
        for side, index in (("a", a), ("b", b)):
            columns[f"shard_{side}"].append(SHARD)
            columns[f"key_{side}"].append(f"k{index:03d}")
            columns[f"uid_{side}"].append(None)
            columns[f"index_{side}"].append(index)
        columns["similarity"].append(similarity)
        columns["image_similarity"].append(similarity)
        columns["text_similarity"].append(similarity)
    pq.write_table(pa.table(columns, schema=EDGE_SCHEMA), path / "edges" / "cells-00000000-00000001.parquet")
    (path / "run.json").write_text(json.dumps({"command": "dedup", "match": ["shard", "index"], "fingerprint": {
        "dedup_on": mode, "max_epsilon": max_epsilon}}))
    (path / "_SUCCESS").write_text("")
    return path


@pytest.fixture
def run(tmp_path):
    """A run whose dedup/ holds near pairs: {5, 6, 7} at similarity 0.99 and 0.97, {10, 11} at 0.88."""
    directory = write_score_run(tmp_path / "run", _rows(), [SHARD])
    _pairs_dir(directory / "dedup", [(5, 6, 0.99), (6, 7, 0.97), (10, 11, 0.88)])
    return directory


def _filter(run, out, *options):
    result = CliRunner().invoke(cli, ["filter", str(run), "--out", str(out), *options])
    assert result.exit_code == 0, result.output
    manifest = {row["index"]: row for row in pq.read_table(out / "manifest.parquet").to_pylist()}
    return manifest, json.loads((out / "summary.json").read_text())


def test_groups_join_exact_and_near_duplicates_and_keep_the_best(run, tmp_path):
    manifest, summary = _filter(run, tmp_path / "out", "--dedup", "--keep-votes")
    dropped = {index: row["reason"] for index, row in manifest.items() if row["duplicate_of"] is not None}
    # the best by mimic_score (the default: higher index) stays; the reason names it
    assert dropped == {0: f"duplicate of {SHARD}/k002", 1: f"duplicate of {SHARD}/k002",
                       5: f"duplicate of {SHARD}/k007", 6: f"duplicate of {SHARD}/k007"}
    assert all(not manifest[index]["kept"] for index in dropped)
    assert manifest[0]["duplicate_group"] == manifest[2]["duplicate_group"] != manifest[5]["duplicate_group"]
    assert manifest[10]["duplicate_group"] is None  # 0.88 < 1 - 0.1
    assert summary["dedup"] | {"sources": None} == summary["dedup"] | {
        "groups": 2, "samples_in_groups": 6, "dropped": 4, "largest": [3, 3], "epsilon": 0.1, "on": "pair",
        "keep": "mimic_score:highest", "sources": None}
    assert summary["reasons"]["duplicate of a kept sample"] == 4
    assert summary["duplicates"]["content"] == {"counted": True, "on": "pair", "groups": 1, "samples": 3, "largest": 3,
                                                "example": f"{SHARD}/k000"}


def test_the_threshold_and_the_keep_column_are_the_users(run, tmp_path):
    manifest, summary = _filter(run, tmp_path / "loose", "--dedup", "--dedup-threshold", "0.15", "--dedup-keep",
                                "clip_score")
    assert {index for index, row in manifest.items() if row["duplicate_of"]} == {1, 2, 6, 7, 11}  # lowest index: best clip
    assert summary["dedup"]["groups"] == 3
    manifest, _ = _filter(run, tmp_path / "strict", "--dedup", "--dedup-threshold", "0.02", "--dedup-keep",
                          "clip_score:lowest")
    assert {index for index, row in manifest.items() if row["duplicate_of"]} == {0, 1, 5}  # {5, 6}: 0.99 only
    manifest, _ = _filter(run, tmp_path / "rule", "--dedup", "--bottom-frac", "mimic_score=0.5")
    assert {index for index, row in manifest.items() if row["duplicate_of"]} == {1, 2, 6, 7}  # the rule's column, lowest


def test_dedup_then_top_frac_equals_top_frac_of_the_deduplicated_pool(run, tmp_path):
    manifest, summary = _filter(run, tmp_path / "out", "--dedup", "--top-frac", "mimic_score=0.5")
    survivors = [row for row in manifest.values() if row["duplicate_of"] is None]
    best = sorted(survivors, key=lambda row: (-row["mimic_score"], row["index"]))[: len(survivors) // 2]
    assert {row["index"] for row in manifest.values() if row["kept"]} == {row["index"] for row in best}
    assert summary["kept"] == len(survivors) // 2 == 8

    # the same rule on a pool that never had the duplicates keeps the same samples
    pool = [row for row in _rows() if row["index"] in {row["index"] for row in survivors}]
    deduplicated = write_score_run(tmp_path / "deduplicated", pool, [SHARD])
    other, _ = _filter(deduplicated, tmp_path / "plain", "--top-frac", "mimic_score=0.5")
    assert {index for index, row in other.items() if row["kept"]} == {row["index"] for row in best}


def test_the_quality_estimate_counts_groups_not_copies(tmp_path):
    rows = []
    for index in range(40):  # 20 distinct clean samples, then 20 copies of one bad banner
        banner = index >= 20
        score = -1.0 if banner else 1.0 + index / 100
        row = score_row(SHARD, f"k{index:03d}", index, 0, score)
        rows.append(row | {"image_sha1": sha1("banner" if banner else f"image {index}"),
                           "caption_sha1": sha1("banner" if banner else f"caption {index}")})
    run = write_score_run(tmp_path / "run", rows, [SHARD])
    _, plain = _filter(run, tmp_path / "plain", "--binarize", "sign")
    _, deduplicated = _filter(run, tmp_path / "dedup", "--binarize", "sign", "--dedup")
    assert plain["relative_score"] == pytest.approx(0.5)
    assert deduplicated["relative_score"] == pytest.approx(20 / 21)  # one banner group, not twenty votes
    assert "exact duplicates only" in " ".join(deduplicated["warnings"])


def test_anchors_are_never_grouped_with_pool_samples(tmp_path):
    rows = _rows(6)
    anchor = rows[3] | {"key": "trusted", "index": 0, "shard": "/data/trusted.tar", "anchor": "trusted",
                        "image_sha1": rows[4]["image_sha1"], "caption_sha1": rows[4]["caption_sha1"]}
    run = write_score_run(tmp_path / "run", rows + [anchor], [SHARD])
    manifest, summary = _filter(run, tmp_path / "out", "--dedup", "--keep-votes")
    assert summary["duplicates"]["content"]["samples"] == 3  # the three byte-identical pool samples only
    assert manifest[4]["duplicate_group"] is None and len(manifest) == 6


def test_refusals_are_one_line(run, tmp_path):
    def refused(*options):
        result = CliRunner().invoke(cli, ["filter", str(run), "--out", str(tmp_path / "x"), *options])
        assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, result.output
        return result.output

    assert "looser than the search" in refused("--dedup", "--dedup-threshold", "0.2")
    assert "need --dedup" in refused("--dedup-keep", "clip_score")
    assert "not a column" in refused("--dedup", "--dedup-keep", "votes")
    assert "not a `mimicfilter dedup` output" in refused("--dedup", "--dedup-from", str(tmp_path))
    (run / "dedup" / "_SUCCESS").unlink()
    assert "has not finished" in refused("--dedup")


def test_components_and_the_spanning_forest_agree_with_a_plain_union_find():
    rng = np.random.default_rng(0)
    for _ in range(100):
        count, edges = int(rng.integers(1, 40)), int(rng.integers(0, 80))
        a, b = rng.integers(0, count, edges), rng.integers(0, count, edges)
        weight = rng.choice([0.8, 0.9, 0.95, 0.99, 1.0], edges)
        parent = list(range(count))

        def root(node):
            while parent[node] != node:
                node = parent[node]
            return node

        for x, y in zip(a, b):
            low, high = sorted((root(x), root(y)))
            parent[high] = low
        assert components(count, a, b).tolist() == [min(n for n in range(count) if root(n) == root(m)) for m in range(count)]
        forest = spanning_forest(count, a, b, weight)
        for threshold in (0.8, 0.9, 0.95, 0.99, 1.0):
            every, kept = weight >= threshold, forest[weight[forest] >= threshold]
            assert components(count, a[every], b[every]).tolist() == components(count, a[kept], b[kept]).tolist()
        shuffled = rng.permutation(edges)
        again = spanning_forest(count, a[shuffled], b[shuffled], weight[shuffled])
        assert sorted(zip(np.minimum(a, b)[forest], np.maximum(a, b)[forest])) == \
            sorted(zip(np.minimum(a, b)[shuffled][again], np.maximum(a, b)[shuffled][again]))


def test_report_shows_the_groups_the_funnel_step_and_the_largest_groups(tmp_path):
    from helpers import image_text_samples, write_tar

    shard = write_tar(tmp_path / "s.tar", image_text_samples(12))
    rows = []
    for index in range(12):
        row = score_row(str(shard), f"{index:08d}", index, 0, index / 10)
        same = "banner" if index in (3, 4, 5) else "logo" if index in (8, 9) else f"image {index}"
        rows.append(row | {"image_sha1": sha1(same), "caption_sha1": sha1(same)})
    run = write_score_run(tmp_path / "run", rows, [str(shard)])
    result = CliRunner().invoke(cli, ["report", str(run), "--out", str(tmp_path / "plain"), "--json"])
    assert result.exit_code == 0, result.output
    plain = json.loads(result.stdout)
    assert plain["duplicates"] | {"largest": None, "warnings": None} == plain["duplicates"] | {
        "source": "run", "removed": False, "groups": 2, "samples_in_groups": 5, "duplicates": 3, "largest": None,
        "warnings": None}
    assert "duplicates" not in plain["funnel"]  # the default rule keeps them
    group = plain["duplicates"]["largest"][0]
    assert group["size"] == 3 and [card["key"] for card in group["cards"]][0] == "00000005"  # the kept one first
    assert all(card["thumbnail"] for card in group["cards"])

    _filter(run, tmp_path / "curated", "--dedup", "--keep-votes")
    result = CliRunner().invoke(cli, ["report", str(run), "--filter-manifest", str(tmp_path / "curated" / "manifest.parquet"),
                                      "--out", str(tmp_path / "report"), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["duplicates"]["source"] == "manifest" and summary["funnel"]["duplicates"] == 3
    assert [reason["reason"] for reason in summary["drop_reasons"]].count("duplicate of a kept sample") == 1
    assert not any(reason["reason"].startswith("duplicate of /") for reason in summary["drop_reasons"])
    page = (tmp_path / "report" / "index.html").read_text()
    assert "id='duplicates'" in page and "one per duplicate group" in page and "duplicates dropped" in page
