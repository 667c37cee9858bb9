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
:class:`MimicScorer` holds what both tasks share (the JVP, the training step, the results);
:mod:`~mimicfilter.mimic.contrastive` and :mod:`~mimicfilter.mimic.classify` prepare their batches.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from mimicfilter.mimic.jvp import ParamDict, mimic_direction, mimic_forward, mimic_scores
from mimicfilter.mimic.layers import parameters_of, unshare_parameters
from mimicfilter.mimic.losses import Anchors
from mimicfilter.mimic.models import LoadedModels


@dataclass(frozen=True)
class BatchScores:
    """Per-sample results of one batch: 1-D CPU tensors in the models' dtype (clip_score None for
    classification), and what was computed on the way that a caller may reuse."""

    mimic_score: torch.Tensor
    mimic_weight: torch.Tensor
    loss: torch.Tensor
    ref_loss: torch.Tensor
    clip_score: torch.Tensor | None = None
    negclip_score: torch.Tensor | None = None  # CLIP score less the batch's contrastive normaliser (softmax CLIP)
    # The reference's L2-normalised (image, text) embeddings [B, D] on the scoring device, computed
    # for the baselines anyway: the pair embedding of mimic.embedder (for classification the text
    # side is the label's class embedding).
    reference_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None
    # classification batches with confusable anchors (score --trusted): the label each sample was scored
    # with; -1 for a confusable anchor whose image the reference misclassifies (no negative made)
    relabelled: torch.Tensor | None = None


@dataclass
class Prepared:
    """One batch made ready for the mimic math: the proxy's per-sample loss as a function of the
    mimic-layer parameters, the reference's baselines and the reference's pair embeddings."""

    per_sample_loss: Callable[[ParamDict], torch.Tensor]
    ref_loss: torch.Tensor
    clip_score: torch.Tensor | None
    reference_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None
    negclip_score: torch.Tensor | None = None
    relabelled: torch.Tensor | None = None  # classification with confusable anchors: the labels scored


@contextlib.contextmanager
def forward_ad_attention():
    """Attention kernels with forward-mode derivatives: the fused ones have none."""
    previous = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(previous)


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

    Build once per run with :func:`mimicfilter.pipeline.batch_scorer.make_scorer`; the task-specific part
    is :meth:`_prepare`.
    """

    def __init__(self, models: LoadedModels, temperature: float, autocast_dtype: torch.dtype | None = None):
        self.models = models
        self.temperature = temperature
        self.autocast_dtype = autocast_dtype
        # A proxy copied from the reference shares the trunk by construction: no need to compare every tensor.
        self.shared_trunk = models.proxy_is_reference_copy or _same_outside(models.reference, models.proxy,
                                                                            models.mimic_layers)
        # Resolved once: parameters are updated in place, so these stay valid and no batch walks
        # named_parameters() again.
        self._mimic_parameters = parameters_of(models.proxy, models.mimic_layers)
        self._reference_parameters = parameters_of(models.reference, models.mimic_layers)
        self.trunk_trains = False  # set by enable_training("full"): the trunk then drifts from the reference

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

    def _prepare(self, images: torch.Tensor, targets: torch.Tensor, anchors: Anchors | None) -> Prepared:
        """``anchors`` (bool per sample, on the device): samples that ride along without changing the
        others' losses (see mimic.losses.contrastive_per_sample_loss)."""
        raise NotImplementedError

    def _inputs(self, images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 pixels are normalised on the device (mimic.normalization); float images are taken as they are."""
        device = self.models.device
        images = self.models.normalization.to_model(images, device, self._dtype())
        return images, targets.to(device, non_blocking=True)

    def mimic_parameters(self) -> ParamDict:
        return dict(self._mimic_parameters)

    def _anchors(self, anchors: Anchors | None) -> Anchors | None:
        return None if anchors is None or not bool(anchors.mask.any()) else anchors.to(self.models.device)

    def score(self, images: torch.Tensor, targets: torch.Tensor, anchors: Anchors | None = None) -> BatchScores:
        """Static scores of one batch (the proxy is not changed); ``anchors`` marks the samples scored
        beside the pool (score --trusted) without touching the pool's scores."""
        anchors = self._anchors(anchors)
        prepared = self._prepare(*self._inputs(images, targets), anchors)
        result = mimic_scores(prepared.per_sample_loss, self.mimic_parameters(), self.models.direction.unit,
                              self.temperature, anchors)
        return self._batch_scores(result.score, result.weight, result.loss, prepared)

    def enable_training(self, mode: str) -> list[nn.Parameter]:
        """Make the trained parameters require grad; returns them (for the optimizer)."""
        proxy = self.models.proxy
        if mode == "head":
            trained = list(self.mimic_parameters().values())
        elif mode == "full":
            unshare_parameters(proxy, self.models.reference)  # the trunk now trains: it needs its own tensors
            trained = list(proxy.parameters())
            self.trunk_trains = True
        else:
            raise ValueError(f"unknown training mode {mode!r}")
        for parameter in trained:
            parameter.requires_grad_(True)
        return trained

    def train_step(self, images: torch.Tensor, targets: torch.Tensor, optimizer: torch.optim.Optimizer,
                   anchors: Anchors | None = None) -> BatchScores:
        """Score the batch at the current proxy, then update it with the re-weighted loss sum_i w_i l_i.

        Mimic layers get the gradient of the re-weighted loss; with a training trunk (``full``) every
        other parameter gets the gradient of the plain mean loss, as in the paper's code. The
        direction V is recomputed from the current proxy at every step. ``anchors`` are scored at
        the same proxy state and take no part in the step: the proxy learns from the pool alone.
        """
        anchors = self._anchors(anchors)
        mimic_params = self.mimic_parameters()
        direction = mimic_direction(self._reference_parameters, {k: v.detach() for k, v in mimic_params.items()})
        prepared = self._prepare(*self._inputs(images, targets), anchors)
        result = mimic_forward(prepared.per_sample_loss, mimic_params, direction.unit, self.temperature, anchors)
        pool_loss, pool_weight = result.loss, result.weight.detach()
        if anchors is not None:
            pool_loss, pool_weight = pool_loss[~anchors.mask], pool_weight[~anchors.mask]
        batch = pool_loss.shape[0]
        weighted_loss = (pool_weight / batch * pool_loss).sum()
        optimizer.zero_grad(set_to_none=True)
        if self.trunk_trains:
            mimic_grads = torch.autograd.grad(weighted_loss, list(mimic_params.values()), retain_graph=True)
            others = [p for p in self.models.proxy.parameters() if p.requires_grad and all(p is not q for q in mimic_params.values())]
            pool_loss.mean().backward(inputs=others)
            for parameter, gradient in zip(mimic_params.values(), mimic_grads):
                parameter.grad = gradient
        else:
            weighted_loss.backward()
        optimizer.step()
        return self._batch_scores(result.score, result.weight, result.loss.detach(), prepared)

    def _batch_scores(self, score, weight, loss, prepared: Prepared) -> BatchScores:
        return BatchScores(
            mimic_score=score.detach().cpu(),
            mimic_weight=weight.detach().cpu(),
            loss=loss.detach().cpu(),
            ref_loss=prepared.ref_loss.detach().cpu(),
            clip_score=None if prepared.clip_score is None else prepared.clip_score.detach().cpu(),
            negclip_score=None if prepared.negclip_score is None else prepared.negclip_score.detach().cpu(),
            reference_embeddings=None if prepared.reference_embeddings is None
            else tuple(value.detach() for value in prepared.reference_embeddings),
            relabelled=None if prepared.relabelled is None else prepared.relabelled.cpu(),
        )

