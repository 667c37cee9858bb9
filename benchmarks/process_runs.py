"""Whole processes of the input-path benchmarks: `mimicfilter score` against the plain script
(benchmarks/plain_forward.py) on the same shards, alternating, and the models they run.

Used by benchmarks/bench_input.py (``--only process``, ``startup``, ``agreement``) and
benchmarks/gpu/bench_gpu.py.
"""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT

TINY_224 = {"embed_dim": 64,
            "vision_cfg": {"image_size": 224, "layers": 2, "width": 64, "head_width": 32, "patch_size": 32},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}


def write_model(directory: Path, config: dict | None, name: str = "ViT-B-32") -> tuple[str, str]:
    """(model argument, checkpoint) with random weights: a JSON config, or an open_clip name."""
    import open_clip
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(0)
    if config is None:
        model, model_arg = open_clip.create_model(name), name
    else:
        model_arg = str(directory / "model.json")
        Path(model_arg).write_text(json.dumps(config))
        with tempfile.TemporaryDirectory() as config_dir:
            (Path(config_dir) / "open_clip_config.json").write_text(json.dumps({"model_cfg": config, "preprocess_cfg": {}}))
            model = open_clip.create_model(f"local-dir:{config_dir}")
    checkpoint = str(directory / f"{Path(model_arg).stem}.safetensors")
    save_file({key: value.contiguous() for key, value in model.state_dict().items()}, checkpoint)
    return model_arg, checkpoint


def run_process(command: list[str], env: dict | None = None, cwd: Path | None = None) -> tuple[float, str]:
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=cwd)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command[:4])}… failed:\n{result.stderr[-2000:]}")
    return wall, result.stdout


def score_command(shards, model, checkpoint, out, train, workers, batch_size, device, extra=()) -> list[str]:
    return [sys.executable, "-m", "mimicfilter", "score", *shards, "--model", model, "--reference", checkpoint,
            "--out", str(out), "--train", train, "--workers", str(workers), "--batch-size", str(batch_size),
            "--device", device, "--overwrite", "--quiet", "--json", *extra]


def processes(shards, model, checkpoint, scratch: Path, rounds: int, workers: int, batch_size: int, device: str,
              modes=("plain", "none", "head"), extra: tuple[str, ...] = ()) -> dict:
    """Whole processes, alternating in every round: the plain script (benchmarks/plain_forward.py),
    ``score --train none`` and ``--train head``; walls, samples/s and the ratios (best and median)."""
    plain = [sys.executable, str(Path(__file__).with_name("plain_forward.py")), *shards, "--model", model,
             "--checkpoint", checkpoint, "--workers", str(workers), "--batch-size", str(batch_size), "--device", device]
    walls: dict[str, list[float]] = {mode: [] for mode in modes}
    samples = {}
    for _ in range(rounds):
        for mode in modes:
            if mode == "plain":
                wall, out = run_process(plain)
                samples[mode] = json.loads(out)["samples"]
            else:
                out_dir = scratch / f"run-{mode}"
                shutil.rmtree(out_dir, ignore_errors=True)  # a first run each round, as a user's
                wall, out = run_process(score_command(shards, model, checkpoint, out_dir, mode,
                                                      workers, batch_size, device, extra), cwd=ROOT)
                samples[mode] = json.loads(out)["rows"]
            walls[mode].append(wall)
    rates = {mode: samples[mode] / min(walls[mode]) for mode in modes}
    medians = {mode: statistics.median(walls[mode]) for mode in modes}
    result = {mode: {"samples": samples[mode], "walls_s": [round(wall, 2) for wall in walls[mode]],
                     "best_wall_s": round(min(walls[mode]), 2), "median_wall_s": round(medians[mode], 2),
                     "samples_per_s_whole_process": round(rates[mode], 1)} for mode in modes}
    # best of the rounds, and the median (the best alone rewards one lucky round on a shared machine)
    if "plain" in rates and "none" in rates:
        result["score --train none / plain script"] = round(rates["none"] / rates["plain"], 3)
        result["score --train none / plain script, medians"] = round(medians["plain"] / medians["none"], 3)
    if "none" in rates and "head" in rates:
        result["score --train head / --train none"] = round(rates["head"] / rates["none"], 3)
        result["score --train head / --train none, medians"] = round(medians["none"] / medians["head"], 3)
    return result
