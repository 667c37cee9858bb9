"""One table of per-task defaults, used by the library and the CLI alike."""

import dataclasses
from pathlib import Path

import pytest
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
        assert resolved.effective_temperature == TASK_DEFAULTS[task].temperature
        assert resolved.model.layers == TASK_DEFAULTS[task].mimic_layers
    assert config("contrastive").train.lr == TASK_DEFAULTS["contrastive"].lr == 1e-4
    # classification's default follows the pool's size: left for the run to count (with_pool_lr)
    assert config("classify").train.lr is None and config("classify").lr_needs_pool_size
    assert config("classify", lr=0.5).train.lr == 0.5  # an explicit value wins
    assert not config("classify", lr=0.5).lr_needs_pool_size


def test_the_classification_lr_follows_the_steps_of_an_epoch_and_the_contrastive_one_does_not():
    classify, contrastive = TASK_DEFAULTS["classify"], TASK_DEFAULTS["contrastive"]
    assert classify.lr_for(256, 3000) == 3e-3
    assert classify.lr_for(64, 3000) == pytest.approx(3e-3 / 4)  # the batch size's scaling of before
    assert classify.lr_for(1024, 3000) == pytest.approx(3e-3 * 4)
    assert classify.lr_for(256, 12_000) == pytest.approx(3e-3 / 4)  # 4x the steps per epoch
    assert classify.lr_for(256, 100) == classify.lr_for(512, 200) == pytest.approx(3e-3 * 3000 / 256)  # one step
    with pytest.raises(ValueError, match="pool's size"):
        classify.lr_for(256)
    assert contrastive.lr_for(64) == contrastive.lr_for(1024, 10**9) == 1e-4


def test_a_static_run_records_the_lr_earlier_versions_did():
    static = dataclasses.replace(config("classify"), batch_size=64, train=TrainConfig(mode="none"))
    assert static.train.lr == pytest.approx(3e-3 / 4) and not static.lr_needs_pool_size


def test_the_run_counts_the_pools_samples_for_the_default_lr(tmp_path):
    from helpers import write_tar

    from mimicfilter.pipeline.run import with_pool_lr

    shards = [write_tar(tmp_path / f"{i}.tar", [(f"s{i}-{k}", {"jpg": b"x", "cls": b"1"}) for k in range(n)])
              for i, n in enumerate((5, 7))]
    resolved = dataclasses.replace(config("classify"), shards=tuple(str(s) for s in shards), batch_size=4)
    counted, samples = with_pool_lr(resolved)
    assert samples == 12 and counted.train.lr == TASK_DEFAULTS["classify"].lr_for(4, 12)
    assert with_pool_lr(config("classify", lr=0.5)) == (config("classify", lr=0.5), None)  # nothing to count


def test_counting_a_shards_samples_reads_its_headers(tmp_path):
    import gzip
    import tarfile

    from helpers import write_tar

    from mimicfilter.shards.tar_headers import PlainTar
    from mimicfilter.shards.samples import count_shard_samples, iter_shard_samples

    samples = [(f"k{k}", {"jpg": b"x" * 600, "txt": b"a caption"}) for k in range(6)]
    plain = write_tar(tmp_path / "plain.tar", samples)
    with PlainTar.open(str(plain)) as tar:
        assert len(list(tar.headers())) == 12  # read by the header parser, not tarfile
    assert count_shard_samples(str(plain)) == 6
    assert count_shard_samples(plain.as_uri()) == 6  # a URL is streamed
    (tmp_path / "packed.tar.gz").write_bytes(gzip.compress(plain.read_bytes()))
    assert count_shard_samples(str(tmp_path / "packed.tar.gz")) == 6
    for form in (tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT):
        with tarfile.open(tmp_path / f"mixed-{form}.tar", "w", format=form) as tar:
            directory = tarfile.TarInfo("folder/")
            directory.type = tarfile.DIRTYPE
            tar.addfile(directory)  # members of no sample are not counted
            names = ["a.jpg", "a.cls", "folder/b.jpg", "README", "c.txt", "c.jpg", "c.txt", "d.d.jpg"]
            if form != tarfile.USTAR_FORMAT:  # pax and GNU long-name headers: tarfile reads these
                names += ["x" * 120 + ".jpg", "é.jpg"]
            for name in names:
                tar.addfile(tarfile.TarInfo(name))
        path = str(tmp_path / f"mixed-{form}.tar")
        assert count_shard_samples(path) == len(list(iter_shard_samples(path))) == (4 if form == tarfile.USTAR_FORMAT else 6)
    (tmp_path / "cut.tar").write_bytes(plain.read_bytes()[:4000])  # the samples before the cut
    assert 0 < count_shard_samples(str(tmp_path / "cut.tar")) < 6
    (tmp_path / "garbage.tar").write_bytes(plain.read_bytes()[:3072] + b"\x07" * 2048)  # a bad header ends it
    assert count_shard_samples(str(tmp_path / "garbage.tar")) == 2
    assert count_shard_samples(str(tmp_path / "missing.tar")) == 0
    (tmp_path / "not-a-tar.tar").write_bytes(b"hello" * 300)
    assert count_shard_samples(str(tmp_path / "not-a-tar.tar")) == 0


def test_every_preset_has_a_selector():
    assert tuple(PRESET_SELECTORS) == tuple(MIMIC_LAYER_PRESETS)


def test_the_help_shows_the_tables_values():
    text = " ".join(CliRunner().invoke(cli, ["score", "--help"]).output.split())
    assert ("1e-4 contrastive, 3e-3 classification (at batch 256 on 3,000 samples; scaled to the steps of an epoch: "
            "samples / --batch-size)") in text
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

    from mimicfilter.pipeline.batch_scorer import make_scorer
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
