"""One table of per-task defaults, used by the library and the CLI alike."""

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
        assert resolved.train.lr == TASK_DEFAULTS[task].lr
        assert resolved.effective_temperature == TASK_DEFAULTS[task].temperature
        assert resolved.model.layers == TASK_DEFAULTS[task].mimic_layers
    assert config("classify").train.lr == 1e-3  # not the contrastive 1e-4 any more
    assert config("classify", lr=0.5).train.lr == 0.5  # an explicit value wins


def test_every_preset_has_a_selector():
    assert tuple(PRESET_SELECTORS) == tuple(MIMIC_LAYER_PRESETS)


def test_the_help_shows_the_tables_values():
    text = " ".join(CliRunner().invoke(cli, ["score", "--help"]).output.split())
    assert "1e-4 contrastive, 1e-3 classification" in text
    assert "0.05 contrastive, 1 classification" in text
    assert "image-proj contrastive, head classification" in text


def test_grad_mimic_takes_the_task_defaults():
    from helpers import build_tiny_clip

    from mimicfilter import GradMimic

    model, reference = build_tiny_clip(seed=0), build_tiny_clip(seed=1)
    grad_mimic = GradMimic(model, reference)
    assert grad_mimic.names == ("visual.proj",) and grad_mimic.temperature == 0.05
