"""Stage 1 on labelled images (benchmarks/stage1.py, part 1): Fashion-MNIST with 40 % flipped labels.

Per seed: a seeded split of the 60k training images into a start set (3,000 clean images: the
"pretrained" checkpoint everyone fine-tunes from), a clean reference set and a pool whose labels
are flipped, symmetric (a uniformly random other class) or class-dependent (to the most similar
class, e.g. shirt <-> T-shirt). A small MLP (784-256-128, linear ``head``) is trained on the start
set, then fine-tuned on the clean set (the reference) and, separately, on the noisy pool: plain
AdamW on the mean loss versus the same loop with ``GradMimic`` re-weighting toward the reference.
Clean test accuracy (10k images) is recorded every ``eval_every`` steps.
"""

from __future__ import annotations

import copy
import time

import numpy as np

from common import STAGE1_SIMILAR_CLASS
from fmnist_data import flip_labels, load_fashion_mnist
from stage1_common import Curve, ab_overhead

NOISE_KINDS = ("symmetric", "class-dependent")
START_SIZE = 3000
START_STEPS = 300
LR = 1e-3
BATCH = 128


def make_model():
    import torch.nn.functional as F
    from torch import nn

    class SmallClassifier(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2, self.head = nn.Linear(784, 256), nn.Linear(256, 128), nn.Linear(128, 10)

        def forward(self, x):
            return self.head(F.relu(self.fc2(F.relu(self.fc1(x)))))

    return SmallClassifier()


def train(model, x, y, steps: int, seed: int, x_test, y_test, eval_every: int, grad_mimic=None, others="weighted",
          flipped=None) -> Curve:
    """AdamW on mean cross-entropy, or on GradMimic's loss when ``grad_mimic`` is given."""
    import torch
    import torch.nn.functional as F

    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=1e-4)
    generator = torch.Generator().manual_seed(seed)
    curve = Curve()
    model.train()
    for step in range(1, steps + 1):
        started = time.perf_counter()
        index = torch.randint(len(x), (BATCH,), generator=generator)
        losses = F.cross_entropy(model(x[index]), y[index], reduction="none")
        if grad_mimic is None:
            loss = losses.mean()
        else:
            reweighted = grad_mimic.reweight(losses, others=others)
            loss = reweighted.loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        curve.step_seconds.append(time.perf_counter() - started)
        if grad_mimic is not None:
            curve.entropy_fraction.append(reweighted.stats()["weight_entropy_fraction"])
            if flipped is not None:
                curve.noisy_weight.append(float(reweighted.weights[flipped[index]].sum()))
        if eval_every and step % eval_every == 0:
            curve.add(step, {"test_accuracy": accuracy(model, x_test, y_test)})
    model.eval()
    return curve


def accuracy(model, x, y) -> float:
    import torch

    was_training = model.training
    model.eval()
    with torch.no_grad():
        correct = (model(x).argmax(1) == y).float().mean().item()
    model.train(was_training)
    return correct


def methods(quick: bool) -> list[dict]:
    """(name, GradMimic options, starts from the shared checkpoint?, noise kinds)."""
    chosen = [
        {"name": "plain AdamW", "grad_mimic": None},
        {"name": "Grad-Mimic (defaults: head, τ 1)", "grad_mimic": {}},
    ]
    if not quick:
        chosen += [
            {"name": "Grad-Mimic τ 0.3", "grad_mimic": {"temperature": 0.3}},
            {"name": "Grad-Mimic τ 1, full split", "grad_mimic": {}, "others": "mean"},
            {"name": "Grad-Mimic τ 1, independent init", "grad_mimic": {}, "independent_init": True,
             "noise": ("symmetric",)},
        ]
    return chosen


def run(args, log) -> dict:
    """Every curve of the labelled part, the references' accuracy and the A/B step timing."""
    import torch

    from mimicfilter import GradMimic

    data = load_fashion_mnist()
    pixels = torch.tensor(data["train_images"].reshape(-1, 784), dtype=torch.float32) / 255.0
    mean, std = pixels.mean(), pixels.std()
    x_all = (pixels - mean) / std
    y_all = torch.as_tensor(data["train_labels"].astype(np.int64))
    x_test = (torch.tensor(data["test_images"].reshape(-1, 784), dtype=torch.float32) / 255.0 - mean) / std
    y_test = torch.as_tensor(data["test_labels"].astype(np.int64))
    steps, every = args.labelled_steps, args.labelled_eval_every
    result = {"curves": {}, "reference_accuracy": [], "start_accuracy": [], "noisy_weight_share": {}}
    chosen = methods(args.quick)
    for seed_index in range(args.seeds):
        seed = args.seed + seed_index
        rng = np.random.default_rng(seed)
        order = rng.permutation(len(y_all))
        start_idx = order[:START_SIZE]
        ref_idx = order[START_SIZE : START_SIZE + args.labelled_ref_size]
        pool_idx = order[START_SIZE + args.labelled_ref_size : START_SIZE + args.labelled_ref_size + args.labelled_pool_size]
        torch.manual_seed(seed)
        start = make_model()
        train(start, x_all[start_idx], y_all[start_idx], START_STEPS, seed, x_test, y_test, 0)
        reference = copy.deepcopy(start)
        train(reference, x_all[ref_idx], y_all[ref_idx], args.labelled_ref_steps, seed + 1, x_test, y_test, 0)
        result["start_accuracy"].append(accuracy(start, x_test, y_test))
        result["reference_accuracy"].append(accuracy(reference, x_test, y_test))
        log(f"labelled seed {seed}: start acc {result['start_accuracy'][-1]:.4f}, reference acc "
            f"{result['reference_accuracy'][-1]:.4f}")
        for kind in NOISE_KINDS:
            true = data["train_labels"][pool_idx].astype(np.int64)
            noisy = flip_labels(true, args.noise, kind, rng, STAGE1_SIMILAR_CLASS)  # (class-dependent: this map)
            flipped = noisy != true
            x_pool, y_pool, flipped = x_all[pool_idx], torch.as_tensor(noisy), torch.as_tensor(flipped)
            for method in chosen:
                if kind not in method.get("noise", NOISE_KINDS):
                    continue
                if method.get("independent_init"):
                    torch.manual_seed(seed + 1000)
                    model = make_model()
                else:
                    model = copy.deepcopy(start)
                grad_mimic = (GradMimic(model, reference, task="classify", **method["grad_mimic"])
                              if method["grad_mimic"] is not None else None)
                curve = train(model, x_pool, y_pool, steps, seed + 2, x_test, y_test, every, grad_mimic,
                              method.get("others", "weighted"), flipped)
                result["curves"].setdefault(kind, {}).setdefault(method["name"], []).append(curve)
                log(f"  {kind:15s} {method['name']:34s} final acc {curve.final('test_accuracy'):.4f} "
                    f"(median step {1000 * np.median(curve.step_seconds):.1f} ms)")
    result["timing"] = time_steps(x_all[:4096], y_all[:4096], args.timing_pairs, chosen)
    return result


def time_steps(x, y, pairs: int, chosen: list[dict]) -> dict:
    """A/B: a plain step against a re-weighted step of the same model size on the same batches."""
    import torch
    import torch.nn.functional as F

    from mimicfilter import GradMimic

    torch.manual_seed(0)
    reference = make_model()
    timings = {}
    for method in chosen:
        if method["grad_mimic"] is None:
            continue
        plain_model, weighted_model = make_model(), make_model()
        optimizers = [torch.optim.AdamW(m.parameters(), lr=LR) for m in (plain_model, weighted_model)]
        grad_mimic = GradMimic(weighted_model, reference, task="classify", **method["grad_mimic"])
        generator = torch.Generator().manual_seed(1)
        batches = [torch.randint(len(x), (BATCH,), generator=generator) for _ in range(8)]
        counter = {"a": 0, "b": 0}

        def step(model, optimizer, key, weighted):
            index = batches[counter[key] % len(batches)]
            counter[key] += 1
            losses = F.cross_entropy(model(x[index]), y[index], reduction="none")
            loss = grad_mimic.reweight(losses, others=method.get("others", "weighted")).loss if weighted else losses.mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        timings[method["name"]] = ab_overhead(lambda: step(plain_model, optimizers[0], "a", False),
                                              lambda: step(weighted_model, optimizers[1], "b", True), pairs)
    return timings
