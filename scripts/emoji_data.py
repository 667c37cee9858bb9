"""Emoji images with their CLDR names: a small real image–text dataset from two Debian packages.

* ``fonts-noto-color-emoji``: /usr/share/fonts/truetype/noto/NotoColorEmoji.ttf (SIL OFL 1.1)
* ``unicode-data``: /usr/share/unicode/emoji/emoji-test.txt (© Unicode, Inc.; Unicode License for
  data files, "Unicode License v3" in Unicode's current terms)

Rendering needs Pillow's raqm layout (``PIL.features.check("raqm")``; the PyPI wheels have it once
Debian's ``libfribidi0`` is installed): without it ZWJ sequences and flags are drawn as several
glyphs side by side.

Used by scripts/make_demo_data.py and the quality benchmarks.
"""

from __future__ import annotations

import ctypes.util
import os
import sys
import warnings
from functools import lru_cache
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont, features

import debian_packages

FONT_PATH = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
EMOJI_TEST_PATH = Path("/usr/share/unicode/emoji/emoji-test.txt")
PACKAGES = ("fonts-noto-color-emoji", "unicode-data")
FONT_SIZE = 109  # a bitmap font: 109 is the only size it has


def missing_packages() -> list[str]:
    """The Debian packages this module needs that are not installed."""
    missing = [package for package, path in zip(PACKAGES, (FONT_PATH, EMOJI_TEST_PATH)) if not path.exists()]
    # Pillow's wheels carry libraqm but load libfribidi from the system; without it no raqm layout
    if not features.check("raqm") and ctypes.util.find_library("fribidi") is None:
        missing.append("libfribidi0")
    return missing


def ensure_packages() -> None:
    """Install the missing Debian packages (as root); otherwise exit saying what to install.

    Pillow looks for libfribidi only when it starts, so after installing libfribidi0 the running
    program is started again (same command line).
    """
    missing = missing_packages()
    if not missing:
        return
    debian_packages.install(missing, "the emoji images and their names")
    if "libfribidi0" in missing:
        os.execv(sys.executable, sys.orig_argv)


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
    if not features.check("raqm"):
        warnings.warn("Pillow lacks libraqm: ZWJ emoji and flags will render as separate glyphs", stacklevel=3)
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
