"""Counting a pool's samples from tar headers (what `score` does before a classification trajectory
whose default lr follows the pool's size) against a plain tarfile loop written here.

    python benchmarks/bench_count.py [--samples 100000] [--rounds 3]

Builds one local tar of two-file samples (a 12 kB "image" and a caption) in a temporary directory,
then times, alternating, mimicfilter's count (`shards.samples.count_shard_samples`: the 512-byte headers
parsed directly, seeking over the data) and the plain way (`tarfile.open(path)` and a loop over its
members), each in the page cache; prints the best round of each and the ratio.
"""

from __future__ import annotations

import argparse
import os
import tarfile
import tempfile
import time
from pathlib import Path

from common import write_tar
from mimicfilter.shards.samples import count_shard_samples


def write_pool(path: Path, samples: int) -> None:
    image, caption = os.urandom(12_000), b"a photo of something"
    write_tar(path, ((f"{index:09d}", {"jpg": image, "txt": caption}) for index in range(samples)))


def plain_count(path: Path) -> int:
    """The plain way: tarfile's members, grouped by key as webdataset does."""
    keys = set()
    with tarfile.open(path) as tar:
        for member in tar:
            if member.isreg() and "." in member.name:
                keys.add(member.name.split(".", 1)[0])
    return len(keys)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "pool.tar"
        write_pool(path, args.samples)
        path.read_bytes()  # into the page cache for both
        times: dict[str, list[float]] = {"mimicfilter count_shard_samples": [], "plain tarfile loop": []}
        for _ in range(args.rounds):
            for name, count in (("mimicfilter count_shard_samples", lambda: count_shard_samples(str(path))),
                                ("plain tarfile loop", lambda: plain_count(path))):
                started = time.perf_counter()
                assert count() == args.samples
                times[name].append(time.perf_counter() - started)
        size = path.stat().st_size / 1e9
    print(f"{args.samples:,} two-file samples, {size:.2f} GB, page cache, best of {args.rounds} alternating rounds:")
    for name, values in times.items():
        print(f"  {name:34s} {min(values):6.2f} s  ({min(values) / args.samples * 1e6:.1f} s per million samples)")
    ours, plain = min(times["mimicfilter count_shard_samples"]), min(times["plain tarfile loop"])
    print(f"  plain / mimicfilter: {plain / ours:.1f}x")


if __name__ == "__main__":
    main()
