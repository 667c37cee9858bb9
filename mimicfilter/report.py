"""The ``report`` stage: a score run → quality estimate, plots, contact sheets, one static HTML page.

    score parts ──► aggregate (DuckDB, default rule) or a filter manifest ──► per-shard quality
                ──► sampled rows ──► histograms (matplotlib, Agg)
                ──► highest / lowest samples ──► read back from the shards ──► contact sheets (Pillow)
                ──► index.html + report.json (atomic writes; only files that exist are referenced)

The quality estimate is the filter's: the kept share of the usable (status ``ok``) samples under
the default rule (``keep-votes`` with the default aggregation) or under the decisions of a given
``filter`` manifest. Plots use a deterministic hash sample of the rows when the table is larger
than ``sample_rows``; the page states the sample size.
"""

from __future__ import annotations

import html
import io
import json
import math
import tempfile
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from mimicfilter.aggregate import AggregateConfig, aggregate, connect, load_scores, score_files, sql_string
from mimicfilter.errors import MimicfilterError
from mimicfilter.rundir import read_run_info
from mimicfilter.storage import is_remote
from mimicfilter.tables import atomic_write_bytes, atomic_write_json

MAX_SHARDS_PLOTTED = 40
MAX_SHARDS_LISTED = 100
MAX_EPOCHS_PLOTTED = 8
ERROR_EXAMPLES = 3
SCATTER_LIMIT = 20_000  # above this many points the score-vs-CLIP plot becomes a 2-D histogram

TILE = 160  # thumbnail edge, pixels
TILE_TEXT_LINES = 4
COLUMNS = 6


@dataclass(frozen=True)
class ReportConfig:
    run_dir: Path
    out_dir: Path
    filter_manifest: Path | None = None
    sheet_size: int = 24  # samples per contact sheet (highest and lowest)
    sample_rows: int = 200_000  # rows used for the plots; more are hash-sampled down to about this
    aggregation: AggregateConfig = field(default_factory=AggregateConfig)
    memory_limit: str | None = None

    def __post_init__(self):
        if self.sheet_size < 0 or self.sheet_size > 200:
            raise MimicfilterError(f"--sheet-size {self.sheet_size}: must be between 0 and 200")
        if self.sample_rows < 1000:
            raise MimicfilterError(f"--sample-rows {self.sample_rows}: must be at least 1000")
        if self.filter_manifest is not None and not Path(self.filter_manifest).is_file():
            raise MimicfilterError(
                f"--filter-manifest {self.filter_manifest} does not exist", hint="pass the manifest.parquet of `filter --out`"
            )
        if not is_remote(self.run_dir) and Path(self.out_dir).resolve() == Path(self.run_dir).resolve():
            raise MimicfilterError("--out must not be the run directory itself", hint="e.g. --out RUN/report")


@dataclass(frozen=True)
class ShardQuality:
    shard: str
    samples: int
    ok: int
    kept: int

    @property
    def quality(self) -> float | None:
        return self.kept / self.ok if self.ok else None


@dataclass(frozen=True)
class SheetEntry:
    shard: str
    key: str
    mimic_score: float
    label: int | None
    kept: bool


def build_report(config: ReportConfig) -> dict[str, Any]:
    """Write the report into ``config.out_dir``; returns its summary (also saved as report.json)."""
    info = read_run_info(config.run_dir)
    files = score_files([str(config.run_dir)])
    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="mimicfilter-report-") as spill:
        connection = connect(config.memory_limit, spill)
        load_scores(connection, files)
        rule = _decisions(connection, config)
        shards = _shard_quality(connection)
        statuses = _status_counts(connection)
        sample = _sample_rows(connection, config.sample_rows)
        per_sample = _sample_samples(connection, config.sample_rows)
        highest = _extreme_samples(connection, "DESC", config.sheet_size)
        lowest = _extreme_samples(connection, "ASC", config.sheet_size)
        connection.close()
    ok = sum(shard.ok for shard in shards)
    kept = sum(shard.kept for shard in shards)
    images = {}
    images["scores"] = _plot_score_histograms(sample, rule, out / "scores.png")
    images["weights"] = _plot_weight_histogram(sample, out / "weights.png")
    images["score_vs_clip"] = _plot_score_vs_clip(per_sample, out / "score_vs_clip.png")
    images["shards"] = _plot_shard_quality(shards, kept / ok if ok else None, out / "shards.png")
    if config.sheet_size:
        decode = _decode_config(info)
        images["highest"] = _contact_sheet(highest, decode, f"The {len(highest)} highest mimic scores (rank, score, caption or label, shard/key)", out / "highest.png")
        images["lowest"] = _contact_sheet(lowest, decode, f"The {len(lowest)} lowest mimic scores (rank, score, caption or label, shard/key)", out / "lowest.png")
    images = {name: path.name for name, path in images.items() if path is not None}
    summary = {
        "run_dir": str(config.run_dir),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "rule": rule["name"],
        "aggregation": rule.get("aggregation"),
        "samples": sum(shard.samples for shard in shards),
        "ok": ok,
        "kept": kept,
        "quality_estimate": kept / ok if ok else None,
        "shards_worst_first": [asdict(shard) | {"quality": shard.quality} for shard in shards],
        "status_counts": statuses,
        "plot_rows": {"score_rows_used": sample["rows_used"], "score_rows_total": sample["rows_total"],
                      "samples_used": per_sample["rows_used"], "samples_total": per_sample["rows_total"]},
        "task": info.get("fingerprint", {}).get("task"),
        "epochs": info.get("train", {}).get("epochs", 1),
        "images": images,
    }
    atomic_write_bytes(out / "index.html", _html(summary, info).encode())
    atomic_write_json(out / "report.json", summary)
    return summary


# ---------------------------------------------------------------- SQL: decisions and tallies


def _decisions(connection, config: ReportConfig) -> dict[str, Any]:
    """Table ``samples`` with a ``kept`` column; returns the rule that decided it."""
    aggregation = aggregate(connection, config.aggregation)
    if config.filter_manifest is None:
        connection.execute("ALTER TABLE samples ADD COLUMN kept BOOLEAN")
        connection.execute("UPDATE samples SET kept = (status = 'ok' AND vote_keep)")
        name = f"keep-votes ({aggregation['binarize']} per epoch, {aggregation['combine_votes']} over epochs)"
        return {"name": name, "aggregation": aggregation, "thresholds": aggregation["thresholds"]}
    manifest = str(config.filter_manifest)
    try:
        columns = {row[0] for row in connection.execute(f"DESCRIBE SELECT * FROM read_parquet({sql_string(manifest)})").fetchall()}
    except Exception as error:  # duckdb raises several types for unreadable files
        raise MimicfilterError(f"cannot read --filter-manifest {manifest}: {' '.join(str(error).split())[:200]}") from error
    if not {"shard", "key", "kept"} <= columns:
        raise MimicfilterError(f"--filter-manifest {manifest} is not a filter manifest (needs shard, key, kept)")
    connection.execute(
        f"CREATE OR REPLACE TABLE samples AS SELECT s.*, coalesce(m.kept, false) AND s.status = 'ok' AS kept, "
        f"m.kept IS NOT NULL AS in_manifest FROM samples s LEFT JOIN read_parquet({sql_string(manifest)}) m "
        f"USING (shard, key)"
    )
    matched = connection.execute("SELECT count(*) FILTER (WHERE in_manifest) FROM samples").fetchone()[0]
    if matched == 0:
        raise MimicfilterError(f"--filter-manifest {manifest} names none of this run's samples",
                               hint="pass the manifest of a filter over this run")
    summary_file = Path(manifest).with_name("summary.json")
    name = f"manifest {manifest}"
    if summary_file.is_file():
        filter_summary = json.loads(summary_file.read_text())
        rules, votes = filter_summary.get("rules", {}), filter_summary.get("aggregation", {})
        keep = [
            f"{rule} ({votes['binarize']} per epoch, {votes['combine_votes']} over epochs)"
            if rule == "keep-votes" and {"binarize", "combine_votes"} <= set(votes) else rule
            for rule in rules.get("keep", [])
        ]
        joined = f" {rules.get('combine', 'and').upper()} ".join(keep)
        drops = "".join(f" minus {drop}" for drop in rules.get("drop", []))
        name = f"{joined}{drops} (from {manifest})"
    return {"name": name, "aggregation": aggregation, "thresholds": aggregation["thresholds"]}


def _shard_quality(connection) -> list[ShardQuality]:
    """Per shard: samples, usable samples and kept samples; worst quality first (empty shards last)."""
    rows = connection.execute(
        "SELECT shard, count(*), count(*) FILTER (WHERE status = 'ok'), count(*) FILTER (WHERE kept) "
        "FROM samples GROUP BY shard"
    ).fetchall()
    shards = [ShardQuality(shard, samples, ok, kept) for shard, samples, ok, kept in rows]
    return sorted(shards, key=lambda s: (s.quality is None, s.quality if s.quality is not None else 0, s.shard))


def _status_counts(connection) -> dict[str, dict[str, Any]]:
    """Per status (of each sample's last epoch): the count and a few distinct example errors."""
    counts = dict(connection.execute("SELECT status, count(*) FROM samples GROUP BY status ORDER BY 2 DESC").fetchall())
    result = {}
    for status, count in counts.items():
        examples = connection.execute(
            "SELECT error, count(*) AS n, min(shard || ' / ' || key) FROM samples WHERE status = ? AND error IS NOT NULL "
            "GROUP BY error ORDER BY n DESC, error LIMIT ?",
            [status, ERROR_EXAMPLES],
        ).fetchall()
        result[status] = {
            "count": count,
            "examples": [{"error": error, "count": n, "first": where} for error, n, where in examples],
        }
    return result


def _hash_filter(total: int, wanted: int, key_sql: str) -> str:
    """A deterministic ~wanted/total sample by hash of the sample's identity (stable across epochs)."""
    if total <= wanted:
        return "true"
    fraction_ppm = max(1, int(1_000_000 * wanted / total))
    return f"(hash({key_sql}) % 1000000) < {fraction_ppm}"


@dataclass(frozen=True)
class _Sampled:
    data: dict[str, np.ndarray]
    total: int  # rows before sampling


def _hashed_sample(connection, table: str, condition: str, columns: str, wanted: int) -> _Sampled:
    """``columns`` of ``table`` rows meeting ``condition``, hash-sampled down to about ``wanted``."""
    total = connection.execute(f"SELECT count(*) FROM {table} WHERE {condition}").fetchone()[0]
    where = _hash_filter(total, wanted, "shard || chr(0) || key")
    data = connection.execute(f"SELECT {columns} FROM {table} WHERE {condition} AND {where}").fetchnumpy()
    return _Sampled(data, total)


def _sample_rows(connection, wanted: int) -> dict[str, Any]:
    """Per-epoch score rows (ok only) for the histograms, hash-sampled when there are many."""
    sampled = _hashed_sample(connection, "scores", "status = 'ok' AND mimic_score IS NOT NULL",
                             "epoch, mimic_score, mimic_weight", wanted)
    data = sampled.data
    return {"epoch": np.asarray(data["epoch"]), "mimic_score": np.asarray(data["mimic_score"], dtype=float),
            "mimic_weight": np.asarray(data["mimic_weight"], dtype=float), "rows_used": len(data["epoch"]),
            "rows_total": sampled.total}


def _sample_samples(connection, wanted: int) -> dict[str, Any]:
    """Per-sample means (ok only) with the keep decision, for the score-vs-CLIP plot."""
    sampled = _hashed_sample(connection, "samples", "status = 'ok'", "mimic_score, clip_score, kept", wanted)
    data, total = sampled.data, sampled.total
    clip = data["clip_score"]
    clip = None if clip is None or len(clip) == 0 or np.all(_is_null(clip)) else np.asarray(clip, dtype=float)
    return {"mimic_score": np.asarray(data["mimic_score"], dtype=float), "clip_score": clip,
            "kept": np.asarray(data["kept"], dtype=bool), "rows_used": len(data["kept"]), "rows_total": total}


def _is_null(values) -> np.ndarray:
    mask = getattr(values, "mask", None)
    if mask is not None:
        return np.asarray(np.broadcast_to(mask, values.shape))
    return np.array([value is None for value in values])


def _extreme_samples(connection, order: str, count: int) -> list[SheetEntry]:
    if not count:
        return []
    rows = connection.execute(
        f"SELECT shard, key, mimic_score, label, kept FROM samples WHERE status = 'ok' AND mimic_score IS NOT NULL "
        f"ORDER BY mimic_score {order}, shard, key LIMIT ?",
        [count],
    ).fetchall()
    return [SheetEntry(shard, key, float(score), label, bool(kept)) for shard, key, score, label, kept in rows]


# ---------------------------------------------------------------- plots


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


def _plot_score_histograms(sample: dict[str, Any], rule: dict[str, Any], path: Path) -> Path | None:
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


def _plot_weight_histogram(sample: dict[str, Any], path: Path) -> Path | None:
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


def _plot_score_vs_clip(per_sample: dict[str, Any], path: Path) -> Path | None:
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


def _plot_shard_quality(shards: list[ShardQuality], overall: float | None, path: Path) -> Path | None:
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
    axes.set_xlabel("quality estimate: kept / usable samples (%)")
    more = len([s for s in shards if s.quality is not None]) - len(shown)
    axes.set_title("Per-shard quality, worst first" + (f" (worst {len(shown)}; {more} more in the table)" if more else ""),
                   pad=16)
    return _save(figure, path)


# ---------------------------------------------------------------- contact sheets


def _decode_config(info: dict[str, Any]):
    from mimicfilter.decode import DecodeConfig

    stored = dict(info.get("fingerprint", {}).get("decode") or {})
    stored.pop("num_classes", None)  # display only: show every label as stored
    if "image_keys" in stored:
        stored["image_keys"] = tuple(stored["image_keys"])
    try:
        return DecodeConfig(**stored)
    except (TypeError, MimicfilterError):
        return DecodeConfig(task=stored.get("task", "contrastive"))


def _read_back(entries: list[SheetEntry], decode) -> dict[tuple[str, str], Any]:
    """(shard, key) → DisplaySample, or an error string when the shard cannot be read."""
    from mimicfilter.decode import DisplaySample, decode_for_display
    from mimicfilter.shards import iter_shard_samples

    wanted: dict[str, set[str]] = defaultdict(set)
    for entry in entries:
        wanted[entry.shard].add(entry.key)
    found: dict[tuple[str, str], Any] = {}
    for shard, keys in wanted.items():
        shard_error = "sample not found in its shard"
        try:
            for raw in iter_shard_samples(shard):
                if raw["status"] == "shard_error":
                    shard_error = f"shard unreadable here: {raw['error']}"
                if raw["key"] in keys:
                    found[(shard, raw["key"])] = decode_for_display(raw, decode)
                    if all((shard, key) in found for key in keys):
                        break
        except Exception as error:  # a moved or unreadable shard must not stop the report
            for key in keys:
                found.setdefault((shard, key), DisplaySample(None, None, None, f"shard unreadable: {error}"))
        for key in keys:
            found.setdefault((shard, key), DisplaySample(None, None, None, shard_error))
    return found


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _wrap(draw, text: str, font, width: int, lines: int) -> list[str]:
    """Greedy word wrap to ``width`` pixels in at most ``lines`` lines, ending with … when cut."""
    words, result, current = text.split(), [], ""
    for word in words:
        candidate = f"{current} {word}".strip()
        if draw.textlength(candidate, font=font) <= width:
            current = candidate
            continue
        if current:
            result.append(current)
        current = word
        while draw.textlength(current, font=font) > width:  # one very long word: hard-break it
            cut = len(current)
            while cut > 1 and draw.textlength(current[:cut], font=font) > width:
                cut -= 1
            result.append(current[:cut])
            current = current[cut:]
    if current:
        result.append(current)
    if len(result) > lines:
        result = result[:lines]
        last = result[-1]
        while last and draw.textlength(last + "…", font=font) > width:
            last = last[:-1]
        result[-1] = last + "…"
    return result


def _contact_sheet(entries: list[SheetEntry], decode, title: str, path: Path) -> Path | None:
    from PIL import Image, ImageDraw

    if not entries:
        return None
    samples = _read_back(entries, decode)
    font, small, heading = _font(13), _font(11), _font(18)
    line_height = 16
    pad = 10
    cell_w, cell_h = TILE + 2 * pad, TILE + pad + line_height * (TILE_TEXT_LINES + 1) + pad
    columns = min(COLUMNS, len(entries))
    rows = math.ceil(len(entries) / columns)
    header = 40
    sheet = Image.new("RGB", (columns * cell_w, header + rows * cell_h), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((pad, 10), title, fill="black", font=heading)
    for position, entry in enumerate(entries):
        x = (position % columns) * cell_w + pad
        y = header + (position // columns) * cell_h
        sample = samples[(entry.shard, entry.key)]
        if sample.image is not None:
            scale = TILE / max(sample.image.size)  # small images are enlarged too, so tiles look alike
            size = (max(1, round(sample.image.width * scale)), max(1, round(sample.image.height * scale)))
            thumb = sample.image.resize(size, Image.Resampling.LANCZOS)
            box = Image.new("RGB", (TILE, TILE), (245, 245, 245))
            box.paste(thumb, ((TILE - thumb.width) // 2, (TILE - thumb.height) // 2))
            sheet.paste(box, (x, y))
        else:
            draw.rectangle((x, y, x + TILE - 1, y + TILE - 1), fill=(200, 200, 200))
            message = ["unreadable image", *_wrap(draw, sample.error or "", small, TILE - 12, 5)]
            for number, line in enumerate(message):
                draw.text((x + 6, y + 8 + number * 15), line, fill=(90, 0, 0) if number == 0 else "black",
                          font=font if number == 0 else small)
        draw.rectangle((x - 1, y - 1, x + TILE, y + TILE), outline=(180, 180, 180))
        text_y = y + TILE + 4
        draw.text((x, text_y), f"{position + 1}.  {entry.mimic_score:+.3f}", fill="black", font=font)
        verdict, colour = ("kept", (42, 157, 85)) if entry.kept else ("dropped", (209, 73, 91))
        draw.text((x + TILE, text_y), verdict, fill=colour, font=font, anchor="ra")
        if sample.caption is not None:
            described = sample.caption
        elif sample.label is not None or entry.label is not None:
            described = f"label {sample.label if sample.label is not None else entry.label}"
        else:
            described = "(no caption)"
        for number, line in enumerate(_wrap(draw, described, small, TILE, TILE_TEXT_LINES - 1)):
            draw.text((x, text_y + line_height * (number + 1)), line, fill=(40, 40, 40), font=small)
        key_line = _wrap(draw, f"{Path(entry.shard).name}/{entry.key}", small, TILE, 1)[0]
        draw.text((x, text_y + line_height * TILE_TEXT_LINES), key_line, fill=(120, 120, 120), font=small)
    buffer = io.BytesIO()
    sheet.save(buffer, format="PNG", optimize=True)
    atomic_write_bytes(path, buffer.getvalue())
    return path


def _short(text: str, length: int) -> str:
    return text if len(text) <= length else "…" + text[-(length - 1) :]


# ---------------------------------------------------------------- HTML

_STYLE = """
body { font-family: system-ui, -apple-system, Segoe UI, sans-serif; margin: 2em auto; max-width: 1150px;
       color: #222; padding: 0 1em; line-height: 1.45; }
h1 { margin-bottom: 0.2em; } .muted { color: #666; font-size: 0.92em; }
.big { font-size: 2.4em; font-weight: 600; margin: 0.2em 0; }
table { border-collapse: collapse; margin: 0.6em 0 1.2em; font-size: 0.92em; }
td, th { border-bottom: 1px solid #ddd; padding: 0.25em 0.8em; text-align: left; }
td.n, th.n { text-align: right; font-variant-numeric: tabular-nums; }
img { max-width: 100%; border: 1px solid #eee; margin: 0.4em 0; }
.plots { display: flex; flex-wrap: wrap; gap: 1em; } .plots img { max-width: 540px; }
code { background: #f4f4f4; padding: 0 0.25em; }
"""


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"


def _html(summary: dict[str, Any], info: dict[str, Any]) -> str:
    e = html.escape
    images = summary["images"]
    plot = summary["plot_rows"]
    models = info.get("models", {})
    architecture = models.get("architecture", "?")
    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>mimicfilter report: {e(summary['run_dir'])}</title><style>{_STYLE}</style></head><body>",
        f"<h1>mimicfilter report</h1><p class='muted'>run <code>{e(summary['run_dir'])}</code> · "
        f"{e(str(architecture))} · task {e(str(summary['task']))} · train {e(str(info.get('train', {}).get('mode', '?')))}"
        f" · {summary['epochs']} epoch(s) · written {e(summary['created_at'])}</p>",
        "<h2>Dataset quality estimate</h2>",
        f"<p class='big'>{_pct(summary['quality_estimate'])}</p>",
        f"<p>{summary['kept']:,} of {summary['ok']:,} usable samples kept ({summary['samples']:,} samples in all) "
        f"under the rule <code>{e(summary['rule'])}</code>. The estimate is the kept share of the usable samples; "
        "see <em>Reading the report</em> (docs/report.md in mimicfilter) for what it does and does not measure.</p>",
    ]
    shards = summary["shards_worst_first"]
    parts.append(f"<h3>Per shard, worst first ({len(shards)} shards)</h3>")
    if "shards" in images:
        parts.append(f"<img src='{e(images['shards'])}' alt='per-shard quality estimate, worst first'>")
    parts.append("<table><tr><th>shard</th><th class='n'>samples</th><th class='n'>usable</th>"
                 "<th class='n'>kept</th><th class='n'>quality</th></tr>")
    for shard in shards[:MAX_SHARDS_LISTED]:
        parts.append(f"<tr><td><code>{e(shard['shard'])}</code></td><td class='n'>{shard['samples']:,}</td>"
                     f"<td class='n'>{shard['ok']:,}</td><td class='n'>{shard['kept']:,}</td>"
                     f"<td class='n'>{_pct(shard['quality'])}</td></tr>")
    parts.append("</table>")
    if len(shards) > MAX_SHARDS_LISTED:
        parts.append(f"<p class='muted'>{len(shards) - MAX_SHARDS_LISTED} more shards in <code>report.json</code>.</p>")
    parts.append("<h2>Scores</h2>")
    sampled = plot["score_rows_used"] < plot["score_rows_total"]
    parts.append(
        f"<p class='muted'>Plots drawn from {plot['score_rows_used']:,} of {plot['score_rows_total']:,} score rows"
        f" and {plot['samples_used']:,} of {plot['samples_total']:,} samples"
        + (" (a deterministic hash sample of the samples)." if sampled else " (all of them).") + "</p>"
    )
    parts.append("<div class='plots'>")
    for name, alt in (("scores", "histogram of mimic scores"), ("weights", "histogram of relative weights"),
                      ("score_vs_clip", "mimic score versus reference CLIP score")):
        if name in images:
            parts.append(f"<img src='{e(images[name])}' alt='{alt}'>")
    parts.append("</div>")
    if "highest" in images or "lowest" in images:
        parts.append("<h2>Contact sheets</h2><p>The samples the filter trusts most and least (mean mimic score), "
                     "read back from the shards. Grey tiles are images that could not be read.</p>")
        for name, alt in (("lowest", "lowest-scoring samples"), ("highest", "highest-scoring samples")):
            if name in images:
                parts.append(f"<h3>{'Lowest' if name == 'lowest' else 'Highest'} scores</h3>"
                             f"<img src='{e(images[name])}' alt='{alt}'>")
    parts.append("<h2>Statuses</h2><table><tr><th>status</th><th class='n'>samples</th><th>example errors</th></tr>")
    for status, entry in summary["status_counts"].items():
        examples = "<br>".join(
            f"{e(example['error'][:200])} <span class='muted'>(×{example['count']:,}; e.g. {e(example['first'])})</span>"
            for example in entry["examples"]
        )
        parts.append(f"<tr><td><code>{e(status)}</code></td><td class='n'>{entry['count']:,}</td><td>{examples}</td></tr>")
    parts.append("</table>")
    parts.append("<p class='muted'>Machine-readable numbers: <code>report.json</code>. "
                 "Generated by <code>mimicfilter report</code>.</p></body></html>\n")
    return "\n".join(parts)


def worst_shards(summary: dict[str, Any], count: int = 5) -> Iterable[dict[str, Any]]:
    """The first ``count`` shards of the worst-first list that have usable samples."""
    return [shard for shard in summary["shards_worst_first"] if shard["quality"] is not None][:count]
