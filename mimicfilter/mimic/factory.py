"""Building models with open_clip's factory: architecture names or JSON configs, pretrained tags or
local checkpoints (``weights_only=True`` unless the user trusts them), and checkpoint hashes."""

from __future__ import annotations

import hashlib
import json
import logging
import pickle
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import open_clip
from torch import nn

from mimicfilter.errors import MimicfilterError

CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")


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
class BuiltModel:
    """One model with the preprocessing and tokenizer open_clip's factory paired with it."""

    model: nn.Module
    preprocess: Callable
    tokenizer: Callable
    weights: dict = field(default_factory=dict)  # where the weights came from, for run.json


def _build_from_factory(factory_name: str, pretrained: str | None) -> BuiltModel:
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
    return BuiltModel(model=model, preprocess=preprocess, tokenizer=tokenizer)


def load_checkpoint(model: nn.Module, path: Path, role: str, trust: bool) -> None:
    """Load a local state dict (or an open_clip_train checkpoint) into ``model``, strictly, with one-line errors."""
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
class Architecture:
    """Where open_clip finds the architecture: a built-in name, or a JSON config in a temp dir."""

    name: str
    json_config: dict | None


def resolve_architecture(model: str) -> Architecture:
    path = Path(model)
    if path.suffix.lower() == ".json" or path.is_file():
        if not path.is_file():
            raise MimicfilterError(f"model config {model} does not exist", hint="check the path")
        return Architecture(name=model, json_config=_read_json_config(path))
    if model.replace("/", "-") not in open_clip.list_models():
        close = [name for name in open_clip.list_models() if model.lower()[:5] in name.lower()][:5]
        raise MimicfilterError(
            f"unknown model {model!r}",
            hint=f"an open_clip architecture such as {', '.join(close or ['ViT-B-32', 'RN50'])}, or a JSON config path",
        )
    return Architecture(name=model, json_config=None)


def instantiate(architecture: Architecture, source: str, role: str, trust: bool) -> BuiltModel:
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
    load_checkpoint(built.model, path, role, trust)
    built.weights = {"source": "checkpoint", "path": str(path), "sha256": sha256_of_file(path)}
    return built

