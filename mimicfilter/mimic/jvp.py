"""The mimic-score math: the direction to the reference, scores by one forward-mode JVP, batch weights.

Everything here is a pure tensor function. The score of sample i is

    s_i = <-grad_P l_i, V> / ||V||,   V = theta_P^ref - theta_P,

i.e. minus the directional derivative of the per-sample loss l_i along the unit direction
V/||V||. The whole batch's scores therefore come from ONE Jacobian-vector product of the
per-sample-loss vector: no per-sample gradient is ever materialised (the contrastive loss couples
samples, so per-sample gradients would recompute the batch B times).
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
import torch.autograd.forward_ad as forward_ad

from mimicfilter.mimic.losses import Anchors

ParamDict = dict[str, torch.Tensor]


@dataclass(frozen=True)
class MimicResult:
    """Per-sample outputs of one batch (all 1-D tensors of length B)."""

    loss: torch.Tensor
    score: torch.Tensor
    weight: torch.Tensor  # relative weight r_i = B * softmax(s / tau)_i; 1 means uniform


@contextlib.contextmanager
def _quiet_forward_ad():
    # torch's forward-AD decompositions load once through torch.jit.script, which warns that it is
    # deprecated: noise about torch internals, not about the user's run.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*deprecated", category=FutureWarning)
        yield


def relative_weights(scores: torch.Tensor, temperature: float, anchors: Anchors | None = None) -> torch.Tensor:
    """r_i = B * softmax(s / tau)_i: the batch weights of Grad-Mimic, scaled so uniform is 1.

    ``anchors`` ride along: the pool's weights are over the pool's scores alone, and an anchor's
    weight is the one it would have as the only extra member of the batch ((B+1) · its share)."""
    if anchors is None or not bool(anchors.mask.any()):
        return scores.numel() * torch.softmax(scores / temperature, dim=0)
    mask = anchors.mask
    pool = ~mask
    logits = scores / temperature
    pool_logits = logits[pool]
    weights = torch.empty_like(scores)
    weights[pool] = pool_logits.numel() * torch.softmax(pool_logits, dim=0)
    pool_mass = torch.logsumexp(pool_logits, dim=0) if pool_logits.numel() else torch.tensor(float("-inf"), dtype=logits.dtype)
    own = logits[mask]
    weights[mask] = (pool_logits.numel() + 1) * torch.exp(own - torch.logaddexp(own, pool_mass))
    return weights


@dataclass(frozen=True)
class MimicDirection:
    """V / ||V|| per mimic layer, and ||V|| itself (recorded in run.json)."""

    unit: ParamDict
    norm: float


def mimic_direction(reference: ParamDict, proxy: ParamDict) -> MimicDirection:
    """The unit direction from the proxy toward the reference on the mimic layers.

    Raises ValueError naming both shapes when a parameter's shapes differ, and when V = 0 (the
    proxy already equals the reference on the mimic layers, so every score would be 0/0).
    """
    direction = {}
    for name, proxy_value in proxy.items():
        reference_value = reference[name]
        if reference_value.shape != proxy_value.shape:
            raise ValueError(
                f"mimic layer {name}: reference shape {tuple(reference_value.shape)} "
                f"!= proxy shape {tuple(proxy_value.shape)}"
            )
        direction[name] = (reference_value - proxy_value).detach()
    norm = torch.sqrt(sum((value.double() ** 2).sum() for value in direction.values())).item()
    if norm == 0.0:
        raise ValueError("the proxy equals the reference on the mimic layers (V = 0)")
    return MimicDirection(unit={name: value / norm for name, value in direction.items()}, norm=norm)


def mimic_scores(
    per_sample_loss: Callable[[ParamDict], torch.Tensor],
    params: ParamDict,
    unit_direction: ParamDict,
    temperature: float,
    anchors: Anchors | None = None,
) -> MimicResult:
    """Scores of a batch from one forward-mode JVP of ``per_sample_loss`` at ``params``.

    ``per_sample_loss`` maps the mimic-layer parameters to the vector of per-sample losses; the
    JVP along ``unit_direction`` gives d l_i / d eps for theta_P + eps V/||V||, and s_i is minus that.
    """
    primals = {name: value.detach() for name, value in params.items()}
    tangents = {name: unit_direction[name].to(value) for name, value in primals.items()}
    with _quiet_forward_ad():
        loss, directional = torch.func.jvp(per_sample_loss, (primals,), (tangents,))
    score = -directional
    return MimicResult(loss=loss.detach(), score=score.detach(),
                       weight=relative_weights(score.detach(), temperature, anchors))


def mimic_forward(
    per_sample_loss: Callable[[ParamDict], torch.Tensor],
    params: ParamDict,
    unit_direction: ParamDict,
    temperature: float,
    anchors: Anchors | None = None,
) -> MimicResult:
    """Like :func:`mimic_scores`, but the losses keep their autograd graph for a training step.

    Forward-mode AD with dual tensors: one forward pass yields the losses (differentiable with
    respect to ``params`` and anything else requiring grad) and their directional derivatives.
    """
    with _quiet_forward_ad(), forward_ad.dual_level():
        duals = {name: forward_ad.make_dual(value, unit_direction[name].to(value)) for name, value in params.items()}
        unpacked = forward_ad.unpack_dual(per_sample_loss(duals))
        loss, directional = unpacked.primal, unpacked.tangent
    if directional is None:  # the loss does not depend on the mimic layers at all
        directional = torch.zeros_like(loss)
    score = -directional.detach()
    return MimicResult(loss=loss, score=score, weight=relative_weights(score, temperature, anchors))
