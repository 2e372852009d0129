"""Named 3D U-Net presets.

A preset name is the single source of truth for the architecture: the server persistor builds its initial global
model from ``PresetUNet(preset=...)`` and every site builds the same network from the same name, so the two can
never drift apart the way a network spelled out twice (once in server JSON, once in the learner) does.
"""

from __future__ import annotations

from typing import Any

import torch
from monai.networks.nets import UNet

# Each preset is a complete set of MONAI UNet constructor arguments. Batch norm is set explicitly because MONAI's
# default is instance norm, which has no running statistics and so nothing for FedBN to keep at home.
PRESETS: dict[str, dict[str, Any]] = {
    # About 0.3 M parameters: trains on a laptop CPU in seconds per case at 32^3; the CI and POC default.
    "unet3d_tiny": {
        "spatial_dims": 3,
        "in_channels": 1,
        "out_channels": 3,
        "channels": (8, 16, 32, 64),
        "strides": (2, 2, 2),
        "num_res_units": 1,
        "norm": "batch",
    },
    # About 4.8 M parameters: a realistic size for 96^3 patches on a GPU.
    "unet3d_base": {
        "spatial_dims": 3,
        "in_channels": 1,
        "out_channels": 3,
        "channels": (16, 32, 64, 128, 256),
        "strides": (2, 2, 2, 2),
        "num_res_units": 2,
        "norm": "batch",
    },
    # Instance norm instead of batch norm: no running statistics and no coupling between samples, so per-sample
    # gradients are well defined (needed by DP-SGD). It trades FedBN's per-site statistics for privacy.
    "unet3d_tiny_instancenorm": {
        "spatial_dims": 3,
        "in_channels": 1,
        "out_channels": 3,
        "channels": (8, 16, 32, 64),
        "strides": (2, 2, 2),
        "num_res_units": 1,
        "norm": ("instance", {"affine": True}),
    },
}
# One level shallower than the tiny presets: about 36 k parameters instead of 152 k, full-resolution width unchanged.
# For DP-SGD: the noise added to each step's averaged gradient has an L2 norm that grows as the square root of the
# parameter count while the clipped signal does not, so a quarter of the parameters halves the noise for the same
# epsilon. It trades receptive field (two downsamplings, an 8^3 bottleneck at 32^3 patches) for that. The batch-norm
# twin lets a non-private FedBN reference use the same smaller network.
WITHOUT_DEEPEST_LEVEL = {"channels": (8, 16, 32), "strides": (2, 2)}
PRESETS["unet3d_shallow"] = {**PRESETS["unet3d_tiny"], **WITHOUT_DEEPEST_LEVEL}
PRESETS["unet3d_shallow_instancenorm"] = {**PRESETS["unet3d_tiny_instancenorm"], **WITHOUT_DEEPEST_LEVEL}


def _at_width(preset: str, factor: float) -> dict[str, Any]:
    """``preset`` with every level's channel count scaled by ``factor``, so a width variant says what it is
    relative to its base instead of repeating channel tuples that could drift from it."""
    args = PRESETS[preset]
    return {**args, "channels": tuple(int(c * factor) for c in args["channels"])}


# Half the width of the shallow preset at every level: about 10 k parameters, so by the same square-root rule a
# little over half the noise norm again. For DP-SGD only (instance norm); it trades capacity (4 feature maps at full
# resolution) for signal-to-noise. Measured at 16x it does not pay: 0.614 Dice against 0.688 for the shallow preset
# at epsilon 8, though it costs only 0.015 without DP (docs/privacy.md, "Three more levers at 16x"). Kept so the row
# can be repeated.
PRESETS["unet3d_shallow_narrow_instancenorm"] = _at_width("unet3d_shallow_instancenorm", 0.5)
# Twice the width of the shallow preset at every level: about 138 k parameters, close to the tiny FedBN network's
# count. For DP-SGD (instance norm): the narrow preset cost five times more Dice with DP than without, so the
# question was whether width buys noise tolerance. Measured at 16x it does not: 0.696 over six seeds against 0.692
# for the shallow preset at epsilon 8 (docs/privacy.md, "Twice and four times the width"). Timed alone on CPU, one
# DP-SGD step costs about the same as the shallow preset's.
PRESETS["unet3d_shallow_wide_instancenorm"] = _at_width("unet3d_shallow_instancenorm", 2)
# Four times the shallow preset's width: about 542 k parameters, the next step of the same question (it did not
# pay either; same section). Its simulator runs took about 1.7 times the twice-width ones on CPU.
PRESETS["unet3d_shallow_wide4_instancenorm"] = _at_width("unet3d_shallow_instancenorm", 4)


def preset_args(preset: str, **overrides: Any) -> dict[str, Any]:
    """Return the constructor arguments of ``preset`` with ``overrides`` applied.

    Raises:
        ValueError: the preset name is unknown or an override names an argument the preset does not have.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown model preset '{preset}': expected one of {sorted(PRESETS)}")
    args = dict(PRESETS[preset])
    unknown = set(overrides) - set(args)
    if unknown:
        raise ValueError(f"model preset '{preset}' has no argument(s) {sorted(unknown)}; known: {sorted(args)}")
    args.update(overrides)
    return args


def build_model(preset: str, **overrides: Any) -> UNet:
    """Build the MONAI UNet named by ``preset``."""
    return UNet(**preset_args(preset, **overrides))


class PresetUNet(UNet):
    """A MONAI UNet constructed from a preset name, for FLARE components that take a ``{path, args}`` model.

    FLARE's persistor instantiates the class named in the job JSON with the JSON arguments; giving it this class
    with ``{"preset": "unet3d_tiny"}`` keeps the architecture defined in exactly one place.
    """

    def __init__(self, preset: str = "unet3d_tiny", num_classes: int | None = None, seed: int | None = None) -> None:
        overrides = {} if num_classes is None else {"out_channels": num_classes}
        if seed is None:
            super().__init__(**preset_args(preset, **overrides))
        else:
            # Seeded like SiteTrainer (torch seed, then build), so a benchmark's federated and centralised methods
            # start from the very same weights; the caller's random state is left as it was.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                super().__init__(**preset_args(preset, **overrides))
        self.preset = preset


def count_parameters(model: torch.nn.Module) -> int:
    """Number of trainable parameters (for logs and the benchmark report)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
