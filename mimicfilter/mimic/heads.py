"""Classification: an image tower with a linear head, built zero-shot from class names or loaded
from a trained head checkpoint."""

from __future__ import annotations

import copy
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from mimicfilter.checksums import sha256_of_file
from mimicfilter.errors import MimicfilterError, one_line
from mimicfilter.lean_imports import import_open_clip

open_clip = import_open_clip()  # without timm and huggingface_hub until a model needs them (lean_imports)

ZERO_SHOT_TEMPLATES = ("a photo of a {}.", "a picture of a {}.", "an image of a {}.", "a {}.")


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


def label_embeddings(head_weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each label's class embedding: its L2-normalised head row (for a zero-shot head, the class
    prompts' text embedding), the text side of a labelled image's pair embedding."""
    with torch.no_grad():
        return F.normalize(head_weight, dim=-1)[labels.long()]


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
    except pickle.UnpicklingError:
        raise MimicfilterError(f"reference head {path} is a full pickle, not a plain state dict",
                               hint="pass --trust-checkpoint only if you trust its author (unpickling can run code)") from None
    except Exception as error:
        raise MimicfilterError(one_line(f"cannot read reference head {path}: {type(error).__name__}: {error}"),
                               hint="save {'weight': [C, D], 'bias': [C]} with torch.save or safetensors") from None
    if not isinstance(state, dict):
        raise MimicfilterError(f"reference head {path} is not a state dict", hint="save {'weight': [C, D], 'bias': [C]}")
    if not isinstance(state.get("weight"), torch.Tensor) or state["weight"].ndim != 2:
        raise MimicfilterError(f"reference head {path} has no 2-D 'weight'", hint="save {'weight': [C, D], 'bias': [C]}")
    return state


@dataclass
class Classifiers:
    reference: ImageClassifier
    proxy: ImageClassifier
    head_info: dict


def build_classifiers(reference_head: str | None, classnames: str | None, trust: bool, reference: nn.Module,
                      proxy_clip: nn.Module | None, tokenizer) -> Classifiers:
    """Reference and proxy classifiers sharing one head (the proxy's may be re-initialised later)."""
    if reference_head:
        state = _load_reference_head(reference_head, trust)
        weight, bias = state["weight"].float(), state.get("bias")
        scale = float(state["logit_scale"]) if "logit_scale" in state else reference.logit_scale.exp().item()
        head_info = {"source": "checkpoint", "path": reference_head, "sha256": sha256_of_file(Path(reference_head))}
    else:
        classnames = _read_classnames(classnames)
        weight, bias = zero_shot_head(reference, tokenizer, classnames), None
        scale = reference.logit_scale.exp().item()
        head_info = {"source": "zero-shot", "classnames": classnames, "templates": list(ZERO_SHOT_TEMPLATES)}
    embed_dim = getattr(reference.visual, "output_dim", None)
    if embed_dim is None:
        with torch.no_grad():
            embed_dim = reference.visual(torch.zeros(1, 3, *image_size(reference))).shape[-1]
    if weight.shape[1] != embed_dim:
        raise MimicfilterError(
            f"reference head weight {tuple(weight.shape)} does not fit image features of size {embed_dim}",
            hint="the head must be [classes, embed_dim]",
        )
    reference_classifier = ImageClassifier(reference.visual, weight, bias, scale)
    proxy_visual = copy.deepcopy((proxy_clip or reference).visual)
    proxy_classifier = ImageClassifier(proxy_visual, weight, bias, scale)
    return Classifiers(reference=reference_classifier, proxy=proxy_classifier, head_info=head_info)


def head_classes(reference_head: str | None, classnames: str | None, trust: bool) -> int:
    """How many classes the reference head will have (its checkpoint's rows, or the class names)."""
    if reference_head:
        return int(_load_reference_head(reference_head, trust)["weight"].shape[0])
    return len(_read_classnames(classnames))


def image_size(clip: nn.Module) -> tuple[int, int]:
    size = getattr(clip.visual, "image_size", 224)
    return tuple(size) if isinstance(size, (tuple, list)) else (size, size)

