"""The report's plots: matplotlib (Agg) to SVG, so they stay crisp at any zoom and width. Dense
scatters are rasterised inside the SVG (at 2x) to keep the files small. Every function returns the
path it wrote, or None when there is nothing to draw."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from mimicfilter.report.curves import Cut, KeepCurve
from mimicfilter.report.samples import Sampled
from mimicfilter.store.atomic import atomic_write_bytes

KEPT, DROPPED, CUT = "#2a9d55", "#d1495b", "#222222"
SCATTER_LIMIT = 20_000  # above this many points the score-vs-CLIP plot becomes a 2-D histogram
FIGURE_SIZE = (6.4, 3.9)  # inches: about 610 CSS px wide, shown at the column width
RASTER_DPI = 200


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display, no GUI toolkit
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 11, "axes.titlesize": 12, "legend.fontsize": 10, "svg.hashsalt": "mimicfilter",
                         "axes.spines.top": False, "axes.spines.right": False})
    return plt


def _save(figure, path: Path) -> Path:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="svg", bbox_inches="tight", dpi=RASTER_DPI, metadata={"Date": None})
    _pyplot().close(figure)
    atomic_write_bytes(path, buffer.getvalue())
    return path


def plot_score_split(sampled: Sampled, cut: Cut | None, path: Path) -> Path | None:
    """Histogram of the usable samples' mean mimic score, kept and dropped stacked, the cut dashed."""
    scores, kept = sampled.data["mimic_score"], sampled.data["kept"]
    finite = np.isfinite(scores)
    scores, kept = scores[finite], kept[finite]
    if len(scores) == 0:
        return None
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=FIGURE_SIZE)
    bins = np.histogram_bin_edges(scores, bins=60)
    axes.hist([scores[kept], scores[~kept]], bins=bins, stacked=True, color=[KEPT, DROPPED],
              label=[f"kept ({kept.sum():,})", f"dropped ({(~kept).sum():,})"])
    if cut is not None:
        axes.axvline(cut.mimic_score, color=CUT, linestyle="--", linewidth=1.2,
                     label=f"cut {cut.mimic_score:+.3g} (matches {100 * cut.agreement:.1f}%)")
    axes.set_xlabel("mimic score, mean over epochs (higher = more useful)")
    axes.set_ylabel("samples")
    axes.set_title("Usable samples by mimic score")
    axes.legend(frameon=False, loc="upper left")
    axes.grid(alpha=0.25)
    return _save(figure, path)


def plot_keep_curve(curve: KeepCurve | None, cut: Cut | None, rule_share: float | None, path: Path) -> Path | None:
    """Kept share (and the kept set's mean CLIP score) as the mimic-score threshold moves."""
    if curve is None:
        return None
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=FIGURE_SIZE)
    step = max(1, len(curve.threshold) // 2000)  # a smooth line needs no more points
    thresholds, shares = curve.threshold[::step], 100 * curve.kept_share[::step]
    axes.plot(thresholds, shares, color=KEPT, linewidth=2, label="kept share (left)")
    axes.set_xlabel("threshold: keep mean mimic score ≥ x")
    axes.set_ylabel("kept share of usable samples (%)", color=KEPT)
    axes.set_ylim(0, 102)
    axes.grid(alpha=0.25)
    lines = axes.get_lines()
    clip = curve.mean_clip[::step]
    if np.isfinite(clip).any():
        right = axes.twinx()
        right.spines["right"].set_visible(True)
        right.plot(thresholds, clip, color="#3a5ba0", linewidth=1.6, label="mean CLIP score of the kept (right)")
        right.set_ylabel("mean reference CLIP score of the kept", color="#3a5ba0")
        lines = lines + right.get_lines()
    if cut is not None:
        axes.axvline(cut.mimic_score, color=CUT, linestyle="--", linewidth=1.2)
        lines.append(axes.plot([], [], color=CUT, linestyle="--", linewidth=1.2, label="the rule's cut")[0])
    if rule_share is not None and cut is not None:
        axes.plot([cut.mimic_score], [100 * rule_share], "o", color=CUT, markersize=5)
    axes.legend(lines, [line.get_label() for line in lines], frameon=False, loc="upper center",
                bbox_to_anchor=(0.5, -0.17), ncol=2)  # below the axes: the curves use the whole plot
    axes.set_title("Keep curve: what each threshold keeps")
    return _save(figure, path)


def plot_score_vs_clip(sampled: Sampled, path: Path) -> Path | None:
    clip, scores, kept = sampled.data["clip_score"], sampled.data["mimic_score"], sampled.data["kept"]
    finite = np.isfinite(clip) & np.isfinite(scores)
    clip, scores, kept = clip[finite], scores[finite], kept[finite]
    if len(clip) == 0:
        return None
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=FIGURE_SIZE)
    if len(clip) <= SCATTER_LIMIT:
        size = 9 if len(clip) < 3000 else 3
        for selected, colour, name in ((kept, KEPT, "kept"), (~kept, DROPPED, "dropped")):
            axes.scatter(clip[selected], scores[selected], s=size, alpha=0.6, color=colour, lw=0, rasterized=True,
                         label=f"{name} ({selected.sum():,})")
        axes.legend(frameon=False, markerscale=2)
    else:
        from matplotlib.colors import LogNorm

        counts = axes.hist2d(clip, scores, bins=80, norm=LogNorm(), cmap="viridis", rasterized=True)[3]
        figure.colorbar(counts, ax=axes, label="samples")
    axes.set_xlabel("reference CLIP score (image · text cosine)")
    axes.set_ylabel("mimic score (mean over epochs)")
    axes.set_title("Mimic score versus the reference's CLIP score")
    axes.grid(alpha=0.25)
    return _save(figure, path)


def _split_histogram(values: np.ndarray, kept: np.ndarray, bins: np.ndarray, xlabel: str, title: str, path: Path,
                     log_x: bool = False) -> Path:
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=FIGURE_SIZE)
    axes.hist([values[kept], values[~kept]], bins=bins, stacked=True, color=[KEPT, DROPPED],
              label=[f"kept ({kept.sum():,})", f"not kept ({(~kept).sum():,})"])
    if log_x:
        axes.set_xscale("log", base=2)
        axes.xaxis.set_major_formatter(plt.FuncFormatter(lambda value, _: f"{value:g}"))
    axes.set_xlabel(xlabel)
    axes.set_ylabel("samples")
    axes.set_title(title)
    axes.legend(frameon=False)
    axes.grid(alpha=0.25)
    return _save(figure, path)


def plot_caption_lengths(pool: Sampled, path: Path) -> Path | None:
    values, kept = pool.data.get("caption_chars"), pool.data["kept"]
    if values is None or not np.isfinite(values).any():
        return None
    known = np.isfinite(values)
    values, kept = values[known], kept[known]
    top = max(1.0, float(np.percentile(values, 99.5)))
    clipped = np.minimum(values, top)  # the long tail piles into the last bin instead of squeezing the rest
    width = max(1, int(np.ceil(top / 50)))  # whole characters per bar, so no bar is empty by rounding
    bins = np.arange(0, top + width + 1, width) - 0.5
    longer = int((values > top).sum())
    note = f" (last bar: ≥ {top:,.0f}, {longer:,} samples)" if longer else ""
    return _split_histogram(clipped, kept, bins, f"caption length, characters{note}", "Caption lengths", path)


def plot_image_sizes(pool: Sampled, path: Path) -> Path | None:
    width, height, kept = pool.data.get("image_width"), pool.data.get("image_height"), pool.data["kept"]
    if width is None or height is None:
        return None
    known = np.isfinite(width) & np.isfinite(height) & (width > 0) & (height > 0)
    if not known.any():
        return None
    shorter = np.minimum(width[known], height[known])
    low, high = np.floor(np.log2(shorter.min())), np.ceil(np.log2(shorter.max()))
    bins = 2 ** np.linspace(low, max(high, low + 1), int(4 * max(high - low, 1)) + 1)
    return _split_histogram(shorter, kept[known], bins, "shorter image side, pixels (log scale)",
                            "Image sizes (original pixels)", path, log_x=True)


def plot_calibrated_cut(calibration: dict | None, path: Path) -> Path | None:
    """With anchors: the estimated precision and recall of the kept set at every threshold of the
    calibration's signal, against the share of the pool it keeps (curate/calibrate.py)."""
    points = (calibration or {}).get("curve") or []
    if len(points) < 2:
        return None
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=FIGURE_SIZE)
    kept = [100 * point["kept"] for point in points]
    axes.plot(kept, [100 * point["precision"] for point in points], color=KEPT, linewidth=2,
              label="estimated precision (clean share of the kept)")
    axes.plot(kept, [100 * point["recall"] for point in points], color="#3a5ba0", linewidth=1.6,
              label="estimated recall (share of the clean samples kept)")
    cut = calibration.get("cut") or {}
    if cut.get("kept") is not None:
        on = cut.get("signal") or calibration["signal"]
        axes.axvline(100 * cut["kept"], color=CUT, linestyle="--", linewidth=1.2,
                     label="the calibrated cut" + ("" if on == calibration["signal"] else f" (made on {on})"))
    axes.set_xlabel(f"kept share of usable samples (%), thresholds on {calibration['signal']}")
    axes.set_ylabel("%")
    axes.set_ylim(0, 102)
    axes.set_xlim(0, 102)
    axes.grid(alpha=0.25)
    axes.legend(frameon=False, loc="upper center", bbox_to_anchor=(0.5, -0.17), ncol=1)
    axes.set_title("Calibrated cut: precision and recall by threshold")
    return _save(figure, path)
