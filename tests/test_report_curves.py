"""The report's threshold numbers (cut, keep curve, budgets) and pool distributions, against hand
computation and against what `filter` actually keeps."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from mimicfilter.report.build import ReportConfig, build_report
from mimicfilter.report.curves import budgets, equivalent_cut, keep_curve
from mimicfilter.store.parts import write_part
from mimicfilter.store.schema import rows_to_table
from mimicfilter_cli.main import cli
from test_report import DECODE, assert_svg_drawn, score_row


def test_the_cut_of_a_threshold_rule_is_that_threshold():
    scores = np.array([0.1, 0.5, 0.2, 0.9, 0.7, 0.3])
    cut = equivalent_cut(scores, scores > 0.4)
    assert cut.agreement == 1.0 and 0.3 < cut.mimic_score < 0.5
    assert cut.mimic_score == pytest.approx(0.4)  # midway between the neighbours


def test_the_cut_of_a_rule_on_something_else_says_how_well_it_agrees():
    scores = np.arange(10, dtype=float)
    kept = scores >= 5
    kept[2] = True  # one low sample kept for another reason
    cut = equivalent_cut(scores, kept)
    assert cut.mimic_score == pytest.approx(4.5) and cut.agreement == pytest.approx(0.9)


def test_no_cut_when_the_rule_keeps_all_or_nothing_or_ties_decide():
    scores = np.array([1.0, 2.0, 3.0])
    assert equivalent_cut(scores, np.ones(3, bool)) is None
    assert equivalent_cut(scores, np.zeros(3, bool)) is None
    tied = np.array([1.0, 1.0, 1.0, 2.0])
    cut = equivalent_cut(tied, np.array([True, False, False, True]))  # never cuts between equal scores
    assert cut.mimic_score == pytest.approx(1.5) and cut.agreement == pytest.approx(0.75)


def test_keep_curve_and_budgets_by_hand():
    scores = np.array([3.0, 1.0, 4.0, 2.0, 5.0, 0.0, 6.0, 7.0, 8.0, 9.0])
    clip = np.array([0.3, 0.1, 0.4, 0.2, 0.5, 0.0, 0.6, 0.7, np.nan, 0.9])
    curve = keep_curve(scores, clip)
    assert curve.threshold.tolist() == [9, 8, 7, 6, 5, 4, 3, 2, 1, 0]
    assert curve.kept_share.tolist() == pytest.approx([0.1 * k for k in range(1, 11)])
    assert curve.mean_clip[:3].tolist() == pytest.approx([0.9, 0.9, 0.8])  # the NaN is skipped, not zero
    rows = {row["kept_share"]: row for row in budgets(curve)}
    assert rows[0.3]["threshold"] == 7 and rows[0.3]["mean_clip_score"] == pytest.approx(0.8)
    assert rows[0.5]["filter_option"] == "--top-frac mimic_score=0.5"
    assert keep_curve(np.array([]), np.array([])) is None and budgets(None) == []


@pytest.fixture
def pool_run(tmp_path):
    """300 samples in 3 shards, hand-made score parts with the pool columns (every tenth sample
    without an image size, as for an undecodable image)."""
    run = tmp_path / "run"
    rng = np.random.default_rng(0)
    for part in range(3):
        rows = [score_row(f"s{part}.tar", f"{i:08d}", i, 0, float(rng.normal(i % 7, 1))) for i in range(100)]
        table = rows_to_table(rows)
        chars = [10 + (i % 50) for i in range(100)]
        width = [None if i % 10 == 0 else 64 * (1 + i % 4) for i in range(100)]
        height = [None if i % 10 == 0 else 48 for i in range(100)]
        for name, values in (("caption_chars", chars), ("image_width", width), ("image_height", height)):
            table = table.set_column(table.schema.get_field_index(name), pa.field(name, pa.int32()),
                                     pa.array(values, pa.int32()))
        (run / "scores").mkdir(parents=True, exist_ok=True)
        pq.write_table(table, run / "scores" / f"part-{part}.parquet")
    (run / "run.json").write_text(json.dumps({"shards": [f"s{p}.tar" for p in range(3)],
                                              "fingerprint": {"task": "contrastive", "decode": DECODE}}))
    return run


def test_pool_distributions_come_from_the_table_columns(pool_run, tmp_path):
    summary = build_report(ReportConfig(run_dir=pool_run, out_dir=tmp_path / "report", sheet_size=0))
    pool = summary["pool"]
    assert pool["columns"] == ["caption_chars", "image_width", "image_height"]
    assert pool["caption_chars"]["all"]["median"] == pytest.approx(np.median([10 + i % 50 for i in range(100)]))
    assert pool["caption_chars"]["unknown"] == 0
    assert pool["image_width"]["unknown"] == 30 and pool["image_width"]["all"]["samples"] == 270
    assert pool["shorter_side"]["all"]["median"] == 48  # min(64.., 48)
    kept = pool["caption_chars"]["kept"]["samples"] + pool["caption_chars"]["not_kept"]["samples"]
    assert kept == 300 and pool["caption_chars"]["kept"]["samples"] == summary["kept"]
    assert {"caption_lengths", "image_sizes"} <= set(summary["images"])
    for name in ("caption_lengths", "image_sizes"):
        assert_svg_drawn(tmp_path / "report" / summary["images"][name])
    page = (tmp_path / "report" / "index.html").read_text()
    assert "caption_lengths.svg" in page and "image_sizes.svg" in page and "has no <code>caption_chars" not in page


def test_a_run_without_pool_columns_says_so(pool_run, tmp_path):
    rows = [score_row("s.tar", f"{i:08d}", i, 0, float(i)) for i in range(20)]
    run = tmp_path / "plain"
    write_part(rows_to_table(rows), run / "scores" / "part.parquet")
    (run / "run.json").write_text(json.dumps({"shards": ["s.tar"], "fingerprint": {"task": "contrastive", "decode": DECODE}}))
    summary = build_report(ReportConfig(run_dir=run, out_dir=tmp_path / "report", sheet_size=0))
    assert summary["pool"] == {"columns": []}
    assert not {"caption_lengths", "image_sizes"} & set(summary["images"])
    assert "has no <code>caption_chars</code>" in (tmp_path / "report" / "index.html").read_text()


def test_a_budget_keeps_what_filter_top_frac_keeps(pool_run, tmp_path):
    summary = build_report(ReportConfig(run_dir=pool_run, out_dir=tmp_path / "report", sheet_size=0))
    budget = next(row for row in summary["budgets"] if row["kept_share"] == 0.3)
    result = CliRunner().invoke(cli, ["filter", str(pool_run), "--out", str(tmp_path / "curated"),
                                      *budget["filter_option"].split()], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    manifest = pq.read_table(tmp_path / "curated" / "manifest.parquet").to_pylist()
    kept_scores = [row["mimic_score"] for row in manifest if row["kept"]]
    assert len(kept_scores) == 90  # 30 % of 300
    assert min(kept_scores) == pytest.approx(budget["threshold"])
    curve = {point["kept_share"]: point for point in summary["keep_curve"]}
    assert curve[0.3]["threshold"] == pytest.approx(budget["threshold"]) and len(curve) == 101
