"""What the benchmark scripts share: running the real CLI, writing WebDataset shards, cached
artefacts, tables, and the Fashion-MNIST class maps.

The scripts run as ``python benchmarks/NAME.py``, so this folder is first on ``sys.path`` and they
import each other's library modules by name (``from common import ...``). This module also makes
``scripts/`` importable (the emoji data and the demo's CLIP builder, shared with
scripts/make_demo_data.py): the one place a benchmark touches ``sys.path``.

Nothing here does any work at import: the test suite imports every benchmark
(tests/test_benchmarks.py).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shlex
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "scripts"
# the bundled demo model: a tiny CLIP and its reference checkpoint, as `score` options
DEMO_MODEL = ["--model", str(ROOT / "demo" / "tiny-clip.json"), "--reference", str(ROOT / "demo" / "reference.safetensors")]
if str(SCRIPTS) not in sys.path:
    sys.path.append(str(SCRIPTS))

# Fashion-MNIST classes: 0 T-shirt/top, 1 Trouser, 2 Pullover, 3 Dress, 4 Coat, 5 Sandal, 6 Shirt, 7 Sneaker,
# 8 Bag, 9 Ankle boot. "Class-dependent" label noise sends every flipped label of a class to one other class.
# The validation suite's map (benchmarks/defaults_suite.py: the pools the filter's defaults are chosen on,
# benchmarks/bench_defaults.py): T-shirt <-> Shirt, Pullover <-> Coat, Sandal -> Sneaker -> Ankle boot ->
# Sandal, Dress -> T-shirt, Trouser -> Dress, Bag -> Pullover.
SIMILAR_CLASS = {0: 6, 6: 0, 2: 4, 4: 2, 5: 7, 7: 9, 9: 5, 3: 0, 1: 3, 8: 2}
# The Stage 1 training benchmark's map (benchmarks/stage1_labelled.py, docs/training.md): the same but
# for Ankle boot -> Sneaker (not Sandal) and Bag -> Shirt (not Pullover).
STAGE1_SIMILAR_CLASS = {0: 6, 1: 3, 2: 4, 3: 0, 4: 2, 5: 7, 6: 0, 7: 9, 8: 6, 9: 7}


# ------------------------------------------------------------------------------------- the CLI


def mimicfilter_command() -> list[str]:
    """The installed ``mimicfilter`` beside this Python, or ``python -m mimicfilter``."""
    beside = Path(sys.executable).with_name("mimicfilter")
    return [str(beside)] if beside.exists() else [sys.executable, "-m", "mimicfilter"]


def run_cli(command: list[str], env: dict[str, str] | None = None) -> tuple[dict, float]:
    """Run a ``mimicfilter ... --json`` command; its JSON output and wall seconds. A failure ends the
    benchmark with the command's own output."""
    started = time.time()
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    elapsed = time.time() - started
    if done.returncode != 0:
        sys.stderr.write(done.stdout + done.stderr)
        raise SystemExit(f"error: mimicfilter exited with {done.returncode}: {shlex.join(command)}")
    return json.loads(done.stdout), elapsed


def thread_env(threads: int) -> dict[str, str]:
    """The environment of a CLI process limited to ``threads`` OpenMP/MKL threads."""
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


def idle_cores() -> int:
    """The cores the load average leaves free, at least 1: two processes each using every core slow
    torch down many times over."""
    cores = os.cpu_count() or 1
    return max(1, min(cores, cores - int(round(os.getloadavg()[0]))))


# ----------------------------------------------------------------------------------- shards


def write_tar(path: Path, samples: Iterable[tuple[str, dict[str, bytes]]], owner: str = "") -> Path:
    """A WebDataset shard: member ``KEY.EXT`` for every file of every sample, in the order given.

    Deterministic bytes: ustar headers with mtime 0, mode 0644 and uid 0, so the same samples always
    give the same file. ``owner`` is the user and group name in the headers (the emoji pools name
    root, like the demo's shards: their bytes stay what they were)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for key, files in samples:
            for ext, payload in files.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime, info.mode, info.uname, info.gname = len(payload), 0, 0o644, owner, owner
                tar.addfile(info, io.BytesIO(payload))
    return path


def write_pool(directory: Path, count: int, shards: int, prefix: str, files, owner: str = "") -> dict[tuple[str, str], int]:
    """Pool positions 0 .. count-1 in order over ``shards`` tars ``PREFIX-00000.tar``, ...: a sample's key is
    its position (6 digits), its files ``files(position)``. Returns (shard file name, key) -> position."""
    where = {}
    per_shard = -(-count // shards)
    for shard in range(shards):
        name = f"{prefix}-{shard:05d}.tar"
        positions = range(shard * per_shard, min(count, (shard + 1) * per_shard))
        write_tar(directory / name, ((f"{position:06d}", files(position)) for position in positions), owner)
        where.update({(name, f"{position:06d}"): position for position in positions})
    return where


def png_bytes(image: np.ndarray, mode: str | None = None) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image, mode=mode).save(buffer, format="PNG")
    return buffer.getvalue()


def demo_pool(directory: Path, count: int, per_shard: int) -> list[Path]:
    """``count`` shards of ``per_shard`` real image–caption pairs: the bundled demo's emoji, re-keyed
    and repeated as needed."""
    source: dict[str, dict[str, bytes]] = {}
    for shard in sorted((ROOT / "demo" / "shards").glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                key, _, ext = member.name.partition(".")
                source.setdefault(f"{shard.name}/{key}", {})[ext] = tar.extractfile(member).read()
    samples = list(source.values())
    return [write_tar(directory / f"pool-{number:05d}.tar",
                      ((f"{number:05d}{index:06d}", samples[(number * per_shard + index) % len(samples)])
                       for index in range(per_shard)))
            for number in range(count)]


def scores_by_position(run_dir: Path, where: dict, n: int, columns: list[str]) -> dict[str, np.ndarray]:
    """A score run's ``columns`` as [epoch, pool position] arrays (``where``: (shard file name, key) ->
    position). Every row must be ok, and every sample scored exactly once in every epoch."""
    from mimicfilter.store.parts import read_scores

    table = read_scores(run_dir, ["shard", "key", "epoch", "status", *columns]).to_pydict()
    if set(table["status"]) != {"ok"}:
        raise RuntimeError(f"{run_dir}: rows with status {set(table['status']) - {'ok'}}")
    epochs = sorted(set(table["epoch"]))
    values = {name: np.full((len(epochs), n), np.nan) for name in columns}
    for row in range(len(table["key"])):
        position = where[(Path(table["shard"][row]).name, table["key"][row])]
        epoch = epochs.index(table["epoch"][row])
        for name in columns:
            values[name][epoch, position] = table[name][row]
    if len(table["key"]) != len(epochs) * n or any(np.isnan(v).any() for v in values.values()):
        raise RuntimeError(f"{run_dir}: not every sample scored exactly once in every epoch")
    return values


# ------------------------------------------------------------------------- cached artefacts


def digest(*arrays: np.ndarray) -> str:
    return hashlib.md5(b"".join(np.ascontiguousarray(a).tobytes() for a in arrays)).hexdigest()


def stamped(path: Path, stamp: dict) -> bool:
    """Whether ``path`` exists and was made from ``stamp`` (kept in ``PATH.stamp.json``)."""
    stamp_file = path.with_name(path.name + ".stamp.json")
    # compared as JSON reads it back (dict keys become strings): otherwise a stamp with int keys never
    # matches, and the pool would be rewritten under runs that are reading it
    return path.exists() and stamp_file.exists() and json.loads(stamp_file.read_text()) == json.loads(json.dumps(stamp))


def write_stamp(path: Path, stamp: dict) -> None:
    path.with_name(path.name + ".stamp.json").write_text(json.dumps(stamp, indent=1))


def save_state_dict(model, path: Path) -> None:
    """A model's weights as safetensors (for ``--reference``)."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(path))


def save_head(head, scale: float, path: Path) -> None:
    """A linear classification head for ``--reference-head``: {weight [C, D], bias [C], logit_scale}."""
    import torch

    torch.save({"weight": head.weight.detach().clone(), "bias": head.bias.detach().clone(),
                "logit_scale": torch.tensor(scale)}, path)


# ----------------------------------------------------------------------------------- tables


def fmt(value) -> str:
    if isinstance(value, float):
        return "nan" if np.isnan(value) else f"{value:.3f}"
    return str(value)


def md_table(title: str, header: list[str], rows: list[list]) -> str:
    """A markdown table under a ``###`` title; floats to 3 decimals."""
    lines = [f"### {title}", "", "| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def print_table(title: str, header: list[str], rows: list[list]) -> None:
    """A plain-text table on stdout; floats to 3 decimals, the first column left-aligned."""
    cells = [[str(c) for c in header]] + [[f"{c:.3f}" if isinstance(c, float) else str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    print(f"\n{title}")
    line = "  ".join("-" * w for w in widths)
    print(line)
    for index, row in enumerate(cells):
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
        if index == 0:
            print(line)
    print(line)


def quick_or_full(args, quick: bool, defaults: dict[str, tuple]) -> None:
    """Fill the options left unset (None or 0) from {option: (its --quick value, its full-run value)}."""
    for name, (short, full) in defaults.items():
        if not getattr(args, name):
            setattr(args, name, short if quick else full)


def slug(text: str) -> str:
    """A file name for a run or setting: alphanumerics, dots and dashes kept, the rest dashes."""
    return "".join(c if c.isalnum() or c in ".-" else "-" for c in text).strip("-")


def json_arguments(args) -> dict:
    """An argparse namespace as JSON-ready values (paths as strings)."""
    return {key: (str(value) if isinstance(value, Path) else value) for key, value in vars(args).items()}
