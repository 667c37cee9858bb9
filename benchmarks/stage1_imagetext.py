"""Stage 1 on image–text pairs (benchmarks/stage1.py, part 2): a small CLIP trained from scratch on
the noisy emoji pool of the image–text quality benchmark (benchmarks/imagetext_data.py: its data,
corruption, model config, training loop and retrieval metric are imported, not copied).

The reference is that benchmark's reference: the same CLIP trained on the clean reference split.
Each seed trains the CLIP from scratch on the 40 %-corrupted pool with the same loop, plain (mean
per-sample loss) or with ``GradMimic`` re-weighting toward the reference, mimic layers = the image
projection or the image tower's last MLP block; held-out loss and recall@1/5 (500 clean held-out
pairs, never in the pool or the reference split) are recorded every ``eval_every`` steps.

To fit the issue's time budget (36 CLIP trainings on 2 CPU cores) the CLIP is smaller than the
quality benchmark's: 32-pixel emoji, a 3-block image tower of width 64, and a text vocabulary of
only the tokens the emoji names use (open_clip's 49,408-row embedding and its AdamW update were
two thirds of a step). The re-weighting sees the same kind of model, only cheaper.
"""

from __future__ import annotations

import numpy as np

import imagetext_data as imagetext
from stage1_common import Curve, ab_overhead

IMAGE_SIZE = 32
TEXT_CONTEXT = 16


def stage1_config(vocab_size: int) -> dict:
    """The quality benchmark's CLIP config, shrunk (see the module docstring)."""
    return {**imagetext.CONFIG,
            "vision_cfg": {**imagetext.CONFIG["vision_cfg"], "image_size": IMAGE_SIZE, "layers": 3, "width": 64},
            "text_cfg": {**imagetext.CONFIG["text_cfg"], "context_length": TEXT_CONTEXT, "vocab_size": vocab_size}}


def compact_vocabulary(*token_sets):
    """Renumber the token ids in use to 0..V-1, keeping their order (padding 0 stays 0, and the
    end-of-text token stays the largest id, which open_clip's text pooling (argmax) looks for)."""
    import torch

    used = torch.unique(torch.cat([tokens.flatten() for tokens in token_sets]))
    return len(used), [torch.searchsorted(used, tokens) for tokens in token_sets]


def methods(quick: bool) -> list[dict]:
    """Each run starts from its own random initialisation (a new training run), except the
    "shared init" variant, which starts from the reference's initial weights: the best case for
    comparing its mimic layers with the reference's."""
    chosen = [
        {"name": "plain AdamW", "layers": None},
        {"name": "Grad-Mimic image-proj τ 0.05", "layers": "image-proj", "temperature": 0.05},
    ]
    if not quick:
        chosen += [
            {"name": "Grad-Mimic image-last-mlp τ 0.05", "layers": "image-last-mlp", "temperature": 0.05},
            {"name": "Grad-Mimic image-proj τ 0.05, shared init", "layers": "image-proj", "temperature": 0.05,
             "shared_init": True},
        ]
    return chosen


def heldout_metrics(model, images, tokens, batch: int) -> dict[str, float]:
    """Mean per-sample CLIP loss over consecutive held-out batches of the training batch size, and
    recall@1/5 among all held-out pairs (the quality benchmark's metric)."""
    import torch

    from mimicfilter import contrastive_per_sample_loss

    was_training = model.training
    model.eval()
    with torch.no_grad():
        losses = []
        for start in range(0, len(images) - batch + 1, batch):
            image, text, scale = model(images[start : start + batch], tokens[start : start + batch])[:3]
            losses.append(contrastive_per_sample_loss(image, text, scale).mean().item())
    recall = imagetext.recall_at(model, images, tokens)
    model.train(was_training)
    return {"heldout_loss": float(np.mean(losses)), "r1": (recall["i2t_r1"] + recall["t2i_r1"]) / 2,
            "r5": (recall["i2t_r5"] + recall["t2i_r5"]) / 2, **recall}


def make_loss_factory(method: dict, reference, curve: Curve, last: dict):
    """The ``make_loss`` hook of imagetext_data.train_clip: plain mean or GradMimic's loss (its
    weights kept in ``last`` for the step's bookkeeping)."""
    from mimicfilter import GradMimic, contrastive_per_sample_loss

    def make_loss(model):
        grad_mimic = (GradMimic(model, reference, mimic_layers=method["layers"], temperature=method["temperature"])
                      if method["layers"] else None)

        def loss(image_features, text_features, scale):
            losses = contrastive_per_sample_loss(image_features, text_features, scale)
            if grad_mimic is None:
                return losses.mean()
            step = grad_mimic.reweight(losses)
            curve.entropy_fraction.append(step.stats()["weight_entropy_fraction"])
            last["weights"] = step.weights
            return step.loss

        return loss

    return make_loss


def run(args, log) -> dict:
    import torch

    from make_demo_data import build_model

    entries = imagetext.load_emoji()
    pictures = imagetext.render_all(entries, IMAGE_SIZE)
    heldout, ref_split, pool = imagetext.split(len(entries), args.heldout, args.ref_size, args.seed)
    samples = imagetext.corrupt(pool, entries, pictures, args.noise, args.seed + 1)
    corrupted = np.array([s["corrupted"] for s in samples])
    corrupted_tensor = torch.as_tensor(corrupted)
    _, preprocess, tokenizer = build_model(stage1_config(2))
    x_ref = imagetext.preprocess_images(pictures[ref_split], preprocess)
    x_held = imagetext.preprocess_images(pictures[heldout], preprocess)
    x_pool = imagetext.preprocess_images(np.stack([s["image"] for s in samples]), preprocess)
    vocab_size, (y_ref, y_held, y_pool) = compact_vocabulary(
        tokenizer([entries[i][1] for i in ref_split]), tokenizer([entries[i][1] for i in heldout]),
        tokenizer([s["caption"] for s in samples]))
    config = stage1_config(vocab_size)
    batch = args.train_batch
    log(f"image-text: pool {len(samples)} ({corrupted.mean():.0%} corrupted), reference split {len(ref_split)}, "
        f"held-out {len(heldout)}, vocabulary {vocab_size} tokens")
    reference = imagetext.train_clip(x_ref, y_ref, args.imagetext_ref_steps, batch, args.seed, config=config)
    result = {"reference": heldout_metrics(reference, x_held, y_held, batch), "curves": {},
              "pool": {"size": len(samples), "corrupted": float(corrupted.mean())}}
    log(f"image-text reference ({args.imagetext_ref_steps} steps): held-out {result['reference']}")
    chosen = methods(args.quick)
    steps, every = args.imagetext_steps, args.imagetext_eval_every
    for seed_index in range(args.seeds):
        seed = args.seed + args.imagetext_seed_offset + seed_index
        for method in chosen:
            curve, last = Curve(), {}

            def after_step(step, model, seconds, index, curve=curve, last=last):
                curve.step_seconds.append(seconds)
                if "weights" in last:
                    curve.noisy_weight.append(float(last["weights"][corrupted_tensor[index]].sum()))
                if step % every == 0:
                    curve.add(step, heldout_metrics(model, x_held, y_held, batch))

            imagetext.train_clip(x_pool, y_pool, steps, batch, seed, make_loss=make_loss_factory(method, reference, curve, last),
                               after_step=after_step, init_seed=args.seed if method.get("shared_init") else None,
                               config=config)
            result["curves"].setdefault(method["name"], []).append(curve)
            final = {k: round(v[-1], 3) for k, v in curve.metrics.items() if k in ("heldout_loss", "r1", "r5")}
            log(f"  seed {seed} {method['name']:34s} final {final} (median step {1000 * np.median(curve.step_seconds):.0f} ms)")
    result["timing"] = time_steps(x_pool, y_pool, batch, reference, args.timing_pairs, chosen, config)
    return result


def time_steps(images, tokens, batch: int, reference, pairs: int, chosen: list[dict], config: dict) -> dict:
    """A/B: a plain step against a re-weighted step (same architecture, same batches)."""
    import torch

    from make_demo_data import build_model

    from mimicfilter import GradMimic, contrastive_per_sample_loss

    timings = {}
    generator = torch.Generator().manual_seed(1)
    batches = [torch.randperm(len(images), generator=generator)[:batch] for _ in range(4)]
    done = {}
    for method in chosen:
        if not method["layers"]:
            continue
        if method["layers"] in done:  # same layers, same cost (the init does not change it)
            timings[method["name"]] = done[method["layers"]]
            continue
        torch.manual_seed(5)
        models = [build_model(config)[0].train() for _ in range(2)]
        optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-4) for m in models]
        grad_mimic = GradMimic(models[1], reference, mimic_layers=method["layers"], temperature=method["temperature"])
        counters = [0, 0]

        def step(which, weighted):
            index = batches[counters[which] % len(batches)]
            counters[which] += 1
            losses = contrastive_per_sample_loss(*models[which](images[index], tokens[index])[:3])
            loss = grad_mimic.reweight(losses).loss if weighted else losses.mean()
            optimizers[which].zero_grad(set_to_none=True)
            loss.backward()
            optimizers[which].step()

        timings[method["name"]] = done[method["layers"]] = ab_overhead(lambda: step(0, False), lambda: step(1, True), pairs)
    return timings
