"""Quality benchmark on image–text pairs: do mimic scores find web-style noise, and do they help training?

    python benchmarks/quality_imagetext.py            # full: about 20 minutes on 2 idle CPU cores
    python benchmarks/quality_imagetext.py --quick    # about 7 minutes
    make bench-quality                                # the full run

What it does (everything seeded from ``--seed``):

1. Data: every fully-qualified emoji of Unicode's emoji-test.txt drawn with Noto Color Emoji at
   64 px, captioned with its CLDR name (Debian ``fonts-noto-color-emoji`` + ``unicode-data``;
   scripts/emoji_data.py, which installs them with apt-get when missing and running as root).
   A seeded permutation splits the ~3,650 emoji into three disjoint sets: a held-out evaluation
   split (``--heldout``), a clean reference split (``--ref-size``) and the pool (the rest).
2. Corruption: a fraction ``--noise`` of the pool (exactly round(noise * pool) samples) is made
   web-noisy, in four kinds of equal share: ``swap`` (the caption of another corrupted-by-swap
   sample: a derangement), ``boilerplate`` (the caption replaced by text such as "click here to
   download" or "stock photo 4821"), ``blank_image`` (the image replaced by a near-uniform colour)
   and ``noise_image`` (the image replaced by pixel noise or a smooth random blob image). The pool
   is written as WebDataset shards: ``KEY.png`` + ``KEY.txt`` + ``KEY.json`` (the truth: uid,
   corrupted, kind, emoji, true caption).
3. Reference: a small open_clip CLIP (a JSON model config, like demo/tiny-clip.json, at 64 px) is
   trained contrastively from scratch on the clean reference split only, on CPU; saved as
   safetensors for ``--reference``.
4. Scoring with the real CLI (subprocess, timed): ``mimicfilter score POOL --model CFG.json
   --reference REF.safetensors ...`` under several settings (``--train none|head``, epochs, tau,
   ``--mimic-layers`` presets). Each table is read with ``mimicfilter.tables.read_scores`` and
   joined to the truth by (shard, key). Scores compared as detectors of *clean* pairs (AUROC, and
   precision of the kept set when keeping exactly the true clean fraction): the mean mimic score,
   the reference CLIP score (``clip_score``, the DataComp baseline), minus the proxy loss, the
   RHO-style loss difference ``loss - ref_loss`` and random numbers. The default filter rule
   (``mimicfilter filter RUN``: per-epoch GMM votes, majority) is run on each table.
5. Subsets through the real ``mimicfilter filter`` CLI, all of the same size K = the number of
   clean pairs: ``--top-frac clip_score=F``, ``--top-frac mimic_score=F``, and the ensemble
   ``--top-frac clip_score=F --top-frac mimic_score=F --combine and`` with F chosen so that the
   intersection has (at least) K pairs; plus a random subset, the whole pool, the truly clean
   pairs (an oracle), the default rule's kept set and the CLIP-score top set of that same size.
6. Downstream: the same small CLIP trained from scratch on each subset with the same number of
   steps (a fixed compute budget, DataComp style), evaluated by image->text and text->image
   recall@1/@5 among the clean held-out pairs (emoji never in the pool or the reference split).
7. Dataset-quality estimate: pools with 10 %-60 % corruption (same emoji, fresh corruption),
   scored with the main setting; ``summary.json``'s ``quality_estimate`` of the default rule (and
   the other binarisations) against the true clean fraction, and the Pearson correlation between
   the estimate and the noise rate (the paper reports -0.90).

Prints markdown tables and writes ``OUT/results.json`` and ``OUT/results.md``. Timings are wall
clock on whatever else the machine is doing; the CPU is often shared, so treat them as rough.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from mimicfilter import metrics

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
from emoji_data import ensure_packages, load_emoji_names, render_emoji  # noqa: E402

IMAGE_SIZE = 64
CONFIG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": IMAGE_SIZE, "layers": 4, "width": 96, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 2},
}
KINDS = ("swap", "boilerplate", "blank_image", "noise_image")
BOILERPLATE = (
    "click here to download", "image", "stock photo {n}", "IMG_{n}.jpg", "DSC{n}", "untitled",
    "photo", "picture", "thumbnail", "no description available", "free shipping on all orders",
    "buy now", "copyright all rights reserved", "logo", "screenshot {n}", "banner", "view larger image",
    "download free", "default", "placeholder", "image not found", "product image {n}", "cover",
    "photo by user{n}", "sale {n}% off", "read more", "icon", "royalty free vector", "wallpaper hd {n}",
)


# --------------------------------------------------------------------------------------------- data


def render_all(entries, size: int) -> np.ndarray:
    return np.stack([np.asarray(render_emoji(emoji, size), dtype=np.uint8) for emoji, _ in entries])


def split(n: int, heldout: int, ref_size: int, seed: int):
    """Disjoint (held-out, reference, pool) index arrays into the emoji list."""
    if heldout + ref_size >= n:
        sys.exit(f"error: --heldout + --ref-size = {heldout + ref_size} leaves no pool of {n} emoji")
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[:heldout]), np.sort(order[heldout : heldout + ref_size]), np.sort(order[heldout + ref_size :])


def fake_image(kind: str, rng: np.random.Generator, size: int) -> np.ndarray:
    if kind == "blank_image":  # a near-uniform colour (often near white, like an empty web image)
        colour = rng.integers(200, 256, 3) if rng.random() < 0.5 else rng.integers(0, 256, 3)
        image = colour[None, None, :] + rng.normal(0, 3, (size, size, 3))
    elif rng.random() < 0.5:  # pixel noise
        image = rng.integers(0, 256, (size, size, 3)).astype(float)
    else:  # a smooth random blob image: 4x4 random colours, upsampled
        from PIL import Image

        small = Image.fromarray(rng.integers(0, 256, (4, 4, 3)).astype(np.uint8))
        image = np.asarray(small.resize((size, size), Image.Resampling.BICUBIC), dtype=float)
    return np.clip(image, 0, 255).astype(np.uint8)


def boilerplate(rng: np.random.Generator) -> str:
    return BOILERPLATE[int(rng.integers(len(BOILERPLATE)))].format(n=int(rng.integers(10, 10000)))


def corrupt(pool: np.ndarray, entries, pictures: np.ndarray, noise: float, seed: int, kinds=KINDS):
    """The pool's samples: list of dicts with image, caption and the truth (``kinds`` share the noise equally)."""
    rng = np.random.default_rng(seed)
    n = len(pool)
    count = int(round(noise * n))
    chosen = rng.permutation(n)[:count]
    share = [count // len(kinds) + (1 if i < count % len(kinds) else 0) for i in range(len(kinds))]
    kind_of = {}
    start = 0
    for kind, k in zip(kinds, share):
        for position in chosen[start : start + k]:
            kind_of[int(position)] = kind
        start += k
    swapped = sorted(p for p, k in kind_of.items() if k == "swap")
    if len(swapped) == 1:  # a single swap cannot be a derangement: make it boilerplate
        kind_of[swapped[0]] = "boilerplate"
        swapped = []
    # each swapped sample takes the caption of the next one in a random cycle: a derangement
    shuffled = [swapped[i] for i in rng.permutation(len(swapped))]
    source_of = dict(zip(shuffled, shuffled[1:] + shuffled[:1]))
    samples = []
    for position, index in enumerate(pool):
        emoji, name = entries[index]
        kind = kind_of.get(position, "clean")
        caption, image = name, pictures[index]
        if kind == "swap":
            caption = entries[pool[source_of[position]]][1]
        elif kind == "boilerplate":
            caption = boilerplate(rng)
        elif kind in ("blank_image", "noise_image"):
            image = fake_image(kind, rng, pictures.shape[1])
        samples.append({"index": int(index), "emoji": emoji, "true_caption": name, "caption": caption,
                        "image": image, "kind": kind, "corrupted": kind != "clean"})
    return samples


def png_bytes(image: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def write_pool(directory: Path, samples, shards: int, tag: str) -> dict[tuple[str, str], int]:
    """WebDataset tars (deterministic bytes); returns (shard file name, key) -> pool position."""
    from make_demo_data import tar_bytes

    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    where = {}
    per_shard = -(-len(samples) // shards)
    for shard in range(shards):
        name = f"emoji-pool-{shard:05d}.tar"
        members = []
        for position in range(shard * per_shard, min(len(samples), (shard + 1) * per_shard)):
            sample = samples[position]
            key = f"{position:06d}"
            meta = {"uid": hashlib.md5(f"{tag}-{position}".encode()).hexdigest(), "corrupted": sample["corrupted"],
                    "kind": sample["kind"], "emoji": sample["emoji"], "true_caption": sample["true_caption"],
                    "caption": sample["caption"]}
            members.append((key, {"png": png_bytes(sample["image"]), "txt": sample["caption"].encode(),
                                  "json": json.dumps(meta, ensure_ascii=False, sort_keys=True).encode()}))
            where[(name, key)] = position
        (directory / name).write_bytes(tar_bytes(members))
    return where


# ------------------------------------------------------------------------------------------- models


def preprocess_images(images: np.ndarray, preprocess):
    import torch
    from PIL import Image

    return torch.stack([preprocess(Image.fromarray(image)) for image in images])


def train_clip(images, tokens, steps: int, batch_size: int, seed: int, lr: float = 2e-3, log_every: int = 0,
               make_loss=None, after_step=None, init_seed: int | None = None, config: dict | None = None):
    """The small CLIP from scratch: AdamW, cosine schedule with warm-up, the demo's light augmentation.

    ``make_loss(model)`` may return the batch loss as a function of (image features, text features,
    logit scale) instead of open_clip's ClipLoss (benchmarks/stage1.py: Grad-Mimic re-weighting);
    ``after_step(step, model, seconds, index)`` runs after every optimizer step with that step's wall time
    and the batch's sample indices. ``init_seed`` seeds the initial weights apart from the data order.
    ``config`` replaces the model config (default CONFIG).
    """
    import open_clip
    import torch
    from make_demo_data import augment, build_model

    torch.manual_seed(seed if init_seed is None else init_seed)
    model, _, _ = build_model(config or CONFIG)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1,
                                                   anneal_strategy="cos")
    loss_fn = make_loss(model) if make_loss is not None else open_clip.ClipLoss()
    generator = torch.Generator().manual_seed(seed)
    batch_size = min(batch_size, len(images))
    order, cursor = torch.randperm(len(images), generator=generator), 0
    model.train()
    for step in range(steps):
        started = time.perf_counter()
        if cursor + batch_size > len(order):  # epoch boundary: drop the remainder, reshuffle
            order, cursor = torch.randperm(len(images), generator=generator), 0
        index = order[cursor : cursor + batch_size]
        cursor += batch_size
        image_features, text_features, scale = model(augment(images[index], generator), tokens[index])[:3]
        loss = loss_fn(image_features, text_features, scale)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if log_every and (step + 1) % log_every == 0:
            print(f"    step {step + 1}/{steps}  loss {loss.item():.3f}", flush=True)
        if after_step is not None:
            after_step(step + 1, model, time.perf_counter() - started, index)
    model.eval()
    return model


def recall_at(model, images, tokens, ks=(1, 5)) -> dict[str, float]:
    """Image->text and text->image recall@k among all the given (clean, one-to-one) pairs."""
    import torch
    import torch.nn.functional as F

    with torch.no_grad():
        image = F.normalize(model.encode_image(images), dim=-1)
        text = F.normalize(model.encode_text(tokens), dim=-1)
    similarity = (image @ text.T).numpy()
    target = np.arange(len(similarity))
    # rank of the true match = how many candidates score strictly higher
    rank_i2t = (similarity > similarity[target, target][:, None]).sum(1)
    rank_t2i = (similarity > similarity[target, target][None, :]).sum(0)
    result = {}
    for k in ks:
        result[f"i2t_r{k}"] = float((rank_i2t < k).mean())
        result[f"t2i_r{k}"] = float((rank_t2i < k).mean())
    return result


# ---------------------------------------------------------------------------------------------- CLI


def mimicfilter_executable() -> list[str]:
    beside = Path(sys.executable).with_name("mimicfilter")
    return [str(beside)] if beside.exists() else [sys.executable, "-m", "mimicfilter"]


CLI_ENV = dict(os.environ)  # OMP_NUM_THREADS is set to --threads in main()


def run_cli(command: list[str]) -> tuple[dict, float]:
    started = time.time()
    done = subprocess.run(command, capture_output=True, text=True, env=CLI_ENV)
    elapsed = time.time() - started
    if done.returncode != 0:
        sys.stderr.write(done.stdout + done.stderr)
        raise SystemExit(f"error: mimicfilter exited with {done.returncode}: {shlex.join(command)}")
    return json.loads(done.stdout), elapsed


def read_run(run_dir: Path, where: dict, n: int) -> dict[str, np.ndarray]:
    """Per pool position: mean over epochs of each score column, and the last epoch's mimic score."""
    from mimicfilter.store.parts import read_scores

    table = read_scores(run_dir, ["shard", "key", "epoch", "status", "mimic_score", "mimic_weight", "loss",
                                  "clip_score", "ref_loss"]).to_pydict()
    if set(table["status"]) != {"ok"}:
        raise RuntimeError(f"{run_dir}: rows with status {set(table['status']) - {'ok'}}")
    epochs = sorted(set(table["epoch"]))
    names = ("mimic_score", "mimic_weight", "loss", "clip_score", "ref_loss")
    values = {name: np.full((len(epochs), n), np.nan) for name in names}
    for row in range(len(table["key"])):
        position = where[(Path(table["shard"][row]).name, table["key"][row])]
        epoch = epochs.index(table["epoch"][row])
        for name in names:
            values[name][epoch, position] = table[name][row]
    if any(np.isnan(v).any() for v in values.values()):
        raise RuntimeError(f"{run_dir}: not every sample scored in every epoch")
    result = {name: v.mean(axis=0) for name, v in values.items()}
    result["mimic_score_last"] = values["mimic_score"][-1]
    result["epochs"] = len(epochs)
    return result


def kept_mask(manifest: Path, where: dict, n: int) -> np.ndarray:
    import pyarrow.parquet as pq

    table = pq.read_table(manifest, columns=["shard", "key", "kept"]).to_pydict()
    kept = np.zeros(n, dtype=bool)
    for shard, key, flag in zip(table["shard"], table["key"], table["kept"]):
        kept[where[(Path(shard).name, key)]] = bool(flag)
    return kept


def run_filter(run_dir: Path, out: Path, rules: list[str], where: dict, n: int) -> tuple[dict, np.ndarray, list[str]]:
    command = mimicfilter_executable() + ["filter", str(run_dir), *rules, "--out", str(out), "--json"]
    summary, _ = run_cli(command)
    return summary, kept_mask(out / "manifest.parquet", where, n), command


# ------------------------------------------------------------------------------------------ metrics


def detector_metrics(clean: np.ndarray, score: np.ndarray, kinds: np.ndarray) -> dict:
    """AUROC of ``score`` (higher = clean) overall and per corruption kind, and precision@true rate."""
    keep = int(clean.sum())
    order = np.argsort(-score, kind="mergesort")
    kept = np.zeros(len(score), dtype=bool)
    kept[order[:keep]] = True
    per_kind = {}
    for kind in KINDS:
        members = clean | (kinds == kind)
        if (kinds == kind).any():
            per_kind[kind] = metrics.auroc(score[members], clean[members])
    return {"auroc": metrics.auroc(score, clean), "precision_at_rate": float(clean[kept].mean()), "auroc_by_kind": per_kind}


def kept_metrics(kept: np.ndarray, clean: np.ndarray) -> dict:
    """The kept set as a detector of clean pairs."""
    detection = metrics.detection(kept, clean)
    return {"kept": int(kept.sum()), "kept_fraction": float(kept.mean()), "precision": detection.precision,
            "recall": detection.recall, "f1": detection.f1}


def baseline_scores(columns: dict, seed: int) -> dict[str, np.ndarray]:
    """Higher = more likely clean."""
    return {
        "clip_score (reference)": columns["clip_score"],
        "-ref_loss (reference)": -columns["ref_loss"],
        "-loss (proxy)": -columns["loss"],
        "loss - ref_loss (RHO-style)": columns["loss"] - columns["ref_loss"],
        "random": np.random.default_rng(seed + 4242).random(len(columns["loss"])),
    }


# ------------------------------------------------------------------------------------------- output


def fmt(value) -> str:
    if isinstance(value, float):
        return "nan" if np.isnan(value) else f"{value:.3f}"
    return str(value)


def md_table(title: str, header: list[str], rows: list[list]) -> str:
    lines = [f"### {title}", "", "| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------- runner


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="fewer settings, steps and noise levels (about 7 minutes)")
    parser.add_argument("--out", type=Path, default=None,
                        help="output directory [bench-runs/quality-imagetext; quick: bench-runs/quality-imagetext-quick]")
    parser.add_argument("--heldout", type=int, default=500, help="clean held-out emoji for downstream retrieval")
    parser.add_argument("--ref-size", type=int, default=1500, help="clean emoji the reference trains on")
    parser.add_argument("--noise", type=float, default=0.4, help="corrupted fraction of the main pool")
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--ref-steps", type=int, default=None, help="reference training steps [700; quick 300]")
    parser.add_argument("--train-batch", type=int, default=128, help="batch size of reference/downstream training")
    parser.add_argument("--down-steps", type=int, default=None, help="downstream training steps per subset [200; quick 150]")
    parser.add_argument("--down-seeds", type=int, default=None, help="downstream training seeds per subset [2; quick 1]")
    parser.add_argument("--epochs", type=int, default=3, help="--epochs of the main `score --train head` setting")
    parser.add_argument("--batch-size", type=int, default=256, help="score --batch-size")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads here and in the CLI (0: the cores not busy by the load average, at least 1; "
                             "two processes each using every core slow torch down many times over)")
    parser.add_argument("--quality-noise", default=None, help="noise levels of the quality-estimate pools [0.1,0.2,...,0.6; quick 0.1,0.35,0.6]")
    args = parser.parse_args(argv)
    quick = args.quick
    args.out = args.out or ROOT / "bench-runs" / ("quality-imagetext-quick" if quick else "quality-imagetext")
    args.ref_steps = args.ref_steps or (300 if quick else 700)
    args.down_steps = args.down_steps or (150 if quick else 200)
    args.down_seeds = args.down_seeds or (1 if quick else 2)
    args.quality_noise = [float(v) for v in (args.quality_noise or ("0.1,0.35,0.6" if quick else "0.1,0.2,0.3,0.4,0.5,0.6")).split(",")]
    if args.threads <= 0:
        cores = os.cpu_count() or 1
        args.threads = max(1, min(cores, cores - int(round(os.getloadavg()[0]))))
    if not 0 < args.noise < 1:
        parser.error("--noise must lie in (0, 1)")
    return args


def score_settings(args) -> list[tuple[str, list[str]]]:
    """(name, score options). The first is the main setting used for subsets and the quality pools."""
    e = str(args.epochs)
    main = (f"head e{e} tau0.05 image-proj (defaults, --epochs {e})", ["--train", "head", "--epochs", e])
    if args.quick:
        return [
            main,
            ("none image-proj (static)", ["--train", "none"]),
            (f"head e{e} tau1 image-proj", ["--train", "head", "--epochs", e, "--temperature", "1"]),
            (f"head e{e} tau0.05 text-proj", ["--train", "head", "--epochs", e, "--mimic-layers", "text-proj"]),
        ]
    return [
        main,
        ("none image-proj (static)", ["--train", "none"]),
        ("none text-proj (static)", ["--train", "none", "--mimic-layers", "text-proj"]),
        ("head e1 tau0.05 image-proj", ["--train", "head", "--epochs", "1"]),
        ("head e6 tau0.05 image-proj", ["--train", "head", "--epochs", "6"]),
        (f"head e{e} tau0.2 image-proj", ["--train", "head", "--epochs", e, "--temperature", "0.2"]),
        (f"head e{e} tau1 image-proj", ["--train", "head", "--epochs", e, "--temperature", "1"]),
        (f"head e{e} tau0.05 lr1e-3 image-proj", ["--train", "head", "--epochs", e, "--lr", "1e-3"]),
        (f"head e{e} tau0.05 text-proj", ["--train", "head", "--epochs", e, "--mimic-layers", "text-proj"]),
        (f"head e{e} tau0.05 both-proj", ["--train", "head", "--epochs", e, "--mimic-layers", "both-proj"]),
        (f"head e{e} tau0.05 image-last-mlp", ["--train", "head", "--epochs", e, "--mimic-layers", "image-last-mlp"]),
    ]


def slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in ".-" else "-" for c in name.split(" (")[0]).strip("-")


def main(argv=None) -> None:
    args = parse_args(argv)
    ensure_packages()
    import torch
    from make_demo_data import build_model
    from safetensors.torch import save_file

    import logging

    logging.getLogger().setLevel(logging.ERROR)  # open_clip's "no pretrained weights" warnings: intended
    torch.set_num_threads(args.threads)
    CLI_ENV.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    started = time.time()
    timings = {}
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    print(f"output: {out}; {args.threads} torch thread(s)", flush=True)
    md = []

    # 1-2. data, splits, corrupted pool
    t = time.time()
    entries = load_emoji_names()
    pictures = render_all(entries, IMAGE_SIZE)
    heldout, ref_split, pool = split(len(entries), args.heldout, args.ref_size, args.seed)
    samples = corrupt(pool, entries, pictures, args.noise, args.seed + 1)
    where = write_pool(out / "pool", samples, args.shards, f"pool-{args.seed}")
    n = len(samples)
    clean = np.array([not s["corrupted"] for s in samples])
    kinds = np.array([s["kind"] for s in samples])
    kind_counts = {kind: int((kinds == kind).sum()) for kind in ("clean", *KINDS)}
    timings["data_s"] = time.time() - t
    print(f"{len(entries)} emoji: held-out {len(heldout)}, reference {len(ref_split)}, pool {n} "
          f"({kind_counts}) in {args.shards} shards [{timings['data_s']:.0f} s]", flush=True)

    # 3. reference
    t = time.time()
    _, preprocess, tokenizer = build_model(CONFIG)
    x_ref = preprocess_images(pictures[ref_split], preprocess)
    y_ref = tokenizer([entries[i][1] for i in ref_split])
    x_held = preprocess_images(pictures[heldout], preprocess)
    y_held = tokenizer([entries[i][1] for i in heldout])
    x_pool = preprocess_images(np.stack([s["image"] for s in samples]), preprocess)
    y_pool = tokenizer([s["caption"] for s in samples])
    model_dir = out / "model"
    model_dir.mkdir(exist_ok=True)
    config_path = model_dir / "clip64.json"
    config_path.write_text(json.dumps(CONFIG, indent=2) + "\n")
    reference_path = model_dir / "reference.safetensors"
    stamp = {"config": CONFIG, "seed": args.seed, "steps": args.ref_steps, "batch": args.train_batch,
             "threads": args.threads, "split": hashlib.md5(ref_split.tobytes()).hexdigest()}
    stamp_path = model_dir / "reference.json"
    if reference_path.exists() and stamp_path.exists() and json.loads(stamp_path.read_text()) == stamp:
        print(f"reusing {reference_path} (same config, split, seed, steps and threads)", flush=True)
        import open_clip

        reference, _, _ = build_model(CONFIG)
        open_clip.load_checkpoint(reference, str(reference_path))
        reference.eval()
    else:
        print(f"training the reference on {len(ref_split)} clean pairs for {args.ref_steps} steps ...", flush=True)
        reference = train_clip(x_ref, y_ref, args.ref_steps, args.train_batch, args.seed, log_every=100)
        save_file({k: v.detach().contiguous() for k, v in reference.state_dict().items()}, str(reference_path))
        stamp_path.write_text(json.dumps(stamp, indent=2))
    reference_recall = {"train_split": recall_at(reference, x_ref[:500], y_ref[:500]),
                        "heldout": recall_at(reference, x_held, y_held)}
    timings["reference_s"] = time.time() - t
    print(f"reference: {timings['reference_s']:.0f} s; recall (500 candidates) train split {reference_recall['train_split']}, "
          f"held-out {reference_recall['heldout']}", flush=True)

    # 4. scoring under several settings
    t = time.time()
    base = mimicfilter_executable() + ["score", str(out / "pool"), "--model", str(config_path), "--reference",
                                       str(reference_path), "--batch-size", str(args.batch_size),
                                       "--seed", str(args.seed), "--json", "--quiet", "--overwrite"]
    runs = {}
    baselines = None
    for name, options in score_settings(args):
        run_dir = out / "runs" / slug(name)
        command = base + options + ["--out", str(run_dir)]
        print(f"scoring: {name} ...", flush=True)
        stats, elapsed = run_cli(command)
        columns = read_run(run_dir, where, n)
        summary, kept, _ = run_filter(run_dir, run_dir / "filter-default", [], where, n)
        runs[name] = {
            "command": shlex.join(command), "wall_s": elapsed, "epochs": columns["epochs"],
            "samples_per_s": stats.get("samples_per_s"),
            "mimic_score": detector_metrics(clean, columns["mimic_score"], kinds),
            "mimic_score_last": detector_metrics(clean, columns["mimic_score_last"], kinds),
            "-loss (proxy)": detector_metrics(clean, -columns["loss"], kinds),
            "loss - ref_loss (RHO-style)": detector_metrics(clean, columns["loss"] - columns["ref_loss"], kinds),
            "spearman_mimic_vs_clip_score": metrics.spearman(columns["mimic_score"], columns["clip_score"]),
            "default_rule": {**kept_metrics(kept, clean), "quality_estimate": summary["quality_estimate"],
                             "thresholds": summary["aggregation"].get("thresholds")},
            "run_dir": str(run_dir),
        }
        if baselines is None:
            baselines = {name: detector_metrics(clean, values, kinds)
                         for name, values in baseline_scores(columns, args.seed).items()}
            main_name, main_dir, main_columns = name, run_dir, columns
        r = runs[name]
        print(f"  {elapsed:.1f} s; AUROC mimic {r['mimic_score']['auroc']:.3f}; default rule kept "
              f"{r['default_rule']['kept_fraction']:.3f} precision {r['default_rule']['precision']:.3f}", flush=True)
    timings["scoring_s"] = time.time() - t

    # 5. subsets of size K through `mimicfilter filter`
    t = time.time()
    k = int(clean.sum())
    fraction = (k + 0.5) / n  # floor(F * n) = k
    subsets = {"whole pool": np.ones(n, dtype=bool), "oracle: truly clean": clean.copy()}
    random_keep = np.zeros(n, dtype=bool)
    random_keep[np.random.default_rng(args.seed + 7).permutation(n)[:k]] = True
    subsets[f"random {k}"] = random_keep
    filter_commands = {}
    for label, rules in ((f"CLIP-score top {k}", ["--top-frac", f"clip_score={fraction:.6f}"]),
                         (f"mimic top {k}", ["--top-frac", f"mimic_score={fraction:.6f}"])):
        _, kept, command = run_filter(main_dir, out / "subsets" / slug(label), rules, where, n)
        subsets[label], filter_commands[label] = kept, shlex.join(command)
    # ensemble: the smallest equal fraction whose intersection reaches k
    rank_clip = np.argsort(np.argsort(-main_columns["clip_score"], kind="mergesort"), kind="mergesort")
    rank_mimic = np.argsort(np.argsort(-main_columns["mimic_score"], kind="mergesort"), kind="mergesort")
    worst = np.maximum(rank_clip, rank_mimic)  # in both top-m sets iff worst < m
    m = int(np.sort(worst)[k - 1]) + 1
    ensemble_fraction = (m + 0.5) / n
    rules = ["--top-frac", f"clip_score={ensemble_fraction:.6f}", "--top-frac", f"mimic_score={ensemble_fraction:.6f}",
             "--combine", "and"]
    _, kept, command = run_filter(main_dir, out / "subsets" / "ensemble", rules, where, n)
    label = f"CLIP AND mimic (top {ensemble_fraction:.1%} of each)"
    subsets[label], filter_commands[label] = kept, shlex.join(command)
    # the default rule's kept set (its own size)
    _, kept, command = run_filter(main_dir, out / "subsets" / "default-rule", [], where, n)
    label = "mimic default rule (gmm votes)"
    subsets[label], filter_commands[label] = kept, shlex.join(command)
    size = int(kept.sum())  # the CLIP score at the default rule's size, for a same-size comparison
    label = f"CLIP-score top {size} (default rule's size)"
    _, kept, command = run_filter(main_dir, out / "subsets" / "clip-default-size",
                                  ["--top-frac", f"clip_score={(size + 0.5) / n:.6f}"], where, n)
    subsets[label], filter_commands[label] = kept, shlex.join(command)
    subset_quality = {label: kept_metrics(mask, clean) for label, mask in subsets.items()}
    timings["subsets_s"] = time.time() - t

    # 6. downstream training on each subset
    t = time.time()
    downstream = {}
    cache_path = out / "downstream-cache.json"  # an interrupted run re-uses the trainings it finished
    cache = json.loads(cache_path.read_text()) if cache_path.exists() else {}
    pool_digest = hashlib.md5(x_pool.numpy().tobytes() + y_pool.numpy().tobytes() + x_held.numpy().tobytes()).hexdigest()
    for label, mask in subsets.items():
        index = torch.as_tensor(np.flatnonzero(mask))
        recalls = []
        for seed in range(args.down_seeds):
            key = json.dumps([pool_digest, hashlib.md5(mask.tobytes()).hexdigest(), args.down_steps, args.train_batch,
                              args.seed + 100 + seed, args.threads, CONFIG])
            if key not in cache:
                model = train_clip(x_pool[index], y_pool[index], args.down_steps, args.train_batch, args.seed + 100 + seed)
                cache[key] = recall_at(model, x_held, y_held)
                cache_path.write_text(json.dumps(cache))
            recalls.append(cache[key])
        mean = {key: float(np.mean([r[key] for r in recalls])) for key in recalls[0]}
        downstream[label] = {"size": int(mask.sum()), "clean_fraction": float(clean[mask].mean()), "recall": mean,
                             "recall_per_seed": recalls}
        print(f"downstream {label}: n={int(mask.sum())} {mean} [{time.time() - t:.0f} s]", flush=True)
    timings["downstream_s"] = time.time() - t

    # 7. dataset-quality estimate vs noise rate
    t = time.time()
    quality = []
    main_options = score_settings(args)[0][1]
    for level in args.quality_noise:
        level_samples = corrupt(pool, entries, pictures, level, args.seed + 1000 + int(round(level * 100)))
        directory = out / "quality" / f"noise{level:g}"
        level_where = write_pool(directory / "pool", level_samples, args.shards, f"q{level:g}-{args.seed}")
        level_clean = np.array([not s["corrupted"] for s in level_samples])
        run_dir = directory / "run"
        base_level = list(base)
        base_level[base_level.index(str(out / "pool"))] = str(directory / "pool")
        run_cli(base_level + main_options + ["--out", str(run_dir)])
        row = {"noise": level, "true_clean_fraction": float(level_clean.mean())}
        for rule_name, rules in (("gmm (default)", []), ("kmeans", ["--binarize", "kmeans"]), ("sign", ["--binarize", "sign"]),
                                 ("gmm + label-model", ["--combine-votes", "label-model"])):
            summary, kept, _ = run_filter(run_dir, directory / f"filter-{slug(rule_name)}", rules, level_where, len(level_samples))
            row[rule_name] = {"quality_estimate": summary["quality_estimate"], **kept_metrics(kept, level_clean)}
        columns = read_run(run_dir, level_where, len(level_samples))
        row["auroc_mimic"] = metrics.auroc(columns["mimic_score"], level_clean)
        row["auroc_clip_score"] = metrics.auroc(columns["clip_score"], level_clean)
        quality.append(row)
        print(f"quality pool noise {level:g}: estimate {row['gmm (default)']['quality_estimate']:.3f} "
              f"(true clean {row['true_clean_fraction']:.3f})", flush=True)
    noise_levels = np.array([row["noise"] for row in quality])
    pearson = {}
    for rule_name in ("gmm (default)", "kmeans", "sign", "gmm + label-model"):
        estimates = np.array([row[rule_name]["quality_estimate"] for row in quality])
        pearson[rule_name] = {
            "pearson_vs_noise": float(np.corrcoef(estimates, noise_levels)[0, 1]) if len(quality) > 1 else float("nan"),
            "mean_abs_error_vs_clean_fraction": float(np.mean(np.abs(estimates - (1 - noise_levels)))),
        }
    timings["quality_s"] = time.time() - t
    timings["total_s"] = time.time() - started

    # ------------------------------------------------------------------------------------ tables
    md.append(f"Pool: {n} emoji image–text pairs, {1 - clean.mean():.0%} corrupted ({kind_counts}); reference trained on "
              f"{len(ref_split)} disjoint clean pairs ({args.ref_steps} steps), held-out recall@1 i2t "
              f"{reference_recall['heldout']['i2t_r1']:.3f} / t2i {reference_recall['heldout']['t2i_r1']:.3f} among "
              f"{len(heldout)}, recall@5 {reference_recall['heldout']['i2t_r5']:.3f} / {reference_recall['heldout']['t2i_r5']:.3f}.\n")
    md.append(md_table(
        "Detecting clean pairs: mimic settings (AUROC of the mean score; precision keeping the true clean fraction; "
        "default filter rule = gmm votes, majority)",
        ["setting", "epochs", "wall s", "AUROC", "prec@rate", "AUROC last epoch", "default rule kept", "precision",
         "recall", "AUROC -loss", "AUROC loss-ref_loss", "Spearman mimic~clip_score"],
        [[name, r["epochs"], f"{r['wall_s']:.1f}", r["mimic_score"]["auroc"], r["mimic_score"]["precision_at_rate"],
          r["mimic_score_last"]["auroc"], r["default_rule"]["kept_fraction"], r["default_rule"]["precision"],
          r["default_rule"]["recall"], r["-loss (proxy)"]["auroc"], r["loss - ref_loss (RHO-style)"]["auroc"],
          r["spearman_mimic_vs_clip_score"]]
         for name, r in runs.items()]))
    md.append(f"True clean fraction {clean.mean():.3f} (= precision of random keeping).\n")
    main_run = runs[main_name]
    rows = [[f"mimic_score ({main_name})", main_run["mimic_score"]["auroc"], main_run["mimic_score"]["precision_at_rate"],
             *[main_run["mimic_score"]["auroc_by_kind"].get(kind, float("nan")) for kind in KINDS]]]
    best = max(runs, key=lambda name: runs[name]["mimic_score"]["auroc"])
    if best != main_name:
        rows.append([f"mimic_score ({best}; best setting, chosen on these labels)", runs[best]["mimic_score"]["auroc"],
                     runs[best]["mimic_score"]["precision_at_rate"],
                     *[runs[best]["mimic_score"]["auroc_by_kind"].get(kind, float("nan")) for kind in KINDS]])
    for label, result in baselines.items():
        rows.append([label, result["auroc"], result["precision_at_rate"],
                     *[result["auroc_by_kind"].get(kind, float("nan")) for kind in KINDS]])
    md.append(md_table("Scores as detectors of clean pairs, overall and per corruption kind (AUROC clean vs that kind)",
                       ["score (higher = clean)", "AUROC", "prec@rate", *[f"AUROC {kind}" for kind in KINDS]], rows))
    md.append(md_table(
        f"Subsets (main setting: {main_name}) and downstream CLIP trained from scratch, {args.down_steps} steps x batch "
        f"{args.train_batch}, mean of {args.down_seeds} seed(s); recall among {len(heldout)} held-out clean pairs",
        ["subset", "size", "clean frac", "i2t R@1", "i2t R@5", "t2i R@1", "t2i R@5"],
        [[label, d["size"], d["clean_fraction"], d["recall"]["i2t_r1"], d["recall"]["i2t_r5"], d["recall"]["t2i_r1"],
          d["recall"]["t2i_r5"]] for label, d in downstream.items()]))
    md.append(f"Chance: R@1 {1 / len(heldout):.3f}, R@5 {5 / len(heldout):.3f}. Reference (trained on the clean "
              f"reference split): i2t R@1/R@5 {reference_recall['heldout']['i2t_r1']:.3f}/{reference_recall['heldout']['i2t_r5']:.3f}, "
              f"t2i {reference_recall['heldout']['t2i_r1']:.3f}/{reference_recall['heldout']['t2i_r5']:.3f}.\n")
    md.append(md_table(
        "Dataset-quality estimate (kept fraction; main setting) vs the true clean fraction",
        ["noise", "true clean", "gmm (default)", "kmeans", "sign", "gmm + label-model", "default-rule precision",
         "AUROC mimic", "AUROC clip_score"],
        [[row["noise"], row["true_clean_fraction"], row["gmm (default)"]["quality_estimate"], row["kmeans"]["quality_estimate"],
          row["sign"]["quality_estimate"], row["gmm + label-model"]["quality_estimate"], row["gmm (default)"]["precision"],
          row["auroc_mimic"], row["auroc_clip_score"]] for row in quality]))
    md.append(md_table("Pearson correlation of the quality estimate with the noise rate (paper: -0.90)",
                       ["rule", "Pearson r", "mean abs(estimate - clean fraction)"],
                       [[rule, p["pearson_vs_noise"], p["mean_abs_error_vs_clean_fraction"]] for rule, p in pearson.items()]))
    commands = [shlex.join([sys.executable, *sys.argv])] + [r["command"] for r in runs.values()] + list(filter_commands.values())
    md.append("Commands:\n\n```\n" + "\n".join(commands) + "\n```\n")
    md.append(f"Wall time: {timings['total_s']:.0f} s ({', '.join(f'{k} {v:.0f}' for k, v in timings.items())}).\n")
    text = "\n".join(md)
    print("\n" + text)
    blob = {
        "args": {key: (str(v) if isinstance(v, Path) else v) for key, v in vars(args).items()},
        "platform": {"python": platform.python_version(), "torch": torch.__version__, "threads": args.threads,
                     "cpu_count": os.cpu_count(), "machine": platform.machine()},
        "data": {"emoji": len(entries), "heldout": len(heldout), "reference": len(ref_split), "pool": n,
                 "kinds": kind_counts, "image_size": IMAGE_SIZE},
        "model_cfg": CONFIG,
        "reference": {"recall": reference_recall, "steps": args.ref_steps},
        "runs": runs, "main_setting": main_name, "baselines": baselines,
        "subsets": subset_quality, "filter_commands": filter_commands, "downstream": downstream,
        "quality": quality, "quality_pearson": pearson, "timings": timings,
    }
    (out / "results.json").write_text(json.dumps(blob, indent=2, default=float))
    (out / "results.md").write_text(text)
    print(f"wrote {out / 'results.json'} and {out / 'results.md'}")


if __name__ == "__main__":
    main()
