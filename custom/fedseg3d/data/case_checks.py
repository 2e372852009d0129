"""Checks that every case must pass before training starts.

Each check raises ``DataError`` naming the file and the problem. They run on what the training code will actually
see (the volumes as loaded by MONAI and reoriented to RAS), so a check can never pass on data that training then
reads differently.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from fedseg3d.data.datalist import Case
from fedseg3d.data.errors import DataError

NIFTI_SUFFIXES = (".nii", ".nii.gz")
# Geometry tolerance in mm: generous against float round-off in headers, far below any real misregistration.
AFFINE_TOLERANCE_MM = 1e-3


def is_nifti(path: Path) -> bool:
    return path.name.endswith(NIFTI_SUFFIXES)


def check_case_files(case: Case) -> None:
    """Check that the files exist and that the label is NIfTI.

    A DICOM image gets its full header check from ``VolumeLoader`` as it is read (``check_dicom_input``'s checks),
    the one place every reader of a case image, training and ``predict`` alike, goes through: checking it here too
    read every slice header twice.

    Raises:
        DataError: a file is missing, or the label is of an unsupported format.
    """
    if not case.image.exists():
        raise DataError(case.image, "image not found")
    if not case.label.exists():
        raise DataError(case.label, "label not found")
    if not case.label.is_file() or not is_nifti(case.label):
        raise DataError(case.label, "unsupported label format: expected a NIfTI file (.nii/.nii.gz)")


def check_image_content(path: Path, image: torch.Tensor) -> None:
    """The image must be one channel of finite, non-constant 3D data."""
    if image.ndim != 4 or image.shape[0] != 1:
        raise DataError(path, f"expected a single-channel 3D image, got array shape {tuple(image.shape)}")
    if image.numel() == 0 or min(image.shape[1:]) == 0:
        raise DataError(path, f"empty image (shape {tuple(image.shape[1:])})")
    if not torch.isfinite(image).all():
        raise DataError(path, f"image has {int((~torch.isfinite(image)).sum())} non-finite voxel(s) (NaN or inf)")
    low, high = float(image.min()), float(image.max())
    if low == high:
        raise DataError(path, f"empty image: every voxel has the same value ({low})")


def check_label_content(path: Path, label: torch.Tensor, num_classes: int) -> None:
    """Label values must be whole numbers among the declared classes 0..num_classes-1."""
    if label.ndim != 4 or label.shape[0] != 1:
        raise DataError(path, f"expected a single-channel 3D label map, got array shape {tuple(label.shape)}")
    values = torch.unique(label)
    if not torch.equal(values, torch.round(values)):
        raise DataError(
            path, f"label has non-integer values, e.g. {values[values != torch.round(values)][:5].tolist()}"
        )
    outside = [int(v) for v in values.tolist() if v < 0 or v >= num_classes]
    if outside:
        raise DataError(path, f"label values {outside} are outside the declared classes 0..{num_classes - 1}")


def check_same_geometry(case: Case, image: torch.Tensor, label: torch.Tensor) -> None:
    """Image and label must share the voxel grid in world space (compared after both are in RAS)."""
    if tuple(image.shape[1:]) != tuple(label.shape[1:]):
        raise DataError(
            case.label,
            f"label shape {tuple(label.shape[1:])} differs from image shape {tuple(image.shape[1:])} "
            f"({case.image.name})",
        )
    image_affine = np.asarray(image.affine, dtype=np.float64)
    label_affine = np.asarray(label.affine, dtype=np.float64)
    if not np.allclose(image_affine, label_affine, atol=AFFINE_TOLERANCE_MM):
        diff = float(np.abs(image_affine - label_affine).max())
        raise DataError(
            case.label,
            f"label geometry differs from image {case.image.name} (affines differ by up to {diff:.4g} mm): "
            f"image affine {np.round(image_affine, 4).tolist()}, label affine {np.round(label_affine, 4).tolist()}",
        )
