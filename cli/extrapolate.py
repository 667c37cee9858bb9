"""``mimicfilter extrapolate``: options → ExtrapolateConfig → run_extrapolate → a summary."""

from __future__ import annotations

import sys

import click

from mimicfilter_cli.common import one_line_errors, run_with_summary
from mimicfilter_cli.options import a_path, external_embedding_options, external_spec_from, group


def _parse_k(value: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in value.split(",") if part.strip())
    except ValueError as error:
        raise click.BadParameter(f"{value!r}: comma-separated integers, e.g. 1,2,5,10") from error


source_options = group(
    click.option("--scored", "scored", required=True, help="A finished `score` run (its per-sample mean scores are the truth)."),
    click.option("--embeddings", "embeddings", multiple=True,
                 help="`embed` run(s) of the samples to extrapolate to (repeatable). Optional when the scored run "
                 "has --save-embeddings and only its own samples matter."),
    external_embedding_options("The scored samples are looked up in them too, by --id-column."),
)

method_options = group(
    click.option("--method", type=click.Choice(["knn", "gnn"]), default="knn", show_default=True,
                 help="knn: mean of the nearest scored samples; gnn: a small graph network over the kNN graph "
                 "(up to 200,000 scored samples)."),
    click.option("--features", type=click.Choice(["auto", "image", "pair"]), default="auto", show_default=True,
                 help="Compare samples by the image, or by the image-text pair and its agreement; auto: the better "
                 "by held-out rho."),
    click.option("--k", "k", default="1,2,5,10,20,50", show_default=True,
                 help="kNN: candidate neighbour counts; the best by held-out Spearman rho wins. One value fixes k."),
    click.option("--weighted", is_flag=True, help="kNN: weight neighbours by 1/(1 - cosine) instead of a plain mean."),
    click.option("--same-label", is_flag=True, help="Classification: only neighbours with the same label (one index per label)."),
    click.option("--graph-k", type=int, default=10, show_default=True, help="GNN: neighbours per node in the graph."),
    click.option("--gnn-epochs", type=int, default=300, show_default=True,
                 help="GNN: most training epochs (training stops early on the held-out split)."),
    click.option("--gnn-batch", type=int, default=65536, show_default=True,
                 help="GNN: target nodes per step; more scored samples than this train in sampled mini-batches."),
    click.option("--gnn-fanout", type=int, default=10, show_default=True,
                 help="GNN: neighbours sampled per node and hop in mini-batches."),
    click.option("--holdout", "holdout", type=float, default=0.2, show_default=True,
                 help="Fraction of the scored samples held out to choose k / the epoch / the features and report rho."),
    click.option("--holdout-by", type=click.Choice(["shard", "sample"]), default="shard", show_default=True,
                 help="Hold out whole scored shards (as unscored samples sit in other shards) or single samples; "
                 "shard falls back to sample when the scored samples span one shard."),
    click.option("--min-rho", type=float, default=0.5, show_default=True,
                 help="Held-out rho below which the extrapolated scores are reported as not to be trusted."),
)

search_options = group(
    click.option("--index", "index", type=click.Choice(["auto", "exact", "ivf-sq8", "ivf-sq4"]), default="auto",
                 show_default=True, help="faiss index over the scored samples; auto: exact while queries x scored "
                 "samples <= 2e10, IVF with 8-bit re-ranking codes beyond, 4-bit beyond 20M scored samples."),
    click.option("--recall", "recall", type=float, default=0.95, show_default=True,
                 help="IVF: nprobe (and the candidates re-ranked) grow until recall@10 against exact search "
                 "reaches this on calibration queries."),
    click.option("--block-size", type=int, default=16384, show_default=True, help="Queries handed to faiss at a time."),
    click.option("--device", default="auto", show_default=True,
                 help="auto (a GPU when there is one, as for score and embed), cpu, cuda or cuda:N (the GPU index "
                 "needs faiss-gpu; the GNN trains there too)."),
    click.option("--threads", type=int, default=None,
                 help="faiss threads per process [default: all cores; 1 per --workers process]."),
)

scale_options = group(
    click.option("--workers", type=int, default=0, show_default=True,
                 help="Local processes predicting units (0: this process, faiss on all cores)."),
    click.option("--ray", "ray_address", is_flag=False, flag_value="local", default=None, metavar="[ADDRESS]",
                 help="Predict the units on Ray actors (each loads the saved index once): alone, a local Ray "
                 "instance; 'auto' or 'ray://HOST:10001' for a cluster (the run directory must be shared)."),
    click.option("--cpus-per-task", type=float, default=1.0, show_default=True, help="Ray: CPUs (faiss threads) per actor."),
    click.option("--gpus-per-task", type=float, default=0.0, show_default=True, help="Ray: GPUs per actor (faiss-gpu)."),
    click.option("--max-retries", type=int, default=3, show_default=True,
                 help="Ray: restarts of a killed actor and retries of its unit."),
    click.option("--ray-actors", type=int, default=None, help="Ray: number of actors [default: as many as fit]."),
    click.option("--rank", type=int, default=None,
                 help="Predict only this rank's share of the units (every WORLD-SIZE-th, from RANK); with --world-size."),
    click.option("--world-size", type=int, default=None, help="Number of ranks sharing the run directory."),
    click.option("--fit-only", is_flag=True,
                 help="Fit and save the extrapolator (index, choice) in --out, predict nothing: ranks started "
                 "afterwards load it instead of fitting."),
)


def _config(options: dict, argv: tuple[str, ...]):
    from pathlib import Path

    from mimicfilter.errors import MimicfilterError
    from mimicfilter.execute.partition import Partition
    from mimicfilter.execute.ray import RayConfig
    from mimicfilter.extrapolate.config import ExtrapolateConfig
    from mimicfilter.extrapolate.gnn import GnnSettings

    rank, world_size = options["rank"], options["world_size"]
    if (rank is None) != (world_size is None):
        raise MimicfilterError("--rank and --world-size go together", hint="e.g. --rank 3 --world-size 16")
    return ExtrapolateConfig(
        scored=Path(options["scored"]),
        embeddings=tuple(Path(path) for path in options["embeddings"]),
        features_from=external_spec_from(options),
        out_dir=Path(options["out_dir"]),
        method=options["method"], features=options["features"], k_candidates=_parse_k(options["k"]),
        weighted=options["weighted"], same_label=options["same_label"], graph_k=options["graph_k"],
        gnn=GnnSettings(max_epochs=options["gnn_epochs"], batch_nodes=options["gnn_batch"],
                        fanout=options["gnn_fanout"], seed=options["seed"]),
        holdout_fraction=options["holdout"], holdout_by=options["holdout_by"], min_rho=options["min_rho"],
        index=options["index"], recall_target=options["recall"], block_size=options["block_size"],
        device=options["device"], seed=options["seed"], workers=options["workers"], threads=options["threads"],
        partition=Partition(0, 1) if rank is None else Partition(rank, world_size),
        ray=None if options["ray_address"] is None else RayConfig(
            options["ray_address"], options["cpus_per_task"], options["gpus_per_task"], options["max_retries"],
            options["ray_actors"]),
        fit_only=options["fit_only"], overwrite=options["overwrite"], argv=argv,
    )


def _summary(stats: dict) -> list[str]:
    lines = [f"{stats['method']} on {stats['features']} features (held-out Spearman rho {stats['heldout_spearman']:.3f} "
             f"on {stats['heldout_size']} scored samples); {stats['extrapolated_samples']} samples extrapolated from "
             f"{stats['reference_samples']} scored; {stats['rows']} rows → {stats['run_dir']}"]
    source = "--features-from files" if stats["embedding_source"] == "features-from" else "--embeddings runs"
    if stats["overlap_samples"]:
        lines.append(f"{stats['overlap_samples']} samples of the {source} are in the scored run: their scored rows "
                     "stand for them, they are not extrapolated")
    if stats["scored_without_embedding"]:
        examples = "; ".join(stats["scored_without_embedding_examples"])
        lines.append(f"{stats['scored_without_embedding']} scored samples have no embedding in the {source} "
                     f"(e.g. {examples}): they keep their scored rows but predict nothing")
    if stats.get("units_missing"):
        lines.append(f"{stats['units_missing']} of {stats['units']} parts still to come (other ranks, or the "
                     "prediction after --fit-only); the last run to finish writes _SUCCESS")
    return lines


@click.command(name="extrapolate")
@source_options
@click.option("--out", "out_dir", required=True, callback=a_path, help="Run directory to write (a score run: filter and report read it).")
@method_options
@search_options
@scale_options
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True, help="Seed of the held-out split, the index and the GNN.")
@click.option("--overwrite", is_flag=True, help="Replace an existing run directory made by a different command.")
@click.option("--quiet", "-q", is_flag=True, help="No summary.")
@click.option("--json", "as_json", is_flag=True, help="Print the run's stats as JSON on stdout.")
@one_line_errors
def extrapolate(**options):
    """Predict mimic scores of unscored samples from the scored samples most like them.

    Samples are compared by their pair embedding (`embed` / `score --save-embeddings`: the
    reference's image and caption embeddings), by embeddings the pool already has
    (--features-from: DataComp .npz files or Parquet, no model pass), or by the image alone.
    Neighbours come from a faiss index over the scored samples (exact when small, IVF beyond),
    built once and saved in --out. kNN gives each unscored sample the mean score of its k nearest
    scored samples; the GNN learns from the kNN graph. k, the GNN's stopping epoch and the
    features are chosen on a held-out split of the scored samples (never on unscored ones); that
    split's Spearman rho is printed and stored in stats.json, and below --min-rho the
    extrapolated scores are reported as not to be trusted for filtering. The unscored side
    streams one part per input file (resumable; --workers, --ray, --rank/--world-size). The
    output is a score run with one row per sample and an `extrapolated` column.

    \b
    Example:
      mimicfilter score 'pool/{00000..00009}.tar' --model ViT-B-32 --reference openai \\
          --epochs 3 --save-embeddings --out runs/subset
      mimicfilter embed 'pool/{00010..00099}.tar' --model ViT-B-32 --reference openai --out runs/embed
      mimicfilter extrapolate --scored runs/subset --embeddings runs/embed --out runs/pool
      mimicfilter filter runs/pool --top-frac mimic_score=0.7 --out curated/
      mimicfilter extrapolate --scored runs/subset --features-from 'datacomp/shards/*.npz' \\
          --embedding-column l14_img,l14_txt --out runs/pool-l14 --json | jq '.heldout_spearman, .index'
    """
    from mimicfilter.extrapolate.run import run_extrapolate

    stats = run_with_summary(run_extrapolate, _config(options, tuple(sys.argv)), options, _summary)
    if not stats["trusted"] and not options["quiet"]:
        click.echo(
            f"Warning: held-out rho {stats['heldout_spearman']:.2f} is below --min-rho {stats['min_rho']:g}: the "
            "extrapolated scores should not be trusted for filtering (score more samples; image-text pools: "
            "embed pairs and use --features pair; labelled pools: --same-label)",
            err=True,
        )
