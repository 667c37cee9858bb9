"""``mimicfilter embed``: options → EmbedConfig → run_embed → a summary on stderr."""

from __future__ import annotations

import json

import click

from mimicfilter_cli.common import ProgressBar, heavy_imports, one_line_errors
from mimicfilter_cli.options import (
    execution_options,
    input_options,
    model_options,
    output_options,
    shards_argument,
    shards_from,
    start_hashing_checkpoints,
    stream_fields,
    task_from,
)


@click.command(name="embed")
@shards_argument
@model_options
@input_options
@execution_options
@output_options
@one_line_errors
def embed(shards, **options):
    """Embed every sample of SHARDS (image and caption, or image and label) for `extrapolate`.

    Forward only, through the reference: each ok sample gets the reference's L2-normalised image
    embedding and its caption's text embedding (labelled images: the label's class embedding), so
    `extrapolate` can compare whole pairs and see a caption that does not fit its image. Pass the
    same model options as to the `score` run you will extrapolate from: `extrapolate` refuses
    embeddings of a different reference. Bad samples get status rows, as in `score`.

    \b
    Example:
      mimicfilter score 'pool/{00000..00009}.tar' --model ViT-B-32 --reference openai \\
          --epochs 3 --save-embeddings --out runs/subset
      mimicfilter embed 'pool/{00010..00099}.tar' --model ViT-B-32 --reference openai --out runs/embed
      mimicfilter extrapolate --scored runs/subset --embeddings runs/embed --out runs/pool
    """
    start_hashing_checkpoints(options)
    with heavy_imports():
        from mimicfilter.pipeline.config import EmbedConfig
        from mimicfilter.pipeline.embed import run_embed

    shard_list = shards_from(shards, options)
    task = task_from(shard_list, options)
    config = EmbedConfig(**stream_fields(shard_list, task, options))
    stats = run_embed(config, progress=ProgressBar(enabled=not options["quiet"]))
    if options["as_json"]:
        click.echo(json.dumps(stats, indent=2, sort_keys=True))
    elif not options["quiet"]:
        bad = {status: count for status, count in stats["status_counts"].items() if count and status != "ok"}
        click.echo(
            f"embedded {stats['status_counts']['ok']} of {stats['rows']} samples (dim {stats['embedding_dim']}) "
            f"in {stats['shards']} shards → {stats['run_dir']}"
            + (f"; not embedded: {', '.join(f'{s} {c}' for s, c in bad.items())}" if bad else ""),
            err=True,
        )
