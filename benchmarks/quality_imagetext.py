"""Quality benchmark on image–text pairs: do mimic scores find web-style noise, and do they help training?

    python benchmarks/quality_imagetext.py            # full: about 20 minutes on 2 idle CPU cores
    python benchmarks/quality_imagetext.py --quick    # about 7 minutes
    make bench-quality                                # the full run

What it does (everything seeded from ``--seed``; the data, the CLIP and its training loop are
benchmarks/imagetext_data.py's, the tables benchmarks/quality_imagetext_report.py's):

1. Data: every fully-qualified emoji drawn with Noto Color Emoji at 64 px, captioned with its CLDR
   name. A seeded permutation splits the ~3,650 emoji into three disjoint sets: a held-out evaluation
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
   ``--mimic-layers`` presets). Each table is read with ``mimicfilter.store.parts.read_scores`` and
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
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np

import imagetext_data as it
from common import ROOT, idle_cores, json_arguments, mimicfilter_command, quick_or_full, run_cli, scores_by_position, slug
from mimicfilter import metrics
from quality_imagetext_report import QUALITY_RULES, baseline_scores, detector_metrics, kept_metrics, markdown


# ---------------------------------------------------------------------------------- reading the runs


def read_run(run_dir: Path, where: dict, n: int) -> dict[str, np.ndarray]:
    """Per pool position: mean over epochs of each score column, and the last epoch's mimic score."""
    values = scores_by_position(run_dir, where, n, ["mimic_score", "mimic_weight", "loss", "clip_score", "ref_loss"])
    result = {name: v.mean(axis=0) for name, v in values.items()}
    result["mimic_score_last"] = values["mimic_score"][-1]
    result["epochs"] = len(values["mimic_score"])
    return result


def kept_mask(manifest: Path, where: dict, n: int) -> np.ndarray:
    import pyarrow.parquet as pq

    table = pq.read_table(manifest, columns=["shard", "key", "kept"]).to_pydict()
    kept = np.zeros(n, dtype=bool)
    for shard, key, flag in zip(table["shard"], table["key"], table["kept"]):
        kept[where[(Path(shard).name, key)]] = bool(flag)
    return kept


def run_filter(run_dir: Path, out: Path, rules: list[str], where: dict, n: int) -> tuple[dict, np.ndarray, list[str]]:
    command = mimicfilter_command() + ["filter", str(run_dir), *rules, "--out", str(out), "--json"]
    summary, _ = run_cli(command)
    return summary, kept_mask(out / "manifest.parquet", where, n), command


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
    quick_or_full(args, args.quick, {
        "out": (ROOT / "bench-runs" / "quality-imagetext-quick", ROOT / "bench-runs" / "quality-imagetext"),
        "ref_steps": (300, 700), "down_steps": (150, 200), "down_seeds": (1, 2),
        "quality_noise": ("0.1,0.35,0.6", "0.1,0.2,0.3,0.4,0.5,0.6")})
    args.quality_noise = [float(v) for v in args.quality_noise.split(",")]
    if args.threads <= 0:
        args.threads = idle_cores()
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


def short_slug(name: str) -> str:
    """A directory name for a setting or subset: its name up to any parenthesis."""
    return slug(name.split(" (")[0])


class Benchmark:
    """The stages of one run, in order (data, reference, scoring, subsets, downstream, quality); each
    keeps its results and wall time on the instance, and ``results()`` gathers them."""

    def __init__(self, args):
        self.args, self.out, self.started = args, args.out, time.time()
        self.timings: dict[str, float] = {}

    def data(self) -> None:
        """1-2. data, splits, corrupted pool"""
        args, t = self.args, time.time()
        self.entries = it.load_emoji()
        self.pictures = it.render_all(self.entries, it.IMAGE_SIZE)
        self.heldout, self.ref_split, self.pool = it.split(len(self.entries), args.heldout, args.ref_size, args.seed)
        self.samples = it.corrupt(self.pool, self.entries, self.pictures, args.noise, args.seed + 1)
        self.where = it.write_pool(self.out / "pool", self.samples, args.shards, f"pool-{args.seed}")
        self.n = len(self.samples)
        self.clean = np.array([not s["corrupted"] for s in self.samples])
        self.kinds = np.array([s["kind"] for s in self.samples])
        self.kind_counts = {kind: int((self.kinds == kind).sum()) for kind in ("clean", *it.KINDS)}
        self.timings["data_s"] = time.time() - t
        print(f"{len(self.entries)} emoji: held-out {len(self.heldout)}, reference {len(self.ref_split)}, pool {self.n} "
              f"({self.kind_counts}) in {args.shards} shards [{self.timings['data_s']:.0f} s]", flush=True)

    def reference(self) -> None:
        """3. the reference, trained on the clean reference split (reused when unchanged)"""
        from make_demo_data import build_model

        args, t = self.args, time.time()
        _, preprocess, tokenizer = build_model(it.CONFIG)
        entries = self.entries
        self.x_held = it.preprocess_images(self.pictures[self.heldout], preprocess)
        self.y_held = tokenizer([entries[i][1] for i in self.heldout])
        self.x_pool = it.preprocess_images(np.stack([s["image"] for s in self.samples]), preprocess)
        self.y_pool = tokenizer([s["caption"] for s in self.samples])
        self.ref = it.Reference(self.out / "model", entries, self.pictures, self.ref_split, args.ref_steps, args.seed,
                                args.threads, args.train_batch)
        reference = self.ref.model()
        x_ref = it.preprocess_images(self.pictures[self.ref_split[:500]], preprocess)
        y_ref = tokenizer([entries[i][1] for i in self.ref_split[:500]])
        self.reference_recall = {"train_split": it.recall_at(reference, x_ref, y_ref),
                                 "heldout": it.recall_at(reference, self.x_held, self.y_held)}
        self.timings["reference_s"] = time.time() - t
        print(f"reference: {self.timings['reference_s']:.0f} s; recall (500 candidates) train split "
              f"{self.reference_recall['train_split']}, held-out {self.reference_recall['heldout']}", flush=True)

    def score_base(self, pool_dir: Path) -> list[str]:
        return mimicfilter_command() + ["score", str(pool_dir), *self.ref.score_options(), "--batch-size",
                                        str(self.args.batch_size), "--seed", str(self.args.seed), "--json", "--quiet",
                                        "--overwrite"]

    def scoring(self) -> None:
        """4. scoring under several settings"""
        t, clean, kinds = time.time(), self.clean, self.kinds
        self.runs, self.baselines = {}, None
        for name, options in score_settings(self.args):
            run_dir = self.out / "runs" / short_slug(name)
            command = self.score_base(self.out / "pool") + options + ["--out", str(run_dir)]
            print(f"scoring: {name} ...", flush=True)
            stats, elapsed = run_cli(command)
            columns = read_run(run_dir, self.where, self.n)
            summary, kept, _ = run_filter(run_dir, run_dir / "filter-default", [], self.where, self.n)
            self.runs[name] = r = {
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
            if self.baselines is None:
                self.baselines = {label: detector_metrics(clean, values, kinds)
                                  for label, values in baseline_scores(columns, self.args.seed).items()}
                self.main_name, self.main_dir, self.main_columns = name, run_dir, columns
            print(f"  {elapsed:.1f} s; AUROC mimic {r['mimic_score']['auroc']:.3f}; default rule kept "
                  f"{r['default_rule']['kept_fraction']:.3f} precision {r['default_rule']['precision']:.3f}", flush=True)
        self.timings["scoring_s"] = time.time() - t

    def subsets(self) -> None:
        """5. subsets of size K through `mimicfilter filter`"""
        t, n, where, out = time.time(), self.n, self.where, self.out
        k = int(self.clean.sum())
        fraction = (k + 0.5) / n  # floor(F * n) = k
        self.chosen = {"whole pool": np.ones(n, dtype=bool), "oracle: truly clean": self.clean.copy()}
        random_keep = np.zeros(n, dtype=bool)
        random_keep[np.random.default_rng(self.args.seed + 7).permutation(n)[:k]] = True
        self.chosen[f"random {k}"] = random_keep
        self.filter_commands = {}

        def keep(label: str, directory: Path, rules: list[str]) -> np.ndarray:
            _, kept, command = run_filter(self.main_dir, directory, rules, where, n)
            self.chosen[label], self.filter_commands[label] = kept, shlex.join(command)
            return kept

        keep(f"CLIP-score top {k}", out / "subsets" / short_slug(f"CLIP-score top {k}"), ["--top-frac", f"clip_score={fraction:.6f}"])
        keep(f"mimic top {k}", out / "subsets" / short_slug(f"mimic top {k}"), ["--top-frac", f"mimic_score={fraction:.6f}"])
        # ensemble: the smallest equal fraction whose intersection reaches k
        rank_clip = np.argsort(np.argsort(-self.main_columns["clip_score"], kind="mergesort"), kind="mergesort")
        rank_mimic = np.argsort(np.argsort(-self.main_columns["mimic_score"], kind="mergesort"), kind="mergesort")
        worst = np.maximum(rank_clip, rank_mimic)  # in both top-m sets iff worst < m
        m = int(np.sort(worst)[k - 1]) + 1
        ensemble = (m + 0.5) / n
        keep(f"CLIP AND mimic (top {ensemble:.1%} of each)", out / "subsets" / "ensemble",
             ["--top-frac", f"clip_score={ensemble:.6f}", "--top-frac", f"mimic_score={ensemble:.6f}", "--combine", "and"])
        size = int(keep("mimic default rule (gmm votes)", out / "subsets" / "default-rule", []).sum())
        # the CLIP score at the default rule's size, for a same-size comparison
        keep(f"CLIP-score top {size} (default rule's size)", out / "subsets" / "clip-default-size",
             ["--top-frac", f"clip_score={(size + 0.5) / n:.6f}"])
        self.subset_quality = {label: kept_metrics(mask, self.clean) for label, mask in self.chosen.items()}
        self.timings["subsets_s"] = time.time() - t

    def downstream(self) -> None:
        """6. downstream training on each subset (an interrupted run re-uses the trainings it finished)"""
        import torch

        args, t = self.args, time.time()
        self.trained = {}
        cache_path = self.out / "downstream-cache.json"
        cache = json.loads(cache_path.read_text()) if cache_path.exists() else {}
        pool_digest = hashlib.md5(self.x_pool.numpy().tobytes() + self.y_pool.numpy().tobytes()
                                  + self.x_held.numpy().tobytes()).hexdigest()
        for label, mask in self.chosen.items():
            index = torch.as_tensor(np.flatnonzero(mask))
            recalls = []
            for seed in range(args.down_seeds):
                key = json.dumps([pool_digest, hashlib.md5(mask.tobytes()).hexdigest(), args.down_steps, args.train_batch,
                                  args.seed + 100 + seed, args.threads, it.CONFIG])
                if key not in cache:
                    model = it.train_clip(self.x_pool[index], self.y_pool[index], args.down_steps, args.train_batch,
                                          args.seed + 100 + seed)
                    cache[key] = it.recall_at(model, self.x_held, self.y_held)
                    cache_path.write_text(json.dumps(cache))
                recalls.append(cache[key])
            mean = {key: float(np.mean([r[key] for r in recalls])) for key in recalls[0]}
            self.trained[label] = {"size": int(mask.sum()), "clean_fraction": float(self.clean[mask].mean()),
                                   "recall": mean, "recall_per_seed": recalls}
            print(f"downstream {label}: n={int(mask.sum())} {mean} [{time.time() - t:.0f} s]", flush=True)
        self.timings["downstream_s"] = time.time() - t

    def quality(self) -> None:
        """7. dataset-quality estimate vs noise rate"""
        args, t = self.args, time.time()
        self.levels = []
        main_options = score_settings(args)[0][1]
        for level in args.quality_noise:
            samples = it.corrupt(self.pool, self.entries, self.pictures, level, args.seed + 1000 + int(round(level * 100)))
            directory = self.out / "quality" / f"noise{level:g}"
            where = it.write_pool(directory / "pool", samples, args.shards, f"q{level:g}-{args.seed}")
            clean = np.array([not s["corrupted"] for s in samples])
            run_dir = directory / "run"
            run_cli(self.score_base(directory / "pool") + main_options + ["--out", str(run_dir)])
            row = {"noise": level, "true_clean_fraction": float(clean.mean())}
            for rule_name, rules in zip(QUALITY_RULES, ([], ["--binarize", "kmeans"], ["--binarize", "sign"],
                                                        ["--combine-votes", "label-model"])):
                summary, kept, _ = run_filter(run_dir, directory / f"filter-{short_slug(rule_name)}", rules, where, len(samples))
                row[rule_name] = {"quality_estimate": summary["quality_estimate"], **kept_metrics(kept, clean)}
            columns = read_run(run_dir, where, len(samples))
            row["auroc_mimic"] = metrics.auroc(columns["mimic_score"], clean)
            row["auroc_clip_score"] = metrics.auroc(columns["clip_score"], clean)
            self.levels.append(row)
            print(f"quality pool noise {level:g}: estimate {row['gmm (default)']['quality_estimate']:.3f} "
                  f"(true clean {row['true_clean_fraction']:.3f})", flush=True)
        noise_levels = np.array([row["noise"] for row in self.levels])
        self.pearson = {}
        for rule_name in QUALITY_RULES:
            estimates = np.array([row[rule_name]["quality_estimate"] for row in self.levels])
            self.pearson[rule_name] = {
                "pearson_vs_noise": float(np.corrcoef(estimates, noise_levels)[0, 1]) if len(self.levels) > 1 else float("nan"),
                "mean_abs_error_vs_clean_fraction": float(np.mean(np.abs(estimates - (1 - noise_levels)))),
            }
        self.timings["quality_s"] = time.time() - t

    def results(self) -> dict:
        import torch

        args = self.args
        self.timings["total_s"] = time.time() - self.started
        return {
            "args": json_arguments(args),
            "argv": shlex.join([sys.executable, *sys.argv]),
            "platform": {"python": platform.python_version(), "torch": torch.__version__, "threads": args.threads,
                         "cpu_count": os.cpu_count(), "machine": platform.machine()},
            "data": {"emoji": len(self.entries), "heldout": len(self.heldout), "reference": len(self.ref_split),
                     "pool": self.n, "kinds": self.kind_counts, "image_size": it.IMAGE_SIZE},
            "model_cfg": it.CONFIG,
            "reference": {"recall": self.reference_recall, "steps": args.ref_steps},
            "runs": self.runs, "main_setting": self.main_name, "baselines": self.baselines,
            "subsets": self.subset_quality, "filter_commands": self.filter_commands, "downstream": self.trained,
            "quality": self.levels, "quality_pearson": self.pearson, "timings": self.timings,
        }


def main(argv=None) -> None:
    args = parse_args(argv)
    import logging

    import torch

    logging.getLogger().setLevel(logging.ERROR)  # open_clip's "no pretrained weights" warnings: intended
    torch.set_num_threads(args.threads)
    os.environ.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))  # and in every CLI process
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"output: {args.out}; {args.threads} torch thread(s)", flush=True)
    benchmark = Benchmark(args)
    for stage in (benchmark.data, benchmark.reference, benchmark.scoring, benchmark.subsets, benchmark.downstream,
                  benchmark.quality):
        stage()
    blob = benchmark.results()
    text = markdown(blob)
    print("\n" + text)
    (args.out / "results.json").write_text(json.dumps(blob, indent=2, default=float))
    (args.out / "results.md").write_text(text)
    print(f"wrote {args.out / 'results.json'} and {args.out / 'results.md'}")


if __name__ == "__main__":
    main()
