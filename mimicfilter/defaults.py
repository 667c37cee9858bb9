"""User-facing choices and the one table of per-task defaults (torch-free: the CLI builds its
options from them, and the library resolves its defaults from the same table)."""

from __future__ import annotations

from dataclasses import dataclass

from mimicfilter.errors import MimicfilterError

TASKS = ("contrastive", "classify")
# filter and report: the per-epoch vote and how the epochs' votes combine (mimicfilter.curate.votes);
# the defaults were chosen by their worst case on a validation suite: docs/benchmarks.md
BINARIZE_RULES = ("mirror", "threshold", "sign", "kmeans", "gmm")
VOTE_COMBINERS = ("majority", "label-model")
DEFAULT_BINARIZE = "mirror"
DEFAULT_COMBINE_VOTES = "majority"
# With anchors (score --trusted), filter's default rule is the calibrated cut that keeps this share of the
# clean samples (the trusted sample's tail); chosen on the validation suite by its worst case
# (docs/benchmarks.md, "Calibrated curation").
CALIBRATED_TARGET_RECALL = 0.95
# Fewer usable trusted (or synthetic) anchors than this: no calibration, a warning instead (score warns
# when its trusted samples fall short; none usable at all is an error before any model loads).
MIN_ANCHORS = 20
TRAIN_MODES = ("none", "head", "full")
MIMIC_LAYER_PRESETS = {
    "image-proj": "the image tower's final projection (contrastive default)",
    "text-proj": "the text tower's final projection",
    "both-proj": "both towers' final projections",
    "image-last-mlp": "the MLP of the image tower's last transformer block",
    "head": "the linear classifier head's weight, as in the paper's code (classification default)",
    "head+bias": "the classifier head's weight and bias (both re-initialised in the default proxy)",
}


@dataclass(frozen=True)
class TaskDefaults:
    """What a task uses when the user does not say."""

    mimic_layers: str  # a preset of MIMIC_LAYER_PRESETS
    temperature: float  # softmax temperature of the batch weights
    lr: float  # AdamW learning rate of the proxy (trajectory modes), at batch size lr_batch on lr_pool samples
    lr_batch: int | None = None  # None: lr is fixed; else the default lr scales linearly with the batch size
    lr_pool: int | None = None  # None: lr does not depend on the pool; else it scales with lr_pool / samples

    @property
    def lr_needs_pool_size(self) -> bool:
        return self.lr_pool is not None

    def lr_for(self, batch_size: int, samples: int | None = None) -> float:
        """The default learning rate at ``batch_size`` on a pool of ``samples`` (an explicit --lr is
        always taken as given).

        With ``lr_pool`` the lr is inversely proportional to the steps in an epoch, max(1, samples /
        batch_size): whatever the pool's size and the batch size, an epoch moves the proxy as far
        as ``lr`` does at ``lr_batch`` on ``lr_pool`` samples.
        """
        if self.lr_batch is None:
            return self.lr
        if self.lr_pool is None:
            return self.lr * batch_size / self.lr_batch
        if samples is None:
            raise ValueError("this task's default lr depends on the pool's size: pass samples")
        return self.lr * (self.lr_pool / self.lr_batch) / max(1.0, samples / batch_size)


TASK_DEFAULTS = {
    # The paper's CLIP setting: image projection, tau 0.05, lr 1e-4. On the validation suite the
    # estimate did not move with the batch size at this lr (batch 64: worst 22.7 against 22.8).
    "contrastive": TaskDefaults(mimic_layers="image-proj", temperature=0.05, lr=1e-4),
    # Classification re-initialises the head's weight, which must learn within the run for its
    # scores to separate, but not so far that it fits the pool's labels more confidently than the
    # reference (then clean samples score below 0 and a clean pool reads as mostly noise). How far
    # it gets grows with lr x steps, and the steps of an epoch with samples / batch size, so the
    # default lr is 3e-3 x (3,000 / 256) / (steps per epoch): 3e-3 at batch 256 on 3,000 samples,
    # 7.5e-4 at batch 64, 7.5e-4 at batch 256 on 12,000. On the validation suite
    # (benchmarks/bench_defaults.py, docs/benchmarks.md) a fixed 3e-3 read a clean pool of 12,000
    # images as 44 % clean; scaled, 100 %. Against other lrs at 3,000 samples it had the smallest
    # worst-case estimate error over batch sizes 256 and 64 and 1 or 3 epochs: 18.5 points,
    # against 30.3 for a fixed 1e-3 (which read class-dependent noise 20-30 points high) and 52.3
    # for a fixed 3e-3 at every batch size (a clean pool read 48 % clean at batch 64).
    # tau 1 as in the paper's classification code (0.05 was worse).
    "classify": TaskDefaults(mimic_layers="head", temperature=1.0, lr=3e-3, lr_batch=256, lr_pool=3000),
}


def task_defaults(task: str) -> TaskDefaults:
    if task not in TASK_DEFAULTS:
        raise MimicfilterError(f"unknown task {task!r}", hint=f"use {' or '.join(TASKS)}")
    return TASK_DEFAULTS[task]
