"""The validation suite the filter's defaults are chosen on (``make bench-defaults``).

    python benchmarks/bench_defaults.py                  # cold: ~19 min on 2 idle cores (docs/benchmarks.md); cached: ~6 min
    python benchmarks/bench_defaults.py --out DIR --jobs 2

Builds the pools of ``benchmarks/defaults_suite.py`` (image–text pools with swapped captions at 0-70 %
and web-style mixed corruption; Fashion-MNIST with no, symmetric and class-dependent label noise),
scores each with the real ``mimicfilter score`` at the task defaults and at other batch sizes,
temperatures, learning rates and epochs, and then, for every run and every vote rule
(``--binarize`` x ``--combine-votes``), computes what ``mimicfilter filter RUN`` would report:

* the quality estimate (the votes' kept share of the usable samples) minus the true clean share;
* the F1 of the dropped samples as a detector of the noisy ones (none on a clean pool);
* for the default rule, the estimate's interval and warnings (``curate/estimate.py``) and whether
  the interval holds the truth.

It prints one table per task (rows: runs; columns: rules, "error / F1"), the worst case of each rule
over all runs, and the worst case per setting, and writes OUT/results.json and OUT/results.md.
Defaults are chosen by the WORST case, not the mean. Everything is cached under OUT.

Runs at the defaults and their variants are scored with anchors (``--trusted``, 500 per pool); for
them it also reports the calibrated estimate, its interval and the calibrated cut for 100, 200 and
500 trusted samples, and again on fresh draws of 200 that no default was chosen on
(benchmarks/calibration_eval.py), and, on one pool, how far the anchors move the
pool's own scores next to how far another seed moves them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

import calibration_eval
import defaults_suite as suite
from common import ROOT, idle_cores, md_table
from mimicfilter import metrics
from mimicfilter.curate.duck import connect, load_scores, score_files
from mimicfilter.curate.estimate import estimate_quality
from mimicfilter.curate.votes import AggregateConfig, aggregate
from mimicfilter.defaults import BINARIZE_RULES, VOTE_COMBINERS

DEFAULT = AggregateConfig()


def rule_name(config: AggregateConfig) -> str:
    return config.binarize if config.combine_votes == "majority" else f"{config.binarize}+lm"


def candidate_rules(epochs: int) -> list[AggregateConfig]:
    return [AggregateConfig(binarize, combine) for combine in VOTE_COMBINERS for binarize in BINARIZE_RULES]


def evaluate(run: dict) -> dict:
    """Every rule's estimate error and detection F1 on one run, and the default's interval and warnings."""
    truth = run["truth"]
    with tempfile.TemporaryDirectory() as spill:
        connection = connect(None, spill)
        load_scores(connection, score_files([str(run["run_dir"])]))
        epochs = connection.execute("SELECT count(DISTINCT epoch) FROM scores").fetchone()[0]
        results = {}
        for config in candidate_rules(epochs):
            aggregation = aggregate(connection, config)
            rows = connection.execute("SELECT shard, key, status = 'ok' AND vote_keep FROM samples").fetchall()
            kept = {f"{Path(shard).name}/{key}": bool(flag) for shard, key, flag in rows}
            keys = sorted(truth)
            clean = np.array([truth[key] for key in keys])
            keep = np.array([kept[key] for key in keys])
            detection = metrics.detection(~keep, ~clean) if (~clean).any() else None
            entry = {"estimate": float(keep.mean()), "error": float(keep.mean() - clean.mean()),
                     "f1": detection.f1 if detection else None}
            if config == DEFAULT:
                estimate = estimate_quality(connection, aggregation, config)
                entry["interval"] = [estimate.low, estimate.high]
                entry["covered"] = bool(estimate.low - 1e-9 <= clean.mean() <= estimate.high + 1e-9)
                entry["warnings"] = list(estimate.warnings)
                entry["by_rule"] = estimate.by_rule
                entry["second_mode"] = estimate.second_mode
            results[rule_name(config)] = entry
        calibration = None
        if run.get("anchored"):
            epoch_list = [row[0] for row in connection.execute("SELECT DISTINCT epoch FROM scores ORDER BY 1").fetchall()]
            calibration = calibration_eval.evaluate(connection, truth, epoch_list)
        connection.close()
    return {"epochs": epochs, "clean_fraction": float(np.mean(list(truth.values()))), "rules": results,
            "calibration": calibration, "default_rule": rule_name(DEFAULT)}


def calibration_tables(results: list[dict]) -> str:
    """The calibrated estimate per anchored run (200 trusted samples) and the worst cases per anchor count."""
    anchored = [r for r in results if r.get("calibration")]
    if not anchored:
        return ""
    out = [md_table("Calibrated estimate with 200 trusted samples (mean over draws; the relative score's error for "
                    "comparison)", calibration_eval.SUMMARY_HEADER, calibration_eval.summary_rows(anchored, "200"))]
    rows = []
    for count in [*map(str, calibration_eval.ANCHOR_COUNTS), calibration_eval.HELD_OUT]:
        worst = calibration_eval.acceptance(anchored, count)
        fmt = lambda value, scale=100: "–" if value is None else f"{scale * value:.1f}"  # noqa: E731
        label = f"{calibration_eval.HELD_OUT_COUNT}, held-out draws" if count == calibration_eval.HELD_OUT else count
        rows.append([label, str(worst["draws"]), fmt(worst["coverage"]), fmt(worst["worst_error_separated"]),
                     fmt(worst["worst_error_other"]), fmt(worst["clean_min_estimate"]), fmt(worst["clean_min_kept"]),
                     "–" if worst["labelled_f1_gap"] is None else f"{worst['labelled_f1_gap']:+.3f}",
                     fmt(worst["within_bounds"])])
    out.append(md_table("Calibration's worst cases over every draw of every anchored run (held-out: fresh draws that "
                        "no default was chosen on)", [
        "trusted", "draws", "interval holds truth (%)", f"worst |error|, AUROC ≥ 0.85", "worst |error|, elsewhere",
        "clean pools: lowest estimate (%)", "clean pools: least kept (%)",
        "labelled pools: F1 less the best single signal's (worst)", "draws within every bound (%)"], rows))
    return "\n".join(out)


def anchor_invariance(data, out: Path, threads: int, seed: int) -> str:
    """How far the anchors move one pool's own scores, next to how far another seed moves them."""
    pool = next(p for p in suite.POOLS if p.name == "emoji-swap30")
    setting = suite.SETTINGS["contrastive"][0][0]
    runs = {name: suite.score(data, pool, "unseen", setting, out, threads, run_seed, anchored, f"invariance-{name}")
            for name, run_seed, anchored in (("anchored", seed, True), ("plain", seed, False), ("seed-1", seed + 1, False))}
    with tempfile.TemporaryDirectory() as spill:
        connection = connect(None, spill)
        scores = {}
        for name, run in runs.items():
            load_scores(connection, score_files([str(run["run_dir"])]))
            scores[name] = dict(connection.execute('SELECT shard || \'/\' || "index", mimic_score FROM scores').fetchall())
        connection.close()
    keys = sorted(scores["plain"])

    def compare(name: str) -> str:
        a, b = np.array([scores["plain"][k] for k in keys]), np.array([scores[name][k] for k in keys])
        return (f"max |Δ| {np.max(np.abs(a - b)):.2e}, mean |Δ| {np.mean(np.abs(a - b)):.2e}, "
                f"Spearman {metrics.spearman(a, b):.4f}")

    return (f"Anchors and the pool's own scores ({pool.name}, unseen reference, defaults; mimic scores of the "
            f"{len(keys)} pool samples): with anchors vs without: {compare('anchored')}; another seed without "
            f"anchors: {compare('seed-1')}.\n")


def fmt_entry(entry: dict | None) -> str:
    if entry is None:
        return ""
    f1 = "–" if entry["f1"] is None else f"{entry['f1']:.2f}"
    return f"{100 * entry['error']:+.1f} / {f1}"


def _worst(runs: list[dict], name: str) -> tuple[float, dict | None]:
    errors = [(abs(r["rules"][name]["error"]), r) for r in runs if name in r["rules"]]
    return max(errors, key=lambda pair: pair[0]) if errors else (float("nan"), None)


def _where(run: dict | None) -> str:
    return "" if run is None else f"{run['pool']} ({run['reference']}, {run['setting']})"


def _f1s(runs: list[dict], name: str) -> list[float]:
    return [r["rules"][name]["f1"] for r in runs if name in r["rules"] and r["rules"][name]["f1"] is not None]


def default_per_pool(results: list[dict], default: str) -> str:
    """The compact table for docs/benchmarks.md: per pool and reference, the default rule's error at the
    task's defaults and its worst over the variants (batch size, epochs), F1, range and warnings."""
    rows = []
    for pool, reference in dict.fromkeys((r["pool"], r["reference"]) for r in results):
        runs = [r for r in results if (r["pool"], r["reference"]) == (pool, reference)]
        base = next((r for r in runs if r["role"] == "default"), None)
        if base is None:
            continue
        entry = base["rules"][default]
        variants = [r for r in runs if r["role"] == "variant"]
        worst, where = _worst(variants, default) if variants else (None, None)
        f1 = "–" if entry["f1"] is None else f"{entry['f1']:.2f}"
        miss = abs(entry["error"]) > 0.05 or (worst is not None and worst > 0.05)
        warnings = "; ".join(w.split(" (")[0].split(":")[0] for w in entry["warnings"]) or "–"
        rows.append([pool, reference, f"{100 * base['clean_fraction']:.0f}%", f"{100 * entry['estimate']:.1f}%",
                     f"{'**' if abs(entry['error']) > 0.05 else ''}{100 * entry['error']:+.1f}"
                     f"{'**' if abs(entry['error']) > 0.05 else ''}",
                     "–" if worst is None else f"{100 * worst:.1f} ({where['setting']})",
                     f1, f"{100 * entry['interval'][0]:.1f}–{100 * entry['interval'][1]:.1f}%",
                     "yes" if entry["covered"] else "no", warnings, "miss" if miss else "ok"])
    return md_table(f"The default rule ({default}) per pool: error at the task's defaults, worst abs error over the "
                    "variants (batch size, epochs), F1, range over the vote rules and warnings at the defaults",
                    ["pool", "reference", "truth", "estimate", "error", "worst variant", "F1", "range",
                     "holds truth", "warnings", "±5"], rows)


def tables(results: list[dict]) -> str:
    out = []
    rules = list(dict.fromkeys(name for r in results for name in r["rules"]))
    for task in ("contrastive", "classify"):
        runs = [r for r in results if r["task"] == task]
        if runs:
            rows = [[r["pool"], r["reference"], r["setting"], f"{100 * r['clean_fraction']:.0f}%",
                     *[fmt_entry(r["rules"].get(name)) for name in rules]] for r in runs]
            out.append(md_table(f"{task}: estimate error (points, estimate − truth) / detection F1, per rule",
                                ["pool", "reference", "setting", "clean", *rules], rows))
    selection = [r for r in results if r["role"] in ("default", "variant")]
    rows = []
    for name in rules:
        worst, where = _worst(selection, name)
        every, every_where = _worst(results, name)
        f1s = _f1s(selection, name)
        rows.append([name, f"**{100 * worst:.1f}**", _where(where),
                     f"{100 * np.mean([abs(r['rules'][name]['error']) for r in selection if name in r['rules']]):.1f}",
                     f"{min(f1s):.2f}" if f1s else "–", f"{100 * every:.1f}", _where(every_where)])
    out.append(md_table("Worst case per rule: over the runs at the defaults and their variants (batch size, epochs), "
                        "and over every run", ["rule", "worst abs error", "where", "mean abs error", "worst F1",
                                               "worst, every run", "where"], rows))
    default = rule_name(DEFAULT)
    out.append(default_per_pool(results, default))
    rows = []
    for r in results:
        entry = r["rules"][default]
        rows.append([r["pool"], r["reference"], r["setting"], f"{100 * r['clean_fraction']:.1f}%",
                     f"{100 * entry['estimate']:.1f}%", f"{100 * entry['interval'][0]:.1f}–{100 * entry['interval'][1]:.1f}%",
                     "yes" if entry["covered"] else "no",
                     "; ".join(w.split(" (")[0].split(":")[0] for w in entry["warnings"]) or "–"])
    covered = [r["rules"][default]["covered"] for r in selection]
    out.append(md_table(f"The default rule ({default}): estimate, range over the vote rules, warnings",
                        ["pool", "reference", "setting", "truth", "estimate", "range", "range holds truth", "warnings"],
                        rows))
    misses = [r for r in selection if abs(r["rules"][default]["error"]) > 0.05]
    silent = [f"{r['pool']} ({r['reference']}, {r['setting']})" for r in misses if not r["rules"][default]["warnings"]]
    out.append(f"The range held the truth on {sum(covered)} of {len(covered)} runs at the defaults and their variants. "
               f"The default missed the truth by more than 5 points on {len(misses)} of them; "
               f"{len(misses) - len(silent)} of those carried a warning"
               + (f" (none on: {', '.join(silent)})" if silent else "") + ".\n")
    rows = []
    for task, setting, role in dict.fromkeys((r["task"], r["setting"], r["role"]) for r in results):
        runs = [r for r in results if (r["task"], r["setting"]) == (task, setting)]
        pools = {(r["pool"], r["reference"]) for r in runs}
        base = [r for r in results if r["task"] == task and r["role"] == "default" and (r["pool"], r["reference"]) in pools]
        f1s = _f1s(runs, default)
        rows.append([task, setting, role, str(len(runs)), f"{100 * _worst(runs, default)[0]:.1f}",
                     f"{100 * _worst(base, default)[0]:.1f}", f"{min(f1s):.2f}" if f1s else "–",
                     f"{np.mean(f1s):.2f}" if f1s else "–"])
    out.append(md_table(f"Settings under the default rule ({default}): worst abs error over the runs of each setting, "
                        "next to the defaults' on the same pools",
                        ["task", "setting", "role", "runs", "worst abs error", "defaults, same pools", "worst F1",
                         "mean F1"], rows))
    return "\n".join(out)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "bench-runs" / "defaults")
    parser.add_argument("--threads", type=int, default=0, help="torch threads in all [the idle cores, at least 1]")
    parser.add_argument("--jobs", type=int, default=0,
                        help="scoring processes at once, each with threads/jobs torch threads [the cores]")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pools", default=None, help="comma-separated pool names [all]")
    args = parser.parse_args(argv)
    if args.threads <= 0:
        args.threads = idle_cores()
    jobs = args.jobs if args.jobs > 0 else (os.cpu_count() or 1)
    # one thread per job: small models run faster as several one-thread processes than as one
    # multi-thread process, and the cached references and runs are stamped with this count
    per_job = max(1, args.threads // jobs)
    import torch

    torch.set_num_threads(per_job)
    started = time.time()
    args.out.mkdir(parents=True, exist_ok=True)
    pools = [p for p in suite.POOLS if args.pools is None or p.name in args.pools.split(",")]
    runs = suite.runs_of(pools)
    # The Debian data packages before the tasks prepare side by side: installing libfribidi0 starts
    # this program again (scripts/emoji_data.py), which must not happen in the middle of the other
    # task's work.
    tasks_needed = {pool.task for pool, _, _ in runs}
    if "contrastive" in tasks_needed:
        suite.imagetext.ensure_packages()
    if "classify" in tasks_needed:
        suite.fmnist.ensure_dataset()

    def prepare(task: str):
        """The task's reference and its pools, each pool written once before runs share it."""
        made = (suite.EmojiData if task == "contrastive" else suite.FashionData)(args.out, args.seed, per_job)
        for pool in dict.fromkeys(pool for pool, _, _ in runs if pool.task == task):
            made.pool(pool)
        return made

    def score_and_evaluate(spec: tuple) -> tuple[dict, dict]:
        pool, reference, setting = spec
        run = suite.score(data[pool.task].result(), pool, reference, setting, args.out, per_job, args.seed)
        return run, evaluate(run)

    results = []
    tasks = list(dict.fromkeys(pool.task for pool, _, _ in runs))
    # The references train side by side, and runs start as soon as their task's reference is ready:
    # the runs of the quicker one (Fashion-MNIST) are queued first. Results are read back in the
    # suite's order, so the tables never depend on --jobs.
    with ThreadPoolExecutor(len(tasks)) as preparing, ThreadPoolExecutor(jobs) as scoring:
        data = {task: preparing.submit(prepare, task) for task in tasks}
        order = sorted(range(len(runs)), key=lambda i: runs[i][0].task != "classify")
        futures = {i: scoring.submit(score_and_evaluate, runs[i]) for i in order}
        for i, (pool, reference, setting) in enumerate(runs):
            run, evaluated = futures[i].result()
            results.append({"pool": pool.name, "task": pool.task, "reference": reference, "setting": setting.name,
                            "role": setting.role, "command": run["command"], "score_wall_s": run["wall_s"],
                            **evaluated})
            default = evaluated["rules"][rule_name(DEFAULT)]
            f1 = "–" if default["f1"] is None else f"{default['f1']:.3f}"
            scored = "" if run["wall_s"] is None else f" [scored in {run['wall_s']:.0f} s]"
            print(f"{pool.name:14s} {reference:7s} {setting.name:22s} truth {evaluated['clean_fraction']:.3f} default "
                  f"{default['estimate']:.3f} (F1 {f1}){scored}", flush=True)
    text = tables(results) + "\n" + calibration_tables(results)
    if args.pools is None or "emoji-swap30" in args.pools.split(","):
        text += "\n" + anchor_invariance(data["contrastive"].result(), args.out, per_job, args.seed)
    total = time.time() - started
    cpu = sum(getattr(resource.getrusage(who), field) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
              for field in ("ru_utime", "ru_stime"))
    scored = [r["score_wall_s"] for r in results if r["score_wall_s"] is not None]
    text += (f"\nWall time {total:.0f} s, CPU time {cpu:.0f} s ({jobs} job(s) of {per_job} torch thread(s), {os.cpu_count()} cores, "
             f"load average at the end {os.getloadavg()[0]:.1f}; {len(scored)} of {len(results)} runs scored now, "
             f"in {sum(scored):.0f} s, the rest cached). Command: `{' '.join([Path(sys.executable).name, *sys.argv])}`\n")
    print("\n" + text)
    blob = {"args": {k: str(v) for k, v in vars(args).items()}, "platform": {"python": platform.python_version(),
            "torch": torch.__version__, "cores": os.cpu_count()}, "default": rule_name(DEFAULT), "results": results,
            "wall_s": total}
    (args.out / "results.json").write_text(json.dumps(blob, indent=1, default=str))
    (args.out / "results.md").write_text(text)


if __name__ == "__main__":
    main()
