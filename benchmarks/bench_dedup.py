"""Near-duplicates planted in a real image–text pool: precision and recall of the pairs `mimicfilter
dedup` + `filter --dedup` find, per ε, at several planting rates, for --dedup-on pair and image.

    python benchmarks/bench_dedup.py                          # rates 0.05, 0.2, 0.4
    python benchmarks/bench_dedup.py --rates 0.2 --workdir W  # again: reuses W's model and pools

The pool: emoji of Unicode's emoji-test.txt drawn at 64 px with their CLDR names (Debian
``fonts-noto-color-emoji`` + ``unicode-data``), the ones a small CLIP was not trained on (it learns
the other ``--ref-size`` emoji from scratch, benchmarks/imagetext_data.py). For a rate r, r × N
pool samples get a near-duplicate each: the image JPEG re-encoded (quality 50–90), resized (40–120
px), cropped (80–95 % of each side, scaled back) or recoloured (brightness, contrast, saturation
±8–20 %), and half of them a caption variant as well (case and spacing). Besides: 2 % byte-identical
copies (exact duplicates: found by the content hashes); 2 % of the images again under another
emoji's caption — not a duplicate with ``pair`` (another training pair), a duplicate with
``image``; 2 % transformed images under a punctuation variant of the caption ("bathtub!",
"flag - Togo") and 2 % under a reworded one ("a picture of …", "… emoji", "… icon"): duplicates
with ``image``, neither counted as found nor as missed with ``pair`` (the share of them found is
printed apart) — the small CLIP's text tower never saw punctuation ("bathtub!" lies at cosine 0.3
from "bathtub"), so to it they are other captions.

A pair of samples is a *true* duplicate when both come from the same pool emoji (and, with
``pair``, neither is a re-captioned copy). Found pairs: every pair of samples in one group of
``filter --dedup`` at ε (groups are connected components, so a group of k counts k(k−1)/2 pairs).
Precision = true found / found, recall = true found / true. Pairs of distinct emoji that the
groups join (skin-tone variants, near-identical signs) are false positives. With ``pair`` each
``--caption-factor`` is tried.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

import common
import imagetext_data as it
from common import ROOT, print_table

EPSILONS = (0.01, 0.02, 0.05, 0.075, 0.1, 0.15, 0.2, 0.25, 0.3)
CAPTION_FACTORS = (1.0, 0.1, 0.05, 0.02)
CAPTION_VARIANTS = (str.lower, str.upper, str.capitalize, str.title, lambda c: c.replace(" ", "  "),
                    lambda c: " " + c.upper())
PUNCTUATION = (lambda c: c + ".", lambda c: c + "!", lambda c: c.replace(":", " -"), lambda c: c.replace(",", ";"))
PARAPHRASES = (lambda c: "a picture of " + c, lambda c: c + " emoji", lambda c: c + " icon")
UNCOUNTED_WITH_PAIR = ("other-caption", "punctuation", "paraphrase")  # other captions to this reference


def transform(image: np.ndarray, rng: np.random.Generator) -> tuple[bytes, str, str]:
    """A near-duplicate of a 64-px RGB image: (file bytes, extension, what was done)."""
    from PIL import Image, ImageEnhance

    picture = Image.fromarray(image)
    kind = ("jpeg", "resize", "crop", "recolour")[int(rng.integers(4))]
    if kind == "resize":
        side = int(rng.choice([40, 48, 80, 96, 120]))
        picture = picture.resize((side, side), Image.Resampling.BICUBIC)
    elif kind == "crop":
        width, height = picture.size
        keep_w, keep_h = (int(round(side * rng.uniform(0.8, 0.95))) for side in (width, height))
        left, top = int(rng.integers(0, width - keep_w + 1)), int(rng.integers(0, height - keep_h + 1))
        picture = picture.crop((left, top, left + keep_w, top + keep_h)).resize((width, height), Image.Resampling.BICUBIC)
    elif kind == "recolour":
        for enhancer in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
            picture = enhancer(picture).enhance(1 + rng.choice([-1, 1]) * rng.uniform(0.08, 0.2))
    buffer = io.BytesIO()
    if kind == "jpeg":
        picture.save(buffer, format="JPEG", quality=int(rng.integers(50, 91)))
        return buffer.getvalue(), "jpg", kind
    picture.save(buffer, format="PNG")
    return buffer.getvalue(), "png", kind


def planted_pool(pool: np.ndarray, entries, pictures: np.ndarray, rate: float, seed: int) -> list[dict]:
    """The pool's samples, then the planted ones: each with its origin (pool emoji) and kind."""
    rng = np.random.default_rng(seed)
    samples = [{"origin": int(i), "kind": "original", "png": common.png_bytes(pictures[i]), "caption": entries[i][1]}
               for i in pool]
    count = len(pool)
    for position in rng.choice(count, int(round(rate * count)), replace=False):
        origin = int(pool[position])
        data, ext, kind = transform(pictures[origin], rng)
        caption = entries[origin][1]
        if rng.random() < 0.5:
            caption = CAPTION_VARIANTS[int(rng.integers(len(CAPTION_VARIANTS)))](caption)
            kind += "+caption"
        samples.append({"origin": origin, "kind": kind, ext: data, "caption": caption})
    for position in rng.choice(count, int(round(0.02 * count)), replace=False):
        samples.append({**samples[position], "kind": "exact"})
    for position in rng.choice(count, int(round(0.02 * count)), replace=False):
        other = int(pool[(position + 1 + int(rng.integers(count - 1))) % count])
        samples.append({**samples[position], "kind": "other-caption", "caption": entries[other][1]})
    for kind, variants in (("punctuation", PUNCTUATION), ("paraphrase", PARAPHRASES)):
        for position in rng.choice(count, int(round(0.02 * count)), replace=False):
            origin = int(pool[position])
            data, ext, _ = transform(pictures[origin], rng)
            caption = variants[int(rng.integers(len(variants)))](entries[origin][1])
            samples.append({"origin": origin, "kind": kind, ext: data, "caption": caption})
    order = rng.permutation(len(samples))  # copies spread over the shards, not beside their originals
    return [samples[i] for i in order]


def write_shards(directory: Path, samples: list[dict], shards: int) -> dict[str, int]:
    def files(position: int) -> dict[str, bytes]:
        sample = samples[position]
        image = {ext: sample[ext] for ext in ("png", "jpg") if ext in sample}
        return {**image, "txt": sample["caption"].encode(),
                "json": json.dumps({"uid": hashlib.md5(f"dedup-{position}".encode()).hexdigest()}).encode()}

    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    where = common.write_pool(directory, len(samples), shards, "planted", files)
    return {key: position for (_, key), position in where.items()}


def true_pairs(samples: list[dict], on: str) -> set[tuple[int, int]]:
    by_origin: dict[int, list[int]] = {}
    for position, sample in enumerate(samples):
        if on == "image" or sample["kind"] not in UNCOUNTED_WITH_PAIR:
            by_origin.setdefault(sample["origin"], []).append(position)
    return {(a, b) for members in by_origin.values() for i, a in enumerate(members) for b in members[i + 1:]}


def scores(found: set, truth: set, ignored: set[int]) -> tuple[float, float, int]:
    """Precision, recall and the pairs found, leaving out pairs with an ``ignored`` sample."""
    found = {pair for pair in found if not ignored.intersection(pair)}
    hit = len(found & truth)
    return (hit / len(found) if found else 1.0), (hit / len(truth) if truth else 1.0), len(found)


def share_found(samples: list[dict], found: set, kind: str) -> float:
    """Share of the samples of ``kind`` grouped with their emoji's original."""
    original = {sample["origin"]: position for position, sample in enumerate(samples) if sample["kind"] == "original"}
    pairs = [tuple(sorted((original[sample["origin"]], position))) for position, sample in enumerate(samples)
             if sample["kind"] == kind]
    return sum(pair in found for pair in pairs) / len(pairs) if pairs else 1.0


def filter_groups(run: Path, pairs: Path, epsilon: float, where: dict[str, int]) -> set[tuple[int, int]]:
    """Pairs within the groups `filter --dedup` forms at ``epsilon`` (every member, kept or dropped)."""
    out = run.parent / f"filter-{pairs.name}-{epsilon:g}"
    common.run_cli([*common.mimicfilter_command(), "filter", str(run), "--dedup", "--dedup-from", str(pairs),
                    "--dedup-threshold", str(epsilon), "--out", str(out), "--json"])
    import pyarrow.parquet as pq

    manifest = pq.read_table(out / "manifest.parquet", columns=["key", "duplicate_group"]).to_pylist()
    shutil.rmtree(out)
    groups: dict[int, list[int]] = {}
    for row in manifest:
        if row["duplicate_group"] is not None:
            groups.setdefault(row["duplicate_group"], []).append(where[row["key"]])
    return {tuple(sorted((a, b))) for members in groups.values() for i, a in enumerate(members) for b in members[i + 1:]}


def cosines(run: Path, samples: list[dict], where: dict[str, int]) -> list[list]:
    """Median image and caption cosines of each planted kind to its original (from the saved embeddings)."""
    from mimicfilter.store.parts import read_scores

    table = read_scores(run, ["key", "embedding", "text_embedding"]).to_pydict()
    vectors = {where[key]: (np.asarray(image, float), np.asarray(text, float))
               for key, image, text in zip(table["key"], table["embedding"], table["text_embedding"]) if image is not None}
    original = {sample["origin"]: position for position, sample in enumerate(samples) if sample["kind"] == "original"}
    by_kind: dict[str, list] = {}
    for position, sample in enumerate(samples):
        if sample["kind"] != "original" and position in vectors:
            image, text = vectors[position]
            base_image, base_text = vectors[original[sample["origin"]]]
            by_kind.setdefault(sample["kind"], []).append((image @ base_image, text @ base_text))
    return [[kind, len(values), float(np.median([v[0] for v in values])), float(np.quantile([v[0] for v in values], 0.05)),
             float(np.median([v[1] for v in values]))] for kind, values in sorted(by_kind.items())]


def one_rate(args, rate: float, entries, pictures, pool, reference, work: Path) -> dict:
    samples = planted_pool(pool, entries, pictures, rate, args.seed + int(rate * 1000))
    directory = work / f"rate-{rate:g}"
    where = write_shards(directory / "shards", samples, args.shards)
    run = directory / "run"
    shutil.rmtree(run, ignore_errors=True)
    env = common.thread_env(args.threads)
    started = time.time()
    common.run_cli([*common.mimicfilter_command(), "score", *sorted(map(str, (directory / "shards").glob("*.tar"))),
                    *reference.score_options(), "--train", "none", "--save-embeddings", "--batch-size", "256",
                    "--workers", "1", "--out", str(run), "--json"], env)
    score_s = time.time() - started
    result = {"rate": rate, "samples": len(samples), "score_s": score_s, "cosines": cosines(run, samples, where)}
    exact = common.run_cli([*common.mimicfilter_command(), "filter", str(run), "--dry-run", "--json"])[0]
    planted_exact = sum(sample["kind"] == "exact" for sample in samples)
    result["exact"] = {"planted_copies": planted_exact, **exact["duplicates"]["content"]}
    uncounted = {position for position, sample in enumerate(samples) if sample["kind"] in UNCOUNTED_WITH_PAIR[1:]}
    for on, factor in [("pair", factor) for factor in CAPTION_FACTORS] + [("image", 1.0)]:
        name = on if on == "image" else f"pair-{factor:g}"
        pairs = directory / f"dedup-{name}"
        stats, seconds = common.run_cli([*common.mimicfilter_command(), "dedup", str(run), "--dedup-on", on, "--out",
                                         str(pairs), "--caption-factor", str(factor), "--max-threshold",
                                         str(max(EPSILONS)), "--json", "--overwrite",
                                         *args.dedup_options], env)
        truth = true_pairs(samples, on)
        rows = []
        for epsilon in EPSILONS:
            found = filter_groups(run, pairs, epsilon, where)
            precision, recall, count = scores(found, truth, uncounted if on == "pair" else set())
            rows.append({"epsilon": epsilon, "precision": precision, "recall": recall, "found": count,
                         "true": len(truth), **{f"{kind}_found": share_found(samples, found, kind)
                                                for kind in UNCOUNTED_WITH_PAIR[1:]}})
        result[name] = {"dedup_s": seconds, "edges": stats["edges"], "cells": stats["cells"], "by_epsilon": rows}
    return result


def report(results: list[dict]) -> None:
    for result in results:
        print_table(f"rate {result['rate']:g}: {result['samples']} samples; median cosine of each planted kind to its "
                    "original", ["kind", "copies", "image cos (median)", "image cos (5th pct)", "caption cos (median)"],
                    result["cosines"])
        exact = result["exact"]
        print(f"exact duplicates: {exact['planted_copies']} byte-identical copies planted; the content hashes group "
              f"{exact['samples']} samples in {exact['groups']} groups")
        for name in [f"pair-{factor:g}" for factor in CAPTION_FACTORS] + ["image"]:
            rows = [[f"{row['epsilon']:g}", row["precision"], row["recall"], row["found"], row["true"],
                     row["punctuation_found"], row["paraphrase_found"]] for row in result[name]["by_epsilon"]]
            what = "--dedup-on image" if name == "image" else f"--dedup-on pair --caption-factor {name[5:]}"
            print_table(f"rate {result['rate']:g}, {what} (dedup {result[name]['dedup_s']:.1f} s, "
                        f"{result[name]['cells']} cell(s), {result[name]['edges']} edges kept)",
                        ["epsilon", "precision", "recall", "pairs found", "true pairs", "punctuation found",
                         "paraphrases found"], rows)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rates", default="0.05,0.2,0.4", help="shares of the pool given a near-duplicate")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2, help="torch threads here and in every CLI process")
    parser.add_argument("--ref-size", type=int, default=1500, help="emoji the reference CLIP trains on (not in the pool)")
    parser.add_argument("--ref-steps", type=int, default=700, help="reference training steps")
    parser.add_argument("--workdir", type=Path, default=None, help="[bench-runs/dedup]")
    parser.add_argument("--json-out", type=Path, default=None, help="also write the results here")
    parser.add_argument("dedup_options", nargs="*", help="more `mimicfilter dedup` options, after -- (e.g. --cell-size 256)")
    args = parser.parse_args(argv)
    args.rates = [float(rate) for rate in args.rates.split(",")]
    args.workdir = args.workdir or ROOT / "bench-runs" / "dedup"
    return args


def emoji_reference(args):
    """The emoji, their 64-px pictures, the pool (emoji the reference never saw) and the reference CLIP
    (trained on the others, or loaded when the same one is in --workdir)."""
    import logging

    import torch

    logging.getLogger().setLevel(logging.ERROR)  # open_clip's "no pretrained weights": intended
    torch.set_num_threads(args.threads)
    entries = it.load_emoji()
    pictures = it.render_all(entries, it.IMAGE_SIZE)
    _, ref_split, pool = it.split(len(entries), 0, args.ref_size, args.seed)
    return entries, pictures, pool, it.Reference(args.workdir / "emoji-model", entries, pictures, ref_split,
                                                 args.ref_steps, args.seed, args.threads)


def main(argv=None) -> None:
    args = parse_args(argv)
    entries, pictures, pool, reference = emoji_reference(args)
    load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    print(f"pool: {len(pool)} emoji the reference never saw; {load}", flush=True)
    results = [one_rate(args, rate, entries, pictures, pool, reference, args.workdir) for rate in args.rates]
    report(results)
    print(f"\n{subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}")
    if args.json_out:
        args.json_out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    sys.exit(main())
