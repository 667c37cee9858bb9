"""Scoring one batch of image–text pairs: the head route and the full route (see :mod:`mimicfilter.mimic.scorer`)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from mimicfilter.mimic.jvp import ParamDict
from mimicfilter.mimic.layers import LOGIT_PARAMETERS, is_image_parameter
from mimicfilter.mimic.losses import clip_similarity, contrastive_per_sample_loss
from mimicfilter.mimic.models import LoadedModels
from mimicfilter.mimic.scorer import MimicScorer, Prepared, forward_ad_attention
from mimicfilter.timing import phase


class _BothTowers(nn.Module):
    """Wraps a CLIP so one ``functional_call`` can swap parameters of either tower."""

    def __init__(self, clip: nn.Module):
        super().__init__()
        self.clip = clip

    def forward(self, images: torch.Tensor | None, texts: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Both towers' outputs (a tower given None is skipped: the start-up self-check)."""
        image = None if images is None else self.clip.encode_image(images)
        return image, None if texts is None else self.clip.encode_text(texts)


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


class ContrastiveScorer(MimicScorer):
    """Image–text batches; see the module docstring for the two routes."""

    def __init__(self, models: LoadedModels, temperature: float, autocast_dtype: torch.dtype | None = None):
        super().__init__(models, temperature, autocast_dtype)
        self.proxy_towers = _BothTowers(models.proxy)
        self.reference_towers = _BothTowers(models.reference)
        heads = _linear_heads(models.proxy, models.mimic_layers)
        with phase("check the head route"):
            self.heads = heads if heads is not None and self._heads_reproduce_forward(heads) else None

    @property
    def route(self) -> str:
        return "head" if self.heads is not None else "full"

    def _heads_reproduce_forward(self, heads: dict[str, LinearHead]) -> bool:
        """Check on one dummy sample that head(trunk(x)) equals the model's real output, for each
        tower that has a head (the other tower's output does not depend on the override)."""
        proxy = self.models.proxy
        size = getattr(proxy.visual, "image_size", 224)
        height, width = size if isinstance(size, (tuple, list)) else (size, size)
        generator = torch.Generator().manual_seed(0)
        dummy_images = dummy_texts = None
        if "image" in heads:
            dummy_images = torch.randn(1, 3, height, width, generator=generator).to(self.models.device, self._dtype())
        if "text" in heads:
            dummy_texts = self.models.tokenizer(["a photo of a dog"]).to(self.models.device)
        with torch.no_grad():
            expected = self.proxy_towers(dummy_images, dummy_texts)
            trunk = self._trunk(heads, dummy_images, dummy_texts, autocast=False)
            params = self.mimic_parameters()
            for index, tower in enumerate(("image", "text")):
                if tower not in heads:
                    continue
                got = heads[tower].apply(params, trunk[index])
                if got.shape != expected[index].shape or not torch.allclose(got, expected[index], rtol=1e-4, atol=1e-5):
                    return False
        return True

    def _trunk(self, heads, images, texts, autocast=True) -> tuple[torch.Tensor, torch.Tensor]:
        """Proxy tower outputs with each head's projection replaced by the identity (the head inputs)."""
        params = self.mimic_parameters()
        overrides = {}
        for head in heads.values():
            overrides.update({f"clip.{k}": v for k, v in head.identity_overrides(params).items()})
        grad = torch.enable_grad() if self.trunk_trains else torch.no_grad()
        with grad, (self._autocast() if autocast else contextlib.nullcontext()):
            return functional_call(self.proxy_towers, overrides, (images, texts))

    def _reference_features(self, images, texts):
        with torch.no_grad(), self._autocast():
            image, text = self.reference_towers(images, texts)
        dtype = self._dtype()
        return F.normalize(image.to(dtype), dim=-1), F.normalize(text.to(dtype), dim=-1)

    def _baselines(self, reference_image, reference_text, anchors=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The reference's per-sample loss, CLIP score and, for softmax CLIP, the negCLIP score
        (Wang et al. 2024: the CLIP score less the batch's contrastive normaliser τ/2·(LSE_row + LSE_col),
        which is exactly -ref_loss·τ; averaged over epochs it is averaged over random batches)."""
        reference = self.models.reference
        with torch.no_grad():
            clip_score = clip_similarity(reference_image, reference_text)
            scale = reference.logit_scale.exp()
            ref_loss = contrastive_per_sample_loss(reference_image, reference_text, scale, reference.logit_bias, anchors)
            negclip = -ref_loss / scale if reference.logit_bias is None else None
        return ref_loss, clip_score, negclip

    def _prepare(self, images, texts, anchors=None) -> Prepared:
        proxy = self.models.proxy
        if self.heads is None:
            return self._prepare_full(images, texts, anchors)
        heads = self.heads
        dtype = self._dtype()
        proxy_image, proxy_text = (t.to(dtype) for t in self._trunk(heads, images, texts))
        if self.shared_trunk and not self.trunk_trains:
            reference_params = self._reference_parameters
            with torch.no_grad():
                image = heads["image"].apply(reference_params, proxy_image) if "image" in heads else proxy_image
                text = heads["text"].apply(reference_params, proxy_text) if "text" in heads else proxy_text
            reference_image, reference_text = F.normalize(image, dim=-1), F.normalize(text, dim=-1)
        else:
            reference_image, reference_text = self._reference_features(images, texts)
        ref_loss, clip_score, negclip = self._baselines(reference_image, reference_text, anchors)

        def per_sample_loss(params: ParamDict) -> torch.Tensor:
            image = heads["image"].apply(params, proxy_image) if "image" in heads else proxy_image
            text = heads["text"].apply(params, proxy_text) if "text" in heads else proxy_text
            return contrastive_per_sample_loss(
                F.normalize(image, dim=-1), F.normalize(text, dim=-1), proxy.logit_scale.exp(), proxy.logit_bias, anchors
            )

        return Prepared(per_sample_loss, ref_loss, clip_score, (reference_image, reference_text), negclip)

    def _prepare_full(self, images, texts, anchors=None) -> Prepared:
        proxy = self.models.proxy
        reference_image, reference_text = self._reference_features(images, texts)
        ref_loss, clip_score, negclip = self._baselines(reference_image, reference_text, anchors)

        def per_sample_loss(params: ParamDict) -> torch.Tensor:
            # The JVP stays in full precision: no autocast on this route.
            with forward_ad_attention():
                image, text = functional_call(
                    self.proxy_towers, {f"clip.{k}": v for k, v in params.items()}, (images, texts)
                )
            logit_scale = params.get("logit_scale", proxy.logit_scale).exp()
            logit_bias = params.get("logit_bias", proxy.logit_bias)
            return contrastive_per_sample_loss(
                F.normalize(image, dim=-1), F.normalize(text, dim=-1), logit_scale, logit_bias, anchors
            )

        return Prepared(per_sample_loss, ref_loss, clip_score, (reference_image, reference_text), negclip)

