import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from helpers import write_tiny_config  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def tiny_config(tmp_path) -> Path:
    """Path to a tiny open_clip CLIP config (JSON): builds in milliseconds, no weights needed."""
    return write_tiny_config(tmp_path / "tiny-clip.json")


@pytest.fixture
def reference_checkpoint(tmp_path) -> Path:
    """A random tiny CLIP state dict standing in for a pretrained reference."""
    from helpers import write_random_checkpoint

    return write_random_checkpoint(tmp_path / "reference.pt")
