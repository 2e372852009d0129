"""Group norm that fits every layer of a U-Net, registered with MONAI's norm factory as ``"group_up_to"``.

Why: MONAI's ``("group", {"num_groups": 8})`` applies one group count to every norm layer, including the one on the
output channels (one per class), which 8 does not divide for a 3- or 5-class task. This layer takes the largest
group count up to ``max_groups`` that divides its channels, so the preset works for any number of classes.
"""

from __future__ import annotations

import math

import torch
from monai.networks.layers.factories import Norm

NAME = "group_up_to"


class GroupNormUpTo(torch.nn.GroupNorm):
    """``torch.nn.GroupNorm`` with ``gcd(num_channels, max_groups)`` groups (1 group: normalise over all channels)."""

    def __init__(self, num_channels: int, max_groups: int = 8, eps: float = 1e-5, affine: bool = True) -> None:
        super().__init__(math.gcd(num_channels, max_groups), num_channels, eps=eps, affine=affine)


if NAME.upper() not in Norm.names:  # MONAI's factory is global: register once however often this is imported
    Norm.add_factory_class(NAME, GroupNormUpTo, "group norm with as many groups (up to max_groups) as divide C")
