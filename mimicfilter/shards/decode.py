"""Raw sample -> model inputs (:class:`DecodedSample`), with a status instead of exceptions.

Statuses, first failing rule wins: a non-"ok" raw status passes through; then "missing_image",
"too_large" (the size guards of :mod:`mimicfilter.shards.images`), "decode_error" (image); then
"missing_text" / "missing_label" / "decode_error" (caption or label); else "ok".

The image leaves here as ``uint8 [3, H, W]`` at the model's size (normalised later, on the scoring
device), decoded by ``config.decoder``: ``fast`` (libjpeg-turbo + uint8 resize for plain JPEGs,
:mod:`mimicfilter.shards.fast_decode`), ``pil`` (PIL for everything, open_clip's exact pixels) or ``gpu``
(plain JPEGs are checked here and sent encoded, for nvJPEG on the scoring device). PIL decodes
every other file, and decides the status of any file the fast routes reject. Captions are
tokenised later, a chunk of samples at a time (:mod:`mimicfilter.pipeline.decoder`).
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import warnings
from dataclasses import dataclass
from typing import Any

from PIL import Image, UnidentifiedImageError

from mimicfilter.defaults import TASKS
from mimicfilter.errors import MimicfilterError, one_line
from mimicfilter.shards.images import DEFAULT_MAX_ASPECT_RATIO, ImageGeometry, TooLarge, header_size
from mimicfilter.shards.records import DecodedSample, RawSample

_INTEGER = re.compile(r"[+-]?[0-9]+")
_JSON_PREFIX = "json:"
DECODERS = ("fast", "pil", "gpu")


@dataclass(frozen=True)
class DecodeConfig:
    task: str = "contrastive"  # "contrastive" (needs image+text) or "classify" (needs image+label)
    image_keys: tuple[str, ...] = ("jpg", "jpeg", "png", "webp")
    text_key: str = "txt"  # or "json:FIELD" to read the caption from the sample's .json
    label_key: str = "cls"
    max_image_pixels: int = 89_478_485  # decompression-bomb guard (Pillow's default limit), also after resizing
    num_classes: int | None = None  # classify: labels must lie in [0, num_classes) when given
    decoder: str = "fast"  # "fast", "pil" or "gpu" (see the module docstring)
    max_aspect_ratio: float = DEFAULT_MAX_ASPECT_RATIO  # longer side / shorter side, else too_large

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise MimicfilterError(f"unknown task {self.task!r}", hint="use 'contrastive' or 'classify'")
        if isinstance(self.image_keys, str) or not self.image_keys or not all(
            isinstance(key, str) and key.strip() for key in self.image_keys
        ):
            raise MimicfilterError(
                f"image keys must be a non-empty list of extensions, got {self.image_keys!r}", hint="e.g. jpg,jpeg,png,webp"
            )
        if not self.text_key or (self.text_key.startswith(_JSON_PREFIX) and not self.json_field):
            raise MimicfilterError(
                f"bad text key {self.text_key!r}", hint="use an extension such as 'txt', or 'json:FIELD' (e.g. json:caption)"
            )
        if not self.label_key:
            raise MimicfilterError("label key must not be empty", hint="e.g. cls")
        if isinstance(self.max_image_pixels, bool) or not isinstance(self.max_image_pixels, int) or self.max_image_pixels <= 0:
            raise MimicfilterError(
                f"max image pixels must be a positive integer, got {self.max_image_pixels!r}", hint="the default is 89478485"
            )
        if self.decoder not in DECODERS:
            raise MimicfilterError(f"--decoder {self.decoder}: unknown decoder", hint=f"one of {', '.join(DECODERS)}")
        if not self.max_aspect_ratio >= 1:
            raise MimicfilterError(f"max aspect ratio must be at least 1, got {self.max_aspect_ratio!r}")

    @property
    def json_field(self) -> str | None:
        """The caption field when text_key is "json:FIELD", else None."""
        if self.text_key.startswith(_JSON_PREFIX):
            return self.text_key[len(_JSON_PREFIX) :].strip() or None
        return None


class _Reject(Exception):
    """Internal: a sample-level failure carrying its status; never escapes decode_sample."""

    def __init__(self, status: str, error: str, size: tuple[int, int] | None = None):
        super().__init__(error)
        self.status = status
        self.error = one_line(error)
        self.size = size  # the image's (width, height) when its header was read


@dataclass(frozen=True)
class _Loaded:
    image: Any  # uint8 tensor, JPEG bytes (GPU decoder), or an RGB PIL image (display)
    size: tuple[int, int]  # the original (width, height)


def decode_sample(raw: RawSample, config: DecodeConfig, geometry: ImageGeometry) -> DecodedSample:
    """Decode one raw sample into model inputs; every outcome is a row, never an exception."""
    meta, meta_error = _parse_json(raw.files.get("json"))
    sample = DecodedSample(raw.shard, raw.key, raw.index, uid=_uid(meta), status=raw.status, error=raw.error,
                           anchor=raw.anchor)
    if not sample.ok:
        return sample
    image_ext = _present_image_ext(raw.files, config)
    if image_ext is not None:  # the exact-duplicate key, from the bytes already in hand
        sample.image_sha1 = hashlib.sha1(raw.files[image_ext]).digest()
    try:
        loaded = _load_image(raw.files, config, geometry)
        sample.image_width, sample.image_height = loaded.size
        if config.task == "contrastive":
            sample.caption = _caption(raw.files, meta, meta_error, config)
            sample.caption_sha1 = hashlib.sha1(sample.caption.encode("utf-8")).digest()
        else:
            sample.label = _label(raw.files, config)
    except _Reject as reject:
        sample.status, sample.error = reject.status, reject.error
        if reject.size is not None:  # a too-large image still tells its size
            sample.image_width, sample.image_height = reject.size
        return sample
    if isinstance(loaded.image, bytes):
        sample.encoded = loaded.image
    else:
        sample.image = loaded.image
    return sample


def format_problem(raw: RawSample, config: DecodeConfig) -> tuple[str, str] | None:
    """Why ``raw`` cannot be scored, as far as its files tell without decoding the image: (status,
    error) — its raw status, no image file, no caption or label — or None. The statuses are
    :func:`decode_sample`'s; an image that fails to decode is only found by decoding it."""
    if raw.status != "ok":
        return raw.status, raw.error or raw.status
    meta, meta_error = _parse_json(raw.files.get("json"))
    try:
        _image_ext(raw.files, config)
        if config.task == "contrastive":
            _caption(raw.files, meta, meta_error, config)
        else:
            _label(raw.files, config)
    except _Reject as reject:
        return reject.status, reject.error
    return None


@dataclass(frozen=True)
class DisplaySample:
    """What a human looks at: the image (None when unreadable), its caption or label, or why not."""

    image: Image.Image | None
    caption: str | None
    label: int | None
    error: str | None


def decode_for_display(raw: RawSample, config: DecodeConfig) -> DisplaySample:
    """Decode a raw sample for a contact sheet; like decode_sample, failures become ``error``."""
    if raw.status != "ok":
        return DisplaySample(None, None, None, raw.error or raw.status)
    files = raw.files
    meta, meta_error = _parse_json(files.get("json"))
    caption = label = None
    try:
        if config.task == "contrastive":
            caption = _caption(files, meta, meta_error, config)
        else:
            label = _label(files, config)
    except _Reject:
        pass  # the image may still be worth showing
    try:
        image = _load_image(files, config, None).image
    except _Reject as reject:
        return DisplaySample(None, caption, label, reject.error)
    return DisplaySample(image, caption, label, None)


def _parse_json(data: bytes | None) -> tuple[dict | None, str | None]:
    """(parsed object, error) of the sample's .json; a bad json only matters for json:FIELD captions."""
    if data is None:
        return None, None
    try:
        meta = json.loads(data)
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError are both ValueErrors
        return None, f"sample json is not valid JSON: {exc}"
    if not isinstance(meta, dict):
        return None, f"sample json is a {type(meta).__name__}, not an object"
    return meta, None


def _uid(meta: dict | None) -> str | None:
    """The sample's uid as text: a string as it is, anything else as JSON (not Python's repr of it)."""
    uid = meta.get("uid") if isinstance(meta, dict) else None
    if uid is None or isinstance(uid, str):
        return uid
    return json.dumps(uid, sort_keys=True, ensure_ascii=False)


def _present_image_ext(files: dict[str, bytes], config: DecodeConfig) -> str | None:
    return next((key.lower() for key in config.image_keys if key.lower() in files), None)


def _image_ext(files: dict[str, bytes], config: DecodeConfig) -> str:
    ext = _present_image_ext(files, config)
    if ext is None:
        raise _Reject("missing_image", f"no image file (looked for {', '.join(config.image_keys)})")
    return ext


def _load_image(files: dict[str, bytes], config: DecodeConfig, geometry: ImageGeometry | None) -> _Loaded:
    """The image at the model's size (uint8 tensor), its JPEG bytes for the GPU decoder, or — without
    a geometry (display) — the RGB PIL image, with its original size. Sizes are checked from the
    header before decoding."""
    ext = _image_ext(files, config)
    data = files[ext]
    if geometry is not None and config.decoder != "pil" and (header := _fast_module().jpeg_header(data)):
        # a plain 8-bit grey or RGB JPEG: sizes from its frame header, decoded without PIL
        width, height, components = header
        if components in (1, 3):
            try:
                geometry.check_size(width, height, config.max_image_pixels, config.max_aspect_ratio)
            except TooLarge as exc:
                raise _Reject("too_large", f"image {ext}: {exc}", (width, height)) from None
            if config.decoder == "gpu" and _fast_module().looks_complete(data):
                return _Loaded(data, (width, height))
            if config.decoder == "fast" and (pixels := _fast_module().decode_jpeg_fast(data, geometry)) is not None:
                return _Loaded(pixels, (width, height))
    with warnings.catch_warnings():
        # Bomb warnings become errors here only. If the configured limit is above Pillow's own,
        # Pillow's warning is ignored and our explicit pixel check below decides instead.
        action = "error" if config.max_image_pixels <= (Image.MAX_IMAGE_PIXELS or 0) else "ignore"
        warnings.simplefilter(action, Image.DecompressionBombWarning)
        width = height = None
        try:
            with Image.open(io.BytesIO(data)) as opened:
                width, height = opened.size  # from the header: checked before any pixel is decoded
                _check_size(width, height, config, geometry)
                opened.load()  # force a full decode so truncated/corrupt data fails here, not later
                rgb = _to_rgb(opened)
                if geometry is not None:
                    return _Loaded(geometry.apply_pil(rgb), (width, height))
                return _Loaded(rgb.copy() if rgb is opened else rgb, (width, height))  # outlives the `with`
        except TooLarge as exc:
            raise _Reject("too_large", f"image {ext}: {exc}", None if width is None else (width, height)) from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            size = (width, height) if width is not None else header_size(data)  # Image.open refused it unread
            raise _Reject("too_large", _bomb_error(ext, exc, size, config, geometry), size) from None
        except UnidentifiedImageError:
            raise _Reject("decode_error", f"cannot decode image {ext}: not a recognised image format") from None
        except Exception as exc:  # Pillow plugins raise many unrelated types (OSError, SyntaxError, struct.error...) on bad data
            raise _Reject("decode_error", f"cannot decode image {ext}: {type(exc).__name__}: {exc}") from None


def _check_size(width: int, height: int, config: DecodeConfig, geometry: ImageGeometry | None) -> None:
    """The size guards (:class:`TooLarge`); for display (no geometry) the pixel limit alone."""
    if geometry is not None:
        geometry.check_size(width, height, config.max_image_pixels, config.max_aspect_ratio)
    elif width * height > config.max_image_pixels:
        raise TooLarge(f"image is {width}x{height} pixels, over the {config.max_image_pixels}-pixel limit")


def _bomb_error(ext: str, exc: Exception, size: tuple[int, int] | None, config: DecodeConfig,
                geometry: ImageGeometry | None) -> str:
    """The error of an image Pillow refused as a decompression bomb: the size guards' own, with the
    image's size, when its header gives one."""
    if size is None:
        return f"image {ext} rejected as a decompression bomb: {exc}"
    try:
        _check_size(*size, config, geometry)
    except TooLarge as too_large:
        return f"image {ext}: {too_large}"
    return f"image {ext}: image is {size[0]}x{size[1]} pixels, rejected by Pillow as a decompression bomb: {exc}"


def _fast_module():
    from mimicfilter.shards import fast_decode  # torch and torchvision load only where images are scored

    return fast_decode


def decode_with_pil(data: bytes, config: DecodeConfig, geometry: ImageGeometry) -> tuple[Any, str | None]:
    """(uint8 pixels, None) or (None, error) for one image through PIL alone: the fallback of the
    GPU decoder for a file nvJPEG rejects."""
    try:
        return _load_image({"jpg": data}, DecodeConfig(config.task, ("jpg",), max_image_pixels=config.max_image_pixels,
                                                       decoder="pil", max_aspect_ratio=config.max_aspect_ratio),
                           geometry).image, None
    except _Reject as reject:
        return None, reject.error


# Images above this many pixels are made RGB a band of rows at a time (the same pixels: both steps work
# pixel by pixel), so a 9400x9400 RGBA PNG needs its decoded pixels and the RGB result, not four copies.
_BANDED_PIXELS = 4_000_000
_BAND_ROWS = 512


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB (``image`` itself when it already is); transparent pixels become white (emoji PNGs are
    transparent, black would hide them). Large images free their decoded pixels once converted."""
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info
    if not has_alpha:
        return image if image.mode == "RGB" else image.convert("RGB")
    width, height = image.size
    if width * height <= _BANDED_PIXELS:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    rgb = Image.new("RGB", image.size)
    for top in range(0, height, _BAND_ROWS):
        band = image.crop((0, top, width, min(height, top + _BAND_ROWS))).convert("RGBA")
        background = Image.new("RGBA", band.size, (255, 255, 255, 255))
        rgb.paste(Image.alpha_composite(background, band).convert("RGB"), (0, top))
    image.close()  # the caller is done with the decoded pixels: free them before resizing
    return rgb


def folded_caption_sha1(caption: str) -> bytes:
    """SHA-1 of a caption with case and whitespace folded: what two captions that differ only there share."""
    return hashlib.sha1(" ".join(caption.casefold().split()).encode("utf-8")).digest()


def _caption(files: dict[str, bytes], meta: dict | None, meta_error: str | None, config: DecodeConfig) -> str:
    field = config.json_field
    if field is None:
        data = files.get(config.text_key.lower())
        if data is None:
            raise _Reject("missing_text", f"no caption file ({config.text_key})")
        try:
            text = data.decode("utf-8-sig")  # -sig: a leading BOM is not part of the caption
        except UnicodeDecodeError as exc:
            raise _Reject("decode_error", f"caption {config.text_key} is not valid UTF-8: {exc}") from None
    else:
        if "json" not in files:
            raise _Reject("missing_text", f"no json file for caption field {field!r}")
        if meta_error is not None:
            raise _Reject("decode_error", meta_error)
        value = meta.get(field) if meta else None
        if value is None:
            raise _Reject("missing_text", f"sample json has no caption field {field!r}")
        if not isinstance(value, str):
            raise _Reject("decode_error", f"caption field {field!r} is a {type(value).__name__}, not a string")
        text = value
    text = text.strip()
    if not text:
        raise _Reject("missing_text", f"caption {config.text_key} is empty")
    return text


def _label(files: dict[str, bytes], config: DecodeConfig) -> int:
    data = files.get(config.label_key.lower())
    if data is None:
        raise _Reject("missing_label", f"no label file ({config.label_key})")
    text = data.decode("utf-8", errors="replace").strip()
    if not _INTEGER.fullmatch(text):
        raise _Reject("decode_error", f"label {config.label_key} is not an integer: {text[:40]!r}")
    label = int(text)
    if config.num_classes is not None and not 0 <= label < config.num_classes:
        raise _Reject("decode_error", f"label {label} is outside the head's {config.num_classes} classes")
    return label
