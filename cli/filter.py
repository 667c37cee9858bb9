"""``mimicfilter filter``: options → FilterConfig → run_filter → a summary."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from mimicfilter.curate.dedup import DEFAULT_EPSILON, DedupOptions
from mimicfilter.curate.duplicates import DEDUPE_UID
from mimicfilter.curate.estimate import headline_rows
from mimicfilter.curate.filter import FilterConfig, JoinSpec, run_filter
from mimicfilter.curate.rules import parse_drop, parse_rule
from mimicfilter.errors import MimicfilterError
from mimicfilter_cli.common import one_line_errors, print_warnings
from mimicfilter_cli.options import a_directory_path, aggregation_from, strict_option, votes_options


def _print_summary(summary: dict, dry_run: bool) -> None:
    console = Console(stderr=True)
    title = "mimicfilter filter" + (" (dry run: nothing written)" if dry_run else "")
    table = Table(title=title, show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value", justify="right")
    table.add_row("rule", " AND ".join(summary["rules"]["keep"]) if summary["rules"]["combine"] == "and"
                  else " OR ".join(summary["rules"]["keep"]))
    for rule in summary["rules"]["drop"]:
        table.add_row("minus", rule)
    table.add_row("samples (one per shard position)", str(summary["samples"]))
    if summary.get("score_rows", summary["samples"]) != summary["samples"]:
        table.add_row("score rows read (samples × epochs)", str(summary["score_rows"]))
    table.add_row("kept", f"{summary['kept']} ({summary['kept_fraction'] or 0:.1%})")
    for name, value in headline_rows(summary["headline"], summary["quality"]):
        table.add_row(name, value)
    cut = summary.get("calibration", {}).get("cut") or {}
    if cut.get("rule"):
        precision = "–" if cut["precision"] is None else f"{cut['precision']:.1%}"
        table.add_row("calibrated cut (estimated)", f"keeps {cut['kept']:.1%}: precision {precision}, "
                      f"recall {cut['recall']:.1%}")
    for reason, count in summary["reasons"].items():
        table.add_row(f"  {reason}", str(count))
    if "dedup" in summary:
        groups = summary["dedup"]
        table.add_row("duplicate groups (--dedup)", f"{groups['groups']} groups of {groups['samples_in_groups']} samples: "
                      f"{groups['dropped']} dropped (ε {groups['epsilon']:g}, kept by {groups['keep']})")
    for name, path in summary.get("outputs", {}).items():
        table.add_row(name, path)
    if "keys_written" in summary:
        closed = " (stdout's reader stopped early)" if summary.get("keys_reader_closed") else ""
        table.add_row("key lines written", f"{summary['keys_written']}{closed}")
    console.print(table)


@click.command(name="filter")
@click.argument("inputs", nargs=-1, required=True)
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None, callback=a_directory_path,
              help="Directory for manifest.parquet and summary.json.")
@click.option("--min", "minimum", multiple=True, metavar="COL=X", help="Keep COL >= X.")
@click.option("--max", "maximum", multiple=True, metavar="COL=X", help="Keep COL <= X.")
@click.option("--top-frac", multiple=True, metavar="COL=F", help="Keep the top fraction F by COL (global).")
@click.option("--bottom-frac", multiple=True, metavar="COL=F", help="Keep the bottom fraction F by COL.")
@click.option("--top-k", multiple=True, metavar="COL=N", help="Keep the N highest by COL.")
@click.option("--keep-votes", is_flag=True, help="Keep what the per-epoch votes keep (the default rule of runs without anchors).")
@click.option("--where", "where", multiple=True, metavar="SQL", help="Keep rows where the SQL expression holds.")
@click.option("--target-precision", type=float, default=None, metavar="P",
              help="Runs with anchors (score --trusted): the calibrated cut with the most recall at estimated "
              "precision P.")
@click.option("--target-recall", type=float, default=None, metavar="R",
              help="Runs with anchors: the calibrated cut keeping an estimated share R of the clean samples "
              "[default rule with anchors: 0.95].")
@click.option("--drop", multiple=True, metavar="KIND:COL=V",
              help="Remove afterwards, e.g. bottom-frac:mimic_score=0.2 (also min/max/top-frac/top-k/where:SQL).")
@click.option("--combine", type=click.Choice(["and", "or"]), default="and", show_default=True,
              help="How keep rules combine.")
@votes_options
@click.option("--join", "joins", multiple=True, metavar="FILE", help="External Parquet score table to join.")
@click.option("--on", "join_on", type=click.Choice(["uid", "shard,key"]), default="uid", show_default=True,
              help="Join key for --join.")
@click.option("--keys", default=None, metavar="FILE|-",
              help="Write kept 'shard<TAB>key' lines (- for stdout; tab, newline and backslash escaped).")
@click.option("--datacomp-npy", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the kept uids as a DataComp subset file (sorted u8,u8).")
@click.option("--write-shards", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Copy kept samples byte-exactly into new shards here (plus a wids index).")
@click.option("--maxcount", type=int, default=10_000, show_default=True, help="Samples per curated shard.")
@click.option("--shard-root", "shard_roots", multiple=True, metavar="[OLD=]NEW",
              help="--write-shards: read shards recorded under OLD from NEW (bare NEW: the shards' common folder moved).")
@click.option("--dedupe-uid", type=click.Choice(DEDUPE_UID), default="off", show_default=True,
              help="Samples sharing a uid: off (report only), keep-first (one kept per uid), drop-all.")
@click.option("--dedup", "dedup", is_flag=True,
              help="Keep one sample per group of duplicates before any rule: exact ones (same image bytes and caption) "
              "and the near-duplicate pairs of `mimicfilter dedup` (RUN/dedup, or --dedup-from).")
@click.option("--dedup-from", "dedup_from", default=None, metavar="DIR",
              help="--dedup: the `mimicfilter dedup --out` directory to read [default: dedup/ in each input run].")
@click.option("--dedup-threshold", "dedup_threshold", type=float, default=DEFAULT_EPSILON, show_default=True,
              metavar="EPS", help="--dedup: near-duplicates are pairs whose images have cosine >= 1 - EPS (with dedup's "
              "--dedup-on pair, captions >= 1 - caption factor x EPS); at most dedup's --max-threshold.")
@click.option("--dedup-keep", "dedup_keep", default=None, metavar="COL[:lowest]",
              help="--dedup: the member kept of each group, the highest (or :lowest) by COL [default: the first keep "
              "rule's column (lowest for bottom-frac/max), else mimic_score].")
@strict_option
@click.option("--dry-run", is_flag=True, help="Print what would be kept; write no file (--keys - still prints keys).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON on stdout (not with --keys -).")
@one_line_errors
def filter_command(inputs, out_dir, minimum, maximum, top_frac, bottom_frac, top_k, keep_votes, where, target_precision,
                   target_recall, drop, combine, joins, join_on, keys, datacomp_npy, write_shards, maxcount, shard_roots,
                   dedupe_uid, strict, dry_run, as_json, **options):
    """Aggregate score tables and keep samples by rules; write a manifest and curated outputs.

    INPUTS are run directories of `mimicfilter score` or Parquet score files/globs. With no
    rule, samples are kept by their per-epoch votes (--keep-votes), or, when the run was scored with
    anchors (score --trusted), by the calibrated cut (--target-recall 0.95). Columns for rules:
    mimic_score (mean over epochs), mimic_score_last, mimic_weight, loss, clip_score, ref_loss,
    negclip_score, votes, epochs, label, caption_chars, image_width, image_height, plus any --join
    columns.

    \b
    Example:
      mimicfilter filter runs/pool --out curated/
      mimicfilter filter runs/pool --top-frac clip_score=0.3 --drop bottom-frac:mimic_score=0.2 \\
          --out curated/ --write-shards curated/shards --maxcount 10000
      mimicfilter filter runs/pool --join metadata.parquet --on uid --top-frac clip_l14_similarity_score=0.3 \\
          --keys - --out curated/ | cut -f2 > kept-keys.txt
      mimicfilter filter runs/pool --where 'mimic_score > 0 AND clip_score > 0.2' --dry-run
      mimicfilter filter runs/calibrated --target-precision 0.9 --out curated/
      mimicfilter dedup runs/pool && mimicfilter filter runs/pool --dedup --top-frac mimic_score=0.3 --out curated/
    """
    if as_json and keys == "-":
        raise MimicfilterError("--keys - and --json both want stdout", hint="write the keys to a file (--keys FILE)")
    keep = [parse_rule("min", value) for value in minimum]
    keep += [parse_rule("max", value) for value in maximum]
    keep += [parse_rule("top-frac", value) for value in top_frac]
    keep += [parse_rule("bottom-frac", value) for value in bottom_frac]
    keep += [parse_rule("top-k", value) for value in top_k]
    keep += [parse_rule("keep-votes")] if keep_votes else []
    keep += [parse_rule("where", value) for value in where]
    config = FilterConfig(
        inputs=tuple(inputs),
        out_dir=out_dir,
        keep=tuple(keep),
        drop=tuple(parse_drop(value) for value in drop),
        combine=combine,
        aggregation=aggregation_from(options),
        joins=tuple(JoinSpec(path, join_on) for path in joins),
        keys=keys,
        datacomp_npy=datacomp_npy,
        write_shards=write_shards,
        maxcount=maxcount,
        dry_run=dry_run,
        memory_limit=options["memory_limit"],
        argv=tuple(sys.argv),
        strict=strict,
        dedupe_uid=dedupe_uid,
        shard_roots=tuple(shard_roots),
        target_precision=target_precision,
        target_recall=target_recall,
        dedup=DedupOptions(options["dedup"], options["dedup_from"], options["dedup_threshold"], options["dedup_keep"]),
    )
    summary = run_filter(config, stdout=sys.stdout)
    if summary.get("keys_reader_closed"):
        # the reader of stdout is gone (`| head`): send what Python still buffers nowhere, so
        # exiting does not fail on it; every other output is complete
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError, AttributeError):  # a stdout without a file descriptor (tests)
            pass
    print_warnings(summary.get("warnings", []))
    if as_json:
        click.echo(json.dumps(summary, indent=2, sort_keys=True, default=str))
    else:
        _print_summary(summary, dry_run)
