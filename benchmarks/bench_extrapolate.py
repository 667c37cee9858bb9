"""Score extrapolation: score a 10 % / 20 % subset with the trajectory, embed the rest, extrapolate
(kNN vs GNN, image vs pair features), and compare with scoring everything.

    python benchmarks/bench_extrapolate.py                          # both pools (see docs/benchmarks.md for the time)
    python benchmarks/bench_extrapolate.py --data imagetext         # the emoji image-text pool only
    python benchmarks/bench_extrapolate.py --workdir W              # again: reuses W's references when unchanged

Two pools, every score through the real CLI (subprocesses, wall-clock timed, model loading included):

* **imagetext**: the emoji pool of the image–text quality benchmark (``benchmarks/imagetext_data.py``):
  Noto emoji with their CLDR names, a small CLIP reference trained from scratch on a clean split
  that excludes the pool, and ``--noise`` of the pool corrupted web-style (swapped captions,
  boilerplate captions, blank and noise images), in ``--shards`` shards. Trajectory:
  ``score --train head --epochs 3`` (the contrastive defaults). Truth: the corruption flags.
* **labelled**: the Fashion-MNIST pool of ``benchmarks/fmnist_data.py``: a tiny ViT +
  linear head trained on clean images, a disjoint pool with ``--fm-noise`` of its labels flipped.
  Trajectory: ``score --task classify --train head`` (lr 1e-3, tau 1). Truth: the flipped labels.

For each pool: **full** = the whole pool scored with the trajectory (the ground truth to compare
with); for each fraction f: a seeded random f of the shards scored with the same trajectory and
``--save-embeddings``, the other shards through ``embed``, then ``extrapolate`` with every variant
(kNN / GNN x image / pair features; labelled pools also ``--same-label``). Reported per variant:
held-out Spearman rho and the choice (``extrapolate``'s own), Spearman rho against the full run's
per-sample mean scores (all samples, and the extrapolated ones), AUROC of the extrapolated samples'
scores for telling clean from corrupted (and the full run's AUROC on the same samples), and the
cost of subset trajectory + embed + extrapolate relative to the full trajectory. The cost ratio is
measured in alternating rounds (full, subset pipeline, full, subset pipeline, ...:
``--timing-rounds``) so that load from other jobs hits both sides alike.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import sys
import time
from pathlib import Path

import numpy as np

import fmnist_data as fm
import imagetext_data as it
from common import ROOT, json_arguments, mimicfilter_command, print_table, run_cli, slug, thread_env
from mimicfilter import metrics

IMAGETEXT_VARIANTS = {
    "kNN image": ["--features", "image"],
    "kNN pair": ["--features", "pair"],
    "GNN image": ["--method", "gnn", "--features", "image"],
    "GNN pair": ["--method", "gnn", "--features", "pair"],
    "kNN auto (default)": [],
}
LABELLED_VARIANTS = {
    "kNN image": ["--features", "image"],
    "kNN image --same-label": ["--features", "image", "--same-label"],
    "kNN pair": ["--features", "pair"],
    "kNN pair --same-label": ["--features", "pair", "--same-label"],
    "GNN image --same-label": ["--method", "gnn", "--features", "image", "--same-label"],
    "GNN pair": ["--method", "gnn", "--features", "pair"],
    "kNN auto (default)": [],
}


def per_sample(run_dir: Path, where: dict, n: int, column: str = "mimic_score") -> tuple[np.ndarray, np.ndarray]:
    """Mean of ``column`` per pool position (NaN where absent) and the ``extrapolated`` flag."""
    from mimicfilter.store.parts import read_scores

    flagged = json.loads((run_dir / "run.json").read_text()).get("command") == "extrapolate"
    table = read_scores(run_dir, ["shard", "key", column] + (["extrapolated"] if flagged else [])).to_pydict()
    sums, counts, flag = np.zeros(n), np.zeros(n), np.zeros(n, dtype=bool)
    for row, (shard, key) in enumerate(zip(table["shard"], table["key"])):
        if table[column][row] is None:
            continue
        position = where[(Path(shard).name, key)]
        sums[position] += table[column][row]
        counts[position] += 1
        flag[position] |= bool(flagged and table["extrapolated"][row])
    with np.errstate(invalid="ignore"):
        return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan), flag


class Suite:
    """One pool: the full run, then per fraction the subset, the embeddings and every variant."""

    def __init__(self, name: str, shards: list[Path], where: dict, clean: np.ndarray, model: list[str],
                 trajectory: list[str], variants: dict[str, list[str]], runs: Path, threads: int):
        self.name, self.shards, self.where, self.clean = name, shards, where, clean
        self.model, self.trajectory, self.variants, self.runs = model, trajectory, variants, runs
        self.n = len(clean)
        self.env = thread_env(threads)
        self.commands: list[str] = []

    def cli(self, arguments: list[str]) -> tuple[dict, float]:
        command = mimicfilter_command() + arguments
        self.commands.append(shlex.join(command))
        return run_cli(command, self.env)

    def score(self, shards: list[Path], out: Path, extra: list[str] = ()) -> float:
        _, seconds = self.cli(["score", *map(str, shards), *self.model, *self.trajectory, *extra, "--json", "--quiet",
                               "--out", str(out)])
        return seconds

    def embed(self, shards: list[Path], out: Path) -> float:
        _, seconds = self.cli(["embed", *map(str, shards), *self.model, "--json", "--quiet", "--out", str(out)])
        return seconds

    def subsets(self, fractions: list[float], seed: int) -> dict[float, list[int]]:
        rng = np.random.default_rng(seed + 1)
        chosen = {}
        for fraction in fractions:
            count = max(1, int(round(fraction * len(self.shards))))
            chosen[fraction] = sorted(rng.choice(len(self.shards), size=count, replace=False).tolist())
        return chosen

    def run(self, fractions: list[float], seed: int, timing_rounds: int) -> dict:
        shutil.rmtree(self.runs, ignore_errors=True)
        print(f"[{self.name}] full trajectory ...", flush=True)
        full_s = [self.score(self.shards, self.runs / "full")]
        full, _ = per_sample(self.runs / "full", self.where, self.n)
        full_auroc = metrics.auroc(full, self.clean)
        print(f"  {full_s[0]:.1f} s, AUROC {full_auroc:.3f}", flush=True)
        results, pipelines = [], {}
        for fraction, chosen in self.subsets(fractions, seed).items():
            subset = [self.shards[i] for i in chosen]
            rest = [shard for i, shard in enumerate(self.shards) if i not in chosen]
            tag = f"f{fraction:g}"
            print(f"[{self.name}] {fraction:.0%}: scoring {len(subset)} shards, embedding {len(rest)} ...", flush=True)
            subset_s = self.score(subset, self.runs / f"{tag}-subset", ["--save-embeddings"])
            embed_s = self.embed(rest, self.runs / f"{tag}-embed")
            pipelines[fraction] = (subset, rest)
            subset_mean, _ = per_sample(self.runs / f"{tag}-subset", self.where, self.n)
            in_subset = ~np.isnan(subset_mean)
            clip, _ = per_sample(self.runs / f"{tag}-subset", self.where, self.n, "clip_score")
            agreement = self.agreement(self.runs / f"{tag}-embed", clip)
            for variant, extra in self.variants.items():
                out = self.runs / f"{tag}-{slug(variant.split(' (')[0])}"
                stats, extrapolate_s = self.cli(["extrapolate", "--scored", str(self.runs / f"{tag}-subset"),
                                                 "--embeddings", str(self.runs / f"{tag}-embed"), *extra,
                                                 "--seed", str(seed), "--json", "--out", str(out)])
                predicted, flag = per_sample(out, self.where, self.n)
                assert not np.isnan(predicted).any() and (flag == ~in_subset).all()
                r = {
                    "pool": self.name, "fraction": fraction, "variant": variant, "options": extra,
                    "scored": int(in_subset.sum()), "extrapolated": int(flag.sum()),
                    "method": stats["method"], "features": stats["features"],
                    "choice": stats.get("k", stats.get("best_epoch")), "trusted": stats["trusted"],
                    "heldout_spearman": stats["heldout_spearman"],
                    "heldout_by_features": stats["heldout_spearman_by_features"],
                    "spearman_all": metrics.spearman(predicted, full),
                    "spearman_extrapolated": metrics.spearman(predicted[flag], full[flag]),
                    "spearman_subset_vs_full": metrics.spearman(subset_mean[in_subset], full[in_subset]),
                    "auroc_extrapolated": metrics.auroc(predicted[flag], self.clean[flag]),
                    "auroc_full_on_extrapolated": metrics.auroc(full[flag], self.clean[flag]),
                    "auroc_agreement_on_extrapolated": (metrics.auroc(agreement[flag], self.clean[flag])
                                                        if agreement is not None else None),
                    "subset_s": subset_s, "embed_s": embed_s, "extrapolate_s": extrapolate_s,
                    "fit_s": stats["extrapolate_seconds"], "full_s": full_s[0],
                }
                results.append(r)
                print(f"  {variant}: {r['method']}/{r['features']} held-out rho {r['heldout_spearman']:.3f}; rho vs full "
                      f"(extrap.) {r['spearman_extrapolated']:.3f}; AUROC extrap. {r['auroc_extrapolated']:.3f} "
                      f"(full run {r['auroc_full_on_extrapolated']:.3f}); {extrapolate_s:.1f} s", flush=True)
        timing = self.time_alternating(pipelines, full_s, timing_rounds)
        return {"full_auroc": full_auroc, "full_s": full_s, "results": results, "timing": timing}

    def agreement(self, embed_run: Path, clip: np.ndarray) -> np.ndarray | None:
        """The pair's agreement (reference CLIP score) per position: the scored run's clip_score,
        the embeddings' dot product for the rest — the baseline extrapolation leans on."""
        from mimicfilter.store.parts import part_paths

        import pyarrow.parquet as pq

        values = clip.copy()
        for part in part_paths(embed_run):
            table = pq.read_table(part, columns=["shard", "key", "embedding", "text_embedding"]).to_pydict()
            for shard, key, image, text in zip(table["shard"], table["key"], table["embedding"], table["text_embedding"]):
                if image is not None:
                    values[self.where[(Path(shard).name, key)]] = float(np.dot(np.array(image, float), np.array(text, float)))
        return None if np.isnan(values).all() else values

    def time_alternating(self, pipelines: dict, full_s: list[float], rounds: int) -> dict:
        """Full trajectory (A) vs subset pipeline (B: score the subset + embed the rest + the default
        extrapolate), A then B per fraction and round, in fresh directories."""
        timing = {fraction: {"full_s": [], "pipeline_s": []} for fraction in pipelines}
        scratch = self.runs / "timing"
        for round_ in range(rounds):
            for fraction, (subset, rest) in pipelines.items():
                shutil.rmtree(scratch, ignore_errors=True)
                full_s.append(self.score(self.shards, scratch / "full"))
                timing[fraction]["full_s"].append(full_s[-1])
                shutil.rmtree(scratch, ignore_errors=True)
                started = self.score(subset, scratch / "subset", ["--save-embeddings"])
                started += self.embed(rest, scratch / "embed")
                _, seconds = self.cli(["extrapolate", "--scored", str(scratch / "subset"), "--embeddings",
                                       str(scratch / "embed"), "--json", "--out", str(scratch / "extrapolated")])
                timing[fraction]["pipeline_s"].append(started + seconds)
                print(f"  timing round {round_ + 1}, {fraction:.0%}: full {timing[fraction]['full_s'][-1]:.1f} s, "
                      f"subset pipeline {timing[fraction]['pipeline_s'][-1]:.1f} s", flush=True)
        for fraction, t in timing.items():
            t["ratios"] = [p / f for p, f in zip(t["pipeline_s"], t["full_s"])]
        shutil.rmtree(scratch, ignore_errors=True)
        return {str(fraction): t for fraction, t in timing.items()}


# -------------------------------------------------------------------------------------------- pools


def imagetext_suite(args, work: Path) -> Suite:
    import torch

    entries = it.load_emoji()
    pictures = it.render_all(entries, it.IMAGE_SIZE)
    _, ref_split, pool = it.split(len(entries), 0, args.ref_size, args.seed)
    samples = it.corrupt(pool, entries, pictures, args.noise, args.seed + 1)
    where = it.write_pool(work / "emoji-pool", samples, args.shards, f"extrapolate-{args.seed}")
    clean = np.array([not sample["corrupted"] for sample in samples])
    print(f"emoji pool: {len(samples)} pairs, {int((~clean).sum())} corrupted, {args.shards} shards", flush=True)
    reference = it.Reference(work / "emoji-model", entries, pictures, ref_split, args.ref_steps, args.seed, args.threads)
    torch.set_num_threads(args.threads)
    model = [*reference.score_options(), "--seed", str(args.seed), "--batch-size", "256"]
    trajectory = ["--train", "head", "--epochs", str(args.epochs)]
    return Suite("imagetext", sorted((work / "emoji-pool").glob("*.tar")), where, clean, model, trajectory,
                 IMAGETEXT_VARIANTS, work / "imagetext-runs", args.threads)


def labelled_suite(args, work: Path) -> Suite:
    data = fm.load_fashion_mnist()
    ref_idx, pool_idx, true, noisy_labels, flipped = fm.split_and_flip(
        data["train_labels"], args.fm_ref_size, args.fm_pool_size, args.fm_noise, args.seed)
    shard_dir = work / "fmnist-pool"
    shutil.rmtree(shard_dir, ignore_errors=True)
    where = fm.write_shards(shard_dir, data["train_images"][pool_idx], true, noisy_labels, flipped, args.shards, args.seed)
    print(f"fashion-mnist pool: {len(pool_idx)} images, {int(flipped.sum())} labels flipped, {args.shards} shards", flush=True)
    reference = fm.Reference(work / "fmnist-model", data, ref_idx, args.fm_ref_epochs, args.seed, args.threads)
    model = [*reference.score_options(), "--seed", str(args.seed), "--batch-size", "256"]
    trajectory = ["--train", "head", "--epochs", str(args.fm_epochs), "--lr", "1e-3", "--temperature", "1"]
    return Suite("labelled", sorted(shard_dir.glob("*.tar")), where, ~flipped.astype(bool), model, trajectory,
                 LABELLED_VARIANTS, work / "labelled-runs", args.threads)


# --------------------------------------------------------------------------------------------- main


def print_results(name: str, outcome: dict) -> None:
    results = outcome["results"]
    print_table(
        f"{name}: full-run AUROC {outcome['full_auroc']:.3f} in {outcome['full_s'][0]:.1f} s",
        ["scored", "variant", "chose", "held-out rho", "rho vs full (all)", "(extrap.)", "AUROC extrap.",
         "full run, same samples", "agreement alone, same", "extrapolate s"],
        [[f"{r['fraction']:.0%}", r["variant"], f"{r['method']}/{r['features']} {r['choice']}", r["heldout_spearman"],
          r["spearman_all"], r["spearman_extrapolated"], r["auroc_extrapolated"], r["auroc_full_on_extrapolated"],
          "-" if r["auroc_agreement_on_extrapolated"] is None else r["auroc_agreement_on_extrapolated"],
          f"{r['extrapolate_s']:.1f}"] for r in results],
    )
    rows = []
    for fraction, t in outcome["timing"].items():
        rows.append([f"{float(fraction):.0%}", " / ".join(f"{s:.1f}" for s in t["full_s"]),
                     " / ".join(f"{s:.1f}" for s in t["pipeline_s"]), " / ".join(f"{r:.2f}" for r in t["ratios"]),
                     f"{float(np.median(t['ratios'])):.2f}"])
    print_table(f"{name}: cost, alternating rounds (wall s, whole CLI processes)",
                   ["scored", "full trajectory", "subset + embed + extrapolate", "ratio per round", "median"], rows)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", choices=["both", "imagetext", "labelled"], default="both")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fractions", default="0.1,0.2", help="scored fractions of the pool (of its shards)")
    parser.add_argument("--shards", type=int, default=20, help="shards per pool; subsets are whole shards")
    parser.add_argument("--timing-rounds", type=int, default=2, help="alternating full / subset-pipeline rounds")
    parser.add_argument("--threads", type=int, default=2, help="torch threads here and in every CLI process")
    parser.add_argument("--workdir", type=Path, default=None, help="[bench-runs/extrapolate]")
    parser.add_argument("--ref-size", type=int, default=1500, help="emoji: clean pairs the reference trains on")
    parser.add_argument("--ref-steps", type=int, default=700, help="emoji: reference training steps")
    parser.add_argument("--noise", type=float, default=0.4, help="emoji: corrupted fraction of the pool")
    parser.add_argument("--epochs", type=int, default=3, help="emoji: trajectory epochs")
    parser.add_argument("--fm-ref-size", type=int, default=10000, help="fashion-mnist: clean reference images")
    parser.add_argument("--fm-ref-epochs", type=int, default=5, help="fashion-mnist: reference epochs")
    parser.add_argument("--fm-pool-size", type=int, default=4000, help="fashion-mnist: pool images")
    parser.add_argument("--fm-noise", type=float, default=0.4, help="fashion-mnist: flipped fraction of the labels")
    parser.add_argument("--fm-epochs", type=int, default=3, help="fashion-mnist: trajectory epochs")
    args = parser.parse_args(argv)
    args.fractions = [float(f) for f in args.fractions.split(",")]
    args.workdir = args.workdir or ROOT / "bench-runs" / "extrapolate"
    return args


def main(argv=None) -> None:
    import logging

    import torch

    args = parse_args(argv)
    logging.getLogger().setLevel(logging.ERROR)  # open_clip's "no pretrained weights": intended
    torch.set_num_threads(args.threads)
    started = time.time()
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    print(f"workdir: {work}; {args.threads} thread(s) per process", flush=True)
    outcomes, commands = {}, []
    builders = {"imagetext": imagetext_suite, "labelled": labelled_suite}
    for name in (["imagetext", "labelled"] if args.data == "both" else [args.data]):
        suite = builders[name](args, work)
        outcomes[name] = suite.run(args.fractions, args.seed, args.timing_rounds)
        commands += suite.commands
        print_results(name, outcomes[name])
    print("\ncommands (first of each kind):")
    print(f"  {shlex.join([sys.executable, *sys.argv])}")
    seen = set()
    for command in commands:
        kind = command.split(" ")[1] + (" --method gnn" if "--method gnn" in command else "")
        if kind not in seen:
            seen.add(kind)
            print(f"  {command}")
    blob = {"args": json_arguments(args),
            "platform": {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count()},
            "outcomes": outcomes, "total_s": time.time() - started, "commands": commands}
    (work / "results.json").write_text(json.dumps(blob, indent=2, default=float))
    print(f"\nresults: {work / 'results.json'}; total {blob['total_s']:.0f} s")


if __name__ == "__main__":
    main()
