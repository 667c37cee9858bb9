"""``mimicfilter`` entry point: the command group."""

import click

from mimicfilter import __version__
from mimicfilter_cli.embed import embed
from mimicfilter_cli.extrapolate import extrapolate
from mimicfilter_cli.filter import filter_command
from mimicfilter_cli.report import report
from mimicfilter_cli.score import score


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="mimicfilter")
def cli():
    """Score and curate WebDataset image-text shards with Grad-Mimic mimic scores.

    \b
    Example:
      mimicfilter score 'pool/{000..009}.tar' --model ViT-B-32 --reference openai --out runs/pool
      mimicfilter filter runs/pool --top-frac mimic_score=0.7 --out curated/
      mimicfilter report runs/pool --out runs/pool/report
    """


cli.add_command(score)
cli.add_command(filter_command)
cli.add_command(report)
cli.add_command(embed)
cli.add_command(extrapolate)
