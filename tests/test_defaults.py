"""One table of per-task defaults, used by the library and the CLI alike."""

import dataclasses
from pathlib import Path

from click.testing import CliRunner

from mimicfilter.defaults import MIMIC_LAYER_PRESETS, TASK_DEFAULTS
from mimicfilter.mimic.layers import PRESET_SELECTORS
from mimicfilter.mimic.models import ModelSpec
from mimicfilter.pipeline.config import ScoreConfig, TrainConfig
from mimicfilter.shards.decode import DecodeConfig
from mimicfilter_cli.main import cli


def config(task: str, **train) -> ScoreConfig:
    model = ModelSpec(model="m.json", reference="r.pt", task=task, classnames="classes.txt" if task == "classify" else None)
    return ScoreConfig(shards=("a.tar",), out_dir=Path("out"), model=model, decode=DecodeConfig(task=task),
                       train=TrainConfig(mode="head", **train))


def test_the_library_takes_each_tasks_learning_rate_and_temperature_from_the_table():
    for task in ("contrastive", "classify"):
        resolved = config(task)
        assert resolved.train.lr == TASK_DEFAULTS[task].lr_for(resolved.batch_size)
        assert resolved.effective_temperature == TASK_DEFAULTS[task].temperature
        assert resolved.model.layers == TASK_DEFAULTS[task].mimic_layers
    assert config("classify").train.lr == 3e-3  # not the contrastive 1e-4 (batch 256)
    assert config("classify", lr=0.5).train.lr == 0.5  # an explicit value wins


def test_the_classification_lr_follows_the_batch_size_and_the_contrastive_one_does_not():
    def resolved(task: str, batch_size: int, **train) -> float:
        return dataclasses.replace(config(task, **train), batch_size=batch_size, train=TrainConfig(mode="head", **train)).train.lr

    assert resolved("classify", 64) == 3e-3 / 4 and resolved("classify", 1024) == 3e-3 * 4
    assert resolved("contrastive", 64) == resolved("contrastive", 1024) == 1e-4
    assert resolved("classify", 64, lr=0.5) == 0.5  # an explicit --lr is never scaled


def test_every_preset_has_a_selector():
    assert tuple(PRESET_SELECTORS) == tuple(MIMIC_LAYER_PRESETS)


def test_the_help_shows_the_tables_values():
    text = " ".join(CliRunner().invoke(cli, ["score", "--help"]).output.split())
    assert "1e-4 contrastive, 3e-3 classification (at batch 256, scaled with --batch-size)" in text
    assert "0.05 contrastive, 1 classification" in text
    assert "image-proj contrastive, head classification" in text
    assert "head+bias" in text


def test_grad_mimic_takes_the_task_defaults():
    from helpers import build_tiny_clip

    from mimicfilter import GradMimic

    model, reference = build_tiny_clip(seed=0), build_tiny_clip(seed=1)
    grad_mimic = GradMimic(model, reference)
    assert grad_mimic.names == ("visual.proj",) and grad_mimic.temperature == 0.05


def test_the_classification_default_mimics_the_head_weight_only_as_the_papers_code(tiny_config, reference_checkpoint,
                                                                                  tmp_path):
    import torch
    import torch.nn.functional as F

    from mimicfilter.mimic.build import make_scorer
    from mimicfilter.mimic.models import load_models

    generator = torch.Generator().manual_seed(0)
    head = tmp_path / "head.pt"
    torch.save({"weight": torch.randn(3, 16, generator=generator), "bias": torch.randn(3, generator=generator)}, head)
    spec = dict(model=str(tiny_config), reference=str(reference_checkpoint), task="classify", reference_head=str(head))
    models = load_models(ModelSpec(**spec))
    assert models.mimic_layers == ("head.weight",)
    assert torch.equal(models.proxy.head.bias, models.reference.head.bias)  # the bias keeps the reference's value
    models.reference.double()
    models.proxy.double()
    images = torch.randn(6, 3, 32, 32, generator=generator, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    scores = make_scorer(models, temperature=1.0).score(images, labels).mimic_score

    # The official formula, written out: each sample's loss gradient with respect to the head's weight
    # alone, projected on the unit direction from the proxy's weight to the reference's.
    proxy, reference = models.proxy, models.reference
    direction = reference.head.weight - proxy.head.weight
    direction = direction / direction.norm()
    with torch.no_grad():
        features = proxy.features(images)
    expected = []
    for feature, label in zip(features, labels):
        weight = proxy.head.weight.detach().clone().requires_grad_(True)
        logits = proxy.logit_scale * (feature @ weight.T + proxy.head.bias)
        (gradient,) = torch.autograd.grad(F.cross_entropy(logits[None], label[None]), weight)
        expected.append(-(gradient * direction).sum())
    # (the scorer's unit direction was computed in float32 when the models loaded: agreement to ~1e-7)
    torch.testing.assert_close(scores, torch.stack(expected), rtol=2e-6, atol=1e-9)

    # head+bias keeps the old behaviour: the bias is mimicked and re-initialised too, and the scores differ
    old = load_models(ModelSpec(**spec, mimic_layers="head+bias"))
    assert old.mimic_layers == ("head.weight", "head.bias")
    assert not torch.equal(old.proxy.head.bias, old.reference.head.bias)
    old.reference.double()
    old.proxy.double()
    old_scores = make_scorer(old, temperature=1.0).score(images, labels).mimic_score
    assert not torch.allclose(old_scores, scores)
