"""The report page: one static HTML file (no JavaScript), referencing only files that exist."""

from __future__ import annotations

import html
from typing import Any, Iterable

MAX_SHARDS_LISTED = 100


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


def render_html(summary: dict[str, Any], info: dict[str, Any]) -> str:
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
                 f"Generated by <code>mimicfilter report</code> (report {e(summary.get('run_id', ''))}).</p></body></html>\n")
    return "\n".join(parts)


def worst_shards(summary: dict[str, Any], count: int = 5) -> Iterable[dict[str, Any]]:
    """The first ``count`` shards of the worst-first list that have usable samples."""
    return [shard for shard in summary["shards_worst_first"] if shard["quality"] is not None][:count]

