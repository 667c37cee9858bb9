"""GradMimic for training: the re-weighted loss, the ``full`` split, the weight entropy, and the
open_clip_train wrapper (python -m mimicfilter.train) on a tiny run with synthetic shards."""

from __future__ import annotations

import json
import logging
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import TINY_CLIP_CONFIG, build_tiny_clip, image_text_samples, write_random_checkpoint, write_tar
from mimicfilter import GradMimic, MimicfilterError, contrastive_per_sample_loss


class TwoLayer(nn.Module):
    """logits = head(trunk(x)) with no bias and no nonlinearity: every gradient has a closed form."""

    def __init__(self, seed: int):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.trunk = nn.Linear(4, 3, bias=False, dtype=torch.float64)
        self.head = nn.Linear(3, 5, bias=False, dtype=torch.float64)
        with torch.no_grad():
            self.trunk.weight.copy_(torch.randn(3, 4, generator=generator, dtype=torch.float64))
            self.head.weight.copy_(torch.randn(5, 3, generator=generator, dtype=torch.float64))

    def forward(self, x):
        return self.head(self.trunk(x))


def batch(size: int = 6):
    generator = torch.Generator().manual_seed(3)
    return torch.randn(size, 4, generator=generator, dtype=torch.float64), torch.randint(0, 5, (size,), generator=generator)


def hand_computation(model: TwoLayer, reference: TwoLayer, x, y, temperature: float):
    """Scores, weights and per-sample gradients written out: for l_i = CE(W2 W1 x_i, y_i) with
    e_i = p_i - onehot(y_i) and h_i = W1 x_i, grad_W2 l_i = e_i h_i^T and grad_W1 l_i = W2^T e_i x_i^T."""
    w1, w2 = model.trunk.weight.detach(), model.head.weight.detach()
    hidden = x @ w1.T
    errors = torch.softmax(hidden @ w2.T, dim=1) - F.one_hot(y, 5).double()
    grad_w2 = errors[:, :, None] * hidden[:, None, :]  # [B, 5, 3]
    grad_w1 = (errors @ w2)[:, :, None] * x[:, None, :]  # [B, 3, 4]
    direction = reference.head.weight.detach() - w2
    scores = -(grad_w2 * direction).sum(dim=(1, 2)) / direction.norm()
    weights = torch.softmax(scores / temperature, dim=0)
    return scores, weights, grad_w1, grad_w2


@pytest.mark.parametrize("others", ["weighted", "mean"])
def test_reweighted_gradients_match_a_hand_computation(others):
    model, reference = TwoLayer(0), TwoLayer(1)
    x, y = batch()
    grad_mimic = GradMimic(model, reference, mimic_layers="head.weight", temperature=0.7, task="classify")
    losses = F.cross_entropy(model(x), y, reduction="none")
    step = grad_mimic.reweight(losses, others=others)
    step.loss.backward()

    scores, weights, grad_w1, grad_w2 = hand_computation(model, reference, x, y, 0.7)
    torch.testing.assert_close(step.scores, scores, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(step.weights, weights, rtol=1e-10, atol=1e-12)
    # the mimic layer always learns from sum_i w_i grad l_i
    torch.testing.assert_close(model.head.weight.grad, (weights[:, None, None] * grad_w2).sum(0), rtol=1e-10, atol=1e-12)
    if others == "weighted":  # the loss is sum_i w_i l_i: so is every gradient
        assert step.loss.item() == pytest.approx((weights * losses.detach()).sum().item(), rel=1e-12)
        expected_trunk = (weights[:, None, None] * grad_w1).sum(0)
    else:  # the full split: the loss's value and every other gradient are the plain mean's
        assert step.loss.item() == pytest.approx(losses.detach().mean().item(), rel=1e-12)
        expected_trunk = grad_w1.mean(0)
    torch.testing.assert_close(model.trunk.weight.grad, expected_trunk, rtol=1e-10, atol=1e-12)
    assert not torch.allclose(weights, torch.full_like(weights, 1 / len(weights)))  # the check can tell them apart


def clip_batch(model, size: int = 5):
    from open_clip.tokenizer import SimpleTokenizer

    images = torch.randn(size, 3, 32, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    texts = SimpleTokenizer(context_length=16)([f"thing {i}" for i in range(size)])
    return contrastive_per_sample_loss(*model(images, texts)[:3])


def per_sample_gradients(model, losses) -> list[dict[str, torch.Tensor]]:
    names = [name for name, _ in model.named_parameters()]
    result = []
    for loss in losses:
        grads = torch.autograd.grad(loss, list(model.parameters()), retain_graph=True, allow_unused=True)
        result.append({name: g if g is not None else torch.zeros_like(p)
                       for name, g, p in zip(names, grads, model.parameters())})
    return result


def test_full_split_on_a_clip_sends_the_plain_mean_to_every_other_parameter():
    model, reference = build_tiny_clip(seed=0).double(), build_tiny_clip(seed=1).double()
    grad_mimic = GradMimic(model, reference, mimic_layers="image-proj", temperature=0.05)
    losses = clip_batch(model)
    expected = per_sample_gradients(model, losses)
    step = grad_mimic.reweight(losses, others="mean")
    step.loss.backward()
    for name, parameter in model.named_parameters():
        coefficients = step.weights if name == "visual.proj" else torch.full_like(step.weights, 1 / len(losses))
        want = sum(c * g[name] for c, g in zip(coefficients, expected))
        got = parameter.grad if parameter.grad is not None else torch.zeros_like(parameter)
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12, msg=name)


def test_weight_entropy_and_its_log(caplog):
    model, reference = TwoLayer(0), TwoLayer(1)
    x, y = batch(8)
    grad_mimic = GradMimic(model, reference, mimic_layers="head.weight", temperature=0.3, task="classify", log_every=2)
    with caplog.at_level(logging.INFO, logger="mimicfilter.mimic.grad_mimic"):
        steps = [grad_mimic.reweight(F.cross_entropy(model(x), y, reduction="none")) for _ in range(4)]
    weights = steps[0].weights
    assert steps[0].weight_entropy.item() == pytest.approx(-(weights * weights.log()).sum().item(), rel=1e-12)
    stats = steps[0].stats()
    assert stats["effective_batch"] == pytest.approx(math.exp(stats["weight_entropy"]))
    assert 0 < stats["weight_entropy_fraction"] < 1 and stats["batch"] == 8 and stats["direction_norm"] > 0
    lines = [record.getMessage() for record in caplog.records if "grad-mimic step" in record.getMessage()]
    assert [line.split(":")[0] for line in lines] == ["grad-mimic step 2", "grad-mimic step 4"]
    assert "weight entropy" in lines[0]
    uniform = GradMimic(model, reference, mimic_layers="head.weight", temperature=1e9, task="classify")
    flat = uniform.reweight(F.cross_entropy(model(x), y, reduction="none"))
    assert flat.weight_entropy.item() == pytest.approx(math.log(8), rel=1e-9)


def test_bad_arguments_are_one_line_errors():
    model, reference = TwoLayer(0), TwoLayer(1)
    grad_mimic = GradMimic(model, reference, mimic_layers="head.weight", task="classify")
    x, y = batch()
    with pytest.raises(MimicfilterError, match="others"):
        grad_mimic.reweight(F.cross_entropy(model(x), y, reduction="none"), others="half")
    with pytest.raises(MimicfilterError, match="V = 0"):
        GradMimic(model, model, mimic_layers="head.weight", task="classify")


# ------------------------------------------------------------------------- the open_clip_train wrapper


def test_the_wrapped_trainer_loss_is_the_reweighted_loss(tmp_path):
    from mimicfilter.train.loss import GradMimicClipLoss, GradMimicOptions

    model, reference = build_tiny_clip(seed=0).double(), build_tiny_clip(seed=1).double()
    options = GradMimicOptions(reference="unused", layers="image-proj", temperature=0.05, others="weighted")
    loss = GradMimicClipLoss({"visual.proj": reference.visual.proj.detach()}, options)
    from open_clip.tokenizer import SimpleTokenizer

    images = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    texts = SimpleTokenizer(context_length=16)([f"thing {i}" for i in range(5)])
    out = model(images, texts)
    with pytest.raises(RuntimeError, match="bind"):
        loss(*out[:3], output_dict=True)
    loss.bind(model)
    result = loss(*out[:3], output_dict=True)
    assert list(result) == ["contrastive_loss"]
    losses = contrastive_per_sample_loss(*out[:3]).detach()
    weights = GradMimic(model, reference, mimic_layers="image-proj", temperature=0.05).reweight(
        contrastive_per_sample_loss(*model(images, texts)[:3])).weights
    assert result["contrastive_loss"].item() == pytest.approx((weights * losses).sum().item(), rel=1e-9)


def write_model_dir(directory: Path) -> Path:
    directory.mkdir()
    (directory / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CLIP_CONFIG, "preprocess_cfg": {}}))
    return directory


def wrapper(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mimicfilter.train", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=600)


@pytest.mark.slow
def test_open_clip_train_runs_a_few_reweighted_steps_on_synthetic_shards(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    for index in range(2):
        write_tar(shards / f"pool-{index}.tar", image_text_samples(12, start=12 * index))
    model_dir = write_model_dir(tmp_path / "model")
    reference = write_random_checkpoint(tmp_path / "reference.safetensors", seed=7)
    result = wrapper([
        "--grad-mimic-reference", str(reference), "--grad-mimic-layers", "image-proj",
        "--grad-mimic-temperature", "0.05", "--grad-mimic-others", "mean",
        "--model", f"local-dir:{model_dir}", "--train-data", str(shards / "pool-{0..1}.tar"),
        "--dataset-type", "webdataset", "--train-num-samples", "24", "--batch-size", "6", "--epochs", "1",
        "--workers", "1", "--precision", "fp32", "--lr", "1e-3", "--warmup", "1", "--log-every-n-steps", "1",
        "--seed", "0", "--logs", str(tmp_path / "logs"), "--name", "run", "--report-to", "",
    ], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    log = (tmp_path / "logs" / "run" / "out.log").read_text()
    steps = [line for line in log.splitlines() if "grad-mimic step" in line]
    assert len(steps) == 4 and "weight entropy" in steps[0]  # 24 samples / batch 6: one line per step
    assert "Contrastive_loss" in log
    checkpoint = torch.load(tmp_path / "logs" / "run" / "checkpoints" / "epoch_1.pt", weights_only=True)
    start = build_tiny_clip(seed=0).state_dict()  # open_clip_train seeds 0 before building the model
    assert not torch.equal(checkpoint["state_dict"]["visual.proj"], start["visual.proj"])


DEMO = Path(__file__).resolve().parent.parent / "demo"


@pytest.mark.slow
def test_a_json_model_config_trains_as_score_takes_it(tmp_path):
    """``--model demo/tiny-clip.json`` (as ``score`` takes it), started from ``--pretrained``: 2 steps."""
    from safetensors.torch import load_file

    shards = tmp_path / "shards"
    shards.mkdir()
    write_tar(shards / "pool-0.tar", image_text_samples(12))
    pretrained = write_random_checkpoint(tmp_path / "start.safetensors", json.loads((DEMO / "tiny-clip.json").read_text()), 3)
    result = wrapper([
        "--grad-mimic-reference", str(DEMO / "reference.safetensors"), "--",
        "--model", str(DEMO / "tiny-clip.json"), "--pretrained", str(pretrained),
        "--train-data", str(shards / "pool-0.tar"), "--dataset-type", "webdataset", "--train-num-samples", "12",
        "--batch-size", "6", "--epochs", "1", "--workers", "1", "--precision", "fp32", "--lr", "1e-3",
        "--warmup", "1", "--log-every-n-steps", "1", "--seed", "0", "--logs", str(tmp_path / "logs"),
        "--name", "run", "--report-to", "",
    ], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    log = (tmp_path / "logs" / "run" / "out.log").read_text()
    assert len([line for line in log.splitlines() if "grad-mimic step" in line]) == 2  # 12 samples / batch 6
    trained = torch.load(tmp_path / "logs" / "run" / "checkpoints" / "epoch_1.pt", weights_only=True)["state_dict"]
    start = load_file(str(pretrained))
    assert trained.keys() == start.keys()  # the demo architecture, not a built-in one
    # two AdamW steps at lr 1e-3 from the --pretrained weights: every weight within a few lr of them
    assert max((trained[name] - start[name]).abs().max().item() for name in start) < 1e-2


@pytest.mark.parametrize("args, message", [
    (["--model", "missing.json"], "model config missing.json does not exist"),
    (["--model", str(DEMO / "tiny-clip.json"), "--pretrained", "openai"], "pretrained tags belong to built-in"),
])
def test_a_json_model_config_is_checked_in_one_line(tmp_path, args, message):
    reference = write_random_checkpoint(tmp_path / "reference.pt", seed=7)
    result = wrapper(["--grad-mimic-reference", str(reference), "--train-data", str(tmp_path / "none.tar"),
                      "--logs", str(tmp_path / "logs"), *args], tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and message in lines[0]
    assert not (tmp_path / "logs").exists()


@pytest.mark.parametrize("args, message", [
    (["--accum-freq", "2"], "--accum-freq 2"),
    (["--torchcompile"], "--torchcompile"),
    (["--grad-mimic-temperature", "0"], "must be positive"),
    (["--grad-mimic-layers", "nothing.*"], "matches no parameter"),
])
def test_the_wrapper_refuses_what_it_cannot_do_in_one_line(tmp_path, args, message):
    model_dir = write_model_dir(tmp_path / "model")
    reference = write_random_checkpoint(tmp_path / "reference.pt", seed=7)
    base = ["--grad-mimic-reference", str(reference), "--model", f"local-dir:{model_dir}",
            "--train-data", str(tmp_path / "none.tar"), "--logs", str(tmp_path / "logs")]
    result = wrapper(base + args, tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and message in lines[0]
    assert not (tmp_path / "logs").exists()  # refused before the trainer created anything


def test_a_missing_reference_is_one_line(tmp_path):
    model_dir = write_model_dir(tmp_path / "model")
    result = wrapper(["--grad-mimic-reference", str(tmp_path / "nope.pt"), "--model", f"local-dir:{model_dir}",
                      "--train-data", "x.tar"], tmp_path)
    assert result.returncode == 2 and "does not exist" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_importing_the_package_or_the_cli_loads_no_trainer():
    code = ("import sys, mimicfilter, mimicfilter_cli.main, mimicfilter.train; "
            "print(sorted(m for m in ('torch', 'open_clip_train') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
