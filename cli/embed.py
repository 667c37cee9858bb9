"""``mimicfilter embed``: options → EmbedConfig → run_embed → a summary."""

from __future__ import annotations

import json
import os
import sys

import click

from mimicfilter_cli.common import THREADS_HELP, ProgressBar, one_line_errors, set_threads

DEFAULT_WORKERS = max(0, min(8, (os.cpu_count() or 2) // 2))


@click.command(name="embed")
@click.argument("shards", nargs=-1, required=True)
@click.option("--model", required=True, help="open_clip architecture name (ViT-B-32) or a JSON model config path.")
@click.option("--reference", required=True, help="Reference weights, as given to `score` (the default proxy derives from it).")
@click.option("--proxy", default=None, help="Proxy weights, as given to `score` (default: the reference with re-initialised mimic layers).")
@click.option("--mimic-layers", default=None, help="As given to `score` (decides which layers the default proxy re-initialises).")
@click.option("--seed", type=int, default=0, show_default=True, help="As given to `score` (the proxy's re-initialised layers).")
@click.option("--task", type=click.Choice(["auto", "contrastive", "classify"]), default="auto", show_default=True,
              help="auto: classify when samples carry .cls and no caption.")
@click.option("--classnames", type=click.Path(dir_okay=False), default=None, help="Classification, as given to `score`.")
@click.option("--reference-head", type=click.Path(dir_okay=False), default=None, help="Classification, as given to `score`.")
@click.option("--out", "out_dir", required=True, help="Run directory to write (re-run to resume).")
@click.option("--batch-size", type=int, default=256, show_default=True, help="Images per forward pass.")
@click.option("--workers", type=int, default=DEFAULT_WORKERS, show_default=True, help="DataLoader worker processes reading and decoding shards.")
@click.option("--threads", type=int, default=None, help=THREADS_HELP)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--image-key", default="jpg,jpeg,png,webp", show_default=True, help="Image file extensions, first present wins.")
@click.option("--text-key", default="txt", show_default=True, help="Caption extension, or json:FIELD (samples without one get a status row, as in `score`).")
@click.option("--trust-checkpoint", is_flag=True, help="Allow checkpoints that are full pickles (can run code).")
@click.option("--allow-pipe", is_flag=True, help="Allow pipe: shard URLs (they run shell commands).")
@click.option("--overwrite", is_flag=True, help="Replace an existing run directory made by a different command.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar and no summary.")
@click.option("--json", "as_json", is_flag=True, help="Print the run's stats as JSON on stdout.")
@one_line_errors
def embed(shards, model, reference, proxy, mimic_layers, seed, task, classnames, reference_head, out_dir, batch_size,
          workers, threads, device, image_key, text_key, trust_checkpoint, allow_pipe, overwrite, quiet, as_json):
    """Embed every sample of SHARDS with the proxy's image tower (forward only) for `extrapolate`.

    Pass the same model options as to the `score` run you will extrapolate from: the embeddings are
    the L2-normalised image-tower output of the proxy those options build, and `extrapolate`
    refuses embeddings of a different model. Bad samples get status rows, as in `score`.

    \b
    Example:
      mimicfilter score 'pool/{00000..00009}.tar' --model ViT-B-32 --reference openai \\
          --epochs 3 --save-embeddings --out runs/subset
      mimicfilter embed 'pool/{00010..00099}.tar' --model ViT-B-32 --reference openai --out runs/embed
      mimicfilter extrapolate --scored runs/subset --embeddings runs/embed --out runs/pool
    """
    from mimicfilter.decode import DecodeConfig
    from mimicfilter.embed import EmbedConfig, run_embed
    from mimicfilter.models import ModelSpec
    from mimicfilter.scoring import detect_task
    from mimicfilter.shards import expand_shards
    from mimicfilter.storage import run_path

    shard_list = tuple(expand_shards(shards, allow_pipe=allow_pipe, stdin=sys.stdin))
    text_key = text_key.strip()
    image_keys = tuple(key.strip().lower() for key in image_key.split(",") if key.strip())
    if task == "auto":
        task = "classify" if classnames or reference_head else detect_task(
            shard_list, DecodeConfig(image_keys=image_keys, text_key=text_key), allow_pipe)
    set_threads(threads)
    config = EmbedConfig(
        shards=shard_list,
        out_dir=run_path(out_dir),
        model=ModelSpec(model=model, reference=reference, proxy=proxy, mimic_layers=mimic_layers,
                        trust_checkpoint=trust_checkpoint, seed=seed, device=device, task=task,
                        classnames=classnames, reference_head=reference_head),
        decode=DecodeConfig(task=task, image_keys=image_keys, text_key=text_key),
        batch_size=batch_size,
        workers=workers,
        allow_pipe=allow_pipe,
        overwrite=overwrite,
        argv=tuple(sys.argv),
    )
    stats = run_embed(config, progress=ProgressBar(enabled=not quiet))
    if as_json:
        click.echo(json.dumps(stats, indent=2, sort_keys=True))
    elif not quiet:
        bad = {status: count for status, count in stats["status_counts"].items() if count and status != "ok"}
        click.echo(
            f"embedded {stats['status_counts']['ok']} of {stats['rows']} samples (dim {stats['embedding_dim']}) "
            f"in {stats['shards']} shards → {stats['run_dir']}"
            + (f"; not embedded: {', '.join(f'{s} {c}' for s, c in bad.items())}" if bad else ""),
            err=True,
        )
