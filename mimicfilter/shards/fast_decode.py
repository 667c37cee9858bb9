"""The fast decoders: libjpeg-turbo through ``torchvision.io.decode_jpeg`` and a uint8 resize on
tensors (``--decoder fast``, the default), and batched nvJPEG on the scoring device
(``--decoder gpu``).

Only plain baseline/progressive RGB or grey JPEGs take these routes; everything else (PNG, WebP,
CMYK, alpha, 16-bit, and any file these decoders reject) goes through PIL
(:mod:`mimicfilter.shards.decode`), which also decides the status of a file that fails here. The
pixels differ from PIL's by the resize kernel's rounding (at most a few levels, mostly 0 or 1;
measured in docs/benchmarks.md), so the decoder is part of a run's fingerprint.

torch and torchvision are imported inside the functions: ``report`` imports the decode module
without them.
"""

from __future__ import annotations

import warnings
from typing import Any

from mimicfilter.shards.images import ImageGeometry

JPEG_END = b"\xff\xd9"
_SOF_MARKERS = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def jpeg_header(data: bytes) -> tuple[int, int, int] | None:
    """(width, height, components) from a JPEG's frame header without decoding, or None when the
    bytes are not a well-formed 8-bit JPEG header (PIL then parses and decides)."""
    if not data.startswith(b"\xff\xd8"):
        return None
    position, end = 2, len(data)
    while position + 4 <= end:
        if data[position] != 0xFF:
            return None
        marker = data[position + 1]
        if marker == 0xFF:  # fill byte
            position += 1
            continue
        if marker in (0x01, *range(0xD0, 0xD8)):  # markers without a length
            position += 2
            continue
        length = int.from_bytes(data[position + 2:position + 4], "big")
        if marker in _SOF_MARKERS:
            if position + 10 > end or length < 8:
                return None
            precision = data[position + 4]
            height = int.from_bytes(data[position + 5:position + 7], "big")
            width = int.from_bytes(data[position + 7:position + 9], "big")
            return (width, height, data[position + 9]) if precision == 8 else None
        if marker == 0xDA or length < 2:  # scan data before a frame header: malformed
            return None
        position += 2 + length
    return None


def _as_tensor(data: bytes):
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "buffer is not writable": decode_jpeg only reads it
        return torch.frombuffer(data, dtype=torch.uint8)


def _resize(pixels, geometry: ImageGeometry):
    """``uint8 [..., 3, h, w]`` → the model's size, with torchvision's antialiased uint8 kernels."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2 import functional as F

    height, width = pixels.shape[-2:]
    resized = geometry.resized_size(width, height)
    if resized != (height, width):
        mode = InterpolationMode.BICUBIC if geometry.interpolation == "bicubic" else InterpolationMode.BILINEAR
        pixels = F.resize(pixels, list(resized), interpolation=mode, antialias=True)
    return geometry.crop_tensor(pixels)


def decode_jpeg_fast(data: bytes, geometry: ImageGeometry) -> Any | None:
    """A JPEG → ``uint8 [3, H, W]`` at the model's size, or None when libjpeg rejects the file
    (the caller then lets PIL decide: a truncated or corrupt file gets PIL's status and message)."""
    from torchvision.io import ImageReadMode, decode_jpeg

    try:
        pixels = decode_jpeg(_as_tensor(data), mode=ImageReadMode.RGB)
    except RuntimeError:
        return None
    return _resize(pixels, geometry)


def looks_complete(data: bytes) -> bool:
    """A JPEG that ends with its end-of-image marker (trailing padding allowed); the GPU decoder
    takes only these, so truncated files are caught by PIL in the workers."""
    return JPEG_END in data[-64:]


def decode_jpegs_on_device(datas: list[bytes], geometry: ImageGeometry, device) -> list[Any | None]:
    """Batched nvJPEG on ``device`` (CUDA), then resize and crop there: one ``uint8 [3, H, W]``
    tensor per JPEG, or None for a file the device decoder rejects (the caller falls back to PIL).

    Runs on any device torchvision's decode_jpeg supports (the CPU in tests); one failing file
    makes torchvision fail the whole batch, so the batch is retried file by file.
    """
    from torchvision.io import ImageReadMode, decode_jpeg

    if not datas:
        return []
    tensors = [_as_tensor(data) for data in datas]
    try:
        decoded = decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device)
    except RuntimeError:
        decoded = []
        for tensor in tensors:
            try:
                decoded.append(decode_jpeg(tensor, mode=ImageReadMode.RGB, device=device))
            except RuntimeError:
                decoded.append(None)
    return [None if pixels is None else _resize(pixels, geometry) for pixels in decoded]
