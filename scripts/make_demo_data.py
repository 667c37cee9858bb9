"""Build the bundled demo: emoji image–caption shards with swapped captions, and a tiny reference CLIP.

    python scripts/make_demo_data.py            # writes demo/shards/*.tar, demo/tiny-clip.json,
                                                # demo/reference.safetensors (seeded, reproducible)

The reference trains for a fixed number of epochs (``--epochs``, default 46: about 3.5 minutes
on 2 CPU cores) with a fixed thread count (``--threads``, default 2), so a re-run on the same
software stack reproduces the checkpoint as well as the (byte-identical) shards.

* Every fully-qualified emoji of Unicode's emoji-test.txt is rendered with Noto Color Emoji and
  captioned with its CLDR name.
* The reference (a small open_clip CLIP, ``demo/tiny-clip.json``) is trained contrastively on the
  clean pairs of all emoji: it plays the strong pretrained model.
* The pool is 1,024 random emoji in 4 shards of 256; a quarter of them have their captions swapped
  among themselves (each gets another swapped sample's caption). Each sample's ``.json`` records
  the truth (``swapped``, ``true_caption``) so the demo can show what the scores find.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import random
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from mimicfilter.metrics import auroc

sys.path.insert(0, str(Path(__file__).resolve().parent))
from emoji_data import ensure_packages, load_emoji_names, render_emoji  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
IMAGE_SIZE = 48
CONFIG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": IMAGE_SIZE, "layers": 4, "width": 96, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


def build_model(config: dict):
    """Model, eval preprocessing and tokenizer through open_clip's factory (local-dir schema)."""
    with tempfile.TemporaryDirectory() as config_dir:
        payload = {"model_cfg": config, "preprocess_cfg": {}}
        (Path(config_dir) / "open_clip_config.json").write_text(json.dumps(payload))
        model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{config_dir}")
        tokenizer = open_clip.get_tokenizer(f"local-dir:{config_dir}")
    return model, preprocess, tokenizer


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Small random shifts and scale changes, so the reference does not memorise pixels."""
    batch = images.shape[0]
    scale = 1 + (torch.rand(batch, generator=generator) - 0.5) * 0.2
    shift = (torch.rand(batch, 2, generator=generator) - 0.5) * 0.15
    theta = torch.zeros(batch, 2, 3)
    theta[:, 0, 0] = scale
    theta[:, 1, 1] = scale
    theta[:, :, 2] = shift
    grid = F.affine_grid(theta, images.shape, align_corners=False)
    return F.grid_sample(images, grid, padding_mode="border", align_corners=False)


def retrieval_top1(model, images, tokens, batch: int) -> tuple[float, float]:
    """Image→text and text→image top-1 accuracy within consecutive batches of ``batch`` pairs."""
    hits_i2t = hits_t2i = 0
    with torch.no_grad():
        for start in range(0, len(images), batch):
            image = F.normalize(model.encode_image(images[start : start + batch]), dim=-1)
            text = F.normalize(model.encode_text(tokens[start : start + batch]), dim=-1)
            similarity = image @ text.T
            target = torch.arange(len(image))
            hits_i2t += (similarity.argmax(1) == target).sum().item()
            hits_t2i += (similarity.argmax(0) == target).sum().item()
    return hits_i2t / len(images), hits_t2i / len(images)


def train_reference(images, tokens, epochs: int, seed: int):
    torch.manual_seed(seed)
    model, preprocess, tokenizer = build_model(CONFIG)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.1)
    loss_fn = open_clip.ClipLoss()
    generator = torch.Generator().manual_seed(seed)
    for epoch in range(1, epochs + 1):
        order = torch.randperm(len(images), generator=generator)
        model.train()
        for start in range(0, len(order) - 255, 256):
            index = order[start : start + 256]
            image_features, text_features, scale = model(augment(images[index], generator), tokens[index])[:3]
            loss = loss_fn(image_features, text_features, scale)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        model.eval()
        if epoch % 5 == 0:
            i2t, t2i = retrieval_top1(model, images, tokens, 256)
            print(f"  epoch {epoch:3d}  loss {loss.item():.3f}  top-1 in 256: i2t {i2t:.1%} t2i {t2i:.1%}", flush=True)
    model.eval()
    return model, preprocess, tokenizer


def tar_bytes(samples: list[tuple[str, dict[str, bytes]]]) -> bytes:
    """A deterministic tar (sorted members, mtime 0, root owner): same input, same bytes."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for key, files in samples:
            for ext in sorted(files):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime, info.uid, info.gid, info.mode = len(files[ext]), 0, 0, 0, 0o644
                info.uname = info.gname = "root"
                tar.addfile(info, io.BytesIO(files[ext]))
    return buffer.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "demo")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pool-size", type=int, default=1024)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--swap-fraction", type=float, default=0.25)
    parser.add_argument("--epochs", type=int, default=46, help="reference training epochs (default 46)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    ensure_packages()

    started = time.time()
    entries = load_emoji_names()
    print(f"rendering {len(entries)} emoji at {IMAGE_SIZE}px ...", flush=True)
    pictures = [render_emoji(emoji, IMAGE_SIZE) for emoji, _ in entries]
    _, preprocess, tokenizer = build_model(CONFIG)
    images = torch.stack([preprocess(picture) for picture in pictures])
    tokens = tokenizer([name for _, name in entries])

    print(f"training the reference on {len(entries)} clean pairs for {args.epochs} epochs ...", flush=True)
    train_started = time.time()
    model, _, _ = train_reference(images, tokens, args.epochs, args.seed)
    train_seconds = time.time() - train_started

    rng = random.Random(args.seed)
    pool = sorted(rng.sample(range(len(entries)), args.pool_size))
    swapped = sorted(rng.sample(pool, round(args.swap_fraction * args.pool_size)))
    shifted = swapped[1:] + swapped[:1]  # a cyclic shift of a random subset: a derangement
    rng.shuffle(shifted)
    while any(a == b for a, b in zip(swapped, shifted)):
        rng.shuffle(shifted)
    caption_of = {index: entries[index][1] for index in pool}
    caption_of.update({target: entries[source][1] for target, source in zip(swapped, shifted)})
    swapped_set = set(swapped)

    shard_dir = args.out / "shards"
    shard_dir.mkdir(parents=True, exist_ok=True)
    for old in shard_dir.glob("*.tar"):
        old.unlink()
    per_shard = args.pool_size // args.shards
    for shard in range(args.shards):
        samples = []
        for index in pool[shard * per_shard : (shard + 1) * per_shard]:
            key = f"{index:09d}"
            emoji, name = entries[index]
            jpeg = io.BytesIO()
            pictures[index].save(jpeg, format="JPEG", quality=90)
            meta = {
                "uid": hashlib.sha256(key.encode()).hexdigest()[:32],
                "emoji": emoji,
                "codepoints": " ".join(f"{ord(c):04X}" for c in emoji),
                "true_caption": name,
                "caption": caption_of[index],
                "swapped": index in swapped_set,
            }
            samples.append((key, {"jpg": jpeg.getvalue(), "txt": caption_of[index].encode(),
                                  "json": json.dumps(meta, ensure_ascii=False, sort_keys=True).encode()}))
        (shard_dir / f"emoji-{shard:06d}.tar").write_bytes(tar_bytes(samples))

    (args.out / "tiny-clip.json").write_text(json.dumps(CONFIG, indent=2) + "\n")
    state = {name: value.detach().half().contiguous() for name, value in model.state_dict().items()}
    checkpoint = args.out / "reference.safetensors"
    save_file(state, str(checkpoint))

    # Check the saved (float16) checkpoint, loaded the way mimicfilter loads it.
    reloaded, _, _ = build_model(CONFIG)
    open_clip.load_checkpoint(reloaded, str(checkpoint))
    reloaded.eval()
    i2t, t2i = retrieval_top1(reloaded, images, tokens, 256)
    full_i2t, full_t2i = retrieval_top1(reloaded, images, tokens, len(images))
    with torch.no_grad():
        pool_images = images[pool]
        pool_tokens = tokenizer([caption_of[index] for index in pool])
        cosine = (F.normalize(reloaded.encode_image(pool_images), dim=-1)
                  * F.normalize(reloaded.encode_text(pool_tokens), dim=-1)).sum(-1).numpy()
    is_swapped = np.array([index in swapped_set for index in pool])
    size = sum(path.stat().st_size for path in shard_dir.glob("*.tar"))
    summary = {
        "emoji": len(entries),
        "reference_epochs": args.epochs,
        "reference_train_seconds": round(train_seconds, 1),
        "top1_in_batches_of_256": {"image_to_text": round(i2t, 3), "text_to_image": round(t2i, 3)},
        "top1_over_all": {"image_to_text": round(full_i2t, 3), "text_to_image": round(full_t2i, 3)},
        "pool": args.pool_size,
        "swapped": len(swapped),
        "reference_cosine_clean_mean": round(float(cosine[~is_swapped].mean()), 3),
        "reference_cosine_swapped_mean": round(float(cosine[is_swapped].mean()), 3),
        "reference_cosine_auroc_for_swaps": round(auroc(-cosine, is_swapped), 3),
        "shards_bytes": size,
        "checkpoint_bytes": checkpoint.stat().st_size,
        "seconds": round(time.time() - started, 1),
    }
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
