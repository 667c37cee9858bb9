"""The CUDA path (bf16 towers, float32 JVP, pinned memory): runs only where a GPU is present."""

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import image_text_samples, write_tar

from mimicfilter.store.parts import read_scores
from mimicfilter_cli.main import cli

pytestmark = pytest.mark.gpu


def run(shard, tiny_config, reference_checkpoint, out, device, *extra):
    args = ["score", str(shard), "--model", str(tiny_config), "--reference", str(reference_checkpoint),
            "--out", str(out), "--batch-size", "8", "--train", "none", "--quiet", "--device", device, *extra]
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return read_scores(out)


def test_cuda_scores_agree_with_cpu(tmp_path, tiny_config, reference_checkpoint):
    shard = write_tar(tmp_path / "pool.tar", image_text_samples(32))
    cpu = run(shard, tiny_config, reference_checkpoint, tmp_path / "cpu", "cpu")
    gpu = run(shard, tiny_config, reference_checkpoint, tmp_path / "gpu", "cuda:0", "--workers", "1")
    assert gpu.column("key").equals(cpu.column("key"))
    cpu_scores = np.array(cpu.column("mimic_score").to_pylist())
    gpu_scores = np.array(gpu.column("mimic_score").to_pylist())
    # bf16 towers: the scores agree to bf16 rounding, and rank the samples the same way
    assert np.abs(gpu_scores - cpu_scores).max() <= 0.05 * np.abs(cpu_scores).max()
    assert np.corrcoef(np.argsort(np.argsort(cpu_scores)), np.argsort(np.argsort(gpu_scores)))[0, 1] > 0.98


def test_cuda_trajectory_runs(tmp_path, tiny_config, reference_checkpoint):
    shard = write_tar(tmp_path / "pool.tar", image_text_samples(16))
    args = ["score", str(shard), "--model", str(tiny_config), "--reference", str(reference_checkpoint),
            "--out", str(tmp_path / "traj"), "--batch-size", "8", "--train", "head", "--epochs", "2", "--quiet",
            "--device", "cuda"]
    assert CliRunner().invoke(cli, args, catch_exceptions=False).exit_code == 0
    table = read_scores(tmp_path / "traj")
    assert table.num_rows == 32 and table.column("mimic_score").null_count == 0
