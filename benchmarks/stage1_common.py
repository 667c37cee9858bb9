"""What both parts of benchmarks/stage1.py share: curves, the paper's steps-to-reach measure, spreads,
and the alternating A/B timing of a plain step against a re-weighted one."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np


@dataclass
class Curve:
    """One training run: the metrics at each evaluated step, and the wall time of every step."""

    steps: list[int] = field(default_factory=list)
    metrics: dict[str, list[float]] = field(default_factory=dict)
    step_seconds: list[float] = field(default_factory=list)
    entropy_fraction: list[float] = field(default_factory=list)  # H(w) / log B per step (re-weighted runs)
    noisy_weight: list[float] = field(default_factory=list)  # share of the batch weight on corrupted samples

    def add(self, step: int, values: dict[str, float]) -> None:
        self.steps.append(step)
        for name, value in values.items():
            self.metrics.setdefault(name, []).append(float(value))

    def final(self, name: str, last: int = 1) -> float:
        return float(np.mean(self.metrics[name][-last:]))

    @classmethod
    def from_json(cls, blob: dict) -> "Curve":
        """A curve read back from results.json (per-step series come back as their summaries)."""
        curve = cls(steps=list(blob["steps"]), metrics={k: list(v) for k, v in blob["metrics"].items()},
                    step_seconds=[blob["median_step_s"]])
        if blob.get("entropy_fraction_mean") is not None:
            curve.entropy_fraction = [blob["entropy_fraction_mean"]]
        if blob.get("noisy_weight_mean") is not None:
            curve.noisy_weight = [blob["noisy_weight_mean"]]
        return curve

    def to_json(self) -> dict:
        return {"steps": self.steps, "metrics": self.metrics, "median_step_s": float(np.median(self.step_seconds)),
                "entropy_fraction_mean": float(np.mean(self.entropy_fraction)) if self.entropy_fraction else None,
                "noisy_weight_mean": float(np.mean(self.noisy_weight)) if self.noisy_weight else None,
                "noisy_weight_by_eval": _by_eval(self.noisy_weight, self.steps)}


def _by_eval(values: list[float], steps: list[int]) -> list[float]:
    """Means of a per-step series over the steps between evaluations."""
    if not values:
        return []
    bounds = [0, *steps]
    return [float(np.mean(values[a:b])) for a, b in zip(bounds, bounds[1:]) if b > a]


def steps_to_reach(curve: Curve, name: str, target: float, higher_is_better: bool) -> int | None:
    """The first evaluated step at which ``name`` is at least as good as ``target`` (None: never)."""
    for step, value in zip(curve.steps, curve.metrics[name]):
        if (value >= target) if higher_is_better else (value <= target):
            return step
    return None


def mean_spread(values: list[float]) -> tuple[float, float, float, float]:
    """(mean, sample std, min, max)."""
    array = np.asarray(values, dtype=float)
    std = float(array.std(ddof=1)) if len(array) > 1 else 0.0
    return float(array.mean()), std, float(array.min()), float(array.max())


def pm(values: list[float], digits: int = 3) -> str:
    mean, std, low, high = mean_spread(values)
    return f"{mean:.{digits}f} ± {std:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def ab_overhead(step_a, step_b, pairs: int, warmup: int = 3) -> dict:
    """Per-step wall time of B relative to A, the two alternating in one process (A B A B ...), so a
    neighbour's load hits both alike. ``step_a``/``step_b`` take one training step each. Returns the
    median times and the median of the per-pair ratios."""
    for _ in range(warmup):
        step_a()
        step_b()
    times_a, times_b = [], []
    for _ in range(pairs):
        started = time.perf_counter()
        step_a()
        middle = time.perf_counter()
        step_b()
        times_a.append(middle - started)
        times_b.append(time.perf_counter() - middle)
    ratios = np.asarray(times_b) / np.asarray(times_a)
    return {"pairs": pairs, "median_a_s": float(np.median(times_a)), "median_b_s": float(np.median(times_b)),
            "ratio_median": float(np.median(ratios)),
            "ratio_iqr": [float(np.percentile(ratios, 25)), float(np.percentile(ratios, 75))]}


def compare_to_plain(plain: list[Curve], other: list[Curve], name: str, higher_is_better: bool,
                     overhead: float) -> dict:
    """The paper's measure per seed (the re-weighted run's steps to reach the plain run's final value,
    as a fraction of the plain run's steps), the same at equal wall time (steps x overhead), the plain
    run's own first step at its final value (the measure's baseline), both runs' final values, and
    the re-weighted run's value at the plain run's wall time (at the step it reaches in that time)."""
    fractions, wall_fractions, equal_time, finals_plain, finals_other, plain_own = [], [], [], [], [], []
    for base, run in zip(plain, other):
        target = base.final(name)
        reached = steps_to_reach(run, name, target, higher_is_better)
        total = base.steps[-1]
        # the same measure for the plain run itself: when it first got to its own final value (on a
        # curve that peaks and declines, early, and then the measure says little)
        plain_own.append(steps_to_reach(base, name, target, higher_is_better) / total)
        fractions.append(reached / total if reached is not None else float("nan"))
        wall_fractions.append(reached * overhead / total if reached is not None else float("nan"))
        budget = total / overhead  # the steps the re-weighted run takes in the plain run's wall time
        within = [value for step, value in zip(run.steps, run.metrics[name]) if step <= budget]
        equal_time.append(within[-1] if within else float("nan"))
        finals_plain.append(target)
        finals_other.append(run.final(name))
    reached_count = int(np.sum(np.isfinite(fractions)))
    return {"steps_fraction": fractions, "wall_fraction": wall_fractions, "plain_own_fraction": plain_own,
            "reached": reached_count,
            "seeds": len(fractions), "final_plain": finals_plain, "final": finals_other,
            "at_plain_wall_time": equal_time}
