"""The tables of benchmarks/quality_fashion_mnist.py, from its results (``WORKDIR/results.json``)."""

from __future__ import annotations

from common import print_table

MIMIC = "mimic_score (mean over epochs)"


def print_report(blob: dict) -> None:
    """Detection of flipped labels per run, the scores as detectors, the per-epoch figures, the
    reference's consistency with the CLI, and the commands."""
    results, data = blob["runs"], blob["data"]
    noise = data["flipped"] / data["pool_size"]
    first = next(iter(results.values()))
    print_table(
        f"Fashion-MNIST, pool {data['pool_size']}, {noise:.0%} labels flipped; reference clean test acc "
        f"{blob['reference']['test_accuracy']:.4f}; detection of flipped labels (rule (a): flag unless r > 1 in most epochs)",
        ["run", "epochs", "wall s", "rule(a) P", "R", "F1", "kept", "rule(a) tau=inf F1", "kept", "AUROC mimic"],
        [[name, r["epochs"], f"{r['wall_s']:.1f}", r["rule_a"]["precision"], r["rule_a"]["recall"], r["rule_a"]["f1"],
          r["rule_a"]["kept_fraction"], r["rule_a_tau_inf"]["f1"], r["rule_a_tau_inf"]["kept_fraction"],
          r["auroc"][MIMIC]] for name, r in results.items()],
    )
    print(f"(true clean fraction {1 - noise:.3f}; random flagging at the true rate has P = R = F1 = {noise:.3f})")
    print_table(
        "Scores as detectors (AUROC, and F1 flagging exactly the true noise fraction)",
        ["score (run)", "AUROC", "F1 @ true rate"],
        [[f"{name} ({run})", r["auroc"][name], r["f1_at_true_rate"][name]]
         for run, r in results.items() for name in (MIMIC, "loss (proxy, mean over epochs)")]
        + [[f"{name}", first["auroc"][name], first["f1_at_true_rate"][name]] for name in ("ref_loss (reference)", "random")],
    )
    print_table(
        "Per epoch: fraction with r > 1 and AUROC of that epoch's mimic score",
        ["run", "r>1 fraction per epoch", "AUROC per epoch"],
        [[name, " ".join(f"{v:.2f}" for v in r["weight_gt1_fraction_per_epoch"]),
          " ".join(f"{v:.3f}" for v in r["mimic_score_auroc_per_epoch"])] for name, r in results.items()],
    )
    print(f"\nreference consistency: max |ref_loss(CLI) - ref_loss(this script's model)| = "
          f"{blob['reference']['ref_loss_max_abs_diff_vs_cli']:.2e}")
    print("\ncommands:")
    print(f"  {blob['argv']}")
    for r in results.values():
        print(f"  {r['command']}")
