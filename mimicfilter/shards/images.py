"""The model's image geometry (resize, crop or pad) applied to decoded pixels, as uint8 tensors.

Workers turn every image into a ``uint8 [3, H, W]`` tensor of the model's input size; the scoring
device normalises them (:mod:`mimicfilter.mimic.normalization`). :class:`ImageGeometry` is the geometric
half of open_clip's evaluation preprocessing (``PreprocessCfg``: size, resize mode, interpolation,
fill) and reproduces it exactly on PIL images: the PIL route gives the pixels open_clip's own
``preprocess`` works on, so after normalisation its tensor to the bit (tests/test_decode.py).

Size guards, checked from the header before any pixel is decoded: the source pixel count (the
decompression-bomb limit), the aspect ratio, and the size of the resized image before its crop
(a 1×400,000 px PNG is tiny on disk but would be upscaled to billions of pixels);
:func:`header_size` reads the size of an image Pillow refuses to open, for its error.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mimicfilter.errors import MimicfilterError

RESIZE_MODES = ("shortest", "longest", "squash")
INTERPOLATIONS = ("bicubic", "bilinear")
DEFAULT_MAX_ASPECT_RATIO = 100.0


class TooLarge(Exception):
    """An image the size guards reject (status ``too_large``)."""


def header_size(data: bytes) -> tuple[int, int] | None:
    """The (width, height) an image file's header declares, read by Pillow's format plugins as
    ``Image.open`` reads it but without its decompression-bomb check, which refuses a huge image
    without saying its size. Only the header is parsed (no pixel is decoded); None when no plugin
    reads it."""
    import io
    import warnings

    from PIL import Image

    Image.preinit()  # the common formats first, as Image.open tries them
    Image.init()
    prefix = data[:16]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in list(Image.ID):
            factory, accept = Image.OPEN[name]
            try:
                accepted = accept(prefix) if accept else True
                if not accepted or isinstance(accepted, str):  # (a string: Pillow's warning, not a match)
                    continue
                with factory(io.BytesIO(data), "") as image:
                    width, height = image.size
            except Exception:  # noqa: BLE001 - plugins raise many types on data that is not theirs
                continue
            if width > 0 and height > 0:
                return width, height
    return None


def _pair(size: Any) -> tuple[int, int]:
    if isinstance(size, (tuple, list)):
        if len(size) == 1:
            return int(size[0]), int(size[0])
        return int(size[0]), int(size[1])
    return int(size), int(size)


@dataclass(frozen=True)
class ImageGeometry:
    """open_clip's evaluation resize and crop; ``size`` is (height, width)."""

    size: tuple[int, int] = (224, 224)
    resize_mode: str = "shortest"
    interpolation: str = "bicubic"
    fill: int = 0

    def __post_init__(self):
        if self.resize_mode not in RESIZE_MODES:
            raise MimicfilterError(f"unsupported resize mode {self.resize_mode!r}", hint=f"one of {', '.join(RESIZE_MODES)}")
        if self.interpolation not in INTERPOLATIONS:
            # open_clip maps anything else ('random') to bicubic for evaluation
            object.__setattr__(self, "interpolation", "bicubic")
        if len(self.size) != 2 or min(self.size) < 1:
            raise MimicfilterError(f"unsupported preprocessing {self}", hint="3 channels and a positive size")

    @classmethod
    def from_open_clip(cls, config: dict) -> ImageGeometry:
        """From ``model.visual.preprocess_cfg`` (open_clip's ``PreprocessCfg`` as a dict)."""
        return cls(size=_pair(config.get("size", 224)), resize_mode=config.get("resize_mode") or "shortest",
                   interpolation=config.get("interpolation") or "bicubic", fill=int(config.get("fill_color", 0) or 0))

    # ------------------------------------------------------------------------------ geometry

    def resized_size(self, width: int, height: int) -> tuple[int, int]:
        """(height, width) after the resize step, exactly as open_clip's transforms compute it."""
        target_h, target_w = self.size
        if self.resize_mode == "squash":
            return target_h, target_w
        if self.resize_mode == "shortest" and target_h == target_w:
            # torchvision Resize(int): the short side becomes the size, the long side is truncated
            short, long = (width, height) if width <= height else (height, width)
            if short == target_h:
                return height, width
            new_short, new_long = target_h, int(target_h * long / short)
            return (new_long, new_short) if width <= height else (new_short, new_long)
        # open_clip's ResizeKeepRatio: longest=1 for "longest", 0 for non-square "shortest"
        ratio_h, ratio_w = height / target_h, width / target_w
        ratio = max(ratio_h, ratio_w) if self.resize_mode == "longest" else min(ratio_h, ratio_w)
        return round(height / ratio), round(width / ratio)

    def crop_box(self, height: int, width: int) -> tuple[int, int, int, int, tuple[int, int, int, int]]:
        """(top, left, crop_h, crop_w, padding left/top/right/bottom) of the centre crop, with the
        padding open_clip's CenterCropOrPad (``longest``) or torchvision's CenterCrop adds first."""
        crop_h, crop_w = self.size
        pad = (0, 0, 0, 0)
        if crop_w > width or crop_h > height:
            pad = ((crop_w - width) // 2 if crop_w > width else 0, (crop_h - height) // 2 if crop_h > height else 0,
                   (crop_w - width + 1) // 2 if crop_w > width else 0, (crop_h - height + 1) // 2 if crop_h > height else 0)
            height, width = height + pad[1] + pad[3], width + pad[0] + pad[2]
        return int(round((height - crop_h) / 2.0)), int(round((width - crop_w) / 2.0)), crop_h, crop_w, pad

    def check_size(self, width: int, height: int, max_pixels: int, max_aspect_ratio: float) -> None:
        """Raise :class:`TooLarge` for a source image the model's preprocessing must not touch."""
        if width < 1 or height < 1:
            raise TooLarge(f"image is {width}x{height} pixels")
        if width * height > max_pixels:
            raise TooLarge(f"image is {width}x{height} pixels, over the {max_pixels}-pixel limit")
        aspect = max(width, height) / min(width, height)
        if aspect > max_aspect_ratio:
            raise TooLarge(f"image is {width}x{height} pixels, aspect ratio {aspect:.0f}:1 over the {max_aspect_ratio:g}:1 limit")
        resized_h, resized_w = self.resized_size(width, height)
        if resized_h * resized_w > max_pixels:
            raise TooLarge(f"image is {width}x{height} pixels and would be resized to {resized_w}x{resized_h}, "
                           f"over the {max_pixels}-pixel limit")

    # ------------------------------------------------------------------------------ PIL route

    def apply_pil(self, image) -> Any:
        """An RGB PIL image → ``uint8 [3, H, W]`` torch tensor: open_clip's resize and crop, exactly."""
        import numpy as np
        import torch
        from PIL import Image

        width, height = image.size
        resized_h, resized_w = self.resized_size(width, height)
        if (resized_h, resized_w) != (height, width):
            resample = Image.BICUBIC if self.interpolation == "bicubic" else Image.BILINEAR
            image = image.resize((resized_w, resized_h), resample)
        pixels = torch.from_numpy(np.array(image, dtype=np.uint8, copy=True)).permute(2, 0, 1)
        return self.crop_tensor(pixels)

    def crop_tensor(self, pixels) -> Any:
        """Centre crop (after padding with ``fill`` where the image is smaller); a view where it can
        be (the chunk's stack copies it once anyway)."""
        import torch

        _, height, width = pixels.shape
        top, left, crop_h, crop_w, pad = self.crop_box(height, width)
        if any(pad):
            padded = torch.full((3, height + pad[1] + pad[3], width + pad[0] + pad[2]), self.fill, dtype=pixels.dtype,
                                device=pixels.device)
            padded[:, pad[1]:pad[1] + height, pad[0]:pad[0] + width] = pixels
            pixels = padded
        return pixels[:, top:top + crop_h, left:left + crop_w]
