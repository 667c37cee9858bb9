"""``mimicfilter score``: options → ScoreConfig → run_score → a summary."""

from __future__ import annotations

import json

import click
from rich.console import Console
from rich.table import Table

from mimicfilter import timing
from mimicfilter.defaults import MIN_ANCHORS, TRAIN_MODES
from mimicfilter_cli.common import ProgressBar, heavy_imports, one_line_errors, print_warnings
from mimicfilter_cli.options import (
    execution_options,
    group,
    input_options,
    model_options,
    output_options,
    per_task_default,
    shards_argument,
    shards_from,
    start_hashing_checkpoints,
    stream_fields,
    task_from,
)


def _print_summary(stats: dict) -> None:
    console = Console(stderr=True)  # stdout carries --json only
    table = Table(title=f"mimicfilter score → {stats['run_dir']}", show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value", justify="right")
    resumed = f" ({stats['shards_resumed']} already done)" if stats["shards_resumed"] is not None else ""
    table.add_row("shards", f"{stats['shards']}{resumed}")
    if stats.get("world_size", 1) > 1:
        table.add_row("this rank", f"{stats['rank']} of {stats['world_size']}: {stats['shards_this_process']} shards")
        if stats.get("shards_missing"):
            table.add_row("still missing (other ranks)", f"{stats['shards_missing']} shards; the last rank writes _SUCCESS")
    if stats.get("executor", "local") != "local":
        table.add_row("executor", stats["executor"])
    if stats["train"] != "none":
        table.add_row("proxy trajectory", f"--train {stats['train']}, {stats['epochs']} epoch(s)")
    epochs = stats["epochs"] if stats["train"] != "none" else 1
    if epochs > 1:
        table.add_row("samples", str(stats["rows"] // epochs))
        table.add_row("rows in table (samples × epochs)", f"{stats['rows']} ({epochs} epochs)")
    else:
        table.add_row("samples (one row each)", str(stats["rows"]))
    for status, count in stats["status_counts"].items():
        if count:
            table.add_row(f"  {status} (rows)" if epochs > 1 else f"  {status}", str(count))
    usable = stats.get("anchor_usable_rows", {})
    for anchor, count in stats.get("anchor_rows", {}).items():
        unusable = count - usable.get(anchor, count)
        table.add_row(f"{anchor} anchors (rows, not in the pool)", f"{count}{f' ({unusable} not ok)' if unusable else ''}")
    if stats["mimic_score_mean"] is not None:
        table.add_row("mean mimic score", f"{stats['mimic_score_mean']:.4g}")
        table.add_row("score > 0 (pulls toward reference)", f"{stats['mimic_score_positive_fraction']:.1%}")
    table.add_row("scored now", f"{stats['samples_scored_now']} samples in {stats['wall_seconds']:.1f} s")
    if stats["samples_per_second"]:
        table.add_row("throughput", f"{stats['samples_per_second']:.1f} samples/s on {stats['device']}")
    console.print(table)


training_options = group(
    click.option("--train", type=click.Choice(TRAIN_MODES), default="head", show_default=True,
                 help="head: the mimic layers learn along the stream (Grad-Mimic); full: the whole proxy learns; "
                 "none: score a frozen proxy (static, one part per shard)."),
    click.option("--epochs", type=int, default=1, show_default=True, help="Passes over the stream (trajectory modes)."),
    click.option("--lr", type=float, default=None,
                 help=f"AdamW learning rate of the proxy [default: {per_task_default('lr')}]."),
    click.option("--weight-decay", type=float, default=1e-5, show_default=True, help="AdamW weight decay."),
    click.option("--shuffle-buffer", type=int, default=1000, show_default=True,
                 help="Samples in the seeded shuffle buffer of each epoch (0: stream order)."),
    click.option("--checkpoint-every", type=int, default=500, show_default=True,
                 help="Save proxy + optimizer every N steps (and at each epoch end) for resume."),
    click.option("--temperature", type=float, default=None,
                 help=f"Softmax temperature of the batch weights [default: {per_task_default('temperature')}]."),
)

scale_options = group(
    click.option("--ray", "ray_address", is_flag=False, flag_value="local", default=None, metavar="[ADDRESS]",
                 help="Score shards as Ray tasks (--train none): alone, start or join a local Ray instance; "
                 "'auto' or 'ray://HOST:10001' for a cluster."),
    click.option("--cpus-per-task", type=float, default=1.0, show_default=True, help="Ray: CPUs per scoring actor."),
    click.option("--gpus-per-task", type=float, default=0.0, show_default=True,
                 help="Ray: GPUs per scoring actor (e.g. 1, or 0.5 to share a GPU between two)."),
    click.option("--max-retries", type=int, default=3, show_default=True,
                 help="Ray: restarts of a killed actor and retries of its shard."),
    click.option("--ray-actors", type=int, default=None,
                 help="Ray: number of scoring actors [default: as many as the cluster's resources fit]."),
    click.option("--rank", type=int, default=None,
                 help="Score only this rank's share of the shards (every WORLD-SIZE-th, from RANK); with --world-size."),
    click.option("--world-size", type=int, default=None,
                 help="Number of ranks sharing the run directory (Slurm arrays, multi-node jobs without Ray)."),
)


anchor_options = group(
    click.option("--trusted", "trusted", multiple=True, metavar="SPEC",
                 help="Shards of samples you checked (100-500; same formats as SHARDS, repeatable): scored in the "
                 "pool's stream as anchors, with synthetic negatives made from the pool (labelled pools: also "
                 "confusable ones, the reference's runner-up class), so that `filter` calibrates the quality "
                 "estimate and the cut (docs/filter.md)."),
    click.option("--synthetic-share", type=float, default=None,
                 help="Share of pool samples whose pair makes a synthetic negative (a caption or label from "
                 "another sample) [default: as many as trusted samples, at least 200]."),
)


@click.command()
@shards_argument
@model_options
@input_options
@training_options
@anchor_options
@execution_options
@scale_options
@click.option("--save-embeddings", is_flag=True,
              help="Also store each sample's pair embedding (the reference's image and text, float16) for "
              "`mimicfilter extrapolate`.")
@click.option("--verbose", "-v", is_flag=True, help="Print where the start-up time went, phase by phase, on stderr.")
@output_options
@one_line_errors
def score(shards, **options):
    """Score every sample of SHARDS with the mimic score and write a run directory.

    SHARDS are tar files, directories, brace patterns ('pool/{000..099}.tar'), fsspec URLs
    (s3://, gs://, https://), @list.txt files, or - to read a list from stdin.

    \b
    Example:
      mimicfilter score 'pool/{00000..00009}.tar' --model ViT-B-32 --reference openai --out runs/pool
      mimicfilter score demo/shards --model demo/tiny-clip.json \\
          --reference demo/reference.safetensors --epochs 3 --out runs/demo --json | jq .status_counts
      mimicfilter score pool/ --model ViT-B-32 --reference openai --train none --workers 8 --out runs/static
      mimicfilter score labelled/ --model ViT-B-32 --reference openai --classnames classes.txt --out runs/cls
      mimicfilter score pool/ --trusted checked/ --model ViT-B-32 --reference openai --out runs/calibrated
      mimicfilter score 's3://pool/{00000..09999}.tar' --model ViT-B-32 --reference openai --train none \\
          --ray auto --gpus-per-task 1 --cpus-per-task 8 --out /shared/runs/pool
      mimicfilter score pool/ --model ViT-B-32 --reference openai --train none \\
          --rank $SLURM_ARRAY_TASK_ID --world-size $SLURM_ARRAY_TASK_COUNT --out /shared/runs/pool
    """
    with timing.recording():
        timing.add("python and the CLI", timing.seconds_since_process_start() or 0.0)
        stats = _run(shards, options)
    if options["verbose"]:
        _print_startup(stats)
    if options["as_json"]:
        click.echo(json.dumps(stats, indent=2, sort_keys=True))
    elif not options["quiet"]:
        _print_summary(stats)
    print_warnings(anchor_warnings(stats))


def anchor_warnings(stats: dict) -> list[str]:
    """A trusted sample too small to calibrate, said now rather than when `filter` finds it out."""
    from mimicfilter.store.schema import TRUSTED  # pyarrow: loaded by the run already, not by --help

    if TRUSTED not in stats.get("anchor_rows", {}) or stats.get("shards_missing"):
        return []  # (with ranks still scoring, their share of the trusted samples is not in the table yet)
    epochs = stats["epochs"] if stats["train"] != "none" else 1
    rows = stats["anchor_rows"][TRUSTED]
    usable = stats.get("anchor_usable_rows", {}).get(TRUSTED, rows)
    if usable // epochs >= MIN_ANCHORS:
        return []
    return [f"only {usable // epochs} of {rows // epochs} trusted samples could be scored: filter calibrates with at "
            f"least {MIN_ANCHORS} (the anchor rows' status and error columns say why)"]


def _print_startup(stats: dict) -> None:
    phases = stats.get("startup_seconds", {})
    click.echo("start-up, phase by phase:", err=True)
    for name, seconds in phases.items():
        click.echo(f"  {seconds:8.2f} s  {name}", err=True)
    if "scoring_seconds" in stats and "wall_seconds" in stats:
        click.echo(f"  {stats['scoring_seconds']:8.2f} s  scoring loop (read, decode, score, write)", err=True)


def _run(shards, options) -> dict:
    # torch and open_clip load here, not at import: `mimicfilter --help` and `filter` stay light.
    start_hashing_checkpoints(options)
    with timing.phase("import torch, open_clip and the pipeline"), heavy_imports():
        import mimicfilter.pipeline.run  # noqa: F401
    from mimicfilter.execute.partition import Partition
    from mimicfilter.execute.ray import RayConfig
    from mimicfilter.pipeline.config import ScoreConfig, TrainConfig
    from mimicfilter.pipeline.run import run_score

    partition = Partition.of(options["rank"], options["world_size"])  # checked before listing shards
    ray = None if options["ray_address"] is None else RayConfig(
        options["ray_address"], options["cpus_per_task"], options["gpus_per_task"], options["max_retries"],
        options["ray_actors"])
    with timing.phase("list the shards"):
        shard_list = shards_from(shards, options)
    with timing.phase("detect the task"):
        task = task_from(shard_list, options)
    trusted = shards_from(options["trusted"], options) if options["trusted"] else ()
    config = ScoreConfig(
        **stream_fields(shard_list, task, options),
        temperature=options["temperature"],
        train=TrainConfig(mode=options["train"], epochs=options["epochs"], lr=options["lr"],
                          weight_decay=options["weight_decay"], shuffle_buffer=options["shuffle_buffer"],
                          checkpoint_every=options["checkpoint_every"]),
        partition=partition,
        ray=ray,
        save_embeddings=options["save_embeddings"],
        trusted=trusted,
        synthetic_share=options["synthetic_share"],
    )
    return run_score(config, progress=ProgressBar(enabled=not options["quiet"]))
