"""Building blocks of the report page: the style sheet (responsive: two columns when wide, one at
500 px), numbers that carry their report.json key, figures, docs links, the contact sheets and the
pool distributions."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

e = html.escape
DOCS_DIR = Path(__file__).resolve().parents[2] / "docs"  # present in a source checkout or editable install

STYLE = """
*, *::before, *::after { box-sizing: border-box; }
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 0 auto; max-width: 1240px;
       padding: 1rem 1.25rem 3rem; color: #222; line-height: 1.45; }
h1 { font-size: 1.6rem; margin: .3em 0 .1em; }
h2 { font-size: 1.3rem; margin: 1.6em 0 .4em; padding-bottom: .2em; border-bottom: 1px solid #e4e4e4; }
h3 { font-size: 1.05rem; margin: .8em 0 .3em; }
a { color: #1f5fa8; } nav { margin: .3em 0; } nav a { white-space: nowrap; }
.muted { color: #666; font-size: .92em; } .warn { color: #a33; font-weight: 600; }
.big { font-size: 2.6rem; font-weight: 650; margin: .1em 0; }
.caveat { background: #fff8e6; border-left: 4px solid #e0b040; padding: .5em .8em; max-width: 62em; }
code { background: #f3f3f3; padding: 0 .25em; border-radius: 3px; font-size: .9em; overflow-wrap: anywhere; }
table { border-collapse: collapse; width: 100%; margin: .5em 0 1em; font-size: .92em; }
th, td { border-bottom: 1px solid #e2e2e2; padding: .3em .6em; text-align: left; vertical-align: top; }
th { background: #fafafa; font-weight: 600; }
.n { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
.grid { display: grid; grid-template-columns: repeat(auto-fit, minmax(min(100%, 480px), 1fr)); gap: 1.2rem 2rem;
        align-items: start; }
figure { margin: 0; } figure img { display: block; width: 100%; height: auto; }
figcaption { font-size: .88em; color: #555; }
.funnel { max-width: 60em; }
.funnel .step { display: grid; grid-template-columns: 10em minmax(0, 1fr) 6em; gap: 0 .8em; align-items: center;
                margin: .35em 0; }
.funnel .count { text-align: right; font-variant-numeric: tabular-nums; font-weight: 600; }
.funnel .note { grid-column: 2 / -1; }
.bar { position: relative; display: inline-block; width: 100%; height: 1em; background: #ececec; border-radius: 2px;
       vertical-align: middle; }
.fill { position: absolute; left: 0; top: 0; bottom: 0; border-radius: 2px; }
.fill.samples { background: #9aa8bd; } .fill.usable { background: #5b7fb8; } .fill.unique { background: #4a93a0; }
.fill.kept { background: #2a9d55; }
.mark { position: absolute; top: -3px; bottom: -3px; width: 2px; background: #222; }
td.share { white-space: nowrap; } td.share .bar { width: 7em; }
table.reasons td:first-child code { white-space: nowrap; overflow-wrap: normal; }
tr.unusable td { background: #fdf0f0; }
.sheet { display: grid; grid-template-columns: repeat(auto-fill, minmax(130px, 1fr)); gap: 1rem .8rem;
         margin-bottom: 1.5rem; }
.card { margin: 0; font-size: .82em; line-height: 1.3; min-width: 0; }
.card img, .card .noimg { width: 100%; aspect-ratio: 1 / 1; object-fit: contain; background: #f4f4f4;
                          border: 1px solid #e0e0e0; }
.card .noimg { display: flex; flex-direction: column; justify-content: center; padding: .5em; color: #700;
               overflow: hidden; overflow-wrap: anywhere; background: #e6e6e6; }
.card .meta { display: flex; justify-content: space-between; gap: .4em; font-weight: 600; margin-top: .3em; }
.verdict.kept { color: #1f7a42; } .verdict.dropped { color: #b8323f; }
.card .caption { display: -webkit-box; -webkit-line-clamp: 3; -webkit-box-orient: vertical; overflow: hidden;
                 overflow-wrap: anywhere; }
.card code { display: block; color: #444; background: none; padding: 0; font-size: 1em; }
@media (max-width: 640px) {
  body { padding: .6rem .7rem 2rem; } .big { font-size: 2.1rem; }
  .funnel .step { grid-template-columns: 6.5em minmax(0, 1fr) 4.2em; }
  th, td { padding: .25em .3em; } td.share { white-space: normal; } td.share .bar { width: 3em; }
  table.reasons td:first-child code { white-space: normal; }
  .shards code { font-size: .8em; }
}
"""

SHEET_TITLES = {
    "lowest": ("Lowest mimic scores", "Where mismatched captions, boilerplate text and blank images collect."),
    "borderline": ("Borderline: nearest the cut", "Where the rule is least sure; check that the cut falls where "
                                                   "you would put it."),
    "highest": ("Highest mimic scores", "What the reference's direction vouches for most."),
    "random_kept": ("A random sample of the kept", "What the curated set looks like."),
    "random_dropped": ("A random sample of the dropped", "What the rule takes away (usable samples only)."),
}


def _data_key(key: str | None) -> str:
    return f" data-key='{e(key)}'" if key else ""


def number(value: int, key: str | None = None) -> str:
    return f"<span{_data_key(key)}>{value:,}</span>"


def percent(value: float | None, key: str | None = None) -> str:
    text = "–" if value is None else f"{100 * value:.1f}%"
    return f"<span{_data_key(key)}>{text}</span>" if key else text


def docs_link(page: str) -> str:
    """A link to a docs page of the mimicfilter checkout this report was made with, else its name."""
    path = DOCS_DIR / page
    if path.is_file():
        return f"<a href='{e(path.as_uri())}'>docs/{e(page)}</a>"
    return f"<code>docs/{e(page)}</code> in the mimicfilter sources"


def figure(images: dict[str, str], name: str, alt: str, caption: str) -> str:
    if name not in images:
        return ""
    return f"<figure><img src='{e(images[name])}' alt='{e(alt)}'><figcaption>{caption}</figcaption></figure>"


def sample_note(plot_rows: dict[str, int]) -> str:
    used, total = plot_rows["samples_used"], plot_rows["samples_total"]
    if used < total:
        return (f"<p class='muted'>The plots, the cut and the budgets stand on a deterministic hash sample: "
                f"{used:,} of {total:,} usable samples ({plot_rows['score_rows_used']:,} of "
                f"{plot_rows['score_rows_total']:,} score rows). Counts, drop reasons and shards use every row.</p>")
    return (f"<p class='muted'>Drawn from all {total:,} usable samples ({plot_rows['score_rows_total']:,} score "
            "rows).</p>")


def sample_card(card: dict[str, Any], rank: int | None) -> str:
    """One sample on a contact sheet (a card of report/sheets.py as a dict); ``rank``: its place on a ranked sheet."""
    verdict = "kept" if card["kept"] else "dropped"
    if card["thumbnail"]:
        picture = f"<img src='{e(card['thumbnail'])}' alt='{e(card['caption'] or card['key'])}'>"
    else:
        picture = f"<div class='noimg'><strong>unreadable image</strong><small>{e((card['error'] or '')[:160])}</small></div>"
    if card["caption"] is not None:
        described = f"<div class='caption' title='{e(card['caption'])}'>{e(card['caption'])}</div>"
    elif card["label"] is not None:
        described = f"<div class='caption'>label {card['label']}</div>"
    else:
        described = "<div class='caption muted'>(no caption)</div>"
    where = f"{Path(card['shard']).name}/{card['key']}"
    title = verdict if card["kept"] else f"dropped: {card['reason']}"
    return (f"<figure class='card {verdict}'>{picture}<figcaption><div class='meta'>"
            f"<span>{f'#{rank} · ' if rank else ''}{card['mimic_score']:+.3f}</span>"
            f"<span class='verdict {verdict}' title='{e(title)}'>{verdict}</span></div>{described}"
            f"<code title='{e(card['shard'])}'>{e(where)}</code></figcaption></figure>")


def contact_sheet_section(summary: dict[str, Any]) -> str:
    sheets = summary["sheets"]
    parts = ["<section id='sheets'><h2>Samples</h2>"]
    if not sheets:
        return parts[0] + "<p class='muted'>No contact sheets (<code>--sheet-size 0</code>).</p></section>"
    parts.append("<p class='muted'>Read back from the shards. Score: mean mimic score; hover a caption for all "
                 "of it; <code>shard/key</code> finds the sample again (hover it for the shard's full path). "
                 "Grey tiles are images that could not be read, with the reason.</p>")
    for name, cards in sheets.items():
        title, hint = SHEET_TITLES[name]
        ranked = name in ("lowest", "highest")
        parts.append(f"<h3 id='sheet-{name}'>{title} <span class='muted'>({len(cards)})</span></h3>"
                     f"<p class='muted'>{hint}</p><div class='sheet'>")
        parts.extend(sample_card(each, position + 1 if ranked else None) for position, each in enumerate(cards))
        parts.append("</div>")
    parts.append("</section>")
    return "".join(parts)


POOL_ROWS = (("caption_chars", "caption length (characters)"), ("shorter_side", "shorter image side (px)"),
             ("image_width", "image width (px)"), ("image_height", "image height (px)"))


def _quantiles(entry: dict[str, Any] | None) -> str:
    if entry is None:
        return "<td class='n'>–</td>"
    return (f"<td class='n'>{entry['median']:,.0f}<br><span class='muted'>{entry['p5']:,.0f}–{entry['p95']:,.0f}</span>"
            "</td>")


def pool_section(summary: dict[str, Any]) -> str:
    pool = summary["pool"]
    parts = ["<section id='pool'><h2>The pool: caption lengths and image sizes</h2>"]
    if not pool["columns"]:
        return parts[0] + ("<p>This run's score table has no <code>caption_chars</code>, <code>image_width</code> or "
                           "<code>image_height</code> column, so there are no caption-length and image-size "
                           "distributions here. Runs scored by a mimicfilter that records them get them.</p></section>")
    images = summary["images"]
    parts.append("<div class='grid'>")
    parts.append(figure(images, "caption_lengths", "histogram of caption lengths, kept and not kept",
                        "Very short or very long captions are often boilerplate or keyword lists."))
    parts.append(figure(images, "image_sizes", "histogram of the shorter image side, kept and not kept",
                        "Tiny images (icons, trackers, thumbnails) carry little signal."))
    parts.append("</div><table class='pool'><thead><tr><th>column</th><th class='n'>all</th>"
                 "<th class='n'>kept</th><th class='n'>not kept</th><th class='n'>unknown</th></tr></thead><tbody>")
    for name, label in POOL_ROWS:
        entry = pool.get(name)
        if entry is None:
            continue
        parts.append(f"<tr><td>{label}</td>{_quantiles(entry['all'])}{_quantiles(entry['kept'])}"
                     f"{_quantiles(entry['not_kept'])}<td class='n'>{entry['unknown']:,}</td></tr>")
    parts.append("</tbody></table>")
    parts.append(f"<p class='muted'>Median, and below it the 5th–95th percentile range. From {pool['samples_used']:,} "
                 f"of {pool['samples_total']:,} samples (all statuses; unknown: no value, e.g. an image that could not "
                 "be decoded).</p></section>")
    return "".join(parts)
