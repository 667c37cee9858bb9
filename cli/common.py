"""What every command shares: turning library errors into one line, warnings, and the progress bar."""

from __future__ import annotations

import contextlib
import functools
import gc
import json
import sys
from collections.abc import Callable, Iterator

import click
from tqdm import tqdm

from mimicfilter.errors import MimicfilterError, one_line


def os_error_line(error: OSError) -> str:
    """``cannot write /x: No space left on device``: what the system refused, on which path."""
    where = f" {error.filename}" if error.filename else ""
    return one_line(f"{error.strerror or type(error).__name__}:{where}" if error.strerror else error)


def one_line_errors(command):
    """Report MimicfilterError as ``Error: ... (hint: ...)`` on stderr with its exit code (2 for usage), and a
    refusal of the system (full or read-only disk, a path through a file) as one line, exit 1."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except MimicfilterError as error:
            click.echo(f"Error: {error}", err=True)
            sys.exit(error.exit_code)
        except OSError as error:
            click.echo(f"Error: {os_error_line(error)} (hint: check the path, free space and permissions; "
                       "finished outputs are kept)", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("Interrupted: finished parts are kept; re-run the same command to resume.", err=True)
            sys.exit(130)
        except Exception as error:
            # a file that is not the table it should be (empty, cut short, a corrupt page, a column of
            # another type), found where it is read: Arrow's or DuckDB's message, on one line. (The
            # libraries from sys.modules: --help never imports them.)
            arrow, duckdb = sys.modules.get("pyarrow"), sys.modules.get("duckdb")
            if arrow is not None and isinstance(error, arrow.lib.ArrowException):
                click.echo(f"Error: cannot read a table: {one_line(error)} (hint: a Parquet file the command reads "
                           "is empty, cut short or of another kind; check the files it names)", err=True)
                sys.exit(2)
            if duckdb is not None and isinstance(error, duckdb.Error):
                click.echo(f"Error: a query over the tables failed: {one_line(error)} (hint: a score part, manifest "
                           "or joined file may be corrupt or of another kind; check the files the command reads)",
                           err=True)
                sys.exit(1)
            raise

    return wrapper


def run_with_summary(run: Callable[..., dict], config, options: dict, summary: Callable[[dict], list[str]]) -> dict:
    """``run(config, echo=...)`` with progress lines on stderr (none with --quiet or --json), then the
    stats as JSON on stdout (--json) or the summary's lines on stderr; returns the stats."""
    quiet, as_json = options["quiet"], options["as_json"]
    stats = run(config, echo=None if quiet or as_json else (lambda line: click.echo(line, err=True)))
    if as_json:
        click.echo(json.dumps(stats, indent=2, sort_keys=True))
    elif not quiet:
        for line in summary(stats):
            click.echo(line, err=True)
    return stats


def print_warnings(warnings: list[str]) -> None:
    """Warnings go to stderr, one line each, whatever stdout carries."""
    for warning in warnings:
        click.echo(f"Warning: {one_line(warning, 500)}", err=True)


class ProgressBar:
    """A tqdm bar on stderr: samples/s, shards (or epochs) done, and an ETA from the mean size so far."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.bar = None
        self.shards_total = 0
        self.shards_done = 0
        self.samples_in_done_shards = 0
        self.shards_done_now = 0
        self.unit = "shards"

    def start(self, total: int, done: int, unit: str = "shards") -> None:
        self.shards_total, self.shards_done, self.unit = total, done, unit
        if self.enabled:
            self.bar = tqdm(total=None, unit="sample", file=sys.stderr, dynamic_ncols=True, desc="scoring")
            self._postfix()

    def advance(self, samples: int) -> None:
        if self.bar is not None:
            self.bar.update(samples)

    def shard_done(self, samples: int) -> None:
        self.shards_done += 1
        self.shards_done_now += 1
        self.samples_in_done_shards += samples
        if self.bar is not None:
            remaining = self.shards_total - self.shards_done
            mean = self.samples_in_done_shards / self.shards_done_now
            self.bar.total = int(self.bar.n + remaining * mean)  # an estimate: shard sizes are unknown ahead
            self._postfix()

    def _postfix(self) -> None:
        self.bar.set_postfix_str(f"{self.unit} {self.shards_done}/{self.shards_total}", refresh=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@contextlib.contextmanager
def heavy_imports() -> Iterator[None]:
    """Import torch, open_clip and the pipeline with the garbage collector off, then freeze what they
    made, as Python's gc docs advise for a parent that forks workers. Import time was spent in
    collector passes over objects that live as long as the process (torch, open_clip: ~650,000), and
    frozen objects are never walked again: not by the passes while scoring, not by forked decode
    workers (so their pages stay shared, copy-on-write), not by the interpreter's exit (1–1.5 s
    before). No collection runs before the freeze (it took ~0.4 s): the few cycles the imports left
    (~11,000 objects) stay, frozen. Measured in docs/benchmarks.md ("Input path", start-up)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if enabled:
            gc.enable()
