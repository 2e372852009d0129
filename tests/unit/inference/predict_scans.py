"""Small scans and models for the inference tests, written with the project's own writers (shared by conftest)."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from fedseg3d.data.dicom import write_dicom_series
from fedseg3d.data.transforms import PreprocessConfig
from fedseg3d.models.presets import build_model
from fedseg3d.training.site_models import SiteModelStore, model_recipe

CLASSES = {0: "background", 1: "liver"}
# LPS-like axes (i and j run towards -x and -y in RAS) with anisotropic voxels, so reorientation is exercised.
AFFINE = np.array([[-1.5, 0, 0, 20.0], [0, -1.5, 0, 30.0], [0, 0, 2.0, -40.0], [0, 0, 0, 1]])
PREP = PreprocessConfig(
    target_spacing=(1.5, 1.5, 2.0), roi_size=(16, 16, 16), intensity_mode="ct_window", ct_window=(-200.0, 300.0)
)


def block_volume(shape: tuple[int, int, int] = (24, 20, 10)) -> np.ndarray:
    """-1000 HU with a 1000 HU block off centre: a threshold at 50 HU segments the block exactly."""
    volume = np.full(shape, -1000.0, dtype=np.float32)
    volume[3:15, 5:17, 2:7] = 1000.0
    return volume


def write_nifti_scan(path: Path, volume: np.ndarray | None = None, affine: np.ndarray = AFFINE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(block_volume() if volume is None else volume, affine), path)
    return path


def write_dicom_scan(folder: Path, volume: np.ndarray | None = None) -> Path:
    volume = block_volume() if volume is None else volume
    write_dicom_series(volume, AFFINE, folder, modality="CT", series_uid="1.2.826.0.1.3680043.8.498.1")
    return folder


def write_site_models(folder: Path, classes: dict[int, str] = CLASSES) -> Path:
    """A site_models folder as training leaves it, holding a freshly built tiny network."""
    torch.manual_seed(0)
    model = build_model("unet3d_tiny", out_channels=len(classes))
    recipe = model_recipe("unet3d_tiny", classes, PREP.for_classes(classes), "job-1", "site-1")
    SiteModelStore("site-1", folder, recipe).offer_local(model, 0.5, 0)
    return folder
