"""Write and check single-frame DICOM series.

Sites often hold images as DICOM series (one file per slice) while their labels are NIfTI files. MONAI's
``PydicomReader`` loads a series folder by stacking *whatever* it finds there, so a folder that mixes two series,
misses a slice or holds a colour screenshot still loads, with a wrong affine and scrambled voxels, and training
silently learns from garbage. ``check_dicom_series`` reads the headers only and rejects such folders with an
error naming the folder or file and what is wrong. ``write_dicom_series`` produces valid series from a volume
and its affine, used for the synthetic DICOM sites and for testing that geometry survives the round trip.

Geometry conventions: volumes are indexed ``[i, j, k]`` with a 4x4 voxel-to-RAS-millimetre affine, as nibabel
uses. DICOM patient coordinates are LPS, so x and y change sign. Slice ``k`` is one file whose pixel rows run
along ``j`` and columns along ``i`` (``pixel_array[r, c] == volume[c, r, k]``), which is the layout MONAI's
reader (with its default ``swap_ij=True``) turns back into ``[i, j, k]``.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, CTImageStorage, ExplicitVRLittleEndian, MRImageStorage
from pydicom.valuerep import format_number_as_ds

from fedseg3d.data.errors import DataError

# Arguments for ``monai.data.PydicomReader`` (or ``LoadImage(reader="PydicomReader", **MONAI_DICOM_READER_ARGS)``)
# that make a checked series load with the same array and RAS affine as its NIfTI twin. They are MONAI's defaults,
# pinned here so a future default change cannot flip the geometry: ``affine_lps_to_ras`` matches NibabelReader's
# RAS affine, ``swap_ij`` turns (row, column) pixels back into [i, j]. ``fname_regex=None`` reads only files that
# ``pydicom.misc.is_dicom`` accepts instead of every file in the folder. What no option fixes: the reader stacks
# slices by InstanceNumber (not by position), drops files without one, and takes the slice axis from the first
# and last slice only; ``check_dicom_series`` rejects folders where those shortcuts would go wrong.
MONAI_DICOM_READER_ARGS: dict[str, Any] = {"affine_lps_to_ras": True, "swap_ij": True, "fname_regex": None}

_SOP_CLASS = {"MR": MRImageStorage, "CT": CTImageStorage}
_UINT16_MAX = 65535
_ORIENTATION_TOL = 1e-4  # direction cosines; DS strings keep about 13 significant digits
_SPACING_REL_TOL = 1e-4
_DUPLICATE_TOL_MM = 1e-3
_GAP_REL_TOL = 0.01  # a gap may differ from the median by 1 % of it or 0.01 mm, whichever is larger
_GAP_ABS_TOL_MM = 0.01
_REQUIRED_TAGS = ("Rows", "Columns", "BitsAllocated", "PixelSpacing", "ImagePositionPatient", "ImageOrientationPatient")


@dataclass(frozen=True)
class DicomSeriesInfo:
    """What ``check_dicom_series`` learned about a valid series, for logging and for cross-checking labels."""

    n_slices: int
    rows: int
    cols: int
    pixel_spacing: tuple[float, float]  # (between rows, between columns) in mm, DICOM order
    slice_spacing: float  # median distance between neighbouring slices along the slice normal, mm
    series_uid: str
    orientation: tuple[float, ...]  # the 6 ImageOrientationPatient direction cosines (LPS)


# ----------------------------------------------------------------------------------------------------------- write


def _ds(value: float) -> str:
    """Format a number as a DICOM decimal string (at most 16 characters) without losing more than it must."""
    return format_number_as_ds(float(value))


def _rescale(
    volume: np.ndarray, out_dir: Path, slope: float | None, intercept: float | None
) -> tuple[np.ndarray, str, str]:
    """Quantise ``volume`` to uint16 with one slope/intercept for the whole series.

    One pair for all slices keeps every slice on the same scale, and quantising with the *formatted* decimal
    strings (not the exact floats) means readers recover values within half a slope step.
    """
    vmin, vmax = float(volume.min()), float(volume.max())
    if slope is None:
        # 65000 rather than 65535 leaves headroom for rounding the slope to a decimal string.
        slope = (vmax - vmin) / 65000.0 if vmax > vmin else 1.0
    if intercept is None:
        intercept = vmin
    if slope <= 0:
        raise DataError(out_dir, f"rescale_slope must be positive, got {slope}")
    slope_s, intercept_s = _ds(slope), _ds(intercept)
    stored = np.rint((volume.astype(np.float64) - float(intercept_s)) / float(slope_s))
    if stored.min() < -0.5 or stored.max() > _UINT16_MAX + 0.5:
        raise DataError(
            out_dir,
            f"values {vmin:g}..{vmax:g} do not fit uint16 with rescale_slope {slope_s} and intercept {intercept_s}",
        )
    return np.clip(stored, 0, _UINT16_MAX).astype(np.uint16), slope_s, intercept_s


def _check_write_inputs(volume: np.ndarray, affine_ras: np.ndarray, out_dir: Path, modality: str) -> None:
    if volume.ndim != 3 or volume.size == 0:
        raise DataError(out_dir, f"volume must be a non-empty 3D [i, j, k] array, got shape {volume.shape}")
    if affine_ras.shape != (4, 4) or not np.isfinite(affine_ras).all():
        raise DataError(out_dir, f"affine_ras must be a finite 4x4 matrix, got shape {affine_ras.shape}")
    if not np.isfinite(volume).all():
        raise DataError(out_dir, "volume contains NaN or infinite values, which DICOM integers cannot hold")
    if modality not in _SOP_CLASS:
        raise DataError(out_dir, f"modality must be one of {sorted(_SOP_CLASS)}, got {modality!r}")
    if out_dir.exists() and any(out_dir.iterdir()):
        # Old slices left next to new ones would make the folder a mixed series.
        raise DataError(out_dir, "output folder is not empty; write each series into a new or empty folder")


def _series_template(
    modality: str,
    patient_id: str,
    series_uid: str,
    study_uid: str,
    frame_uid: str,
    description: str,
) -> Dataset:
    """Attributes shared by every slice of the series (patient, study, series, frame of reference)."""
    ds = Dataset()
    ds.SOPClassUID = _SOP_CLASS[modality]
    ds.Modality = modality
    ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
    ds.PatientName = patient_id
    ds.PatientID = patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    ds.StudyInstanceUID = study_uid
    ds.StudyID = "1"
    ds.StudyDate = ""
    ds.StudyTime = ""
    ds.AccessionNumber = ""
    ds.ReferringPhysicianName = ""
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = 1
    ds.SeriesDescription = description
    ds.FrameOfReferenceUID = frame_uid
    ds.PositionReferenceIndicator = ""
    ds.Manufacturer = "fedseg3d"
    if modality == "MR":
        ds.ScanningSequence = "RM"  # research mode: no real pulse sequence behind these pixels
        ds.SequenceVariant = "NONE"
        ds.ScanOptions = ""
        ds.MRAcquisitionType = "3D"
    else:
        ds.KVP = ""
    return ds


def write_dicom_series(
    volume: np.ndarray,
    affine_ras: np.ndarray,
    out_dir: Path,
    *,
    series_uid: str | None = None,
    modality: str = "MR",
    patient_id: str = "SYNTH",
    rescale_slope: float | None = None,
    rescale_intercept: float | None = None,
    series_description: str = "fedseg3d synthetic",
) -> list[Path]:
    """Write a 3D volume as a single-frame DICOM series, one file per k-slice.

    Args:
        volume: 3D array indexed ``[i, j, k]``; any real dtype (stored as uint16 with a rescale slope/intercept).
        affine_ras: 4x4 voxel-to-RAS-mm affine (nibabel convention). Axes i and j must be orthogonal, because a
            DICOM slice has orthonormal row/column directions; the slice axis k may be oblique.
        out_dir: folder to create; must be empty or absent so the series is never mixed with older files.
        series_uid: SeriesInstanceUID. When given, the study, frame-of-reference and SOP instance UIDs are
            derived from it, so the same inputs write identical files (reproducible synthetic data).
        modality: ``"MR"`` or ``"CT"``; selects the SOP class.
        patient_id: PatientID and PatientName.
        rescale_slope: stored value to real value factor; by default chosen from the value range so that
            floating values survive within ``slope / 2``.
        rescale_intercept: real value of stored 0; defaults to the volume minimum.
        series_description: SeriesDescription.

    Returns:
        The written file paths, in slice order (k = 0 first).

    Raises:
        DataError: the volume, affine, modality or rescale parameters cannot be written, or ``out_dir`` is not empty.
    """
    volume = np.asarray(volume)
    affine_ras = np.asarray(affine_ras, dtype=np.float64)
    out_dir = Path(out_dir)
    _check_write_inputs(volume, affine_ras, out_dir, modality)

    affine_lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine_ras
    col_step, row_step = affine_lps[:3, 0], affine_lps[:3, 1]  # moving along i changes the column index
    col_spacing, row_spacing = float(np.linalg.norm(col_step)), float(np.linalg.norm(row_step))
    if min(col_spacing, row_spacing) <= 0:
        raise DataError(out_dir, "affine_ras has a zero-length i or j axis")
    row_cosine, col_cosine = col_step / col_spacing, row_step / row_spacing
    if abs(float(row_cosine @ col_cosine)) > _ORIENTATION_TOL:
        raise DataError(out_dir, "affine_ras axes i and j are not orthogonal; DICOM slices cannot be sheared")
    normal = np.cross(row_cosine, col_cosine)
    slice_spacing = abs(float(affine_lps[:3, 2] @ normal))
    if slice_spacing <= 0:
        raise DataError(out_dir, "affine_ras slice axis k lies in the slice plane")

    stored, slope_s, intercept_s = _rescale(volume, out_dir, rescale_slope, rescale_intercept)
    if series_uid is None:
        series_uid = pydicom.uid.generate_uid()
    study_uid = pydicom.uid.generate_uid(entropy_srcs=[series_uid, "study"])
    frame_uid = pydicom.uid.generate_uid(entropy_srcs=[series_uid, "frame-of-reference"])

    template = _series_template(modality, patient_id, series_uid, study_uid, frame_uid, series_description)
    template.ImageOrientationPatient = [_ds(v) for v in (*row_cosine, *col_cosine)]
    template.PixelSpacing = [_ds(row_spacing), _ds(col_spacing)]
    template.SliceThickness = _ds(slice_spacing)
    template.SpacingBetweenSlices = _ds(slice_spacing)
    template.RescaleSlope = slope_s
    template.RescaleIntercept = intercept_s
    template.RescaleType = "HU" if modality == "CT" else "US"

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for k in range(volume.shape[2]):
        ds = _slice_dataset(template, stored[:, :, k].T, affine_lps @ np.array([0.0, 0.0, k, 1.0]), k, series_uid)
        path = out_dir / f"slice_{k + 1:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _slice_dataset(template: Dataset, pixels: np.ndarray, position: np.ndarray, k: int, series_uid: str) -> Dataset:
    """One slice file: the shared attributes plus this slice's position, number, UID and pixels."""
    ds = template.copy()
    ds.SOPInstanceUID = pydicom.uid.generate_uid(entropy_srcs=[series_uid, "instance", str(k)])
    ds.InstanceNumber = k + 1  # MONAI stacks by InstanceNumber, so it must follow k
    ds.ImagePositionPatient = [_ds(v) for v in position[:3]]
    ds.set_pixel_data(np.ascontiguousarray(pixels), "MONOCHROME2", 16, generate_instance_uid=False)

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.file_meta = meta
    return ds


# ----------------------------------------------------------------------------------------------------------- check


@dataclass(frozen=True)
class _SliceHeader:
    path: Path
    series_uid: str
    orientation: np.ndarray  # 6 direction cosines
    position: np.ndarray  # 3 LPS mm
    rows: int
    cols: int
    pixel_spacing: tuple[float, float]
    instance_number: int | None


def _read_header(path: Path) -> _SliceHeader:
    """Read one file's header (no pixels) and reject anything that is not a single-frame greyscale image slice."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except Exception as exc:  # pydicom raises many types for corrupt input; all mean the same to the user
        raise DataError(path, f"not a readable DICOM file ({type(exc).__name__}: {exc})") from exc

    sop_class = ds.get("SOPClassUID")
    if sop_class is not None:
        name = UID(sop_class).name
        if name != str(sop_class) and "Image Storage" not in name:
            raise DataError(path, f"SOP class {name} ({sop_class}) is not an image storage class; not an image slice")
    n_frames = int(ds.get("NumberOfFrames") or 1)
    if n_frames > 1:
        raise DataError(
            path,
            f"multi-frame DICOM ({n_frames} frames) is not supported; split it into one single-frame file per "
            "slice (for example with dcm4che's emf2sf) in its own folder",
        )
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    samples = int(ds.get("SamplesPerPixel") or 1)
    if photometric not in ("MONOCHROME1", "MONOCHROME2") or samples != 1:
        raise DataError(
            path,
            f"colour image (PhotometricInterpretation {photometric}, SamplesPerPixel {samples}); "
            "only greyscale MONOCHROME1/2 slices with SamplesPerPixel 1 are supported",
        )
    missing = [tag for tag in _REQUIRED_TAGS if tag not in ds]
    if missing:
        raise DataError(
            path, f"not an image slice: missing {', '.join(missing)} (pixel data description or slice geometry)"
        )
    instance = ds.get("InstanceNumber")
    return _SliceHeader(
        path=path,
        series_uid=str(ds.get("SeriesInstanceUID", "<none>")),
        orientation=np.asarray([float(v) for v in ds.ImageOrientationPatient]),
        position=np.asarray([float(v) for v in ds.ImagePositionPatient]),
        rows=int(ds.Rows),
        cols=int(ds.Columns),
        pixel_spacing=(float(ds.PixelSpacing[0]), float(ds.PixelSpacing[1])),
        instance_number=None if instance in (None, "") else int(instance),
    )


def _list_files(folder: Path) -> list[Path]:
    if not folder.exists():
        raise DataError(folder, "DICOM series folder does not exist")
    if not folder.is_dir():
        raise DataError(folder, "expected a DICOM series folder, found a file")
    entries = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    for entry in entries:
        if not entry.is_file():
            raise DataError(entry, "sub-folder inside a DICOM series folder; the folder must hold only slice files")
    if not entries:
        raise DataError(folder, "DICOM series folder is empty (no non-hidden files)")
    return entries


def _describe_groups(keys: list[Any], headers: list[_SliceHeader]) -> str:
    """'value (n files, e.g. name)' for each distinct value, so the user can find the odd files."""
    counts = Counter(keys)
    example = {key: h.path.name for key, h in zip(reversed(keys), reversed(headers), strict=True)}
    return "; ".join(f"{key} ({n} files, e.g. {example[key]})" for key, n in counts.most_common())


def _check_consistent(folder: Path, headers: list[_SliceHeader]) -> None:
    """One series, one orientation, one matrix size and one pixel spacing."""
    uids = [h.series_uid for h in headers]
    if len(set(uids)) > 1:
        raise DataError(
            folder,
            f"folder mixes {len(set(uids))} series; SeriesInstanceUIDs: {_describe_groups(uids, headers)}. "
            "Put each series in its own folder",
        )
    first = headers[0].orientation
    if any(np.abs(h.orientation - first).max() > _ORIENTATION_TOL for h in headers):
        keys = [tuple(round(float(v), 4) for v in h.orientation) for h in headers]
        raise DataError(folder, f"slices have different ImageOrientationPatient: {_describe_groups(keys, headers)}")
    sizes = [(h.rows, h.cols) for h in headers]
    if len(set(sizes)) > 1:
        raise DataError(folder, f"slices have different Rows x Columns: {_describe_groups(sizes, headers)}")
    spacing0 = np.asarray(headers[0].pixel_spacing)
    if any(np.abs(np.asarray(h.pixel_spacing) - spacing0).max() > _SPACING_REL_TOL * spacing0.max() for h in headers):
        keys = [h.pixel_spacing for h in headers]
        raise DataError(folder, f"slices have different PixelSpacing: {_describe_groups(keys, headers)}")


def _check_stack(folder: Path, headers: list[_SliceHeader]) -> float:
    """Slices must tile the volume evenly along the slice normal, numbered in position order.

    Returns:
        The median gap between neighbouring slices in mm.
    """
    normal = np.cross(headers[0].orientation[:3], headers[0].orientation[3:])
    depth = np.asarray([h.position @ normal for h in headers])
    order = np.argsort(depth, kind="stable")
    gaps = np.diff(depth[order])
    for n in np.flatnonzero(gaps < _DUPLICATE_TOL_MM):
        a, b = headers[order[n]].path.name, headers[order[n + 1]].path.name
        raise DataError(folder, f"duplicate slice position {depth[order[n]]:.3f} mm along the normal: {a} and {b}")

    median = float(np.median(gaps))
    if np.abs(gaps - median).max() > max(_GAP_REL_TOL * median, _GAP_ABS_TOL_MM):
        raise DataError(
            folder,
            f"non-uniform slice spacing along the slice normal: gaps from {gaps.min():.4g} to {gaps.max():.4g} mm "
            f"(median {median:.4g} mm); a slice is missing or the folder holds more than one stack",
        )

    unnumbered = [h.path.name for h in headers if h.instance_number is None]
    if unnumbered:
        raise DataError(
            folder, f"{len(unnumbered)} files lack InstanceNumber (MONAI skips them), e.g. {', '.join(unnumbered[:3])}"
        )
    numbers = np.asarray([headers[i].instance_number for i in order])
    steps = np.diff(numbers)
    if not ((steps > 0).all() or (steps < 0).all()):
        raise DataError(
            folder,
            "InstanceNumber order does not follow slice position (duplicate or shuffled numbers); MONAI's "
            "PydicomReader stacks slices by InstanceNumber, so renumber them along the slice normal",
        )
    return median


def check_dicom_series(folder: Path) -> DicomSeriesInfo:
    """Check that a folder holds exactly one evenly spaced, single-frame, greyscale DICOM series.

    MONAI's ``PydicomReader`` silently stacks whatever files a folder holds: several series, mixed orientations,
    missing or duplicate slices. It orders slices by InstanceNumber and derives the slice axis from the first and
    last slice only, so such folders load without error but with scrambled voxels or a wrong affine. This check
    reads headers only (``stop_before_pixels=True``, so it is cheap) and turns each of those cases into an error.

    Args:
        folder: the series folder; hidden files (names starting with ".") are ignored, as MONAI's glob does.

    Returns:
        The series' size, spacing, UID and orientation.

    Raises:
        DataError: naming the folder (or the offending file) and the problem: folder missing or empty, a file
            not readable as DICOM, not an image, colour or multi-frame; several series; mixed orientation,
            matrix size or pixel spacing; duplicate positions; non-uniform slice spacing; missing or
            out-of-order InstanceNumbers; fewer than 2 slices.
    """
    folder = Path(folder)
    headers = [_read_header(path) for path in _list_files(folder)]
    _check_consistent(folder, headers)
    if len(headers) < 2:
        raise DataError(folder, f"only {len(headers)} slice; a 3D series needs at least 2 single-frame slices")
    slice_spacing = _check_stack(folder, headers)
    first = headers[0]
    return DicomSeriesInfo(
        n_slices=len(headers),
        rows=first.rows,
        cols=first.cols,
        pixel_spacing=first.pixel_spacing,
        slice_spacing=slice_spacing,
        series_uid=first.series_uid,
        orientation=tuple(float(v) for v in first.orientation),
    )
