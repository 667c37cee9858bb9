"""Quality benchmark: can mimic scores find flipped labels on Fashion-MNIST (``--task classify``)?

    python benchmarks/quality_fashion_mnist.py            # defaults: about 10 minutes on 2 CPU cores
    python benchmarks/quality_fashion_mnist.py --quick    # smaller everything: about 2 minutes

What it does (everything seeded from ``--seed``):

1. Data: Debian's ``dataset-fashion-mnist`` (idx gz files under /usr/share/datasets/fashion-mnist;
   installed with apt-get when missing and running as root). 60k train + 10k test images, 28x28
   grayscale, 10 classes.
2. Split: a seeded permutation of the train split gives a clean reference-training set
   (``--ref-size``) and a disjoint pool (``--pool-size``). In the pool a fraction ``--noise`` of
   the labels (exactly round(noise * pool) samples) is flipped symmetrically: each flipped label
   becomes a uniformly random *other* class.
3. Reference: a tiny open_clip CLIP built by open_clip's factory from a JSON config (``local-dir:``
   schema, grayscale mean/std in its preprocess_cfg). Its image tower and a linear head, in
   mimicfilter's ImageClassifier form (logits = s * W normalize(f) + b, s fixed), are trained with
   cross-entropy on the clean set only. The images go through exactly the preprocessing that
   ``open_clip.create_model_and_transforms(...)[2]`` gives (gray PNG -> RGB, as mimicfilter
   decodes it). Saved: the full CLIP state dict (.safetensors) and the head
   {weight [C, D], bias [C], logit_scale (0-d)}.
4. Pool -> WebDataset shards: ``KEY.png`` (28x28 gray), ``KEY.cls`` (the possibly flipped label),
   ``KEY.json`` {"uid", "true_label", "flipped"}.
5. Scoring with the real CLI (subprocess, timed): ``mimicfilter score ... --task classify
   --train head --epochs E --lr LR --temperature T`` for each LR of ``--lrs`` (1e-4 is the CLI's
   default) and T of ``--temperatures``; a control at the last LR with T = ``--control-temperature``
   (1e4: every weight ~ 1, i.e. plain unweighted training of the proxy head); and one
   ``--train none`` (static) run.
6. Evaluation, joined to the truth by (shard, key):
   (a) the paper's rule: a sample is flagged noisy unless its relative weight ``mimic_weight`` > 1
       in the majority (> half) of the epochs -> precision / recall / F1 of flagging, kept fraction;
   (b) AUROC of the mean mimic score over epochs (low = noisy);
   (c) baselines: AUROC of the reference's loss ``ref_loss`` (high = noisy), of the proxy's loss
       ``loss`` (mean over epochs, high = noisy), and of random numbers.
   Also, for every score, F1 when flagging exactly the true noise fraction (its best-case
   threshold, where precision = recall), and the tau -> infinity limit of rule (a) on the same
   trajectory (r_i > 1 <=> s_i > mean of its batch).

Prints tables, the exact commands, and a JSON blob with every number (also written to
``WORKDIR/results.json``).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

from mimicfilter import metrics

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
THREADS = 2


# --------------------------------------------------------------------------------------------- data


def ensure_dataset() -> None:
    """Install the Debian package when the files are missing (as root), else exit with a hint."""
    if all((DATA_DIR / name).is_file() for name in DATA_FILES.values()):
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        sys.exit(f"error: Fashion-MNIST not found in {DATA_DIR}: install it with `sudo apt-get install {DATA_PACKAGE}`")
    print(f"installing {DATA_PACKAGE} with apt-get ...", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "-qq", DATA_PACKAGE], check=True, env=env)
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


def split_and_flip(labels: np.ndarray, ref_size: int, pool_size: int, noise: float, seed: int):
    """Disjoint reference / pool indices into the train split, and the pool's noisy labels."""
    if ref_size + pool_size > len(labels):
        sys.exit(f"error: --ref-size + --pool-size = {ref_size + pool_size} > {len(labels)} train images")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(labels))
    ref_idx, pool_idx = order[:ref_size], order[ref_size : ref_size + pool_size]
    true = labels[pool_idx].astype(np.int64)
    flipped = np.zeros(pool_size, dtype=bool)
    flipped[rng.choice(pool_size, size=int(round(noise * pool_size)), replace=False)] = True
    offsets = rng.integers(1, len(CLASSES), size=pool_size)  # 1..C-1: uniform over the other classes
    noisy = np.where(flipped, (true + offsets) % len(CLASSES), true)
    return ref_idx, pool_idx, true, noisy, flipped


def png_bytes(image: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image, mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def write_shards(out: Path, images, true, noisy, flipped, shards: int, seed: int) -> dict[tuple[str, str], int]:
    """The pool as WebDataset tars; returns (shard file name, key) -> pool position."""
    out.mkdir(parents=True, exist_ok=True)
    where = {}
    per_shard = -(-len(images) // shards)
    for shard in range(shards):
        name = f"fmnist-pool-{shard:05d}.tar"
        with tarfile.open(out / name, "w", format=tarfile.USTAR_FORMAT) as tar:
            for position in range(shard * per_shard, min(len(images), (shard + 1) * per_shard)):
                key = f"{position:06d}"
                uid = hashlib.md5(f"fmnist-{seed}-{position}".encode()).hexdigest()
                meta = {"uid": uid, "true_label": int(true[position]), "flipped": bool(flipped[position])}
                for ext, payload in (
                    ("png", png_bytes(images[position])),
                    ("cls", str(int(noisy[position])).encode()),
                    ("json", json.dumps(meta, sort_keys=True).encode()),
                ):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size, info.mtime, info.mode, info.uname, info.gname = len(payload), 0, 0o644, "", ""
                    tar.addfile(info, io.BytesIO(payload))
                where[(name, key)] = position
    return where


# ---------------------------------------------------------------------------------------- reference


def write_model_config(directory: Path, mean: float, std: float) -> Path:
    """open_clip's local-dir schema; the same file is mimicfilter's --model config."""
    directory.mkdir(parents=True, exist_ok=True)
    config = {"model_cfg": MODEL_CFG, "preprocess_cfg": {"mean": [mean] * 3, "std": [std] * 3}}
    path = directory / "open_clip_config.json"
    path.write_text(json.dumps(config, indent=2))
    return path


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


def preprocess_all(images: np.ndarray, preprocess) -> "torch.Tensor":
    """open_clip's eval preprocessing of each image, after the gray -> RGB conversion mimicfilter does."""
    import torch
    from PIL import Image

    return torch.stack([preprocess(Image.fromarray(image, mode="L").convert("RGB")) for image in images])


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
            logits = HEAD_SCALE * head(F.normalize(model.visual(images), dim=-1))
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
    import torch.nn.functional as F

    correct = 0
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            logits = HEAD_SCALE * head(F.normalize(model.visual(images[start : start + batch_size]), dim=-1))
            correct += (logits.argmax(1) == labels[start : start + batch_size]).sum().item()
    return correct / len(images)


# ------------------------------------------------------------------------------------------ metrics


def auroc(positive: np.ndarray, score: np.ndarray) -> float:
    """P(score of a positive > score of a negative), ties counted half (Mann-Whitney)."""
    return metrics.auroc(score, positive)


def flag_metrics(flagged: np.ndarray, noisy: np.ndarray) -> dict:
    result = metrics.detection(flagged, noisy)
    return {
        "precision": result.precision,
        "recall": result.recall,
        "f1": result.f1,
        "flagged_fraction": float(flagged.mean()),
        "kept_fraction": float(1 - flagged.mean()),
    }


def f1_at_rate(noisy: np.ndarray, noisiness: np.ndarray) -> float:
    """F1 when flagging the round(rate * n) noisiest samples, rate = the true noise fraction."""
    count = int(noisy.sum())
    flagged = np.zeros(len(noisy), dtype=bool)
    flagged[np.argsort(-noisiness, kind="mergesort")[:count]] = True
    return flag_metrics(flagged, noisy)["f1"]


def evaluate_run(run_dir: Path, where: dict, flipped: np.ndarray, noisy_labels: np.ndarray, seed: int):
    """Join the score table to the truth; every metric of the benchmark, and the table's ref_loss by pool position."""
    from mimicfilter.store.parts import read_scores

    table = read_scores(run_dir).to_pydict()
    n_rows = len(table["key"])
    statuses = set(table["status"])
    if statuses != {"ok"}:
        raise RuntimeError(f"{run_dir}: rows with status {statuses - {'ok'}}")
    epochs = sorted(set(table["epoch"]))
    n, n_epochs = len(flipped), len(epochs)
    shape = (n_epochs, n)
    columns = {name: np.full(shape, np.nan) for name in ("mimic_score", "mimic_weight", "loss", "ref_loss")}
    step = np.full(shape, -1, dtype=np.int64)
    seen = np.zeros(shape, dtype=np.int64)
    for row in range(n_rows):
        position = where[(Path(table["shard"][row]).name, table["key"][row])]
        epoch = epochs.index(table["epoch"][row])
        if table["label"][row] != noisy_labels[position]:
            raise RuntimeError(f"label mismatch for key {table['key'][row]}")
        seen[epoch, position] += 1
        step[epoch, position] = table["step"][row]
        for name in columns:
            columns[name][epoch, position] = table[name][row]
    if not (seen == 1).all():
        raise RuntimeError(f"{run_dir}: not every sample scored exactly once per epoch")
    noisy = flipped.astype(bool)
    score, weight = columns["mimic_score"], columns["mimic_weight"]
    mean_score = score.mean(axis=0)

    # (a) the paper's rule: kept iff r > 1 in more than half of the epochs.
    kept = (weight > 1).sum(axis=0) > n_epochs / 2
    rule = flag_metrics(~kept, noisy)
    # Its tau -> infinity limit on the same trajectory: r > 1 <=> score above its batch's mean.
    above_mean = np.zeros(shape, dtype=bool)
    for epoch in range(n_epochs):
        for batch in np.unique(step[epoch]):
            members = step[epoch] == batch
            above_mean[epoch, members] = score[epoch, members] > score[epoch, members].mean()
    kept_inf = above_mean.sum(axis=0) > n_epochs / 2
    rule_inf = flag_metrics(~kept_inf, noisy)

    random_scores = np.random.default_rng(seed + 12345).random(n)
    noisiness = {  # higher = more likely flipped
        "mimic_score (mean over epochs)": -mean_score,
        "ref_loss (reference)": columns["ref_loss"].mean(axis=0),
        "loss (proxy, mean over epochs)": columns["loss"].mean(axis=0),
        "random": random_scores,
    }
    return {
        "rows": n_rows,
        "epochs": n_epochs,
        "rule_a": rule,
        "rule_a_tau_inf": rule_inf,
        "weight_gt1_fraction_per_epoch": [float((weight[e] > 1).mean()) for e in range(n_epochs)],
        "weight_max_mean": float(weight.max(axis=1).mean()),
        "mimic_score_std_per_epoch": [float(score[e].std()) for e in range(n_epochs)],
        "mimic_score_auroc_per_epoch": [auroc(noisy, -score[e]) for e in range(n_epochs)],
        "auroc": {name: auroc(noisy, values) for name, values in noisiness.items()},
        "f1_at_true_rate": {name: f1_at_rate(noisy, values) for name, values in noisiness.items()},
        "mean_score_clean": float(mean_score[~noisy].mean()),
        "mean_score_flipped": float(mean_score[noisy].mean()),
    }, columns["ref_loss"][0]


# ------------------------------------------------------------------------------------------- runner


def mimicfilter_executable() -> list[str]:
    beside = Path(sys.executable).with_name("mimicfilter")
    return [str(beside)] if beside.exists() else [sys.executable, "-m", "mimicfilter"]


def run_cli(command: list[str]) -> tuple[dict, float]:
    started = time.time()
    done = subprocess.run(command, capture_output=True, text=True)
    elapsed = time.time() - started
    if done.returncode != 0:
        sys.stderr.write(done.stdout + done.stderr)
        raise SystemExit(f"error: mimicfilter exited with {done.returncode}: {shlex.join(command)}")
    return json.loads(done.stdout), elapsed


def print_table(title: str, header: list[str], rows: list[list]) -> None:
    cells = [[str(c) for c in header]] + [[f"{c:.3f}" if isinstance(c, float) else str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    print(f"\n{title}")
    line = "  ".join("-" * w for w in widths)
    print(line)
    for index, row in enumerate(cells):
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
        if index == 0:
            print(line)
    print(line)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="small run (about 1-2 minutes)")
    parser.add_argument("--ref-size", type=int, default=None, help="clean reference-training images [20000; quick 10000]")
    parser.add_argument("--pool-size", type=int, default=None, help="pool images to score [10000; quick 2000]")
    parser.add_argument("--noise", type=float, default=0.4, help="fraction of pool labels flipped")
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--ref-epochs", type=int, default=None, help="reference training epochs [10; quick 5]")
    parser.add_argument("--ref-lr", type=float, default=2e-3)
    parser.add_argument("--epochs", type=int, default=None, help="proxy trajectory epochs of `score --train head` [5; quick 3]")
    parser.add_argument("--temperatures", default=None, help="comma-separated --temperature values [0.05,0.2,1.0; quick 0.2,1.0]")
    parser.add_argument("--lrs", default=None,
                        help="comma-separated proxy --lr values (1e-4 is mimicfilter's default) [1e-4,1e-3,1e-2; quick 1e-4,1e-2]")
    parser.add_argument("--control-temperature", type=float, default=1e4,
                        help="an extra run at the last --lrs value with this tau: weights ~ 1, i.e. no re-weighting (0: skip)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--no-static", action="store_true", help="skip the --train none run")
    parser.add_argument("--workdir", type=Path, default=None, help="where data, models and runs go [a new temp dir, kept]")
    parser.add_argument("--json-out", type=Path, default=None, help="also write the results JSON here")
    args = parser.parse_args(argv)
    quick = args.quick
    args.ref_size = args.ref_size or (10000 if quick else 20000)
    args.pool_size = args.pool_size or (2000 if quick else 10000)
    args.ref_epochs = args.ref_epochs or (5 if quick else 10)
    args.epochs = args.epochs or (3 if quick else 5)
    args.temperatures = [float(t) for t in (args.temperatures or ("0.2,1.0" if quick else "0.05,0.2,1.0")).split(",")]
    args.lrs = [float(v) for v in (args.lrs or ("1e-4,1e-2" if quick else "1e-4,1e-3,1e-2")).split(",")]
    if not 0 < args.noise < 1:
        parser.error("--noise must lie in (0, 1)")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    import torch
    from safetensors.torch import save_file

    torch.set_num_threads(THREADS)
    started = time.time()
    timings = {}
    work = args.workdir or Path(tempfile.mkdtemp(prefix="fmnist-mimic-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"workdir: {work}", flush=True)

    # 1-2. data and split
    t = time.time()
    data = load_fashion_mnist()
    ref_idx, pool_idx, true, noisy_labels, flipped = split_and_flip(
        data["train_labels"], args.ref_size, args.pool_size, args.noise, args.seed
    )
    ref_pixels = data["train_images"][ref_idx].astype(np.float64) / 255.0
    mean, std = round(float(ref_pixels.mean()), 4), round(float(ref_pixels.std()), 4)
    shard_dir = work / "pool"
    shutil.rmtree(shard_dir, ignore_errors=True)
    where = write_shards(shard_dir, data["train_images"][pool_idx], true, noisy_labels, flipped, args.shards, args.seed)
    timings["data_and_shards_s"] = time.time() - t
    print(f"pool: {len(pool_idx)} images in {args.shards} shards, {int(flipped.sum())} labels flipped "
          f"({flipped.mean():.1%}); reference set: {len(ref_idx)} clean images; mean/std {mean}/{std}", flush=True)

    # 3. reference
    t = time.time()
    # The config gets a directory of its own: open_clip's local-dir: schema loads any *.safetensors
    # lying beside open_clip_config.json, which would silently warm-start from a previous run.
    shutil.rmtree(work / "model", ignore_errors=True)
    config_path = write_model_config(work / "model" / "config", mean, std)
    torch.manual_seed(args.seed)
    model, preprocess = build_clip(config_path.parent)
    x_ref = preprocess_all(data["train_images"][ref_idx], preprocess)
    x_test = preprocess_all(data["test_images"], preprocess)
    x_pool = preprocess_all(data["train_images"][pool_idx], preprocess)
    y_ref = torch.as_tensor(data["train_labels"][ref_idx].astype(np.int64))
    y_test = torch.as_tensor(data["test_labels"].astype(np.int64))
    head, history = train_reference(model, x_ref, y_ref, args.ref_epochs, 256, args.ref_lr, args.seed)
    reference_path, head_path = work / "model" / "reference.safetensors", work / "model" / "head.pt"
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(reference_path))
    torch.save(
        {"weight": head.weight.detach().clone(), "bias": head.bias.detach().clone(), "logit_scale": torch.tensor(HEAD_SCALE)},
        head_path,
    )
    test_acc = classifier_accuracy(model, head, x_test, y_test)
    pool_acc_true = classifier_accuracy(model, head, x_pool, torch.as_tensor(true))
    with torch.no_grad():
        pool_logits = HEAD_SCALE * head(torch.nn.functional.normalize(model.visual(x_pool), dim=-1))
        our_ref_loss = torch.nn.functional.cross_entropy(
            pool_logits, torch.as_tensor(noisy_labels), reduction="none").numpy()
    timings["reference_training_s"] = time.time() - t
    print(f"reference: {args.ref_epochs} epochs in {timings['reference_training_s']:.0f} s, "
          f"train acc {history[-1]['train_acc']:.3f}, clean test acc {test_acc:.4f}, pool acc (true labels) "
          f"{pool_acc_true:.4f}", flush=True)
    del x_ref, x_test, x_pool

    # 5. score with the CLI
    base = mimicfilter_executable() + [
        "score", str(shard_dir), "--model", str(config_path), "--reference", str(reference_path),
        "--reference-head", str(head_path), "--task", "classify", "--batch-size", str(args.batch_size),
        "--seed", str(args.seed), "--json", "--quiet",
    ]
    def head_run(lr, tau):
        return (f"head lr={lr:g} tau={tau:g}", f"head-lr{lr:g}-tau{tau:g}",
                ["--train", "head", "--epochs", str(args.epochs), "--lr", f"{lr:g}", "--temperature", f"{tau:g}"])

    runs = [head_run(lr, tau) for lr in args.lrs for tau in args.temperatures]
    if args.control_temperature:
        runs.append(head_run(args.lrs[-1], args.control_temperature))
    if not args.no_static:
        runs.append(("static (none) tau=1", "static-tau1", ["--train", "none", "--temperature", "1"]))
    results = {}
    ref_loss_diff = 0.0
    for name, directory, extra in runs:
        run_dir = work / "runs" / directory
        shutil.rmtree(run_dir, ignore_errors=True)
        command = base + extra + ["--out", str(run_dir)]
        print(f"scoring: {name} ...", flush=True)
        stats, elapsed = run_cli(command)
        metrics, table_ref_loss = evaluate_run(run_dir, where, flipped, noisy_labels, args.seed)
        ref_loss_diff = max(ref_loss_diff, float(np.abs(table_ref_loss - our_ref_loss).max()))
        results[name] = {"command": shlex.join(command), "wall_s": elapsed, "cli_stats": stats, **metrics}
        print(f"  {elapsed:.1f} s; rule (a) F1 {metrics['rule_a']['f1']:.3f}; "
              f"AUROC mimic {metrics['auroc']['mimic_score (mean over epochs)']:.3f}", flush=True)
    timings["total_s"] = time.time() - started

    # 6-7. tables
    first = next(iter(results.values()))
    print_table(
        f"Fashion-MNIST, pool {args.pool_size}, {flipped.mean():.0%} labels flipped; reference clean test acc "
        f"{test_acc:.4f}; detection of flipped labels (rule (a): flag unless r > 1 in most epochs)",
        ["run", "epochs", "wall s", "rule(a) P", "R", "F1", "kept", "rule(a) tau=inf F1", "kept", "AUROC mimic"],
        [[name, r["epochs"], f"{r['wall_s']:.1f}", r["rule_a"]["precision"], r["rule_a"]["recall"], r["rule_a"]["f1"],
          r["rule_a"]["kept_fraction"], r["rule_a_tau_inf"]["f1"], r["rule_a_tau_inf"]["kept_fraction"],
          r["auroc"]["mimic_score (mean over epochs)"]] for name, r in results.items()],
    )
    print(f"(true clean fraction {1 - flipped.mean():.3f}; random flagging at the true rate has P = R = F1 = {flipped.mean():.3f})")
    print_table(
        "Scores as detectors (AUROC, and F1 flagging exactly the true noise fraction)",
        ["score (run)", "AUROC", "F1 @ true rate"],
        [[f"{name} ({run})", r["auroc"][name], r["f1_at_true_rate"][name]]
         for run, r in results.items() for name in ("mimic_score (mean over epochs)", "loss (proxy, mean over epochs)")]
        + [[f"{name}", first["auroc"][name], first["f1_at_true_rate"][name]] for name in ("ref_loss (reference)", "random")],
    )
    print_table(
        "Per epoch: fraction with r > 1 and AUROC of that epoch's mimic score",
        ["run", "r>1 fraction per epoch", "AUROC per epoch"],
        [[name, " ".join(f"{v:.2f}" for v in r["weight_gt1_fraction_per_epoch"]),
          " ".join(f"{v:.3f}" for v in r["mimic_score_auroc_per_epoch"])] for name, r in results.items()],
    )
    print(f"\nreference consistency: max |ref_loss(CLI) - ref_loss(this script's model)| = {ref_loss_diff:.2e}")
    print("\ncommands:")
    print(f"  {shlex.join([sys.executable, *sys.argv])}")
    for r in results.values():
        print(f"  {r['command']}")
    blob = {
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "platform": {"python": platform.python_version(), "torch": torch.__version__, "threads": THREADS,
                     "cpu_count": os.cpu_count(), "machine": platform.machine()},
        "data": {"ref_size": len(ref_idx), "pool_size": len(pool_idx), "flipped": int(flipped.sum()),
                 "mean": mean, "std": std, "shards": args.shards},
        "model_cfg": MODEL_CFG,
        "head_scale": HEAD_SCALE,
        "reference": {"test_accuracy": test_acc, "pool_accuracy_true_labels": pool_acc_true, "history": history,
                      "ref_loss_max_abs_diff_vs_cli": ref_loss_diff},
        "runs": results,
        "timings": timings,
        "workdir": str(work),
    }
    text = json.dumps(blob, indent=2, default=float)
    (work / "results.json").write_text(text)
    if args.json_out:
        args.json_out.write_text(text)
    print("\nresults JSON:")
    print(text)
    print(f"\ntotal {timings['total_s']:.0f} s")


if __name__ == "__main__":
    main()
