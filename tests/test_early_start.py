"""Decoding starts while the models load (issue 14): it is used when it fits, never changes a table."""

import os
import time
import uuid

import pytest
from helpers import image_text_samples, write_tar
from test_killed_leftovers import Killed, kill

import mimicfilter.pipeline.run as run_module
import mimicfilter.pipeline.static as static_module
from mimicfilter.mimic.architectures import preview_preprocessing, resolve_architecture
from mimicfilter.mimic.models import ModelInputs, ModelSpec, load_models, preview_inputs
from mimicfilter.pipeline.config import ScoreConfig, TrainConfig
from mimicfilter.pipeline.decoder import Decoder
from mimicfilter.store.parts import read_scores
from mimicfilter.store.rundir import unfinished_run

CHUNK = 4


@pytest.fixture
def shards(tmp_path):
    samples = image_text_samples(9)
    samples[3][1]["jpg"] = b"not an image"  # a status row rides along
    return (str(write_tar(tmp_path / "a.tar", samples)), str(write_tar(tmp_path / "b.tar", image_text_samples(9, 50))))


def counting_decoder(monkeypatch, marks):
    """Every decoded chunk leaves a file in ``marks`` (from whichever process decoded it)."""
    marks.mkdir()
    original = Decoder.decode_chunk

    def decode_chunk(self, chunk):
        (marks / f"{os.getpid()}-{uuid.uuid4().hex}").touch()
        return original(self, chunk)

    monkeypatch.setattr(Decoder, "decode_chunk", decode_chunk)


def models_wait_for_decoding(monkeypatch, marks, at_least):
    """The models are built only once the workers have decoded ``at_least`` chunks."""
    original = run_module.build_batch_scorer

    def build(*args, **kwargs):
        deadline = time.time() + 60
        while len(list(marks.iterdir())) < at_least and time.time() < deadline:
            time.sleep(0.02)
        assert len(list(marks.iterdir())) >= at_least, "nothing was decoded while the models loaded"
        return original(*args, **kwargs)

    monkeypatch.setattr(run_module, "build_batch_scorer", build)


@pytest.mark.parametrize("train", [TrainConfig(mode="none"), TrainConfig(mode="head", epochs=2, lr=1e-2, shuffle_buffer=8)],
                         ids=["static", "trajectory"])
def test_decoding_runs_while_the_models_load_and_the_stream_is_used(shards, tiny_config, reference_checkpoint,
                                                                     tmp_path, monkeypatch, train):
    model = ModelSpec(str(tiny_config), str(reference_checkpoint))
    plain = ScoreConfig(shards, tmp_path / "plain", model, batch_size=4, workers=0, train=train, chunk_size=CHUNK)
    run_module.run_score(plain)
    marks = tmp_path / "marks"
    counting_decoder(monkeypatch, marks)
    models_wait_for_decoding(monkeypatch, marks, at_least=2)
    early = ScoreConfig(shards, tmp_path / "early", model, batch_size=4, workers=2, train=train, chunk_size=CHUNK)
    run_module.run_score(early)
    assert read_scores(tmp_path / "early").equals(read_scores(tmp_path / "plain"))
    # each chunk decoded once: the early stream was the run's stream, not thrown away and redone
    chunks = 2 * 3 if train.mode == "none" else train.epochs * 5  # 9 per shard / 18 per epoch, by 4
    assert len(list(marks.iterdir())) == chunks
    assert all(not name.startswith(f"{os.getpid()}-") for name in os.listdir(marks))  # all in workers


def test_a_stream_that_does_not_fit_the_models_is_started_again(shards, tiny_config, reference_checkpoint, tmp_path,
                                                                 monkeypatch):
    model = ModelSpec(str(tiny_config), str(reference_checkpoint))
    run_module.run_score(ScoreConfig(shards, tmp_path / "plain", model, batch_size=4, workers=0, chunk_size=CHUNK))
    real = preview_inputs(model)
    wrong = ModelInputs(real.task, {**real.preprocess_cfg, "size": (32, 32)}, real.tokenizer)
    monkeypatch.setattr(run_module, "preview_inputs", lambda spec: wrong)
    run_module.run_score(ScoreConfig(shards, tmp_path / "early", model, batch_size=4, workers=2, chunk_size=CHUNK))
    assert read_scores(tmp_path / "early").equals(read_scores(tmp_path / "plain"))


def test_a_resumed_static_run_restarts_only_what_is_pending(shards, tiny_config, reference_checkpoint, tmp_path,
                                                             monkeypatch):
    model = ModelSpec(str(tiny_config), str(reference_checkpoint))
    config = ScoreConfig(shards, tmp_path / "run", model, batch_size=4, workers=2, chunk_size=CHUNK)
    run_module.run_score(config)
    first = read_scores(tmp_path / "run")
    part = sorted((tmp_path / "run" / "scores").iterdir())[0]
    part.unlink()  # after the run finished
    # the re-run, killed before it writes the part again: the run no longer reads as finished
    monkeypatch.setattr(static_module, "open_input", kill)
    with pytest.raises(Killed):
        run_module.run_score(config)
    monkeypatch.undo()
    assert not (tmp_path / "run" / "_SUCCESS").exists()
    assert "1 of 2 shard parts" in unfinished_run(tmp_path / "run")
    run_module.run_score(config)
    assert read_scores(tmp_path / "run").equals(first)


def test_the_preview_is_what_the_models_load_with(tiny_config, reference_checkpoint):
    spec = ModelSpec(str(tiny_config), str(reference_checkpoint))
    preview = preview_inputs(spec)
    models = load_models(spec)
    assert preview == ModelInputs.of(models)  # same preprocessing, the same tokenizer object
    assert preview_inputs(ModelSpec(str(tiny_config), str(reference_checkpoint), task="classify",
                                    classnames="/no/such/file")) is None  # the loader reports it instead


def test_a_pretrained_tag_brings_its_own_preprocessing():
    mean_half, _ = preview_preprocessing(resolve_architecture("ViT-L-14"), "laion2b_s32b_b82k")
    assert mean_half["mean"] == mean_half["std"] == (0.5, 0.5, 0.5) and mean_half["size"] == (224, 224)
    squash, _ = preview_preprocessing(resolve_architecture("ViT-H-14-378"), "dfn5b")
    assert squash["resize_mode"] == "squash" and squash["size"] == (378, 378)
    assert preview_preprocessing(resolve_architecture("ViT-B-32"), "no-such-tag") is None
