"""``mimicfilter`` entry point: the command group.

Each command's module is imported when that command runs (or when ``--help`` lists them), so
``mimicfilter score`` never loads DuckDB or the report's plotting, and ``filter`` never loads torch.
"""

import atexit
import importlib
import os
import sys

import click

from mimicfilter import __version__
from mimicfilter.errors import one_line

COMMANDS = {  # name -> "module:attribute", in the order --help lists them
    "dedup": "mimicfilter_cli.dedup:dedup",
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

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        """click's standalone mode, with usage errors as one line (``Error: … (hint: see '… --help')``,
        exit 2) instead of the usage block: every error of mimicfilter reads the same way."""
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            result = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.exceptions.NoArgsIsHelpError as error:
            error.show()
            sys.exit(error.exit_code)
        except click.UsageError as error:
            command = error.ctx.command_path if error.ctx is not None else "mimicfilter"
            click.echo(f"Error: {one_line(error.format_message())} (hint: see '{command} --help')", err=True)
            sys.exit(error.exit_code)
        except click.ClickException as error:
            error.show()
            sys.exit(error.exit_code)
        except click.Abort:
            click.echo("Aborted!", err=True)
            sys.exit(1)
        sys.exit(result if isinstance(result, int) else 0)

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


def main() -> None:
    """The program (``mimicfilter`` and ``python -m mimicfilter``): the command group, then an exit
    that skips the interpreter's teardown once torch is loaded.

    Tearing down torch, open_clip and the models took ~0.5 s after every ``score`` on a CPU core
    (docs/benchmarks.md, start-up), for nothing: every output is written, closed and renamed by
    then. The exit handlers still run (logging, progress bars, multiprocessing's and Ray's
    clean-up) and the exit status is the command's; a process with live children, or standard
    streams that cannot be flushed, exits the ordinary way. Tests that call ``cli`` in-process
    never reach this.
    """
    try:
        cli.main()
    except SystemExit as exit:
        code = exit.code
    else:
        code = 0
    if "torch" in sys.modules and (code is None or isinstance(code, int)) and _flushed():
        import multiprocessing

        if not multiprocessing.active_children():
            atexit._run_exitfuncs()  # what the interpreter would run first; the teardown is what is skipped
            _flushed()
            os._exit(code or 0)
    raise SystemExit(code)


def _flushed() -> bool:
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except (OSError, ValueError):  # a closed pipe: the ordinary exit reports it
        return False
    return True
