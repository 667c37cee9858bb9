"""Peak memory of `mimicfilter score` on decompression-bomb-like images, whole process tree.

Writes a shard of five 9400x9400 PNGs (just under Pillow's 89.5-megapixel bomb limit, so they are
decoded, not refused; a few hundred KB each on disk), RGB and RGBA, and scores each with the demo
model at default settings in a fresh process. Beside it, a plain script decodes the same images the
way any loader would (PIL open → RGB on white → resize). Every 20 ms it samples the process tree's
memory: the sum of RSS (pages shared by forked workers counted in each) and the sum of PSS (shared
pages split between the processes that map them). Target: the tree's peak ≤ 2 GB.

    python benchmarks/bench_hostile_memory.py [--images 5] [--side 9400] [--rounds 1]
"""

from __future__ import annotations

import argparse
import io
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import DEMO_MODEL, mimicfilter_command, write_tar

PLAIN_LOADER = """
import io, sys, tarfile
from PIL import Image
Image.MAX_IMAGE_PIXELS = None
with tarfile.open(sys.argv[1]) as tar:
    for member in tar:
        if member.name.endswith(".png"):
            image = Image.open(io.BytesIO(tar.extractfile(member).read())).convert("RGBA")
            white = Image.new("RGBA", image.size, (255, 255, 255, 255))
            Image.alpha_composite(white, image).convert("RGB").resize((224, 224), Image.BICUBIC)
"""


def write_bomb_shard(path: Path, mode: str, images: int, side: int) -> Path:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new(mode, (side, side), (200, 30, 30, 128)[: len(mode)]).save(buffer, "PNG")
    return write_tar(path, ((f"{index:04d}", {"png": buffer.getvalue(), "txt": b"a red square"}) for index in range(images)))


def _tree(pid: int) -> list[int]:
    found = [pid]
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            for child in (task / "children").read_text().split():
                found += _tree(int(child))
    except OSError:
        pass
    return found


def _kib(path: str, field: str) -> int:
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def peak_memory_mib(command: list[str]) -> tuple[int, float, float]:
    """(exit status, peak tree RSS, peak tree PSS) of ``command``, sampled every 20 ms."""
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    rss = pss = 0
    while process.poll() is None:
        pids = _tree(process.pid)
        rss = max(rss, sum(_kib(f"/proc/{pid}/status", "VmRSS") for pid in pids))
        pss = max(pss, sum(_kib(f"/proc/{pid}/smaps_rollup", "Pss") for pid in pids))
        time.sleep(0.02)
    if process.returncode:
        sys.stderr.write(process.stderr.read().decode()[-2000:])
    return process.returncode, rss / 1024, pss / 1024


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=5)
    parser.add_argument("--side", type=int, default=9400)
    parser.add_argument("--rounds", type=int, default=1, help="alternating rounds of mimicfilter and the plain script")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-hostile-") as scratch:
        for mode in ("RGB", "RGBA"):
            shard = write_bomb_shard(Path(scratch) / f"bomb-{mode}.tar", mode, args.images, args.side)
            score = [*mimicfilter_command(), "score", str(shard), *DEMO_MODEL, "--out", str(Path(scratch) / f"run-{mode}"),
                     "--overwrite", "--quiet"]
            plain = [sys.executable, "-c", PLAIN_LOADER, str(shard)]
            for round_number in range(args.rounds):
                for name, command in (("mimicfilter score", score), ("plain PIL loader", plain)):
                    status, rss, pss = peak_memory_mib(command)
                    print(f"{mode:4s} round {round_number}  {name:17s} exit {status}  "
                          f"peak tree RSS {rss:6.0f} MiB  PSS {pss:6.0f} MiB")


if __name__ == "__main__":
    main()
