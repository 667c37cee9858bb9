"""``mimicfilter score``: options → ScoreConfig → run_score → a summary."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from mimicfilter.decode import DecodeConfig
from mimicfilter.models import DEFAULT_MIMIC_LAYERS, MIMIC_LAYER_PRESETS, ModelSpec
from mimicfilter.scoring import TRAIN_MODES, ScoreConfig, run_score
from mimicfilter.shards import expand_shards
from mimicfilter_cli.common import ProgressBar, one_line_errors

DEFAULT_WORKERS = max(0, min(8, (os.cpu_count() or 2) // 2))


def _print_summary(stats: dict) -> None:
    console = Console()
    table = Table(title=f"mimicfilter score → {stats['run_dir']}", show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value", justify="right")
    table.add_row("shards", f"{stats['shards']} ({stats['shards_resumed']} already done)")
    table.add_row("rows in table", str(stats["rows"]))
    for status, count in stats["status_counts"].items():
        if count:
            table.add_row(f"  {status}", str(count))
    if stats["mimic_score_mean"] is not None:
        table.add_row("mean mimic score", f"{stats['mimic_score_mean']:.4g}")
        table.add_row("score > 0 (pulls toward reference)", f"{stats['mimic_score_positive_fraction']:.1%}")
    table.add_row("scored now", f"{stats['samples_scored_now']} samples in {stats['wall_seconds']:.1f} s")
    if stats["samples_per_second"]:
        table.add_row("throughput", f"{stats['samples_per_second']:.1f} samples/s on {stats['device']}")
    console.print(table)


@click.command()
@click.argument("shards", nargs=-1, required=True)
@click.option("--model", required=True, help="open_clip architecture name (ViT-B-32) or a JSON model config path.")
@click.option("--reference", required=True, help="Reference weights: an open_clip pretrained tag or a checkpoint file.")
@click.option("--proxy", default=None, help="Proxy weights (tag or checkpoint). Default: the reference with the mimic layers re-initialised from --seed.")
@click.option(
    "--mimic-layers",
    default=DEFAULT_MIMIC_LAYERS,
    show_default=True,
    help=f"Preset ({', '.join(MIMIC_LAYER_PRESETS)}) or comma-separated globs over parameter names.",
)
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path), help="Run directory to write (re-run to resume).")
@click.option("--train", type=click.Choice(TRAIN_MODES), default="none", show_default=True, help="none: score a frozen proxy (static).")
@click.option("--batch-size", type=int, default=256, show_default=True, help="Samples per batch (per shard; see docs/method.md).")
@click.option("--workers", type=int, default=DEFAULT_WORKERS, show_default=True, help="DataLoader worker processes reading and decoding shards.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the proxy's re-initialised layers.")
@click.option("--temperature", type=float, default=None, help="Softmax temperature of the batch weights [default: 0.05 contrastive].")
@click.option("--image-key", default="jpg,jpeg,png,webp", show_default=True, help="Image file extensions, first present wins.")
@click.option("--text-key", default="txt", show_default=True, help="Caption extension, or json:FIELD.")
@click.option("--trust-checkpoint", is_flag=True, help="Allow checkpoints that are full pickles (can run code).")
@click.option("--allow-pipe", is_flag=True, help="Allow pipe: shard URLs (they run shell commands).")
@click.option("--overwrite", is_flag=True, help="Replace an existing run directory made by a different command.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar and no summary table.")
@click.option("--json", "as_json", is_flag=True, help="Print the run's stats as JSON on stdout.")
@one_line_errors
def score(shards, model, reference, proxy, mimic_layers, out_dir, train, batch_size, workers, device, seed,
          temperature, image_key, text_key, trust_checkpoint, allow_pipe, overwrite, quiet, as_json):
    """Score every sample of SHARDS with the mimic score and write a run directory.

    SHARDS are tar files, directories, brace patterns ('pool/{000..099}.tar'), fsspec URLs
    (s3://, gs://, https://), @list.txt files, or - to read a list from stdin.

    \b
    Example:
      mimicfilter score 'pool/{00000..00009}.tar' --model ViT-B-32 --reference openai --out runs/pool
      mimicfilter score demo/shards --model demo/tiny-clip.json \\
          --reference demo/reference.safetensors --out runs/demo --json | jq .status_counts
    """
    config = ScoreConfig(
        shards=tuple(expand_shards(shards, allow_pipe=allow_pipe, stdin=sys.stdin)),
        out_dir=out_dir,
        model=ModelSpec(
            model=model,
            reference=reference,
            proxy=proxy,
            mimic_layers=mimic_layers,
            trust_checkpoint=trust_checkpoint,
            seed=seed,
            device=device,
        ),
        decode=DecodeConfig(
            task="contrastive",
            image_keys=tuple(key.strip().lower() for key in image_key.split(",") if key.strip()),
            text_key=text_key,
        ),
        batch_size=batch_size,
        workers=workers,
        temperature=temperature,
        train=train,
        allow_pipe=allow_pipe,
        overwrite=overwrite,
        argv=tuple(sys.argv),
    )
    stats = run_score(config, progress=ProgressBar(enabled=not quiet))
    if as_json:
        click.echo(json.dumps(stats, indent=2, sort_keys=True))
    elif not quiet:
        _print_summary(stats)
