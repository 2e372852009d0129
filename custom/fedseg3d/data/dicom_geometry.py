"""Check that a set of DICOM frames tiles one 3D grid: the same rules for a single-frame series and a multi-frame file.

A frame is one slice, whether it is a file of a series or a frame of an enhanced multi-frame image. The frames make
a volume only when they share one orientation, matrix size and pixel spacing, and sit at evenly spaced, distinct
positions along the slice normal; otherwise a reader stacks them into scrambled voxels or a wrong affine.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedseg3d.data.errors import DataError

ORIENTATION_TOL = 1e-4  # direction cosines; DS strings keep about 13 significant digits
SPACING_REL_TOL = 1e-4
DUPLICATE_TOL_MM = 1e-3
GAP_REL_TOL = 0.01  # a gap may differ from the median by 1 % of it or 0.01 mm, whichever is larger
GAP_ABS_TOL_MM = 0.01


@dataclass(frozen=True)
class FrameGeometry:
    """Where one frame lies: enough to check that frames stack into one grid."""

    name: str  # a file name, or "frame N" of a multi-frame file, for messages
    orientation: np.ndarray  # the 6 ImageOrientationPatient direction cosines (LPS)
    position: np.ndarray  # ImagePositionPatient, LPS mm
    rows: int
    cols: int
    pixel_spacing: tuple[float, float]  # (between rows, between columns) in mm


def describe_groups(keys: list[Any], names: list[str]) -> str:
    """'value (n files, e.g. name)' for each distinct value, so the user can find the odd ones."""
    counts = Counter(keys)
    example = {key: name for key, name in zip(reversed(keys), reversed(names), strict=True)}
    return "; ".join(f"{key} ({n} files, e.g. {example[key]})" for key, n in counts.most_common())


def check_one_grid(where: Path, frames: list[FrameGeometry]) -> None:
    """One orientation, one matrix size and one pixel spacing.

    Raises:
        DataError: naming ``where`` and the frames that differ.
    """
    names = [f.name for f in frames]
    first = frames[0].orientation
    if any(np.abs(f.orientation - first).max() > ORIENTATION_TOL for f in frames):
        keys = [tuple(round(float(v), 4) for v in f.orientation) for f in frames]
        raise DataError(where, f"slices have different ImageOrientationPatient: {describe_groups(keys, names)}")
    sizes = [(f.rows, f.cols) for f in frames]
    if len(set(sizes)) > 1:
        raise DataError(where, f"slices have different Rows x Columns: {describe_groups(sizes, names)}")
    spacing0 = np.asarray(frames[0].pixel_spacing)
    if any(np.abs(np.asarray(f.pixel_spacing) - spacing0).max() > SPACING_REL_TOL * spacing0.max() for f in frames):
        keys = [f.pixel_spacing for f in frames]
        raise DataError(where, f"slices have different PixelSpacing: {describe_groups(keys, names)}")


def check_even_stack(where: Path, frames: list[FrameGeometry]) -> tuple[np.ndarray, float]:
    """Frames must tile the volume evenly along the slice normal, one frame per position.

    Returns:
        The frame indices in position order, and the median gap between neighbouring frames in mm.

    Raises:
        DataError: two frames at one position (a second stack, or a time or other 4th dimension), or uneven gaps
            (a missing frame, or more than one stack).
    """
    normal = np.cross(frames[0].orientation[:3], frames[0].orientation[3:])
    depth = np.asarray([f.position @ normal for f in frames])
    order = np.argsort(depth, kind="stable")
    gaps = np.diff(depth[order])
    for n in np.flatnonzero(gaps < DUPLICATE_TOL_MM):
        a, b = frames[order[n]].name, frames[order[n + 1]].name
        raise DataError(
            where,
            f"duplicate slice position {depth[order[n]]:.3f} mm along the normal: {a} and {b} (a second stack, "
            "or a 4D image with several frames per position; only one 3D stack is supported)",
        )
    median = float(np.median(gaps))
    if np.abs(gaps - median).max() > max(GAP_REL_TOL * median, GAP_ABS_TOL_MM):
        raise DataError(
            where,
            f"non-uniform slice spacing along the slice normal: gaps from {gaps.min():.4g} to {gaps.max():.4g} mm "
            f"(median {median:.4g} mm); a slice is missing or the folder holds more than one stack",
        )
    return order, median
