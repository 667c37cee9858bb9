"""Emoji images with their CLDR names: a small real image–text dataset from two Debian packages.

* ``fonts-noto-color-emoji``: /usr/share/fonts/truetype/noto/NotoColorEmoji.ttf (SIL OFL 1.1)
* ``unicode-data``: /usr/share/unicode/emoji/emoji-test.txt (Unicode License v3)

Used by scripts/make_demo_data.py and the quality benchmarks.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

FONT_PATH = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
EMOJI_TEST_PATH = Path("/usr/share/unicode/emoji/emoji-test.txt")
PACKAGES = ("fonts-noto-color-emoji", "unicode-data")
FONT_SIZE = 109  # a bitmap font: 109 is the only size it has


def ensure_packages() -> None:
    """Install the Debian packages when missing (as root); otherwise say what to install."""
    if FONT_PATH.exists() and EMOJI_TEST_PATH.exists():
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        sys.exit(f"error: install the Debian packages {' '.join(PACKAGES)} (apt-get install {' '.join(PACKAGES)})")
    subprocess.run(["apt-get", "update", "-qq"], check=True)
    subprocess.run(["apt-get", "install", "-y", "-qq", *PACKAGES], check=True)


def load_emoji_names(path: Path = EMOJI_TEST_PATH) -> list[tuple[str, str]]:
    """(emoji, CLDR name) for every fully-qualified entry, e.g. ('😀', 'grinning face')."""
    entries = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if "; fully-qualified" not in line or "#" not in line:
            continue
        comment = line.split("#", 1)[1].strip()  # "😀 E1.0 grinning face"
        emoji, _version, name = comment.split(" ", 2)
        entries.append((emoji, name))
    return entries


@lru_cache(maxsize=1)
def _font() -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(str(FONT_PATH), FONT_SIZE)


def render_emoji(emoji: str, size: int) -> Image.Image:
    """The emoji drawn in colour, cropped to its glyph, on white, as a ``size``×``size`` RGB image."""
    canvas = Image.new("RGBA", (160, 160), (255, 255, 255, 0))
    ImageDraw.Draw(canvas).text((8, 8), emoji, font=_font(), embedded_color=True)
    box = canvas.getbbox() or (0, 0, 160, 160)
    glyph = canvas.crop(box)
    side = max(glyph.size)
    square = Image.new("RGBA", (side, side), (255, 255, 255, 0))
    square.paste(glyph, ((side - glyph.width) // 2, (side - glyph.height) // 2))
    white = Image.new("RGBA", square.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, square).convert("RGB").resize((size, size), Image.Resampling.LANCZOS)
