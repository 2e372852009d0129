"""The label map comes back on the scan's own grid, voxel for voxel, whatever the model's grid."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from predict_scans import AFFINE, CLASSES, PREP, block_volume

from fedseg3d.data.dataset import VolumeLoader
from fedseg3d.data.errors import DataError
from fedseg3d.inference.deployable import DeployableModel
from fedseg3d.inference.segment import class_volumes_ml, segment_volume

CPU = torch.device("cpu")


def threshold_model(prep=PREP) -> DeployableModel:
    """Class 1 where the windowed intensity is above 0.5 (50 HU): the right answer is known for every voxel."""
    network = torch.nn.Conv3d(1, 2, kernel_size=1)
    with torch.no_grad():
        network.weight[:] = torch.tensor([-1.0, 1.0]).view(2, 1, 1, 1, 1)
        network.bias[:] = torch.tensor([0.5, -0.5])
    return DeployableModel(network.eval(), "threshold", CLASSES, prep.for_classes(CLASSES))


def test_labels_match_the_scan_voxel_for_voxel_through_reorientation(nifti_scan: Path):
    image = VolumeLoader()(nifti_scan)
    labels = segment_volume(threshold_model(), image, nifti_scan, CPU)
    assert labels.dtype == torch.uint8 and tuple(labels.shape) == block_volume().shape
    np.testing.assert_allclose(np.asarray(labels.affine), AFFINE, atol=1e-6)
    np.testing.assert_array_equal(labels.numpy(), (block_volume() > 50).astype(np.uint8))


def test_resampled_model_grid_still_lands_on_the_source_grid(nifti_scan: Path):
    coarse = dataclasses.replace(PREP, target_spacing=(2.5, 2.0, 3.0))
    image = VolumeLoader()(nifti_scan)
    labels = segment_volume(threshold_model(coarse), image, nifti_scan, CPU).numpy()
    truth = block_volume() > 50
    assert labels.shape == truth.shape
    dice = 2 * np.logical_and(labels == 1, truth).sum() / ((labels == 1).sum() + truth.sum())
    assert dice > 0.8  # only the block's edge voxels may differ after two resamplings


def test_a_dicom_series_and_its_nifti_twin_give_the_same_labels(nifti_scan: Path, dicom_scan: Path):
    model = threshold_model()
    from_nifti = segment_volume(model, VolumeLoader()(nifti_scan), nifti_scan, CPU)
    from_dicom = segment_volume(model, VolumeLoader()(dicom_scan), dicom_scan, CPU)
    np.testing.assert_array_equal(from_dicom.numpy(), from_nifti.numpy())
    np.testing.assert_allclose(np.asarray(from_dicom.affine), np.asarray(from_nifti.affine), atol=1e-4)


@pytest.mark.parametrize("shape", [(1, 24, 20), (3, 24, 20, 10)], ids=["2d", "4d"])
def test_an_image_that_is_not_one_3d_volume_is_refused(shape, tmp_path: Path):
    image = MetaTensor(torch.rand(shape), affine=torch.eye(4))
    with pytest.raises(DataError, match=r"scan.nii: expected a single-channel 3D image"):
        segment_volume(threshold_model(), image, tmp_path / "scan.nii", CPU)


def test_class_volumes_are_voxel_counts_times_voxel_volume():
    labels = np.zeros((10, 10, 10), dtype=np.uint8)
    labels[:2, :5, :4] = 1  # 40 voxels of 1.5 * 1.5 * 2 mm^3 = 4.5 mm^3
    assert class_volumes_ml(labels, AFFINE, CLASSES) == {"liver": pytest.approx(40 * 4.5 / 1000)}
