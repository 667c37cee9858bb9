"""The mimic math: JVP scores equal a per-sample autograd loop, losses and weights behave."""

from pathlib import Path

import open_clip
import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import SigLipLoss
from torch.func import functional_call

from mimicfilter.mimic.jvp import mimic_direction, mimic_scores, relative_weights
from mimicfilter.mimic.losses import contrastive_per_sample_loss
from mimicfilter.mimic.layers import parameters_of
from mimicfilter.mimic.models import ModelSpec, load_models
from mimicfilter.mimic.contrastive import ContrastiveScorer

LAYER_CHOICES = [
    "image-proj",
    "text-proj",
    "both-proj",
    "image-last-mlp",
    "visual.transformer.resblocks.1.attn.*",  # attention: the full route must avoid fused kernels
    "logit_scale,visual.proj",
]


def per_sample_autograd_scores(models, images, texts):
    """The definition, computed the slow way: one backward pass per sample."""
    proxy = models.proxy
    params = {name: p.detach().clone().requires_grad_(True) for name, p in parameters_of(proxy, models.mimic_layers).items()}
    scores = []
    for i in range(images.shape[0]):
        image_features, text_features, logit_scale = functional_call(proxy, params, (images, texts))[:3]
        loss_i = contrastive_per_sample_loss(image_features, text_features, logit_scale, proxy.logit_bias)[i]
        grads = torch.autograd.grad(loss_i, list(params.values()))
        projection = sum((grad * models.direction.unit[name].to(grad)).sum() for name, grad in zip(params, grads))
        scores.append(-projection)
    return torch.stack(scores)


@pytest.mark.parametrize("layers", LAYER_CHOICES)
def test_jvp_scores_equal_per_sample_autograd_in_float64(tiny_config, reference_checkpoint, layers):
    models = load_models(ModelSpec(model=str(tiny_config), reference=str(reference_checkpoint), mimic_layers=layers))
    models.reference.double()
    models.proxy.double()
    scorer = ContrastiveScorer(models, temperature=0.05)
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(6, 3, 32, 32, generator=generator, dtype=torch.float64)
    texts = models.tokenizer([f"caption number {i} of something" for i in range(6)])

    result = scorer.score(images, texts)
    expected = per_sample_autograd_scores(models, images, texts)

    assert result.mimic_score.dtype == torch.float64
    relative_error = (result.mimic_score - expected).abs().max() / expected.abs().max()
    assert relative_error <= 1e-5, (layers, scorer.route, relative_error)
    assert expected.abs().max() > 0


def test_default_layers_use_the_cheap_head_route_with_a_shared_trunk(tiny_config, reference_checkpoint):
    models = load_models(ModelSpec(model=str(tiny_config), reference=str(reference_checkpoint)))
    scorer = ContrastiveScorer(models, temperature=0.05)
    assert models.mimic_layers == ("visual.proj",)
    assert scorer.route == "head" and scorer.shared_trunk


def test_reference_baselines_are_the_reference_clip_score_and_loss(tiny_config, reference_checkpoint):
    models = load_models(ModelSpec(model=str(tiny_config), reference=str(reference_checkpoint)))
    scorer = ContrastiveScorer(models, temperature=0.05)
    images = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    texts = models.tokenizer([f"text {i}" for i in range(5)])
    result = scorer.score(images, texts)
    with torch.no_grad():
        image_features, text_features, logit_scale = models.reference(images, texts)[:3]
    torch.testing.assert_close(result.clip_score, (image_features * text_features).sum(-1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        result.ref_loss, contrastive_per_sample_loss(image_features, text_features, logit_scale), rtol=1e-5, atol=1e-6
    )


def test_per_sample_contrastive_loss_averages_to_clip_loss():
    generator = torch.Generator().manual_seed(0)
    image = F.normalize(torch.randn(7, 4, generator=generator), dim=-1)
    text = F.normalize(torch.randn(7, 4, generator=generator), dim=-1)
    scale = torch.tensor(10.0)
    clip_loss = open_clip.ClipLoss()(image, text, scale)
    assert torch.allclose(contrastive_per_sample_loss(image, text, scale).mean(), clip_loss)


def test_per_sample_sigmoid_loss_averages_to_siglip_loss():
    generator = torch.Generator().manual_seed(0)
    image = F.normalize(torch.randn(6, 4, generator=generator), dim=-1)
    text = F.normalize(torch.randn(6, 4, generator=generator), dim=-1)
    scale, bias = torch.tensor(10.0), torch.tensor(-5.0)
    siglip = SigLipLoss()(image, text, scale, bias)
    assert torch.allclose(contrastive_per_sample_loss(image, text, scale, bias).mean(), siglip)


def test_sigmoid_scores_equal_autograd():
    generator = torch.Generator().manual_seed(3)
    features = torch.randn(5, 6, dtype=torch.float64, generator=generator)
    text = F.normalize(torch.randn(5, 3, dtype=torch.float64, generator=generator), dim=-1)
    weight = torch.randn(6, 3, dtype=torch.float64, generator=generator)
    target = torch.randn(6, 3, dtype=torch.float64, generator=generator)
    direction = mimic_direction({"w": target}, {"w": weight})
    scale, bias = torch.tensor(5.0, dtype=torch.float64), torch.tensor(-2.0, dtype=torch.float64)

    def per_sample(params):
        return contrastive_per_sample_loss(F.normalize(features @ params["w"], dim=-1), text, scale, bias)

    result = mimic_scores(per_sample, {"w": weight}, direction.unit, temperature=1.0)
    expected = []
    for i in range(5):
        w = weight.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(per_sample({"w": w})[i], [w])
        expected.append(-(grad * direction.unit["w"]).sum())
    torch.testing.assert_close(result.score, torch.stack(expected), rtol=1e-10, atol=1e-12)


def test_relative_weights_sum_to_batch_size_and_favour_high_scores():
    scores = torch.tensor([0.3, -0.1, 0.0, 0.2])
    weights = relative_weights(scores, temperature=0.05)
    assert torch.isclose(weights.sum(), torch.tensor(4.0))
    assert weights.argmax() == 0 and weights.argmin() == 1
    assert torch.allclose(relative_weights(torch.zeros(3), 0.05), torch.ones(3))


def test_direction_shape_mismatch_names_both_shapes():
    with pytest.raises(ValueError, match=r"\(4, 3\).*\(4, 2\)"):
        mimic_direction({"w": torch.zeros(4, 3)}, {"w": torch.zeros(4, 2)})


def test_direction_refuses_identical_models():
    with pytest.raises(ValueError, match="V = 0"):
        mimic_direction({"w": torch.ones(2)}, {"w": torch.ones(2)})


def test_a_model_built_for_its_checkpoint_skips_the_random_init_and_equals_the_plain_build(tiny_config,
                                                                                          reference_checkpoint):
    from mimicfilter.mimic.architectures import _skip_weight_init, instantiate, resolve_architecture

    initialisers = {name: getattr(torch.nn.init, name) for name in dir(torch.nn.init)}
    imported_by_name = torch.nn.modules.activation.xavier_uniform_  # MultiheadAttention's own reference
    with _skip_weight_init():
        assert torch.nn.init.normal_(torch.zeros(3)).eq(0).all()
        assert torch.nn.modules.activation.xavier_uniform_(torch.zeros(3, 3)).eq(0).all()
    assert torch.nn.modules.activation.xavier_uniform_ is imported_by_name
    assert all(getattr(torch.nn.init, name) is function for name, function in initialisers.items())

    architecture = resolve_architecture(str(tiny_config))
    built = instantiate(architecture, str(reference_checkpoint), "reference", trust=False).model
    with architecture.factory_name() as name:
        plain = open_clip.create_model(name)
    open_clip.load_checkpoint(plain, str(reference_checkpoint))
    ours, theirs = dict(built.named_buffers()), dict(plain.named_buffers())  # non-persistent ones included
    ours.update(built.named_parameters())
    theirs.update(plain.named_parameters())
    assert ours.keys() == theirs.keys() and any("attn_mask" in name for name in ours)
    assert all(torch.equal(ours[name], theirs[name]) for name in ours)


@pytest.mark.parametrize("model", ["tiny", "tiny-with-tokenizer-kwargs", "ViT-B-32", "RN50", "ViT-L-14-336",
                                   "convnext_base"])
def test_the_shared_tokenizer_tokenizes_as_open_clips_own(tmp_path, tiny_config, model):
    import json

    from mimicfilter.mimic.architectures import _tokenizer, resolve_architecture

    if model.startswith("tiny"):
        config = json.loads(tiny_config.read_text())
        if model.endswith("kwargs"):
            config["text_cfg"]["tokenizer_kwargs"] = {"clean": "whitespace"}
        model = str(tiny_config.with_name(f"{model}.json"))
        Path(model).write_text(json.dumps(config))
    architecture = resolve_architecture(model)
    texts = ["a photo of a Dog", "  spaces   and\tTabs ", "émoji 🐕 and ünïcödé", "", "word " * 100, "it's 42%!"]
    with architecture.factory_name() as name:
        ours = _tokenizer(name, architecture)
        theirs = open_clip.get_tokenizer(name)
    assert type(ours) is type(theirs) and ours.context_length == theirs.context_length
    assert torch.equal(ours(texts), theirs(texts))
