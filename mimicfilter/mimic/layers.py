"""Mimic layers: the presets, parameter globs, and the seeded re-initialisation of the default proxy
(a copy of the reference that shares its frozen parameters)."""

from __future__ import annotations

import copy
import fnmatch

import torch
from torch import nn

from mimicfilter.defaults import MIMIC_LAYER_PRESETS
from mimicfilter.errors import MimicfilterError

LOGIT_PARAMETERS = ("logit_scale", "logit_bias")


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


# How each preset of defaults.MIMIC_LAYER_PRESETS finds its parameters (same keys, same order).
PRESET_SELECTORS = {
    "image-proj": lambda model: _image_projection(model),
    "text-proj": lambda model: _text_projection(model),
    "both-proj": lambda model: _image_projection(model) + _text_projection(model),
    "image-last-mlp": lambda model: _image_last_mlp(model),
    # The paper's classification code mimics the head's weight only; its bias keeps the reference's value.
    "head": lambda model: [name for name, _ in model.named_parameters() if name == "head.weight"],
    "head+bias": lambda model: [name for name, _ in model.named_parameters() if name.startswith("head.")],
}
assert tuple(PRESET_SELECTORS) == tuple(MIMIC_LAYER_PRESETS)


def select_mimic_layers(model: nn.Module, spec: str) -> tuple[str, ...]:
    """Parameter names for a preset or a comma-separated list of globs over parameter names."""
    presets = PRESET_SELECTORS
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


def layers_to_reinitialise(mimic_layers: tuple[str, ...]) -> tuple[str, ...]:
    """Re-initialise one tower only, so the proxy's image and text spaces stay related.

    With both projections re-initialised the proxy starts with unrelated embedding spaces and
    its scores are noise; anchoring the text side keeps it meaningful (DESIGN.md §1).
    """
    image_side = tuple(name for name in mimic_layers if is_image_parameter(name))
    return image_side or mimic_layers


def parameters_of(model: nn.Module, names: tuple[str, ...]) -> dict[str, torch.Tensor]:
    parameters = dict(model.named_parameters())
    return {name: parameters[name] for name in names}


def touches_head(mimic_layers: tuple[str, ...]) -> bool:
    """A classifier head is never in a proxy checkpoint, so mimicking it needs a re-initialised one."""
    return any(name.startswith("head.") for name in mimic_layers)


def copy_sharing_frozen(model: nn.Module, own: tuple[str, ...]) -> nn.Module:
    """A deep copy of ``model`` with its own tensors for the parameters named in ``own`` (the mimic
    layers) and the original's tensors for every other one, which neither model ever changes
    (models are frozen; only the mimic layers train, until :func:`unshare_parameters`). Saves a
    model's memory and the copy: ~0.3 s of start-up for ViT-B-32 on a CPU core."""
    own_names = set(own)
    shared = {id(parameter): parameter for name, parameter in model.named_parameters() if name not in own_names}
    return copy.deepcopy(model, memo=shared)  # deepcopy returns what the memo holds for those objects


def unshare_parameters(model: nn.Module, other: nn.Module) -> None:
    """Give ``model`` its own copy of every parameter it shares with ``other`` (before its whole
    trunk trains); a parameter tied to several modules stays tied."""
    theirs = {id(parameter) for parameter in other.parameters()}
    clones: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, parameter in list(module.named_parameters(recurse=False)):
            if id(parameter) in theirs:
                if id(parameter) not in clones:
                    clones[id(parameter)] = nn.Parameter(parameter.detach().clone(),
                                                         requires_grad=parameter.requires_grad)
                setattr(module, name, clones[id(parameter)])
