"""``mimicfilter dedup``: options → DedupConfig → run_dedup → a summary."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from mimicfilter_cli.common import one_line_errors, run_with_summary
from mimicfilter_cli.options import a_path, external_embedding_options, external_spec_from

# the library's defaults, written out: importing them would load faiss and torch for --help
MAX_EPSILON, CAPTION_FACTOR, CELL_SIZE, MARGIN = 0.15, 0.02, 2048, 0.02


def _config(run: str, options: dict, argv: tuple[str, ...]):
    from mimicfilter.dedup.config import DedupConfig
    from mimicfilter.execute.partition import Partition
    from mimicfilter.execute.ray import RayConfig

    return DedupConfig(
        run=Path(run), out_dir=Path(options["out_dir"]) if options["out_dir"] else None,
        embeddings=tuple(Path(path) for path in options["embeddings"]), features_from=external_spec_from(options),
        dedup_on=options["dedup_on"], max_epsilon=options["max_threshold"], caption_factor=options["caption_factor"],
        cell_size=options["cell_size"],
        margin=options["margin"], seed=options["seed"], workers=options["workers"], threads=options["threads"],
        partition=Partition.of(options["rank"], options["world_size"]),
        ray=None if options["ray_address"] is None else RayConfig(
            options["ray_address"], options["cpus_per_task"], 0.0, options["max_retries"], options["ray_actors"]),
        overwrite=options["overwrite"], argv=argv,
    )


def _summary(stats: dict) -> list[str]:
    if "at_default" not in stats:
        waiting = stats.get("buckets_missing") or stats.get("ranges_missing")
        step = "sorting into cells" if stats.get("buckets_missing") else "searching for pairs"
        return [f"this rank's share is done; {waiting} task(s) of other ranks still {step}: run the same command "
                "again once they finish (it goes on from there and writes _SUCCESS)"]
    default = stats["at_default"]
    return [f"{stats['samples']} samples in {stats['cells']} cells; {stats['edges']} near-duplicate pairs kept "
            f"(cosine >= {1 - stats['max_epsilon']:g}, --dedup-on {stats['dedup_on']}) → {stats['run_dir']}",
            f"at filter's default threshold: {default['groups']} groups of {default['samples_in_groups']} samples, "
            f"{default['duplicates']} duplicates to drop (largest groups: {', '.join(map(str, default['largest'])) or '-'})",
            f"use them: mimicfilter filter RUN --dedup{'' if stats['run_dir'].endswith('/dedup') else ' --dedup-from ' + stats['run_dir']} ..."]


@click.command(name="dedup")
@click.argument("run")
@click.option("--out", "out_dir", default=None, callback=a_path, help="Where the pairs go [default: RUN/dedup, where filter --dedup looks].")
@click.option("--embeddings", "embeddings", multiple=True,
              help="`embed` run(s) of the run's shards, when RUN itself was scored without --save-embeddings (repeatable).")
@external_embedding_options("Samples are matched to RUN's by --id-column.")
@click.option("--dedup-on", "dedup_on", type=click.Choice(["pair", "image"]), default="pair", show_default=True,
              help="pair: the image AND the caption (or label) alike (the same image under another caption is another "
              "training pair); image: the image alone (DataComp's and SemDeDup's notion).")
@click.option("--max-threshold", "max_threshold", type=float, default=MAX_EPSILON, show_default=True, metavar="EPS",
              help="Keep pairs down to cosine 1 - EPS: filter --dedup-threshold may pick any EPS up to this later.")
@click.option("--caption-factor", type=float, default=CAPTION_FACTOR, show_default=True,
              help="--dedup-on pair: the captions must be this many times as close as the images (cosine >= "
              "1 - FACTOR x EPS): a caption that differs by a word is another caption.")
@click.option("--cell-size", type=int, default=CELL_SIZE, show_default=True,
              help="Samples per k-means cell on average (pairs are searched within cells).")
@click.option("--margin", type=float, default=MARGIN, show_default=True,
              help="A sample joins every other of its 3 nearest cells within this cosine of the nearest, so pairs "
              "across a cell boundary are found.")
@click.option("--workers", type=int, default=0, show_default=True, help="Local processes (0: this process, faiss on all cores).")
@click.option("--threads", type=int, default=None, help="faiss threads per process [default: all cores; 1 per --workers process].")
@click.option("--ray", "ray_address", is_flag=False, flag_value="local", default=None, metavar="[ADDRESS]",
              help="Run the tasks on Ray actors: alone, a local Ray instance; 'auto' or 'ray://HOST:10001' for a cluster "
              "(--out must be shared).")
@click.option("--cpus-per-task", type=float, default=1.0, show_default=True, help="Ray: CPUs (faiss threads) per actor.")
@click.option("--max-retries", type=int, default=3, show_default=True, help="Ray: restarts of a killed actor and retries of its task.")
@click.option("--ray-actors", type=int, default=None, help="Ray: number of actors [default: as many as fit].")
@click.option("--rank", type=int, default=None,
              help="Do only this rank's share (every WORLD-SIZE-th unit, then range of cells); with --world-size.")
@click.option("--world-size", type=int, default=None, help="Number of ranks sharing --out.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True, help="Seed of the k-means sample and cells.")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out made by a different command.")
@click.option("--quiet", "-q", is_flag=True, help="No summary.")
@click.option("--json", "as_json", is_flag=True, help="Print the stats as JSON on stdout.")
@one_line_errors
def dedup(run, **options):
    """Find near-duplicate samples of a run by their embeddings (for filter --dedup).

    SemDeDup-style: the image embeddings are clustered by k-means (about --cell-size samples per
    cell), and within each cell every pair above cosine 1 - --max-threshold is found (with
    --dedup-on pair, the captions' embeddings must pass too). Only a spanning forest of those pairs
    is kept, which gives `filter --dedup --dedup-threshold EPS` the exact groups for any EPS up to
    --max-threshold. Embeddings: RUN's own (score --save-embeddings, or an embed run), --embeddings
    runs, or --features-from files (DataComp .npz, Parquet). Resumable; --workers, --ray and
    --rank/--world-size share the work.

    \b
    Example:
      mimicfilter score 'pool/{00000..00099}.tar' --model ViT-B-32 --reference openai --train none \\
          --save-embeddings --out runs/pool
      mimicfilter dedup runs/pool
      mimicfilter filter runs/pool --dedup --top-frac mimic_score=0.3 --out curated/
      mimicfilter dedup runs/pool --features-from 'datacomp/shards/*.npz' --embedding-column l14_img,l14_txt \\
          --dedup-on image --json | jq .at_default
    """
    from mimicfilter.dedup.run import run_dedup

    run_with_summary(run_dedup, _config(run, options, tuple(sys.argv)), options, _summary)
