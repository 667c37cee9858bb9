import os
import sys
import tempfile
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


@pytest.fixture(autouse=True, scope="session")
def scratch_tempdir(tmp_path_factory):
    """The temporary files of the code under test, and of every process it starts, go to this session's
    scratch instead of the machine's temporary directory: tests touch only their own paths, even when a
    test kills a run before it removes its DuckDB spill directory."""
    scratch = tmp_path_factory.mktemp("tempdir")
    previous = os.environ.get("TMPDIR")
    os.environ["TMPDIR"] = str(scratch)
    tempfile.tempdir = None  # gettempdir() caches its first answer; forget it so TMPDIR is read again
    yield scratch
    if previous is None:
        os.environ.pop("TMPDIR", None)
    else:
        os.environ["TMPDIR"] = previous
    tempfile.tempdir = None


@pytest.fixture
def tiny_config(tmp_path) -> Path:
    """Path to a tiny open_clip CLIP config (JSON): builds in milliseconds, no weights needed."""
    return write_tiny_config(tmp_path / "tiny-clip.json")


@pytest.fixture
def reference_checkpoint(tmp_path) -> Path:
    """A random tiny CLIP state dict standing in for a pretrained reference."""
    from helpers import write_random_checkpoint

    return write_random_checkpoint(tmp_path / "reference.pt")
