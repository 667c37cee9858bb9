"""The quality estimate: every vote rule on score tables with known mixtures, the interval, the
warnings, and the label that follows the rule (filter and report alike)."""

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from mimicfilter.curate.filter import FilterConfig, run_filter
from mimicfilter.curate.rules import parse_rule
from mimicfilter.curate.votes import AggregateConfig, Mixture
from mimicfilter.store.parts import write_part
from mimicfilter.store.schema import rows_to_table
from mimicfilter_cli.main import cli

SAMPLES = 3000


def write_scores(directory: Path, scores: np.ndarray) -> Path:
    """A score table with ``scores[epoch, sample]`` (every sample ok, in one shard)."""
    rows = [
        {"shard": "s.tar", "key": f"k{sample:05d}", "uid": None, "index": sample, "epoch": epoch, "step": sample // 256,
         "status": "ok", "error": None, "mimic_score": float(score), "mimic_weight": 1.0, "loss": 1.0,
         "clip_score": 0.3, "ref_loss": 1.0, "label": None}
        for epoch, row in enumerate(scores) for sample, score in enumerate(row)
    ]
    write_part(rows_to_table(rows), directory / "scores" / "part.parquet")
    (directory / "_SUCCESS").write_text("")  # a finished run: no "unfinished" warning beside the estimate's
    return directory


def mixture(clean: float, clean_scores, noise_scores, epochs: int = 1, seed: int = 0) -> np.ndarray:
    """``epochs`` rows of scores: the first round(clean * n) samples clean, the rest noise."""
    rng = np.random.default_rng(seed)
    count = int(round(clean * SAMPLES))
    return np.stack([np.concatenate([clean_scores(rng, count), noise_scores(rng, SAMPLES - count)])
                     for _ in range(epochs)])


def normal(mean, sd):
    return lambda rng, count: rng.normal(mean, sd, count)


def clean_near_zero(rng, count):
    """Clean scores after a proxy trained for epochs: a narrow core just above 0 and a wider part,
    15 % of them below 0 (Fashion-MNIST's clean pool in its third epoch)."""
    return np.concatenate([rng.normal(0.12, 0.07, count // 2), rng.normal(0.17, 0.25, count - count // 2)])


# Known mixtures: (truth, scores). Clean samples score high; noise as measured in docs/benchmarks.md:
# a mismatched pair's score is symmetric around 0, a flipped label's lies well below 0.
MIXTURES = {
    # all clean, one bump with a long upper tail (the shape): nothing to split
    "all clean, skewed": (1.0, lambda: mixture(1.0, lambda rng, n: rng.gamma(2.0, 0.6, n) + 0.2, normal(0, 1))),
    # all clean, a Gaussian bump
    "all clean": (1.0, lambda: mixture(1.0, normal(2.0, 0.5), normal(0, 1))),
    # all clean, a bump whose lower tail crosses 0
    "all clean, near 0": (1.0, lambda: mixture(1.0, clean_near_zero, normal(0, 1))),
    # bimodal, well apart (flipped labels with a good reference), over 3 epochs
    "bimodal": (0.7, lambda: mixture(0.7, normal(2.0, 0.4), normal(-2.0, 0.5), epochs=3)),
    # one bump of clean scores plus noise symmetric around 0 (swapped captions)
    "symmetric noise": (0.7, lambda: mixture(0.7, normal(2.4, 0.45), normal(0.0, 0.85))),
}


def estimates(directory: Path, scores: np.ndarray) -> dict[str, dict]:
    run = write_scores(directory, scores)
    return {binarize: run_filter(FilterConfig(inputs=(str(run),), out_dir=None, dry_run=True,
                                              aggregation=AggregateConfig(binarize=binarize)))
            for binarize in ("mirror", "sign", "kmeans", "gmm")}


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    return {name: (truth, estimates(tmp_path_factory.mktemp(name.replace(" ", "-").replace(",", "")), make()))
            for name, (truth, make) in MIXTURES.items()}


def test_the_default_rule_is_mirror():
    assert AggregateConfig().binarize == "mirror"


@pytest.mark.parametrize("name", ["all clean, skewed", "all clean"])
def test_a_clean_pool_reads_clean_and_is_not_split_in_two(measured, name):
    truth, summaries = measured[name]
    default = summaries["mirror"]
    assert default["relative_score"] >= 0.99 and summaries["sign"]["relative_score"] >= 0.99
    # the clustering rules split any single bump in two: the failure the default avoids
    assert summaries["gmm"]["relative_score"] < 0.85 and summaries["kmeans"]["relative_score"] < 0.85
    quality = default["quality"]
    assert quality["second_mode"] == {"0": False}
    assert set(quality["by_rule"]) == {"mirror", "sign"}  # no clustering rule where there is nothing to cluster
    assert [w for w in default["warnings"] if "no second mode" in w and "uncertain" in w]
    assert not [w for w in default["warnings"] if "disagree" in w]


def test_a_clean_bump_whose_tail_crosses_zero_reads_clean(measured):
    truth, summaries = measured["all clean, near 0"]
    assert (mixture(1.0, clean_near_zero, normal(0, 1)) < 0).mean() > 0.1  # dropping twice that share would read the pool 70-80 % clean
    assert summaries["mirror"]["relative_score"] == 1.0
    assert summaries["mirror"]["kept"] == SAMPLES


def test_two_modes_every_rule_agrees(measured):
    truth, summaries = measured["bimodal"]
    for binarize, summary in summaries.items():
        assert summary["relative_score"] == pytest.approx(truth, abs=0.02), binarize
    default = summaries["mirror"]
    assert default["quality"]["second_mode"] == {"0": True, "1": True, "2": True}
    assert set(default["quality"]["by_rule"]) == {"mirror", "sign", "kmeans", "gmm"}
    assert default["quality"]["low"] <= truth <= default["quality"]["high"]
    assert default["warnings"] == []


def test_noise_symmetric_around_zero_is_counted_by_the_mirror_not_by_the_sign(measured):
    truth, summaries = measured["symmetric noise"]
    assert summaries["mirror"]["relative_score"] == pytest.approx(truth, abs=0.03)
    # half the noise scores above 0: the sign rule keeps it
    assert summaries["sign"]["relative_score"] == pytest.approx(truth + (1 - truth) / 2, abs=0.03)
    default = summaries["mirror"]
    assert default["quality"]["low"] <= truth <= default["quality"]["high"]
    disagreement = [w for w in default["warnings"] if "disagree" in w]
    assert disagreement and "sign" in disagreement[0]


def test_the_mixture_dip_finds_a_second_mode():
    assert Mixture((-2.0, 2.0), (0.25, 0.25), (0.3, 0.7)).second_mode()
    assert Mixture((-2.0, 2.0), (0.25, 0.25), (0.3, 0.7)).dip() < 0.1
    assert Mixture((0.0, 0.5), (1.0, 1.0), (0.5, 0.5)).dip() == 1.0  # one bump
    assert not Mixture((0.0, 0.5), (1.0, 1.0), (0.5, 0.5)).second_mode()


def filter_summary(run: Path, out: Path, *args: str) -> dict:
    result = CliRunner().invoke(cli, ["filter", str(run), "--out", str(out), *args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return json.loads((out / "summary.json").read_text())


def test_the_label_changes_with_the_rule(tmp_path):
    run = write_scores(tmp_path / "run", mixture(0.7, normal(2.0, 0.4), normal(-2.0, 0.5)))
    votes = filter_summary(run, tmp_path / "votes")
    assert votes["headline"]["label"] == "relative score"
    assert votes["headline"]["value"] == votes["relative_score"] == pytest.approx(0.7, abs=0.02)
    for args in (["--top-frac", "clip_score=0.3"], ["--top-k", "mimic_score=10"], ["--min", "mimic_score=1"],
                 ["--where", "loss < 2"], ["--keep-votes", "--drop", "bottom-frac:mimic_score=0.1"]):
        summary = filter_summary(run, tmp_path / "other", *args)
        assert summary["headline"]["label"] == "kept fraction", args
        assert summary["relative_score"] == votes["relative_score"]  # the pool's, whatever the rule
    assert summary["headline"]["value"] <= votes["headline"]["value"]  # the votes minus a drop rule
    top = filter_summary(run, tmp_path / "top", "--top-frac", "clip_score=0.3")
    assert top["headline"]["value"] == pytest.approx(0.3)


def test_report_shows_the_filters_label_estimate_interval_and_warnings(tmp_path):
    from mimicfilter.report.build import ReportConfig, build_report

    run = write_scores(tmp_path / "run", mixture(0.7, normal(2.4, 0.45), normal(0.0, 0.85)))
    (run / "run.json").write_text(json.dumps({"shards": [], "train": {"mode": "head", "epochs": 1},
                                              "fingerprint": {"task": "contrastive"}}))
    votes = filter_summary(run, tmp_path / "votes")
    report = build_report(ReportConfig(run_dir=run, out_dir=tmp_path / "report-votes", sheet_size=0))
    for field in ("headline", "quality_estimate", "relative_score", "quality", "warnings"):
        assert report[field] == votes[field], field
    page = (tmp_path / "report-votes" / "index.html").read_text()
    assert "Relative score" in page and "disagree" in page and "quality estimate" not in page.lower()
    top = tmp_path / "top"
    filter_summary(run, top, "--top-frac", "clip_score=0.3")
    result = CliRunner().invoke(cli, ["report", str(run), "--out", str(tmp_path / "report-top"), "--sheet-size", "0",
                                      "--filter-manifest", str(top / "manifest.parquet")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "report-top" / "report.json").read_text())
    assert report["headline"] == {"label": "kept fraction", "value": pytest.approx(0.3)}
    assert report["relative_score"] == votes["relative_score"]
    page = (tmp_path / "report-top" / "index.html").read_text()
    assert "Kept fraction" in page and "quality estimate" not in page.lower()
    assert "Kept fraction 30.0%" in " ".join(result.stderr.split())
    assert "warning:" in result.stderr.lower()


def test_rules_are_parsed_as_the_label_expects():
    assert parse_rule("keep-votes").text == "keep-votes"  # estimate_label compares this text


def test_filter_and_report_word_the_headline_alike():
    from mimicfilter.curate.estimate import CALIBRATE_HINT, headline_rows

    quality = {"value": 0.62, "low": 0.55, "high": 0.8}
    hint = ("calibration", CALIBRATE_HINT)
    votes = headline_rows({"label": "relative score", "value": 0.62}, quality)
    assert votes == [("relative score (kept / usable)", "62.0%"), ("range over the vote rules", "55.0%–80.0%"), hint]
    fixed = headline_rows({"label": "kept fraction", "value": 0.3}, quality)
    assert fixed == [("kept fraction (kept / usable)", "30.0%"),
                     ("relative score of the pool (votes)", "62.0% (range 55.0%–80.0%)"), hint]
    assert headline_rows({"label": "kept fraction", "value": None}, {"value": None}) == [
        ("kept fraction (kept / usable)", "–"), hint]
    calibrated = {"value": 0.71, "low": 0.66, "high": 0.75, "trusted": 200, "synthetic": 180, "signal": "clip_score"}
    rows = headline_rows({"label": "kept fraction", "value": 0.66}, quality | {"calibrated": calibrated})
    assert rows[1] == ("quality estimate (calibrated)", "71.0% (90% interval 66.0%–75.0%; 200 trusted and 180 "
                                                        "synthetic anchors, on clip_score)") and hint not in rows
