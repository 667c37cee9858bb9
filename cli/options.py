"""Option groups shared by the commands, and the library configs built from them.

Each group is a decorator adding its options; each ``*_from`` function pops the group's values
from a command's keyword arguments and returns the library object (validated there, once). A
command declares what it takes in a few lines::

    @click.command()
    @shards_argument
    @model_options
    @input_options
    @execution_options
    @output_options
    def embed(shards, **options): ...
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING, Any, Callable

import click

from mimicfilter.defaults import (
    BINARIZE_RULES,
    DEFAULT_BINARIZE,
    DEFAULT_COMBINE_VOTES,
    MIMIC_LAYER_PRESETS,
    TASK_DEFAULTS,
    VOTE_COMBINERS,
)

if TYPE_CHECKING:
    from mimicfilter.curate.votes import AggregateConfig

DEFAULT_WORKERS = max(0, min(8, (os.cpu_count() or 2) // 2))
THREADS_HELP = ("torch CPU threads of this process [default: torch's choice, all cores]; set it when several "
                "processes share the cores (oversubscribed cores slow every process down).")


def per_task_default(attribute: str) -> str:
    """The task defaults table as help text, e.g. ``1e-4 contrastive, 1e-3 classification``."""

    def shown(value) -> str:
        if isinstance(value, float) and value < 0.01:
            return f"{value:.0e}".replace("e-0", "e-")
        return f"{value:g}" if isinstance(value, float) else str(value)

    def scaled(defaults) -> str:
        if attribute != "lr" or not defaults.lr_batch:
            return ""
        if defaults.lr_pool:
            return (f" (at batch {defaults.lr_batch} on {defaults.lr_pool:,} samples; scaled to the steps of an "
                    f"epoch: samples / --batch-size)")
        return f" (at batch {defaults.lr_batch}, scaled with --batch-size)"

    names = {"classify": "classification"}
    return ", ".join(f"{shown(getattr(defaults, attribute))} {names.get(task, task)}{scaled(defaults)}"
                     for task, defaults in TASK_DEFAULTS.items())


def a_path(ctx: click.Context, param: click.Parameter, value):
    """An output path option's value, refused when empty (``--out ""`` would otherwise mean ``.``)."""
    if value is not None and not str(value).strip():
        raise click.BadParameter("an empty path", ctx=ctx, param=param)
    return value


def a_directory_path(ctx: click.Context, param: click.Parameter, value):
    """:func:`a_path` as a ``Path`` (click's own ``Path`` type would read an empty value as ``.``)."""
    from pathlib import Path

    return None if a_path(ctx, param, value) is None else Path(value)


def group(*decorators: Callable) -> Callable:
    """Apply click decorators so the options appear in ``--help`` in the order written."""

    def apply(command: Callable) -> Callable:
        for decorator in reversed(decorators):
            command = decorator(command)
        return command

    return apply


shards_argument = click.argument("shards", nargs=-1, required=True)

model_options = group(
    click.option("--model", required=True, help="open_clip architecture name (ViT-B-32) or a JSON model config path."),
    click.option("--reference", required=True,
                 help="Reference weights: an open_clip pretrained tag or a checkpoint file."),
    click.option("--proxy", default=None,
                 help="Proxy weights (tag or checkpoint). Default: the reference with the mimic layers "
                 "re-initialised from --seed."),
    click.option("--mimic-layers", default=None,
                 help=f"Preset ({', '.join(MIMIC_LAYER_PRESETS)}) or comma-separated globs over parameter names "
                 f"[default: {per_task_default('mimic_layers')}]."),
    click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
                 help="Seed of the proxy's re-initialised layers."),
    click.option("--task", type=click.Choice(["auto", "contrastive", "classify"]), default="auto", show_default=True,
                 help="auto: classify when samples carry .cls and no caption."),
    click.option("--classnames", type=click.Path(dir_okay=False), default=None,
                 help="Classification: class names, one per line (line i = label i); builds a zero-shot reference head."),
    click.option("--reference-head", type=click.Path(dir_okay=False), default=None,
                 help="Classification: a trained head checkpoint {weight: [C, D], bias?: [C], logit_scale?}."),
    click.option("--trust-checkpoint", is_flag=True, help="Allow checkpoints that are full pickles (can run code)."),
)

input_options = group(
    click.option("--image-key", default="jpg,jpeg,png,webp", show_default=True,
                 help="Image file extensions, first present wins."),
    click.option("--text-key", default="txt", show_default=True,
                 help="Caption extension, or json:FIELD (samples without one get a status row)."),
    click.option("--allow-pipe", is_flag=True, help="Allow pipe: shard URLs (they run shell commands)."),
    click.option("--decoder", type=click.Choice(["fast", "pil", "gpu"]), default="fast", show_default=True,
                 help="Image decoding: fast (libjpeg-turbo + uint8 resize for JPEGs, PIL for the rest), pil (PIL for "
                 "all: open_clip's exact pixels), gpu (batched nvJPEG on the scoring GPU, for few-core machines)."),
)

execution_options = group(
    click.option("--batch-size", type=int, default=256, show_default=True,
                 help="Samples per batch (score: per shard in static mode, see docs/method.md)."),
    click.option("--workers", type=int, default=DEFAULT_WORKERS,
                 help="Processes that decode images and tokenise captions while this process reads the shards "
                 f"(0: decode in this process) [default: half the CPU cores, at most 8: {DEFAULT_WORKERS} here]."),
    click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N."),
    click.option("--threads", type=int, default=None, help=THREADS_HELP),
)

output_options = group(
    click.option("--out", "out_dir", required=True, callback=a_path,
                 help="Run directory to write (re-run the same command to resume): a path, or an fsspec URL "
                 "(s3://…) for static scoring."),
    click.option("--overwrite", is_flag=True, help="Replace an existing run directory made by a different command."),
    click.option("--quiet", "-q", is_flag=True, help="No progress bar and no summary."),
    click.option("--json", "as_json", is_flag=True, help="Print the run's stats as JSON on stdout."),
)


votes_options = group(
    click.option("--binarize", type=click.Choice(BINARIZE_RULES), default=DEFAULT_BINARIZE, show_default=True,
                 help="Per-epoch vote: mirror (drop twice the share below the noise's centre), gmm (2-component "
                 "mixture), kmeans, sign (s > 0) or threshold (r > 1)."),
    click.option("--combine-votes", type=click.Choice(VOTE_COMBINERS), default=DEFAULT_COMBINE_VOTES,
                 show_default=True, help="Combine epoch votes by majority or a Dawid-Skene label model."),
    click.option("--memory-limit", default=None, help="DuckDB memory limit, e.g. 4GB (it spills beyond)."),
)


strict_option = click.option(
    "--strict", is_flag=True, help="Refuse a score run that has not finished (no _SUCCESS) instead of warning.")


def external_embedding_options(matching: str) -> Callable:
    """``--features-from`` and how to read the files (extrapolate, dedup); ``matching`` ends its help."""
    return group(
        click.option("--features-from", "features_from", multiple=True,
                     help="Embeddings the pool already has, instead of --embeddings (repeatable): DataComp .npz files "
                     "(each with its .parquet of uids beside it) or Parquet files with an id and an embedding column; "
                     f"files, folders or globs. {matching}"),
        click.option("--embedding-column", default=None,
                     help="--features-from: the image array/column and optionally the text one, IMAGE[,TEXT] "
                     "[default: l14_img,l14_txt, else b32_img,b32_txt (.npz); embedding[,text_embedding] (Parquet)]."),
        click.option("--id-column", type=click.Choice(["uid", "key"]), default="uid", show_default=True,
                     help="--features-from: the column matching the files' samples to the run's."),
    )


def external_spec_from(options: dict[str, Any]):
    """The ``--features-from`` spec, or None; the reading options without it are refused."""
    from mimicfilter.errors import MimicfilterError
    from mimicfilter.extrapolate.external import ExternalSpec

    columns = tuple(name.strip() for name in (options["embedding_column"] or "").split(",") if name.strip())
    if not options["features_from"]:
        if columns or options["id_column"] != "uid":
            raise MimicfilterError("--embedding-column and --id-column are for --features-from")
        return None
    return ExternalSpec(tuple(options["features_from"]), columns, options["id_column"])


def aggregation_from(options: dict[str, Any]) -> AggregateConfig:
    from mimicfilter.curate.votes import AggregateConfig  # DuckDB loads with the commands that use it

    return AggregateConfig(binarize=options["binarize"], combine_votes=options["combine_votes"])


def _image_keys(options: dict[str, Any]) -> tuple[str, ...]:
    return tuple(key.strip().lower() for key in options["image_key"].split(",") if key.strip())


def shards_from(shards: tuple[str, ...], options: dict[str, Any]) -> tuple[str, ...]:
    """The expanded shard list (``-`` reads the list from stdin); remote shards need their fsspec driver."""
    from mimicfilter.shards.discover import expand_shards
    from mimicfilter.store.paths import check_url_drivers

    expanded = tuple(expand_shards(shards, allow_pipe=options["allow_pipe"], stdin=sys.stdin))
    check_url_drivers(list(expanded), "shard")
    return expanded


def task_from(shard_list: tuple[str, ...], options: dict[str, Any]) -> str:
    """--task, with ``auto`` resolved: classify with a class-name file or head, else by the first samples."""
    if options["task"] != "auto":
        return options["task"]
    if options["classnames"] or options["reference_head"]:
        return "classify"
    from mimicfilter.shards.decode import DecodeConfig
    from mimicfilter.shards.samples import detect_task

    decode = DecodeConfig(image_keys=_image_keys(options), text_key=options["text_key"].strip())
    return detect_task(shard_list, decode, options["allow_pipe"])


def decode_from(options: dict[str, Any], task: str):
    from mimicfilter.shards.decode import DecodeConfig

    return DecodeConfig(task=task, image_keys=_image_keys(options), text_key=options["text_key"].strip(),
                        decoder=options["decoder"])


def start_hashing_checkpoints(options: dict[str, Any]) -> None:
    """Hash the local checkpoints on another core while torch imports (run.json records their sha256)."""
    from mimicfilter.checksums import start_hashing

    for name in ("reference", "proxy", "reference_head"):
        if options.get(name):
            start_hashing(options[name])


def model_from(options: dict[str, Any], task: str):
    from mimicfilter.mimic.models import ModelSpec

    return ModelSpec(model=options["model"], reference=options["reference"], proxy=options["proxy"],
                     mimic_layers=options["mimic_layers"], trust_checkpoint=options["trust_checkpoint"],
                     seed=options["seed"], device=options["device"], task=task, classnames=options["classnames"],
                     reference_head=options["reference_head"])


def stream_fields(shard_list: tuple[str, ...], task: str, options: dict[str, Any]) -> dict[str, Any]:
    """The fields of ``StreamConfig`` (shared by ``ScoreConfig`` and ``EmbedConfig``), from the shared option groups."""
    from mimicfilter.store.paths import run_path

    return dict(shards=shard_list, out_dir=run_path(options["out_dir"]), model=model_from(options, task),
                decode=decode_from(options, task), batch_size=options["batch_size"], workers=options["workers"],
                allow_pipe=options["allow_pipe"], overwrite=options["overwrite"], argv=tuple(sys.argv),
                threads=options["threads"])
