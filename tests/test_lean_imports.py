"""open_clip without timm and huggingface_hub until a model needs them (mimicfilter.lean_imports).

Each check runs in a fresh interpreter: what a process imported first decides what open_clip binds.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

from helpers import TINY_CLIP_CONFIG

ROOT = Path(__file__).resolve().parent.parent


def run_python(code: str, cwd: Path, **environment: str) -> None:
    environment = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "HOME": str(cwd),
                   **environment}
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, capture_output=True, text=True,
                            env=environment, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


def test_open_clip_comes_without_timm_and_the_hub_until_required(tmp_path):
    run_python("""
        import sys
        from mimicfilter.lean_imports import import_open_clip, require
        open_clip = import_open_clip()
        assert "timm" not in sys.modules and "huggingface_hub" not in sys.modules
        assert open_clip.timm_model.timm is None and open_clip.pretrained._has_hf_hub is False
        assert open_clip.create_model("ViT-B-32", device="meta") is not None  # built-in towers need neither

        require("huggingface_hub")
        assert open_clip.pretrained._has_hf_hub and open_clip.pretrained.hf_hub_download is not None
        assert open_clip.pretrained.has_hf_hub(necessary=True)
        require("timm")
        import timm
        assert open_clip.timm_model.timm is timm
        timm_model = open_clip.timm_model.TimmModel
        require("timm")  # a second call runs nothing again
        assert open_clip.timm_model.timm is timm and open_clip.timm_model.TimmModel is timm_model
    """, tmp_path)


def test_nothing_is_hidden_from_a_process_that_imported_it_first(tmp_path):
    run_python("""
        import sys
        import timm
        from mimicfilter.lean_imports import import_open_clip
        open_clip = import_open_clip()
        assert open_clip.timm_model.timm is timm
    """, tmp_path)


def test_the_factory_brings_timm_back_for_a_timm_tower(tmp_path):
    config = {**TINY_CLIP_CONFIG, "vision_cfg": {"timm_model_name": "test_vit", "timm_model_pretrained": False,
                                                 "timm_pool": "", "timm_proj": "linear", "image_size": 160}}
    (tmp_path / "timm-clip.json").write_text(json.dumps(config))
    run_python("""
        import sys
        import torch
        from mimicfilter.mimic.architectures import instantiate, preview_preprocessing, resolve_architecture, open_clip
        architecture = resolve_architecture("timm-clip.json")
        assert "timm" not in sys.modules
        preview = preview_preprocessing(architecture, "weights.pt")
        assert preview is not None and preview[0]["size"] == (160, 160), preview
        with architecture.factory_name() as name:
            torch.save(open_clip.create_model(name).state_dict(), "weights.pt")
        built = instantiate(architecture, "weights.pt", "reference", trust=False)
        assert type(built.model.visual).__name__ == "TimmModel"
    """, tmp_path)


def test_a_pretrained_tag_brings_the_hub_back(tmp_path):
    snapshot = tmp_path / "hf" / "hub" / "models--timm--vit_base_patch32_clip_224.openai" / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "open_clip_pytorch_model.bin").write_bytes(b"not weights")  # found in the cache, then refused
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("a" * 40)
    run_python("""
        from mimicfilter.errors import MimicfilterError
        from mimicfilter.mimic.architectures import instantiate, resolve_architecture, open_clip
        assert open_clip.pretrained._has_hf_hub is False
        try:
            instantiate(resolve_architecture("ViT-B-32"), "openai", "reference", False)
        except MimicfilterError as error:
            message = str(error)
        assert "could not fetch pretrained weights ViT-B-32/openai" in message, message
        assert "hub" not in message.split(": ", 1)[1].lower(), message  # not "huggingface_hub not installed"
        assert open_clip.pretrained._has_hf_hub is True
    """, tmp_path, HF_HOME=str(tmp_path / "hf"))
