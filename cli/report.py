"""``mimicfilter report``: options → ReportConfig → build_report → a short terminal summary."""

from __future__ import annotations

import json
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from mimicfilter.curate.estimate import RELATIVE_LABEL, headline_rows
from mimicfilter.report.build import ReportConfig, build_report
from mimicfilter.report.html import worst_shards
from mimicfilter.store.paths import run_path
from mimicfilter_cli.common import one_line_errors, print_warnings
from mimicfilter_cli.options import a_directory_path, aggregation_from, strict_option, votes_options


def _percent(value: float | None) -> str:
    return "–" if value is None else f"{value:.1%}"


def _print_summary(summary: dict, out_dir: Path) -> None:
    console = Console(stderr=True)
    head = summary["headline"]
    console.print(
        f"[bold]{head['label'].capitalize()} {_percent(head['value'])}[/bold]: kept {summary['kept']:,} of "
        f"{summary['ok']:,} usable samples ({summary['samples']:,} in all) under [cyan]{summary['rule']}[/cyan]"
    )
    for name, value in headline_rows(head, summary["quality"])[1:]:  # the first row is the line above
        console.print(f"{name[0].upper() + name[1:]}: {value}", highlight=False)
    reasons = summary["drop_reasons"]
    if reasons:
        shown = ", ".join(f"{reason['reason']} {reason['count']:,}" for reason in reasons[:4])
        console.print(f"Dropped: {shown}" + (f" (+{len(reasons) - 4} more reasons)" if len(reasons) > 4 else ""))
    worst = worst_shards(summary)
    if len(summary["shards_worst_first"]) > 1 and worst:
        table = Table(title="Worst shards", show_edge=False)
        for name, justify in (("shard", "left"), ("usable", "right"), ("errors", "right"), ("kept", "right"),
                              ("relative score" if head["label"] == RELATIVE_LABEL else "kept share", "right")):
            table.add_column(name, justify=justify)
        for shard in worst:
            errors = sum(shard["errors"].values())
            table.add_row(shard["shard"], f"{shard['ok']:,}", f"{errors:,}", f"{shard['kept']:,}",
                          _percent(shard["quality"]) if shard["quality"] is not None else "no usable sample")
        console.print(table)
    click.echo(f"Report: {out_dir / 'index.html'}", err=True)  # unwrapped, so it can be copied


@click.command(name="report")
@click.argument("run_dir")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None, callback=a_directory_path,
              help="Directory for index.html, its plots and thumbnails, and report.json, replaced as a whole "
              "[default: RUN_DIR/report].")
@click.option("--filter-manifest", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Judge quality by this filter manifest's decisions instead of the default rule.")
@click.option("--sheet-size", type=int, default=24, show_default=True,
              help="Samples on each contact sheet (lowest, borderline, highest, random kept and dropped); 0 for none.")
@click.option("--sample-rows", type=int, default=200_000, show_default=True,
              help="Samples used for the plots, the cut and the budgets; more are hash-sampled down to about this.")
@click.option("--shard-root", "shard_roots", multiple=True, metavar="[OLD=]NEW",
              help="Contact sheets: read shards recorded under OLD from NEW (bare NEW: the shards' common folder moved).")
@votes_options
@strict_option
@click.option("--json", "as_json", is_flag=True, help="Print the report's numbers as JSON on stdout (and nothing else).")
@one_line_errors
def report(run_dir, out_dir, filter_manifest, sheet_size, sample_rows, shard_roots, strict, as_json, **options):
    """Write a static HTML report of a score run: what was kept and why not, a keep curve, contact sheets.

    The quality estimate is the kept share of usable samples under the default filter rule
    (per-epoch votes), with its range over the vote rules and warnings, as `filter` shows it. With
    --filter-manifest the page follows that filter's decisions; unless it kept by the votes alone,
    their share is a "kept fraction", not a quality. Open OUT/index.html from disk; OUT/report.json
    holds the numbers.

    \b
    Example:
      mimicfilter report runs/pool                # writes runs/pool/report/index.html
      mimicfilter report runs/pool --filter-manifest curated/manifest.parquet --out report/ --sheet-size 48
      mimicfilter report runs/pool --out report/ --json | jq .relative_score
    """
    config = ReportConfig(
        run_dir=run_path(run_dir),
        out_dir=out_dir,
        filter_manifest=filter_manifest,
        sheet_size=sheet_size,
        sample_rows=sample_rows,
        aggregation=aggregation_from(options),
        memory_limit=options["memory_limit"],
        strict=strict,
        shard_roots=tuple(shard_roots),
    )
    summary = build_report(config)
    print_warnings(summary.get("warnings", []))
    if reason := summary["per_sample_table"].get("not_reused"):
        click.echo(f"Note: the score parts were aggregated again, not read from {filter_manifest}: {reason}", err=True)
    if as_json:
        click.echo(json.dumps(summary, indent=2, sort_keys=True, default=str))
    else:
        _print_summary(summary, config.out_dir)
