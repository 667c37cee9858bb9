"""`mimicfilter score` options, each shown to take effect through the command line, against a known
answer where there is one: the weights are the batch softmax at --temperature, the rows of a
--reference-head are its losses, --image-key / --text-key / --allow-pipe give the table of the
same samples laid out plainly, --proxy sets the direction, --weight-decay changes the trajectory
after its first step, and --task decides how a captioned, labelled pool is read."""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from helpers import image_bytes, image_text_samples, write_random_checkpoint, write_tar

from mimicfilter.store.parts import read_scores
from mimicfilter_cli.main import cli

SAME_SAMPLE_COLUMNS = ["key", "uid", "status", "mimic_score", "mimic_weight", "loss", "clip_score", "ref_loss"]


def score(out: Path, shards: list, model: list[str], *options: str, exit_code: int = 0):
    args = ["score", *map(str, shards), *model, "--out", str(out), "--batch-size", "4", "--workers", "0", "--quiet",
            "--train", "none", *options]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == exit_code, result.output
    return result


def rows(out: Path) -> list[dict]:
    return read_scores(out).to_pylist()


def same_samples(a: Path, b: Path) -> bool:
    """The two runs scored the same samples alike (their shard names may differ)."""
    return read_scores(a).select(SAME_SAMPLE_COLUMNS).equals(read_scores(b).select(SAME_SAMPLE_COLUMNS))


def temperature(tmp_path, model):
    """Static weights are B * softmax(s / tau) over each batch's scores; the scores do not change."""
    shard = write_tar(tmp_path / "a.tar", image_text_samples(8))
    runs = {tau: tmp_path / f"tau{tau}" for tau in (0.5, 5.0)}
    for tau, out in runs.items():
        score(out, [shard], model, "--temperature", str(tau))
        batches = defaultdict(list)
        for row in rows(out):
            batches[row["step"]].append(row)
        assert len(batches) == 2
        for batch in batches.values():
            scores = torch.tensor([row["mimic_score"] for row in batch], dtype=torch.float64)
            expected = len(batch) * torch.softmax(scores / tau, dim=0)
            assert [row["mimic_weight"] for row in batch] == pytest.approx(expected.tolist(), rel=1e-5)
    low, high = (read_scores(out) for out in runs.values())
    assert low.column("mimic_score").equals(high.column("mimic_score"))
    assert not low.column("mimic_weight").equals(high.column("mimic_weight"))


def weight_decay(tmp_path, model):
    """AdamW's decay acts from the first update on: the first batch scores alike, the later ones not."""
    shard = write_tar(tmp_path / "a.tar", image_text_samples(12))
    trajectory = ["--train", "head", "--lr", "1e-2", "--shuffle-buffer", "0"]
    for decay in ("0", "30"):
        score(tmp_path / f"wd{decay}", [shard], model, *trajectory, "--weight-decay", decay)
    plain, decayed = (sorted(rows(tmp_path / f"wd{decay}"), key=lambda row: row["key"]) for decay in ("0", "30"))
    assert {row["step"] for row in plain} == {0, 1, 2}
    first = [(a["mimic_score"], b["mimic_score"]) for a, b in zip(plain, decayed) if a["step"] == 0]
    later = [(a["mimic_score"], b["mimic_score"]) for a, b in zip(plain, decayed) if a["step"] > 0]
    assert len(first) == 4 and all(a == b for a, b in first)
    assert all(a != b for a, b in later)
    assert json.loads((tmp_path / "wd30" / "run.json").read_text())["train"]["weight_decay"] == 30.0


def task(tmp_path, model):
    """A captioned pool that also carries labels: with class names the task is classification,
    unless --task contrastive says otherwise."""
    samples = image_text_samples(6)
    for index, (_, files) in enumerate(samples):
        files["cls"] = str(index % 3).encode()
    shard = write_tar(tmp_path / "a.tar", samples)
    classnames = tmp_path / "classes.txt"
    classnames.write_text("cat\ndog\nboat\n")
    score(tmp_path / "auto", [shard], model, "--classnames", str(classnames))
    score(tmp_path / "contrastive", [shard], model, "--classnames", str(classnames), "--task", "contrastive")
    classified, contrasted = rows(tmp_path / "auto"), rows(tmp_path / "contrastive")
    assert [row["label"] for row in classified] == [0, 1, 2, 0, 1, 2]
    assert all(row["clip_score"] is None and row["status"] == "ok" for row in classified)
    assert all(row["label"] is None and row["clip_score"] is not None for row in contrasted)
    refused = score(tmp_path / "classify", [shard], model, "--task", "classify", exit_code=2)
    assert "classification needs a reference head" in refused.stderr


def reference_head(tmp_path, model):
    """With a head of zero weight, every logit is the bias: the reference's loss of label y is
    logsumexp(b) - b[y], whatever the image."""
    samples = [(f"{i:04d}", {"png": image_bytes(i, fmt="PNG"), "cls": str(i % 3).encode()}) for i in range(6)]
    shard = write_tar(tmp_path / "labelled.tar", samples)
    bias = torch.tensor([2.0, 0.0, -1.0])
    head = tmp_path / "head.pt"
    torch.save({"weight": torch.zeros(3, 16), "bias": bias, "logit_scale": torch.tensor(1.0)}, head)
    score(tmp_path / "run", [shard], model, "--reference-head", str(head))
    expected = (torch.logsumexp(bias, 0) - bias).tolist()
    table = rows(tmp_path / "run")
    assert [row["label"] for row in table] == [0, 1, 2, 0, 1, 2]
    assert [row["ref_loss"] for row in table] == pytest.approx([expected[row["label"]] for row in table], rel=1e-6)
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert info["models"]["task"] == "classify"


def image_key(tmp_path, model):
    """Samples with a JPEG and a different PNG: --image-key png,jpg scores the PNGs, as a pool of
    the PNGs alone does by default."""
    both, png_only = [], []
    for key, files in image_text_samples(8):
        png = image_bytes(int(key) + 1000, fmt="PNG")
        both.append((key, {**files, "png": png}))
        png_only.append((key, {"png": png, "txt": files["txt"], "json": files["json"]}))
    mixed = write_tar(tmp_path / "mixed.tar", both)
    plain = write_tar(tmp_path / "plain.tar", png_only)
    score(tmp_path / "png-first", [mixed], model, "--image-key", "png,jpg")
    score(tmp_path / "png-only", [plain], model)
    assert same_samples(tmp_path / "png-first", tmp_path / "png-only")  # (the JPEGs would score otherwise)


def text_key(tmp_path, model):
    """--text-key json:caption reads the caption from the JSON, as a pool with it in .txt does."""
    inside, plain = [], []
    for key, files in image_text_samples(8):
        meta = {**json.loads(files["json"]), "caption": files["txt"].decode()}
        inside.append((key, {"jpg": files["jpg"], "txt": b"no caption here", "json": json.dumps(meta).encode()}))
        plain.append((key, files))
    score(tmp_path / "json-caption", [write_tar(tmp_path / "inside.tar", inside)], model, "--text-key", "json:caption")
    score(tmp_path / "txt", [write_tar(tmp_path / "plain.tar", plain)], model)
    assert same_samples(tmp_path / "json-caption", tmp_path / "txt")  # ("no caption here" would score otherwise)


def allow_pipe(tmp_path, model):
    """A pipe: shard is refused (one line) unless allowed, and then reads as the file itself."""
    shard = write_tar(tmp_path / "a.tar", image_text_samples(8))
    refused = score(tmp_path / "refused", [f"pipe:cat {shard}"], model, exit_code=2)
    assert "pipe:" in refused.stderr and len(refused.stderr.strip().splitlines()) == 1
    score(tmp_path / "piped", [f"pipe:cat {shard}"], model, "--allow-pipe")
    score(tmp_path / "file", [shard], model)
    assert {row["shard"] for row in rows(tmp_path / "piped")} == {f"pipe:cat {shard}"}
    assert same_samples(tmp_path / "piped", tmp_path / "file")


def proxy(tmp_path, model):
    """The direction runs from the given proxy to the reference (its norm, and the file's hash, in
    run.json); a proxy equal to the reference leaves no direction: one line, exit 2."""
    reference = Path(model[model.index("--reference") + 1])
    other = write_random_checkpoint(tmp_path / "proxy.pt", seed=1)
    shard = write_tar(tmp_path / "a.tar", image_text_samples(8))
    score(tmp_path / "given", [shard], model, "--proxy", str(other))
    info = json.loads((tmp_path / "given" / "run.json").read_text())["models"]
    expected = torch.linalg.norm(torch.load(reference)["visual.proj"].double() - torch.load(other)["visual.proj"].double())
    assert info["direction_norm"] == pytest.approx(expected.item(), rel=1e-9)
    assert info["proxy"]["sha256"] == hashlib.sha256(other.read_bytes()).hexdigest()
    same = score(tmp_path / "same", [shard], model, "--proxy", str(reference), exit_code=2)
    assert "V = 0" in same.stderr and len(same.stderr.strip().splitlines()) == 1


CHECKS = {"--temperature": temperature, "--weight-decay": weight_decay, "--task": task,
          "--reference-head": reference_head, "--image-key": image_key, "--text-key": text_key,
          "--allow-pipe": allow_pipe, "--proxy": proxy}


@pytest.mark.parametrize("option", list(CHECKS))
def test_the_score_option_takes_effect(option, tmp_path, tiny_config, reference_checkpoint):
    CHECKS[option](tmp_path, ["--model", str(tiny_config), "--reference", str(reference_checkpoint)])
    assert np.isfinite([row["mimic_score"] for out in tmp_path.glob("*/run.json") for row in rows(out.parent)
                        if row["status"] == "ok"]).all()
