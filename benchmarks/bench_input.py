"""The input path: decoders per core, whole processes against a plain script, start-up, decoder agreement.

Every speed figure is a ratio from alternating A/B runs in this one script; the baselines are plain
code written here and in benchmarks/plain_forward.py (not mimicfilter's internals).

1. ``per-core``: samples/s on one core (one torch thread, no workers) of
   (a) the plain path of a webdataset-style script: tarfile → PIL decode → open_clip ``preprocess``
       (float32) → one tokenizer call per caption → float32 collate;
   (b) mimicfilter's path with ``--decoder pil`` and (c) with ``--decoder fast``: read → decode to
       uint8 at the model's size → batched tokenisation → uint8 collate (the float conversion happens
       on the scoring device; the table also gives it on the CPU); and
   (d) ``decode_jpeg`` + the uint8 resize alone on JPEG bytes already in memory: the fast path's floor.
   224-px geometry (ViT-B-32's preprocessing), 256×256 JPEGs cut from real photos. Target: ≥ 3×.
2. ``process``: whole processes (start to exit) on the same shards, alternating: ``mimicfilter score
   --train none`` vs a plain forward-only CLIP-score script (benchmarks/plain_forward.py: DataLoader workers,
   PIL + open_clip preprocess, reference towers, cosine), and ``--train head`` vs ``--train none``;
   tiny 224-px model, 2 workers. Targets: ≥ 1.0 and ≥ 0.9.
3. ``startup``: process wall − scoring wall of ``score --train none`` for ViT-B-32 (random weights) on
   CPU, this tree vs a baseline git revision (extracted with ``git archive``). Target: ≤ 0.5×.
4. ``agreement``: fast vs PIL decoder — pixel deviation, and Spearman of mimic and CLIP scores — on
   the demo shards and on a pool of larger photos (crops of the JPEG photographs in Debian's
   ``mate-backgrounds`` and ``plasma-workspace-wallpapers``, installed when missing). Target ≥ 0.999.

Usage:
    python benchmarks/bench_input.py                      # all parts (about 30 min on 2 cores under load)
    python benchmarks/bench_input.py --only per-core,agreement
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import random
import re
import shutil
import statistics
import subprocess
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

from common import ROOT, write_tar
from debian_packages import install as install_debian_packages  # (scripts/, importable once common is)
from plain_forward import tar_samples
from process_runs import TINY_224, processes, run_process, score_command, write_model

PHOTO_DIRS = ("/usr/share/backgrounds/mate", "/usr/share/wallpapers")
PHOTO_PACKAGES = ("mate-backgrounds", "plasma-workspace-wallpapers")
BASELINE_REV = "f3659a7"  # the last commit before the new input path (issue 14)


# ------------------------------------------------------------------------------------------ data


def source_photos() -> list[Path]:
    """The photographs of the wallpaper packages (installed with apt-get when missing, as root)."""
    def photo_files() -> list[Path]:
        return [p for d in PHOTO_DIRS for p in sorted(Path(d).rglob("*.jpg")) if "screenshot" not in p.name]

    found = photo_files()
    if not found:
        install_debian_packages(PHOTO_PACKAGES, "the photographs")
        found = photo_files()
    if not found:
        raise SystemExit(f"error: no photographs in {', '.join(PHOTO_DIRS)} after installing {' '.join(PHOTO_PACKAGES)}")
    by_name: dict[str, Path] = {}
    for path in found:  # one file per picture (the wallpapers come in many resolutions): the largest
        name = picture_name(path)
        if name not in by_name or path.stat().st_size > by_name[name].stat().st_size:
            by_name[name] = path
    return sorted(by_name.values())


def picture_name(path: Path) -> str:
    """The picture a wallpaper file shows: Plasma's NAME/contents/images*/WxH.jpg is NAME (every size,
    light or dark), MATE's NAME_WxH.jpg is NAME."""
    if "contents" in path.parts:
        return path.parts[path.parts.index("contents") - 1]
    return re.sub(r"_\d+x\d+$", "", path.stem)


def photo_pool(out: Path, count: int, per_shard: int, seed: int, fixed_size: int | None = None) -> list[str]:
    """JPEG pairs cut from real photos: random crops (0.3–1 of the picture, aspect 0.5–2), resized to a
    long side of 256–1024 px (or exactly ``fixed_size`` square), quality 70–95, 4:2:0 or 4:4:4
    chroma, one in ten grey, one in ten progressive. Captions name the source picture."""
    from PIL import Image

    rng = random.Random(seed)
    photos = source_photos()
    opened = {path: Image.open(path).convert("RGB") for path in photos}

    def sample(i: int) -> tuple[str, dict[str, bytes]]:
        source_path = rng.choice(photos)
        picture = opened[source_path]
        width, height = picture.size
        scale = rng.uniform(0.3, 1.0)
        aspect = 1.0 if fixed_size else rng.uniform(0.5, 2.0)
        crop_w = min(width, int(width * scale * aspect ** 0.5))
        crop_h = min(height, int(height * scale / aspect ** 0.5))
        left, top = rng.randint(0, width - crop_w), rng.randint(0, height - crop_h)
        crop = picture.crop((left, top, left + crop_w, top + crop_h))
        if fixed_size:
            crop = crop.resize((fixed_size, fixed_size), Image.BICUBIC)
        else:
            long_side = rng.randint(256, 1024)
            ratio = long_side / max(crop.size)
            crop = crop.resize((max(1, round(crop.size[0] * ratio)), max(1, round(crop.size[1] * ratio))), Image.BICUBIC)
        if rng.random() < 0.1:
            crop = crop.convert("L")
        buffer = io.BytesIO()
        crop.save(buffer, "JPEG", quality=rng.randint(70, 95), subsampling=rng.choice([0, 2]),
                  progressive=rng.random() < 0.1)
        name = source_path.parent.parent.name if source_path.parent.name.startswith("images") else source_path.stem
        return f"{i:08d}", {"jpg": buffer.getvalue(), "txt": f"a photo of {name.lower()} number {i}".encode(),
                            "json": json.dumps({"uid": f"{i:032x}"}).encode()}

    return [str(write_tar(out / f"photos-{start // per_shard:05d}.tar",
                          (sample(i) for i in range(start, min(count, start + per_shard)))))
            for start in range(0, count, per_shard)]


# ------------------------------------------------------------------------------- 1. per core


def plain_batches(shards: list[str], preprocess, tokenizer, batch_size: int):
    """The plain path: the way a webdataset + open_clip script feeds a model (benchmarks/plain_forward.py)."""
    import torch
    from PIL import Image

    images, texts = [], []
    for shard in shards:
        for sample in tar_samples(shard):
            images.append(preprocess(Image.open(io.BytesIO(sample["jpg"])).convert("RGB")))
            texts.append(tokenizer([sample["txt"].decode()])[0])
            if len(images) == batch_size:
                yield torch.stack(images), torch.stack(texts)
                images, texts = [], []
    if images:
        yield torch.stack(images), torch.stack(texts)


def per_core(shards: list[str], rounds: int, batch_size: int) -> dict:
    import open_clip
    import torch

    from mimicfilter.execute.local import OrderedPool
    from mimicfilter.mimic.normalization import ImageNormalization
    from mimicfilter.pipeline.decoder import Decoder
    from mimicfilter.pipeline.stream import shard_batches
    from mimicfilter.shards.decode import DecodeConfig
    from mimicfilter.shards.images import ImageGeometry

    torch.set_num_threads(1)
    _, _, preprocess = open_clip.create_model_and_transforms("ViT-B-32")
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    geometry = ImageGeometry(size=(224, 224))
    normalization = ImageNormalization()
    cpu = torch.device("cpu")

    def plain():
        return sum(images.shape[0] for images, _ in plain_batches(shards, preprocess, tokenizer, batch_size))

    def ours(decoder: str, normalise: bool):
        def run():
            decoding = Decoder(DecodeConfig(decoder=decoder), geometry, tokenizer)
            count = 0
            for batch in shard_batches(shards, OrderedPool(decoding.decode_chunk, 0), batch_size, False):
                if normalise:  # what the scorer does with a batch on a CPU device (layout, then floats)
                    normalization.to_model(batch.images, cpu, torch.float32)
                count += batch.images.shape[0]
            return count
        return run

    from mimicfilter.shards.fast_decode import decode_jpeg_fast

    jpegs = []
    for shard in shards:
        with tarfile.open(shard) as tar:
            jpegs += [tar.extractfile(member).read() for member in tar if member.name.endswith(".jpg")]

    def floor():  # what the fast decoder cannot go below here: libjpeg-turbo's decode and the resize
        return sum(decode_jpeg_fast(data, geometry) is not None for data in jpegs)

    variants = {"plain (PIL + preprocess, float32)": plain, "mimicfilter --decoder pil": ours("pil", False),
                "mimicfilter --decoder fast": ours("fast", False),
                "mimicfilter --decoder fast, + normalising on the CPU": ours("fast", True),
                "decode_jpeg + uint8 resize alone (bytes in memory; the fast path's floor)": floor}
    times: dict[str, list[float]] = {name: [] for name in variants}
    counts = {}
    for _ in range(rounds):  # alternating: every variant once per round
        for name, run in variants.items():
            started = time.perf_counter()
            counts[name] = run()
            times[name].append(time.perf_counter() - started)
    plain_rate = counts["plain (PIL + preprocess, float32)"] / min(times["plain (PIL + preprocess, float32)"])
    return {name: {"samples_per_s": round(counts[name] / min(times[name]), 1),
                   "vs_plain": round(counts[name] / min(times[name]) / plain_rate, 2)} for name in variants}


# -------------------------------------------------------------------------------- 2. processes

# --------------------------------------------------------------------------------- 3. start-up


def baseline_tree(scratch: Path, revision: str) -> Path:
    """The baseline revision's code, importable as mimicfilter / mimicfilter_cli from PYTHONPATH."""
    tree = scratch / f"baseline-{revision}"
    tree.mkdir()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", revision], capture_output=True, check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(tree, filter="data")
    (tree / "mimicfilter_cli").symlink_to(tree / "cli")
    return tree


def startup(shards, scratch: Path, rounds: int, revision: str, device: str) -> dict:
    model, checkpoint = write_model(scratch, None, "ViT-B-32")
    tree = baseline_tree(scratch, revision)
    variants = {"this tree": (dict(os.environ), ROOT),
                f"baseline {revision}": ({**os.environ, "PYTHONPATH": str(tree)}, scratch)}
    startups: dict[str, list[float]] = {name: [] for name in variants}
    for round_index in range(rounds):
        for variant, (name, (env, cwd)) in enumerate(variants.items()):
            out_dir = scratch / f"startup-{variant}-{round_index}"  # a first run each time, as a user's
            command = score_command(shards, model, checkpoint, out_dir, "none", 1, 32, device)
            wall, out = run_process(command, env=env, cwd=cwd)
            startups[name].append(wall - json.loads(out)["scoring_seconds"])
    best = {name: min(values) for name, values in startups.items()}
    return {"model": "ViT-B-32 (random weights, safetensors)", "device": device,
            **{name: {"startup_s": [round(v, 2) for v in values], "best_s": round(best[name], 2),
                      "median_s": round(statistics.median(values), 2)}
               for name, values in startups.items()},
            "ratio (this / baseline)": round(best["this tree"] / best[f"baseline {revision}"], 3),
            "ratio of the medians": round(statistics.median(startups["this tree"])
                                          / statistics.median(startups[f"baseline {revision}"]), 3)}


# -------------------------------------------------------------------------------- 4. agreement


def pixel_deviation(shards: list[str], geometry_size: int) -> dict:
    from mimicfilter.shards.decode import DecodeConfig, decode_sample
    from mimicfilter.shards.images import ImageGeometry
    from mimicfilter.shards.samples import iter_shard_samples

    geometry = ImageGeometry(size=(geometry_size, geometry_size))
    differences = []
    for shard in shards:
        for raw in iter_shard_samples(shard):
            fast = decode_sample(raw, DecodeConfig(decoder="fast"), geometry).image
            pil = decode_sample(raw, DecodeConfig(decoder="pil"), geometry).image
            differences.append((fast.int() - pil.int()).abs().flatten().numpy())
    values = np.concatenate(differences)
    return {"images": len(differences), "size": geometry_size, "max_abs": int(values.max()),
            "mean_abs": round(float(values.mean()), 4), "share_of_values_that_differ": round(float((values > 0).mean()), 4),
            "share_off_by_more_than_1": round(float((values > 1).mean()), 6)}


def score_agreement(shards, model, checkpoint, scratch: Path, train: str, label: str) -> dict:
    from mimicfilter.metrics import spearman
    from mimicfilter.store.parts import read_scores

    tables = {}
    for decoder in ("pil", "fast"):
        out = scratch / f"agree-{label}-{train}-{decoder}"
        run_process(score_command(shards, model, checkpoint, out, train, 2, 128, "cpu", ("--decoder", decoder)),
                    cwd=ROOT)
        tables[decoder] = read_scores(out).sort_by([("shard", "ascending"), ("key", "ascending"), ("epoch", "ascending")])
    pil, fast = tables["pil"], tables["fast"]
    assert pil.column("key").equals(fast.column("key")) and pil.column("status").equals(fast.column("status"))
    ok = np.array(pil.column("status").to_pylist()) == "ok"
    result = {"samples": int(ok.sum()), "train": train}
    for column in ("mimic_score", "clip_score"):
        a = np.array(pil.column(column).to_pylist(), dtype=float)[ok]
        b = np.array(fast.column(column).to_pylist(), dtype=float)[ok]
        result[f"spearman_{column}"] = round(float(spearman(a, b)), 5)
        result[f"max_abs_diff_{column}"] = float(np.abs(a - b).max())
    return result


def agreement(scratch: Path, pool_size: int) -> dict:
    demo = [str(p) for p in sorted((ROOT / "demo" / "shards").glob("*.tar"))]
    demo_model, demo_checkpoint = str(ROOT / "demo" / "tiny-clip.json"), str(ROOT / "demo" / "reference.safetensors")
    photos = photo_pool(scratch / "photos", pool_size, 128, seed=1)
    tiny_model, tiny_checkpoint = write_model(scratch, TINY_224)
    return {
        "pixels, demo (48 px)": pixel_deviation(demo, 48),
        "pixels, photo pool at 224 px": pixel_deviation(photos, 224),
        "scores, demo, demo model, static": score_agreement(demo, demo_model, demo_checkpoint, scratch, "none", "demo"),
        "scores, demo, demo model, trajectory": score_agreement(demo, demo_model, demo_checkpoint, scratch, "head", "demo"),
        "scores, photo pool, demo model (48 px)": score_agreement(photos, demo_model, demo_checkpoint, scratch, "none",
                                                                  "photos"),
        "scores, photo pool, tiny 224-px model": score_agreement(photos, tiny_model, tiny_checkpoint, scratch, "none",
                                                                 "photos224"),
    }


# ---------------------------------------------------------------------------------------- main


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="per-core,process,startup,agreement")
    parser.add_argument("--samples", type=int, default=1024, help="samples of 256-px photo JPEGs (per-core, process)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--pool-size", type=int, default=512, help="photo pool for the agreement part")
    parser.add_argument("--baseline", default=BASELINE_REV, help="git revision for the start-up comparison")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    parts = set(args.only.split(","))
    import torch

    results: dict = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
                     "note": "other jobs may share the CPU: compare the ratios, not the absolute figures"}
    with tempfile.TemporaryDirectory(prefix="mimicfilter-bench-input-") as scratch_name:
        scratch = Path(scratch_name)
        if parts & {"per-core", "process"}:
            shards = photo_pool(scratch / "pool256", args.samples, 256, seed=0, fixed_size=256)
        if "per-core" in parts:
            results["per-core"] = per_core(shards, args.rounds, args.batch_size)
            print(json.dumps({"per-core": results["per-core"]}, indent=2), flush=True)
        if "process" in parts:
            model, checkpoint = write_model(scratch, TINY_224)
            results["process"] = processes(shards, model, checkpoint, scratch, args.rounds, args.workers,
                                           args.batch_size, args.device)
            print(json.dumps({"process": results["process"]}, indent=2), flush=True)
        if "startup" in parts:
            small = photo_pool(scratch / "small", 32, 32, seed=2, fixed_size=256)
            results["startup"] = startup(small, scratch, max(2, args.rounds - 1), args.baseline, args.device)
            print(json.dumps({"startup": results["startup"]}, indent=2), flush=True)
        if "agreement" in parts:
            results["agreement"] = agreement(scratch, args.pool_size)
        shutil.rmtree(scratch, ignore_errors=True)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
