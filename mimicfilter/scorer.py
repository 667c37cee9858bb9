"""Scoring one batch: tower forward passes, the reference's baselines, the mimic JVP, and (for
trajectories) the proxy's re-weighted training step.

Two exact routes, chosen once when the scorer is built:

* **head route** (the default mimic layers): when every mimic layer is the final linear map of its
  tower (CLIP projections, or a classifier head), the towers run up to the input of that map (a
  projection is temporarily swapped for the identity through ``torch.func.functional_call``) and
  the JVP runs only through the map, normalisation and loss. When the proxy equals the reference
  outside the mimic layers (the default proxy, and always in ``--train head``), the reference's
  features come from the same trunk pass, so scoring costs about one forward pass of one model.
* **full route** (any other layer choice): one JVP through the proxy's whole forward pass, plus a
  no-grad forward pass of the reference.

The head route is verified against the real forward pass on a dummy batch before it is used.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from mimicfilter.choices import TRAIN_MODES  # noqa: F401 (re-exported)
from mimicfilter.mimic import (
    ParamDict,
    classification_per_sample_loss,
    clip_similarity,
    contrastive_per_sample_loss,
    mimic_direction,
    mimic_forward,
    mimic_scores,
)
from mimicfilter.models import LOGIT_PARAMETERS, LoadedModels, is_image_parameter, parameters_of



@dataclass(frozen=True)
class BatchScores:
    """Per-sample results of one batch: 1-D CPU tensors in the models' dtype (clip_score None for
    classification)."""

    mimic_score: torch.Tensor
    mimic_weight: torch.Tensor
    loss: torch.Tensor
    ref_loss: torch.Tensor
    clip_score: torch.Tensor | None = None
    embedding: torch.Tensor | None = None  # [B, D] float16, with --save-embeddings (mimicfilter.embed)


@dataclass
class _Prepared:
    """One batch made ready for the mimic math: the proxy's per-sample loss as a function of the
    mimic-layer parameters, and the reference's baselines."""

    per_sample_loss: Callable[[ParamDict], torch.Tensor]
    ref_loss: torch.Tensor
    clip_score: torch.Tensor | None


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


class MimicScorer:
    """Scores batches (:meth:`score`) and takes Grad-Mimic training steps (:meth:`train_step`).

    Build once per run with :func:`make_scorer`; the task-specific part is :meth:`_prepare`.
    """

    embedding_dim: int | None = None  # set by mimicfilter.embed's wrapper when batches carry embeddings

    def __init__(self, models: LoadedModels, temperature: float, autocast_dtype: torch.dtype | None = None):
        self.models = models
        self.temperature = temperature
        self.autocast_dtype = autocast_dtype
        self.shared_trunk = _same_outside(models.reference, models.proxy, models.mimic_layers)
        # Resolved once: parameters are updated in place, so these stay valid and no batch walks
        # named_parameters() again.
        self._mimic_parameters = parameters_of(models.proxy, models.mimic_layers)
        self._reference_parameters = parameters_of(models.reference, models.mimic_layers)
        self.trunk_trains = False  # set by enable_training("full"): the trunk then drifts from the reference
        # The proxy image trunk's output of the last prepared batch when the head route computed it
        # with a frozen trunk (below the image head for CLIP); mimicfilter.embed reuses it.
        self.last_image_features: torch.Tensor | None = None

    @property
    def route(self) -> str:
        raise NotImplementedError

    def _autocast(self):
        device = self.models.device
        if self.autocast_dtype is None or device.type != "cuda":
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.autocast_dtype)

    def _dtype(self) -> torch.dtype:
        return next(self.models.proxy.parameters()).dtype

    def _prepare(self, images: torch.Tensor, targets: torch.Tensor) -> _Prepared:
        raise NotImplementedError

    def _inputs(self, images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        device = self.models.device
        return images.to(device, dtype=self._dtype(), non_blocking=True), targets.to(device, non_blocking=True)

    def mimic_parameters(self) -> ParamDict:
        return dict(self._mimic_parameters)

    def score(self, images: torch.Tensor, targets: torch.Tensor) -> BatchScores:
        """Static scores of one batch (the proxy is not changed)."""
        prepared = self._prepare(*self._inputs(images, targets))
        result = mimic_scores(prepared.per_sample_loss, self.mimic_parameters(), self.models.direction.unit, self.temperature)
        return self._batch_scores(result.score, result.weight, result.loss, prepared)

    def enable_training(self, mode: str) -> list[nn.Parameter]:
        """Make the trained parameters require grad; returns them (for the optimizer)."""
        proxy = self.models.proxy
        if mode == "head":
            trained = list(self.mimic_parameters().values())
        elif mode == "full":
            trained = list(proxy.parameters())
            self.trunk_trains = True
        else:
            raise ValueError(f"unknown training mode {mode!r}")
        for parameter in trained:
            parameter.requires_grad_(True)
        return trained

    def train_step(self, images: torch.Tensor, targets: torch.Tensor, optimizer: torch.optim.Optimizer) -> BatchScores:
        """Score the batch at the current proxy, then update it with the re-weighted loss sum_i w_i l_i.

        Mimic layers get the gradient of the re-weighted loss; with a training trunk (``full``) every
        other parameter gets the gradient of the plain mean loss, as in the paper's code. The
        direction V is recomputed from the current proxy at every step.
        """
        mimic_params = self.mimic_parameters()
        direction = mimic_direction(self._reference_parameters, {k: v.detach() for k, v in mimic_params.items()})
        prepared = self._prepare(*self._inputs(images, targets))
        result = mimic_forward(prepared.per_sample_loss, mimic_params, direction.unit, self.temperature)
        batch = result.loss.shape[0]
        weighted_loss = (result.weight.detach() / batch * result.loss).sum()
        optimizer.zero_grad(set_to_none=True)
        if self.trunk_trains:
            mimic_grads = torch.autograd.grad(weighted_loss, list(mimic_params.values()), retain_graph=True)
            others = [p for p in self.models.proxy.parameters() if p.requires_grad and all(p is not q for q in mimic_params.values())]
            result.loss.mean().backward(inputs=others)
            for parameter, gradient in zip(mimic_params.values(), mimic_grads):
                parameter.grad = gradient
        else:
            weighted_loss.backward()
        optimizer.step()
        return self._batch_scores(result.score, result.weight, result.loss.detach(), prepared)

    def _batch_scores(self, score, weight, loss, prepared: _Prepared) -> BatchScores:
        return BatchScores(
            mimic_score=score.detach().cpu(),
            mimic_weight=weight.detach().cpu(),
            loss=loss.detach().cpu(),
            ref_loss=prepared.ref_loss.detach().cpu(),
            clip_score=None if prepared.clip_score is None else prepared.clip_score.detach().cpu(),
        )


class ContrastiveScorer(MimicScorer):
    """Image–text batches; see the module docstring for the two routes."""

    def __init__(self, models: LoadedModels, temperature: float, autocast_dtype: torch.dtype | None = None):
        super().__init__(models, temperature, autocast_dtype)
        self.proxy_towers = _BothTowers(models.proxy)
        self.reference_towers = _BothTowers(models.reference)
        heads = _linear_heads(models.proxy, models.mimic_layers)
        self.heads = heads if heads is not None and self._heads_reproduce_forward(heads) else None

    @property
    def route(self) -> str:
        return "head" if self.heads is not None else "full"

    def _heads_reproduce_forward(self, heads: dict[str, LinearHead]) -> bool:
        """Check on a dummy batch that head(trunk(x)) equals the model's real output."""
        proxy = self.models.proxy
        size = getattr(proxy.visual, "image_size", 224)
        height, width = size if isinstance(size, (tuple, list)) else (size, size)
        generator = torch.Generator().manual_seed(0)
        dtype = self._dtype()
        dummy_images = torch.randn(2, 3, height, width, generator=generator).to(self.models.device, dtype)
        dummy_texts = self.models.tokenizer(["a photo of a dog", "two words"]).to(self.models.device)
        with torch.no_grad():
            expected = self.proxy_towers(dummy_images, dummy_texts)
            trunk = self._trunk(heads, dummy_images, dummy_texts, autocast=False)
            params = self.mimic_parameters()
            for index, tower in enumerate(("image", "text")):
                got = heads[tower].apply(params, trunk[index]) if tower in heads else trunk[index]
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

    def _baselines(self, reference_image, reference_text) -> tuple[torch.Tensor, torch.Tensor]:
        reference = self.models.reference
        with torch.no_grad():
            clip_score = clip_similarity(reference_image, reference_text)
            ref_loss = contrastive_per_sample_loss(
                reference_image, reference_text, reference.logit_scale.exp(), reference.logit_bias
            )
        return ref_loss, clip_score

    def _prepare(self, images, texts) -> _Prepared:
        proxy = self.models.proxy
        if self.heads is None:
            return self._prepare_full(images, texts)
        heads = self.heads
        dtype = self._dtype()
        proxy_image, proxy_text = (t.to(dtype) for t in self._trunk(heads, images, texts))
        self.last_image_features = None if self.trunk_trains else proxy_image.detach()
        if self.shared_trunk and not self.trunk_trains:
            reference_params = self._reference_parameters
            with torch.no_grad():
                image = heads["image"].apply(reference_params, proxy_image) if "image" in heads else proxy_image
                text = heads["text"].apply(reference_params, proxy_text) if "text" in heads else proxy_text
            reference_image, reference_text = F.normalize(image, dim=-1), F.normalize(text, dim=-1)
        else:
            reference_image, reference_text = self._reference_features(images, texts)
        ref_loss, clip_score = self._baselines(reference_image, reference_text)

        def per_sample_loss(params: ParamDict) -> torch.Tensor:
            image = heads["image"].apply(params, proxy_image) if "image" in heads else proxy_image
            text = heads["text"].apply(params, proxy_text) if "text" in heads else proxy_text
            return contrastive_per_sample_loss(
                F.normalize(image, dim=-1), F.normalize(text, dim=-1), proxy.logit_scale.exp(), proxy.logit_bias
            )

        return _Prepared(per_sample_loss, ref_loss, clip_score)

    def _prepare_full(self, images, texts) -> _Prepared:
        proxy = self.models.proxy
        ref_loss, clip_score = self._baselines(*self._reference_features(images, texts))

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

        return _Prepared(per_sample_loss, ref_loss, clip_score)


class ClassifierScorer(MimicScorer):
    """Labelled-image batches through an :class:`~mimicfilter.models.ImageClassifier`."""

    def __init__(self, models: LoadedModels, temperature: float, autocast_dtype: torch.dtype | None = None):
        super().__init__(models, temperature, autocast_dtype)
        self.head_only = all(name.startswith("head.") for name in models.mimic_layers)

    @property
    def route(self) -> str:
        return "head" if self.head_only else "full"

    def _prepare(self, images, labels) -> _Prepared:
        proxy, reference = self.models.proxy, self.models.reference
        labels = labels.long()
        dtype = self._dtype()
        with torch.no_grad(), self._autocast():
            reference_logits = reference(images).to(dtype) if not (self.shared_trunk and self.head_only) else None
        if self.head_only:
            grad = torch.enable_grad() if self.trunk_trains else torch.no_grad()
            with grad, self._autocast():
                features = proxy.features(images).to(dtype)
            self.last_image_features = None if self.trunk_trains else features.detach()
            if reference_logits is None:
                with torch.no_grad():
                    reference_logits = reference.logit_scale * reference.head(features)
            fixed_bias = proxy.head.bias

            def per_sample_loss(params: ParamDict) -> torch.Tensor:
                logits = F.linear(features, params["head.weight"], params.get("head.bias", fixed_bias))
                return classification_per_sample_loss(proxy.logit_scale * logits, labels)

        else:

            def per_sample_loss(params: ParamDict) -> torch.Tensor:
                with _forward_ad_attention():
                    logits = functional_call(proxy, params, (images,))
                return classification_per_sample_loss(logits, labels)

        ref_loss = classification_per_sample_loss(reference_logits, labels)
        return _Prepared(per_sample_loss, ref_loss, None)


def make_scorer(models: LoadedModels, temperature: float, autocast_dtype: torch.dtype | None = None) -> MimicScorer:
    scorer_class = ClassifierScorer if models.task == "classify" else ContrastiveScorer
    return scorer_class(models, temperature, autocast_dtype)
