"""Check and read enhanced multi-frame DICOM images (Enhanced CT/MR and Legacy Converted Enhanced Image Storage).

Modern scanners export a volume as one file whose frames carry their geometry in functional groups (shared by all
frames, or per frame): ``PlanePositionSequence``, ``PlaneOrientationSequence``, ``PixelMeasuresSequence`` and
``PixelValueTransformationSequence`` for the rescale. MONAI's ``PydicomReader`` ignores the functional groups
(misordered axes, identity affine), so these files are read with highdicom, the maintained DICOM library for them,
after the same strict checks as a single-frame series: one orientation, even spacing, no missing frame, one stack.

Frame order is kept: ``volume[:, :, k]`` is frame ``k + 1`` of the file, so a segmentation of the volume maps back
onto the source frames one to one. Files whose frames are not stored in position order are refused.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import highdicom as hd
import numpy as np
from monai.data.image_reader import ImageReader
from monai.utils import MetaKeys, SpaceKeys
from pydicom.dataset import Dataset

from fedseg3d.data.dicom_geometry import FrameGeometry, check_even_stack, check_one_grid
from fedseg3d.data.dicom_headers import (
    check_decodable,
    check_image_object,
    check_pixel_data_length,
    field_value,
    floats_field,
    int_field,
    read_header,
    transfer_syntax,
)
from fedseg3d.data.errors import DataError

_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
# (keyword of the functional group, the attribute inside it, number of values)
_GROUPS = {
    "position": ("PlanePositionSequence", "ImagePositionPatient", 3),
    "orientation": ("PlaneOrientationSequence", "ImageOrientationPatient", 6),
    "spacing": ("PixelMeasuresSequence", "PixelSpacing", 2),
}


def number_of_frames(ds: Dataset, path: Path) -> int:
    """NumberOfFrames (1 when absent), checked: a malformed value names the file and the field."""
    return int_field(ds, path, "NumberOfFrames", default=1, minimum=1)


def _group_item(ds: Dataset, path: Path, frame: int, group: str) -> Dataset | None:
    """The frame's item of a functional group: its own (per-frame) one first, else the shared one."""
    for container, index in (("PerFrameFunctionalGroupsSequence", frame), ("SharedFunctionalGroupsSequence", 0)):
        items = field_value(ds, path, container)
        if items is None or index >= len(items):
            continue
        sequence = field_value(items[index], path, group)
        if sequence:
            return sequence[0]
    return None


def _frame_values(ds: Dataset, path: Path, frame: int, what: str) -> np.ndarray:
    group, keyword, count = _GROUPS[what]
    where = f"frame {frame + 1} {group}: "
    item = _group_item(ds, path, frame, group)
    if item is None:
        raise DataError(path, f"{where}missing (in neither PerFrame nor SharedFunctionalGroupsSequence)")
    return floats_field(item, path, keyword, count, where)


def frame_geometries(ds: Dataset, path: Path) -> list[FrameGeometry]:
    """Each frame's position, orientation and pixel spacing, from the functional groups.

    Raises:
        DataError: the file has no functional groups, or a frame lacks or garbles one of the three.
    """
    frames = number_of_frames(ds, path)
    if "PerFrameFunctionalGroupsSequence" not in ds and "SharedFunctionalGroupsSequence" not in ds:
        raise DataError(
            path,
            f"multi-frame image ({frames} frames) without functional groups (Shared/PerFrameFunctionalGroupsSequence):"
            " its frames carry no position; only enhanced multi-frame images (Enhanced or Legacy Converted "
            "Enhanced CT/MR) are supported",
        )
    per_frame = field_value(ds, path, "PerFrameFunctionalGroupsSequence") or []
    if per_frame and len(per_frame) != frames:
        raise DataError(
            path, f"PerFrameFunctionalGroupsSequence has {len(per_frame)} items for NumberOfFrames {frames}"
        )
    rows, cols = int_field(ds, path, "Rows", minimum=1), int_field(ds, path, "Columns", minimum=1)
    geometries = []
    for k in range(frames):
        spacing = _frame_values(ds, path, k, "spacing")
        if (spacing <= 0).any():
            raise DataError(path, f"frame {k + 1} PixelMeasuresSequence: PixelSpacing {spacing.tolist()} not positive")
        geometries.append(
            FrameGeometry(
                name=f"frame {k + 1}",
                orientation=_frame_values(ds, path, k, "orientation"),
                position=_frame_values(ds, path, k, "position"),
                rows=rows,
                cols=cols,
                pixel_spacing=(float(spacing[0]), float(spacing[1])),
            )
        )
    return geometries


def check_multiframe(path: Path, ds: Dataset | None = None) -> tuple[list[FrameGeometry], float]:
    """Check that a multi-frame file holds one evenly spaced 3D stack, stored in position order, that decodes here.

    Args:
        path: the file.
        ds: its header, when already read (``read_header``).

    Returns:
        The frames' geometry in file order, and the slice spacing in mm.

    Raises:
        DataError: naming the file and the field or frame: not an image, colour, a malformed or missing field, a
            truncated PixelData, no decoder for its transfer syntax, fewer than 2 frames, mixed orientation or
            spacing, duplicate positions (4D or several stacks), uneven gaps (a missing frame), frames out of order.
    """
    ds = read_header(path) if ds is None else ds
    check_image_object(ds, path)
    geometries = frame_geometries(ds, path)
    if len(geometries) < 2:
        raise DataError(path, f"only {len(geometries)} frame; a 3D image needs at least 2")
    check_decodable(ds, path)
    check_pixel_data_length(ds, path, geometries[0].rows, geometries[0].cols, len(geometries))
    check_one_grid(path, geometries)
    order, spacing = check_even_stack(path, geometries)
    in_order = np.arange(len(order))
    if not (np.array_equal(order, in_order) or np.array_equal(order, in_order[::-1])):
        raise DataError(
            path,
            "frames are not stored in slice position order (first out-of-order frame: "
            f"{int(np.flatnonzero(order != in_order)[0]) + 1}); re-export the volume sorted along the slice normal",
        )
    return geometries, spacing


def _decode_volume(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """The rescaled voxels indexed [column, row, frame] and their voxel-to-LPS affine, in file frame order."""
    try:
        image = hd.imread(path)
        # Rescaled in float64, then stored as float32, as MONAI's single-frame reader does: the same file content
        # gives the same voxels whichever form it came in.
        volume = image.get_volume(dtype=np.float64, apply_voi_transform=False)
    except Exception as exc:  # decoders and highdicom's own geometry checks raise many types
        uid = transfer_syntax(read_header(path), path)
        raise DataError(
            path, f"cannot read its frames as one volume (TransferSyntaxUID {uid.name}; {type(exc).__name__}: {exc})"
        ) from exc
    if not np.allclose(volume.position, _frame_values(image, path, 0, "position"), atol=1e-3):
        volume = volume.flip_spatial(0)  # highdicom sorted the frames the other way along the normal
    # highdicom indexes (frame, row, column); this project indexes [i = column, j = row, k = frame].
    return np.ascontiguousarray(volume.array.transpose(2, 1, 0), dtype=np.float32), volume.affine[:, [2, 1, 0, 3]]


class MultiFrameDicomReader(ImageReader):
    """A MONAI reader for one enhanced multi-frame file: the array as [i, j, k] and its RAS affine.

    ``LoadImage(reader=MultiFrameDicomReader())`` gives the same MetaTensor form as the project's other readers, so
    orientation, resampling and checks downstream need not know where a volume came from.
    """

    def verify_suffix(self, filename: Sequence[str] | str) -> bool:
        """Files have no standard suffix; callers decide (``fedseg3d.data.dicom.multiframe_file``)."""
        return True

    def read(self, data: Sequence[str] | str, **kwargs) -> Path:
        """Checks the file; the pixels are decoded in ``get_data``."""
        names = [data] if isinstance(data, str | Path) else list(data)
        if len(names) != 1:
            raise DataError(str(data), "MultiFrameDicomReader reads one multi-frame file at a time")
        path = Path(names[0])
        check_multiframe(path)
        return path

    def get_data(self, img: Path) -> tuple[np.ndarray, dict]:
        array, affine_lps = _decode_volume(img)
        affine = _LPS_TO_RAS @ affine_lps
        meta = {
            MetaKeys.AFFINE: affine,
            MetaKeys.ORIGINAL_AFFINE: affine.copy(),
            MetaKeys.SPATIAL_SHAPE: np.asarray(array.shape),
            MetaKeys.SPACE: SpaceKeys.RAS,
            MetaKeys.ORIGINAL_CHANNEL_DIM: float("nan"),
        }
        return array, meta
