"""Grad-Mimic inside your own training loop.

    grad_mimic = GradMimic(model, reference, mimic_layers="image-proj", temperature=0.05)
    losses = per_sample_losses(model(batch))     # shape [B], with the autograd graph
    step = grad_mimic.reweight(losses)           # step.loss = sum_i w_i l_i, w = softmax(s / tau)
    step.loss.backward(); optimizer.step()

The scores come from the loss vector you already computed: s = -J V/|V| with J = d losses / d P,
obtained by the double-backward trick (a backward pass that builds its own graph, then a second
one through it), so nothing about the forward pass has to change. The ``score`` command uses a
forward-mode JVP instead, which is cheaper when we control the forward pass; both equal a
per-sample autograd loop (see tests/test_trajectory.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from mimicfilter.errors import MimicfilterError
from mimicfilter.defaults import MIMIC_LAYER_PRESETS, task_defaults
from mimicfilter.mimic.jvp import mimic_direction
from mimicfilter.mimic.layers import select_mimic_layers


@dataclass(frozen=True)
class GradMimicStep:
    """What :meth:`GradMimic.reweight` returns for one batch."""

    loss: torch.Tensor  # sum_i w_i l_i: call .backward() on it
    scores: torch.Tensor  # mimic score s_i of each sample (detached)
    weights: torch.Tensor  # w_i = softmax(s / tau), sums to 1 (detached)

    @property
    def relative_weights(self) -> torch.Tensor:
        """B * w_i: 1 means uniform, as in the ``mimic_weight`` column."""
        return self.weights * self.weights.numel()


class GradMimic:
    """Re-weights each batch toward the samples whose gradients point at a reference model.

    ``model`` is the model you train (the proxy); ``reference`` is a module with the same parameter
    names on the mimic layers, or a dict name -> tensor. ``mimic_layers`` is a preset
    (image-proj, text-proj, both-proj, image-last-mlp, head) or a list of parameter names/globs;
    it and ``temperature`` default to the ``task``'s defaults (``mimicfilter.defaults``: image-proj
    and 0.05 for contrastive, head and 1.0 for classify), as in ``mimicfilter score``.
    """

    def __init__(
        self,
        model: nn.Module,
        reference: nn.Module | dict[str, torch.Tensor],
        mimic_layers: str | Sequence[str] | None = None,
        temperature: float | None = None,
        task: str = "contrastive",
    ):
        defaults = task_defaults(task)
        mimic_layers = defaults.mimic_layers if mimic_layers is None else mimic_layers
        temperature = defaults.temperature if temperature is None else temperature
        if not temperature > 0:
            raise MimicfilterError(f"temperature {temperature}: must be positive")
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
        mimic_direction(self.reference, self.current())  # validates shapes now, not at the first batch

    def current(self) -> dict[str, torch.Tensor]:
        return {name: parameter.detach() for name, parameter in zip(self.names, self.parameters)}

    def scores(self, per_sample_loss: torch.Tensor) -> torch.Tensor:
        """s_i = -<grad_P l_i, V/|V|> for the batch, from the loss vector's autograd graph."""
        unit = mimic_direction(self.reference, self.current()).unit
        probe = torch.zeros_like(per_sample_loss, requires_grad=True)
        # J^T probe as a function of probe; its dot product with V is linear in probe with slope J V.
        gradients = torch.autograd.grad(
            per_sample_loss, self.parameters, grad_outputs=probe, create_graph=True, allow_unused=True
        )
        projection = sum(
            (gradient * unit[name]).sum()
            for name, gradient in zip(self.names, gradients)
            if gradient is not None
        )
        if not torch.is_tensor(projection) or not projection.requires_grad:
            return torch.zeros_like(per_sample_loss).detach()  # the loss does not touch the mimic layers
        (directional,) = torch.autograd.grad(projection, probe, retain_graph=True)
        return -directional.detach()

    def reweight(self, per_sample_loss: torch.Tensor) -> GradMimicStep:
        if per_sample_loss.ndim != 1:
            raise MimicfilterError(f"expected a vector of per-sample losses, got shape {tuple(per_sample_loss.shape)}")
        scores = self.scores(per_sample_loss)
        weights = torch.softmax(scores / self.temperature, dim=0)
        return GradMimicStep(loss=(weights * per_sample_loss).sum(), scores=scores, weights=weights)


__all__ = ["GradMimic", "GradMimicStep", "MIMIC_LAYER_PRESETS"]
