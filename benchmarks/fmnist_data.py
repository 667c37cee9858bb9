"""Fashion-MNIST for the labelled benchmarks: the data, noisy-label pools as WebDataset shards, and
a small reference (an open_clip image tower with a linear head) for ``score --task classify``.

Data: Debian's ``dataset-fashion-mnist`` (idx gz files under /usr/share/datasets/fashion-mnist;
installed with apt-get when missing and running as root). 60k train + 10k test images, 28x28
grayscale, 10 classes.

Reference: a tiny open_clip CLIP built by open_clip's factory from a JSON config (``local-dir:``
schema, grayscale mean/std in its preprocess_cfg). Its image tower and a linear head, in
mimicfilter's ImageClassifier form (logits = s * W normalize(f) + b, s fixed), are trained with
cross-entropy on clean images only. The images go through exactly the preprocessing that
``open_clip.create_model_and_transforms(...)[2]`` gives (gray PNG -> RGB, as mimicfilter decodes
it). Saved: the full CLIP state dict (.safetensors) and the head {weight [C, D], bias [C],
logit_scale (0-d)}.

Used by benchmarks/quality_fashion_mnist.py, defaults_suite.py, bench_extrapolate.py and
stage1_labelled.py.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from common import SIMILAR_CLASS, digest, png_bytes, save_head, save_state_dict, stamped, write_pool, write_stamp
from debian_packages import install as install_debian_packages  # (scripts/, importable once common is)

DATA_DIR = Path("/usr/share/datasets/fashion-mnist")
DATA_PACKAGE = "dataset-fashion-mnist"
DATA_FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
IMAGE_SIZE = 28
MODEL_CFG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": IMAGE_SIZE, "patch_size": 4, "width": 96, "layers": 3, "head_width": 32},
    # The text tower is never used by --task classify with a trained head; keep it minimal
    # (vocab_size must stay 49408, the size of open_clip's tokenizer).
    "text_cfg": {"context_length": 8, "vocab_size": 49408, "width": 32, "heads": 1, "layers": 1},
}
HEAD_SCALE = 16.0  # the fixed s of logits = s * W normalize(f) + b


# --------------------------------------------------------------------------------------------- data


def ensure_dataset() -> None:
    """Install the Debian package when the files are missing (as root), else exit with a hint."""
    if all((DATA_DIR / name).is_file() for name in DATA_FILES.values()):
        return
    install_debian_packages([DATA_PACKAGE], f"Fashion-MNIST (the idx files in {DATA_DIR})")
    if not all((DATA_DIR / name).is_file() for name in DATA_FILES.values()):
        sys.exit(f"error: {DATA_PACKAGE} is installed but {DATA_DIR} lacks the idx files")


def read_idx(path: Path) -> np.ndarray:
    """An idx file (gzip): magic 0x0000 08 NDIM, NDIM big-endian uint32 sizes, then uint8 data."""
    data = gzip.decompress(path.read_bytes())
    if data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte idx file")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_fashion_mnist() -> dict[str, np.ndarray]:
    ensure_dataset()
    arrays = {name: read_idx(DATA_DIR / file) for name, file in DATA_FILES.items()}
    assert arrays["train_images"].shape == (60000, 28, 28) and arrays["test_images"].shape == (10000, 28, 28)
    return arrays


def flip_labels(labels: np.ndarray, noise: float, kind: str, rng: np.random.Generator,
                similar: dict[int, int] = SIMILAR_CLASS) -> np.ndarray:
    """Exactly round(noise * n) labels flipped: ``symmetric`` to a uniformly random other class,
    ``class-dependent`` to the class's similar class (``similar``: common.py's maps)."""
    flipped = np.zeros(len(labels), dtype=bool)
    flipped[rng.choice(len(labels), size=int(round(noise * len(labels))), replace=False)] = True
    if kind == "class-dependent":
        other = np.array([similar[int(label)] for label in labels])
    else:  # 1..C-1 added: uniform over the other classes
        other = (labels + rng.integers(1, len(CLASSES), size=len(labels))) % len(CLASSES)
    return np.where(flipped, other, labels)


def split_and_flip(labels: np.ndarray, ref_size: int, pool_size: int, noise: float, seed: int):
    """Disjoint reference / pool indices into the train split, the pool's true and noisy labels
    (symmetric noise) and the flipped mask."""
    if ref_size + pool_size > len(labels):
        sys.exit(f"error: --ref-size + --pool-size = {ref_size + pool_size} > {len(labels)} train images")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(labels))
    ref_idx, pool_idx = order[:ref_size], order[ref_size : ref_size + pool_size]
    true = labels[pool_idx].astype(np.int64)
    noisy = flip_labels(true, noise, "symmetric", rng)
    return ref_idx, pool_idx, true, noisy, noisy != true


def write_shards(out: Path, images, true, noisy, flipped, shards: int, seed: int) -> dict[tuple[str, str], int]:
    """The pool as WebDataset tars: ``KEY.png`` (28x28 gray), ``KEY.cls`` (the possibly flipped label),
    ``KEY.json`` {"uid", "true_label", "flipped"}; returns (shard file name, key) -> pool position."""

    def files(position: int) -> dict[str, bytes]:
        uid = hashlib.md5(f"fmnist-{seed}-{position}".encode()).hexdigest()
        meta = {"uid": uid, "true_label": int(true[position]), "flipped": bool(flipped[position])}
        return {"png": png_bytes(images[position], "L"), "cls": str(int(noisy[position])).encode(),
                "json": json.dumps(meta, sort_keys=True).encode()}

    out.mkdir(parents=True, exist_ok=True)
    return write_pool(out, len(images), shards, "fmnist-pool", files)


# ---------------------------------------------------------------------------------------- reference


def write_model_config(directory: Path, mean: float, std: float) -> Path:
    """open_clip's local-dir schema; the same file is mimicfilter's --model config."""
    directory.mkdir(parents=True, exist_ok=True)
    config = {"model_cfg": MODEL_CFG, "preprocess_cfg": {"mean": [mean] * 3, "std": [std] * 3}}
    path = directory / "open_clip_config.json"
    path.write_text(json.dumps(config, indent=2))
    return path


def pixel_stats(images: np.ndarray) -> tuple[float, float]:
    """Mean and std of the pixels in [0, 1], rounded as the model config records them."""
    pixels = images.astype(np.float64) / 255.0
    return round(float(pixels.mean()), 4), round(float(pixels.std()), 4)


def build_clip(config_dir: Path):
    import logging

    import open_clip

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # "no pretrained weights": intended
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{config_dir}")
    finally:
        root.setLevel(level)
    return model, preprocess


def preprocess_all(images: np.ndarray, preprocess):
    """open_clip's eval preprocessing of each image, after the gray -> RGB conversion mimicfilter does."""
    import torch
    from PIL import Image

    return torch.stack([preprocess(Image.fromarray(image, mode="L").convert("RGB")) for image in images])


def head_logits(model, head, images):
    import torch.nn.functional as F

    return HEAD_SCALE * head(F.normalize(model.visual(images), dim=-1))


def train_reference(model, x_train, y_train, epochs: int, batch_size: int, lr: float, seed: int):
    """Image tower + linear head, cross-entropy on the clean set, AdamW with a cosine schedule."""
    import torch
    import torch.nn.functional as F

    torch.manual_seed(seed)
    head = torch.nn.Linear(MODEL_CFG["embed_dim"], len(CLASSES))
    parameters = list(model.visual.parameters()) + list(head.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.05)
    steps_per_epoch = -(-len(x_train) // batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=lr, total_steps=epochs * steps_per_epoch, pct_start=0.1, anneal_strategy="cos"
    )
    generator = torch.Generator().manual_seed(seed)
    model.train()
    history = []
    for epoch in range(epochs):
        order = torch.randperm(len(x_train), generator=generator)
        total, correct, loss_sum = 0, 0, 0.0
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            images, labels = x_train[batch], y_train[batch]
            # Light augmentation: random horizontal flips (Fashion-MNIST items are mostly symmetric).
            flip = torch.rand(len(batch), generator=generator) < 0.5
            images = torch.where(flip[:, None, None, None], images.flip(-1), images)
            logits = head_logits(model, head, images)
            loss = F.cross_entropy(logits, labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total += len(batch)
            correct += (logits.argmax(1) == labels).sum().item()
            loss_sum += loss.item() * len(batch)
        history.append({"epoch": epoch, "train_loss": loss_sum / total, "train_acc": correct / total})
    model.eval()
    return head, history


def classifier_accuracy(model, head, images, labels, batch_size: int = 1000) -> float:
    import torch

    correct = 0
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            logits = head_logits(model, head, images[start : start + batch_size])
            correct += (logits.argmax(1) == labels[start : start + batch_size]).sum().item()
    return correct / len(images)


class Reference:
    """A trained reference in ``model_dir``: config/open_clip_config.json (``--model``),
    reference.safetensors (``--reference``), head.pt (``--reference-head``) and its clean test accuracy.

    Trained from the images ``ref_idx`` of the train split unless the same reference (config, seed,
    epochs, lr, threads, split) is already there; ``cache=False`` always trains afresh. ``trained``
    holds (model, head, preprocess, history) when this process trained it."""

    def __init__(self, model_dir: Path, data: dict, ref_idx: np.ndarray, epochs: int, seed: int, threads: int,
                 lr: float = 2e-3, cache: bool = True):
        mean, std = pixel_stats(data["train_images"][ref_idx])
        self.config_path = model_dir / "config" / "open_clip_config.json"
        self.reference_path, self.head_path = model_dir / "reference.safetensors", model_dir / "head.pt"
        stamp = {"config": MODEL_CFG, "seed": seed, "epochs": epochs, "threads": threads, "split": digest(ref_idx),
                 "mean": mean, "std": std, **({"lr": lr} if lr != 2e-3 else {})}
        self.trained = None
        if not (cache and stamped(self.head_path, stamp)):
            import torch

            started = time.time()
            print(f"training the Fashion-MNIST reference on {len(ref_idx)} clean images ...", flush=True)
            # open_clip's local-dir: schema loads any *.safetensors lying beside open_clip_config.json,
            # which would silently warm-start from a previous run: the config gets a directory of its own
            shutil.rmtree(model_dir, ignore_errors=True)
            write_model_config(self.config_path.parent, mean, std)
            torch.manual_seed(seed)
            model, preprocess = build_clip(self.config_path.parent)
            x_ref = preprocess_all(data["train_images"][ref_idx], preprocess)
            y_ref = torch.as_tensor(data["train_labels"][ref_idx].astype(np.int64))
            head, history = train_reference(model, x_ref, y_ref, epochs, 256, lr, seed)
            save_state_dict(model, self.reference_path)
            save_head(head, HEAD_SCALE, self.head_path)
            x_test = preprocess_all(data["test_images"], preprocess)
            accuracy = classifier_accuracy(model, head, x_test, torch.as_tensor(data["test_labels"].astype(np.int64)))
            (model_dir / "accuracy.json").write_text(json.dumps({"clean_test_accuracy": accuracy}))
            write_stamp(self.head_path, stamp)
            self.trained = (model, head, preprocess, history)
            print(f"  clean test accuracy {accuracy:.3f}; {time.time() - started:.0f} s", flush=True)
        self.accuracy = json.loads((model_dir / "accuracy.json").read_text())["clean_test_accuracy"]

    def score_options(self) -> list[str]:
        return ["--model", str(self.config_path), "--reference", str(self.reference_path),
                "--reference-head", str(self.head_path), "--task", "classify"]
