"""open_clip imported without the packages only some models need: timm and huggingface_hub.

Start-up is paid by every run (figures in docs/benchmarks.md, "Input path"). ``import open_clip``
imports timm — every timm model definition — for the image towers that name a ``timm_model_name``,
and huggingface_hub (with its HTTP clients) for pretrained tags: together ~0.35 s of start-up
(docs/architecture.md) that a run from a local checkpoint never uses.

:func:`import_open_clip` imports open_clip with both hidden, so open_clip takes its own "not
installed" branch (``timm = None`` in ``open_clip.timm_model``, ``_has_hf_hub = False`` in
``open_clip.pretrained``). :func:`require` imports one of them and runs the open_clip modules that
import it again, after which open_clip holds what a plain ``import open_clip`` would have given it
(functions defined there read those globals at call time). The model factory calls it before
building a timm tower or fetching a pretrained tag; open_clip's trainer gets both.

Nothing is hidden that is already imported: a library user who imported timm or huggingface_hub
first keeps exactly what they had. ``tests/test_lean_imports.py`` checks both ways.

Not deferred, measured: ``torch._dynamo`` (~1.1 s, imported by torchvision). A stand-in would only
move it: ``torchvision.transforms.v2`` (the fast decoder's resize) and ``torch.func.jvp`` (the mimic
score) import it on their first call, in the scoring loop and in every decode worker.
"""

from __future__ import annotations

import importlib
import sys
import types

# package -> the open_clip modules that import it at their own import time
BINDERS: dict[str, tuple[str, ...]] = {
    "timm": ("open_clip.timm_model",),
    "huggingface_hub": ("open_clip.pretrained", "open_clip.push_to_hf_hub"),
}
_hidden: set[str] = set()  # packages open_clip was imported without, in this process


def import_open_clip() -> types.ModuleType:
    """``import open_clip`` without importing timm or huggingface_hub (see :func:`require`)."""
    if (imported := sys.modules.get("open_clip")) is not None:
        return imported
    hidden = {package for package in BINDERS if package not in sys.modules}
    for package in hidden:
        sys.modules[package] = None  # ``import package`` raises ImportError: open_clip's "not installed" path
    try:
        module = importlib.import_module("open_clip")
        _hidden.update(hidden)
        return module
    finally:
        for package in hidden:
            if package in sys.modules and sys.modules[package] is None:
                del sys.modules[package]


def require(package: str) -> None:
    """Import ``package`` (``timm`` or ``huggingface_hub``) and run the open_clip modules that import it
    again, so open_clip binds what it would have bound without :func:`import_open_clip`; nothing to do
    when open_clip was imported with it. A package that is not installed is left for open_clip to
    report, in its own words, when it needs it."""
    import_open_clip()
    if package not in _hidden:
        return
    try:
        importlib.import_module(package)
    except ImportError:
        return
    for module in BINDERS[package]:
        importlib.reload(importlib.import_module(module))
    _hidden.discard(package)
