"""`report --filter-manifest` reads the per-sample table the filter's manifest holds instead of aggregating
the score parts again, only while the record says it was made from the same parts, options and code, and
the report is the same either way."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from helpers import score_row, write_score_run
from mimicfilter.curate import samples_cache
from mimicfilter.curate.filter import FilterConfig, run_filter
from mimicfilter.curate.votes import AggregateConfig
from mimicfilter.report import tally
from mimicfilter.report import build as build_module
from mimicfilter.report.build import ReportConfig, build_report
from mimicfilter.store.parts import write_part
from mimicfilter.store.schema import rows_to_table
from mimicfilter_cli.main import cli

SAMPLES = 1500  # above --sample-rows 1000: the plots use the hash sample


def pool_rows(shard_count: int = 3, epochs: int = 2, start: int = 0) -> list[dict]:
    """Bimodal scores (a quarter low), a few decode errors, over ``shard_count`` shards."""
    generator = np.random.default_rng(start)
    rows = []
    for number in range(start, start + SAMPLES):
        shard, index = f"/nowhere/{number % shard_count}.tar", number // shard_count
        noisy = number % 4 == 0
        for epoch in range(epochs):
            if number % 97 == 0:
                rows.append(score_row(shard, f"{number:08d}", index, epoch, None, status="decode_error"))
                continue
            score = generator.normal(-0.5 if noisy else 1.0, 0.3)
            rows.append(score_row(shard, f"{number:08d}", index, epoch, float(score), clip=float(score) / 4))
    return rows


@pytest.fixture
def run(tmp_path) -> Path:
    return write_score_run(tmp_path / "run", pool_rows(), [], epochs=2)


def filtered(run: Path, out: Path, *extra: str) -> Path:
    result = CliRunner().invoke(cli, ["filter", str(run), "--out", str(out), *extra], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return out / "manifest.parquet"


def report(run: Path, out: Path, manifest: Path | None, **options) -> dict:
    aggregation = AggregateConfig(**options)
    return build_report(ReportConfig(run_dir=run, out_dir=out, filter_manifest=manifest, sheet_size=4,
                                     sample_rows=1000, aggregation=aggregation))


def comparable(summary: dict) -> dict:
    return {name: value for name, value in summary.items() if name not in ("run_id", "created_at", "per_sample_table")}


def without_record(manifest: Path) -> None:
    """The manifest as a filter that wrote no record left it (same rows, same run id)."""
    table = pq.read_table(manifest)
    metadata = {key: value for key, value in table.schema.metadata.items() if key != samples_cache.RECORD_KEY}
    pq.write_table(table.replace_schema_metadata(metadata), manifest)


def test_report_after_filter_reads_the_manifest_and_equals_an_aggregating_report(run, tmp_path, monkeypatch):
    manifest = filtered(run, tmp_path / "curated")
    with monkeypatch.context() as patched:
        patched.setattr(tally, "aggregate", lambda *_: pytest.fail("the report aggregated the score parts again"))
        reused = report(run, tmp_path / "reused", manifest)
    assert reused["per_sample_table"] == {"from": "filter manifest", "manifest": str(manifest)}
    without_record(manifest)
    fresh = report(run, tmp_path / "fresh", manifest)
    assert fresh["per_sample_table"]["from"] == "score parts"
    assert "no record" in fresh["per_sample_table"]["not_reused"]
    assert comparable(reused) == comparable(fresh)
    assert reused["plot_rows"]["samples_used"] < reused["plot_rows"]["samples_total"]  # the hash sample, both ways
    for image in reused["images"].values():  # the same plots, byte for byte
        assert (tmp_path / "reused" / image).read_bytes() == (tmp_path / "fresh" / image).read_bytes()
    summary = json.loads((tmp_path / "curated" / "summary.json").read_text())
    assert reused["quality"] == summary["quality"] and reused["aggregation"] == summary["aggregation"]


def touch_part(run: Path) -> None:
    part = next((run / "scores").glob("*.parquet"))
    info = part.stat()
    os.utime(part, ns=(info.st_atime_ns, info.st_mtime_ns + 1_000_000_000))


def add_part(run: Path) -> None:
    write_part(rows_to_table(pool_rows(start=SAMPLES)), run / "scores" / "part-2.parquet")


def rewrite_part(run: Path) -> None:
    """Same name and size, other scores (the mtime moves with it)."""
    part = next((run / "scores").glob("*.parquet"))
    table = pq.read_table(part)
    scores = pa.compute.multiply(table["mimic_score"], pa.scalar(-1.0, pa.float32()))
    write_part(table.set_column(table.schema.get_field_index("mimic_score"), "mimic_score", scores), part)


def drop_manifest_row(run: Path) -> None:
    manifest = run.parent / "curated" / "manifest.parquet"
    table = pq.read_table(manifest)
    pq.write_table(table.slice(1), manifest)  # the record stays in the schema metadata


def damage_record(run: Path) -> None:
    manifest = run.parent / "curated" / "manifest.parquet"
    table = pq.read_table(manifest)
    metadata = {**table.schema.metadata, samples_cache.RECORD_KEY: b'{"format": 1, "code": '}
    pq.write_table(table.replace_schema_metadata(metadata), manifest)


@pytest.mark.parametrize("change, options, why", [
    (touch_part, {}, "score parts changed"),
    (add_part, {}, "1 parts then, 2 now"),
    (rewrite_part, {}, "score parts changed"),
    (None, {"binarize": "sign"}, "(binarize mirror, combine_votes majority; asked now: binarize sign, combine_votes majority)"),
    (None, {"combine_votes": "label-model"}, "other options"),
    (drop_manifest_row, {}, f"holds {SAMPLES - 1} rows"),
    (damage_record, {}, "record is damaged"),
])
def test_a_stale_or_foreign_per_sample_table_is_ignored(run, tmp_path, monkeypatch, change, options, why):
    manifest = filtered(run, tmp_path / "curated")
    if change is not None:
        change(run)
    aggregated = []
    real_aggregate = tally.aggregate
    monkeypatch.setattr(tally, "aggregate", lambda *args: aggregated.append(1) or real_aggregate(*args))
    summary = report(run, tmp_path / "report", manifest, **options)
    assert aggregated and summary["per_sample_table"]["from"] == "score parts"
    assert why in summary["per_sample_table"]["not_reused"]


def test_a_part_changed_in_place_gives_the_report_of_the_new_scores(run, tmp_path):
    manifest = filtered(run, tmp_path / "curated")
    rewrite_part(run)
    after = report(run, tmp_path / "after", manifest)
    os.remove(manifest)
    expected = report(run, tmp_path / "expected", None)
    assert after["per_sample_table"]["from"] == "score parts"
    for name in ("quality", "keep_curve", "budgets"):  # the cut follows the manifest's decisions
        assert after[name] == expected[name], name


def test_another_version_of_the_code_is_not_trusted(run, tmp_path, monkeypatch):
    manifest = filtered(run, tmp_path / "curated")
    monkeypatch.setattr(samples_cache, "code_fingerprint", lambda: "0" * 64)
    assert "another version" in samples_cache.check_reuse(manifest, [str(p) for p in (run / "scores").glob("*")],
                                                          AggregateConfig()).reason


def test_a_filter_over_two_runs_is_not_reused_for_one_of_them(run, tmp_path):
    other = write_score_run(tmp_path / "other", pool_rows(start=SAMPLES), [], epochs=2)
    manifest = filtered(run, tmp_path / "curated")
    both = tmp_path / "both"
    result = CliRunner().invoke(cli, ["filter", str(run), str(other), "--out", str(both)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert report(run, tmp_path / "one", manifest)["per_sample_table"]["from"] == "filter manifest"
    summary = report(run, tmp_path / "two", both / "manifest.parquet")
    assert "1 parts then" not in summary["per_sample_table"]["not_reused"]
    assert "2 parts then, 1 now" in summary["per_sample_table"]["not_reused"]


def test_the_command_line_says_why_it_aggregates_again(run, tmp_path):
    manifest = filtered(run, tmp_path / "curated")
    args = ["report", str(run), "--filter-manifest", str(manifest), "--sheet-size", "0", "--out"]
    quiet = CliRunner().invoke(cli, [*args, str(tmp_path / "a")], catch_exceptions=False)
    assert quiet.exit_code == 0 and "Note:" not in quiet.output
    touch_part(run)
    noted = CliRunner().invoke(cli, [*args, str(tmp_path / "b"), "--json"], catch_exceptions=False)
    assert noted.exit_code == 0
    assert f"Note: the score parts were aggregated again, not read from {manifest}: the score parts changed" in noted.stderr
    assert json.loads(noted.stdout)["per_sample_table"]["from"] == "score parts"


def test_remote_parts_get_no_record():
    assert samples_cache.parts_fingerprint(["s3://bucket/run/scores/part.parquet"]) is None
    assert samples_cache.samples_record(None, AggregateConfig(), {}, None, 0) == {}


def test_the_fingerprint_follows_names_sizes_and_times_not_order(tmp_path):
    first, second = tmp_path / "a.parquet", tmp_path / "b.parquet"
    first.write_bytes(b"1")
    second.write_bytes(b"22")
    fingerprint = samples_cache.parts_fingerprint([str(first), str(second)])
    assert samples_cache.parts_fingerprint([str(second), str(first)]) == fingerprint
    assert samples_cache.parts_fingerprint([str(first)]) != fingerprint
    second.write_bytes(b"33")
    os.utime(second, ns=(0, 0))
    assert samples_cache.parts_fingerprint([str(first), str(second)]) != fingerprint


def test_a_manifest_replaced_while_the_report_reads_it_is_refused(run, tmp_path, monkeypatch):
    manifest = filtered(run, tmp_path / "curated")
    real_entries = build_module.sheet_entries

    def refilter_meanwhile(*args):
        filtered(run, tmp_path / "curated", "--top-frac", "mimic_score=0.5")  # swaps --out in whole
        return real_entries(*args)

    monkeypatch.setattr(build_module, "sheet_entries", refilter_meanwhile)
    result = CliRunner().invoke(cli, ["report", str(run), "--filter-manifest", str(manifest), "--out",
                                      str(tmp_path / "report")])
    assert result.exit_code == 2
    assert f"--filter-manifest {manifest} was replaced while the report read it" in result.output
    assert not (tmp_path / "report").exists()
