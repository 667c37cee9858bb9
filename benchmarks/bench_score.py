"""Static scoring speed, as ratios measured in one run.

1. Pipeline: ``mimicfilter score --train none`` throughput divided by a forward-only pass that
   computes just the reference CLIP scores, on the same shards, model, batch size and reader
   (target >= 0.9: the mimic score should cost next to nothing over the CLIP-score baseline).
2. Head math: the mimic scores of one batch by our single JVP versus the official-style route
   (torch.func vmap(grad) per-sample gradients + a dot-product loop) at B=256 with ViT-B-32 head
   shapes, 768 -> 512 (target >= 20x).

Usage:
    python benchmarks/bench_score.py                       # ViT-B-32 (random weights) on demo/shards
    python benchmarks/bench_score.py --model demo/tiny-clip.json --reference demo/reference.safetensors
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import tempfile
import time
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from torch.func import grad, vmap

from mimicfilter.execute.local import OrderedPool
from mimicfilter.mimic.models import load_models_on_device
from mimicfilter.mimic.jvp import mimic_direction, mimic_scores
from mimicfilter.mimic.losses import contrastive_per_sample_loss
from mimicfilter.mimic.models import ModelSpec
from mimicfilter.pipeline.config import ScoreConfig
from mimicfilter.pipeline.run import run_score
from mimicfilter.pipeline.decoder import Decoder
from mimicfilter.pipeline.stream import shard_batches
from mimicfilter.shards.decode import DecodeConfig
from mimicfilter.shards.discover import expand_shards

ROOT = Path(__file__).resolve().parent.parent


def reference_only_pass(config: ScoreConfig) -> float:
    """Samples/s of the baseline: read, decode, one reference forward, cosine of each pair."""
    models = load_models_on_device(config.model)  # same model loading; only the reference is used below
    decoder = Decoder.for_models(config.decode, models)
    started = time.perf_counter()
    samples = 0
    with torch.no_grad(), OrderedPool(decoder.decode_chunk, config.workers) as pool:
        for batch in shard_batches(list(config.shards), pool, config.batch_size, allow_pipe=False):
            samples += len(batch.samples)
            if batch.images is None:
                continue
            images = models.normalization.to_model(batch.images, models.device, torch.float32)
            image = F.normalize(models.reference.encode_image(images), dim=-1)
            text = F.normalize(models.reference.encode_text(batch.texts.to(models.device)), dim=-1)
            (image * text).sum(-1).cpu()
    return samples / (time.perf_counter() - started)


def score_pass(config: ScoreConfig) -> float:
    """Samples/s of the real pipeline; model loading is excluded here as in the baseline."""
    return run_score(config)["samples_per_second"]


def head_math(batch: int, width: int, dim: int, repeats: int) -> dict:
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(batch, width, generator=generator)
    text = F.normalize(torch.randn(batch, dim, generator=generator), dim=-1)
    proxy = torch.randn(width, dim, generator=generator) * width**-0.5
    reference = torch.randn(width, dim, generator=generator) * width**-0.5
    direction = mimic_direction({"w": reference}, {"w": proxy})
    scale = torch.tensor(100.0)

    def per_sample(params):
        return contrastive_per_sample_loss(F.normalize(features @ params["w"], dim=-1), text, scale)

    def ours():
        return mimic_scores(per_sample, {"w": proxy}, direction.unit, temperature=0.05).score

    def official():
        # As in the paper's code: per-sample gradients, then one dot product per sample.
        # Sample i's loss is picked by a one-hot row (vmap cannot index by a batched tensor); the
        # contrastive loss couples the batch, so every per-sample gradient recomputes all of it.
        def loss_of_sample(w, one_hot):
            return (per_sample({"w": w}) * one_hot).sum()

        gradients = vmap(grad(loss_of_sample), in_dims=(None, 0))(proxy, torch.eye(batch))
        unit = direction.unit["w"]
        return torch.stack([-(gradients[i] * unit).sum() for i in range(batch)]), gradients

    def forward_only():
        with torch.no_grad():
            return per_sample({"w": proxy})

    def best_of(function, count):
        times = []
        for _ in range(count):
            started = time.perf_counter()
            output = function()
            times.append(time.perf_counter() - started)
        return min(times), output

    forward_s, _ = best_of(forward_only, repeats)
    ours_s, our_scores = best_of(ours, repeats)
    official_s, (official_scores, gradients) = best_of(official, max(1, repeats // 5))
    return {
        "batch": batch,
        "shape": [width, dim],
        "head_forward_ms": forward_s * 1e3,
        "jvp_ms": ours_s * 1e3,
        "official_ms": official_s * 1e3,
        "official_per_sample_gradients_mib": gradients.numel() * gradients.element_size() / 2**20,
        "speedup": official_s / ours_s,
        "max_abs_difference": (our_scores - official_scores).abs().max().item(),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--reference", default=None, help="checkpoint; default: random weights saved to a temp file")
    parser.add_argument("--shards", default=str(ROOT / "demo" / "shards"))
    parser.add_argument("--max-shards", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--device", default="auto")
    parser.add_argument("--skip-pipeline", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    results: dict = {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads",
        "torch": torch.__version__,
    }
    with tempfile.TemporaryDirectory(prefix="mimicfilter-bench-") as scratch:
        scratch_dir = Path(scratch)
        if not args.skip_pipeline:
            reference = args.reference
            if reference is None:
                torch.manual_seed(0)
                model = open_clip.create_model(args.model)
                reference = str(scratch_dir / "reference.pt")
                torch.save(model.state_dict(), reference)
                del model
            shards = tuple(expand_shards([args.shards])[: args.max_shards])
            config = ScoreConfig(
                shards=shards,
                out_dir=scratch_dir / "run",
                model=ModelSpec(model=args.model, reference=reference, device=args.device),
                decode=DecodeConfig(),
                batch_size=args.batch_size,
                workers=args.workers,
            )
            baseline = reference_only_pass(config)
            mimic = score_pass(config)
            shutil.rmtree(scratch_dir / "run")
            results["pipeline"] = {
                "model": args.model,
                "shards": len(shards),
                "batch_size": args.batch_size,
                "workers": args.workers,
                "reference_clip_score_samples_per_s": round(baseline, 2),
                "mimic_score_samples_per_s": round(mimic, 2),
                "ratio": round(mimic / baseline, 3),
            }
    results["head_math"] = head_math(batch=256, width=768, dim=512, repeats=10)
    print(json.dumps(results, indent=2))
    pipeline = results.get("pipeline")
    if pipeline:
        print(f"score / reference-only throughput: {pipeline['ratio']:.3f} (target >= 0.9)")
    print(f"head math speed-up over vmap(grad) + loop: {results['head_math']['speedup']:.0f}x (target >= 20x)")


if __name__ == "__main__":
    main()
