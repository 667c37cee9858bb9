"""The pool the extrapolation tests share: four tiny image-text shards (one with bad samples), a
tiny CLIP config and random reference, shards 0-1 scored by a 2-epoch trajectory with
--save-embeddings, shards 2-3 embedded. Import the fixtures into a test module to use them."""

import pytest
from click.testing import CliRunner
from helpers import image_text_samples, write_random_checkpoint, write_tar, write_tiny_config

from mimicfilter_cli.main import cli


def invoke(args):
    return CliRunner().invoke(cli, [str(arg) for arg in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    """Tiny image-text shards (one with bad samples), a tiny CLIP config and a random reference."""
    root = tmp_path_factory.mktemp("pool")
    config = write_tiny_config(root / "tiny-clip.json")
    reference = write_random_checkpoint(root / "reference.pt")
    shards = []
    for number in range(4):
        samples = image_text_samples(24, start=number * 100)
        if number == 3:
            samples[2][1]["jpg"] = b"not an image"
            del samples[5][1]["txt"]
        shards.append(write_tar(root / f"shard-{number}.tar", samples))
    return {"root": root, "config": config, "reference": reference, "shards": shards}


def model_args(pool):
    return ["--model", pool["config"], "--reference", pool["reference"], "--workers", "0", "--quiet"]


@pytest.fixture(scope="module")
def subset_run(pool):
    """Shards 0-1 scored by a 2-epoch trajectory with --save-embeddings."""
    out = pool["root"] / "subset"
    result = invoke(["score", *pool["shards"][:2], *model_args(pool), "--batch-size", "8", "--epochs", "2",
                     "--save-embeddings", "--out", out])
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def rest_embeddings(pool):
    out = pool["root"] / "rest-embed"
    result = invoke(["embed", *pool["shards"][2:], *model_args(pool), "--batch-size", "16", "--out", out])
    assert result.exit_code == 0, result.output
    return out
