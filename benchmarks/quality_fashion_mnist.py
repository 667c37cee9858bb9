"""Quality benchmark: can mimic scores find flipped labels on Fashion-MNIST (``--task classify``)?

    python benchmarks/quality_fashion_mnist.py            # defaults: about 10 minutes on 2 CPU cores
    python benchmarks/quality_fashion_mnist.py --quick    # smaller everything: about 2 minutes

What it does (everything seeded from ``--seed``; the data and the reference are
benchmarks/fmnist_data.py's, the tables benchmarks/quality_fashion_mnist_report.py's):

1. Data: Debian's ``dataset-fashion-mnist``: 60k train + 10k test images, 28x28 grayscale, 10 classes.
2. Split: a seeded permutation of the train split gives a clean reference-training set
   (``--ref-size``) and a disjoint pool (``--pool-size``). In the pool a fraction ``--noise`` of
   the labels (exactly round(noise * pool) samples) is flipped symmetrically: each flipped label
   becomes a uniformly random *other* class.
3. Reference: a tiny open_clip image tower and a linear head (logits = s * W normalize(f) + b, s
   fixed), trained with cross-entropy on the clean set only; saved for ``--reference`` and
   ``--reference-head``.
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
import json
import os
import platform
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import fmnist_data as fm
from common import json_arguments, mimicfilter_command, quick_or_full, run_cli, scores_by_position
from mimicfilter import metrics
from quality_fashion_mnist_report import MIMIC, print_report

THREADS = 2


# ------------------------------------------------------------------------------------------ metrics


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
    columns = scores_by_position(run_dir, where, len(noisy_labels),
                                 ["mimic_score", "mimic_weight", "loss", "ref_loss", "step", "label"])
    if (columns.pop("label") != noisy_labels).any():
        raise RuntimeError(f"{run_dir}: a label differs from the pool's")
    step = columns.pop("step")
    n_epochs, n = step.shape
    noisy = flipped.astype(bool)
    score, weight = columns["mimic_score"], columns["mimic_weight"]
    mean_score = score.mean(axis=0)

    # (a) the paper's rule: kept iff r > 1 in more than half of the epochs.
    kept = (weight > 1).sum(axis=0) > n_epochs / 2
    rule = flag_metrics(~kept, noisy)
    # Its tau -> infinity limit on the same trajectory: r > 1 <=> score above its batch's mean.
    above_mean = np.zeros(step.shape, dtype=bool)
    for epoch in range(n_epochs):
        for batch in np.unique(step[epoch]):
            members = step[epoch] == batch
            above_mean[epoch, members] = score[epoch, members] > score[epoch, members].mean()
    kept_inf = above_mean.sum(axis=0) > n_epochs / 2
    rule_inf = flag_metrics(~kept_inf, noisy)

    random_scores = np.random.default_rng(seed + 12345).random(n)
    noisiness = {  # higher = more likely flipped
        MIMIC: -mean_score,
        "ref_loss (reference)": columns["ref_loss"].mean(axis=0),
        "loss (proxy, mean over epochs)": columns["loss"].mean(axis=0),
        "random": random_scores,
    }
    return {
        "rows": n_epochs * n,
        "epochs": n_epochs,
        "rule_a": rule,
        "rule_a_tau_inf": rule_inf,
        "weight_gt1_fraction_per_epoch": [float((weight[e] > 1).mean()) for e in range(n_epochs)],
        "weight_max_mean": float(weight.max(axis=1).mean()),
        "mimic_score_std_per_epoch": [float(score[e].std()) for e in range(n_epochs)],
        "mimic_score_auroc_per_epoch": [metrics.auroc(-score[e], noisy) for e in range(n_epochs)],
        "auroc": {name: metrics.auroc(values, noisy) for name, values in noisiness.items()},
        "f1_at_true_rate": {name: f1_at_rate(noisy, values) for name, values in noisiness.items()},
        "mean_score_clean": float(mean_score[~noisy].mean()),
        "mean_score_flipped": float(mean_score[noisy].mean()),
    }, columns["ref_loss"][0]


# ------------------------------------------------------------------------------------------- runner


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
    quick_or_full(args, args.quick, {"ref_size": (10000, 20000), "pool_size": (2000, 10000), "ref_epochs": (5, 10),
                                     "epochs": (3, 5), "temperatures": ("0.2,1.0", "0.05,0.2,1.0"),
                                     "lrs": ("1e-4,1e-2", "1e-4,1e-3,1e-2")})
    args.temperatures = [float(t) for t in args.temperatures.split(",")]
    args.lrs = [float(v) for v in args.lrs.split(",")]
    if not 0 < args.noise < 1:
        parser.error("--noise must lie in (0, 1)")
    return args


def score_runs(args) -> list[tuple[str, str, list[str]]]:
    """(name, directory, score options) of every run: head runs per lr and tau, the control, static."""
    def head_run(lr, tau):
        return (f"head lr={lr:g} tau={tau:g}", f"head-lr{lr:g}-tau{tau:g}",
                ["--train", "head", "--epochs", str(args.epochs), "--lr", f"{lr:g}", "--temperature", f"{tau:g}"])

    runs = [head_run(lr, tau) for lr in args.lrs for tau in args.temperatures]
    if args.control_temperature:
        runs.append(head_run(args.lrs[-1], args.control_temperature))
    if not args.no_static:
        runs.append(("static (none) tau=1", "static-tau1", ["--train", "none", "--temperature", "1"]))
    return runs


def main(argv=None) -> None:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(THREADS)
    started = time.time()
    timings = {}
    work = args.workdir or Path(tempfile.mkdtemp(prefix="fmnist-mimic-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"workdir: {work}", flush=True)

    # 1-2. data and split
    t = time.time()
    data = fm.load_fashion_mnist()
    ref_idx, pool_idx, true, noisy_labels, flipped = fm.split_and_flip(
        data["train_labels"], args.ref_size, args.pool_size, args.noise, args.seed
    )
    mean, std = fm.pixel_stats(data["train_images"][ref_idx])
    shard_dir = work / "pool"
    shutil.rmtree(shard_dir, ignore_errors=True)
    where = fm.write_shards(shard_dir, data["train_images"][pool_idx], true, noisy_labels, flipped, args.shards, args.seed)
    timings["data_and_shards_s"] = time.time() - t
    print(f"pool: {len(pool_idx)} images in {args.shards} shards, {int(flipped.sum())} labels flipped "
          f"({flipped.mean():.1%}); reference set: {len(ref_idx)} clean images; mean/std {mean}/{std}", flush=True)

    # 3. reference
    t = time.time()
    reference = fm.Reference(work / "model", data, ref_idx, args.ref_epochs, args.seed, THREADS, args.ref_lr, cache=False)
    model, head, preprocess, history = reference.trained
    x_pool = fm.preprocess_all(data["train_images"][pool_idx], preprocess)
    pool_acc_true = fm.classifier_accuracy(model, head, x_pool, torch.as_tensor(true))
    with torch.no_grad():
        our_ref_loss = torch.nn.functional.cross_entropy(
            fm.head_logits(model, head, x_pool), torch.as_tensor(noisy_labels), reduction="none").numpy()
    timings["reference_training_s"] = time.time() - t
    print(f"reference: {args.ref_epochs} epochs in {timings['reference_training_s']:.0f} s, "
          f"train acc {history[-1]['train_acc']:.3f}, clean test acc {reference.accuracy:.4f}, pool acc (true labels) "
          f"{pool_acc_true:.4f}", flush=True)
    del x_pool

    # 5. score with the CLI
    base = mimicfilter_command() + ["score", str(shard_dir), *reference.score_options(),
                                    "--batch-size", str(args.batch_size), "--seed", str(args.seed), "--json", "--quiet"]
    results = {}
    ref_loss_diff = 0.0
    for name, directory, extra in score_runs(args):
        run_dir = work / "runs" / directory
        shutil.rmtree(run_dir, ignore_errors=True)
        command = base + extra + ["--out", str(run_dir)]
        print(f"scoring: {name} ...", flush=True)
        stats, elapsed = run_cli(command)
        evaluated, table_ref_loss = evaluate_run(run_dir, where, flipped, noisy_labels, args.seed)
        ref_loss_diff = max(ref_loss_diff, float(np.abs(table_ref_loss - our_ref_loss).max()))
        results[name] = {"command": shlex.join(command), "wall_s": elapsed, "cli_stats": stats, **evaluated}
        print(f"  {elapsed:.1f} s; rule (a) F1 {evaluated['rule_a']['f1']:.3f}; AUROC mimic {evaluated['auroc'][MIMIC]:.3f}",
              flush=True)
    timings["total_s"] = time.time() - started

    # 6-7. tables
    blob = {
        "args": json_arguments(args),
        "argv": shlex.join([sys.executable, *sys.argv]),
        "platform": {"python": platform.python_version(), "torch": torch.__version__, "threads": THREADS,
                     "cpu_count": os.cpu_count(), "machine": platform.machine()},
        "data": {"ref_size": len(ref_idx), "pool_size": len(pool_idx), "flipped": int(flipped.sum()),
                 "mean": mean, "std": std, "shards": args.shards},
        "model_cfg": fm.MODEL_CFG,
        "head_scale": fm.HEAD_SCALE,
        "reference": {"test_accuracy": reference.accuracy, "pool_accuracy_true_labels": pool_acc_true, "history": history,
                      "ref_loss_max_abs_diff_vs_cli": ref_loss_diff},
        "runs": results,
        "timings": timings,
        "workdir": str(work),
    }
    print_report(blob)
    text = json.dumps(blob, indent=2, default=float)
    (work / "results.json").write_text(text)
    if args.json_out:
        args.json_out.write_text(text)
    print("\nresults JSON:")
    print(text)
    print(f"\ntotal {timings['total_s']:.0f} s")


if __name__ == "__main__":
    main()
