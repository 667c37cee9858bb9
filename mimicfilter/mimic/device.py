"""Which device scores: ``auto`` picks CUDA when present; asking for CUDA without one is a usage error."""

from __future__ import annotations

import torch

from mimicfilter.errors import MimicfilterError


def resolve_device(requested: str) -> torch.device:
    """``auto`` picks CUDA when present; asking for CUDA without one is a usage error."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except RuntimeError as error:
        raise MimicfilterError(f"unknown device {requested!r}", hint="use auto, cpu, cuda or cuda:N") from error
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise MimicfilterError(f"--device {requested}: no CUDA device is available", hint="use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise MimicfilterError(
                f"--device {requested}: only {torch.cuda.device_count()} CUDA device(s)", hint="use cuda:0"
            )
    elif device.type != "cpu":
        raise MimicfilterError(f"unsupported device {requested!r}", hint="use auto, cpu, cuda or cuda:N")
    return device

