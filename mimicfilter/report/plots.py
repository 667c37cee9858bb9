"""The report's plots (matplotlib, Agg backend, files only)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np

from mimicfilter.report.tally import ShardQuality
from mimicfilter.store.atomic import atomic_write_bytes

MAX_SHARDS_PLOTTED = 40


MAX_EPOCHS_PLOTTED = 8


SCATTER_LIMIT = 20_000  # above this many points the score-vs-CLIP plot becomes a 2-D histogram



def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display, no GUI toolkit
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 11, "axes.titlesize": 12, "figure.dpi": 110})
    return plt


def _save(figure, path: Path) -> Path:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", bbox_inches="tight")
    _pyplot().close(figure)
    atomic_write_bytes(path, buffer.getvalue())
    return path


def _plotted_epochs(epochs: np.ndarray) -> list[int]:
    distinct = sorted(set(epochs.tolist()))
    if len(distinct) <= MAX_EPOCHS_PLOTTED:
        return distinct
    picks = np.linspace(0, len(distinct) - 1, MAX_EPOCHS_PLOTTED).round().astype(int)
    return [distinct[i] for i in sorted(set(picks.tolist()))]


def plot_score_histograms(sample: dict[str, Any], rule: dict[str, Any], path: Path) -> Path | None:
    scores, epochs = sample["mimic_score"], sample["epoch"]
    if len(scores) == 0:
        return None
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(7.5, 4.2))
    bins = np.histogram_bin_edges(scores, bins=60)
    shown = _plotted_epochs(epochs)
    colours = plt.cm.viridis(np.linspace(0.05, 0.85, len(shown)))
    thresholds = rule.get("thresholds") or {}
    for colour, epoch in zip(colours, shown):
        values = scores[epochs == epoch]
        label = f"epoch {epoch}" if len(shown) > 1 else None
        axes.hist(values, bins=bins, histtype="step", linewidth=1.6, color=colour, label=label)
        threshold = thresholds.get(str(epoch))
        if threshold is not None and len(shown) <= 4:
            axes.axvline(threshold, color=colour, linestyle="--", linewidth=1)
    axes.set_xlabel("mimic score  ⟨−∇ℓ, direction to the reference⟩  (higher = more useful)")
    axes.set_ylabel("rows")
    title = "Mimic scores" + (" per epoch" if len(shown) > 1 else "")
    if len(shown) <= 4 and thresholds:
        title += " (dashed: vote threshold)"
    axes.set_title(title)
    if len(shown) > 1:
        axes.legend(frameon=False, fontsize=9)
    axes.grid(alpha=0.25)
    return _save(figure, path)


def plot_weight_histogram(sample: dict[str, Any], path: Path) -> Path | None:
    weights = sample["mimic_weight"]
    weights = weights[np.isfinite(weights) & (weights > 0)]
    if len(weights) == 0:
        return None
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(7.5, 4.2))
    low, high = weights.min(), weights.max()
    if high / low < 1.0001:
        low, high = low / 1.5, high * 1.5
    axes.hist(weights, bins=np.geomspace(low, high, 60), color="#4c72b0", alpha=0.85)
    axes.set_xscale("log")
    axes.axvline(1.0, color="black", linestyle="--", linewidth=1)
    axes.text(1.0, 0.97, "r = 1 (uniform 1/B) ", transform=axes.get_xaxis_transform(), va="top", ha="right", fontsize=9)
    axes.set_xlabel("relative weight r = B · softmax(score / τ)  (log scale)")
    axes.set_ylabel("rows")
    axes.set_title("Relative weights (all epochs)")
    axes.grid(alpha=0.25)
    return _save(figure, path)


def plot_score_vs_clip(per_sample: dict[str, Any], path: Path) -> Path | None:
    clip = per_sample["clip_score"]
    if clip is None or len(clip) == 0:
        return None
    scores, kept = per_sample["mimic_score"], per_sample["kept"]
    finite = np.isfinite(clip) & np.isfinite(scores)
    clip, scores, kept = clip[finite], scores[finite], kept[finite]
    if len(clip) == 0:
        return None
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(6.5, 5.2))
    if len(clip) <= SCATTER_LIMIT:
        size = 10 if len(clip) < 3000 else 4
        axes.scatter(clip[kept], scores[kept], s=size, alpha=0.6, color="#2a9d55", label=f"kept ({kept.sum()})", lw=0)
        axes.scatter(clip[~kept], scores[~kept], s=size, alpha=0.6, color="#d1495b", label=f"dropped ({(~kept).sum()})", lw=0)
        axes.legend(frameon=False, fontsize=9, markerscale=2)
    else:
        from matplotlib.colors import LogNorm

        counts = axes.hist2d(clip, scores, bins=80, norm=LogNorm(), cmap="viridis")[3]
        figure.colorbar(counts, ax=axes, label="samples")
    axes.set_xlabel("reference CLIP score (cosine of image and text embeddings)")
    axes.set_ylabel("mimic score (mean over epochs)")
    axes.set_title("Mimic score versus the reference's CLIP score")
    axes.grid(alpha=0.25)
    return _save(figure, path)


def plot_shard_quality(shards: list[ShardQuality], overall: float | None, path: Path,
                       label: str = "quality estimate") -> Path | None:
    shown = [shard for shard in shards if shard.quality is not None][:MAX_SHARDS_PLOTTED]
    if not shown:
        return None
    plt = _pyplot()
    height = 1.2 + 0.28 * len(shown)
    figure, axes = plt.subplots(figsize=(7.5, height))
    names = [_short(Path(shard.shard).name, 34) for shard in shown]
    values = [100 * shard.quality for shard in shown]
    positions = np.arange(len(shown))[::-1]  # worst at the top
    axes.barh(positions, values, color="#4c72b0", height=0.7)
    for position, shard, value in zip(positions, shown, values):
        label = f"{value:.0f}% ({shard.kept:,}/{shard.ok:,})"
        if value >= 35:  # inside the bar, clear of the dashed overall line
            axes.text(1.5, position, label, va="center", fontsize=8, color="white")
        else:
            axes.text(value + 1, position, label, va="center", fontsize=8)
    axes.set_yticks(positions, names, fontsize=8)
    axes.set_xlim(0, 105)
    axes.set_xticks([0, 20, 40, 60, 80, 100])
    if overall is not None:
        axes.axvline(100 * overall, color="black", linestyle="--", linewidth=1)
        axes.text(100 * overall, 1.0, f" all shards {100 * overall:.1f}%", transform=axes.get_xaxis_transform(),
                  va="bottom", fontsize=9)
    axes.set_xlabel(f"{label}: kept / usable samples (%)")
    more = len([s for s in shards if s.quality is not None]) - len(shown)
    axes.set_title(f"Per-shard {label}, lowest first" + (f" (lowest {len(shown)}; {more} more in the table)" if more else ""),
                   pad=16)
    return _save(figure, path)


def _short(text: str, length: int) -> str:
    return text if len(text) <= length else "…" + text[-(length - 1) :]

