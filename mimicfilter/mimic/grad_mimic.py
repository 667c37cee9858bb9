"""Grad-Mimic inside your own training loop.

    grad_mimic = GradMimic(model, reference, mimic_layers="image-proj", temperature=0.05)
    losses = per_sample_losses(model(batch))     # shape [B], with the autograd graph
    step = grad_mimic.reweight(losses)           # step.loss = sum_i w_i l_i, w = softmax(s / tau)
    step.loss.backward(); optimizer.step()

``reweight(losses, others="mean")`` is the paper's ``full`` split in one call: the mimic layers get
the gradient of sum_i w_i l_i and every other parameter the gradient of the plain mean loss, from
one scalar you back-propagate as usual (so AMP scalers, clipping and DDP-free trainers need no
change). Each step also returns the entropy of its weights (how many samples it effectively
trains on); ``log_every`` logs it.

The scores come from the loss vector you already computed: s = -J V/|V| with J = d losses / d P,
obtained by the double-backward trick (a backward pass that builds its own graph, then a second
one through it), so nothing about the forward pass has to change. The ``score`` command uses a
forward-mode JVP instead, which is cheaper when we control the forward pass; both equal a
per-sample autograd loop (see tests/test_trajectory.py).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from mimicfilter.errors import MimicfilterError
from mimicfilter.defaults import MIMIC_LAYER_PRESETS, task_defaults
from mimicfilter.mimic.jvp import mimic_direction
from mimicfilter.mimic.layers import select_mimic_layers

logger = logging.getLogger(__name__)

# What the parameters outside the mimic layers learn from (the mimic layers always get sum_i w_i l_i).
OTHERS = {
    "weighted": "every parameter learns from the re-weighted loss sum_i w_i l_i",
    "mean": "the paper's full split: mimic layers re-weighted, every other parameter the plain mean loss",
}


@dataclass(frozen=True)
class GradMimicStep:
    """What :meth:`GradMimic.reweight` returns for one batch."""

    loss: torch.Tensor  # call .backward() on it; its value is sum_i w_i l_i ("weighted") or mean_i l_i ("mean")
    scores: torch.Tensor  # mimic score s_i of each sample (detached)
    weights: torch.Tensor  # w_i = softmax(s / tau), sums to 1 (detached)
    direction_norm: float = float("nan")  # |V| = |theta_P^ref - theta_P| at this step

    @property
    def relative_weights(self) -> torch.Tensor:
        """B * w_i: 1 means uniform, as in the ``mimic_weight`` column."""
        return self.weights * self.weights.numel()

    @property
    def weight_entropy(self) -> torch.Tensor:
        """H(w) = -sum_i w_i log w_i in nats (0-d tensor): log B for uniform weights, 0 for one sample."""
        weights = self.weights.double()
        return -(weights * torch.log(weights.clamp_min(torch.finfo(torch.float64).tiny))).sum()

    def stats(self) -> dict[str, float]:
        """Scalars for a metrics logger (one device sync): entropy, effective batch size exp(H), ..."""
        entropy = float(self.weight_entropy)
        batch = self.weights.numel()
        return {
            "weight_entropy": entropy,
            "weight_entropy_fraction": entropy / math.log(batch) if batch > 1 else 1.0,  # 1 = uniform
            "effective_batch": math.exp(entropy),
            "batch": float(batch),
            "max_relative_weight": float(self.relative_weights.max()),
            "score_mean": float(self.scores.mean()),
            "score_std": float(self.scores.std()) if batch > 1 else 0.0,
            "direction_norm": self.direction_norm,
        }


class GradMimic:
    """Re-weights each batch toward the samples whose gradients point at a reference model.

    ``model`` is the model you train (the proxy); ``reference`` is a module with the same parameter
    names on the mimic layers, or a dict name -> tensor. ``mimic_layers`` is a preset
    (image-proj, text-proj, both-proj, image-last-mlp, head) or a list of parameter names/globs;
    it and ``temperature`` default to the ``task``'s defaults (``mimicfilter.defaults``: image-proj
    and 0.05 for contrastive, head and 1.0 for classify), as in ``mimicfilter score``.
    ``log_every`` > 0 logs the weight entropy of every ``log_every``-th step (logger
    ``mimicfilter.mimic.grad_mimic``, level INFO).
    """

    def __init__(
        self,
        model: nn.Module,
        reference: nn.Module | dict[str, torch.Tensor],
        mimic_layers: str | Sequence[str] | None = None,
        temperature: float | None = None,
        task: str = "contrastive",
        log_every: int = 0,
    ):
        defaults = task_defaults(task)
        mimic_layers = defaults.mimic_layers if mimic_layers is None else mimic_layers
        temperature = defaults.temperature if temperature is None else temperature
        if not temperature > 0:
            raise MimicfilterError(f"temperature {temperature}: must be positive")
        if log_every < 0:
            raise MimicfilterError(f"log_every {log_every}: must be 0 (off) or positive")
        spec = mimic_layers if isinstance(mimic_layers, str) else ",".join(mimic_layers)
        self.names = select_mimic_layers(model, spec)
        parameters = dict(model.named_parameters())
        self.parameters = [parameters[name] for name in self.names]
        reference_values = dict(reference.named_parameters()) if isinstance(reference, nn.Module) else reference
        missing = [name for name in self.names if name not in reference_values]
        if missing:
            raise MimicfilterError(f"the reference has no {', '.join(missing)}", hint="use the same architecture")
        self.reference = {name: reference_values[name].detach().to(parameters[name]) for name in self.names}
        self.temperature = temperature
        self.log_every = log_every
        self.steps = 0  # reweight() calls so far: only paces the log
        try:  # validates shapes (and V != 0) now, not at the first batch
            mimic_direction(self.reference, self.current())
        except ValueError as error:
            raise MimicfilterError(f"cannot mimic the reference: {error}",
                                   hint="train from weights that differ from the reference on the mimic layers") from error

    def current(self) -> dict[str, torch.Tensor]:
        return {name: parameter.detach() for name, parameter in zip(self.names, self.parameters)}

    def scores(self, per_sample_loss: torch.Tensor) -> torch.Tensor:
        """s_i = -<grad_P l_i, V/|V|> for the batch, from the loss vector's autograd graph."""
        return self._scores(per_sample_loss)[0]

    def _scores(self, per_sample_loss: torch.Tensor) -> tuple[torch.Tensor, float]:
        direction = mimic_direction(self.reference, self.current())
        probe = torch.zeros_like(per_sample_loss, requires_grad=True)
        # J^T probe as a function of probe; its dot product with V is linear in probe with slope J V.
        gradients = torch.autograd.grad(
            per_sample_loss, self.parameters, grad_outputs=probe, create_graph=True, allow_unused=True
        )
        projection = sum(
            (gradient * direction.unit[name]).sum()
            for name, gradient in zip(self.names, gradients)
            if gradient is not None
        )
        if not torch.is_tensor(projection) or not projection.requires_grad:
            # the loss does not touch the mimic layers
            return torch.zeros_like(per_sample_loss).detach(), direction.norm
        (directional,) = torch.autograd.grad(projection, probe, retain_graph=True)
        return -directional.detach(), direction.norm

    def reweight(self, per_sample_loss: torch.Tensor, others: str = "weighted") -> GradMimicStep:
        """Scores, weights and the loss to back-propagate for one batch.

        ``others="weighted"``: the loss is sum_i w_i l_i for every parameter. ``others="mean"`` (the
        ``full`` split): the mimic layers get the gradient of sum_i w_i l_i, every other parameter
        the gradient of mean_i l_i, and the loss's value is mean_i l_i.
        """
        if per_sample_loss.ndim != 1:
            raise MimicfilterError(f"expected a vector of per-sample losses, got shape {tuple(per_sample_loss.shape)}")
        if others not in OTHERS:
            raise MimicfilterError(f"others={others!r}", hint=f"use {' or '.join(map(repr, OTHERS))}")
        scores, norm = self._scores(per_sample_loss)
        weights = torch.softmax(scores / self.temperature, dim=0)
        if others == "weighted":
            loss = (weights * per_sample_loss).sum()
        else:
            loss = self._split_loss(per_sample_loss, weights)
        step = GradMimicStep(loss=loss, scores=scores, weights=weights, direction_norm=norm)
        self.steps += 1
        if self.log_every and self.steps % self.log_every == 0:
            self._log(step)
        return step

    def _split_loss(self, per_sample_loss: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """mean_i l_i plus a term whose gradient is sum_i (w_i - 1/B) grad_P l_i on the mimic layers only.

        The term is <c, theta_P> - <c, theta_P>.detach() with c = J_P^T (w - 1/B) held constant: it adds
        nothing to the value and nothing to any other parameter's gradient, so one backward pass of
        the returned scalar gives the split (one extra backward over the layers above P to get c).
        """
        shift = weights.detach() - 1.0 / per_sample_loss.numel()
        corrections = torch.autograd.grad(per_sample_loss, self.parameters, grad_outputs=shift,
                                          retain_graph=True, allow_unused=True)
        term = sum((correction.detach() * parameter).sum()
                   for correction, parameter in zip(corrections, self.parameters) if correction is not None)
        mean = per_sample_loss.mean()
        return mean if not torch.is_tensor(term) else mean + (term - term.detach()).to(mean.dtype)

    def _log(self, step: GradMimicStep) -> None:
        stats = step.stats()
        logger.info(
            "grad-mimic step %d: weight entropy %.3f nats (%.1f%% of uniform; effective batch %.1f of %d), "
            "max relative weight %.2f, |V| %.4g",
            self.steps, stats["weight_entropy"], 100 * stats["weight_entropy_fraction"], stats["effective_batch"],
            int(stats["batch"]), stats["max_relative_weight"], stats["direction_norm"],
        )


__all__ = ["GradMimic", "GradMimicStep", "MIMIC_LAYER_PRESETS", "OTHERS"]
