"""The loss open_clip's trainer gets instead of ``ClipLoss``/``SigLipLoss``: the per-sample loss of
the batch, re-weighted by :class:`~mimicfilter.mimic.grad_mimic.GradMimic`, and the reference's
mimic-layer tensors it steers toward (loaded once, before training starts)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from mimicfilter.errors import MimicfilterError
from mimicfilter.lean_imports import import_open_clip, require
from mimicfilter.mimic.architectures import is_local_checkpoint, load_checkpoint
from mimicfilter.mimic.grad_mimic import OTHERS, GradMimic, GradMimicStep
from mimicfilter.mimic.layers import select_mimic_layers
from mimicfilter.mimic.losses import contrastive_per_sample_loss


@dataclass(frozen=True)
class GradMimicOptions:
    """The ``--grad-mimic-*`` options, validated once."""

    reference: str  # a checkpoint file (state dict or an open_clip_train epoch_N.pt) or a pretrained tag
    layers: str  # a mimic-layer preset or comma-separated parameter globs
    temperature: float
    others: str  # OTHERS: what the parameters outside the mimic layers learn from
    trust_checkpoint: bool = False

    def __post_init__(self):
        if not self.temperature > 0:
            raise MimicfilterError(f"--grad-mimic-temperature {self.temperature}: must be positive", hint="e.g. 0.05")
        if self.others not in OTHERS:
            raise MimicfilterError(f"--grad-mimic-others {self.others!r}", hint=f"use {' or '.join(OTHERS)}")
        if not self.layers.strip():
            raise MimicfilterError("--grad-mimic-layers is empty", hint="a preset such as image-proj, or parameter globs")


def reference_model_kwargs(args) -> dict:
    """The architecture options open_clip_train's main() builds its model with, so names and shapes match."""
    kwargs = dict(
        force_quick_gelu=args.force_quick_gelu,
        force_custom_text=args.force_custom_text,
        force_patch_dropout=args.force_patch_dropout,
        force_image_size=args.force_image_size,
        force_context_length=args.force_context_length,
    )
    if isinstance(kwargs["force_image_size"], (tuple, list)) and len(kwargs["force_image_size"]) == 1:
        kwargs["force_image_size"] = kwargs["force_image_size"][0]
    if args.siglip:  # the trainer's SigLIP models carry a logit_bias parameter
        kwargs.update(init_logit_scale=float(torch.log(torch.tensor(10.0))), init_logit_bias=-10)
    return kwargs


def load_reference(model_name: str, options: GradMimicOptions, model_kwargs: dict) -> dict[str, torch.Tensor]:
    """The reference's mimic-layer tensors (on CPU); the rest of the reference is dropped."""
    open_clip = import_open_clip()
    for package in ("timm", "huggingface_hub"):  # open_clip_train's models and tags may need either; the
        require(package)  # trainer runs after this in the same process, so it gets the whole open_clip

    source = options.reference
    is_file = is_local_checkpoint(source)
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # open_clip warns about building without weights: we load them next
    try:
        if is_file:
            model = open_clip.create_model(model_name, pretrained=None, **model_kwargs)
        else:
            tags = open_clip.list_pretrained_tags_by_model(model_name)
            if source not in tags:
                raise MimicfilterError(
                    f"--grad-mimic-reference {source!r} is neither a checkpoint file nor a pretrained tag of {model_name}",
                    hint=f"known tags: {', '.join(tags) or 'none'}",
                )
            model = open_clip.create_model(model_name, pretrained=source, **model_kwargs)
    except MimicfilterError:
        raise
    except Exception as error:  # unknown architecture, failed download
        raise MimicfilterError(f"cannot build the reference {model_name}/{source}: {' '.join(str(error).split())[:300]}",
                               hint="pass the trainer's --model and a local checkpoint") from error
    finally:
        root.setLevel(level)
    if is_file:
        load_checkpoint(model, Path(source), "--grad-mimic-reference", options.trust_checkpoint)
    names = select_mimic_layers(model, options.layers)
    parameters = dict(model.named_parameters())
    return {name: parameters[name].detach().clone() for name in names}


class GradMimicClipLoss(nn.Module):
    """CLIP's (or SigLIP's, when the model has a logit bias) loss over one process's batch, re-weighted.

    :meth:`bind` hands it the model being trained (once, before the first step); each call then
    returns ``{"contrastive_loss": loss}`` like open_clip's losses, with ``loss`` from
    :meth:`GradMimic.reweight` (``others`` decides what the non-mimic parameters learn from).
    """

    def __init__(self, reference: dict[str, torch.Tensor], options: GradMimicOptions, log_every: int = 0):
        super().__init__()
        self.reference = reference
        self.options = options
        self.log_every = log_every
        self.grad_mimic: GradMimic | None = None

    def bind(self, model: nn.Module) -> None:
        if self.grad_mimic is None:
            self.grad_mimic = GradMimic(model, self.reference, mimic_layers=list(self.reference),
                                        temperature=self.options.temperature, log_every=self.log_every)

    def step(self, image_features, text_features, logit_scale, logit_bias=None) -> GradMimicStep:
        if self.grad_mimic is None:
            raise RuntimeError("GradMimicClipLoss.bind(model) must be called before the first batch")
        losses = contrastive_per_sample_loss(image_features, text_features, logit_scale, logit_bias)
        return self.grad_mimic.reweight(losses, others=self.options.others)

    def forward(self, image_features, text_features, logit_scale, logit_bias=None, output_dict=False, **_):
        loss = self.step(image_features, text_features, logit_scale, logit_bias).loss
        return {"contrastive_loss": loss} if output_dict else loss
