"""Models: the open_clip factory, reference/proxy checkpoints and the choice of mimic layers.

Everything is validated here, before any shard is opened: the architecture name or JSON config,
the checkpoints (loaded with ``weights_only=True`` unless the user trusts them), the mimic-layer
names and the shapes of reference and proxy on those layers.
"""

from __future__ import annotations

import copy
import fnmatch
import hashlib
import json
import logging
import pickle
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import open_clip
import torch
import torch.nn.functional as F
from torch import nn

from mimicfilter.choices import DEFAULT_MIMIC_LAYERS, MIMIC_LAYER_PRESETS, TASKS  # noqa: F401 (re-exported)
from mimicfilter.errors import MimicfilterError
from mimicfilter.mimic import MimicDirection, mimic_direction

ZERO_SHOT_TEMPLATES = ("a photo of a {}.", "a picture of a {}.", "an image of a {}.", "a {}.")
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")
LOGIT_PARAMETERS = ("logit_scale", "logit_bias")


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
        if self.task == "classify" and not (self.reference_head or self.classnames):
            raise MimicfilterError(
                "classification needs a reference head",
                hint="pass --classnames FILE (zero-shot head from the reference text tower) or --reference-head FILE",
            )

    @property
    def layers(self) -> str:
        return self.mimic_layers or DEFAULT_MIMIC_LAYERS[self.task]


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


class ImageClassifier(nn.Module):
    """An image tower with a linear head on its normalised features: logits = s * W f/|f| + b.

    The form of CLIP zero-shot classification, so a head built from class names and a trained
    head (``--reference-head``) are used the same way.
    """

    def __init__(self, visual: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None, logit_scale: float):
        super().__init__()
        self.visual = visual
        self.head = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
        with torch.no_grad():
            self.head.weight.copy_(weight)
            if bias is not None:
                self.head.bias.copy_(bias)
        self.register_buffer("logit_scale", torch.tensor(float(logit_scale)))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.visual(images), dim=-1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.logit_scale * self.head(self.features(images))


def resolve_device(requested: str) -> torch.device:
    """``auto`` picks CUDA when present; asking for CUDA without one is a usage error."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except RuntimeError as error:
        raise MimicfilterError(f"unknown device {requested!r}", hint="use auto, cpu, cuda or cuda:N") from error
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise MimicfilterError(f"--device {requested}: no CUDA device is available", hint="use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise MimicfilterError(
                f"--device {requested}: only {torch.cuda.device_count()} CUDA device(s)", hint="use cuda:0"
            )
    elif device.type != "cpu":
        raise MimicfilterError(f"unsupported device {requested!r}", hint="use auto, cpu, cuda or cuda:N")
    return device


def sha256_of_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _read_json_config(path: Path) -> dict:
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise MimicfilterError(f"cannot read model config {path}: {error}") from error
    if not isinstance(config, dict):
        raise MimicfilterError(f"model config {path} is not a JSON object")
    if "model_cfg" not in config:
        config = {"model_cfg": config, "preprocess_cfg": {}}
    model_cfg = config["model_cfg"]
    missing = [key for key in ("embed_dim", "vision_cfg", "text_cfg") if key not in model_cfg]
    if missing:
        raise MimicfilterError(
            f"model config {path} lacks {', '.join(missing)}",
            hint="a config is an open_clip model_cfg: {embed_dim, vision_cfg, text_cfg}",
        )
    return config


def _is_local_checkpoint(source: str) -> bool:
    return Path(source).suffix.lower() in CHECKPOINT_SUFFIXES or Path(source).is_file()


@dataclass
class _BuiltModel:
    """One model with the preprocessing and tokenizer open_clip's factory paired with it."""

    model: nn.Module
    preprocess: Callable
    tokenizer: Callable
    weights: dict = field(default_factory=dict)  # where the weights came from, for run.json


def _build_from_factory(factory_name: str, pretrained: str | None) -> _BuiltModel:
    """open_clip's factory pairs the model with its preprocessing and tokenizer."""
    # open_clip logs a warning whenever it builds a model without weights; we load them ourselves.
    factory_logger = logging.getLogger()
    previous_level = factory_logger.level
    factory_logger.setLevel(logging.ERROR)
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(factory_name, pretrained=pretrained)
        tokenizer = open_clip.get_tokenizer(factory_name)
    finally:
        factory_logger.setLevel(previous_level)
    return _BuiltModel(model=model, preprocess=preprocess, tokenizer=tokenizer)


def _load_checkpoint(model: nn.Module, path: Path, role: str, trust: bool) -> None:
    if not path.is_file():
        raise MimicfilterError(f"{role} checkpoint {path} does not exist", hint="check the path")
    try:
        open_clip.load_checkpoint(model, str(path), strict=True, weights_only=not trust)
    except pickle.UnpicklingError as error:
        raise MimicfilterError(
            f"{role} checkpoint {path} is a full pickle, not a plain state dict",
            hint="pass --trust-checkpoint if you trust its author (unpickling can run code)",
        ) from error
    except RuntimeError as error:
        detail = " ".join(str(error).split())
        raise MimicfilterError(f"{role} checkpoint {path} does not fit the model: {detail[:400]}") from error
    except Exception as error:  # safetensors / zip / torch errors for files that are no checkpoint at all
        raise MimicfilterError(f"cannot read {role} checkpoint {path}: {type(error).__name__}: {error}") from error


def _pretrained_tags(model_name: str) -> list[str]:
    return open_clip.list_pretrained_tags_by_model(model_name)


@dataclass(frozen=True)
class _Architecture:
    """Where open_clip finds the architecture: a built-in name, or a JSON config in a temp dir."""

    name: str
    json_config: dict | None


def _resolve_architecture(model: str) -> _Architecture:
    path = Path(model)
    if path.suffix.lower() == ".json" or path.is_file():
        if not path.is_file():
            raise MimicfilterError(f"model config {model} does not exist", hint="check the path")
        return _Architecture(name=model, json_config=_read_json_config(path))
    if model.replace("/", "-") not in open_clip.list_models():
        close = [name for name in open_clip.list_models() if model.lower()[:5] in name.lower()][:5]
        raise MimicfilterError(
            f"unknown model {model!r}",
            hint=f"an open_clip architecture such as {', '.join(close or ['ViT-B-32', 'RN50'])}, or a JSON config path",
        )
    return _Architecture(name=model, json_config=None)


def _instantiate(architecture: _Architecture, source: str, role: str, trust: bool) -> _BuiltModel:
    """Build one model and load its weights from a pretrained tag or a local checkpoint."""
    local = _is_local_checkpoint(source)
    if architecture.json_config is not None:
        if not local:
            raise MimicfilterError(
                f"{role} {source!r} is not a checkpoint file",
                hint="a JSON model config needs a local .pt/.bin/.safetensors checkpoint",
            )
        with tempfile.TemporaryDirectory(prefix="mimicfilter-config-") as config_dir:
            (Path(config_dir) / "open_clip_config.json").write_text(json.dumps(architecture.json_config))
            built = _build_from_factory(f"local-dir:{config_dir}", None)
    elif local:
        built = _build_from_factory(architecture.name, None)
    else:
        tags = _pretrained_tags(architecture.name)
        if source not in tags:
            raise MimicfilterError(
                f"{role} {source!r} is neither a checkpoint file nor a pretrained tag of {architecture.name}",
                hint=f"known tags: {', '.join(tags) or 'none'}",
            )
        try:
            built = _build_from_factory(architecture.name, source)
        except Exception as error:  # the hub download failed: network, auth, cache
            raise MimicfilterError(
                f"could not fetch pretrained weights {architecture.name}/{source}: {' '.join(str(error).split())[:300]}",
                hint="without network access, download the checkpoint elsewhere and pass its path",
            ) from error
        built.weights = {"source": "pretrained", "tag": source}
        return built
    path = Path(source)
    _load_checkpoint(built.model, path, role, trust)
    built.weights = {"source": "checkpoint", "path": str(path), "sha256": sha256_of_file(path)}
    return built


def is_image_parameter(name: str) -> bool:
    return name.startswith("visual.")


def _last_linear(module: nn.Module, prefix: str) -> list[str]:
    linears = [name for name, child in module.named_modules() if isinstance(child, nn.Linear)]
    if not linears:
        return []
    last = f"{prefix}{linears[-1]}"
    return [name for name, _ in module.named_parameters(prefix=prefix.rstrip(".")) if name.startswith(last + ".")]


def _image_projection(model: nn.Module) -> list[str]:
    visual = model.visual
    if isinstance(getattr(visual, "proj", None), nn.Parameter):
        return ["visual.proj"]
    return _last_linear(visual, "visual.")


def _text_projection(model: nn.Module) -> list[str]:
    names = [name for name, _ in model.named_parameters()]
    matches = [name for name in names if "text_projection" in name]
    if matches:
        return matches
    text = getattr(model, "text", None)
    return _last_linear(text, "text.") if text is not None else []


def _image_last_mlp(model: nn.Module) -> list[str]:
    blocks = getattr(getattr(model.visual, "transformer", None), "resblocks", None)
    if not blocks:
        return []
    prefix = f"visual.transformer.resblocks.{len(blocks) - 1}.mlp."
    return [name for name, _ in model.named_parameters() if name.startswith(prefix)]


def select_mimic_layers(model: nn.Module, spec: str) -> tuple[str, ...]:
    """Parameter names for a preset or a comma-separated list of globs over parameter names."""
    presets = {
        "image-proj": _image_projection,
        "text-proj": _text_projection,
        "both-proj": lambda m: _image_projection(m) + _text_projection(m),
        "image-last-mlp": _image_last_mlp,
        "head": lambda m: [name for name, _ in m.named_parameters() if name.startswith("head.")],
    }
    all_names = [name for name, _ in model.named_parameters()]
    if spec in presets:
        names = presets[spec](model)
        if not names:
            raise MimicfilterError(f"--mimic-layers {spec}: this architecture has no such layer", hint="pass a glob")
        return tuple(names)
    patterns = [pattern.strip() for pattern in spec.split(",") if pattern.strip()]
    if not patterns:
        raise MimicfilterError("--mimic-layers is empty", hint=f"a preset ({', '.join(presets)}) or parameter globs")
    selected = []
    for pattern in patterns:
        matches = [name for name in all_names if fnmatch.fnmatchcase(name, pattern)]
        if not matches:
            raise MimicfilterError(
                f"--mimic-layers: {pattern!r} matches no parameter",
                hint=f"presets: {', '.join(presets)}; parameters look like {', '.join(all_names[-3:])}",
            )
        selected.extend(name for name in matches if name not in selected)
    return tuple(selected)


def reinitialise(model: nn.Module, names: tuple[str, ...], seed: int) -> None:
    """Replace the named parameters by seeded Gaussian noise with each tensor's own scale.

    Uses a private generator so the result depends on ``seed`` only, not on global RNG state.
    """
    generator = torch.Generator().manual_seed(seed)
    parameters = dict(model.named_parameters())
    with torch.no_grad():
        for name in names:
            parameter = parameters[name]
            scale = parameter.detach().double().std().item() if parameter.numel() > 1 else 1.0
            noise = torch.randn(parameter.shape, generator=generator, dtype=torch.float64) * (scale or 0.02)
            parameter.copy_(noise.to(parameter.dtype))


def _layers_to_reinitialise(mimic_layers: tuple[str, ...]) -> tuple[str, ...]:
    """Re-initialise one tower only, so the proxy's image and text spaces stay related.

    With both projections re-initialised the proxy starts with unrelated embedding spaces and
    its scores are noise; anchoring the text side keeps it meaningful (DESIGN.md §1).
    """
    image_side = tuple(name for name in mimic_layers if is_image_parameter(name))
    return image_side or mimic_layers


def parameters_of(model: nn.Module, names: tuple[str, ...]) -> dict[str, torch.Tensor]:
    parameters = dict(model.named_parameters())
    return {name: parameters[name] for name in names}


def _read_classnames(path: str) -> list[str]:
    try:
        names = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as error:
        raise MimicfilterError(f"cannot read class names {path}: {error}", hint="one class name per line") from error
    if len(names) < 2:
        raise MimicfilterError(f"class-name file {path} lists {len(names)} class(es)", hint="one class name per line")
    return names


def zero_shot_head(clip: nn.Module, tokenizer: Callable, classnames: list[str], templates=ZERO_SHOT_TEMPLATES) -> torch.Tensor:
    """Class embeddings from the reference text tower: mean of normalised prompt embeddings."""
    rows = []
    with torch.no_grad():
        for name in classnames:
            prompts = tokenizer([template.format(name) for template in templates])
            embedding = F.normalize(clip.encode_text(prompts), dim=-1).mean(dim=0)
            rows.append(F.normalize(embedding, dim=0))
    return torch.stack(rows)


def _load_reference_head(path: str, trust: bool) -> dict[str, torch.Tensor]:
    """A trained head: a state dict with ``weight`` [C, D], optional ``bias`` [C] and ``logit_scale``."""
    file = Path(path)
    if not file.is_file():
        raise MimicfilterError(f"reference head {path} does not exist", hint="check the path")
    try:
        state = open_clip.factory.load_state_dict(str(file), weights_only=not trust)
    except Exception as error:
        raise MimicfilterError(f"cannot read reference head {path}: {type(error).__name__}: {error}") from error
    if "weight" not in state or state["weight"].ndim != 2:
        raise MimicfilterError(f"reference head {path} has no 2-D 'weight'", hint="save {'weight': [C, D], 'bias': [C]}")
    return state


@dataclass
class _Classifiers:
    reference: ImageClassifier
    proxy: ImageClassifier
    head_info: dict


def _build_classifiers(spec: ModelSpec, reference: nn.Module, proxy_clip: nn.Module | None, tokenizer) -> _Classifiers:
    if spec.reference_head:
        state = _load_reference_head(spec.reference_head, spec.trust_checkpoint)
        weight, bias = state["weight"].float(), state.get("bias")
        scale = float(state["logit_scale"]) if "logit_scale" in state else reference.logit_scale.exp().item()
        head_info = {"source": "checkpoint", "path": spec.reference_head, "sha256": sha256_of_file(Path(spec.reference_head))}
    else:
        classnames = _read_classnames(spec.classnames)
        weight, bias = zero_shot_head(reference, tokenizer, classnames), None
        scale = reference.logit_scale.exp().item()
        head_info = {"source": "zero-shot", "classnames": classnames, "templates": list(ZERO_SHOT_TEMPLATES)}
    embed_dim = getattr(reference.visual, "output_dim", None)
    if embed_dim is None:
        with torch.no_grad():
            embed_dim = reference.visual(torch.zeros(1, 3, *_image_size(reference))).shape[-1]
    if weight.shape[1] != embed_dim:
        raise MimicfilterError(
            f"reference head weight {tuple(weight.shape)} does not fit image features of size {embed_dim}",
            hint="the head must be [classes, embed_dim]",
        )
    reference_classifier = ImageClassifier(reference.visual, weight, bias, scale)
    proxy_visual = copy.deepcopy((proxy_clip or reference).visual)
    proxy_classifier = ImageClassifier(proxy_visual, weight, bias, scale)
    return _Classifiers(reference=reference_classifier, proxy=proxy_classifier, head_info=head_info)


def _image_size(clip: nn.Module) -> tuple[int, int]:
    size = getattr(clip.visual, "image_size", 224)
    return tuple(size) if isinstance(size, (tuple, list)) else (size, size)


def load_models(spec: ModelSpec) -> LoadedModels:
    """Build reference and proxy, select mimic layers, compute V; every check before any data is read."""
    device = torch.device(spec.device)
    architecture = _resolve_architecture(spec.model)
    built_reference = _instantiate(architecture, spec.reference, "reference", spec.trust_checkpoint)
    reference = built_reference.model
    built_proxy = _instantiate(architecture, spec.proxy, "proxy", spec.trust_checkpoint) if spec.proxy else None
    proxy = built_proxy.model if built_proxy else None
    extra_info = {}
    if spec.task == "classify":
        classifiers = _build_classifiers(spec, reference, proxy, built_reference.tokenizer)
        reference, proxy, extra_info["reference_head"] = classifiers.reference, classifiers.proxy, classifiers.head_info
    mimic_layers = select_mimic_layers(reference, spec.layers)
    if built_proxy is not None and not (spec.task == "classify" and _touches_head(mimic_layers)):
        proxy_info = built_proxy.weights
    else:
        proxy = copy.deepcopy(reference) if proxy is None else proxy
        reinitialised = _layers_to_reinitialise(mimic_layers)
        reinitialise(proxy, reinitialised, spec.seed)
        proxy_info = {
            **(built_proxy.weights if built_proxy else {"source": "reference"}),
            "reinitialised_layers": list(reinitialised),
            "seed": spec.seed,
        }
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
    )


def _touches_head(mimic_layers: tuple[str, ...]) -> bool:
    """A classifier head is never in a proxy checkpoint, so mimicking it needs a re-initialised one."""
    return any(name.startswith("head.") for name in mimic_layers)
