"""GPU throughput in one script: ViT-B-32 ``score --train none``, ``score --train head`` and a plain
forward-only CLIP-score script, on the same synthetic 256×256 JPEG shards, whole processes,
alternating; prints samples/s and the ratios (targets: static ≥ 0.95× the plain script and
≥ 5,000 samples/s; head ≥ 0.9× static).

Self-contained: the shards are synthesised here (no photos, no network on the GPU machine) and the
plain script is benchmarks/plain_forward.py (run by benchmarks/process_runs.py). See benchmarks/gpu/README.md for carrying the wheels.

    python benchmarks/gpu/bench_gpu.py                                 # H200: 32 shards x 1024, 14 workers, B=512
    python benchmarks/gpu/bench_gpu.py --device cpu --tiny --shards 2 --per-shard 64 --workers 2 --batch-size 32
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # benchmarks/, one folder up
from common import write_tar  # noqa: E402
from process_runs import TINY_224, processes, write_model  # noqa: E402


def synthetic_shards(out: Path, shards: int, per_shard: int, size: int = 256) -> list[str]:
    """Photo-like JPEGs (smooth colour fields + noise + shapes), quality 90, with captions."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(0)

    def sample(shard: int, i: int) -> tuple[str, dict[str, bytes]]:
        y, x = np.mgrid[0:size, 0:size] / size
        colours = rng.uniform(0, 255, (3, 3))
        base = np.stack([colours[c, 0] * x + colours[c, 1] * y + colours[c, 2] * (1 - x) for c in range(3)], -1)
        pixels = (base / 2 + rng.normal(0, 10, base.shape)).clip(0, 255).astype(np.uint8)
        image = Image.fromarray(pixels)
        draw = ImageDraw.Draw(image)
        for _ in range(3):
            box = sorted(rng.integers(0, size, 2)), sorted(rng.integers(0, size, 2))
            draw.ellipse([box[0][0], box[1][0], box[0][1], box[1][1]], fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=90)
        return f"{shard:05d}{i:06d}", {"jpg": buffer.getvalue(), "txt": f"a picture of shapes number {i}".encode()}

    return [str(write_tar(out / f"synthetic-{shard:05d}.tar", (sample(shard, i) for i in range(per_shard))))
            for shard in range(shards)]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=int, default=32)
    parser.add_argument("--per-shard", type=int, default=1024)
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 2))
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="a tiny 224-px model instead of ViT-B-32 (CPU check)")
    parser.add_argument("--decoder", default="fast", help="mimicfilter --decoder for the score runs (fast or gpu)")
    parser.add_argument("--scratch", default=None, help="where shards and runs go [default: a temp dir]")
    args = parser.parse_args(argv)
    import torch

    scratch = Path(args.scratch or tempfile.mkdtemp(prefix="mimicfilter-gpu-bench-"))
    shards = synthetic_shards(scratch / "shards", args.shards, args.per_shard)
    model, checkpoint = write_model(scratch, TINY_224 if args.tiny else None, "ViT-B-32")
    # the score runs use --decoder; the plain script decodes with PIL, as such scripts do
    result = processes(shards, model, checkpoint, scratch, args.rounds, args.workers, args.batch_size,
                                   args.device, extra=("--decoder", args.decoder))
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    print(json.dumps({"machine": f"{platform.machine()}, {os.cpu_count()} cores, GPU {gpu}, torch {torch.__version__}",
                      "model": "tiny 224-px" if args.tiny else "ViT-B-32 (random weights)",
                      "samples": args.shards * args.per_shard, "workers": args.workers,
                      "batch_size": args.batch_size, "decoder": args.decoder, **result}, indent=2))


if __name__ == "__main__":
    main()
