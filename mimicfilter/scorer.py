"""Scoring one batch: tower forward passes, the reference's baselines and the mimic JVP.

Two exact routes, chosen once when the scorer is built:

* **head route** (the default mimic layers): when every mimic layer is the final linear projection
  of its tower, the towers run once, without gradients, up to the projection input (the projection
  temporarily swapped for the identity through ``torch.func.functional_call``), and the JVP runs
  only through projection, normalisation and loss. When the proxy equals the reference outside the
  mimic layers (the default proxy), the reference's features come from the same trunk pass, so
  scoring costs about one forward pass of one model.
* **full route** (any other layer choice): one JVP through the proxy's whole forward pass, plus a
  no-grad forward pass of the reference.

The head route is verified against the real forward pass on a dummy batch before it is used.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from mimicfilter.mimic import ParamDict, clip_similarity, contrastive_per_sample_loss, mimic_scores
from mimicfilter.models import LOGIT_PARAMETERS, LoadedModels, is_image_parameter, parameters_of


@dataclass(frozen=True)
class BatchScores:
    """Per-sample results of one batch: 1-D CPU tensors in the models' dtype."""

    mimic_score: torch.Tensor
    mimic_weight: torch.Tensor
    loss: torch.Tensor
    clip_score: torch.Tensor
    ref_loss: torch.Tensor


class _BothTowers(nn.Module):
    """Wraps a CLIP so one ``functional_call`` can swap parameters of either tower."""

    def __init__(self, clip: nn.Module):
        super().__init__()
        self.clip = clip

    def forward(self, images: torch.Tensor, texts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.clip.encode_image(images), self.clip.encode_text(texts)


@dataclass(frozen=True)
class LinearHead:
    """A tower's final projection: ``x @ W`` (bare matrix) or ``x @ W.T + b`` (nn.Linear)."""

    tower: str
    weight: str
    bias: str | None
    is_linear_module: bool

    def apply(self, params: ParamDict, features: torch.Tensor) -> torch.Tensor:
        weight = params[self.weight]
        if self.is_linear_module:
            return F.linear(features, weight, params[self.bias] if self.bias else None)
        return features @ weight

    def identity_overrides(self, params: ParamDict) -> ParamDict:
        """Parameter values that turn the projection into the identity (exposing its input)."""
        weight = params[self.weight]
        width = weight.shape[1] if self.is_linear_module else weight.shape[0]
        overrides = {self.weight: torch.eye(width, dtype=weight.dtype, device=weight.device)}
        if self.bias:
            overrides[self.bias] = torch.zeros(width, dtype=weight.dtype, device=weight.device)
        return overrides


@contextlib.contextmanager
def _forward_ad_attention():
    """Attention kernels with forward-mode derivatives: the fused ones have none."""
    previous = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(previous)


def _owning_module(model: nn.Module, name: str) -> nn.Module:
    owner = model
    for part in name.split(".")[:-1]:
        owner = getattr(owner, part)
    return owner


def _linear_heads(model: nn.Module, mimic_layers: tuple[str, ...]) -> dict[str, LinearHead] | None:
    """One head per tower when each tower's mimic layers form a single final linear map, else None."""
    if any(name in LOGIT_PARAMETERS for name in mimic_layers):
        return None
    heads = {}
    for tower in ("image", "text"):
        names = [name for name in mimic_layers if is_image_parameter(name) == (tower == "image")]
        if not names:
            continue
        owner = _owning_module(model, names[0])
        if isinstance(owner, nn.Linear) and all(_owning_module(model, n) is owner for n in names):
            weight = next((n for n in names if n.endswith(".weight")), None)
            bias = next((n for n in names if n.endswith(".bias")), None)
            if weight is None or (owner.bias is not None and bias is None):
                return None
            heads[tower] = LinearHead(tower, weight, bias, is_linear_module=True)
        elif len(names) == 1 and dict(model.named_parameters())[names[0]].ndim == 2:
            heads[tower] = LinearHead(tower, names[0], None, is_linear_module=False)
        else:
            return None
    return heads


def _same_outside(reference: nn.Module, proxy: nn.Module, mimic_layers: tuple[str, ...]) -> bool:
    """True when proxy and reference share every parameter and buffer except the mimic layers."""
    proxy_state = proxy.state_dict()
    for name, value in reference.state_dict().items():
        if name in mimic_layers:
            continue
        if name not in proxy_state or not torch.equal(value, proxy_state[name]):
            return False
    return True


class ContrastiveScorer:
    """Scores image–text batches; build once per run, call :meth:`score` per batch."""

    def __init__(self, models: LoadedModels, temperature: float, autocast_dtype: torch.dtype | None = None):
        self.models = models
        self.temperature = temperature
        self.autocast_dtype = autocast_dtype
        self.proxy_towers = _BothTowers(models.proxy)
        self.reference_towers = _BothTowers(models.reference)
        self.shared_trunk = _same_outside(models.reference, models.proxy, models.mimic_layers)
        heads = _linear_heads(models.proxy, models.mimic_layers)
        self.heads = heads if heads is not None and self._heads_reproduce_forward(heads) else None

    @property
    def route(self) -> str:
        return "head" if self.heads is not None else "full"

    def _autocast(self):
        device = self.models.device
        if self.autocast_dtype is None or device.type != "cuda":
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.autocast_dtype)

    def _heads_reproduce_forward(self, heads: dict[str, LinearHead]) -> bool:
        """Check on a dummy batch that head(trunk(x)) equals the model's real output."""
        proxy = self.models.proxy
        size = getattr(proxy.visual, "image_size", 224)
        height, width = size if isinstance(size, (tuple, list)) else (size, size)
        generator = torch.Generator().manual_seed(0)
        dummy_images = torch.randn(2, 3, height, width, generator=generator).to(self.models.device)
        dummy_texts = self.models.tokenizer(["a photo of a dog", "two words"]).to(self.models.device)
        dtype = next(proxy.parameters()).dtype
        with torch.no_grad():
            expected = self.proxy_towers(dummy_images.to(dtype), dummy_texts)
            trunk = self._trunk(self.proxy_towers, heads, dummy_images.to(dtype), dummy_texts, autocast=False)
            params = parameters_of(proxy, self.models.mimic_layers)
            for index, tower in enumerate(("image", "text")):
                got = heads[tower].apply(params, trunk[index]) if tower in heads else trunk[index]
                if got.shape != expected[index].shape or not torch.allclose(got, expected[index], rtol=1e-4, atol=1e-5):
                    return False
        return True

    def _trunk(self, towers, heads, images, texts, autocast=True) -> tuple[torch.Tensor, torch.Tensor]:
        """Tower outputs with each head's projection replaced by the identity (so: the head inputs)."""
        clip = towers.clip
        params = parameters_of(clip, self.models.mimic_layers)
        overrides = {}
        for head in heads.values():
            overrides.update({f"clip.{k}": v for k, v in head.identity_overrides(params).items()})
        with torch.no_grad(), (self._autocast() if autocast else contextlib.nullcontext()):
            return functional_call(towers, overrides, (images, texts))

    def score(self, images: torch.Tensor, texts: torch.Tensor) -> BatchScores:
        models = self.models
        dtype = next(models.proxy.parameters()).dtype
        images = images.to(models.device, dtype=dtype, non_blocking=True)
        texts = texts.to(models.device, non_blocking=True)
        if self.heads is not None:
            per_sample_loss, reference_features = self._head_route(images, texts, dtype)
        else:
            per_sample_loss, reference_features = self._full_route(images, texts)
        reference_image, reference_text = reference_features
        reference = models.reference
        with torch.no_grad():
            clip_score = clip_similarity(reference_image, reference_text)
            ref_loss = contrastive_per_sample_loss(
                reference_image, reference_text, reference.logit_scale.exp(), reference.logit_bias
            )
        params = parameters_of(models.proxy, models.mimic_layers)
        result = mimic_scores(per_sample_loss, params, models.direction.unit, self.temperature)
        return BatchScores(
            mimic_score=result.score.cpu(),
            mimic_weight=result.weight.cpu(),
            loss=result.loss.cpu(),
            clip_score=clip_score.cpu(),
            ref_loss=ref_loss.cpu(),
        )

    def _head_route(self, images, texts, dtype):
        models = self.models
        heads = self.heads
        proxy_image, proxy_text = (t.to(dtype) for t in self._trunk(self.proxy_towers, heads, images, texts))
        if self.shared_trunk:
            reference_params = parameters_of(models.reference, models.mimic_layers)
            reference_image = heads["image"].apply(reference_params, proxy_image) if "image" in heads else proxy_image
            reference_text = heads["text"].apply(reference_params, proxy_text) if "text" in heads else proxy_text
        else:
            with torch.no_grad(), self._autocast():
                reference_image, reference_text = self.reference_towers(images, texts)
        reference_features = (
            F.normalize(reference_image.to(dtype), dim=-1),
            F.normalize(reference_text.to(dtype), dim=-1),
        )
        proxy = models.proxy
        logit_scale = proxy.logit_scale.exp()

        def per_sample_loss(params: ParamDict) -> torch.Tensor:
            image = heads["image"].apply(params, proxy_image) if "image" in heads else proxy_image
            text = heads["text"].apply(params, proxy_text) if "text" in heads else proxy_text
            return contrastive_per_sample_loss(
                F.normalize(image, dim=-1), F.normalize(text, dim=-1), logit_scale, proxy.logit_bias
            )

        return per_sample_loss, reference_features

    def _full_route(self, images, texts):
        models = self.models
        proxy = models.proxy
        with torch.no_grad(), self._autocast():
            reference_image, reference_text = self.reference_towers(images, texts)
        dtype = next(proxy.parameters()).dtype
        reference_features = (
            F.normalize(reference_image.to(dtype), dim=-1),
            F.normalize(reference_text.to(dtype), dim=-1),
        )

        def per_sample_loss(params: ParamDict) -> torch.Tensor:
            # The JVP stays in full precision: no autocast on this route.
            with _forward_ad_attention():
                image, text = functional_call(
                    self.proxy_towers, {f"clip.{k}": v for k, v in params.items()}, (images, texts)
                )
            logit_scale = params.get("logit_scale", proxy.logit_scale).exp()
            logit_bias = params.get("logit_bias", proxy.logit_bias)
            return contrastive_per_sample_loss(
                F.normalize(image, dim=-1), F.normalize(text, dim=-1), logit_scale, logit_bias
            )

        return per_sample_loss, reference_features
