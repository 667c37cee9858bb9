"""A PNG of a report page as headless Chromium shows it (the README's screenshot is made with this).

Usage: python scripts/report_screenshot.py REPORT/index.html OUT.png [--width 1100] [--height 1500] [--scale 0.75]

--width is the browser's viewport in CSS pixels, --height crops the page from the top (0: all of
it), --scale resizes the picture; the result is quantised to 256 colours to stay small.
Needs Debian's chromium and chromium-driver, and selenium (the dev extra).
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from browser import chromium, full_page_png, missing_browser, open_page  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("page", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--width", type=int, default=1100)
    parser.add_argument("--height", type=int, default=1500)
    parser.add_argument("--scale", type=float, default=0.75)
    parser.add_argument("--mobile", action="store_true", help="emulate a phone (the viewport meta tag applies)")
    args = parser.parse_args()
    if missing := missing_browser():
        print(f"report_screenshot: {', '.join(missing)} missing (apt-get install chromium chromium-driver)", file=sys.stderr)
        return 2
    from PIL import Image

    with chromium() as driver:
        open_page(driver, args.page.resolve().as_uri(), args.width, mobile=args.mobile)
        picture = Image.open(io.BytesIO(full_page_png(driver))).convert("RGB")
    if args.height:
        picture = picture.crop((0, 0, picture.width, min(args.height, picture.height)))
    if args.scale != 1:
        size = (round(picture.width * args.scale), round(picture.height * args.scale))
        picture = picture.resize(size, Image.Resampling.LANCZOS)
    picture.quantize(256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(args.out, optimize=True)
    print(f"{args.out}: {picture.width}x{picture.height}, {args.out.stat().st_size / 1024:.0f} KiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
