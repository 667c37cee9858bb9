"""Write the demo's trusted sample: clean emoji pairs that are not in the demo pool, checked by construction.

`make demo` scores the pool with `--trusted demo/trusted`, so `filter` calibrates its quality estimate
against these pairs (docs/filter.md, "Calibrated curation"). They are drawn and written like the pool
(scripts/make_demo_data.py: the same emoji, rendering, JPEG quality and key scheme), from the emoji
the pool's seeded draw left out, so the pool stays byte for byte what it was.

Usage: python scripts/make_demo_trusted.py [--count 200] [--seed 0]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
from emoji_data import ensure_packages, load_emoji_names, render_emoji  # noqa: E402
from make_demo_data import IMAGE_SIZE, tar_bytes  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "demo" / "trusted")
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0, help="the demo pool's seed (make_demo_data.py --seed)")
    parser.add_argument("--pool-size", type=int, default=1024, help="the demo pool's size")
    args = parser.parse_args()
    ensure_packages()
    entries = load_emoji_names()
    pool = set(random.Random(args.seed).sample(range(len(entries)), args.pool_size))  # make_demo_data's draw
    outside = [index for index in range(len(entries)) if index not in pool]
    chosen = sorted(random.Random(f"trusted-{args.seed}").sample(outside, args.count))
    samples = []
    for index in chosen:
        key = f"{index:09d}"
        emoji, name = entries[index]
        jpeg = io.BytesIO()
        render_emoji(emoji, IMAGE_SIZE).save(jpeg, format="JPEG", quality=90)
        meta = {"uid": hashlib.sha256(key.encode()).hexdigest()[:32], "emoji": emoji, "caption": name, "checked": True}
        samples.append((key, {"jpg": jpeg.getvalue(), "txt": name.encode(),
                              "json": json.dumps(meta, ensure_ascii=False, sort_keys=True).encode()}))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "trusted-000000.tar").write_bytes(tar_bytes(samples))
    print(f"{len(samples)} trusted pairs -> {args.out / 'trusted-000000.tar'}")


if __name__ == "__main__":
    main()
