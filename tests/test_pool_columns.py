"""The score table records what people check first in a web-crawled pool: caption length and the
original image size, per sample, whatever the decoder; filter's manifest carries them too."""

import json

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from helpers import image_bytes, image_text_samples, pool_values, write_tar

from mimicfilter.store.parts import read_scores
from mimicfilter.store.schema import POOL_COLUMNS
from mimicfilter_cli.main import cli


@pytest.fixture
def shard(tmp_path):
    samples = image_text_samples(8)
    samples[1][1]["jpg"] = image_bytes(1, size=40)[:80]  # a corrupt JPEG: its size stays unknown
    samples[2][1]["jpg"] = image_bytes(2, size=57)  # odd sizes, so width and height are not the model's
    samples[3][1]["txt"] = b"  padded caption \n"  # counted as scored: stripped
    samples[4][1].pop("jpg")
    samples[4][1]["png"] = image_bytes(4, size=33, fmt="PNG")  # the PIL path
    return write_tar(tmp_path / "pool.tar", samples)


@pytest.mark.parametrize("decoder", ["fast", "pil"])
def test_score_rows_carry_caption_length_and_image_size(shard, tiny_config, reference_checkpoint, tmp_path, decoder):
    out = tmp_path / decoder
    result = CliRunner().invoke(cli, ["score", str(shard), "--model", str(tiny_config), "--reference",
                                      str(reference_checkpoint), "--out", str(out), "--batch-size", "4",
                                      "--workers", "0", "--train", "none", "--decoder", decoder, "--quiet"])
    assert result.exit_code == 0, result.output
    table = read_scores(out).to_pylist()
    truth = pool_values([str(shard)])
    for row in table:
        expected = truth[(row["shard"], row["key"])]
        got = tuple(row[name] for name in POOL_COLUMNS)
        if row["status"] == "ok":
            assert got == expected
        else:
            assert row["key"] == "00000001" and got[1:] == (None, None)  # the corrupt image
    assert sum(row["status"] == "ok" for row in table) == 7
    assert {row["image_width"] for row in table if row["status"] == "ok"} == {24, 57, 33}

    curated = tmp_path / f"curated-{decoder}"
    result = CliRunner().invoke(cli, ["filter", str(out), "--out", str(curated), "--where", "caption_chars > 20"])
    assert result.exit_code == 0, result.output
    manifest = pq.read_table(curated / "manifest.parquet").to_pylist()
    assert all(set(POOL_COLUMNS) <= set(row) for row in manifest)
    kept = {row["key"] for row in manifest if row["kept"]}
    assert kept == {row["key"] for row in table if row["status"] == "ok" and row["caption_chars"] > 20}
    assert json.loads((curated / "summary.json").read_text())["kept"] == len(kept)


def test_a_too_large_image_still_tells_its_size(tmp_path, tiny_config, reference_checkpoint):
    from io import BytesIO

    from PIL import Image

    buffer = BytesIO()
    Image.new("RGB", (4000, 1)).save(buffer, format="PNG")  # aspect ratio 4000:1 → too_large
    samples = image_text_samples(3)
    samples[1][1].pop("jpg")
    samples[1][1]["png"] = buffer.getvalue()
    shard = write_tar(tmp_path / "wide.tar", samples)
    out = tmp_path / "run"
    result = CliRunner().invoke(cli, ["score", str(shard), "--model", str(tiny_config), "--reference",
                                      str(reference_checkpoint), "--out", str(out), "--batch-size", "2",
                                      "--workers", "0", "--train", "none", "--quiet"])
    assert result.exit_code == 0, result.output
    row = next(row for row in read_scores(out).to_pylist() if row["key"] == "00000001")
    assert row["status"] == "too_large" and (row["image_width"], row["image_height"]) == (4000, 1)
