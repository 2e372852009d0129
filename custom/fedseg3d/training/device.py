"""Pick the compute device once, so nothing else in the code base hard-codes ``cuda:0``."""

from __future__ import annotations

import torch


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` gives CUDA when available, else CPU; an explicit CUDA request without a GPU is an error.

    Raises:
        ValueError: CUDA was requested but is not available, or the name is not a device.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"device '{name}' is not a torch device name (use auto, cpu or cuda[:N])") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device '{name}' requested but CUDA is not available on this machine")
    return device


def use_mixed_precision(device: torch.device, requested: bool = True) -> bool:
    """Mixed precision only pays (and is only well supported for 3D convs) on CUDA."""
    return requested and device.type == "cuda"
