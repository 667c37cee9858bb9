"""One open_clip model from an architecture and its weights: :func:`resolve_architecture` turns a
built-in name or a JSON config into an :class:`Architecture`, and :func:`instantiate` builds it
through open_clip's factory with weights from a pretrained tag or a local checkpoint
(``weights_only=True`` unless the user trusts them), paired with its preprocessing and tokenizer.
Reference and proxy are made from these by :mod:`mimicfilter.mimic.models`."""

from __future__ import annotations

import contextlib
import copy
import importlib
import json
import logging
import pickle
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn

from mimicfilter.checksums import sha256_of_file, start_hashing
from mimicfilter.errors import MimicfilterError, one_line
from mimicfilter.lean_imports import import_open_clip, require
from mimicfilter.mimic.hub import pretrained_access, suggest_models
from mimicfilter.store.scratch import scratch_directory
from mimicfilter.timing import phase

open_clip = import_open_clip()  # without timm and huggingface_hub until a model needs them (lean_imports)

CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")


@contextlib.contextmanager
def _skip_weight_init() -> Iterator[None]:
    """Build modules without their random initialisation: a strict checkpoint load overwrites every
    parameter and persistent buffer right after, so those seconds would be wasted (non-persistent
    buffers such as attention masks are computed by plain tensor ops and stay correct).

    torch.nn.init's functions are replaced where torch and open_clip modules call them from:
    ``torch.nn.init`` itself and every module that imported one by name (``MultiheadAttention``
    takes ``xavier_uniform_`` that way: 0.3 s of ViT-B-32's build otherwise)."""
    initialisers = {id(function): function for name in dir(torch.nn.init)
                    if name.endswith("_") and not name.startswith("_") and callable(function := getattr(torch.nn.init, name))}
    saved = []  # (namespace, attribute, original)
    for module_name, module in list(sys.modules.items()):
        if module is not None and module_name.startswith(("torch.nn", "open_clip")):
            saved += [(module, attribute, value) for attribute, value in list(vars(module).items())
                      if initialisers.get(id(value)) is value]

    def skip(tensor, *args, **kwargs):
        return tensor

    for module, attribute, _ in saved:
        setattr(module, attribute, skip)
    try:
        yield
    finally:
        for module, attribute, original in saved:
            setattr(module, attribute, original)


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
    if not isinstance(model_cfg, dict) or not isinstance(config.get("preprocess_cfg", {}), dict):
        raise MimicfilterError(f"model config {path}: model_cfg and preprocess_cfg must be JSON objects")
    missing = [key for key in ("embed_dim", "vision_cfg", "text_cfg") if key not in model_cfg]
    if missing:
        raise MimicfilterError(
            f"model config {path} lacks {', '.join(missing)}",
            hint="a config is an open_clip model_cfg: {embed_dim, vision_cfg, text_cfg}",
        )
    for tower in ("vision_cfg", "text_cfg"):
        if not isinstance(model_cfg[tower], dict):
            raise MimicfilterError(f"model config {path}: {tower} must be a JSON object", hint="fix the JSON config")
    _check_sizes(path, model_cfg)
    return config


def _check_sizes(path: Path, model_cfg: dict) -> None:
    """Sizes and counts in a config must be positive integers: open_clip would fail deep inside torch."""
    def walk(value, where: str):
        if isinstance(value, dict):
            for key, item in value.items():
                yield from walk(item, f"{where}.{key}" if where else key)
        else:
            yield where, value

    sized = ("embed_dim", "width", "layers", "heads", "head_width", "patch_size", "image_size", "context_length",
             "vocab_size")
    for where, value in walk(model_cfg, ""):
        if where.rsplit(".", 1)[-1] not in sized:
            continue
        values = value if isinstance(value, list) and where.endswith(("layers", "image_size", "patch_size")) else [value]
        if not all(isinstance(item, int) and not isinstance(item, bool) and item > 0 for item in values):
            raise MimicfilterError(f"model config {path}: {where} = {one_line(repr(value), 60)} is not a positive integer",
                                   hint="fix the JSON config (an open_clip model_cfg)")


def is_local_checkpoint(source: str) -> bool:
    return Path(source).suffix.lower() in CHECKPOINT_SUFFIXES or Path(source).is_file()


@dataclass
class BuiltModel:
    """One model with the preprocessing and tokenizer open_clip's factory paired with it."""

    model: nn.Module
    preprocess: Callable
    tokenizer: Callable
    weights: dict = field(default_factory=dict)  # where the weights came from, for run.json
    preprocess_cfg: dict = field(default_factory=dict)  # open_clip's PreprocessCfg of the model, as a dict


@contextlib.contextmanager
def _quiet_factory() -> Iterator[None]:
    """open_clip logs a warning whenever it builds a model without weights; we load them ourselves."""
    factory_logger = logging.getLogger()
    previous_level = factory_logger.level
    factory_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        factory_logger.setLevel(previous_level)


_TOKENIZERS: dict[str, Callable] = {}  # architecture key -> tokenizer: built once, shared by models and decoder


def _tokenizer(factory_name: str, architecture: Architecture) -> Callable:
    """open_clip's tokenizer for the architecture, built once. The plain BPE tokenizer most models
    use is a copy of the one open_clip built at import, with the model's context length (parsing
    its 49,000 merges again took 0.13 s of start-up); HF, SigLIP and customised tokenizers come from
    ``open_clip.get_tokenizer``, which decides the same way."""
    if architecture.key not in _TOKENIZERS:
        text_cfg = architecture.model_cfg.get("text_cfg") or {}
        customised = text_cfg.get("hf_tokenizer_name") or text_cfg.get("tokenizer_kwargs")
        if customised or "siglip" in architecture.name.lower():
            tokenizer = open_clip.get_tokenizer(factory_name)
        else:
            module = importlib.import_module("open_clip.tokenizer")
            tokenizer = copy.copy(module._tokenizer)  # shares the vocabulary and the BPE cache, read-only
            tokenizer.context_length = text_cfg.get("context_length", module.DEFAULT_CONTEXT_LENGTH)
        _TOKENIZERS[architecture.key] = tokenizer
    return _TOKENIZERS[architecture.key]


def _build_from_factory(factory_name: str, pretrained: str | None, architecture: Architecture,
                        checkpoint_follows: bool = False) -> BuiltModel:
    """open_clip's factory pairs the model with its preprocessing and tokenizer."""
    with _quiet_factory():
        with phase("build the architecture"), (_skip_weight_init() if checkpoint_follows else contextlib.nullcontext()):
            model, _, preprocess = open_clip.create_model_and_transforms(factory_name, pretrained=pretrained)
        tokenizer = _tokenizer(factory_name, architecture)
    preprocess_cfg = dict(getattr(model.visual, "preprocess_cfg", None) or {})
    return BuiltModel(model=model, preprocess=preprocess, tokenizer=tokenizer, preprocess_cfg=preprocess_cfg)


def checkpoint_kind(path: Path) -> str | None:
    """What a file given as a checkpoint is, from its first bytes, when it is plainly not one."""
    with open(path, "rb") as handle:
        head = handle.read(64)
    if head.lstrip()[:1] in (b"{", b"["):
        return "a JSON file, not a checkpoint (a JSON model config goes to --model)"
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80" or path.suffix.lower() == ".safetensors":
        return None  # torch zip / pickle, or safetensors (checked by its loader)
    if not head or all(32 <= byte < 127 or byte in (9, 10, 13) for byte in head):
        return "a text file, not a checkpoint"
    return None


def load_checkpoint(model: nn.Module, path: Path, role: str, trust: bool) -> None:
    """Load a local state dict (or an open_clip_train checkpoint) into ``model``, strictly, with one-line errors."""
    if not path.is_file():
        raise MimicfilterError(f"{role} checkpoint {path} does not exist", hint="check the path")
    if (kind := checkpoint_kind(path)) is not None:
        raise MimicfilterError(f"{role} {path} is {kind}", hint="pass a .pt/.bin state dict or a .safetensors file")
    try:
        open_clip.load_checkpoint(model, str(path), strict=True, weights_only=not trust)
    except pickle.UnpicklingError as error:
        raise MimicfilterError(
            f"{role} checkpoint {path} is a full pickle, not a plain state dict",
            hint="pass --trust-checkpoint only if you trust its author (unpickling can run code)",
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

    @property
    def key(self) -> str:
        return self.name if self.json_config is None else json.dumps(self.json_config, sort_keys=True)

    @property
    def model_cfg(self) -> dict:
        """open_clip's model_cfg: the JSON config's, or the built-in one (a copy)."""
        return (self.json_config or {}).get("model_cfg") or open_clip.get_model_config(self.name) or {}

    def prepare_towers(self) -> None:
        """Import timm when the image tower is a timm model (left out of open_clip's import: lean_imports)."""
        vision_cfg = self.model_cfg.get("vision_cfg")
        if isinstance(vision_cfg, dict) and vision_cfg.get("timm_model_name"):
            require("timm")

    @contextlib.contextmanager
    def factory_name(self, checkpoint: Path | None = None) -> Iterator[str]:
        """The name open_clip's factory takes: the built-in name, or ``local-dir:`` of a temp dir
        holding the JSON config for as long as the block runs (with ``checkpoint`` linked beside
        it, where open_clip looks for a config directory's weights: it ignores ``pretrained`` there)."""
        if self.json_config is None:
            yield self.name
            return
        with scratch_directory("config") as config_dir:
            (Path(config_dir) / "open_clip_config.json").write_text(json.dumps(self.json_config))
            if checkpoint is not None:
                name = "open_clip_model.safetensors" if checkpoint.suffix.lower() == ".safetensors" else \
                    "open_clip_pytorch_model.bin"
                (Path(config_dir) / name).symlink_to(checkpoint.resolve())
            yield f"local-dir:{config_dir}"


def names_config_file(model: str) -> bool:
    """Whether ``--model`` names a JSON config file (rather than an architecture)."""
    path = Path(model)
    return path.suffix.lower() == ".json" or path.is_file()


def resolve_architecture(model: str) -> Architecture:
    path = Path(model)
    if names_config_file(model):
        if not path.is_file():
            raise MimicfilterError(f"model config {model} does not exist", hint="check the path")
        return Architecture(name=model, json_config=_read_json_config(path))
    if model.replace("/", "-") not in open_clip.list_models():
        close = suggest_models(model)
        raise MimicfilterError(
            f"unknown model {model!r}" + (f"; did you mean {' or '.join(close)}?" if close else ""),
            hint="an open_clip architecture name (open_clip.list_models(): ViT-B-32, RN50, …) or a JSON config path",
        )
    return Architecture(name=model, json_config=None)


def instantiate(architecture: Architecture, source: str, role: str, trust: bool) -> BuiltModel:
    """Build one model and load its weights from a pretrained tag or a local checkpoint."""
    architecture.prepare_towers()
    local = is_local_checkpoint(source)
    path = Path(source)
    if local:
        start_hashing(path)  # under way already when score started it before its imports; waited for below
    if architecture.json_config is not None:
        if not local:
            raise MimicfilterError(
                f"{role} {source!r} is not a checkpoint file",
                hint="a JSON model config needs a local .pt/.bin/.safetensors checkpoint",
            )
        with architecture.factory_name() as factory_name:
            try:
                built = _build_from_factory(factory_name, None, architecture, checkpoint_follows=path.is_file())
            except (TypeError, ValueError, KeyError, AttributeError, RuntimeError, AssertionError,
                    ZeroDivisionError) as error:
                raise MimicfilterError(
                    one_line(f"model config {architecture.name} cannot be built: {type(error).__name__}: {error}"),
                    hint="check the config's sizes and types (an open_clip model_cfg)") from None
    elif local:
        built = _build_from_factory(architecture.name, None, architecture, checkpoint_follows=path.is_file())
    else:
        tags = _pretrained_tags(architecture.name)
        if source not in tags:
            raise MimicfilterError(
                f"{role} {source!r} is neither a checkpoint file nor a pretrained tag of {architecture.name}",
                hint=f"known tags: {', '.join(tags) or 'none'}",
            )
        require("huggingface_hub")  # left out of open_clip's import (lean_imports): tags download through it
        access = pretrained_access(architecture.name, source)  # fails at once when offline and not cached
        try:
            with access:
                built = _build_from_factory(architecture.name, source, architecture)
        except Exception as error:  # the hub download failed: network, auth, cache
            raise MimicfilterError(
                one_line(f"could not fetch pretrained weights {architecture.name}/{source}: {error}"),
                hint="without network access, download the checkpoint elsewhere and pass its path",
            ) from error
        built.weights = {"source": "pretrained", "tag": source}
        return built
    with phase(f"load the {role} checkpoint"):
        load_checkpoint(built.model, path, role, trust)
    with phase(f"hash the {role} checkpoint (rest of)"):
        sha256 = sha256_of_file(path)
    built.weights = {"source": "checkpoint", "path": str(path), "sha256": sha256}
    return built


def preview_preprocessing(architecture: Architecture, source: str) -> tuple[dict, Callable] | None:
    """The preprocessing config and tokenizer :func:`instantiate` will pair with the model, known
    before any weight loads, so decoding can start while the models load; None when they cannot be
    known this way (the run then finds them out by loading the models, as before).

    The architecture is built on the meta device (no memory, no initialisation: ~0.06 s for
    ViT-B-32); a pretrained tag adds its own mean, std and resizing, as open_clip's factory does.
    """
    try:
        architecture.prepare_towers()
        with _quiet_factory(), architecture.factory_name() as factory_name, torch.device("meta"):
            model = open_clip.create_model(factory_name, pretrained=None, device="meta")
            tokenizer = _tokenizer(factory_name, architecture)
        preprocess_cfg = dict(getattr(model.visual, "preprocess_cfg", None) or {})
        if architecture.json_config is None and not is_local_checkpoint(source):
            tag_cfg = open_clip.get_pretrained_cfg(architecture.name, source)
            if not tag_cfg:
                return None
            preprocess_cfg = open_clip.factory.merge_preprocess_dict(preprocess_cfg, tag_cfg)
            preprocess_cfg["size"] = model.visual.image_size
    except Exception:  # any problem is the model loader's to report, in its own words
        return None
    return preprocess_cfg, tokenizer
