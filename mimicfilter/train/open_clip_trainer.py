"""open_clip's own trainer (``open_clip_train.main``) with Grad-Mimic re-weighting switched on.

    python -m mimicfilter.train --grad-mimic-reference ref.pt --grad-mimic-layers image-proj \\
        --grad-mimic-temperature 0.05 -- --model ViT-B-32 --train-data 'pool/{00000..00099}.tar' \\
        --dataset-type webdataset --train-num-samples 1000000 --batch-size 256 --epochs 4

Everything that is not a ``--grad-mimic-*`` option goes to open_clip_train unchanged. Two of its
module attributes are swapped for the run: ``create_loss`` returns :class:`GradMimicClipLoss`, and
``train_one_epoch`` first hands that loss the model it trains (a third, ``tarfile_to_samples_nothrow``,
only to fix its WebDataset reader for new webdataset releases: :mod:`~mimicfilter.train.wds_compat`). Settings whose loss is not one
process's CLIP/SigLIP batch loss are refused before anything starts (see :func:`check_trainer_args`).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path
from typing import Iterator, Sequence

from mimicfilter.defaults import task_defaults
from mimicfilter.errors import MimicfilterError, one_line
from mimicfilter.mimic.grad_mimic import OTHERS

EXAMPLE = (
    "Example: python -m mimicfilter.train --grad-mimic-reference ref.pt --grad-mimic-layers image-proj "
    "--grad-mimic-temperature 0.05 -- --model ViT-B-32 --train-data 'pool/{00000..00099}.tar' "
    "--dataset-type webdataset --train-num-samples 1000000 --batch-size 256 --epochs 4"
)
DEFAULT_OTHERS = "weighted"


def option_parser() -> argparse.ArgumentParser:
    defaults = task_defaults("contrastive")
    parser = argparse.ArgumentParser(
        prog="python -m mimicfilter.train", allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="open_clip_train with each batch re-weighted by Grad-Mimic mimic scores (docs/training.md). "
                    "Every other option goes to open_clip_train (python -m open_clip_train.main --help).",
        epilog=EXAMPLE,
    )
    parser.add_argument("--grad-mimic-reference", required=True, metavar="CKPT",
                        help="the reference to mimic: a checkpoint of the trainer's --model (.pt/.bin/.safetensors "
                             "state dict or an open_clip_train epoch_N.pt) or one of its pretrained tags")
    parser.add_argument("--grad-mimic-layers", default=defaults.mimic_layers, metavar="PRESET",
                        help=f"mimic layers: image-proj, text-proj, both-proj, image-last-mlp or parameter globs "
                             f"[{defaults.mimic_layers}]")
    parser.add_argument("--grad-mimic-temperature", type=float, default=defaults.temperature, metavar="T",
                        help=f"softmax temperature of the batch weights [{defaults.temperature}]")
    parser.add_argument("--grad-mimic-others", choices=tuple(OTHERS), default=DEFAULT_OTHERS,
                        help="what the parameters outside the mimic layers learn from: the re-weighted loss "
                             f"(weighted) or the plain mean (mean, the paper's full split) [{DEFAULT_OTHERS}]")
    parser.add_argument("--grad-mimic-trust-checkpoint", action="store_true",
                        help="allow a full-pickle reference checkpoint (unpickling can run code)")
    return parser


def split_argv(argv: Sequence[str]):
    """(validated GradMimicOptions, the trainer's own arguments)."""
    from mimicfilter.train.loss import GradMimicOptions

    parsed, rest = option_parser().parse_known_args(list(argv))
    rest = [argument for argument in rest if argument != "--"]
    options = GradMimicOptions(reference=parsed.grad_mimic_reference, layers=parsed.grad_mimic_layers,
                               temperature=parsed.grad_mimic_temperature, others=parsed.grad_mimic_others,
                               trust_checkpoint=parsed.grad_mimic_trust_checkpoint)
    return options, rest


def check_trainer_args(args) -> None:
    """Refuse the trainer settings whose loss is not one process's CLIP/SigLIP batch loss."""
    from open_clip_train.distributed import is_using_distributed

    refusals = [
        (args.distill_model is not None, "--distill-model", "distillation has its own loss"),
        ("coca" in args.model.lower(), f"--model {args.model}", "CoCa adds a captioning loss"),
        (args.accum_freq > 1, f"--accum-freq {args.accum_freq}",
         "accumulated batches mix cached features without a graph into the per-sample losses"),
        (args.horovod or is_using_distributed(), "distributed training",
         "the weights need every sample's loss over the global batch, which open_clip gathers across processes"),
        (args.torchcompile, "--torchcompile", "compiled graphs do not support the double backward of the scores"),
    ]
    for refused, what, why in refusals:
        if refused:
            raise MimicfilterError(f"Grad-Mimic cannot run with {what}: {why}",
                                   hint="train in one process with --accum-freq 1, or use mimicfilter.GradMimic in your own loop")


def with_model(argv: Sequence[str], model: str) -> list[str]:
    """The trainer's arguments with every ``--model`` value replaced by ``model``."""
    rewritten, found = [], False
    arguments = iter(argv)
    for argument in arguments:
        if argument == "--model":
            rewritten += [argument, model]
            next(arguments, None)
        elif argument.startswith("--model="):
            rewritten.append(f"--model={model}")
        else:
            rewritten.append(argument)
            continue
        found = True
    if not found:
        raise MimicfilterError("a JSON model config goes to the trainer as --model PATH", hint="spell --model in full")
    return rewritten


@contextlib.contextmanager
def json_model(trainer_argv: Sequence[str], model: str, pretrained: str, reference: str) -> Iterator[tuple[list[str], str]]:
    """``--model`` naming a JSON config, as ``mimicfilter score --model`` takes it: open_clip's trainer
    gets the directory ``score`` builds the model from (``local-dir:``), with a ``--pretrained``
    checkpoint linked beside the config (open_clip ignores ``--pretrained`` for a directory). Yields
    the trainer's arguments and the model name to build the reference with; any other ``--model``
    passes unchanged."""
    from mimicfilter.mimic.architectures import is_local_checkpoint, names_config_file, resolve_architecture

    if not names_config_file(model):
        yield list(trainer_argv), model
        return
    architecture = resolve_architecture(model)  # read and checked as score checks it (one-line errors)
    for option, source in (("--pretrained", pretrained), ("--grad-mimic-reference", reference)):
        if source and not is_local_checkpoint(source):
            raise MimicfilterError(f"{option} {source!r} with a JSON --model: pretrained tags belong to built-in "
                                   "architectures", hint="pass a local .pt/.bin/.safetensors checkpoint")
    with architecture.factory_name(Path(pretrained) if pretrained else None) as trainer_model, \
            architecture.factory_name() as reference_model:
        yield with_model(trainer_argv, trainer_model), reference_model


@contextlib.contextmanager
def trainer_with(loss):
    """open_clip_train.main with ``loss`` as its loss, bound to the trained model before the first epoch
    (and, with webdataset >= 0.2.96, a WebDataset reader that reads past the end of a shard)."""
    import open_clip_train.data as trainer_data
    import open_clip_train.main as trainer

    from mimicfilter.train import wds_compat

    original_create_loss, original_train_one_epoch = trainer.create_loss, trainer.train_one_epoch
    original_reader = trainer_data.tarfile_to_samples_nothrow

    def create_loss(args):
        return loss

    def train_one_epoch(model, data, epoch_loss, *args, **kwargs):
        # The trainer hands over the model as it trains it; its parameters are the ones to steer.
        epoch_loss.bind(getattr(model, "module", model))
        return original_train_one_epoch(model, data, epoch_loss, *args, **kwargs)

    trainer.create_loss, trainer.train_one_epoch = create_loss, train_one_epoch
    if wds_compat.needs_fix():
        trainer_data.tarfile_to_samples_nothrow = wds_compat.tarfile_to_samples_nothrow
    try:
        yield trainer
    finally:
        trainer.create_loss, trainer.train_one_epoch = original_create_loss, original_train_one_epoch
        trainer_data.tarfile_to_samples_nothrow = original_reader


def run(argv: Sequence[str]) -> int:
    """Validate everything, load the reference's mimic layers, run open_clip_train; its exit status."""
    options, trainer_argv = split_argv(argv)
    try:
        from open_clip_train.params import parse_args
    except ImportError as error:
        raise MimicfilterError(f"open_clip_train cannot be imported: {error}",
                               hint="pip install 'mimicfilter[train]' (open_clip_torch and pandas)") from error
    from mimicfilter.train.loss import GradMimicClipLoss, load_reference, reference_model_kwargs

    trainer_args = parse_args(trainer_argv)
    check_trainer_args(trainer_args)
    if not trainer_args.train_data and trainer_args.dataset_type != "synthetic":
        raise MimicfilterError("no --train-data: Grad-Mimic re-weights training batches", hint="pass --train-data SHARDS")
    with json_model(trainer_argv, trainer_args.model, trainer_args.pretrained, options.reference) as (
            trainer_argv, reference_model):
        reference = load_reference(reference_model, options, reference_model_kwargs(trainer_args))
        loss = GradMimicClipLoss(reference, options, log_every=trainer_args.log_every_n_steps)
        with trainer_with(loss) as trainer:
            result = trainer.main(trainer_argv)
    return 1 if result == -1 else 0  # open_clip_train returns -1 when it refuses (e.g. the run name exists)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return run(sys.argv[1:] if argv is None else argv)
    except MimicfilterError as error:
        print(f"Error: {one_line(error)}", file=sys.stderr)  # the CLI's form: message (hint: ...)
        return 2
