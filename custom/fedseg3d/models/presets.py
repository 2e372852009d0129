"""Named 3D U-Net presets.

A preset name is the single source of truth for the architecture: the server persistor builds its initial global
model from ``PresetUNet(preset=...)`` and every site builds the same network from the same name, so the two can
never drift apart the way a network spelled out twice (once in server JSON, once in the learner) does.
"""

from __future__ import annotations

from typing import Any

import torch
from monai.networks.nets import UNet

from fedseg3d.models.norms import NAME as GROUP_NORM

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
# The base network with each normalisation a user may choose (MONAI's own default is instance norm). Batch norm
# (``unet3d_base``) has running statistics: FedBN keeps them and its affine parameters at each site. Instance and
# group norm normalise each patch by its own statistics, so there is nothing to keep per site and nothing to go stale
# between training and evaluation; their affine weight and bias are ordinary shared parameters (FedBN then equals
# FedAvg). Group norm uses 8 groups (fewer where 8 does not divide a layer's channels, ``fedseg3d.models.norms``).
PRESETS["unet3d_base_instancenorm"] = {**PRESETS["unet3d_base"], "norm": ("instance", {"affine": True})}
PRESETS["unet3d_base_groupnorm"] = {**PRESETS["unet3d_base"], "norm": (GROUP_NORM, {"max_groups": 8})}
# The tiny instance-norm network one level shallower: about a quarter of its parameters. For DP-SGD: the noise added
# to each step's averaged gradient grows with the square root of the parameter count while the clipped signal does
# not, so fewer parameters mean less noise for the same epsilon, at the cost of receptive field.
PRESETS["unet3d_shallow_instancenorm"] = {
    **PRESETS["unet3d_tiny_instancenorm"],
    "channels": (8, 16, 32),
    "strides": (2, 2),
}


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
