"""Calibrated curation: mixture-proportion estimates with anchors, the calibrated cut, and anchors that
never reach a count, manifest, key, DataComp subset or curated shard."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from helpers import image_text_samples, score_row, write_score_run, write_tar

from mimicfilter.curate import calibrate
from mimicfilter.curate.datacomp import read_datacomp_npy
from mimicfilter.curate.mixture import (best_bin, clean_share, tail_curve, threshold_for_precision,
                                       threshold_for_recall, two_component)
from mimicfilter_cli.main import cli


def invoke(*args):
    return CliRunner().invoke(cli, [str(arg) for arg in args], catch_exceptions=False)


# the numbers ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("share", [1.0, 0.7, 0.3])
def test_best_bin_and_two_components_recover_the_clean_share(share):
    rng = np.random.default_rng(0)
    clean, noise = lambda n: rng.normal(1.0, 0.5, n), lambda n: rng.normal(-1.0, 0.5, n)  # noqa: E731
    pool = np.concatenate([clean(int(20_000 * share)), noise(20_000 - int(20_000 * share))])
    trusted, synthetic = clean(500), noise(500)
    upper = best_bin(pool, trusted).estimate
    assert share - 0.03 <= upper <= min(1.0, share + 0.05)
    assert two_component(pool, trusted, synthetic) == pytest.approx(share, abs=0.03)


def test_best_bin_is_an_upper_bound_when_noise_reaches_the_top():
    rng = np.random.default_rng(1)
    pool = np.concatenate([rng.normal(0.3, 1, 6000), rng.normal(0, 1, 4000)])  # barely apart
    upper = best_bin(pool, rng.normal(0.3, 1, 500)).estimate
    assert upper >= 0.6 - 0.03


def test_the_curve_and_the_cuts_follow_the_trusted_tail():
    rng = np.random.default_rng(2)
    pool = np.concatenate([rng.normal(1, 0.3, 8000), rng.normal(-1, 0.3, 2000)])
    trusted = rng.normal(1, 0.3, 400)
    curve = tail_curve(pool, trusted, 0.8)
    assert curve["kept"][0] == 1.0 and curve["recall"][0] == 1.0 and curve["precision"][0] == pytest.approx(0.8)
    assert np.all(np.diff(curve["kept"]) <= 0)
    at_95 = threshold_for_recall(trusted, 0.95)
    assert np.mean(trusted >= at_95) >= 0.95 and np.mean(trusted > at_95) < 0.95
    precise = threshold_for_precision(pool, trusted, 0.8, 0.99)
    assert precise is not None and np.mean(pool[pool >= precise] > 0) > 0.98  # estimated at 0.99
    assert threshold_for_precision(pool, trusted, 0.8, 1.01) is None


def _anchored(signals: dict, pool_of, trusted_of, best: str):
    from mimicfilter.curate.calibrate import Anchored, Signal

    by_name = {name: Signal(name) for name in signals}
    others = {name: (by_name[name], pool_of[name], trusted_of[name]) for name in signals}
    return Anchored(pool_of[best], trusted_of[best], np.zeros(10), by_name[best], signals, others)


def test_the_recall_cut_moves_to_the_signal_that_keeps_less_of_the_pool():
    """At the same recall of the clean samples, the signal whose cut keeps less drops more noise: the
    cut moves there when it keeps less by more than the trusted recall's standard error."""
    from mimicfilter.curate.calibrate import cut_signal

    rng = np.random.default_rng(5)
    clean = rng.normal(1, 0.5, 7000)
    # "sharp" sees the noise far below the clean samples; "blurry" (the better AUROC on the anchors) does not
    pool_of = {"blurry": np.concatenate([clean, rng.normal(0.6, 0.5, 3000)]),
               "sharp": np.concatenate([clean, rng.normal(-2, 0.5, 3000)])}
    trusted_of = {name: rng.normal(1, 0.5, 200) for name in pool_of}
    data = _anchored({"blurry": 0.95, "sharp": 0.90}, pool_of, trusted_of, "blurry")
    signal, values, threshold = cut_signal(data, 0.95)
    assert signal.name == "sharp" and np.mean(values >= threshold) < 0.75
    # the same signal twice: no gap beyond sampling error, the estimate's signal stays
    same = _anchored({"blurry": 0.95, "twin": 0.90}, {"blurry": pool_of["blurry"], "twin": pool_of["blurry"]},
                     {"blurry": trusted_of["blurry"], "twin": trusted_of["blurry"]}, "blurry")
    assert cut_signal(same, 0.95)[0].name == "blurry"
    # a pool the KS test cannot tell from the trusted sample: every signal keeps about r, no move
    calm = _anchored({"blurry": 0.95, "sharp": 0.90}, {"blurry": clean, "sharp": clean - 0.3},
                     {"blurry": clean[:200], "sharp": clean[:200]}, "blurry")
    assert cut_signal(calm, 0.95)[0].name == "blurry"


def test_the_recall_cut_does_not_move_for_a_lucky_trusted_tail():
    """Two signals with the same pool, one with a trusted sample whose low tail lies high right at the
    95 % order statistic: at that one threshold it keeps 3 points less, beyond the standard error, but
    it drops nothing the other would not at the same recall. Averaged over the recall targets near
    0.95 the gap is luck, so the cut stays on the estimate's signal."""
    from mimicfilter.curate.calibrate import cut_signal
    from mimicfilter.curate.mixture import kept_near, recall_error, threshold_for_recall

    rng = np.random.default_rng(7)
    pool = np.concatenate([rng.normal(1, 0.5, 7000), rng.normal(0.2, 0.5, 3000)])
    steady = np.sort(rng.normal(1, 0.5, 200))
    lucky = steady.copy()
    lucky[10:14] = lucky[14]  # the 11th–14th lowest of 200 pushed up to the 15th
    at_target = {name: np.mean(pool >= threshold_for_recall(t, 0.95)) for name, t in (("steady", steady), ("lucky", lucky))}
    assert at_target["lucky"] < at_target["steady"] - recall_error(0.95, 200)
    assert abs(kept_near(pool, lucky, 0.95) - kept_near(pool, steady, 0.95)) < recall_error(0.95, 200)
    data = _anchored({"steady": 0.95, "lucky": 0.90}, {"steady": pool, "lucky": pool},
                     {"steady": steady, "lucky": lucky}, "steady")
    assert cut_signal(data, 0.95)[0].name == "steady"


# filter with anchors --------------------------------------------------------------------------------


def anchored_run(tmp_path, clean_share=0.7, trusted=200, synthetic=200, epochs=1, seed=0, gap=2.0):
    """Real shards, and a score table whose clip_score is N(1, .5) for clean pairs and N(-1, .5) for
    corrupted ones, with trusted and synthetic anchor rows drawn the same way."""
    rng = np.random.default_rng(seed)
    (tmp_path / "shards").mkdir(exist_ok=True)
    shard = str(write_tar(tmp_path / "shards" / "s0.tar", image_text_samples(1000)))
    truth, rows = {}, []
    for index in range(1000):
        clean = index < int(1000 * clean_share)
        truth[f"{index:08d}"] = clean
        value = float(rng.normal(gap / 2 if clean else -gap / 2, 0.5))
        for epoch in range(epochs):
            rows.append(score_row(shard, f"{index:08d}", index, epoch, float(rng.normal(0, 1)), uid=f"{index:032x}",
                                  clip=value))
    for kind, count, centre in (("trusted", trusted, gap / 2), ("synthetic", synthetic, -gap / 2)):
        anchor_shard = shard + "#synthetic" if kind == "synthetic" else str(tmp_path / "trusted.tar")
        for index in range(count):
            value = float(rng.normal(centre, 0.5))
            for epoch in range(epochs):
                row = score_row(anchor_shard, f"{kind}{index}", index, epoch, float(rng.normal(0, 1)),
                                uid=f"{index:032x}", clip=value)  # uids that collide with the pool's on purpose
                rows.append(row | {"anchor": kind})
    return write_score_run(tmp_path / "run", rows, [shard], epochs=epochs), truth


def test_a_calibrated_estimate_and_its_default_cut(tmp_path):
    run, truth = anchored_run(tmp_path, clean_share=0.7)
    out = tmp_path / "out"
    result = invoke("filter", run, "--out", out, "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    calibrated = summary["quality"]["calibrated"]
    assert set(calibrated) == {"value", "low", "high", "trusted", "synthetic", "signal"}
    assert calibrated["signal"] == "clip_score" and calibrated["trusted"] == 200 and calibrated["synthetic"] == 200
    assert calibrated["low"] <= 0.7 <= calibrated["high"] and abs(calibrated["value"] - 0.7) < 0.05
    assert summary["quality_estimate"] == calibrated["value"]
    assert summary["rules"]["keep"][0].startswith("calibrated clip_score>=")
    assert summary["calibration"]["separation"]["clip_score"] > 0.95
    cut = summary["calibration"]["cut"]
    assert cut["target"] == {"recall": 0.95} and cut["recall"] >= 0.95
    # what the cut's signal was chosen from: every signal's kept share at the target, the cut's among them
    assert set(cut["kept_by_signal"]) == set(summary["calibration"]["separation"])
    assert cut["kept_by_signal"]["clip_score"] == pytest.approx(cut["kept"], abs=0.02)
    assert min(cut["kept_by_signal"].values()) == cut["kept_by_signal"]["clip_score"]  # mimic_score: noise
    manifest = pq.read_table(out / "manifest.parquet").to_pylist()
    kept_clean = sum(row["kept"] and truth[row["key"]] for row in manifest)
    assert kept_clean / sum(truth.values()) >= 0.9  # the cut keeps the clean samples it promises
    assert summary["headline"]["label"] == "kept fraction"


def test_targets_choose_the_cut(tmp_path):
    run, _ = anchored_run(tmp_path, clean_share=0.5, gap=1.0)
    precise = json.loads(invoke("filter", run, "--dry-run", "--json", "--target-precision", "0.95").stdout)
    loose = json.loads(invoke("filter", run, "--dry-run", "--json", "--target-recall", "0.95").stdout)
    assert precise["calibration"]["cut"]["precision"] >= 0.95 and loose["calibration"]["cut"]["recall"] >= 0.95
    assert precise["kept"] < loose["kept"]
    assert invoke("filter", run, "--dry-run", "--target-precision", "1.5").exit_code == 2
    assert "choose the calibrated cut" in invoke("filter", run, "--dry-run", "--target-recall", "0.9",
                                                  "--top-frac", "clip_score=0.5").stderr


def test_a_report_of_a_filter_manifest_describes_the_cut_the_filter_made(tmp_path):
    run, _ = anchored_run(tmp_path, clean_share=0.5, gap=1.0)
    for target in (["--target-precision", "0.95"], ["--target-recall", "0.9"], []):
        out = tmp_path / f"filter{len(target) and target[1]}"
        assert invoke("filter", run, "--out", out, *target).exit_code == 0
        made = json.loads((out / "summary.json").read_text())["calibration"]["cut"]
        result = invoke("report", run, "--filter-manifest", out / "manifest.parquet", "--out", out / "report",
                        "--sheet-size", "0", "--json")
        assert result.exit_code == 0, result.output
        shown = json.loads(result.stdout)["calibration"]["cut"]
        assert shown["target"] == made["target"] and shown["rule"] == made["rule"], target
    # a summary.json edited by hand into other shapes: the default cut, not a traceback
    summary_file = out / "summary.json"
    for calibration in ("x", {"cut": []}, {"cut": {"target": {"recall": True}}}):
        summary_file.write_text(json.dumps(json.loads(summary_file.read_text()) | {"calibration": calibration}))
        result = invoke("report", run, "--filter-manifest", out / "manifest.parquet", "--out", out / "report",
                        "--sheet-size", "0", "--json")
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout)["calibration"]["cut"]["target"] == {"recall": 0.95}


def test_a_cut_that_keeps_nothing_has_no_precision():
    """Not "precision 100 %" of an empty set (a --target-recall below what the trusted sample can measure)."""
    from types import SimpleNamespace

    data = calibrate.Anchored(np.arange(10.0), np.arange(20.0), np.zeros(20), calibrate.Signal("clip_score"), {})
    expected = calibrate._expected(data, SimpleNamespace(value=0.7), data.signal, 50.0)
    assert expected["kept"] == 0 and expected["precision"] is None


def test_anchors_never_reach_a_count_or_an_output(tmp_path):
    run, _ = anchored_run(tmp_path, clean_share=0.7)
    out = tmp_path / "out"
    result = invoke("filter", run, "--out", out, "--where", "true", "--keys", out / "keys.txt",
                    "--datacomp-npy", out / "subset.npy", "--write-shards", out / "shards", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["samples"] == summary["ok"] == summary["kept"] == 1000 and summary["score_rows"] == 1000
    manifest = pq.read_table(out / "manifest.parquet").to_pylist()
    assert len(manifest) == 1000 and all(row["shard"].endswith("s0.tar") for row in manifest)
    keys = (out / "keys.txt").read_text().splitlines()
    assert len(keys) == 1000 and not any("trusted" in line or "synthetic" in line for line in keys)
    assert len(read_datacomp_npy(out / "subset.npy")) == 1000
    assert sum(shard["nsamples"] for shard in summary["curated_shards"]) == 1000
    assert "duplicates" in summary and summary["duplicates"]["uids"]["names"] == 0  # anchors' uids are not pool uids
    report = invoke("report", run, "--out", tmp_path / "report", "--sheet-size", "2", "--json")
    assert report.exit_code == 0, report.output
    shown = json.loads(report.stdout)
    assert shown["samples"] == 1000 and shown["quality"]["calibrated"]["trusted"] == 200
    assert shown["quality_estimate"] == shown["quality"]["calibrated"]["value"] and shown["rule"].startswith("calibrated")
    page = (tmp_path / "report" / "index.html").read_text()
    assert "Dataset quality estimate" in page and "calibrated_cut.svg" in page
    assert "The cut at recall 0.95 is made on clip_score; the pool share each signal" in page


def test_without_anchors_nothing_is_called_a_quality_estimate(tmp_path):
    rows = [score_row("x.tar", f"k{i}", i, 0, float(i % 7) - 3) for i in range(60)]
    run = write_score_run(tmp_path / "run", rows, ["x.tar"])
    result = invoke("filter", run, "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert "quality estimate" not in result.output.lower() and "relative score" in result.stderr
    assert "--trusted" in result.stderr
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["quality_estimate"] is None and summary["quality"]["calibrated"] is None
    assert summary["headline"]["label"] == "relative score"
    report = invoke("report", run, "--out", tmp_path / "report", "--sheet-size", "0")
    assert report.exit_code == 0 and "quality estimate" not in report.output.lower()
    page = (tmp_path / "report" / "index.html").read_text().lower()
    assert "quality estimate" not in page and "relative score" in page
    assert invoke("filter", run, "--dry-run", "--target-recall", "0.9").exit_code == 2


def test_confusable_negatives_explain_noise_between_clean_and_random_flips():
    """Label noise between look-alike classes scores between the clean samples and random flips: with
    random flips alone the fit reads such a pool high; with the confusable kind as a second negative,
    it reads the truth, and a pool of random-flip noise still reads its own truth."""
    rng = np.random.default_rng(7)
    trusted, synthetic, confusable = rng.normal(2, 1, 400), rng.normal(-2, 1, 400), rng.normal(0.3, 1, 400)
    look_alike = np.concatenate([rng.normal(2, 1, 6000), rng.normal(0.3, 1, 4000)])
    random_flips = np.concatenate([rng.normal(2, 1, 6000), rng.normal(-2, 1, 4000)])
    assert two_component(look_alike, trusted, synthetic) > 0.7
    assert two_component(look_alike, trusted, synthetic, confusable) == pytest.approx(0.6, abs=0.04)
    assert two_component(random_flips, trusted, synthetic, confusable) == pytest.approx(0.6, abs=0.04)
    assert two_component(trusted[:200], trusted[200:], synthetic, confusable) > 0.9  # a clean pool


def test_a_fit_above_the_best_bin_confidence_bound_gives_way_to_the_best_bin_estimate():
    # noise milder than the synthetic negatives: explained by trusted + synthetic, the pool reads too clean
    rng = np.random.default_rng(3)
    pool = np.concatenate([rng.normal(2, 0.5, 10_000), rng.normal(0, 0.5, 10_000)])
    trusted, synthetic = rng.normal(2, 0.5, 500), rng.normal(-3, 0.5, 500)
    assert two_component(pool, trusted, synthetic) > best_bin(pool, trusted).ceiling > 0.5
    share = clean_share(pool, trusted, synthetic, rounds=50)
    assert share.method == "best-bin" and share.value == pytest.approx(0.5, abs=0.05)
    assert share.low <= 0.5 <= share.high
    # the same pool with noise like the negatives: the fit stands
    like = np.concatenate([pool[:10_000], rng.normal(-3, 0.5, 10_000)])
    share = clean_share(like, trusted, synthetic, rounds=50)
    assert share.method == "two-component" and share.value == pytest.approx(0.5, abs=0.02)


def test_a_trusted_sample_over_filling_one_tail_does_not_pull_a_clean_pool_down_to_best_bin():
    # a clean pool; 20 of the 200 trusted values come from its top 5 %: the tail ratio there reads π ≈ 0.34,
    # but the confidence bound at that tail (0.96) does not rule out the fit, which stands
    rng = np.random.default_rng(0)
    pool, synthetic = rng.normal(0, 1, 20_000), rng.normal(-3, 0.5, 200)
    top = rng.normal(0, 1, 20_000)
    trusted = np.concatenate([rng.normal(0, 1, 180), top[top > 1.6][:20]])
    assert best_bin(pool, trusted).estimate < 0.4
    share = clean_share(pool, trusted, synthetic, rounds=100)
    assert share.method.startswith("two-component") and share.value >= 0.95 and share.high == 1.0
