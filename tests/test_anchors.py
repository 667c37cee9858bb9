"""Anchors (score --trusted): trusted samples and synthetic negatives scored in the pool's stream,
flagged, deterministic, resumable, split over ranks, and never counted as pool samples."""

import json
import signal
import subprocess
import sys
import time
from collections import Counter

import pytest
import torch
from click.testing import CliRunner
from helpers import image_bytes, image_text_samples, write_tar

from mimicfilter.mimic.models import ModelSpec
from mimicfilter.pipeline.anchors import CONFUSABLE, SYNTHETIC, SYNTHETIC_SUFFIX, TRUSTED, AnchorPlan, with_synthetic
from mimicfilter.pipeline.config import ScoreConfig, TrainConfig
from mimicfilter.pipeline.run import run_score
from mimicfilter.shards.records import RawSample
from mimicfilter.store.parts import read_scores
from mimicfilter_cli.main import cli


@pytest.fixture
def pool(tmp_path):
    shards = tuple(str(write_tar(tmp_path / f"pool-{i}.tar", image_text_samples(20, start=20 * i))) for i in range(3))
    trusted = (str(write_tar(tmp_path / "trusted.tar", image_text_samples(7, start=500))),)
    return shards, trusted


def _score(tmp_path, name, pool, tiny_config, reference_checkpoint, **changes):
    shards, trusted = pool
    train = changes.pop("train", TrainConfig(mode="head", epochs=2, lr=1e-2, shuffle_buffer=8, checkpoint_every=2))
    config = ScoreConfig(shards, tmp_path / name, ModelSpec(str(tiny_config), str(reference_checkpoint)),
                         batch_size=6, train=train, trusted=trusted, synthetic_share=0.25, **changes)
    run_score(config)
    return read_scores(tmp_path / name)


def test_a_moved_pool_gets_the_same_synthetic_negatives():
    """The synthetic pairs follow the shard's file name, key and position, not the folder it lies in:
    a pool copied elsewhere (a fresh clone, another bucket) is calibrated against the same anchors."""
    plan = AnchorPlan((), (), 40, 0, 0.3, ("txt",), seed=3)

    def made(shard):
        samples = [RawSample(shard, f"{i:04d}", i, {"jpg": b"i%d" % i, "txt": b"t%d" % i}) for i in range(40)]
        return [(s.key, s.files["txt"]) for s in with_synthetic(samples, plan) if s.anchor == SYNTHETIC]

    here = made("/data/pool/pool-000.tar")
    assert len(here) >= 5
    assert here == made("s3://bucket/copy/pool-000.tar") == made("relative/dir/pool-000.tar")
    assert here != made("/data/pool/pool-001.tar")  # another shard: other picks


def _captions(rows):
    return {(row["shard"], row["key"]): row for row in rows}


def test_anchors_are_scored_in_every_epoch_and_flagged(tmp_path, pool, tiny_config, reference_checkpoint):
    rows = _score(tmp_path, "run", pool, tiny_config, reference_checkpoint).to_pylist()
    per_epoch = Counter((row["epoch"], row["anchor"]) for row in rows)
    synthetic = per_epoch[(0, SYNTHETIC)]
    assert per_epoch[(0, None)] == per_epoch[(1, None)] == 60  # every pool sample once per epoch
    assert per_epoch[(0, TRUSTED)] == per_epoch[(1, TRUSTED)] == 7
    assert 5 <= synthetic == per_epoch[(1, SYNTHETIC)]  # the same pairs in both epochs
    made = [row for row in rows if row["anchor"] == SYNTHETIC]
    assert all(row["shard"].endswith(SYNTHETIC_SUFFIX) and "~" in row["key"] for row in made)
    assert {(row["shard"], row["key"]) for row in made if row["epoch"] == 0} == \
        {(row["shard"], row["key"]) for row in made if row["epoch"] == 1}
    for row in made:  # a derangement within the shard: another sample's caption, never its own
        image_key, caption_key = row["key"].split("~")
        assert image_key != caption_key and row["caption_chars"] is not None
    trusted = {row["key"] for row in rows if row["anchor"] == TRUSTED}
    assert trusted == {f"{i:08d}" for i in range(500, 507)}
    # interleaved: trusted samples are spread over the epoch's batches, not gathered at its end
    steps = sorted({row["step"] for row in rows if row["anchor"] == TRUSTED and row["epoch"] == 0})
    assert len(steps) >= 3


def test_anchor_tables_do_not_depend_on_workers(tmp_path, pool, tiny_config, reference_checkpoint):
    tables = [_score(tmp_path, f"w{workers}", pool, tiny_config, reference_checkpoint, workers=workers, chunk_size=chunk)
              for workers, chunk in ((0, 64), (2, 5))]
    assert tables[0].equals(tables[1])
    static = TrainConfig(mode="none")
    tables = [_score(tmp_path, f"s{workers}", pool, tiny_config, reference_checkpoint, train=static, workers=workers)
              for workers in (0, 2)]
    assert tables[0].equals(tables[1])
    rows = tables[0].to_pylist()
    assert Counter(row["anchor"] for row in rows)[TRUSTED] == 7  # each trusted sample once, in one shard's part


def test_ranks_score_each_anchor_once_and_equal_one_process(tmp_path, pool, tiny_config, reference_checkpoint):
    from mimicfilter.execute.partition import Partition

    static = TrainConfig(mode="none")
    whole = _score(tmp_path, "whole", pool, tiny_config, reference_checkpoint, train=static)
    for rank in range(2):
        _score(tmp_path, "ranks", pool, tiny_config, reference_checkpoint, train=static, partition=Partition(rank, 2))
    split = read_scores(tmp_path / "ranks")
    key = lambda row: (row["shard"], row["index"], row["key"])  # noqa: E731
    assert sorted(split.to_pylist(), key=key) == sorted(whole.to_pylist(), key=key)
    assert (tmp_path / "ranks" / "_SUCCESS").exists()


@pytest.mark.slow
def test_a_killed_run_with_anchors_resumes_to_the_same_table(tmp_path, pool, tiny_config, reference_checkpoint):
    shards, trusted = pool
    args = ["score", *shards, "--trusted", *trusted, "--model", str(tiny_config), "--reference",
            str(reference_checkpoint), "--batch-size", "4", "--epochs", "3", "--checkpoint-every", "2", "--lr", "1e-2",
            "--synthetic-share", "0.25", "--workers", "0", "--quiet"]
    assert CliRunner().invoke(cli, [*args, "--out", str(tmp_path / "baseline")]).exit_code == 0
    out = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, "-m", "mimicfilter", *args, "--out", str(out)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint = out / "checkpoints" / "latest.pt"
    deadline = time.time() + 120
    while time.time() < deadline and not checkpoint.exists():
        time.sleep(0.005)
    time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (out / "_SUCCESS").exists(), "the run finished before it could be killed"
    resumed = CliRunner().invoke(cli, [*args, "--out", str(out)])
    assert resumed.exit_code == 0, resumed.output
    assert read_scores(out).equals(read_scores(tmp_path / "baseline"))


def labelled_rows(tmp_path, tiny_config, reference_checkpoint, name="run", train=None, anchored=True) -> list[dict]:
    """The score rows of a 30-image, 3-class labelled pool, with 5 trusted samples and half the pool
    making negatives when ``anchored``."""
    from mimicfilter.shards.decode import DecodeConfig

    samples = [(f"{i:05d}", {"png": image_bytes(i, fmt="PNG"), "cls": str(i % 3).encode()}) for i in range(30)]
    shard = write_tar(tmp_path / "labelled.tar", samples)
    trusted = write_tar(tmp_path / "trusted.tar", samples[:5])
    (tmp_path / "classes.txt").write_text("cat\ndog\nbird\n")
    model = ModelSpec(str(tiny_config), str(reference_checkpoint), task="classify",
                      classnames=str(tmp_path / "classes.txt"))
    anchors = {"trusted": (str(trusted),), "synthetic_share": 0.5} if anchored else {}
    run_score(ScoreConfig((str(shard),), tmp_path / name, model, decode=DecodeConfig(task="classify"), batch_size=8,
                          train=train or TrainConfig(mode="none"), **anchors))
    return read_scores(tmp_path / name).to_pylist()


def test_label_flips_for_labelled_pools(tmp_path, tiny_config, reference_checkpoint):
    rows = labelled_rows(tmp_path, tiny_config, reference_checkpoint)
    labels = {row["key"]: row["label"] for row in rows if row["anchor"] is None}
    flips = [row for row in rows if row["anchor"] == SYNTHETIC]
    assert flips and all(row["label"] != labels[row["key"].split("~")[0]] for row in flips)


def test_synthetic_share_needs_trusted_samples(tmp_path, pool, tiny_config, reference_checkpoint):
    shards, _ = pool
    result = CliRunner().invoke(cli, ["score", *shards, "--model", str(tiny_config), "--reference",
                                      str(reference_checkpoint), "--synthetic-share", "0.1", "--out", str(tmp_path / "r")])
    assert result.exit_code == 2 and "--trusted" in result.stderr
    (tmp_path / "empty.tar").write_bytes(b"\0" * 1024)
    result = CliRunner().invoke(cli, ["score", *shards, "--model", str(tiny_config), "--reference",
                                      str(reference_checkpoint), "--trusted", str(tmp_path / "empty.tar"),
                                      "--out", str(tmp_path / "r")])
    assert result.exit_code == 2 and "no samples" in result.stderr


def test_a_pool_shard_passed_as_trusted_is_refused(tmp_path, pool, tiny_config):
    """Its samples would make the pool look like its own trusted sample: a clean-looking estimate."""
    shards, _ = pool
    (tmp_path / "linked.tar").symlink_to(shards[1])  # the same file, spelt another way
    result = CliRunner().invoke(cli, ["score", *shards, "--model", str(tiny_config), "--reference",
                                      str(tmp_path / "never-read.safetensors"), "--trusted", str(tmp_path / "linked.tar"),
                                      "--out", str(tmp_path / "r")])
    assert result.exit_code == 2 and result.stderr.count("\n") == 1, result.output
    assert "is also one of the pool's shards: the pool would be calibrated against its own samples" in result.stderr
    assert not (tmp_path / "r").exists()


def test_trusted_shards_that_cannot_be_scored_are_refused_before_any_model_loads(tmp_path, pool, tiny_config):
    shards, _ = pool
    captionless = [(key, {"jpg": files["jpg"]}) for key, files in image_text_samples(30, start=500)]
    trusted = write_tar(tmp_path / "labelled.tar", captionless)
    result = CliRunner().invoke(cli, ["score", *shards, "--model", str(tiny_config), "--reference",
                                      str(tmp_path / "never-read.safetensors"), "--trusted", str(trusted),
                                      "--out", str(tmp_path / "r")])
    assert result.exit_code == 2, result.output
    assert result.stderr.count("\n") == 1
    assert "none of the 30 --trusted samples can be scored: missing_text ×30 (no caption file (txt))" in result.stderr
    assert not (tmp_path / "r").exists()


def test_too_few_usable_trusted_samples_are_named_by_score_and_by_filter(tmp_path, pool, tiny_config,
                                                                         reference_checkpoint):
    """25 trusted samples of which 10 have no caption: score says so when it ends, and the warning of
    filter and report counts the usable ones and says what the others lack (not "only 25 trusted anchors")."""
    shards, _ = pool
    samples = [(key, {name: data for name, data in files.items() if name != "txt" or i >= 10})
               for i, (key, files) in enumerate(image_text_samples(25, start=500))]
    trusted = write_tar(tmp_path / "trusted.tar", samples)
    run = tmp_path / "run"
    result = CliRunner().invoke(cli, ["score", *shards, "--trusted", str(trusted), "--model", str(tiny_config),
                                      "--reference", str(reference_checkpoint), "--batch-size", "6", "--epochs", "2",
                                      "--quiet", "--out", str(run)])
    assert result.exit_code == 0, result.output
    assert result.stderr == ("Warning: only 15 of 25 trusted samples could be scored: filter calibrates with at least "
                             "20 (the anchor rows' status and error columns say why)\n")
    warning = ("only 15 of 25 trusted anchors are usable (missing_text 10): at least 20 usable ones calibrate the "
               "estimate; the relative score is uncalibrated")
    for command in (["filter", str(run), "--out", str(tmp_path / "curated")],
                    ["report", str(run), "--out", str(tmp_path / "report")]):
        result = CliRunner().invoke(cli, command)
        assert result.exit_code == 0, result.output
        assert f"Warning: {warning}\n" in result.stderr, command[0]
    assert warning in json.loads((tmp_path / "report" / "report.json").read_text())["warnings"]


@pytest.mark.parametrize("mode", ["none", "head"])
def test_anchors_leave_the_pools_own_scores_unchanged(tmp_path, pool, tiny_config, reference_checkpoint, mode):
    shards, trusted = pool
    train = TrainConfig(mode=mode, epochs=1 if mode == "none" else 2, lr=1e-2, shuffle_buffer=8)
    model = ModelSpec(str(tiny_config), str(reference_checkpoint))
    tables = {}
    for name, extra in (("plain", {}), ("anchored", {"trusted": trusted, "synthetic_share": 0.25})):
        run_score(ScoreConfig(shards, tmp_path / name, model, batch_size=6, train=train, **extra))
        tables[name] = read_scores(tmp_path / name)
    plain = {(r["shard"], r["index"], r["epoch"]): r for r in tables["plain"].to_pylist()}
    anchored = [r for r in tables["anchored"].to_pylist() if r["anchor"] is None]
    assert len(anchored) == len(plain) and len(tables["anchored"]) > len(plain)
    for row in anchored:
        twin = plain[(row["shard"], row["index"], row["epoch"])]
        assert row["step"] == twin["step"]  # the same batches
        for column in ("mimic_score", "mimic_weight", "loss", "clip_score", "ref_loss", "negclip_score"):
            assert row[column] == pytest.approx(twin[column], rel=1e-4, abs=1e-5), column


def test_an_anchor_is_never_contrasted_with_its_own_copies():
    import torch

    from mimicfilter.mimic.losses import Anchors, contrastive_per_sample_loss

    torch.manual_seed(0)
    image, text = (torch.nn.functional.normalize(torch.randn(6, 8), dim=-1) for _ in range(2))
    image[5], text[5] = image[1], text[3]  # an anchor made of pool sample 1's image and pool sample 3's caption
    mask = torch.tensor([False] * 5 + [True])
    twins = torch.tensor([[False, True, False, True, False]])
    for bias in (None, torch.tensor(-2.0)):
        masked = contrastive_per_sample_loss(image, text, torch.tensor(10.0), bias, Anchors(mask, twins))
        alone = torch.tensor([True, False, True, False, True, True])  # the batch without its twins
        expected = contrastive_per_sample_loss(image[alone], text[alone], torch.tensor(10.0), bias)
        assert torch.allclose(masked[5], expected[-1]) and not torch.allclose(
            masked[5], contrastive_per_sample_loss(image, text, torch.tensor(10.0), bias)[5])


def test_confusable_negatives_take_the_references_runner_up_class(tmp_path, tiny_config, reference_checkpoint):
    rows = labelled_rows(tmp_path, tiny_config, reference_checkpoint)
    pool = {row["key"]: row for row in rows if row["anchor"] is None}
    confusable = [row for row in rows if row["anchor"] == CONFUSABLE]
    assert confusable and all(row["key"].endswith("~confusable") and row["shard"].endswith("#confusable")
                              for row in confusable)
    flips = {row["key"].split("~")[0]: row for row in rows if row["anchor"] == SYNTHETIC}
    assert set(flips) <= {row["key"].split("~")[0] for row in confusable}  # every chosen image makes both kinds
    made = [row for row in confusable if row["status"] == "ok"]
    assert made and {row["status"] for row in confusable} <= {"ok", "not_confusable"}
    compared = 0
    for row in made:
        own = pool[row["key"].split("~")[0]]
        assert row["label"] != own["label"]  # scored with another class, for an image the reference gets right ...
        assert own["ref_loss"] < row["ref_loss"]
        if (flip := flips.get(row["key"].split("~")[0])) is not None:  # ... its most likely other class
            assert row["ref_loss"] <= flip["ref_loss"] + 1e-5
            compared += 1
    assert compared
    for row in confusable:
        if row["status"] == "not_confusable":  # the reference ranks another class first: no negative, no score
            assert row["ref_loss"] is None and row["mimic_score"] is None


def test_runner_up_is_the_most_likely_other_class():
    from mimicfilter.mimic.classify import runner_up

    logits = torch.tensor([[3.0, 2.0, 1.0], [3.0, 2.0, 1.0], [0.0, 5.0, 4.0]])
    assert runner_up(logits, torch.tensor([0, 1, 1])).tolist() == [1, 0, 2]


def test_confusable_anchors_leave_a_labelled_pools_scores_unchanged(tmp_path, tiny_config, reference_checkpoint):
    train = TrainConfig(mode="head", epochs=2, lr=1e-2, shuffle_buffer=8)
    plain = {(r["index"], r["epoch"]): r for r in labelled_rows(tmp_path, tiny_config, reference_checkpoint, "plain",
                                                                 train, anchored=False)}
    rows = labelled_rows(tmp_path, tiny_config, reference_checkpoint, "anchored", train)
    assert CONFUSABLE in {r["anchor"] for r in rows}
    anchored = [r for r in rows if r["anchor"] is None]
    assert len(anchored) == len(plain)
    for row in anchored:
        twin = plain[(row["index"], row["epoch"])]
        for column in ("mimic_score", "mimic_weight", "loss", "ref_loss"):
            assert row[column] == pytest.approx(twin[column], rel=1e-4, abs=1e-5), column
