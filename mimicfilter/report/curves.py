"""Numbers for choosing a threshold, from the hash-sampled per-sample scores (numpy only): the rule's
cut on the mean mimic score, the keep curve (kept share and the kept set's mean CLIP score versus the
threshold), a table of budgets with the ``filter`` option that keeps each, and pool distributions."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

BUDGETS = (0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1)
CURVE_POINTS = 101  # kept shares 0 %, 1 %, ..., 100 % in report.json


@dataclass(frozen=True)
class Cut:
    """The threshold on the mean mimic score that agrees best with the rule's keep decisions."""

    mimic_score: float
    agreement: float  # share of the sampled usable samples on which "score > cut" equals the decision


def equivalent_cut(scores: np.ndarray, kept: np.ndarray) -> Cut | None:
    """The cut t maximising agreement of (score > t) with ``kept``; None when the rule kept all or none.

    Exact for a single-epoch vote rule (the cut is the vote threshold); for majority votes over
    epochs or rules on other columns it says how far "a threshold on the mimic score" describes
    the rule. Ties in agreement go to the lowest cut (t lies midway between neighbouring scores).
    """
    finite = np.isfinite(scores)
    scores, kept = scores[finite], kept[finite]
    if len(scores) == 0 or kept.all() or not kept.any():
        return None
    order = np.argsort(scores, kind="stable")
    ordered, decided = scores[order], kept[order]
    # cutting after position i (0..n): the first i samples are dropped, the rest kept
    dropped_below = np.concatenate([[0], np.cumsum(~decided)])
    kept_above = np.concatenate([[0], np.cumsum(decided[::-1])])[::-1]
    agreement = dropped_below + kept_above
    distinct = np.concatenate([[True], ordered[1:] != ordered[:-1], [True]])  # never cut between equal scores
    agreement = np.where(distinct, agreement, -1)
    best = int(np.argmax(agreement))
    if best == 0:
        value = ordered[0] - 1e-6 * max(1.0, abs(ordered[0]))
    elif best == len(ordered):
        value = ordered[-1]
    else:
        value = (ordered[best - 1] + ordered[best]) / 2
    return Cut(float(value), float(agreement[best] / len(ordered)))


@dataclass(frozen=True)
class KeepCurve:
    """Keeping the samples with mean mimic score >= threshold[i] keeps kept_share[i] of them, and
    their mean CLIP score is mean_clip[i] (NaN where the run has no CLIP score)."""

    threshold: np.ndarray
    kept_share: np.ndarray
    mean_clip: np.ndarray


def keep_curve(scores: np.ndarray, clip: np.ndarray) -> KeepCurve | None:
    finite = np.isfinite(scores)
    scores, clip = scores[finite], clip[finite]
    if len(scores) == 0:
        return None
    order = np.argsort(-scores, kind="stable")
    ranked, ranked_clip = scores[order], clip[order]
    count = np.arange(1, len(ranked) + 1)
    has_clip = np.isfinite(ranked_clip)
    clip_sum = np.cumsum(np.where(has_clip, ranked_clip, 0.0))
    clip_count = np.cumsum(has_clip)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_clip = np.where(clip_count > 0, clip_sum / np.maximum(clip_count, 1), np.nan)
    return KeepCurve(ranked, count / len(ranked), mean_clip)


def curve_points(curve: KeepCurve | None) -> list[dict[str, float | None]]:
    """The curve at kept shares 0 %, 1 %, ..., 100 % (report.json)."""
    if curve is None:
        return []
    points = []
    for share in np.linspace(0, 1, CURVE_POINTS):
        index = max(0, int(np.ceil(share * len(curve.threshold))) - 1)
        clip = curve.mean_clip[index]
        points.append({"kept_share": round(float(share), 2), "threshold": float(curve.threshold[index]),
                       "mean_clip_score": None if not np.isfinite(clip) else float(clip)})
    return points


def budgets(curve: KeepCurve | None) -> list[dict[str, Any]]:
    """For each budget (a share of the usable samples to keep): the mean mimic score threshold it
    implies and the kept set's mean CLIP score; ``filter --top-frac mimic_score=F`` keeps exactly it."""
    if curve is None:
        return []
    rows = []
    for share in BUDGETS:
        index = max(0, int(np.floor(share * len(curve.threshold))) - 1)
        clip = curve.mean_clip[index]
        rows.append({"kept_share": share, "threshold": float(curve.threshold[index]),
                     "mean_clip_score": None if not np.isfinite(clip) else float(clip),
                     "filter_option": f"--top-frac mimic_score={share:g}"})
    return rows


def mean_clip_of(clip: np.ndarray, selected: np.ndarray) -> float | None:
    values = clip[selected & np.isfinite(clip)]
    return float(values.mean()) if len(values) else None


def distribution(values: np.ndarray, kept: np.ndarray) -> dict[str, Any] | None:
    """Quantiles of a pool column, overall and for the kept and the other samples (NaN = unknown)."""
    known = np.isfinite(values)
    if not known.any():
        return None

    def quantiles(selected: np.ndarray) -> dict[str, float] | None:
        chosen = values[selected & known]
        if not len(chosen):
            return None
        p5, p50, p95 = np.percentile(chosen, [5, 50, 95])
        return {"samples": int(len(chosen)), "p5": float(p5), "median": float(p50), "p95": float(p95)}

    return {"all": quantiles(np.ones_like(known)), "kept": quantiles(kept), "not_kept": quantiles(~kept),
            "unknown": int((~known).sum())}
