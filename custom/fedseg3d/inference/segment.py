"""One volume in, its label map out, in the volume's own voxel grid.

The model sees the scan exactly as training did (``data.transforms.inference_transform``: RAS orientation, the
site's spacing and intensity handling), through MONAI's sliding window with the training ROI. The label map is then
resampled (nearest neighbour) from the model's grid onto the source grid with MONAI's ``ResampleToMatch``, and
checked to have the source's shape and affine exactly, so the NIfTI and the DICOM SEG overlay the scan voxel for
voxel in any viewer.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from monai.data import MetaTensor
from monai.inferers import sliding_window_inference
from monai.transforms import ResampleToMatch

from fedseg3d.data.case_checks import check_image_content
from fedseg3d.data.errors import DataError
from fedseg3d.data.transforms import inference_transform
from fedseg3d.inference.deployable import DeployableModel

SW_BATCH_SIZE = 4  # windows per forward pass: bounded memory, still a batch for the GPU
GEOMETRY_TOLERANCE_MM = 1e-4


def segment_volume(
    model: DeployableModel,
    image: MetaTensor,
    source: Path,
    device: torch.device,
    overlap: float = 0.25,
    amp: bool = False,
) -> MetaTensor:
    """The label map of ``image`` on its own grid.

    Args:
        model: the network with its preprocessing.
        image: the scan as ``VolumeLoader`` reads it: channel first ``(1, X, Y, Z)`` with its affine.
        source: the scan's file or folder, for error messages.
        device: where the network runs.
        overlap: sliding-window overlap (0 to <1); more is smoother and slower.
        amp: mixed precision (CUDA only).

    Returns:
        ``(X, Y, Z)`` uint8 labels with ``image``'s affine.

    Raises:
        DataError: naming ``source``: not one channel of 3D data, empty or constant, or non-finite.
    """
    check_image_content(source, image)
    prepared = inference_transform(model.preprocessing)({"image": image})["image"]
    network = model.network.to(device).eval()
    with torch.inference_mode(), torch.autocast(device.type, enabled=amp and device.type == "cuda"):
        logits = sliding_window_inference(
            prepared.as_tensor()[None].to(device),
            roi_size=model.preprocessing.roi_size,
            sw_batch_size=SW_BATCH_SIZE,
            predictor=network,
            overlap=overlap,
        )
    labels = torch.argmax(logits, dim=1).to(torch.uint8).cpu()  # temperature never changes the argmax
    del logits
    on_model_grid = MetaTensor(labels.float(), affine=prepared.affine.clone())
    resampled = ResampleToMatch(mode="nearest", padding_mode="zeros")(on_model_grid, img_dst=image)
    check_same_grid(source, resampled, image)
    return MetaTensor(resampled.as_tensor()[0].round().to(torch.uint8), affine=image.affine.clone())


def check_same_grid(source: Path, result: MetaTensor, image: MetaTensor) -> None:
    """The label map must sit on the source grid exactly: same shape, same affine.

    Raises:
        DataError: naming ``source`` and the difference (a bug guard: the resampling should always achieve it).
    """
    if tuple(result.shape[1:]) != tuple(image.shape[1:]):
        raise DataError(source, f"label map shape {tuple(result.shape[1:])} differs from the scan's {image.shape[1:]}")
    difference = float(np.abs(np.asarray(result.affine) - np.asarray(image.affine)).max())
    if difference > GEOMETRY_TOLERANCE_MM:
        raise DataError(source, f"label map affine differs from the scan's by {difference:.3g} mm")


def class_volumes_ml(labels: np.ndarray, affine: np.ndarray, class_names: dict[int, str]) -> dict[str, float]:
    """Volume in millilitres of each foreground class in a label map with the given voxel-to-mm affine."""
    voxel_ml = abs(float(np.linalg.det(np.asarray(affine, dtype=np.float64)[:3, :3]))) / 1000.0
    counts = np.bincount(labels.ravel(), minlength=len(class_names))
    return {class_names[i]: round(float(counts[i]) * voxel_ml, 3) for i in sorted(class_names) if i > 0}
