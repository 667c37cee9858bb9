"""The numbers and tables of benchmarks/quality_imagetext.py: scores and kept sets measured against
the truth, and the markdown tables of its results (``OUT/results.json``)."""

from __future__ import annotations

import numpy as np

from common import md_table
from imagetext_data import KINDS
from mimicfilter import metrics

QUALITY_RULES = ("gmm (default)", "kmeans", "sign", "gmm + label-model")


def detector_metrics(clean: np.ndarray, score: np.ndarray, kinds: np.ndarray) -> dict:
    """AUROC of ``score`` (higher = clean) overall and per corruption kind, and precision@true rate."""
    keep = int(clean.sum())
    order = np.argsort(-score, kind="mergesort")
    kept = np.zeros(len(score), dtype=bool)
    kept[order[:keep]] = True
    per_kind = {}
    for kind in KINDS:
        members = clean | (kinds == kind)
        if (kinds == kind).any():
            per_kind[kind] = metrics.auroc(score[members], clean[members])
    return {"auroc": metrics.auroc(score, clean), "precision_at_rate": float(clean[kept].mean()), "auroc_by_kind": per_kind}


def kept_metrics(kept: np.ndarray, clean: np.ndarray) -> dict:
    """The kept set as a detector of clean pairs."""
    detection = metrics.detection(kept, clean)
    return {"kept": int(kept.sum()), "kept_fraction": float(kept.mean()), "precision": detection.precision,
            "recall": detection.recall, "f1": detection.f1}


def baseline_scores(columns: dict, seed: int) -> dict[str, np.ndarray]:
    """Higher = more likely clean."""
    return {
        "clip_score (reference)": columns["clip_score"],
        "-ref_loss (reference)": -columns["ref_loss"],
        "-loss (proxy)": -columns["loss"],
        "loss - ref_loss (RHO-style)": columns["loss"] - columns["ref_loss"],
        "random": np.random.default_rng(seed + 4242).random(len(columns["loss"])),
    }


def markdown(blob: dict) -> str:
    """Every table of the benchmark: settings, detectors, subsets and downstream recall, the
    quality estimate against the noise rate, the commands and the wall time."""
    data, args, runs, recall = blob["data"], blob["args"], blob["runs"], blob["reference"]["recall"]["heldout"]
    clean_fraction = data["kinds"]["clean"] / data["pool"]
    md = [f"Pool: {data['pool']} emoji image–text pairs, {1 - clean_fraction:.0%} corrupted ({data['kinds']}); reference "
          f"trained on {data['reference']} disjoint clean pairs ({args['ref_steps']} steps), held-out recall@1 i2t "
          f"{recall['i2t_r1']:.3f} / t2i {recall['t2i_r1']:.3f} among {data['heldout']}, recall@5 {recall['i2t_r5']:.3f} / "
          f"{recall['t2i_r5']:.3f}.\n"]
    md.append(md_table(
        "Detecting clean pairs: mimic settings (AUROC of the mean score; precision keeping the true clean fraction; "
        "default filter rule = gmm votes, majority)",
        ["setting", "epochs", "wall s", "AUROC", "prec@rate", "AUROC last epoch", "default rule kept", "precision",
         "recall", "AUROC -loss", "AUROC loss-ref_loss", "Spearman mimic~clip_score"],
        [[name, r["epochs"], f"{r['wall_s']:.1f}", r["mimic_score"]["auroc"], r["mimic_score"]["precision_at_rate"],
          r["mimic_score_last"]["auroc"], r["default_rule"]["kept_fraction"], r["default_rule"]["precision"],
          r["default_rule"]["recall"], r["-loss (proxy)"]["auroc"], r["loss - ref_loss (RHO-style)"]["auroc"],
          r["spearman_mimic_vs_clip_score"]]
         for name, r in runs.items()]))
    md.append(f"True clean fraction {clean_fraction:.3f} (= precision of random keeping).\n")
    md.append(detectors(blob))
    md.append(md_table(
        f"Subsets (main setting: {blob['main_setting']}) and downstream CLIP trained from scratch, {args['down_steps']} "
        f"steps x batch {args['train_batch']}, mean of {args['down_seeds']} seed(s); recall among {data['heldout']} "
        "held-out clean pairs",
        ["subset", "size", "clean frac", "i2t R@1", "i2t R@5", "t2i R@1", "t2i R@5"],
        [[label, d["size"], d["clean_fraction"], d["recall"]["i2t_r1"], d["recall"]["i2t_r5"], d["recall"]["t2i_r1"],
          d["recall"]["t2i_r5"]] for label, d in blob["downstream"].items()]))
    md.append(f"Chance: R@1 {1 / data['heldout']:.3f}, R@5 {5 / data['heldout']:.3f}. Reference (trained on the clean "
              f"reference split): i2t R@1/R@5 {recall['i2t_r1']:.3f}/{recall['i2t_r5']:.3f}, "
              f"t2i {recall['t2i_r1']:.3f}/{recall['t2i_r5']:.3f}.\n")
    md.append(md_table(
        "Dataset-quality estimate (kept fraction; main setting) vs the true clean fraction",
        ["noise", "true clean", *QUALITY_RULES, "default-rule precision", "AUROC mimic", "AUROC clip_score"],
        [[row["noise"], row["true_clean_fraction"], *[row[rule]["quality_estimate"] for rule in QUALITY_RULES],
          row["gmm (default)"]["precision"], row["auroc_mimic"], row["auroc_clip_score"]] for row in blob["quality"]]))
    md.append(md_table("Pearson correlation of the quality estimate with the noise rate (paper: -0.90)",
                       ["rule", "Pearson r", "mean abs(estimate - clean fraction)"],
                       [[rule, p["pearson_vs_noise"], p["mean_abs_error_vs_clean_fraction"]]
                        for rule, p in blob["quality_pearson"].items()]))
    commands = [blob["argv"]] + [r["command"] for r in runs.values()] + list(blob["filter_commands"].values())
    md.append("Commands:\n\n```\n" + "\n".join(commands) + "\n```\n")
    timings = blob["timings"]
    md.append(f"Wall time: {timings['total_s']:.0f} s ({', '.join(f'{k} {v:.0f}' for k, v in timings.items())}).\n")
    return "\n".join(md)


def detectors(blob: dict) -> str:
    """The main setting's mimic score (and the best setting's, when another) beside the baselines,
    overall and per corruption kind."""
    runs, main_name = blob["runs"], blob["main_setting"]

    def row(label: str, result: dict) -> list:
        return [label, result["auroc"], result["precision_at_rate"],
                *[result["auroc_by_kind"].get(kind, float("nan")) for kind in KINDS]]

    rows = [row(f"mimic_score ({main_name})", runs[main_name]["mimic_score"])]
    best = max(runs, key=lambda name: runs[name]["mimic_score"]["auroc"])
    if best != main_name:
        rows.append(row(f"mimic_score ({best}; best setting, chosen on these labels)", runs[best]["mimic_score"]))
    rows += [row(label, result) for label, result in blob["baselines"].items()]
    return md_table("Scores as detectors of clean pairs, overall and per corruption kind (AUROC clean vs that kind)",
                    ["score (higher = clean)", "AUROC", "prec@rate", *[f"AUROC {kind}" for kind in KINDS]], rows)
