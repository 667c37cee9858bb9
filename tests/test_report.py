"""`mimicfilter report`: numbers against hand computation, files that exist, pictures that are not blank."""

import json
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from PIL import Image

from helpers import image_bytes, image_text_samples, write_tar
from mimicfilter.report.build import ReportConfig, build_report
from mimicfilter.store.parts import write_part
from mimicfilter.store.schema import rows_to_table
from mimicfilter_cli.main import cli

DECODE = {"task": "contrastive", "image_keys": ["jpg", "jpeg", "png", "webp"], "text_key": "txt", "label_key": "cls",
          "max_image_pixels": 89478485, "num_classes": None}


def score_row(shard, key, index, epoch, score, status="ok", error=None):
    ok = status == "ok"
    return {"shard": shard, "key": key, "uid": None, "index": index, "epoch": epoch, "step": index, "status": status,
            "error": error, "mimic_score": score if ok else None, "mimic_weight": float(np.exp(score)) if ok else None,
            "loss": 1.0 if ok else None, "clip_score": score / 10 if ok else None, "ref_loss": 0.5 if ok else None,
            "label": None}


@pytest.fixture
def run(tmp_path):
    """Two real shards and a hand-written score table of two epochs.

    Shard a: 6 samples, the first (key 00000000) has a corrupt JPEG in the shard and a decode_error row.
    Shard b: 4 samples, one of which (00000013) is missing from the shard when read back.
    """
    a_samples = image_text_samples(6)
    a_samples[0] = (a_samples[0][0], {**a_samples[0][1], "jpg": b"\xff\xd8 not a jpeg"})
    shard_a = write_tar(tmp_path / "a.tar", a_samples)
    shard_b = write_tar(tmp_path / "b.tar", image_text_samples(3, start=10))
    rows = []
    for epoch in (0, 1):
        rows.append(score_row(str(shard_a), "00000000", 0, epoch, None, "decode_error", "cannot decode image jpg"))
        for index in range(1, 6):
            rows.append(score_row(str(shard_a), f"{index:08d}", index, epoch, float(index) + epoch))
        for index in range(10, 14):
            rows.append(score_row(str(shard_b), f"{index:08d}", index - 10, epoch, float(index) + epoch))
    run_dir = tmp_path / "run"
    write_part(rows_to_table(rows), run_dir / "scores" / "part.parquet")
    run_info = {"shards": [str(shard_a), str(shard_b)], "train": {"mode": "head", "epochs": 2},
                "models": {"architecture": "tiny"}, "fingerprint": {"task": "contrastive", "decode": DECODE}}
    (run_dir / "run.json").write_text(json.dumps(run_info))
    return run_dir


def write_manifest(path: Path, kept: dict[tuple[str, str], bool]) -> Path:
    table = pa.table({"shard": [s for s, _ in kept], "key": [k for _, k in kept], "kept": list(kept.values())})
    pq.write_table(table, path)
    return path


def referenced_files(index: Path) -> list[str]:
    """The page's own files (src and href), leaving out in-page anchors and links to the docs."""
    found = re.findall(r"(?:src|href)='([^']+)'", index.read_text())
    return [name for name in found if not name.startswith(("#", "file:"))]


def assert_drawn(path: Path) -> None:
    if path.suffix == ".svg":
        assert_svg_drawn(path)
    elif path.suffix in (".png", ".jpg"):
        assert_not_blank(path)


def assert_not_blank(path: Path) -> None:
    with Image.open(path) as image:
        image.load()
        pixels = np.asarray(image.convert("L"), dtype=float)
    assert pixels.std() > 5, f"{path.name} looks blank"


def test_per_shard_quality_follows_the_filter_manifest(run, tmp_path):
    shard_a, shard_b = json.loads((run / "run.json").read_text())["shards"]
    decisions = {(shard_a, f"{i:08d}"): i % 2 == 1 for i in range(1, 6)}  # keeps 1, 3, 5 of 5 usable
    decisions |= {(shard_b, f"{i:08d}"): i == 13 for i in range(10, 14)}  # keeps 1 of 4
    decisions[(shard_a, "00000000")] = True  # a broken sample is never counted as kept
    manifest = write_manifest(tmp_path / "manifest.parquet", decisions)
    summary = build_report(ReportConfig(run_dir=run, out_dir=tmp_path / "report", filter_manifest=manifest))
    by_shard = {shard["shard"]: shard for shard in summary["shards_worst_first"]}
    assert (by_shard[shard_a]["samples"], by_shard[shard_a]["ok"], by_shard[shard_a]["kept"]) == (6, 5, 3)
    assert by_shard[shard_a]["quality"] == pytest.approx(3 / 5)
    assert by_shard[shard_b]["quality"] == pytest.approx(1 / 4)
    assert [shard["shard"] for shard in summary["shards_worst_first"]] == [shard_b, shard_a]  # worst first
    # a manifest without its summary.json may come from any rule: its share is a kept fraction
    assert summary["headline"] == {"label": "kept fraction", "value": pytest.approx(4 / 9)}
    assert summary["status_counts"]["decode_error"]["count"] == 1
    assert summary["status_counts"]["decode_error"]["examples"][0]["error"] == "cannot decode image jpg"


def test_default_rule_quality_equals_the_filter_summary(run, tmp_path):
    result = CliRunner().invoke(cli, ["filter", str(run), "--out", str(tmp_path / "curated")], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    filter_summary = json.loads((tmp_path / "curated" / "summary.json").read_text())
    summary = build_report(ReportConfig(run_dir=run, out_dir=tmp_path / "report"))
    assert summary["relative_score"] == pytest.approx(filter_summary["relative_score"])
    assert summary["headline"] == filter_summary["headline"]
    assert summary["headline"]["label"] == "relative score"
    assert summary["quality"] == filter_summary["quality"]
    for warning in summary["quality"]["warnings"]:  # the estimate's warnings, in both (beside their own)
        assert warning in summary["warnings"] and warning in filter_summary["warnings"]
    assert summary["kept"] == filter_summary["kept"] and summary["ok"] == filter_summary["ok"] == 9
    assert summary["rule"].startswith("keep-votes (mirror")


def assert_svg_drawn(path: Path) -> None:
    """A matplotlib SVG with a size (so a browser gives it a natural width) and something drawn in it."""
    import xml.etree.ElementTree as ElementTree

    root = ElementTree.parse(path).getroot()
    assert root.tag.endswith("svg") and root.get("width", "").endswith("pt") and root.get("height", "").endswith("pt")
    drawn = [element for element in root.iter() if element.tag.endswith(("path", "use", "image"))]
    assert len(drawn) > 20, f"{path.name} draws almost nothing"


def test_report_files_exist_open_and_are_not_blank(run, tmp_path):
    out = tmp_path / "report"
    result = CliRunner().invoke(cli, ["report", str(run), "--out", str(out), "--sheet-size", "4"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert f"Report: {out / 'index.html'}" in result.output
    page = (out / "index.html").read_text()
    assert "<meta name='viewport' content='width=device-width, initial-scale=1'>" in page
    references = referenced_files(out / "index.html")
    assert {"scores.svg", "keep_curve.svg", "score_vs_clip.svg", "report.json"} <= set(references)
    thumbnails = [name for name in references if name.startswith("thumbs/")]
    assert thumbnails, "the contact sheets show no thumbnail"
    for name in references:
        assert (out / name).is_file(), f"index.html references missing {name}"
        assert_drawn(out / name)
    report = json.loads((out / "report.json").read_text())
    assert report["plot_rows"]["score_rows_used"] == report["plot_rows"]["score_rows_total"] == 18
    assert report["plot_rows"]["samples_used"] == report["plot_rows"]["samples_total"] == 9
    assert not list(out.rglob(".*")), "temp files left behind"


def cards_of(summary: dict, sheet: str) -> dict[str, dict]:
    return {card["key"]: card for card in summary["sheets"][sheet]}


def test_missing_and_unreadable_images_are_labelled_on_the_sheet(run, tmp_path):
    """Lowest three: a/1 (readable), a/2 (readable), a/3 (lost: the shard is truncated inside a/3's image)."""
    shard_a = Path(json.loads((run / "run.json").read_text())["shards"][0])
    import tarfile

    with tarfile.open(shard_a) as tar:
        cut = next(member.offset_data for member in tar.getmembers() if member.name == "00000003.jpg") + 50
    shard_a.write_bytes(shard_a.read_bytes()[:cut])
    summary = build_report(ReportConfig(run_dir=run, out_dir=tmp_path / "report", sheet_size=3))
    lowest = cards_of(summary, "lowest")
    assert list(lowest) == ["00000001", "00000002", "00000003"]
    assert lowest["00000001"]["thumbnail"] and lowest["00000002"]["thumbnail"]
    assert lowest["00000003"]["thumbnail"] is None and "truncated tar" in lowest["00000003"]["error"]
    page = (tmp_path / "report" / "index.html").read_text()
    assert page.count("unreadable image") >= 1 and "truncated" in page
    shard_a.unlink()  # a shard that has gone away entirely
    summary = build_report(ReportConfig(run_dir=run, out_dir=tmp_path / "report2", sheet_size=3))
    assert all(card["thumbnail"] is None and card["error"] for card in summary["sheets"]["lowest"])


def test_contact_sheet_shows_what_the_decoder_says(run, tmp_path):
    from mimicfilter.shards.decode import DecodeConfig, decode_for_display
    from mimicfilter.shards.samples import iter_shard_samples

    shard_a = json.loads((run / "run.json").read_text())["shards"][0]
    shown = [decode_for_display(raw, DecodeConfig()) for raw in iter_shard_samples(shard_a)]
    assert shown[0].image is None and shown[0].error.startswith("cannot decode image jpg")
    assert shown[0].caption == "a picture number 0"  # the caption is shown even when the image is broken
    assert shown[1].image is not None and shown[1].caption == "a picture number 1" and shown[1].error is None


def test_sheets_pick_the_lowest_highest_borderline_and_random_samples(run, tmp_path):
    """Mean scores: a/1..5 = 1.5..5.5, b/10..13 = 10.5..13.5. The manifest keeps the top four (b),
    so the cut lies between a/5 (5.5) and b/10 (10.5)."""
    shard_a, shard_b = json.loads((run / "run.json").read_text())["shards"]
    decisions = {(shard_a, f"{i:08d}"): False for i in range(0, 6)} | {(shard_b, f"{i:08d}"): True for i in range(10, 14)}
    manifest = write_manifest(tmp_path / "manifest.parquet", decisions)
    summary = build_report(ReportConfig(run_dir=run, out_dir=tmp_path / "report", filter_manifest=manifest, sheet_size=2))
    assert summary["cut"] == {"mimic_score": pytest.approx(8.0), "agreement": 1.0}
    assert list(cards_of(summary, "lowest")) == ["00000001", "00000002"]
    assert list(cards_of(summary, "highest")) == ["00000013", "00000012"]
    assert list(cards_of(summary, "borderline")) == ["00000005", "00000010"]  # nearest 8.0, in score order
    assert all(card["kept"] for card in summary["sheets"]["random_kept"])
    assert not any(card["kept"] for card in summary["sheets"]["random_dropped"])
    assert len(summary["sheets"]["random_kept"]) == len(summary["sheets"]["random_dropped"]) == 2
    again = build_report(ReportConfig(run_dir=run, out_dir=tmp_path / "again", filter_manifest=manifest, sheet_size=2))
    assert again["sheets"] == summary["sheets"]  # the random picks are a fixed hash order
    page = (tmp_path / "report" / "index.html").read_text()
    missing, card = summary["sheets"]["highest"]  # b/13 is in the table but not in its shard
    assert missing["thumbnail"] is None and missing["error"] == "sample not found in its shard"
    assert card["caption"] == "a picture number 12"
    assert f"title='{card['caption']}'>{card['caption']}</div>" in page  # the caption as text, in full on hover
    assert f"b.tar/{card['key']}</code>" in page  # shard/key as selectable text
    shown = {(card["shard"], card["key"]): card["thumbnail"] for cards in summary["sheets"].values() for card in cards}
    files = {path.relative_to(tmp_path / "report").as_posix() for path in (tmp_path / "report" / "thumbs").iterdir()}
    assert files == set(shown.values()) - {None}  # one thumbnail per sample, however many sheets show it


def test_funnel_drop_reasons_and_per_shard_errors(run, tmp_path):
    """Shard a: 6 samples, 1 decode_error; shard b: 4 samples; a non-tar shard c: one shard_error row."""
    rows = [score_row("c.tar", "", 0, epoch, None, "shard_error", "not a tar archive") for epoch in (0, 1)]
    write_part(rows_to_table(rows), run / "scores" / "part-c.parquet")
    shard_a, shard_b = json.loads((run / "run.json").read_text())["shards"]
    decisions = {(shard_a, f"{i:08d}"): i % 2 == 1 for i in range(1, 6)} | {(shard_b, f"{i:08d}"): i == 13 for i in range(10, 14)}
    manifest = write_manifest(tmp_path / "manifest.parquet", decisions)
    summary = build_report(ReportConfig(run_dir=run, out_dir=tmp_path / "report", filter_manifest=manifest))
    assert summary["funnel"] == {"samples": 11, "usable": 9, "kept": 4}
    reasons = {reason["reason"]: reason for reason in summary["drop_reasons"]}
    assert {name: reason["count"] for name, reason in reasons.items()} == {
        "dropped": 5, "status:decode_error": 1, "status:shard_error": 1}
    assert reasons["status:decode_error"]["examples"][0]["error"] == "cannot decode image jpg"
    assert reasons["status:decode_error"]["kind"] == "status" and reasons["dropped"]["kind"] == "rule"
    assert len(reasons["dropped"]["examples"]) == 3
    shards = summary["shards_worst_first"]
    assert [shard["shard"] for shard in shards] == ["c.tar", shard_b, shard_a]  # unusable first, then worst
    assert shards[0]["quality"] is None and shards[0]["errors"] == {"shard_error": 1}
    assert shards[2]["errors"] == {"decode_error": 1} and shards[1]["errors"] == {}
    page = (tmp_path / "report" / "index.html").read_text()
    assert "no usable sample" in page and "not a tar archive" in page


def test_default_rule_reasons_match_the_filter_manifest(run, tmp_path):
    import pyarrow.parquet as parquet

    result = CliRunner().invoke(cli, ["filter", str(run), "--out", str(tmp_path / "curated"),
                                      "--min", "mimic_score=0", "--drop", "bottom-frac:mimic_score=0.2"],
                                     catch_exceptions=False)
    assert result.exit_code == 0, result.output
    manifest = parquet.read_table(tmp_path / "curated" / "manifest.parquet").to_pylist()
    expected = {}
    for row in manifest:
        if not row["kept"]:
            expected[row["reason"]] = expected.get(row["reason"], 0) + 1
    summary = build_report(ReportConfig(run_dir=run, out_dir=tmp_path / "report",
                                        filter_manifest=tmp_path / "curated" / "manifest.parquet"))
    assert {reason["reason"]: reason["count"] for reason in summary["drop_reasons"]} == expected
    assert "dropped by bottom-frac mimic_score=0.2" in expected
    default = build_report(ReportConfig(run_dir=run, out_dir=tmp_path / "default"))
    filter_default = CliRunner().invoke(cli, ["filter", str(run), "--out", str(tmp_path / "plain")], catch_exceptions=False)
    assert filter_default.exit_code == 0
    plain = json.loads((tmp_path / "plain" / "summary.json").read_text())["reasons"]
    assert {reason["reason"]: reason["count"] for reason in default["drop_reasons"]} == {
        reason: count for reason, count in plain.items() if reason != "kept"}


def test_plots_use_a_stated_sample_of_big_tables(tmp_path):
    shard = "s.tar"
    rows = [score_row(shard, f"{i:08d}", i, 0, float(np.sin(i))) for i in range(5000)]
    run = tmp_path / "run"
    write_part(rows_to_table(rows), run / "scores" / "part.parquet")
    (run / "run.json").write_text(json.dumps({"shards": [shard], "fingerprint": {"task": "contrastive", "decode": DECODE}}))
    summary = build_report(ReportConfig(run_dir=run, out_dir=tmp_path / "report", sample_rows=1000, sheet_size=0))
    used = summary["plot_rows"]["score_rows_used"]
    assert 700 < used < 1300 and summary["plot_rows"]["score_rows_total"] == 5000
    assert summary["plot_rows"]["samples_used"] == used  # one epoch: a sample is a row
    assert f"{used:,} of 5,000 usable samples" in (tmp_path / "report" / "index.html").read_text()
    assert summary["samples"] == 5000  # the quality estimate still counts every sample


@pytest.mark.parametrize(
    "args, message",
    [
        (["--filter-manifest", "nope.parquet"], "does not exist"),
        (["--sheet-size", "-1"], "--sheet-size -1"),
    ],
)
def test_bad_options_are_one_line_errors(run, tmp_path, args, message):
    result = CliRunner().invoke(cli, ["report", str(run), "--out", str(tmp_path / "r"), *args])
    assert result.exit_code == 2 and message in result.output
    assert "Traceback" not in result.output


def test_a_manifest_of_another_run_is_refused(run, tmp_path):
    manifest = write_manifest(tmp_path / "m.parquet", {("other.tar", "x"): True})
    result = CliRunner().invoke(cli, ["report", str(run), "--out", str(tmp_path / "r"), "--filter-manifest", str(manifest)])
    assert result.exit_code == 2 and "names none of this run's samples" in result.output


def test_not_a_run_directory(tmp_path):
    result = CliRunner().invoke(cli, ["report", str(tmp_path), "--out", str(tmp_path / "r")])
    assert result.exit_code == 2 and "not a mimicfilter run directory" in result.output


@pytest.mark.slow
def test_report_of_a_real_tiny_run(tmp_path, tiny_config, reference_checkpoint):
    shard = write_tar(tmp_path / "pool.tar", image_text_samples(12))
    run = tmp_path / "run"
    score = ["score", str(shard), "--model", str(tiny_config), "--reference", str(reference_checkpoint), "--out", str(run),
             "--batch-size", "4", "--train", "head", "--epochs", "2", "--quiet"]
    assert CliRunner().invoke(cli, score, catch_exceptions=False).exit_code == 0
    result = CliRunner().invoke(cli, ["report", str(run), "--out", str(run / "report"), "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["ok"] == 12 and summary["epochs"] == 2
    for name in referenced_files(run / "report" / "index.html"):
        assert_drawn(run / "report" / name)


@pytest.mark.slow
def test_report_of_a_classification_run(tmp_path, tiny_config, reference_checkpoint):
    """A labelled pool scored with a zero-shot head: no CLIP score to plot against, labels on the
    cards, the broken sample in the funnel, and every picture drawn."""
    samples = [(f"{i:04d}", {"png": image_bytes(i, fmt="PNG"), "cls": str(i % 3).encode()}) for i in range(12)]
    samples[5] = (samples[5][0], {"png": b"not a png", "cls": b"2"})
    shard = write_tar(tmp_path / "labelled.tar", samples)
    classnames = tmp_path / "classes.txt"
    classnames.write_text("cat\ndog\nboat\n")
    run = tmp_path / "run"
    score = ["score", str(shard), "--model", str(tiny_config), "--reference", str(reference_checkpoint), "--classnames",
             str(classnames), "--out", str(run), "--batch-size", "4", "--epochs", "2", "--workers", "0", "--quiet"]
    assert CliRunner().invoke(cli, score, catch_exceptions=False).exit_code == 0
    assert json.loads((run / "run.json").read_text())["models"]["task"] == "classify"
    result = CliRunner().invoke(cli, ["report", str(run), "--out", str(tmp_path / "report"), "--sheet-size", "4",
                                      "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["samples"] == 12 and summary["ok"] == 11 and summary["epochs"] == 2
    assert "score_vs_clip" not in summary["images"] and "scores" in summary["images"]  # (no CLIP score to plot)
    assert any(reason["reason"].endswith("decode_error") and reason["count"] == 1 for reason in summary["drop_reasons"])
    cards = [card for sheet in summary["sheets"].values() for card in sheet]
    assert cards and all(card["label"] == int(card["key"]) % 3 for card in cards)
    page = (tmp_path / "report" / "index.html").read_text()
    assert "label 0" in page or "label 1" in page or "label 2" in page
    for name in referenced_files(tmp_path / "report" / "index.html"):
        assert_drawn(tmp_path / "report" / name)


def test_the_command_line_starts_without_torch():
    """filter and report are DuckDB/numpy work: importing the CLI must not pay torch's start-up."""
    import subprocess
    import sys

    code = "import sys, mimicfilter_cli.main; print('torch' in sys.modules, 'matplotlib' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["False", "False"]
