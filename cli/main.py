"""``mimicfilter`` entry point: the command group.

Each command's module is imported when that command runs (or when ``--help`` lists them), so
``mimicfilter score`` never loads DuckDB or the report's plotting, and ``filter`` never loads torch.
"""

import importlib

import click

from mimicfilter import __version__

COMMANDS = {  # name -> "module:attribute", in the order --help lists them
    "embed": "mimicfilter_cli.embed:embed",
    "extrapolate": "mimicfilter_cli.extrapolate:extrapolate",
    "filter": "mimicfilter_cli.filter:filter_command",
    "report": "mimicfilter_cli.report:report",
    "score": "mimicfilter_cli.score:score",
}


class LazyGroup(click.Group):
    """A group whose commands are imported on first use (click's documented lazy-loading pattern)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *COMMANDS})

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in self.commands and name in COMMANDS:
            module, attribute = COMMANDS[name].split(":")
            self.add_command(getattr(importlib.import_module(module), attribute), name)
        return super().get_command(ctx, name)

    @property
    def all_commands(self) -> dict[str, click.Command]:
        """Every command, imported (tests and docs walk them)."""
        context = click.Context(self)
        return {name: self.get_command(context, name) for name in self.list_commands(context)}


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="mimicfilter")
def cli():
    """Score and curate WebDataset image-text shards with Grad-Mimic mimic scores.

    \b
    Example:
      mimicfilter score 'pool/{000..009}.tar' --model ViT-B-32 --reference openai --out runs/pool
      mimicfilter filter runs/pool --top-frac mimic_score=0.7 --out curated/
      mimicfilter report runs/pool --out runs/pool/report
    """
