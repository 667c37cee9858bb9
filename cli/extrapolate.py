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


WEAK_RHO = 0.5  # below this the extrapolated ranking is closer to noise than to the scores


@click.command(name="extrapolate")
@click.option("--scored", "scored", required=True, help="A finished `score` run (its per-sample mean scores are the truth).")
@click.option("--embeddings", "embeddings", multiple=True,
              help="`embed` run(s) of the samples to extrapolate to (repeatable). Optional when the scored run "
              "has --save-embeddings and only its own samples matter.")
@click.option("--out", "out_dir", required=True, help="Run directory to write (a score run: filter and report read it).")
@click.option("--k", "k", default="1,2,5,10,20,50", show_default=True,
              help="Candidate neighbour counts; the best by held-out Spearman rho wins. One value fixes k.")
@click.option("--weighted", is_flag=True, help="Weight neighbours by 1/(1 - cosine) instead of a plain mean.")
@click.option("--same-label", is_flag=True, help="Classification: only neighbours with the same label.")
@click.option("--holdout", "holdout", type=float, default=0.2, show_default=True,
              help="Fraction of the scored samples held out to choose k and report rho.")
@click.option("--block-size", type=int, default=4096, show_default=True, help="Queries per similarity block.")
@click.option("--reference-block", type=int, default=65536, show_default=True,
              help="Scored samples per similarity block (memory: block-size x reference-block floats).")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:N or auto.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the held-out split.")
@click.option("--overwrite", is_flag=True, help="Replace an existing run directory made by a different command.")
@click.option("--quiet", "-q", is_flag=True, help="No summary.")
@click.option("--json", "as_json", is_flag=True, help="Print the run's stats as JSON on stdout.")
@one_line_errors
def extrapolate(scored, embeddings, out_dir, k, weighted, same_label, holdout, block_size, reference_block, device,
                seed, overwrite, quiet, as_json):
    """Predict mimic scores of unscored samples from their nearest scored neighbours (kNN, cosine).

    Each unscored sample gets the mean score and relative weight of its k nearest scored samples
    by cosine similarity of the proxy's image embeddings; k is chosen on a held-out split of the
    scored samples (never on unscored ones) and that split's Spearman rho is printed and stored in
    stats.json. The output is a score run with one row per sample and an `extrapolated` column.

    \b
    Example:
      mimicfilter score 'pool/{00000..00009}.tar' --model ViT-B-32 --reference openai \\
          --epochs 3 --save-embeddings --out runs/subset
      mimicfilter embed 'pool/{00010..00099}.tar' --model ViT-B-32 --reference openai --out runs/embed
      mimicfilter extrapolate --scored runs/subset --embeddings runs/embed --out runs/pool
      mimicfilter filter runs/pool --top-frac mimic_score=0.7 --out curated/
      mimicfilter extrapolate --scored runs/cls --embeddings runs/cls-embed --same-label --weighted \\
          --k 10 --device cuda --out runs/cls-all --json | jq .heldout_spearman
    """
    from pathlib import Path

    from mimicfilter.extrapolate.run import ExtrapolateConfig, run_extrapolate

    config = ExtrapolateConfig(
        scored=Path(scored),
        embeddings=tuple(Path(path) for path in embeddings),
        out_dir=Path(out_dir),
        k_candidates=_parse_k(k),
        weighted=weighted,
        same_label=same_label,
        holdout_fraction=holdout,
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
            f"k = {stats['k']} (held-out Spearman rho {stats['heldout_spearman']:.3f} on {stats['heldout_size']} "
            f"scored samples); {stats['extrapolated_samples']} samples extrapolated from "
            f"{stats['reference_samples']} scored; {stats['rows']} rows → {stats['run_dir']}",
            err=True,
        )
    rho = stats["heldout_spearman"]
    if not quiet and (rho != rho or rho < WEAK_RHO):  # NaN or weak: the neighbours do not predict the scores
        click.echo(
            f"Warning: held-out rho {rho:.2f} is weak: these embeddings do not predict the scores well; "
            "filter on the extrapolated rows with care (labelled pools: try --same-label; or score a larger subset)",
            err=True,
        )
