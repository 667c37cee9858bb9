"""Emoji image–text pairs for the image–text benchmarks: web-style corrupted pools as WebDataset
shards, a small CLIP, its training loop and retrieval recall.

Data: every fully-qualified emoji of Unicode's emoji-test.txt drawn with Noto Color Emoji at 64 px,
captioned with its CLDR name (Debian ``fonts-noto-color-emoji`` + ``unicode-data``;
scripts/emoji_data.py, which installs them with apt-get when missing and running as root).

Corruption (``corrupt``): a fraction of a pool (exactly round(noise * pool) samples) is made
web-noisy, in equal shares of the kinds asked for: ``swap`` (the caption of another
corrupted-by-swap sample: a derangement), ``boilerplate`` (the caption replaced by text such as
"click here to download" or "stock photo 4821"), ``blank_image`` (the image replaced by a
near-uniform colour) and ``noise_image`` (pixel noise or a smooth random blob image). Shards hold
``KEY.png`` + ``KEY.txt`` + ``KEY.json`` (the truth: uid, corrupted, kind, emoji, true caption).

The CLIP is a small open_clip model (a JSON config like demo/tiny-clip.json, at 64 px) trained
contrastively from scratch on CPU.

Used by benchmarks/quality_imagetext.py, defaults_suite.py, bench_extrapolate.py and
stage1_imagetext.py.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

import common
from common import digest, png_bytes, save_state_dict, stamped, write_stamp
from emoji_data import ensure_packages, load_emoji_names, render_emoji

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


def load_emoji() -> list[tuple[str, str]]:
    """(emoji, CLDR name) of every fully-qualified emoji; the Debian packages are installed first when missing."""
    ensure_packages()
    return load_emoji_names()


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


def write_pool(directory: Path, samples, shards: int, tag: str) -> dict[tuple[str, str], int]:
    """WebDataset tars (deterministic bytes); returns (shard file name, key) -> pool position."""

    def files(position: int) -> dict[str, bytes]:
        sample = samples[position]
        meta = {"uid": hashlib.md5(f"{tag}-{position}".encode()).hexdigest(), "corrupted": sample["corrupted"],
                "kind": sample["kind"], "emoji": sample["emoji"], "true_caption": sample["true_caption"],
                "caption": sample["caption"]}
        return {"json": json.dumps(meta, ensure_ascii=False, sort_keys=True).encode(), "png": png_bytes(sample["image"]),
                "txt": sample["caption"].encode()}

    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    return common.write_pool(directory, len(samples), shards, "emoji-pool", files, owner="root")


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


class Reference:
    """The reference CLIP in ``model_dir``: clip64.json (``--model``) and reference.safetensors
    (``--reference``), trained from scratch on the clean pairs ``ref_split`` unless the same one
    (config, seed, steps, batch, threads, split) is already there. ``trained`` is the model when this
    process trained it."""

    def __init__(self, model_dir: Path, entries, pictures: np.ndarray, ref_split: np.ndarray, steps: int, seed: int,
                 threads: int, batch: int = 128):
        self.config_path, self.reference_path = model_dir / "clip64.json", model_dir / "reference.safetensors"
        # (the suite's stamps predate the batch option: the default batch is left out of them)
        stamp = {"config": CONFIG, "seed": seed, "steps": steps, "threads": threads, "split": digest(ref_split),
                 **({"batch": batch} if batch != 128 else {})}
        self.trained = None
        if not stamped(self.reference_path, stamp):
            from make_demo_data import build_model

            started = time.time()
            print(f"training the emoji reference on {len(ref_split)} clean pairs ({steps} steps) ...", flush=True)
            _, preprocess, tokenizer = build_model(CONFIG)
            images = preprocess_images(pictures[ref_split], preprocess)
            tokens = tokenizer([entries[i][1] for i in ref_split])
            self.trained = train_clip(images, tokens, steps, batch, seed, log_every=100)
            self.config_path.parent.mkdir(parents=True, exist_ok=True)
            self.config_path.write_text(json.dumps(CONFIG, indent=2) + "\n")
            save_state_dict(self.trained, self.reference_path)
            write_stamp(self.reference_path, stamp)
            print(f"  {time.time() - started:.0f} s", flush=True)

    def model(self):
        """The reference model, trained now or loaded from its checkpoint."""
        if self.trained is not None:
            return self.trained
        import open_clip
        from make_demo_data import build_model

        model, _, _ = build_model(CONFIG)
        open_clip.load_checkpoint(model, str(self.reference_path))
        return model.eval()

    def score_options(self) -> list[str]:
        return ["--model", str(self.config_path), "--reference", str(self.reference_path)]
