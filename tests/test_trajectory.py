"""Grad-Mimic trajectories: the training step, weights, head-only updates, resume, classification."""

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from helpers import image_bytes, image_text_samples, write_tar
from torch.func import functional_call

from mimicfilter import GradMimic
from mimicfilter.defaults import TASK_DEFAULTS
from mimicfilter.mimic.jvp import mimic_direction
from mimicfilter.mimic.losses import classification_per_sample_loss, contrastive_per_sample_loss
from mimicfilter.mimic.layers import parameters_of
from mimicfilter.mimic.models import ModelSpec, load_models
from mimicfilter.pipeline.batch_scorer import make_scorer
from mimicfilter.store.parts import read_scores
from mimicfilter_cli.main import cli

DOCS = Path(__file__).resolve().parent.parent / "docs"


def autograd_scores(model, names, unit, loss_of):
    """The definition: one backward pass per sample, dotted with the unit direction."""
    params = {name: p.detach().clone().requires_grad_(True) for name, p in parameters_of(model, names).items()}
    losses = loss_of(params)
    scores = []
    for i in range(losses.shape[0]):
        grads = torch.autograd.grad(loss_of(params)[i], list(params.values()))
        scores.append(-sum((g * unit[n].to(g)).sum() for n, g in zip(params, grads)))
    return torch.stack(scores)


def clip_losses(model):
    def loss_of(params, images, texts):
        image, text, scale = functional_call(model, params, (images, texts))[:3]
        return contrastive_per_sample_loss(image, text, scale)

    return loss_of


@pytest.mark.parametrize("layers", ["image-proj", "image-last-mlp"])
def test_training_steps_equal_a_hand_written_loop(tiny_config, reference_checkpoint, layers):
    spec = ModelSpec(model=str(tiny_config), reference=str(reference_checkpoint), mimic_layers=layers)
    ours = load_models(spec)
    theirs = load_models(spec)
    for models in (ours, theirs):
        models.reference.double()
        models.proxy.double()
    scorer = make_scorer(ours, temperature=0.1)
    optimizer = torch.optim.AdamW(scorer.enable_training("head"), lr=1e-2, weight_decay=1e-5)
    hand_params = list(parameters_of(theirs.proxy, theirs.mimic_layers).values())
    for parameter in hand_params:
        parameter.requires_grad_(True)
    hand_optimizer = torch.optim.AdamW(hand_params, lr=1e-2, weight_decay=1e-5)
    generator = torch.Generator().manual_seed(5)
    for step in range(3):
        images = torch.randn(6, 3, 32, 32, generator=generator, dtype=torch.float64)
        texts = ours.tokenizer([f"step {step} caption {i}" for i in range(6)])
        result = scorer.train_step(images, texts, optimizer)

        # by hand: V from the current proxy, per-sample autograd scores, softmax weights, AdamW
        names = theirs.mimic_layers
        reference_values = parameters_of(theirs.reference, names)
        direction = {n: reference_values[n] - p.detach() for n, p in parameters_of(theirs.proxy, names).items()}
        norm = torch.sqrt(sum((d**2).sum() for d in direction.values()))
        unit = {n: d / norm for n, d in direction.items()}
        loss_of = clip_losses(theirs.proxy)
        expected = autograd_scores(theirs.proxy, names, unit, lambda p: loss_of(p, images, texts))
        torch.testing.assert_close(result.mimic_score, expected, rtol=1e-7, atol=1e-10)
        weights = torch.softmax(expected / 0.1, dim=0)
        torch.testing.assert_close(result.mimic_weight, 6 * weights, rtol=1e-7, atol=1e-10)
        image, text, scale = theirs.proxy(images, texts)[:3]
        hand_optimizer.zero_grad()
        (weights * contrastive_per_sample_loss(image, text, scale)).sum().backward()
        hand_optimizer.step()
    for name in ours.mimic_layers:
        torch.testing.assert_close(dict(ours.proxy.named_parameters())[name], dict(theirs.proxy.named_parameters())[name])


def test_head_training_changes_only_the_mimic_layers(tiny_config, reference_checkpoint):
    models = load_models(ModelSpec(model=str(tiny_config), reference=str(reference_checkpoint)))
    before = {k: v.clone() for k, v in models.proxy.state_dict().items()}
    scorer = make_scorer(models, temperature=0.05)
    optimizer = torch.optim.AdamW(scorer.enable_training("head"), lr=1e-2)
    images = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    scorer.train_step(images, models.tokenizer([f"t {i}" for i in range(5)]), optimizer)
    changed = {k for k, v in models.proxy.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {"visual.proj"}


def test_full_training_trains_the_trunk_with_the_plain_mean_loss(tiny_config, reference_checkpoint):
    models = load_models(ModelSpec(model=str(tiny_config), reference=str(reference_checkpoint)))
    scorer = make_scorer(models, temperature=0.05)
    trained = scorer.enable_training("full")
    optimizer = torch.optim.SGD(trained, lr=1.0)  # plain SGD: the update is exactly minus the gradient
    images = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    texts = models.tokenizer([f"t {i}" for i in range(5)])
    proxy = models.proxy
    start = {k: v.detach().clone() for k, v in proxy.named_parameters()}
    reference_copy = {k: v.detach().clone() for k, v in proxy.named_parameters()}
    image, text, scale = functional_call(proxy, reference_copy, (images, texts))[:3]
    result = scorer.train_step(images, texts, optimizer)

    params = {k: v.clone().requires_grad_(True) for k, v in start.items()}
    losses = contrastive_per_sample_loss(*functional_call(proxy, params, (images, texts))[:3])
    weights = result.mimic_weight / 5
    (mean_grad,) = torch.autograd.grad(losses.mean(), [params["transformer.resblocks.0.mlp.c_fc.weight"]], retain_graph=True)
    (weighted_grad,) = torch.autograd.grad((weights * losses).sum(), [params["visual.proj"]])
    after = dict(proxy.named_parameters())
    name = "transformer.resblocks.0.mlp.c_fc.weight"
    torch.testing.assert_close(start[name] - after[name].detach(), mean_grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(start["visual.proj"] - after["visual.proj"].detach(), weighted_grad, rtol=1e-4, atol=1e-6)
    # the step reports the losses of the proxy it started from, not of the one it leaves
    torch.testing.assert_close(result.loss, contrastive_per_sample_loss(image, text, scale).detach())


def test_the_default_proxy_shares_the_frozen_tensors_until_its_trunk_trains(tiny_config, reference_checkpoint):
    models = load_models(ModelSpec(model=str(tiny_config), reference=str(reference_checkpoint)))
    reference, proxy = dict(models.reference.named_parameters()), dict(models.proxy.named_parameters())
    shared = {name for name in proxy if proxy[name] is reference[name]}
    assert shared == set(proxy) - {"visual.proj"}  # the mimic layer is the proxy's own (re-initialised)
    assert not torch.equal(proxy["visual.proj"], reference["visual.proj"])
    reference_before = {k: v.detach().clone() for k, v in reference.items()}

    scorer = make_scorer(models, temperature=0.05)
    optimizer = torch.optim.SGD(scorer.enable_training("full"), lr=1.0)
    proxy = dict(models.proxy.named_parameters())
    assert not any(proxy[name] is reference[name] for name in proxy)
    images = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    scorer.train_step(images, models.tokenizer([f"t {i}" for i in range(5)]), optimizer)
    assert all(torch.equal(reference[name], reference_before[name]) for name in reference)  # the reference stays
    assert not torch.equal(proxy["transformer.resblocks.0.mlp.c_fc.weight"],
                           reference["transformer.resblocks.0.mlp.c_fc.weight"])


def trajectory_args(shards, tiny_config, reference_checkpoint, out, *extra):
    return ["score", *map(str, shards), "--model", str(tiny_config), "--reference", str(reference_checkpoint),
            "--out", str(out), "--batch-size", "4", "--workers", "0", "--quiet", "--train", "head",
            "--shuffle-buffer", "8", "--lr", "1e-2", *extra]


def test_trajectory_rows_cover_every_sample_once_per_epoch(tiny_config, reference_checkpoint, tmp_path):
    shards = [write_tar(tmp_path / f"{i}.tar", image_text_samples(9, start=10 * i)) for i in range(2)]
    result = CliRunner().invoke(cli, trajectory_args(shards, tiny_config, reference_checkpoint, tmp_path / "run", "--epochs", "3"))
    assert result.exit_code == 0, result.output
    rows = read_scores(tmp_path / "run").to_pylist()
    assert len(rows) == 54
    for epoch in range(3):
        keys = sorted((r["shard"], r["key"]) for r in rows if r["epoch"] == epoch)
        assert len(keys) == 18 and len(set(keys)) == 18
    by_step = {}
    for row in rows:
        by_step.setdefault(row["step"], []).append(row["mimic_weight"])
    assert len(by_step) == 3 * 5  # 18 samples in batches of 4: four full ones, and a tail of 2 (= B/2) alone
    for weights in by_step.values():
        assert sum(weights) == pytest.approx(len(weights), rel=1e-5)  # softmax weights sum to 1
    assert {p.name for p in (tmp_path / "run" / "checkpoints").iterdir()} >= {"latest.pt", "epoch-0002.pt"}


def test_trajectory_tables_do_not_depend_on_workers_or_work_unit_size(tiny_config, reference_checkpoint, tmp_path):
    from mimicfilter.mimic.models import ModelSpec
    from mimicfilter.pipeline.config import ScoreConfig, TrainConfig
    from mimicfilter.pipeline.run import run_score

    samples = image_text_samples(23)
    samples[5][1]["jpg"] = b"not an image"  # a decode_error rides along with its batch
    shards = (str(write_tar(tmp_path / "a.tar", samples)), str(write_tar(tmp_path / "b.tar", image_text_samples(9, 50))))
    model = ModelSpec(str(tiny_config), str(reference_checkpoint))
    train = TrainConfig(mode="head", epochs=2, lr=1e-2, shuffle_buffer=8, checkpoint_every=2)
    tables = []
    for workers, chunk_size in [(0, 64), (1, 64), (2, 1), (2, 4)]:
        out = tmp_path / f"w{workers}-c{chunk_size}"
        run_score(ScoreConfig(shards, out, model, batch_size=4, workers=workers, train=train, chunk_size=chunk_size))
        tables.append(read_scores(out))
    assert tables[0].num_rows == 64 and "decode_error" in tables[0].column("status").to_pylist()
    assert all(table.equals(tables[0]) for table in tables[1:])


@pytest.mark.slow
def test_killed_trajectory_resumes_to_the_uninterrupted_table(tiny_config, reference_checkpoint, tmp_path):
    shards = [write_tar(tmp_path / f"{i}.tar", image_text_samples(40, start=100 * i)) for i in range(3)]
    extra = ("--epochs", "3", "--checkpoint-every", "3")
    baseline = tmp_path / "baseline"
    assert CliRunner().invoke(cli, trajectory_args(shards, tiny_config, reference_checkpoint, baseline, *extra)).exit_code == 0

    out = tmp_path / "killed"  # killed and resumed with two decoding workers, the baseline had none
    args = trajectory_args(shards, tiny_config, reference_checkpoint, out, *extra)
    args[args.index("--workers") + 1] = "2"
    command = [sys.executable, "-m", "mimicfilter", *args]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint = out / "checkpoints" / "latest.pt"
    deadline = time.time() + 120
    while time.time() < deadline and not checkpoint.exists():
        time.sleep(0.005)
    time.sleep(0.05)  # die somewhere after the first checkpoint, mid-chunk
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (out / "_SUCCESS").exists(), "the run finished before it could be killed"

    resumed = CliRunner().invoke(cli, args)
    assert resumed.exit_code == 0, resumed.output
    assert read_scores(out).equals(read_scores(baseline))


@pytest.fixture
def labelled_shard(tmp_path):
    samples = [(f"{i:05d}", {"png": image_bytes(i, fmt="PNG"), "cls": str(i % 3).encode()}) for i in range(14)]
    samples.append(("00099", {"png": image_bytes(99, fmt="PNG"), "cls": b"7"}))  # no such class
    samples.append(("00100", {"png": image_bytes(100, fmt="PNG")}))  # no label
    shard = write_tar(tmp_path / "labelled.tar", samples)
    classnames = tmp_path / "classes.txt"
    classnames.write_text("cat\ndog\nbird\n")
    return shard, classnames


def test_classification_with_a_zero_shot_reference_head(labelled_shard, tiny_config, reference_checkpoint, tmp_path):
    shard, classnames = labelled_shard
    args = ["score", str(shard), "--model", str(tiny_config), "--reference", str(reference_checkpoint),
            "--classnames", str(classnames), "--out", str(tmp_path / "run"), "--batch-size", "4", "--workers", "0",
            "--quiet", "--json", "--epochs", "2"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["models"]["task"] == "classify"
    assert run["models"]["reference_head"]["classnames"] == ["cat", "dog", "bird"]
    assert run["models"]["mimic_layers"]["shapes"] == {"head.weight": [3, 16]}
    rows = read_scores(tmp_path / "run").to_pylist()
    statuses = {(r["key"], r["epoch"]): r["status"] for r in rows}
    assert statuses[("00099", 0)] == "decode_error" and statuses[("00100", 1)] == "missing_label"
    ok = [r for r in rows if r["status"] == "ok"]
    assert len(ok) == 28 and all(r["clip_score"] is None and r["ref_loss"] is not None for r in ok)
    assert {r["label"] for r in ok} == {0, 1, 2}
    assert run["temperature"] == 1.0
    # the default lr follows the pool: 16 samples counted from the tar's headers, 4 steps an epoch
    assert run["lr_pool_samples"] == 16
    assert run["train"]["lr"] == pytest.approx(TASK_DEFAULTS["classify"].lr_for(4, 16))


def test_classification_scores_equal_autograd(labelled_shard, tiny_config, reference_checkpoint):
    _, classnames = labelled_shard
    models = load_models(ModelSpec(model=str(tiny_config), reference=str(reference_checkpoint), task="classify",
                                   classnames=str(classnames)))
    models.reference.double()
    models.proxy.double()
    scorer = make_scorer(models, temperature=1.0)
    images = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    result = scorer.score(images, labels)

    def loss_of(params):
        return classification_per_sample_loss(functional_call(models.proxy, params, (images,)), labels)

    expected = autograd_scores(models.proxy, models.mimic_layers, models.direction.unit, loss_of)
    torch.testing.assert_close(result.mimic_score, expected, rtol=1e-9, atol=1e-12)
    reference_logits = models.reference(images)
    torch.testing.assert_close(result.ref_loss, F.cross_entropy(reference_logits, labels, reduction="none"))


def test_task_is_detected_from_the_samples(labelled_shard, tiny_config, reference_checkpoint, tmp_path):
    shard, _ = labelled_shard
    result = CliRunner().invoke(cli, ["score", str(shard), "--model", str(tiny_config), "--reference",
                                      str(reference_checkpoint), "--out", str(tmp_path / "run"), "--quiet"])
    assert result.exit_code == 2 and "--classnames" in result.stderr


def test_grad_mimic_api_scores_equal_autograd(tiny_config, reference_checkpoint):
    models = load_models(ModelSpec(model=str(tiny_config), reference=str(reference_checkpoint)))
    proxy = models.proxy.double().requires_grad_(True)
    reference = models.reference.double()
    grad_mimic = GradMimic(proxy, reference, mimic_layers="image-proj", temperature=0.05)
    images = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    texts = models.tokenizer([f"x {i}" for i in range(5)])
    losses = contrastive_per_sample_loss(*proxy(images, texts)[:3])
    step = grad_mimic.reweight(losses)
    unit = mimic_direction(parameters_of(reference, ("visual.proj",)), parameters_of(proxy, ("visual.proj",))).unit
    expected = autograd_scores(proxy, ("visual.proj",), unit, lambda p: clip_losses(proxy)(p, images, texts))
    torch.testing.assert_close(step.scores, expected, rtol=1e-9, atol=1e-12)
    assert step.weights.sum().item() == pytest.approx(1.0)
    step.loss.backward()
    assert proxy.visual.proj.grad is not None


def test_the_api_example_in_the_docs_runs():
    code = re.search(r"```python\n(.*?)```", (DOCS / "api.md").read_text(), re.S).group(1)
    exec(compile(code, "docs/api.md", "exec"), {})


@pytest.mark.parametrize(
    "args, message",
    [(["--train", "none", "--epochs", "2"], "learning proxy"), (["--epochs", "0"], "at least 1"), (["--lr", "0"], "--lr 0.0: needs a finite number above 0")],
)
def test_bad_training_options_exit_2_with_one_line(tiny_config, reference_checkpoint, tmp_path, args, message):
    shard = write_tar(tmp_path / "s.tar", image_text_samples(4))
    base = trajectory_args([shard], tiny_config, reference_checkpoint, tmp_path / "run")
    base = base[: base.index("--train")] + base[base.index("--train") + 2 :]
    result = CliRunner().invoke(cli, base + args)
    assert result.exit_code == 2 and message in result.stderr and len(result.stderr.strip().splitlines()) == 1
