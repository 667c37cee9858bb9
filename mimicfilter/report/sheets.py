"""Contact sheets as data: the sheet samples read back from their shards (one pass per shard for all
sheets), each image written once as a small thumbnail file beside the page. The page (html.py) lays
them out with the caption or label, score, decision and shard/key as selectable text."""

from __future__ import annotations

import hashlib
import io
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mimicfilter.errors import MimicfilterError
from mimicfilter.report.samples import SheetEntry
from mimicfilter.shards.decode import DecodeConfig, DisplaySample, decode_for_display
from mimicfilter.shards.samples import iter_shard_samples
from mimicfilter.store.atomic import atomic_write_bytes

THUMBNAIL_EDGE = 256  # pixels: sharp on HiDPI screens at the page's ~150 px tiles; never enlarged
THUMBNAIL_DIR = "thumbs"
JPEG_QUALITY = 85


@dataclass(frozen=True)
class SheetCard:
    """One sample on a contact sheet, as the page shows it."""

    shard: str
    key: str
    mimic_score: float
    kept: bool
    reason: str
    caption: str | None  # the full caption (the page clamps it and shows all of it on hover)
    label: int | None
    thumbnail: str | None  # path relative to the page; None when the image cannot be read
    error: str | None  # why there is no thumbnail


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


def _read_back(entries: list[SheetEntry], decode: DecodeConfig) -> dict[tuple[str, int], DisplaySample]:
    """(shard, index) → DisplaySample; an unreadable shard or a missing sample becomes its error."""
    wanted: dict[str, set[int]] = defaultdict(set)
    for entry in entries:
        wanted[entry.shard].add(entry.index)
    found: dict[tuple[str, int], DisplaySample] = {}
    for shard, indices in sorted(wanted.items()):
        shard_error = "sample not found in its shard"
        try:
            for raw in iter_shard_samples(shard):
                if raw.status == "shard_error":
                    shard_error = f"shard unreadable here: {raw.error}"
                    if "not found" in (raw.error or ""):
                        shard_error += " (moved? pass --shard-root)"
                if raw.index in indices:
                    found[(shard, raw.index)] = decode_for_display(raw, decode)
                    if all((shard, index) in found for index in indices):
                        break
        except Exception as error:  # a moved or unreadable shard must not stop the report
            for index in indices:
                found.setdefault((shard, index), DisplaySample(None, None, None, f"shard unreadable: {error}"))
        for index in indices:
            found.setdefault((shard, index), DisplaySample(None, None, None, shard_error))
    return found


def thumbnail_name(shard: str, index: int, extension: str) -> str:
    """A file name per sample, stable and safe whatever the shard's name holds."""
    digest = hashlib.sha1(f"{shard}\0{index}".encode()).hexdigest()[:20]
    return f"{THUMBNAIL_DIR}/{digest}.{extension}"


def _write_thumbnail(image, out_dir: Path, shard: str, index: int) -> str:
    """Big images: scaled down to THUMBNAIL_EDGE, JPEG. Small ones: as they are, PNG (lossless, still
    small), because the browser enlarges them and would enlarge JPEG artefacts too."""
    from PIL import Image

    picture = image.convert("RGB")
    scale = THUMBNAIL_EDGE / max(picture.size)
    buffer = io.BytesIO()
    if scale < 1:
        size = (max(1, round(picture.width * scale)), max(1, round(picture.height * scale)))
        picture.resize(size, Image.Resampling.LANCZOS).save(buffer, format="JPEG", quality=JPEG_QUALITY, optimize=True)
        name = thumbnail_name(shard, index, "jpg")
    else:
        picture.save(buffer, format="PNG", optimize=True)
        name = thumbnail_name(shard, index, "png")
    atomic_write_bytes(out_dir / name, buffer.getvalue())
    return name


def contact_sheets(sheets: dict[str, list[SheetEntry]], decode: DecodeConfig, out_dir: Path) -> dict[str, list[SheetCard]]:
    """Read every sheet's samples back (once each) and write their thumbnails into ``out_dir``."""
    everything = [entry for entries in sheets.values() for entry in entries]
    if not everything:
        return {}
    shown = _read_back(everything, decode)
    thumbnails: dict[tuple[str, int], str | None] = {}
    cards: dict[str, list[SheetCard]] = {}
    for name, entries in sheets.items():
        cards[name] = []
        for entry in entries:
            identity = (entry.shard, entry.index)
            sample = shown[identity]
            if identity not in thumbnails:
                thumbnails[identity] = None if sample.image is None else _write_thumbnail(
                    sample.image, out_dir, entry.shard, entry.index)
            label = sample.label if sample.label is not None else entry.label
            cards[name].append(SheetCard(entry.shard, entry.key, entry.mimic_score, entry.kept, entry.reason,
                                         sample.caption, label, thumbnails[identity], sample.error))
    return cards
