"""Model inputs on the scoring device: uint8 images become normalised floats there, not in workers.

Workers send ``uint8 [B, 3, H, W]`` pixels (a quarter of float32's bytes, and no per-sample float
work on the CPU), in the channels-last memory the decoders leave them in;
:meth:`ImageNormalization.to_model` copies them to the device, makes them contiguous there and
applies open_clip's ``ToTensor`` + ``Normalize`` with the same float32 operations in the same
order, so the result equals the float path bit for bit. Floating-point images are taken as already normalised
(library callers, the head-route self-check).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def _triple(value) -> tuple[float, float, float]:
    values = tuple(float(v) for v in value) if isinstance(value, (tuple, list)) else (float(value),) * 3
    if len(values) == 1:
        values = values * 3
    return values


@dataclass(frozen=True)
class ImageNormalization:
    """The normalisation half of open_clip's preprocessing (per-channel mean and std)."""

    mean: tuple[float, ...] = OPENAI_MEAN
    std: tuple[float, ...] = OPENAI_STD

    @classmethod
    def from_open_clip(cls, config: dict) -> ImageNormalization:
        """From ``model.visual.preprocess_cfg``."""
        return cls(_triple(config.get("mean") or OPENAI_MEAN), _triple(config.get("std") or OPENAI_STD))

    def normalise(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 ``[..., 3, H, W]`` → float32, as ``Normalize(ToTensor(x))`` computes it."""
        mean = torch.as_tensor(self.mean, dtype=torch.float32, device=pixels.device).view(-1, 1, 1)
        std = torch.as_tensor(self.std, dtype=torch.float32, device=pixels.device).view(-1, 1, 1)
        return pixels.to(torch.float32).div_(255).sub_(mean).div_(std)

    def to_model(self, images: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """Images as the model takes them on ``device``: uint8 pixels are normalised there."""
        if images.dtype == torch.uint8:
            pixels = images.to(device, non_blocking=True)  # keeps the memory order: one plain copy
            # contiguous before the float work: a quarter of the bytes to move, and models get the
            # layout they are tested with
            normalised = self.normalise(pixels.contiguous())
            return normalised if dtype == torch.float32 else normalised.to(dtype)
        return images.to(device, dtype=dtype, non_blocking=True)
