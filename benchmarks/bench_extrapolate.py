"""Score extrapolation on the Fashion-MNIST label-noise pool: subset trajectory + embed + kNN vs everything.

    python benchmarks/bench_extrapolate.py            # 2 CPU cores: ~30 min training the reference, ~5 min the runs
    python benchmarks/bench_extrapolate.py --workdir W --reuse-model   # again, reusing W's reference
    python benchmarks/bench_extrapolate.py --quick    # smaller everything

Data, reference and pool are built exactly as in ``benchmarks/quality_fashion_mnist.py`` (its
functions are reused): a tiny open_clip ViT + linear head trained on clean Fashion-MNIST, and a
disjoint pool with ``--noise`` of its labels flipped, written as ``--shards`` WebDataset shards.

Runs, all through the real CLI (subprocesses, wall-clock timed, model loading included):

* **full**: ``score`` the whole pool with the trajectory (``--task classify --train head``, the
  classification defaults lr 1e-3 / τ 1, ``--epochs``): the ground truth to compare with.
* for each fraction f of ``--fractions``: ``score`` a seeded random f of the shards with the same
  trajectory and ``--save-embeddings``; ``embed`` the remaining shards; ``extrapolate`` with
  several options (plain / weighted kNN, with and without ``--same-label``).

Reported per extrapolated table: held-out Spearman ρ and chosen k (from ``extrapolate``), Spearman ρ
against the full run's per-sample mean scores (all samples, and only the extrapolated ones),
detection AUROC of the flipped labels by −score (all samples, and only the extrapolated ones), and
the compute time of subset trajectory + embed + extrapolate against the full trajectory.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality_fashion_mnist as fm  # noqa: E402  (data, reference and helpers of the quality benchmark)

from mimicfilter import metrics  # noqa: E402
from mimicfilter.metrics import spearman  # noqa: E402

VARIANTS = {
    "kNN": [],
    "kNN weighted": ["--weighted"],
    "kNN same-label": ["--same-label"],
    "kNN same-label weighted": ["--same-label", "--weighted"],
}


def per_sample_mean(run_dir: Path, where: dict, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean mimic_score per pool position (NaN where absent) and the ``extrapolated`` flag."""
    from mimicfilter.store.parts import read_scores

    columns = ["shard", "key", "status", "mimic_score"]
    table = read_scores(run_dir, columns + (["extrapolated"] if _has_flag(run_dir) else [])).to_pydict()
    sums, counts = np.zeros(n), np.zeros(n)
    flag = np.zeros(n, dtype=bool)
    for row, (shard, key) in enumerate(zip(table["shard"], table["key"])):
        if table["mimic_score"][row] is None:
            continue
        position = where[(Path(shard).name, key)]
        sums[position] += table["mimic_score"][row]
        counts[position] += 1
        if "extrapolated" in table and table["extrapolated"][row]:
            flag[position] = True
    with np.errstate(invalid="ignore"):
        return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan), flag


def _has_flag(run_dir: Path) -> bool:
    return json.loads((run_dir / "run.json").read_text()).get("command") == "extrapolate"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--ref-size", type=int, default=None, help="clean reference-training images [20000; quick 10000]")
    parser.add_argument("--pool-size", type=int, default=None, help="pool images [10000; quick 4000]")
    parser.add_argument("--noise", type=float, default=0.4)
    parser.add_argument("--shards", type=int, default=20, help="pool shards; subsets are whole shards")
    parser.add_argument("--fractions", default="0.1,0.2", help="scored fractions of the pool (of its shards)")
    parser.add_argument("--ref-epochs", type=int, default=None, help="[10; quick 5]")
    parser.add_argument("--ref-lr", type=float, default=2e-3)
    parser.add_argument("--epochs", type=int, default=None, help="trajectory epochs [5; quick 3]")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--reuse-model", action="store_true",
                        help="with --workdir: reuse the reference a previous run trained there (skips about 10-25 min)")
    parser.add_argument("--json-out", type=Path, default=None)
    args = parser.parse_args(argv)
    args.ref_size = args.ref_size or (10000 if args.quick else 20000)
    args.pool_size = args.pool_size or (4000 if args.quick else 10000)
    args.ref_epochs = args.ref_epochs or (5 if args.quick else 10)
    args.epochs = args.epochs or (3 if args.quick else 5)
    args.fractions = [float(f) for f in args.fractions.split(",")]
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    import torch
    from safetensors.torch import save_file

    torch.set_num_threads(fm.THREADS)
    started = time.time()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="fmnist-extrapolate-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"workdir: {work}", flush=True)

    data = fm.load_fashion_mnist()
    ref_idx, pool_idx, true, noisy_labels, flipped = fm.split_and_flip(
        data["train_labels"], args.ref_size, args.pool_size, args.noise, args.seed)
    ref_pixels = data["train_images"][ref_idx].astype(np.float64) / 255.0
    mean, std = round(float(ref_pixels.mean()), 4), round(float(ref_pixels.std()), 4)
    shard_dir = work / "pool"
    shutil.rmtree(shard_dir, ignore_errors=True)
    where = fm.write_shards(shard_dir, data["train_images"][pool_idx], true, noisy_labels, flipped, args.shards, args.seed)
    shards = sorted(shard_dir.glob("*.tar"))
    n = len(pool_idx)
    print(f"pool: {n} images in {len(shards)} shards, {int(flipped.sum())} labels flipped", flush=True)

    t = time.time()
    reference_path, head_path = work / "model" / "reference.safetensors", work / "model" / "head.pt"
    config_path = work / "model" / "config" / "open_clip_config.json"
    if args.reuse_model and reference_path.exists() and head_path.exists() and config_path.exists():
        meta = work / "model" / "meta.json"
        test_acc = json.loads(meta.read_text())["test_accuracy"] if meta.exists() else float("nan")
        print(f"reference: reused from {work / 'model'} (same --seed/--ref-size assumed)", flush=True)
    else:
        shutil.rmtree(work / "model", ignore_errors=True)
        config_path = fm.write_model_config(work / "model" / "config", mean, std)
        torch.manual_seed(args.seed)
        model, preprocess = fm.build_clip(config_path.parent)
        x_ref = fm.preprocess_all(data["train_images"][ref_idx], preprocess)
        y_ref = torch.as_tensor(data["train_labels"][ref_idx].astype(np.int64))
        head, history = fm.train_reference(model, x_ref, y_ref, args.ref_epochs, 256, args.ref_lr, args.seed)
        x_test = fm.preprocess_all(data["test_images"], preprocess)
        test_acc = fm.classifier_accuracy(model, head, x_test, torch.as_tensor(data["test_labels"].astype(np.int64)))
        del x_ref, x_test
        save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(reference_path))
        torch.save({"weight": head.weight.detach().clone(), "bias": head.bias.detach().clone(),
                    "logit_scale": torch.tensor(fm.HEAD_SCALE)}, head_path)
        (work / "model" / "meta.json").write_text(json.dumps({"test_accuracy": test_acc}))
        print(f"reference: {time.time() - t:.0f} s, clean test acc {test_acc:.4f}", flush=True)

    exe = fm.mimicfilter_executable()
    models = ["--model", str(config_path), "--reference", str(reference_path), "--reference-head", str(head_path),
              "--task", "classify", "--seed", str(args.seed), "--json", "--quiet"]
    trajectory = ["--train", "head", "--epochs", str(args.epochs), "--lr", f"{args.lr:g}",
                  "--temperature", f"{args.temperature:g}", "--batch-size", str(args.batch_size)]
    runs = work / "runs"
    shutil.rmtree(runs, ignore_errors=True)
    commands = []

    def cli(arguments):
        command = exe + arguments
        commands.append(shlex.join(command))
        return fm.run_cli(command)

    print("full trajectory ...", flush=True)
    _, full_s = cli(["score", *map(str, shards), *models, *trajectory, "--out", str(runs / "full")])
    full_mean, _ = per_sample_mean(runs / "full", where, n)
    noisy = flipped.astype(bool)
    full_auroc = metrics.auroc(-full_mean, noisy)
    print(f"  {full_s:.1f} s, AUROC {full_auroc:.3f}", flush=True)

    rng = np.random.default_rng(args.seed + 1)
    results = []
    for fraction in args.fractions:
        count = max(1, int(round(fraction * len(shards))))
        chosen = sorted(rng.choice(len(shards), size=count, replace=False).tolist())
        subset = [shards[i] for i in chosen]
        rest = [shard for i, shard in enumerate(shards) if i not in chosen]
        tag = f"f{fraction:g}"
        print(f"fraction {fraction:g}: scoring {count} shards, embedding {len(rest)} ...", flush=True)
        _, subset_s = cli(["score", *map(str, subset), *models, *trajectory, "--save-embeddings",
                           "--out", str(runs / f"{tag}-subset")])
        _, embed_s = cli(["embed", *map(str, rest), *models[:-2], "--json", "--quiet", "--batch-size",
                          str(args.batch_size), "--out", str(runs / f"{tag}-embed")])
        subset_mean, _ = per_sample_mean(runs / f"{tag}-subset", where, n)
        in_subset = ~np.isnan(subset_mean)
        for variant, extra in VARIANTS.items():
            out = runs / f"{tag}-{variant.replace(' ', '-')}"
            stats, extrapolate_s = cli(["extrapolate", "--scored", str(runs / f"{tag}-subset"), "--embeddings",
                                        str(runs / f"{tag}-embed"), *extra, "--json", "--out", str(out)])
            predicted, flag = per_sample_mean(out, where, n)
            assert not np.isnan(predicted).any() and (flag == ~in_subset).all()
            results.append({
                "fraction": fraction, "variant": variant, "scored": int(in_subset.sum()),
                "extrapolated": int(flag.sum()), "k": stats["k"],
                "heldout_spearman": stats["heldout_spearman"],
                "spearman_all": spearman(predicted, full_mean),
                "spearman_extrapolated": spearman(predicted[flag], full_mean[flag]),
                "spearman_subset_vs_full": spearman(subset_mean[in_subset], full_mean[in_subset]),
                "auroc_all": metrics.auroc(-predicted, noisy),
                "auroc_extrapolated": metrics.auroc(-predicted[flag], noisy[flag]),
                "auroc_full_on_extrapolated": metrics.auroc(-full_mean[flag], noisy[flag]),
                "subset_score_s": subset_s, "embed_s": embed_s, "extrapolate_s": extrapolate_s,
                "knn_s": stats["knn_seconds"],
                "total_s": subset_s + embed_s + extrapolate_s, "full_s": full_s,
            })
            r = results[-1]
            print(f"  {variant}: k={r['k']} held-out rho {r['heldout_spearman']:.3f}; rho vs full "
                  f"{r['spearman_all']:.3f} (extrapolated {r['spearman_extrapolated']:.3f}); AUROC "
                  f"{r['auroc_all']:.3f}; {r['total_s']:.1f} s vs {full_s:.1f} s", flush=True)

    fm.print_table(
        f"Score extrapolation, Fashion-MNIST pool {n} ({noisy.mean():.0%} labels flipped), trajectory "
        f"--train head {args.epochs} epochs; full-pool AUROC {full_auroc:.3f} in {full_s:.1f} s",
        ["scored", "method", "k", "held-out rho", "rho vs full (all)", "(extrap.)", "AUROC all", "(extrap.)",
         "time s", "vs full"],
        [[f"{r['fraction']:.0%}", r["variant"], r["k"], r["heldout_spearman"], r["spearman_all"],
          r["spearman_extrapolated"], r["auroc_all"], r["auroc_extrapolated"], f"{r['total_s']:.1f}",
          f"{r['total_s'] / r['full_s']:.2f}"] for r in results],
    )
    fm.print_table(
        "Compute time (wall s, CLI subprocesses, model loading included)",
        ["scored", "subset trajectory", "embed rest", "extrapolate (kNN part)", "total", "full trajectory"],
        [[f"{r['fraction']:.0%}", f"{r['subset_score_s']:.1f}", f"{r['embed_s']:.1f}",
          f"{r['extrapolate_s']:.1f} ({r['knn_s']:.2f})", f"{r['total_s']:.1f}", f"{r['full_s']:.1f}"]
         for r in results if r["variant"] == "kNN same-label"],
    )
    print("\nsubset trajectory vs full trajectory on the same (scored) samples, Spearman rho: "
          + ", ".join(f"{r['fraction']:.0%}: {r['spearman_subset_vs_full']:.3f}" for r in results if r["variant"] == "kNN"))
    print("AUROC of the full run's scores on the extrapolated samples only: "
          + ", ".join(f"{r['fraction']:.0%}: {r['auroc_full_on_extrapolated']:.3f}" for r in results if r["variant"] == "kNN"))
    print("\ncommands:")
    print(f"  {shlex.join([sys.executable, *sys.argv])}")
    for command in commands:
        print(f"  {command}")
    blob = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "platform": {"python": platform.python_version(), "torch": torch.__version__},
            "reference_test_accuracy": test_acc, "full_auroc": full_auroc, "full_s": full_s, "results": results,
            "total_s": time.time() - started, "workdir": str(work)}
    text = json.dumps(blob, indent=2, default=float)
    (work / "results.json").write_text(text)
    if args.json_out:
        args.json_out.write_text(text)
    print(f"\ntotal {blob['total_s']:.0f} s")


if __name__ == "__main__":
    main()
