"""From what the user asked for to a ready scorer: device, models, the task's scorer class."""

from __future__ import annotations

import dataclasses

import torch

from mimicfilter.mimic.classify import ClassifierScorer
from mimicfilter.mimic.contrastive import ContrastiveScorer
from mimicfilter.mimic.device import resolve_device
from mimicfilter.mimic.models import LoadedModels, ModelSpec, load_models
from mimicfilter.mimic.scorer import MimicScorer


def load_models_on_device(spec: ModelSpec) -> LoadedModels:
    """Resolve ``spec.device`` (``auto``…), seed torch, build reference and proxy there."""
    device = resolve_device(spec.device)
    torch.manual_seed(spec.seed)
    return load_models(dataclasses.replace(spec, device=str(device)))


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The towers run in bf16 on CUDA (the JVP stays float32); CPU stays float32."""
    return torch.bfloat16 if device.type == "cuda" else None


def make_scorer(models: LoadedModels, temperature: float, autocast_dtype: torch.dtype | None = None) -> MimicScorer:
    scorer_class = ClassifierScorer if models.task == "classify" else ContrastiveScorer
    return scorer_class(models, temperature, autocast_dtype)
