"""Reference and proxy: what the user asked for (:class:`ModelSpec`) and what was built from it.

Everything is validated in :func:`load_models`, before any shard is opened: the architecture name
or JSON config, the checkpoints, the mimic-layer names and the shapes of reference and proxy on
those layers; the default proxy is the reference with the mimic layers re-initialised from a seed.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from mimicfilter.defaults import TASKS, task_defaults
from mimicfilter.errors import MimicfilterError
from mimicfilter.mimic.architectures import instantiate, preview_preprocessing, resolve_architecture
from mimicfilter.mimic.device import resolve_device
from mimicfilter.mimic.heads import build_classifiers, head_classes
from mimicfilter.mimic.normalization import ImageNormalization
from mimicfilter.mimic.jvp import MimicDirection, mimic_direction
from mimicfilter.mimic.layers import (copy_sharing_frozen, layers_to_reinitialise, parameters_of, reinitialise,
                                      select_mimic_layers, touches_head)
from mimicfilter.timing import phase


@dataclass(frozen=True)
class ModelSpec:
    """What the user asked for; validated by :func:`load_models`."""

    model: str
    reference: str
    proxy: str | None = None
    mimic_layers: str | None = None  # None: the task's default preset
    trust_checkpoint: bool = False
    seed: int = 0
    device: str = "cpu"
    task: str = "contrastive"
    reference_head: str | None = None  # classification: a trained head checkpoint ...
    classnames: str | None = None  # ... or a class-name file for a zero-shot head

    def __post_init__(self):
        if self.task not in TASKS:
            raise MimicfilterError(f"unknown task {self.task!r}", hint="contrastive or classify")
        if not 0 <= self.seed < 2**63:
            raise MimicfilterError(f"--seed {self.seed}: must be between 0 and 2**63 - 1")
        if self.task == "classify" and not (self.reference_head or self.classnames):
            raise MimicfilterError(
                "classification needs a reference head",
                hint="pass --classnames FILE (zero-shot head from the reference text tower) or --reference-head FILE",
            )

    @property
    def layers(self) -> str:
        return self.mimic_layers or task_defaults(self.task).mimic_layers


@dataclass
class LoadedModels:
    """Reference and proxy CLIP models plus the preprocessing paired with them by open_clip."""

    reference: nn.Module
    proxy: nn.Module
    preprocess: Callable
    tokenizer: Callable
    mimic_layers: tuple[str, ...]
    direction: MimicDirection
    device: torch.device
    task: str = "contrastive"
    provenance: dict[str, Any] = field(default_factory=dict)
    preprocess_cfg: dict[str, Any] = field(default_factory=dict)  # open_clip's, for the decoders' geometry
    proxy_is_reference_copy: bool = False  # the proxy equals the reference outside the mimic layers by construction
    # (a contrastive copy shares those parameters' tensors with the reference until its trunk trains)
    normalization: ImageNormalization = field(default_factory=ImageNormalization)  # applied on the device


@dataclass(frozen=True)
class ModelInputs:
    """What decoding needs from the models: the image preprocessing, the tokenizer and, for
    classification, the number of classes the labels must fall in."""

    task: str
    preprocess_cfg: dict[str, Any]
    tokenizer: Callable
    num_classes: int | None = None

    @classmethod
    def of(cls, models: LoadedModels) -> ModelInputs:
        classes = models.reference.head.out_features if models.task == "classify" else None
        return cls(models.task, models.preprocess_cfg, models.tokenizer, classes)


def preview_inputs(spec: ModelSpec) -> ModelInputs | None:
    """:class:`ModelInputs` before any weight loads (see :func:`preview_preprocessing`); None when
    they cannot be known early, or anything is wrong (``load_models`` then says what)."""
    try:
        preview = preview_preprocessing(resolve_architecture(spec.model), spec.reference)
        if preview is None:
            return None
        classes = head_classes(spec.reference_head, spec.classnames, spec.trust_checkpoint) if spec.task == "classify" else None
    except Exception:
        return None
    return ModelInputs(spec.task, *preview, classes)


def load_models_on_device(spec: ModelSpec) -> LoadedModels:
    """Resolve ``spec.device`` (``auto``…), seed torch, build reference and proxy there."""
    device = resolve_device(spec.device)
    torch.manual_seed(spec.seed)
    return load_models(dataclasses.replace(spec, device=str(device)))


def load_models(spec: ModelSpec) -> LoadedModels:
    """Build reference and proxy, select mimic layers, compute V; every check before any data is read."""
    device = torch.device(spec.device)
    architecture = resolve_architecture(spec.model)
    built_reference = instantiate(architecture, spec.reference, "reference", spec.trust_checkpoint)
    reference = built_reference.model
    built_proxy = instantiate(architecture, spec.proxy, "proxy", spec.trust_checkpoint) if spec.proxy else None
    proxy = built_proxy.model if built_proxy else None
    extra_info = {}
    if spec.task == "classify":
        classifiers = build_classifiers(spec.reference_head, spec.classnames, spec.trust_checkpoint, reference, proxy,
                                        built_reference.tokenizer)
        reference, proxy, extra_info["reference_head"] = classifiers.reference, classifiers.proxy, classifiers.head_info
    mimic_layers = select_mimic_layers(reference, spec.layers)
    copied = built_proxy is None
    with phase("make the proxy"):
        proxy, proxy_info = _proxy(spec, reference, proxy, built_proxy, mimic_layers)
    with phase("direction V, models to the device"):
        return _finish(spec, device, architecture, built_reference, reference, proxy, proxy_info, mimic_layers,
                       extra_info, copied)


def _proxy(spec: ModelSpec, reference: nn.Module, proxy: nn.Module | None, built_proxy, mimic_layers: tuple[str, ...]):
    """The proxy (the given one, or a copy of the reference with the mimic layers re-initialised) and its provenance."""
    if built_proxy is not None and not (spec.task == "classify" and touches_head(mimic_layers)):
        proxy_info = built_proxy.weights
    else:
        proxy = copy_sharing_frozen(reference, mimic_layers) if proxy is None else proxy
        reinitialised = layers_to_reinitialise(mimic_layers)
        reinitialise(proxy, reinitialised, spec.seed)
        proxy_info = {
            **(built_proxy.weights if built_proxy else {"source": "reference"}),
            "reinitialised_layers": list(reinitialised),
            "seed": spec.seed,
        }
    return proxy, proxy_info


def _finish(spec, device, architecture, built_reference, reference, proxy, proxy_info, mimic_layers, extra_info,
            copied) -> LoadedModels:
    try:
        direction = mimic_direction(parameters_of(reference, mimic_layers), parameters_of(proxy, mimic_layers))
    except ValueError as error:
        raise MimicfilterError(f"cannot mimic the reference: {error}", hint="check --proxy and --mimic-layers") from error
    for model in (reference, proxy):
        model.to(device).eval().requires_grad_(False)
    direction = MimicDirection(unit={k: v.to(device) for k, v in direction.unit.items()}, norm=direction.norm)
    shapes = {name: list(value.shape) for name, value in parameters_of(reference, mimic_layers).items()}
    provenance = {
        "task": spec.task,
        "architecture": spec.model,
        "architecture_config": architecture.json_config,
        "reference": built_reference.weights,
        "proxy": proxy_info,
        **extra_info,
        "mimic_layers": {"spec": spec.layers, "shapes": shapes},
        "direction_norm": direction.norm,
    }
    return LoadedModels(
        reference=reference,
        proxy=proxy,
        preprocess=built_reference.preprocess,
        tokenizer=built_reference.tokenizer,
        mimic_layers=mimic_layers,
        direction=direction,
        device=device,
        task=spec.task,
        provenance=provenance,
        preprocess_cfg=built_reference.preprocess_cfg,
        proxy_is_reference_copy=copied,
        normalization=ImageNormalization.from_open_clip(built_reference.preprocess_cfg),
    )

