"""``mimicfilter score``: options → ScoreConfig → run_score → a summary."""

from __future__ import annotations

import json
import os
import sys

import click
from rich.console import Console
from rich.table import Table

from mimicfilter.choices import DEFAULT_LR, MIMIC_LAYER_PRESETS, TRAIN_MODES
from mimicfilter_cli.common import THREADS_HELP, ProgressBar, one_line_errors, set_threads

DEFAULT_WORKERS = max(0, min(8, (os.cpu_count() or 2) // 2))


def _print_summary(stats: dict) -> None:
    console = Console()
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
    default=None,
    help=f"Preset ({', '.join(MIMIC_LAYER_PRESETS)}) or comma-separated globs over parameter names "
    "[default: image-proj; head for classification].",
)
@click.option("--task", type=click.Choice(["auto", "contrastive", "classify"]), default="auto", show_default=True,
              help="auto: classify when samples carry .cls and no caption.")
@click.option("--classnames", type=click.Path(dir_okay=False), default=None,
              help="Classification: class names, one per line (line i = label i); builds a zero-shot reference head.")
@click.option("--reference-head", type=click.Path(dir_okay=False), default=None,
              help="Classification: a trained head checkpoint {weight: [C, D], bias?: [C], logit_scale?}.")
@click.option("--out", "out_dir", required=True,
              help="Run directory to write (re-run to resume): a path, or an fsspec URL (s3://…) for --train none.")
@click.option("--train", type=click.Choice(TRAIN_MODES), default="head", show_default=True,
              help="head: the mimic layers learn along the stream (Grad-Mimic); full: the whole proxy learns; "
              "none: score a frozen proxy (static, one part per shard).")
@click.option("--epochs", type=int, default=1, show_default=True, help="Passes over the stream (trajectory modes).")
@click.option("--lr", type=float, default=None,
              help="AdamW learning rate of the proxy [default: 1e-4 contrastive, 1e-3 classification].")
@click.option("--weight-decay", type=float, default=1e-5, show_default=True, help="AdamW weight decay.")
@click.option("--shuffle-buffer", type=int, default=1000, show_default=True,
              help="Samples in the seeded shuffle buffer of each epoch (0: stream order).")
@click.option("--checkpoint-every", type=int, default=500, show_default=True,
              help="Save proxy + optimizer every N steps (and at each epoch end) for resume.")
@click.option("--batch-size", type=int, default=256, show_default=True, help="Samples per batch (per shard; see docs/method.md).")
@click.option("--workers", type=int, default=DEFAULT_WORKERS, show_default=True, help="DataLoader worker processes reading and decoding shards.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--threads", type=int, default=None, help=THREADS_HELP)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the proxy's re-initialised layers.")
@click.option("--temperature", type=float, default=None,
              help="Softmax temperature of the batch weights [default: 0.05 contrastive, 1.0 classification].")
@click.option("--image-key", default="jpg,jpeg,png,webp", show_default=True, help="Image file extensions, first present wins.")
@click.option("--text-key", default="txt", show_default=True, help="Caption extension, or json:FIELD.")
@click.option("--trust-checkpoint", is_flag=True, help="Allow checkpoints that are full pickles (can run code).")
@click.option("--allow-pipe", is_flag=True, help="Allow pipe: shard URLs (they run shell commands).")
@click.option("--overwrite", is_flag=True, help="Replace an existing run directory made by a different command.")
@click.option("--ray", "ray_address", is_flag=False, flag_value="local", default=None, metavar="[ADDRESS]",
              help="Score shards as Ray tasks (--train none): alone, start or join a local Ray instance; "
              "'auto' or 'ray://HOST:10001' for a cluster.")
@click.option("--cpus-per-task", type=float, default=1.0, show_default=True, help="Ray: CPUs per scoring actor.")
@click.option("--gpus-per-task", type=float, default=0.0, show_default=True,
              help="Ray: GPUs per scoring actor (e.g. 1, or 0.5 to share a GPU between two).")
@click.option("--max-retries", type=int, default=3, show_default=True,
              help="Ray: restarts of a killed actor and retries of its shard.")
@click.option("--ray-actors", type=int, default=None,
              help="Ray: number of scoring actors [default: as many as the cluster's resources fit].")
@click.option("--rank", type=int, default=None,
              help="Score only this rank's share of the shards (every WORLD-SIZE-th, from RANK); with --world-size.")
@click.option("--world-size", type=int, default=None,
              help="Number of ranks sharing the run directory (Slurm arrays, multi-node jobs without Ray).")
@click.option("--save-embeddings", is_flag=True,
              help="Also store each sample's proxy image embedding (float16) for `mimicfilter extrapolate`.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar and no summary table.")
@click.option("--json", "as_json", is_flag=True, help="Print the run's stats as JSON on stdout.")
@one_line_errors
def score(shards, model, reference, proxy, mimic_layers, task, classnames, reference_head, out_dir, train, epochs, lr,
          weight_decay, shuffle_buffer, checkpoint_every, batch_size, workers, device, threads, seed, temperature, image_key,
          text_key, trust_checkpoint, allow_pipe, overwrite, ray_address, cpus_per_task, gpus_per_task, max_retries,
          ray_actors, rank, world_size, save_embeddings, quiet, as_json):
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
      mimicfilter score 's3://pool/{00000..09999}.tar' --model ViT-B-32 --reference openai --train none \
          --ray auto --gpus-per-task 1 --cpus-per-task 8 --out /shared/runs/pool
      mimicfilter score pool/ --model ViT-B-32 --reference openai --train none \
          --rank $SLURM_ARRAY_TASK_ID --world-size $SLURM_ARRAY_TASK_COUNT --out /shared/runs/pool
    """
    # torch and open_clip load here, not at import: `mimicfilter --help` and `filter` stay light.
    from mimicfilter.decode import DecodeConfig
    from mimicfilter.errors import MimicfilterError
    from mimicfilter.executors import Partition, RayConfig
    from mimicfilter.models import ModelSpec
    from mimicfilter.scoring import ScoreConfig, detect_task, run_score
    from mimicfilter.shards import expand_shards
    from mimicfilter.storage import run_path
    from mimicfilter.trajectory import TrainConfig

    if (rank is None) != (world_size is None):
        raise MimicfilterError("--rank and --world-size go together", hint="e.g. --rank 3 --world-size 16")
    partition = Partition(0, 1) if rank is None else Partition(rank, world_size)  # checked before listing shards
    ray = None if ray_address is None else RayConfig(ray_address, cpus_per_task, gpus_per_task, max_retries, ray_actors)
    set_threads(threads)
    shard_list = tuple(expand_shards(shards, allow_pipe=allow_pipe, stdin=sys.stdin))
    text_key = text_key.strip()
    image_keys = tuple(key.strip().lower() for key in image_key.split(",") if key.strip())
    decode = DecodeConfig(image_keys=image_keys, text_key=text_key)
    if task == "auto":
        task = "classify" if classnames or reference_head else detect_task(shard_list, decode, allow_pipe)
    config = ScoreConfig(
        shards=shard_list,
        out_dir=run_path(out_dir),
        model=ModelSpec(
            model=model,
            reference=reference,
            proxy=proxy,
            mimic_layers=mimic_layers,
            trust_checkpoint=trust_checkpoint,
            seed=seed,
            device=device,
            task=task,
            classnames=classnames,
            reference_head=reference_head,
        ),
        decode=DecodeConfig(task=task, image_keys=image_keys, text_key=text_key),
        batch_size=batch_size,
        workers=workers,
        temperature=temperature,
        train=TrainConfig(
            mode=train,
            epochs=epochs,
            lr=lr if lr is not None else DEFAULT_LR[task],
            weight_decay=weight_decay,
            shuffle_buffer=shuffle_buffer,
            checkpoint_every=checkpoint_every,
        ),
        allow_pipe=allow_pipe,
        overwrite=overwrite,
        argv=tuple(sys.argv),
        partition=partition,
        ray=ray,
        save_embeddings=save_embeddings,
    )
    stats = run_score(config, progress=ProgressBar(enabled=not quiet))
    if as_json:
        click.echo(json.dumps(stats, indent=2, sort_keys=True))
    elif not quiet:
        _print_summary(stats)
