"""Pretrained tags without a long wait: weights come from the local cache when they are there, and
a machine that cannot reach the hub fails at once, naming the file it would need.

open_clip downloads a tag's weights through huggingface_hub, which retries an unreachable hub for
about a minute, twice per tag (a .safetensors alternative first), printing each warning. Here a
cached file is loaded with the hub switched to offline mode (no request at all); a missing one is
looked for only after one short probe of the hub, and ``HF_HUB_OFFLINE=1`` skips even that.
"""

from __future__ import annotations

import contextlib
import os
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass

from mimicfilter.errors import MimicfilterError, one_line
from mimicfilter.lean_imports import import_open_clip

open_clip = import_open_clip()  # without timm and huggingface_hub until a model needs them (lean_imports)

PROBE_SECONDS = 5.0


@dataclass(frozen=True)
class HubWeights:
    """Where a pretrained tag's weights live: a Hugging Face repo and the files open_clip tries,
    or a plain URL (cached by open_clip in ~/.cache/clip)."""

    repo_id: str | None
    filenames: tuple[str, ...]
    url: str | None

    @property
    def expected(self) -> str:
        if self.repo_id:
            return f"{self.repo_id}/{self.filenames[-1]} (Hugging Face cache)"
        return f"{self.url} (cached as ~/.cache/clip/{os.path.basename(self.url or '')})"

    def fetch_hint(self) -> str:
        fetch = (f"`hf download {self.repo_id} {self.filenames[-1]}`" if self.repo_id else f"download {self.url}")
        return (f"on a machine with network, {fetch} and copy the cache here (HF_HOME), or pass a local checkpoint "
                "path; HF_HUB_OFFLINE=1 fails at once instead of probing the hub")


def hub_weights(architecture: str, tag: str) -> HubWeights:
    from open_clip import pretrained

    config = pretrained.get_pretrained_cfg(architecture, tag) or {}
    hub = config.get("hf_hub") or ""
    if hub and pretrained.has_hf_hub():
        repo_id, filename = os.path.split(hub)  # open_clip's convention: 'org/repo/' means its default file name
        filename = filename or pretrained.HF_WEIGHTS_NAME
        alternatives = tuple(pretrained._get_safe_alternatives(filename)) if pretrained._has_safetensors else ()
        return HubWeights(repo_id.rstrip("/"), (*alternatives, filename), None)
    return HubWeights(None, (), config.get("url") or None)


def _cached(weights: HubWeights) -> bool:
    if weights.repo_id:
        from huggingface_hub import try_to_load_from_cache

        return any(isinstance(try_to_load_from_cache(weights.repo_id, name), str) for name in weights.filenames)
    if weights.url:
        return os.path.isfile(os.path.expanduser(f"~/.cache/clip/{os.path.basename(weights.url)}"))
    return True  # nothing to download (e.g. a tag that names a local file)


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _unreachable(weights: HubWeights) -> str | None:
    """Why the hub (or the weights' URL) cannot be reached, after one short request; None if it can."""
    if weights.repo_id:
        from huggingface_hub import constants

        address = constants.ENDPOINT
    else:
        address = weights.url or ""
    try:
        urllib.request.urlopen(urllib.request.Request(address, method="HEAD"), timeout=PROBE_SECONDS).close()
    except urllib.error.HTTPError:
        return None  # it answered
    except (urllib.error.URLError, OSError, ValueError) as error:
        return one_line(f"{address}: {getattr(error, 'reason', error)}", 160)
    return None


@contextlib.contextmanager
def _hub_offline() -> Iterator[None]:
    """Let huggingface_hub serve cached files without asking the network (it checks this flag per call)."""
    from huggingface_hub import constants

    previous = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = previous


def pretrained_access(architecture: str, tag: str) -> contextlib.AbstractContextManager:
    """A context in which open_clip may load ``architecture``/``tag`` without a long network wait.

    Raises MimicfilterError at once when the weights are not cached and cannot be fetched.
    """
    weights = hub_weights(architecture, tag)
    if _cached(weights):
        return _hub_offline() if weights.repo_id else contextlib.nullcontext()
    where = f"pretrained weights {architecture}/{tag} are not cached (expected {weights.expected})"
    if _offline():
        raise MimicfilterError(f"{where} and HF_HUB_OFFLINE is set", hint=weights.fetch_hint())
    if (problem := _unreachable(weights)) is not None:
        raise MimicfilterError(f"{where} and the hub cannot be reached ({problem})", hint=weights.fetch_hint())
    return contextlib.nullcontext()


def suggest_models(name: str, limit: int = 3) -> list[str]:
    """Architectures a mistyped name probably meant: ``vit-b-32`` and ``ViT-B32`` → ``ViT-B-32``."""
    import difflib

    def squashed(text: str) -> str:
        return "".join(char for char in text.lower() if char.isalnum())

    models = open_clip.list_models()
    exact = [model for model in models if squashed(model) == squashed(name)]
    by_shape = {squashed(model): model for model in models}
    close = [by_shape[match] for match in difflib.get_close_matches(squashed(name), list(by_shape), n=limit, cutoff=0.75)]
    return exact or close
