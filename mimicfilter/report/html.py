"""The report page: one static HTML file (no JavaScript) that reads at 500 px and on HiDPI screens,
built from the summary dict (report.json) alone and referencing only files that exist. Elements
carrying a number of report.json have ``data-key`` attributes (the browser test reads them)."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from mimicfilter.curate.estimate import QUALITY_LABEL, RELATIVE_LABEL, headline_rows
from mimicfilter.report.duplicates import duplicates_section
from mimicfilter.report.page_parts import (
    STYLE,
    contact_sheet_section,
    docs_link,
    figure,
    number,
    percent,
    pool_section,
    sample_note,
)

MAX_SHARDS_LISTED = 100
e = html.escape


def headline(summary: dict[str, Any]) -> str:
    """The headline: the number, what it is called, its range, its rule and its caveat. The one place
    on the page that names and qualifies the estimate; the wording comes from curate/estimate.py, as
    in ``filter`` and ``report``'s terminal summary."""
    head, quality = summary["headline"], summary["quality"]
    calibrated = quality.get("calibrated")
    rows = headline_rows(head, quality)
    if calibrated:  # the big number is the calibrated estimate; the kept share is a row beneath it
        title, key, value = "Dataset quality estimate", "quality_estimate", calibrated["value"]
        rows = [row for row in rows if not row[0].startswith(QUALITY_LABEL)]
        caveat = (f"<strong>Calibrated.</strong> Measured against {calibrated['trusted']} trusted samples and "
                  f"{calibrated['synthetic']} synthetic negatives scored in the same run, on {calibrated['signal']}; "
                  "the interval is where the clean share lies on 9 runs in 10 of the validation suite. It assumes the "
                  "trusted samples are like the pool's clean ones.")
    else:
        is_relative = head["label"] == RELATIVE_LABEL
        title, key, value = ("Relative score" if is_relative else "Kept fraction"), "headline.value", head["value"]
        rows = rows[1:]  # the first row is the big number
        caveat = (
            "<strong>Uncalibrated: read it relatively.</strong> It is the kept share of the usable samples under the "
            "votes, not a quality: compare it between shards of this run and between pools scored with the same "
            "reference and settings; a pool whose bad samples look good to the reference reads too high, one from a "
            "domain the reference never saw reads too low. Score with <code>--trusted</code> to measure the quality."
            if is_relative else
            "<strong>Not a quality.</strong> This rule fixes what is kept (a share, a count or a threshold), so the "
            "kept share says nothing about the data; the votes' relative score of the pool is given below it."
        )
    return (
        f"<section id='estimate' class='headline'><h2>{title}</h2>"
        f"<p class='big' data-key='{key}'>{percent(value)}</p>"
        + "".join(f"<p>{e(name[0].upper() + name[1:])}: {e(value)}</p>" for name, value in rows)
        + f"<p>{number(summary['kept'], 'kept')} of {number(summary['ok'], 'ok')} usable samples kept under "
        f"<code>{e(summary['rule'])}</code>.</p>"
        f"<p class='caveat'>{caveat} What it does and does not measure: {docs_link('report.md')}.</p>"
        + "".join(f"<p class='caveat'><strong>Warning:</strong> {e(warning)}</p>" for warning in summary.get("warnings", []))
        + "</section>"
    )


def _funnel(summary: dict[str, Any]) -> str:
    funnel = summary["funnel"]
    total = max(funnel["samples"], 1)
    rows = [("samples", "samples read", funnel["samples"], ""),
            ("usable", "usable (status ok)", funnel["usable"],
             f"{number(funnel['samples'] - funnel['usable'])} could not be scored"),
            *_unique_step(funnel),
            ("kept", "kept by the rule", funnel["kept"],
             f"{number(funnel['usable'] - funnel.get('duplicates', 0) - funnel['kept'])} usable samples dropped")]
    parts = ["<section id='funnel'><h2>From samples to the kept set</h2><div class='funnel'>"]
    for key, label, count, note in rows:
        width = 100 * count / total
        parts.append(f"<div class='step'><span class='label'>{label}</span>"
                     f"<span class='bar'><span class='fill {key}' style='width:{width:.2f}%'></span></span>"
                     f"<span class='count'>{number(count, 'funnel.' + key)}</span>"
                     f"<span class='note muted'>{note}</span></div>")
    parts.append("</div></section>")
    return "".join(parts)


def _unique_step(funnel: dict[str, Any]) -> list[tuple[str, str, int, str]]:
    """The funnel's step for a filter that removed duplicates first (filter --dedup)."""
    if "duplicates" not in funnel:
        return []
    return [("unique", "one per duplicate group", funnel["usable"] - funnel["duplicates"],
             f"{number(funnel['duplicates'], 'funnel.duplicates')} duplicates dropped")]


def _reason_examples(reason: dict[str, Any]) -> str:
    if reason["kind"] == "status":
        return "<br>".join(
            f"{e(example['error'][:200])} <span class='muted'>(×{example['count']:,}; first <code>{e(example['first'])}</code>)</span>"
            for example in reason["examples"]
        )
    return ", ".join(
        f"<code>{e(Path(example['shard']).name)}/{e(example['key'])}</code>"
        + (f" <span class='muted'>({example['mimic_score']:+.3g})</span>" if example["mimic_score"] is not None else "")
        for example in reason["examples"]
    )


def _drop_reasons(summary: dict[str, Any]) -> str:
    reasons = summary["drop_reasons"]
    parts = ["<section id='dropped'><h2>Why samples were dropped</h2>"]
    if not reasons:
        return parts[0] + "<p>Nothing was dropped: every sample is usable and kept.</p></section>"
    total = max(summary["samples"], 1)
    parts.append("<p class='muted'>Status reasons: the sample could not be scored (the decoder's error, with "
                 "where it first happened). Rule reasons: the sample was scored and the rule left it out "
                 "(a few of them as examples; more on the sheets below).</p>")
    parts.append("<table class='reasons'><thead><tr><th>reason</th><th class='n'>samples</th><th class='n'>share</th>"
                 "<th>examples</th></tr></thead><tbody>")
    for reason in reasons:
        shown = e(reason["reason"]).replace(":", ":<wbr>")  # narrow screens break after "status:", not mid-word
        parts.append(f"<tr><td><code>{shown}</code></td>"
                     f"<td class='n'>{number(reason['count'], 'reason:' + reason['reason'])}</td>"
                     f"<td class='n'>{100 * reason['count'] / total:.1f}%</td><td>{_reason_examples(reason)}</td></tr>")
    parts.append("</tbody></table></section>")
    return "".join(parts)


def _cut_text(summary: dict[str, Any]) -> str:
    cut = summary["cut"]
    if cut is None:
        return "<p>The rule kept all or none of the usable samples, so there is no cut to show.</p>"
    exact = cut["agreement"] >= 0.9995
    text = (f"<p>On the mean mimic score, the rule's decisions amount to a cut at <strong>{cut['mimic_score']:+.4g}</strong>"
            + (" (exactly)." if exact else
               f": <em>score above the cut</em> matches the rule on {100 * cut['agreement']:.1f}% of the usable samples"
               " (votes over several epochs, or a rule on other columns, are not one threshold).")
            + " The borderline sheet below shows the samples nearest it.</p>")
    clip = summary.get("mean_clip_score") or {}
    if clip.get("usable") is not None and clip.get("kept") is not None:
        text += (f"<p>Mean reference CLIP score: {clip['usable']:.3f} over the usable samples, "
                 f"{clip['kept']:.3f} over the kept ones.</p>")
    return text


def _budgets(summary: dict[str, Any]) -> str:
    rows = summary["budgets"]
    if not rows:
        return ""
    with_clip = any(row["mean_clip_score"] is not None for row in rows)
    run = summary["run_dir"]
    parts = ["<div><h3>Pick a budget</h3><p class='muted'>Keep the best share of the usable samples by mean mimic "
             f"score: <code>mimicfilter filter {e(run)} OPTION --out curated/</code> with the option of the row.</p>",
             "<table class='budgets'><thead><tr><th class='n'>keep</th><th class='n'>threshold</th>"
             + ("<th class='n'>mean CLIP</th>" if with_clip else "") + "<th>option</th></tr></thead><tbody>"]
    for row in rows:
        clip = "" if not with_clip else (
            f"<td class='n'>{row['mean_clip_score']:.3f}</td>" if row["mean_clip_score"] is not None else "<td class='n'>–</td>")
        parts.append(f"<tr><td class='n'>{100 * row['kept_share']:.0f}%</td><td class='n'>{row['threshold']:+.4g}</td>"
                     f"{clip}<td><code>{e(row['filter_option'])}</code></td></tr>")
    parts.append("</tbody></table></div>")
    return "".join(parts)


def _cut_signal_text(calibration: dict[str, Any]) -> str:
    """Which signal a recall cut is made on, and the pool share each signal's cut would keep."""
    cut = calibration.get("cut") or {}
    if not cut.get("kept_by_signal") or not cut.get("signal"):
        return ""
    kept = ", ".join(f"{name} {100 * share:.1f}%" for name, share in sorted(cut["kept_by_signal"].items(),
                                                                           key=lambda item: item[1]))
    return (f" The cut at recall {cut['target']['recall']:g} is made on {cut['signal']}; the pool share each "
            f"signal's cut keeps near that recall (what the choice compares): {kept}.")


def _threshold(summary: dict[str, Any]) -> str:
    images = summary["images"]
    parts = ["<section id='threshold'><h2>Scores and the threshold</h2>", _cut_text(summary), "<div class='grid'>"]
    parts.append(figure(images, "scores", "histogram of mean mimic scores, kept and dropped, with the cut",
                        "Kept (green) and dropped (red) usable samples; dashed: the rule's cut."))
    parts.append(figure(images, "keep_curve", "kept share and mean CLIP score of the kept set versus the threshold",
                        "Move the threshold right to keep less; the blue line says how clean (by the reference's CLIP "
                        "score) the kept set gets."))
    parts.append(_budgets(summary))
    if "calibrated_cut" in images:
        calibration = summary["calibration"]
        separations = ", ".join(f"{name} {value:.2f}" for name, value in calibration["separation"].items())
        parts.append(figure(images, "calibrated_cut", "estimated precision and recall of the kept set by threshold",
                            f"Measured against {calibration['trusted']} trusted samples and {calibration['synthetic']} "
                            f"synthetic negatives on {calibration['signal']}, the signal that separates them best "
                            f"(AUROC: {separations}).{_cut_signal_text(calibration)} Choose a cut with filter "
                            "--target-precision or --target-recall."))
    parts.append(figure(images, "score_vs_clip", "mimic score versus the reference CLIP score",
                        "Each usable sample by both scores (a 2-D histogram above 20,000 samples). Low on both "
                        "axes: pairs both scores reject."))
    parts.append("</div>")
    parts.append(sample_note(summary["plot_rows"]))
    parts.append("</section>")
    return "".join(parts)


def _errors_cell(errors: dict[str, int]) -> str:
    return "<br>".join(f"{e(status)} {count:,}" for status, count in errors.items()) or "<span class='muted'>–</span>"


def _shards(summary: dict[str, Any]) -> str:
    shards = summary["shards_worst_first"]
    unusable = sum(1 for shard in shards if shard["ok"] == 0)
    parts = [f"<section id='shards'><h2>Per shard ({len(shards):,} shards)</h2>",
             "<p class='muted'>Shards with no usable sample first, then the lowest kept share. A shard far below "
             "the rest usually has a cause (a scraper bug, another source, a broken caption field) that its samples show.</p>"]
    if unusable:
        parts.append(f"<p class='warn'>{unusable:,} shard(s) had no usable sample: see their errors.</p>")
    overall = summary["headline"]["value"]
    parts.append("<table class='shards'><thead><tr><th>shard</th><th class='n'>samples</th><th>errors</th>"
                 "<th class='n'>usable</th><th class='n'>kept</th><th class='share'>kept share</th></tr></thead><tbody>")
    for shard in shards[:MAX_SHARDS_LISTED]:
        name = shard["shard"]
        quality = shard["quality"]
        if quality is None:
            share = "<span class='warn'>no usable sample</span>"
        else:
            marker = f"<span class='mark' style='left:{100 * overall:.1f}%'></span>" if overall is not None else ""
            share = (f"<span class='bar'><span class='fill kept' style='width:{100 * quality:.1f}%'></span>{marker}</span>"
                     f" {percent(quality, 'shard-quality:' + name)}")
        parts.append(f"<tr{' class=unusable' if quality is None else ''}><td><code title='{e(name)}'>{e(name)}</code></td>"
                     f"<td class='n'>{shard['samples']:,}</td><td>{_errors_cell(shard.get('errors', {}))}</td>"
                     f"<td class='n'>{number(shard['ok'], 'shard-ok:' + name)}</td>"
                     f"<td class='n'>{number(shard['kept'], 'shard-kept:' + name)}</td><td class='share'>{share}</td></tr>")
    parts.append("</tbody></table>")
    if overall is not None:
        parts.append("<p class='muted'>The tick in each bar is the whole run's share.</p>")
    if len(shards) > MAX_SHARDS_LISTED:
        parts.append(f"<p class='muted'>{len(shards) - MAX_SHARDS_LISTED:,} more shards in <code>report.json</code>.</p>")
    parts.append("</section>")
    return "".join(parts)


def render_html(summary: dict[str, Any], info: dict[str, Any]) -> str:
    architecture = info.get("models", {}).get("architecture", "?")
    train = info.get("train", {}).get("mode", "?")
    navigation = " · ".join(f"<a href='#{anchor}'>{text}</a>" for anchor, text in (
        ("estimate", "estimate"), ("funnel", "funnel"), ("dropped", "drop reasons"), ("duplicates", "duplicates"),
        ("threshold", "threshold"),
        ("shards", "shards"), ("sheets", "samples"), ("pool", "pool")))
    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        "<meta name='viewport' content='width=device-width, initial-scale=1'>",
        f"<title>mimicfilter report: {e(summary['run_dir'])}</title><style>{STYLE}</style></head><body>",
        f"<header><h1>mimicfilter report</h1><p class='muted'>run <code>{e(summary['run_dir'])}</code> · "
        f"{e(str(architecture))} · task {e(str(summary['task']))} · train {e(str(train))} · {summary['epochs']} epoch(s)"
        f" · written {e(summary['created_at'])}</p><nav>{navigation}</nav></header>",
        headline(summary),
        _funnel(summary),
        _drop_reasons(summary),
        duplicates_section(summary),
        _threshold(summary),
        _shards(summary),
        contact_sheet_section(summary),
        pool_section(summary),
        f"<footer><p class='muted'>Every number on this page is in <a href='report.json'>report.json</a>. "
        f"Generated by <code>mimicfilter report</code>; how to read it: {docs_link('report.md')}, "
        f"the rules: {docs_link('filter.md')} (report {e(summary.get('run_id', ''))}).</p></footer></body></html>\n",
    ]
    return "\n".join(parts)


def worst_shards(summary: dict[str, Any], count: int = 5) -> list[dict[str, Any]]:
    """The first ``count`` shards of the worst-first list (shards without a usable sample first)."""
    return summary["shards_worst_first"][:count]
