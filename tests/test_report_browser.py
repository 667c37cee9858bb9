"""The demo report in a real browser (headless Chromium): at 1400 px and at 500 px (a phone) every
image loads, nothing sticks out sideways, and the numbers on the page are report.json's.

Skipped where no browser is installed; CI (.ci/run) installs Debian's chromium and chromium-driver,
and under CI=true a missing browser fails the test instead of skipping it."""

import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from browser import chromium, missing_browser, open_page
from mimicfilter_cli.main import cli

DEMO = Path(__file__).resolve().parent.parent / "demo"
pytestmark = [pytest.mark.browser, pytest.mark.slow]


@pytest.fixture(scope="module")
def demo_report(tmp_path_factory):
    """`make demo`'s commands (anchored by the demo's trusted sample) on two demo shards plus a file that
    is not a tar and a truncated shard."""
    missing = missing_browser()
    if missing:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must run the browser test but {', '.join(missing)} is missing: see .ci/run")
        pytest.skip(f"no browser here ({', '.join(missing)} missing)")
    root = tmp_path_factory.mktemp("demo")
    shards = root / "shards"
    shards.mkdir()
    for name in ("emoji-000000.tar", "emoji-000001.tar"):
        (shards / name).write_bytes((DEMO / "shards" / name).read_bytes())
    (shards / "broken-000008.tar").write_text("this is not a tar file\n")
    (shards / "truncated-000009.tar").write_bytes((DEMO / "shards" / "emoji-000002.tar").read_bytes()[:200_000])
    run, curated, report = root / "run", root / "run" / "curated", root / "run" / "report"
    commands = [
        ["score", str(shards), "--trusted", str(DEMO / "trusted"), "--model", str(DEMO / "tiny-clip.json"),
         "--reference", str(DEMO / "reference.safetensors"),
         "--batch-size", "128", "--epochs", "2", "--out", str(run), "--quiet"],
        ["filter", str(run), "--out", str(curated)],
        ["report", str(run), "--filter-manifest", str(curated / "manifest.parquet"), "--out", str(report)],
    ]
    for command in commands:
        result = CliRunner().invoke(cli, command, catch_exceptions=False)
        assert result.exit_code == 0, result.output
    return report


@pytest.fixture(scope="module")
def browser():
    if missing_browser():
        pytest.skip("no browser here")
    with chromium() as driver:
        yield driver


IMAGES = """return [...document.images].map(image => [image.getAttribute('src'), image.complete, image.naturalWidth,
                                                   image.getBoundingClientRect().width]);"""
OVERFLOW = """const width = document.documentElement.clientWidth; const out = [];
for (const element of document.querySelectorAll('body *')) {
  const box = element.getBoundingClientRect();
  if (box.width > 0 && box.right > width + 0.5) out.push(element.tagName + '.' + element.className + ': ' +
    Math.round(box.right) + ' px, ' + (element.textContent || '').trim().slice(0, 40));
}
return [window.innerWidth, width, document.documentElement.scrollWidth, out.slice(0, 10)];"""
NUMBERS = "return [...document.querySelectorAll('[data-key]')].map(element => [element.dataset.key, element.textContent]);"


def expected_numbers(summary: dict) -> dict[str, float]:
    numbers = {"quality_estimate": summary["quality_estimate"], "headline.value": summary["headline"]["value"],
               "ok": summary["ok"], "kept": summary["kept"]}
    numbers |= {f"funnel.{name}": value for name, value in summary["funnel"].items()}
    numbers |= {f"reason:{reason['reason']}": reason["count"] for reason in summary["drop_reasons"]}
    duplicates = summary.get("duplicates") or {}
    numbers |= {f"duplicates.{name}": duplicates[name] for name in ("groups", "duplicates") if name in duplicates}
    if (duplicates.get("exact") or {}).get("counted"):
        numbers["duplicates.exact.groups"] = duplicates["exact"]["groups"]
    for shard in summary["shards_worst_first"]:
        numbers |= {f"shard-ok:{shard['shard']}": shard["ok"], f"shard-kept:{shard['shard']}": shard["kept"]}
        if shard["quality"] is not None:
            numbers[f"shard-quality:{shard['shard']}"] = shard["quality"]
    return numbers


def shown_value(text: str) -> float:
    text = text.strip().replace(",", "")
    return float(text[:-1]) / 100 if text.endswith("%") else float(text)


@pytest.mark.parametrize("width, mobile", [(1400, False), (500, True)])
def test_demo_report_in_chromium(demo_report, browser, width, mobile):
    open_page(browser, (demo_report / "index.html").as_uri(), width, mobile=mobile)
    images = browser.execute_script(IMAGES)
    summary = json.loads((demo_report / "report.json").read_text())
    assert len(images) >= 5 + 5 * 10, "plots and contact sheets expected"  # 5 plots, 5 sheets of ~24
    broken = [source for source, complete, natural_width, shown_width in images
              if not complete or natural_width == 0 or shown_width == 0]
    assert not broken, f"images that did not load: {broken[:5]}"
    assert {f"{name}.svg" for name in ("scores", "keep_curve", "score_vs_clip", "caption_lengths", "image_sizes")} <= {
        source for source, *_ in images}

    assert browser.execute_script("return document.querySelector('meta[name=viewport]') !== null"), \
        "without a viewport meta tag a phone lays the page out 980 px wide"
    inner, client, scrolled, sticking_out = browser.execute_script(OVERFLOW)
    # on a phone, content wider than the screen also widens the layout viewport (inner > width)
    assert inner == width and scrolled <= client and not sticking_out, \
        f"horizontal overflow at {width} px (layout {inner} px, content {scrolled} px): {sticking_out}"

    shown = dict(browser.execute_script(NUMBERS))
    expected = expected_numbers(summary)
    assert {"quality_estimate", "kept", "ok", "funnel.samples", "reason:status:shard_error"} <= set(shown)
    assert set(shown) <= set(expected), f"numbers on the page that report.json lacks: {set(shown) - set(expected)}"
    for key, text in shown.items():
        tolerance = 0.0005 if text.strip().endswith("%") else 0
        assert shown_value(text) == pytest.approx(expected[key], abs=tolerance), f"{key}: page {text!r}, json {expected[key]}"
    unusable = summary["shards_worst_first"][0]
    assert unusable["shard"].endswith("broken-000008.tar") and unusable["ok"] == 0  # listed first, not last
