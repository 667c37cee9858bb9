"""The validation suite the defaults are chosen on: pools with known truth, scored by the real CLI.

Used by ``benchmarks/bench_defaults.py`` (``make bench-defaults``); everything is cached under
``--out`` (references, pool shards, score runs, keyed by what made them), so a re-run only
evaluates.

Image–text pools (emoji drawn at 64 px with their CLDR names, scripts/emoji_data.py): a small
CLIP reference trained from scratch on 1,500 clean pairs; pools of 1,200 pairs drawn from the
other emoji (never seen by the reference) with

* swapped captions only at 0 (the clean pool), 10, 30, 50 and 70 %;
* web-style mixed corruption (swaps, boilerplate captions, blank and noise images in equal
  shares; benchmarks/imagetext_data.py's ``corrupt``) at 20, 40 and 60 %.

Labelled pools (Fashion-MNIST, benchmarks/fmnist_data.py's data and reference): a
small reference (image tower + linear head with a bias) trained on 10,000 clean images; pools of
3,000 other images with no noise, symmetric label noise (a uniformly random other class) at 20
and 40 %, and class-dependent noise at 40 % (each flipped label goes to one similar class,
benchmarks/common.py's ``SIMILAR_CLASS``: T-shirt <-> Shirt, Pullover <-> Coat, Sandal -> Sneaker ->
Ankle boot -> Sandal, Dress -> T-shirt, Trouser -> Dress, Bag -> Pullover); the clean, sym40 and cd40 pools also at 1,000 and
12,000 images (an epoch of fewer or more steps).

Settings: every pool at the task's defaults; some pools also at another batch size, the other
temperature, another learning rate and another number of epochs (``SETTINGS``).

Anchors: the runs at the defaults and their variants are scored with ``--trusted``: 500 clean samples
of the same kind that are not in the pool (emoji the pool did not draw, never seen by the ``unseen``
reference; Fashion-MNIST images the pool did not draw), a random draw per pool. The pool's own
scores do not change with anchors (tests/test_anchors.py), so the vote rules read the same tables;
calibration is evaluated on draws of 100, 200 and all 500 of them (bench_defaults.py).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import fmnist_data as fmnist
import imagetext_data as imagetext
from common import ROOT, SIMILAR_CLASS, digest, mimicfilter_command, slug, stamped, thread_env, write_stamp
from mimicfilter.defaults import TASK_DEFAULTS

EMOJI_REF_SIZE, EMOJI_POOL_SIZE, EMOJI_REF_STEPS = 1500, 1200, 700
FMNIST_REF_SIZE, FMNIST_POOL_SIZE, FMNIST_REF_EPOCHS = 10_000, 3000, 4
TRUSTED_SIZE = 500  # checked samples per pool scored as anchors (calibration draws 100 and 200 of them)
ANCHORED_ROLES = ("default", "variant")


@dataclass(frozen=True)
class Pool:
    name: str
    task: str  # contrastive (emoji) or classify (Fashion-MNIST)
    noise: float
    kind: str  # swap, web, clean, symmetric, class-dependent


@dataclass(frozen=True)
class Setting:
    name: str
    options: tuple[str, ...]  # extra `mimicfilter score` options (the defaults: none)
    # "default": the task's defaults; "variant": what users change for their data and compute (batch
    # size, epochs): the default rule must hold there too; "candidate": another lr, tau or preset the
    # defaults are chosen against
    role: str = "default"


POOLS = (
    Pool("emoji-clean", "contrastive", 0.0, "clean"),
    *(Pool(f"emoji-swap{int(n * 100)}", "contrastive", n, "swap") for n in (0.1, 0.3, 0.5, 0.7)),
    *(Pool(f"emoji-web{int(n * 100)}", "contrastive", n, "web") for n in (0.2, 0.4, 0.6)),
    Pool("fmnist-clean", "classify", 0.0, "clean"),
    Pool("fmnist-sym20", "classify", 0.2, "symmetric"),
    Pool("fmnist-sym40", "classify", 0.4, "symmetric"),
    Pool("fmnist-cd40", "classify", 0.4, "class-dependent"),
    # smaller and larger pools: an epoch has fewer or more steps, so a fixed lr trains the proxy
    # less or further (the default lr follows the steps per epoch)
    *(Pool(f"fmnist-{name}-{size}", "classify", noise, kind) for size in ("1k", "12k")
      for name, noise, kind in (("clean", 0.0, "clean"), ("sym40", 0.4, "symmetric"), ("cd40", 0.4, "class-dependent"))),
)
POOL_SIZES = {pool.name: {"1k": 1000, "12k": 12_000}[pool.name.rsplit("-", 1)[1]]
              for pool in POOLS if pool.name.endswith(("-1k", "-12k"))}
FMNIST_3K = ("fmnist-clean", "fmnist-sym20", "fmnist-sym40", "fmnist-cd40")
# References per task. Image–text: "unseen" is trained on 1,500 clean pairs of emoji that are never
# in a pool (a reference that is weak on the pool: it cannot match a share of the clean pairs);
# "seen" is the demo's reference (demo/reference.safetensors, trained on the clean pairs of every
# emoji, like a web-scale CLIP that has seen the pool's concepts). Labelled: one small reference.
REFERENCES = {"contrastive": ("unseen", "seen"), "classify": ("ref76",)}
SEEN_POOLS = ("emoji-clean", "emoji-swap10", "emoji-swap30", "emoji-swap50", "emoji-swap70", "emoji-web40")
VARIANT_POOLS = {"unseen": ("emoji-clean", "emoji-swap30", "emoji-swap70", "emoji-web40"),
                 "seen": ("emoji-clean", "emoji-swap30", "emoji-web40")}
# Settings per task; the first is the task's defaults. A variant runs on the pools its list names
# (None: every pool; "variants": VARIANT_POOLS of the reference).
SETTINGS = {
    "contrastive": (
        (Setting("defaults", ()), None),
        (Setting("batch 64", ("--batch-size", "64"), "variant"), "variants"),
        (Setting("3 epochs", ("--epochs", "3"), "variant"), "variants"),
        (Setting("tau 1", ("--temperature", "1"), "candidate"), "variants"),
        (Setting("lr 1e-3", ("--lr", "1e-3"), "candidate"), "variants"),
        # 100x the default's travel per epoch: what a pool of 100x the steps does at lr 1e-4, roughly
        # (the emoji data cannot make a pool much larger than 1,200 pairs)
        (Setting("lr 1e-2", ("--lr", "1e-2"), "candidate"), "variants"),
    ),
    "classify": (
        # labelled data is scored over 3 epochs (docs/usage.md); the CLI's default of 1 is a variant.
        # The default lr is 3e-3 at batch 256 on 3,000 samples, scaled to the steps of an epoch (7.5e-4
        # at batch 64 or on 12,000 samples).
        (Setting("defaults, 3 epochs", ("--epochs", "3")), None),
        (Setting("batch 64, 3 epochs", ("--epochs", "3", "--batch-size", "64"), "variant"),
         ("fmnist-clean", "fmnist-sym40", "fmnist-cd40")),
        (Setting("defaults (1 epoch)", (), "variant"), ("fmnist-clean", "fmnist-sym40", "fmnist-cd40")),
        # the fixed lr 1e-3 that was the default before the suite chose the scaled 3e-3
        (Setting("lr 1e-3, 3 epochs", ("--epochs", "3", "--lr", "1e-3"), "candidate"), FMNIST_3K),
        (Setting("lr 1e-3, batch 64, 3 epochs", ("--epochs", "3", "--lr", "1e-3", "--batch-size", "64"), "candidate"),
         ("fmnist-clean", "fmnist-sym40", "fmnist-cd40")),
        (Setting("lr 1e-3 (1 epoch)", ("--lr", "1e-3"), "candidate"), ("fmnist-clean", "fmnist-sym40", "fmnist-cd40")),
        # 3e-3 not scaled with the batch size (1e-3 scaled with it, 2.5e-4 at batch 64, had a worst
        # case of 22.5 on the suite of commit beac639)
        (Setting("lr 3e-3, batch 64, 3 epochs", ("--epochs", "3", "--lr", "3e-3", "--batch-size", "64"), "candidate"),
         ("fmnist-clean", "fmnist-sym40", "fmnist-cd40")),
        (Setting("lr 1e-2, 3 epochs", ("--epochs", "3", "--lr", "1e-2"), "candidate"), ("fmnist-clean", "fmnist-cd40")),
        # the default before it followed the pool's size (the same lr on 3,000 samples)
        (Setting("lr 3e-3 unscaled, 3 epochs", ("--epochs", "3", "--lr", "3e-3"), "candidate"),
         tuple(name for name in POOL_SIZES if name != "fmnist-sym40-12k")),
        (Setting("tau 0.05, 3 epochs", ("--epochs", "3", "--temperature", "0.05"), "candidate"),
         ("fmnist-sym40", "fmnist-cd40")),
        (Setting("head+bias, 3 epochs", ("--epochs", "3", "--mimic-layers", "head+bias"), "candidate"), FMNIST_3K),
    ),
}


def runs_of(pools=POOLS) -> list[tuple[Pool, str, Setting]]:
    """(pool, reference, setting) for every run of the suite."""
    runs = []
    for pool in pools:
        for reference in REFERENCES[pool.task]:
            if reference == "seen" and pool.name not in SEEN_POOLS:
                continue
            for setting, only in SETTINGS[pool.task]:
                names = VARIANT_POOLS.get(reference, ()) if only == "variants" else only
                if names is None or pool.name in names:
                    runs.append((pool, reference, setting))
    return runs


# ------------------------------------------------------------------------------------------- emoji


def _pool_seed(seed: int, pool: Pool) -> int:
    return seed + int(hashlib.md5(pool.name.encode()).hexdigest()[:6], 16)


class EmojiData:
    """Rendered emoji, the reference split and a cached reference CLIP."""

    def __init__(self, out: Path, seed: int, threads: int):
        self.out, self.seed = out / "emoji", seed
        self.entries = imagetext.load_emoji()
        self.pictures = imagetext.render_all(self.entries, imagetext.IMAGE_SIZE)
        _, ref_split, self.candidates = imagetext.split(len(self.entries), 0, EMOJI_REF_SIZE, seed)
        self.reference = imagetext.Reference(self.out / "model", self.entries, self.pictures, ref_split,
                                             EMOJI_REF_STEPS, seed, threads)

    def pool(self, pool: Pool) -> tuple[Path, dict]:
        """Shards of the pool and its truth {"shard/key": clean}."""
        directory = self.out / "pools" / pool.name
        seed = _pool_seed(self.seed, pool)
        stamp = {"pool": pool.__dict__, "seed": seed, "size": EMOJI_POOL_SIZE, "candidates": digest(self.candidates)}
        truth_file = directory / "truth.json"
        if not stamped(truth_file, stamp):
            chosen = self._chosen(seed)
            kinds = ("swap",) if pool.kind == "swap" else imagetext.KINDS
            samples = imagetext.corrupt(chosen, self.entries, self.pictures, pool.noise, seed + 1, kinds=kinds)
            where = imagetext.write_pool(directory / "shards", samples, 4, pool.name)
            truth = {f"{shard}/{key}": not samples[position]["corrupted"] for (shard, key), position in where.items()}
            truth_file.write_text(json.dumps(truth))
            write_stamp(truth_file, stamp)
        return directory / "shards", json.loads(truth_file.read_text())

    def _chosen(self, seed: int) -> np.ndarray:
        return np.sort(np.random.default_rng(seed).permutation(self.candidates)[:EMOJI_POOL_SIZE])

    def trusted(self, pool: Pool) -> Path:
        """The pool's trusted sample: clean pairs of emoji the pool did not draw."""
        directory = self.out / "pools" / pool.name / "trusted"
        seed = _pool_seed(self.seed, pool)
        outside = np.setdiff1d(self.candidates, self._chosen(seed))
        stamp = {"pool": pool.__dict__, "seed": seed, "size": TRUSTED_SIZE, "outside": digest(outside)}
        marker = directory / "trusted.json"
        if not stamped(marker, stamp):
            picked = np.sort(np.random.default_rng(seed + 2).choice(outside, TRUSTED_SIZE, replace=False))
            samples = imagetext.corrupt(picked, self.entries, self.pictures, 0.0, seed + 3)
            imagetext.write_pool(directory, samples, 1, f"{pool.name}-trusted")
            marker.write_text(json.dumps({"samples": TRUSTED_SIZE}))
            write_stamp(marker, stamp)
        return directory

    def score_options(self, reference: str) -> list[str]:
        if reference == "seen":
            return ["--model", str(ROOT / "demo" / "tiny-clip.json"), "--reference", str(ROOT / "demo" / "reference.safetensors")]
        return self.reference.score_options()


# ---------------------------------------------------------------------------------- Fashion-MNIST


class FashionData:
    """Fashion-MNIST, the reference split and a cached reference (tower + linear head with a bias)."""

    def __init__(self, out: Path, seed: int, threads: int):
        self.out, self.seed = out / "fmnist", seed
        self.data = fmnist.load_fashion_mnist()
        order = np.random.default_rng(seed).permutation(len(self.data["train_labels"]))
        ref_idx, self.candidates = order[:FMNIST_REF_SIZE], order[FMNIST_REF_SIZE:]
        self.reference = fmnist.Reference(self.out / "model", self.data, ref_idx, FMNIST_REF_EPOCHS, seed, threads)
        self.accuracy = self.reference.accuracy

    def pool(self, pool: Pool) -> tuple[Path, dict]:
        directory = self.out / "pools" / pool.name
        seed = _pool_seed(self.seed, pool)
        size = POOL_SIZES.get(pool.name, FMNIST_POOL_SIZE)
        stamp = {"pool": pool.__dict__, "seed": seed, "size": size, "candidates": digest(self.candidates),
                 "similar": SIMILAR_CLASS}
        truth_file = directory / "truth.json"
        if not stamped(truth_file, stamp):
            rng = np.random.default_rng(seed)
            chosen = np.sort(rng.permutation(self.candidates)[:size])
            true = self.data["train_labels"][chosen].astype(np.int64)
            noisy = fmnist.flip_labels(true, pool.noise, pool.kind, rng, SIMILAR_CLASS)
            shutil.rmtree(directory / "shards", ignore_errors=True)
            where = fmnist.write_shards(directory / "shards", self.data["train_images"][chosen], true, noisy, noisy != true,
                                        4, seed)
            truth = {f"{shard}/{key}": bool(noisy[position] == true[position]) for (shard, key), position in where.items()}
            truth_file.write_text(json.dumps(truth))
            write_stamp(truth_file, stamp)
        return directory / "shards", json.loads(truth_file.read_text())

    def trusted(self, pool: Pool) -> Path:
        """The pool's trusted sample: correctly labelled images the pool did not draw."""
        directory = self.out / "pools" / pool.name / "trusted"
        seed = _pool_seed(self.seed, pool)
        size = POOL_SIZES.get(pool.name, FMNIST_POOL_SIZE)
        outside = np.setdiff1d(self.candidates, np.random.default_rng(seed).permutation(self.candidates)[:size])
        stamp = {"pool": pool.__dict__, "seed": seed, "size": TRUSTED_SIZE, "outside": digest(outside)}
        marker = directory / "trusted.json"
        if not stamped(marker, stamp):
            picked = np.sort(np.random.default_rng(seed + 2).choice(outside, TRUSTED_SIZE, replace=False))
            labels = self.data["train_labels"][picked].astype(np.int64)
            shutil.rmtree(directory, ignore_errors=True)
            fmnist.write_shards(directory, self.data["train_images"][picked], labels, labels,
                                np.zeros(len(picked), dtype=bool), 1, seed + 2)
            marker.write_text(json.dumps({"samples": TRUSTED_SIZE}))
            write_stamp(marker, stamp)
        return directory

    def score_options(self, reference: str) -> list[str]:
        return self.reference.score_options()


# ------------------------------------------------------------------------------------------ scoring


def relative_to_roots(argument: str, out: Path) -> str:
    """A command's argument with OUT and the checkout written as ``$OUT`` and ``$ROOT``."""
    return argument.replace(str(out.resolve()), "$OUT").replace(str(out), "$OUT").replace(str(ROOT), "$ROOT")


def file_digest(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def score(data, pool: Pool, reference: str, setting: Setting, out: Path, threads: int, seed: int,
          anchored: bool | None = None, name: str | None = None) -> dict:
    """Score the pool with `mimicfilter score` (skipped when the same command already finished); runs at
    the defaults and their variants carry the pool's trusted sample as anchors unless ``anchored`` says."""
    shards, truth = data.pool(pool)
    anchored = setting.role in ANCHORED_ROLES if anchored is None else anchored
    trusted = ["--trusted", str(data.trusted(pool))] if anchored else []
    run_dir = out / "runs" / slug(name or f"{pool.name}-{reference}-{setting.name}")
    command = mimicfilter_command() + ["score", str(shards), *trusted, *data.score_options(reference), "--seed", str(seed),
                                       "--workers", "0", "--threads", str(threads), "--quiet", "--json",
                                       "--overwrite", *setting.options, "--out", str(run_dir)]
    # the options left out take the task's defaults: a change of the defaults table scores again. Paths
    # are stamped relative to OUT and the checkout, files by their content (a reference trained again
    # scores again): a copied or moved OUT keeps its runs
    stamp = {"command": [relative_to_roots(arg, out) for arg in command[:-2]],
             "files": {relative_to_roots(arg, out): file_digest(Path(arg)) for arg in command[:-2] if Path(arg).is_file()},
             "truth": hashlib.md5(json.dumps(truth, sort_keys=True).encode()).hexdigest(),
             "task_defaults": dataclasses.asdict(TASK_DEFAULTS[pool.task])}
    wall = None
    if not (stamped(run_dir, stamp) and (run_dir / "_SUCCESS").exists()):
        started = time.time()
        done = subprocess.run(command, capture_output=True, text=True, env=thread_env(threads))
        if done.returncode != 0:
            sys.stderr.write(done.stdout + done.stderr)
            raise SystemExit(f"error: mimicfilter exited with {done.returncode}: {shlex.join(command)}")
        wall = time.time() - started
        write_stamp(run_dir, stamp)
    return {"run_dir": run_dir, "truth": truth, "command": shlex.join(command), "wall_s": wall, "anchored": anchored}
