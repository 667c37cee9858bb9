"""Stage 1 reproduced: does Grad-Mimic re-weighting train to the same quality in fewer steps?

    python benchmarks/stage1.py            # full: under 30 minutes on 2 idle CPU cores
    python benchmarks/stage1.py --quick    # under 8 minutes
    make bench-stage1                      # the full run

The paper: re-weighting each batch by mimic scores "accelerates convergence ... and enhances CLIP
models with 20.7% fewer training steps" (the re-weighted run reaches the plain run's final loss
20.7% earlier), and gains accuracy when training on noisy labels. Two parts, the same training loop
with and without ``mimicfilter.GradMimic`` (plain = the mean per-sample loss):

1. Labelled images (benchmarks/stage1_labelled.py): Fashion-MNIST, 40 % of the pool's labels flipped
   (symmetric and class-dependent); a small MLP fine-tuned from a shared start checkpoint, plain
   AdamW versus re-weighting toward the start fine-tuned on clean data; clean test accuracy vs step.
2. Image–text (benchmarks/stage1_imagetext.py): the quality benchmark's emoji pool (40 % web-style
   noise); a small CLIP from scratch, plain versus re-weighting toward the CLIP trained on the clean
   reference split, mimic layers = image projection and, separately, the image tower's last MLP
   block; held-out loss and recall@1/5 vs step.

For every seed: the re-weighted run's steps to reach the plain run's final value (the paper's
measure, as a fraction of the plain run's steps), the same at equal wall time (x the measured
overhead), both runs' final values, and the re-weighted value at the plain run's wall time. The
overhead per step is the median ratio of a re-weighted to a plain step, the two alternating in one
process (A B A B ...), so a neighbour's load hits both alike. The two parts run in two processes at
once (``--jobs``, default 2 on 2 cores, one torch thread each). Writes OUT/results.json, OUT/results.md
and the curves (OUT/*.png; ``--docs-images`` also copies them to docs/images/).
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

from common import ROOT, idle_cores, json_arguments, md_table, quick_or_full
from stage1_common import Curve, compare_to_plain, pm

PLAIN = "plain AdamW"
LABELLED_METRICS = (("test_accuracy", "clean test accuracy", True),)
IMAGETEXT_METRICS = (("heldout_loss", "held-out loss", False), ("r1", "held-out R@1", True), ("r5", "held-out R@5", True))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer steps and variants (under 8 minutes on 2 idle cores)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seeds", type=int, default=3, help="training seeds per setting [3]")
    parser.add_argument("--parts", default="labelled,imagetext", help="which parts to run [labelled,imagetext]")
    parser.add_argument("--out", type=Path, default=None, help="output directory [bench-runs/stage1, quick: stage1-quick]")
    parser.add_argument("--noise", type=float, default=0.4, help="corrupted fraction of both pools [0.4]")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per process (0: the cores the load "
                        "average leaves, >= 1; 1 with --jobs 2)")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                        help="run the parts in this many processes at once [2 when there are 2 cores]")
    parser.add_argument("--timing-pairs", type=int, default=None, help="A/B step pairs per overhead measurement [40; quick 15]")
    parser.add_argument("--docs-images", action="store_true", help="also copy the curves to docs/images/")
    group = parser.add_argument_group("labelled part")
    group.add_argument("--labelled-steps", type=int, default=None, help="fine-tuning steps on the noisy pool [1500; quick 600]")
    group.add_argument("--labelled-eval-every", type=int, default=None, help="[100; quick 50]")
    group.add_argument("--labelled-ref-size", type=int, default=20000)
    group.add_argument("--labelled-pool-size", type=int, default=20000)
    group.add_argument("--labelled-ref-steps", type=int, default=None, help="reference fine-tuning steps [1500; quick 600]")
    group = parser.add_argument_group("image-text part")
    group.add_argument("--imagetext-steps", type=int, default=None, help="CLIP training steps on the pool [300; quick 150]")
    group.add_argument("--imagetext-eval-every", type=int, default=25)
    group.add_argument("--imagetext-ref-steps", type=int, default=None, help="reference training steps [600; quick 300]")
    group.add_argument("--imagetext-seed-offset", type=int, default=100, help="training seed = --seed + offset + i")
    group.add_argument("--heldout", type=int, default=500)
    group.add_argument("--ref-size", type=int, default=1500)
    group.add_argument("--train-batch", type=int, default=128)
    args = parser.parse_args(argv)
    quick_or_full(args, args.quick, {
        "out": (ROOT / "bench-runs" / "stage1-quick", ROOT / "bench-runs" / "stage1"), "timing_pairs": (15, 40),
        "labelled_steps": (600, 1500), "labelled_eval_every": (50, 100), "labelled_ref_steps": (600, 1500),
        "imagetext_steps": (150, 300), "imagetext_ref_steps": (300, 600)})
    args.parts = [part.strip() for part in args.parts.split(",") if part.strip()]
    if set(args.parts) - {"labelled", "imagetext"} or not args.parts:
        parser.error("--parts: labelled and/or imagetext")
    if args.seeds < 1:
        parser.error("--seeds must be at least 1")
    if args.threads <= 0 and args.jobs > 1:
        args.threads = 1
    if args.threads <= 0:
        args.threads = idle_cores()
    return args


# ------------------------------------------------------------------------------------------- analysis


def summarise(curves: dict, timing: dict, metrics) -> list[dict]:
    """One row per (re-weighted method, metric): the paper's measure, finals, equal wall time."""
    rows = []
    for name, runs in curves.items():
        if name == PLAIN:
            continue
        overhead = timing.get(name, {}).get("ratio_median", float("nan"))
        for key, label, higher in metrics:
            comparison = compare_to_plain(curves[PLAIN], runs, key, higher, overhead)
            rows.append({"method": name, "metric": label, "overhead": overhead, **comparison})
    return rows


def fraction_cell(values: list[float]) -> str:
    finite = [v for v in values if np.isfinite(v)]
    reached = f"{len(finite)}/{len(values)} reached"
    if not finite:
        return f"never ({reached})"
    return f"{np.mean(finite):.2f} [{min(finite):.2f}, {max(finite):.2f}] ({reached})"


def rows_table(title: str, rows: list[dict]) -> str:
    return md_table(title, ["method", "metric", "overhead/step", "steps to reach plain final (fraction)",
                            "same at equal wall time", "plain itself", "plain final", "re-weighted final",
                            "re-weighted at plain's wall time"],
                    [[r["method"], r["metric"], f"{r['overhead']:.2f}×", fraction_cell(r["steps_fraction"]),
                      fraction_cell(r["wall_fraction"]), fraction_cell(r["plain_own_fraction"]),
                      pm(r["final_plain"]), pm(r["final"]),
                      pm([v for v in r["at_plain_wall_time"] if np.isfinite(v)] or [float("nan")])] for r in rows])


def weight_table(title: str, curves: dict) -> str:
    rows = []
    for name, runs in curves.items():
        if name == PLAIN:
            continue
        entropy = [np.mean(run.entropy_fraction) for run in runs]
        noisy = [np.mean(run.noisy_weight) for run in runs if run.noisy_weight]
        rows.append([name, pm(entropy), pm(noisy) if noisy else "n/a"])
    return md_table(title, ["method", "weight entropy / log B (1 = uniform)", "batch weight on corrupted samples"], rows)


# ------------------------------------------------------------------------------------------- plots


def plot_curves(path: Path, title: str, panels: list[tuple[str, dict, str, str]], timing: dict) -> None:
    """Mean over seeds (line) and the seeds' range (band), against steps (top) and wall time (bottom:
    plain's median step time x each method's measured overhead)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(2, len(panels), figsize=(4.2 * len(panels), 6.2), squeeze=False)
    for column, (panel_title, curves, key, label) in enumerate(panels):
        plain_step = float(np.median([np.median(run.step_seconds) for run in curves[PLAIN]]))
        for name, runs in curves.items():
            steps = np.asarray(runs[0].steps)
            values = np.asarray([run.metrics[key] for run in runs])
            overhead = 1.0 if name == PLAIN else timing.get(name, {}).get("ratio_median", np.nan)
            for row, x in enumerate((steps, steps * plain_step * overhead)):
                axis = axes[row][column]
                line, = axis.plot(x, values.mean(0), label=name, linewidth=1.4)
                axis.fill_between(x, values.min(0), values.max(0), color=line.get_color(), alpha=0.15, linewidth=0)
        axes[0][column].set_title(panel_title, fontsize=10)
        axes[0][column].set_xlabel("step")
        axes[1][column].set_xlabel("wall time (s, measured step cost)")
        for row in range(2):
            axes[row][column].set_ylabel(label)
            axes[row][column].grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    figure.suptitle(title, fontsize=11)
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    plt.close(figure)
    from PIL import Image

    with Image.open(path) as image:  # a 64-colour palette: a third of the bytes, for docs/images/
        image.convert("RGB").quantize(64).save(path, optimize=True)


# ------------------------------------------------------------------------------------------- runner


def report(args, results: dict, timings: dict, argv: list[str]) -> tuple[str, list[Path]]:
    """The markdown tables and the curve plots of both parts."""
    import stage1_labelled

    markdown, images = [], []
    if "labelled" in results:
        labelled = results["labelled"]
        markdown.append(f"Labelled images: Fashion-MNIST, {args.noise:.0%} of {args.labelled_pool_size} pool labels flipped; "
                        f"start checkpoint clean test accuracy {pm(labelled['start_accuracy'])}, reference (start fine-tuned "
                        f"on {args.labelled_ref_size} clean images) {pm(labelled['reference_accuracy'])}; "
                        f"{args.labelled_steps} steps x batch {stage1_labelled.BATCH}, {args.seeds} seeds.\n")
        for kind, curves in labelled["curves"].items():
            markdown.append(rows_table(f"Fashion-MNIST, {kind} flips", summarise(curves, labelled["timing"], LABELLED_METRICS)))
            markdown.append(weight_table(f"Fashion-MNIST, {kind} flips: the batch weights", curves))
        path = args.out / "stage1-fashion-mnist.png"
        plot_curves(path, f"Fashion-MNIST, {args.noise:.0%} flipped labels: clean test accuracy (mean, seed range)",
                    [(f"{kind} flips", curves, "test_accuracy", "test accuracy") for kind, curves in labelled["curves"].items()],
                    labelled["timing"])
        images.append(path)
    if "imagetext" in results:
        imagetext = results["imagetext"]
        reference = imagetext["reference"]
        markdown.append(f"Image–text: emoji pool of {imagetext['pool']['size']} pairs, {imagetext['pool']['corrupted']:.0%} "
                        f"corrupted; reference (clean split, {args.imagetext_ref_steps} steps) held-out loss "
                        f"{reference['heldout_loss']:.3f}, R@1 {reference['r1']:.3f}, R@5 {reference['r5']:.3f}; "
                        f"{args.imagetext_steps} steps x batch {args.train_batch}, {args.seeds} seeds.\n")
        curves = imagetext["curves"]
        markdown.append(rows_table("Emoji CLIP from scratch on the noisy pool", summarise(curves, imagetext["timing"], IMAGETEXT_METRICS)))
        markdown.append(weight_table("Emoji CLIP: the batch weights", curves))
        path = args.out / "stage1-emoji-clip.png"
        plot_curves(path, f"Emoji CLIP from scratch, {args.noise:.0%} corrupted pool (mean, seed range)",
                    [(label, curves, key, label) for key, label, _ in IMAGETEXT_METRICS], imagetext["timing"])
        images.append(path)
    timing_rows = [[part, name, t["pairs"], f"{1000 * t['median_a_s']:.1f}", f"{1000 * t['median_b_s']:.1f}",
                    f"{t['ratio_median']:.2f}× [{t['ratio_iqr'][0]:.2f}, {t['ratio_iqr'][1]:.2f}]"]
                   for part in ("labelled", "imagetext") if part in results
                   for name, t in results[part]["timing"].items()]
    markdown.append(md_table("Wall time per step, A/B alternating in one process", ["part", "method", "pairs",
                             "plain ms", "re-weighted ms", "ratio (median, IQR)"], timing_rows))
    markdown.append(f"Command: `{shlex.join(argv)}`; {args.threads} torch thread(s), "
                    f"{os.cpu_count()} cores, wall time {timings['total_s']:.0f} s "
                    f"({', '.join(f'{k} {v:.0f}' for k, v in timings.items())}).\n")
    return "\n".join(markdown), images


def load_results(path: Path) -> tuple[argparse.Namespace, dict, dict, list[str]]:
    """A finished run's arguments, curves and timings from its results.json (to redraw its tables)."""
    blob = json.loads(path.read_text())
    args = argparse.Namespace(**blob["args"])
    args.out = Path(args.out)
    results = blob["results"]
    for part in results.values():
        nested = all(isinstance(v, dict) for v in part["curves"].values())  # labelled: noise kind -> method
        for group in (part["curves"].values() if nested else [part["curves"]]):
            for name, runs in group.items():
                group[name] = [Curve.from_json(run) for run in runs]
    return args, results, blob["timings"], blob.get("argv", ["python", "benchmarks/stage1.py", "(arguments not recorded)"])


def run_part(part: str, args: argparse.Namespace, started: float) -> tuple[dict, float, float]:
    """One part's results, wall seconds and CPU seconds (this process's)."""
    import logging

    import torch

    logging.getLogger().setLevel(logging.ERROR)  # open_clip's "no pretrained weights": intended
    torch.set_num_threads(args.threads)

    def log(message: str) -> None:
        print(f"[{time.time() - started:6.0f} s] {part}: {message}", flush=True)

    module = __import__(f"stage1_{part}")
    wall, cpu = time.time(), time.process_time()
    result = module.run(args, log)
    return result, time.time() - wall, time.process_time() - cpu


def main(argv=None) -> None:
    raw_argv = list(sys.argv[1:] if argv is None else argv)
    if raw_argv[:1] == ["--from-results"]:  # redraw the tables and curves of a finished run
        if len(raw_argv) != 2:
            sys.exit("usage: stage1.py --from-results OUT/results.json")
        args, results, timings, run_argv = load_results(Path(raw_argv[1]))
        text, images = report(args, results, timings, run_argv)
        print(text)
        (args.out / "results.md").write_text(text)
        if args.docs_images:
            for path in images:
                shutil.copyfile(path, ROOT / "docs" / "images" / path.name)
        print(f"redrew {args.out / 'results.md'} and {', '.join(p.name for p in images)}")
        return
    args = parse_args(raw_argv)
    import logging

    import torch

    logging.getLogger().setLevel(logging.ERROR)  # open_clip's "no pretrained weights": intended
    torch.set_num_threads(args.threads)
    started = time.time()
    args.out.mkdir(parents=True, exist_ok=True)

    def log(message: str) -> None:
        print(f"[{time.time() - started:6.0f} s] {message}", flush=True)

    log(f"output {args.out}; {args.threads} torch thread(s); load average {os.getloadavg()[0]:.1f}")
    results, timings = {}, {}
    if args.jobs > 1 and len(args.parts) > 1:  # one process per part, each with its own torch threads
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(len(args.parts), mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {part: pool.submit(run_part, part, args, started) for part in args.parts}
            done = {part: future.result() for part, future in futures.items()}
    else:
        done = {part: run_part(part, args, started) for part in args.parts}
    for part, (result, seconds, cpu_seconds) in done.items():
        results[part], timings[f"{part}_s"], timings[f"{part}_cpu_s"] = result, seconds, cpu_seconds
    timings["total_s"] = time.time() - started
    timings["total_cpu_s"] = (time.process_time() if args.jobs <= 1 or len(args.parts) == 1
                              else time.process_time() + sum(timings[f"{part}_cpu_s"] for part in args.parts))
    command = ["python", "benchmarks/stage1.py", *raw_argv]
    text, images = report(args, results, timings, command)
    print("\n" + text)

    def serialise(value):
        if hasattr(value, "to_json"):
            return value.to_json()
        return float(value) if isinstance(value, (np.floating, np.integer)) else str(value)

    blob = {"args": json_arguments(args), "argv": command,
            "platform": {"python": platform.python_version(), "torch": torch.__version__, "threads": args.threads,
                         "cpu_count": os.cpu_count(), "machine": platform.machine()},
            "results": results, "timings": timings}
    (args.out / "results.json").write_text(json.dumps(blob, indent=1, default=serialise))
    (args.out / "results.md").write_text(text)
    if args.docs_images:
        for path in images:
            shutil.copyfile(path, ROOT / "docs" / "images" / path.name)
    print(f"wrote {args.out / 'results.json'}, {args.out / 'results.md'} and {', '.join(p.name for p in images)}")


if __name__ == "__main__":
    main()
