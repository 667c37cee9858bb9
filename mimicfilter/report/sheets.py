"""Contact sheets: the highest and lowest scoring samples, read back from their shards (Pillow)."""

from __future__ import annotations

import io
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

from mimicfilter.errors import MimicfilterError
from mimicfilter.report.tally import SheetEntry
from mimicfilter.shards.decode import DecodeConfig, DisplaySample, decode_for_display
from mimicfilter.shards.tar import iter_shard_samples
from mimicfilter.store.atomic import atomic_write_bytes

TILE = 160  # thumbnail edge, pixels


TILE_TEXT_LINES = 4


COLUMNS = 6



def decode_config_of_run(info: dict[str, Any]) -> DecodeConfig:
    """How the run decoded its samples (from its fingerprint), to show them the same way."""
    stored = dict(info.get("fingerprint", {}).get("decode") or {})
    stored.pop("num_classes", None)  # display only: show every label as stored
    if "image_keys" in stored:
        stored["image_keys"] = tuple(stored["image_keys"])
    try:
        return DecodeConfig(**stored)
    except (TypeError, MimicfilterError):
        return DecodeConfig(task=stored.get("task", "contrastive"))


def _identity(entry: SheetEntry) -> tuple[str, Any]:
    """A sample's place in its shard: its index where known (keys may repeat), else its key."""
    return (entry.shard, entry.index if entry.index is not None else entry.key)


def _read_back(entries: list[SheetEntry], decode) -> dict[tuple[str, Any], Any]:
    """(shard, index or key) → DisplaySample, or an error string when the shard cannot be read."""
    wanted: dict[str, set[Any]] = defaultdict(set)
    for entry in entries:
        wanted[entry.shard].add(_identity(entry)[1])
    found: dict[tuple[str, Any], Any] = {}
    for shard, keys in wanted.items():
        shard_error = "sample not found in its shard"
        try:
            for raw in iter_shard_samples(shard):
                if raw.status == "shard_error":
                    shard_error = f"shard unreadable here: {raw.error}"
                    if "not found" in (raw.error or ""):
                        shard_error += " (moved? pass --shard-root)"
                for name in (raw.index, raw.key):
                    if name in keys:
                        found[(shard, name)] = decode_for_display(raw, decode)
                if all((shard, key) in found for key in keys):
                    break
        except Exception as error:  # a moved or unreadable shard must not stop the report
            for key in keys:
                found.setdefault((shard, key), DisplaySample(None, None, None, f"shard unreadable: {error}"))
        for key in keys:
            found.setdefault((shard, key), DisplaySample(None, None, None, shard_error))
    return found


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _wrap(draw, text: str, font, width: int, lines: int) -> list[str]:
    """Greedy word wrap to ``width`` pixels in at most ``lines`` lines, ending with … when cut."""
    words, result, current = text.split(), [], ""
    for word in words:
        candidate = f"{current} {word}".strip()
        if draw.textlength(candidate, font=font) <= width:
            current = candidate
            continue
        if current:
            result.append(current)
        current = word
        while draw.textlength(current, font=font) > width:  # one very long word: hard-break it
            cut = len(current)
            while cut > 1 and draw.textlength(current[:cut], font=font) > width:
                cut -= 1
            result.append(current[:cut])
            current = current[cut:]
    if current:
        result.append(current)
    if len(result) > lines:
        result = result[:lines]
        last = result[-1]
        while last and draw.textlength(last + "…", font=font) > width:
            last = last[:-1]
        result[-1] = last + "…"
    return result


def contact_sheet(entries: list[SheetEntry], decode, title: str, path: Path) -> Path | None:
    from PIL import Image, ImageDraw

    if not entries:
        return None
    samples = _read_back(entries, decode)
    font, small, heading = _font(13), _font(11), _font(18)
    line_height = 16
    pad = 10
    cell_w, cell_h = TILE + 2 * pad, TILE + pad + line_height * (TILE_TEXT_LINES + 1) + pad
    columns = min(COLUMNS, len(entries))
    rows = math.ceil(len(entries) / columns)
    header = 40
    sheet = Image.new("RGB", (columns * cell_w, header + rows * cell_h), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((pad, 10), title, fill="black", font=heading)
    for position, entry in enumerate(entries):
        x = (position % columns) * cell_w + pad
        y = header + (position // columns) * cell_h
        sample = samples[_identity(entry)]
        if sample.image is not None:
            scale = TILE / max(sample.image.size)  # small images are enlarged too, so tiles look alike
            size = (max(1, round(sample.image.width * scale)), max(1, round(sample.image.height * scale)))
            thumb = sample.image.resize(size, Image.Resampling.LANCZOS)
            box = Image.new("RGB", (TILE, TILE), (245, 245, 245))
            box.paste(thumb, ((TILE - thumb.width) // 2, (TILE - thumb.height) // 2))
            sheet.paste(box, (x, y))
        else:
            draw.rectangle((x, y, x + TILE - 1, y + TILE - 1), fill=(200, 200, 200))
            message = ["unreadable image", *_wrap(draw, sample.error or "", small, TILE - 12, 5)]
            for number, line in enumerate(message):
                draw.text((x + 6, y + 8 + number * 15), line, fill=(90, 0, 0) if number == 0 else "black",
                          font=font if number == 0 else small)
        draw.rectangle((x - 1, y - 1, x + TILE, y + TILE), outline=(180, 180, 180))
        text_y = y + TILE + 4
        draw.text((x, text_y), f"{position + 1}.  {entry.mimic_score:+.3f}", fill="black", font=font)
        verdict, colour = ("kept", (42, 157, 85)) if entry.kept else ("dropped", (209, 73, 91))
        draw.text((x + TILE, text_y), verdict, fill=colour, font=font, anchor="ra")
        if sample.caption is not None:
            described = sample.caption
        elif sample.label is not None or entry.label is not None:
            described = f"label {sample.label if sample.label is not None else entry.label}"
        else:
            described = "(no caption)"
        for number, line in enumerate(_wrap(draw, described, small, TILE, TILE_TEXT_LINES - 1)):
            draw.text((x, text_y + line_height * (number + 1)), line, fill=(40, 40, 40), font=small)
        key_line = _wrap(draw, f"{Path(entry.shard).name}/{entry.key}", small, TILE, 1)[0]
        draw.text((x, text_y + line_height * TILE_TEXT_LINES), key_line, fill=(120, 120, 120), font=small)
    buffer = io.BytesIO()
    sheet.save(buffer, format="PNG", optimize=True)
    atomic_write_bytes(path, buffer.getvalue())
    return path

