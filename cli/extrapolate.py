"""``mimicfilter extrapolate``: options → ExtrapolateConfig → run_extrapolate → a summary."""

from __future__ import annotations

import json
import sys

import click

from mimicfilter_cli.common import one_line_errors


def _parse_k(value: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in value.split(",") if part.strip())
    except ValueError as error:
        raise click.BadParameter(f"{value!r}: comma-separated integers, e.g. 1,2,5,10") from error


@click.command(name="extrapolate")
@click.option("--scored", "scored", required=True, help="A finished `score` run (its per-sample mean scores are the truth).")
@click.option("--embeddings", "embeddings", multiple=True,
              help="`embed` run(s) of the samples to extrapolate to (repeatable). Optional when the scored run "
              "has --save-embeddings and only its own samples matter.")
@click.option("--out", "out_dir", required=True, help="Run directory to write (a score run: filter and report read it).")
@click.option("--method", type=click.Choice(["knn", "gnn"]), default="knn", show_default=True,
              help="knn: mean of the nearest scored samples; gnn: a small graph network over the kNN graph.")
@click.option("--features", type=click.Choice(["auto", "image", "pair"]), default="auto", show_default=True,
              help="Compare samples by the image, or by the image-text pair and its agreement; auto: the better "
              "by held-out rho.")
@click.option("--k", "k", default="1,2,5,10,20,50", show_default=True,
              help="kNN: candidate neighbour counts; the best by held-out Spearman rho wins. One value fixes k.")
@click.option("--weighted", is_flag=True, help="kNN: weight neighbours by 1/(1 - cosine) instead of a plain mean.")
@click.option("--same-label", is_flag=True, help="Classification: only neighbours with the same label.")
@click.option("--graph-k", type=int, default=10, show_default=True, help="GNN: neighbours per node in the graph.")
@click.option("--gnn-epochs", type=int, default=300, show_default=True,
              help="GNN: most training epochs (training stops early on the held-out split).")
@click.option("--gnn-batch", type=int, default=65536, show_default=True,
              help="GNN: target nodes per step; more scored samples than this train in sampled mini-batches.")
@click.option("--gnn-fanout", type=int, default=10, show_default=True,
              help="GNN: neighbours sampled per node and hop in mini-batches.")
@click.option("--holdout", "holdout", type=float, default=0.2, show_default=True,
              help="Fraction of the scored samples held out to choose k / the epoch / the features and report rho.")
@click.option("--holdout-by", type=click.Choice(["shard", "sample"]), default="shard", show_default=True,
              help="Hold out whole scored shards (as unscored samples sit in other shards) or single samples; "
              "shard falls back to sample when the scored samples span one shard.")
@click.option("--min-rho", type=float, default=0.5, show_default=True,
              help="Held-out rho below which the extrapolated scores are reported as not to be trusted.")
@click.option("--block-size", type=int, default=4096, show_default=True, help="Queries per similarity block.")
@click.option("--reference-block", type=int, default=65536, show_default=True,
              help="Scored samples per similarity block (memory: block-size x reference-block floats).")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:N or auto.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the held-out split and the GNN.")
@click.option("--overwrite", is_flag=True, help="Replace an existing run directory made by a different command.")
@click.option("--quiet", "-q", is_flag=True, help="No summary.")
@click.option("--json", "as_json", is_flag=True, help="Print the run's stats as JSON on stdout.")
@one_line_errors
def extrapolate(scored, embeddings, out_dir, method, features, k, weighted, same_label, graph_k, gnn_epochs, gnn_batch,
                gnn_fanout, holdout, holdout_by, min_rho, block_size, reference_block, device, seed, overwrite, quiet, as_json):
    """Predict mimic scores of unscored samples from the scored samples most like them.

    Samples are compared by their pair embedding (`embed` / `score --save-embeddings`: the
    reference's image and caption embeddings) or by the image alone. kNN gives each unscored sample
    the mean score of its k nearest scored samples; the GNN learns from the kNN graph. k, the GNN's
    stopping epoch and the features are chosen on a held-out split of the scored samples (never
    on unscored ones); that split's Spearman rho is printed and stored in stats.json, and below
    --min-rho the extrapolated scores are reported as not to be trusted for filtering. The output
    is a score run with one row per sample and an `extrapolated` column.

    \b
    Example:
      mimicfilter score 'pool/{00000..00009}.tar' --model ViT-B-32 --reference openai \\
          --epochs 3 --save-embeddings --out runs/subset
      mimicfilter embed 'pool/{00010..00099}.tar' --model ViT-B-32 --reference openai --out runs/embed
      mimicfilter extrapolate --scored runs/subset --embeddings runs/embed --out runs/pool
      mimicfilter filter runs/pool --top-frac mimic_score=0.7 --out curated/
      mimicfilter extrapolate --scored runs/subset --embeddings runs/embed --method gnn --device cuda \\
          --out runs/pool-gnn --json | jq '.heldout_spearman, .trusted'
    """
    from pathlib import Path

    from mimicfilter.extrapolate.gnn import GnnSettings
    from mimicfilter.extrapolate.run import ExtrapolateConfig, run_extrapolate

    config = ExtrapolateConfig(
        scored=Path(scored),
        embeddings=tuple(Path(path) for path in embeddings),
        out_dir=Path(out_dir),
        method=method,
        features=features,
        k_candidates=_parse_k(k),
        weighted=weighted,
        same_label=same_label,
        graph_k=graph_k,
        gnn=GnnSettings(max_epochs=gnn_epochs, batch_nodes=gnn_batch, fanout=gnn_fanout, seed=seed),
        holdout_fraction=holdout,
        holdout_by=holdout_by,
        min_rho=min_rho,
        block_size=block_size,
        reference_block=reference_block,
        device=device,
        seed=seed,
        overwrite=overwrite,
        argv=tuple(sys.argv),
    )
    stats = run_extrapolate(config, echo=None if quiet or as_json else (lambda line: click.echo(line, err=True)))
    if as_json:
        click.echo(json.dumps(stats, indent=2, sort_keys=True))
    elif not quiet:
        click.echo(
            f"{stats['method']} on {stats['features']} features (held-out Spearman rho {stats['heldout_spearman']:.3f} "
            f"on {stats['heldout_size']} scored samples); {stats['extrapolated_samples']} samples extrapolated from "
            f"{stats['reference_samples']} scored; {stats['rows']} rows → {stats['run_dir']}",
            err=True,
        )
    if not stats["trusted"] and not quiet:
        click.echo(
            f"Warning: held-out rho {stats['heldout_spearman']:.2f} is below --min-rho {stats['min_rho']:g}: the "
            "extrapolated scores should not be trusted for filtering (score more samples; image-text pools: "
            "embed pairs and use --features pair; labelled pools: --same-label)",
            err=True,
        )
