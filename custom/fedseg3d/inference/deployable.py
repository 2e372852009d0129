"""The model a site deploys, with everything needed to apply it exactly as it was trained.

A state dict alone is not enough to segment a scan: the network's preset, the consortium's class names and the
site's preprocessing (spacing, intensity window or percentiles, ROI for the sliding window) must travel with it,
or a radiology team would guess them. ``DeployableModel`` is that bundle of facts in memory; the site's
``site_models/models.json`` (written during training), a MONAI bundle (``inference.bundle``) and a locally
calibrated model are its three forms on disk.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from fedseg3d.data.transforms import PreprocessConfig


@dataclass
class DeployableModel:
    """A trained segmentation network ready for inference.

    Attributes:
        network: the network, in eval mode, with the site's own normalisation state where it has one (FedBN).
        model_preset: the ``fedseg3d.models.presets`` name the network was built from.
        class_names: the consortium's classes, background first (index -> name).
        preprocessing: the preprocessing used in training at this site (the site's intensity fact applied).
        provenance: JSON-like facts: job id, round, site, sites that trained it, validation Dice, epsilon spent.
        temperature: softmax temperature from local calibration (1.0 when uncalibrated); it changes probabilities,
            never the argmax label map.
    """

    network: torch.nn.Module
    model_preset: str
    class_names: dict[int, str]
    preprocessing: PreprocessConfig
    provenance: dict[str, Any] = field(default_factory=dict)
    temperature: float = 1.0

    @property
    def num_classes(self) -> int:
        """The number of output channels (background included)."""
        return len(self.class_names)
