"""Write single-frame DICOM series; check any DICOM case image (series folder or enhanced multi-frame file).

Sites often hold images as DICOM series (one file per slice) while their labels are NIfTI files. MONAI's
``PydicomReader`` loads a series folder by stacking *whatever* it finds there, so a folder that mixes two series,
misses a slice or holds a colour screenshot still loads, with a wrong affine and scrambled voxels, and training
silently learns from garbage. ``check_dicom_series`` reads the headers only and rejects such folders with an
error naming the folder or file and what is wrong. ``write_dicom_series`` produces valid series from a volume
and its affine, used for the synthetic DICOM sites and for testing that geometry survives the round trip.
``check_dicom_input`` accepts a series folder, an enhanced multi-frame file, or a folder holding only that file
(``fedseg3d.data.dicom_multiframe``); ``source_datasets`` gives the datasets a volume was read from, in its order.

Geometry conventions: volumes are indexed ``[i, j, k]`` with a 4x4 voxel-to-RAS-millimetre affine, as nibabel
uses. DICOM patient coordinates are LPS, so x and y change sign. Slice ``k`` is one file whose pixel rows run
along ``j`` and columns along ``i`` (``pixel_array[r, c] == volume[c, r, k]``), which is the layout MONAI's
reader (with its default ``swap_ij=True``) turns back into ``[i, j, k]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, CTImageStorage, ExplicitVRLittleEndian, MRImageStorage
from pydicom.valuerep import format_number_as_ds

from fedseg3d.data.dicom_geometry import (
    ORIENTATION_TOL,
    FrameGeometry,
    check_even_stack,
    check_one_grid,
    describe_groups,
)
from fedseg3d.data.dicom_headers import (
    check_decodable,
    check_image_object,
    check_pixel_data_length,
    field_value,
    floats_field,
    int_field,
    read_header,
)
from fedseg3d.data.dicom_multiframe import check_multiframe, number_of_frames
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
    if abs(float(row_cosine @ col_cosine)) > ORIENTATION_TOL:
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
    geometry: FrameGeometry
    instance_number: int | None


def _read_slice_header(path: Path) -> _SliceHeader:
    """Read one file's header (no pixels) and reject anything that is not a single-frame greyscale image slice."""
    ds = read_header(path)
    check_image_object(ds, path)
    n_frames = number_of_frames(ds, path)
    if n_frames > 1:
        raise DataError(
            path,
            f"multi-frame DICOM ({n_frames} frames) in a folder with other files; an enhanced multi-frame image "
            "must be alone in its folder (or given as the file itself), a series folder holds single-frame slices",
        )
    rows, cols = int_field(ds, path, "Rows", minimum=1), int_field(ds, path, "Columns", minimum=1)
    spacing = floats_field(ds, path, "PixelSpacing", 2)
    if (spacing <= 0).any():
        raise DataError(path, f"PixelSpacing (0028,0030) is {spacing.tolist()}, expected positive numbers")
    check_decodable(ds, path)
    check_pixel_data_length(ds, path, rows, cols, 1)
    instance = field_value(ds, path, "InstanceNumber")
    geometry = FrameGeometry(
        name=path.name,
        orientation=floats_field(ds, path, "ImageOrientationPatient", 6),
        position=floats_field(ds, path, "ImagePositionPatient", 3),
        rows=rows,
        cols=cols,
        pixel_spacing=(float(spacing[0]), float(spacing[1])),
    )
    return _SliceHeader(
        path=path,
        series_uid=str(field_value(ds, path, "SeriesInstanceUID") or "<none>"),
        geometry=geometry,
        instance_number=None if instance is None else int_field(ds, path, "InstanceNumber"),
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


def _check_one_series(folder: Path, headers: list[_SliceHeader]) -> None:
    uids = [h.series_uid for h in headers]
    if len(set(uids)) > 1:
        raise DataError(
            folder,
            f"folder mixes {len(set(uids))} series; SeriesInstanceUIDs: "
            f"{describe_groups(uids, [h.path.name for h in headers])}. Put each series in its own folder",
        )


def _check_instance_numbers(folder: Path, headers: list[_SliceHeader], order: np.ndarray) -> None:
    """MONAI's reader stacks by InstanceNumber: every slice needs one, increasing (or decreasing) with position."""
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


def _series_headers(folder: Path) -> tuple[list[_SliceHeader], float]:
    """Headers of a checked series, in the order the volume stacks them (InstanceNumber, as MONAI's reader does),
    and the slice spacing in mm."""
    headers = [_read_slice_header(path) for path in _list_files(folder)]
    _check_one_series(folder, headers)
    geometries = [h.geometry for h in headers]
    check_one_grid(folder, geometries)
    if len(headers) < 2:
        raise DataError(folder, f"only {len(headers)} slice; a 3D series needs at least 2 single-frame slices")
    order, slice_spacing = check_even_stack(folder, geometries)
    _check_instance_numbers(folder, headers, order)
    return sorted(headers, key=lambda h: h.instance_number or 0), slice_spacing


def check_dicom_series(folder: Path) -> DicomSeriesInfo:
    """Check that a folder holds exactly one evenly spaced, single-frame, greyscale DICOM series.

    MONAI's ``PydicomReader`` silently stacks whatever files a folder holds: several series, mixed orientations,
    missing or duplicate slices. It orders slices by InstanceNumber and derives the slice axis from the first and
    last slice only, so such folders load without error but with scrambled voxels or a wrong affine. This check
    reads headers only (the pixel data stays on disk, so it is cheap) and turns each of those cases into an error.

    Args:
        folder: the series folder; hidden files (names starting with ".") are ignored, as MONAI's glob does.

    Returns:
        The series' size, spacing, UID and orientation.

    Raises:
        DataError: naming the folder (or the offending file and field) and the problem: folder missing or empty, a
            file not readable as DICOM, not an image, colour or multi-frame, a malformed or missing header field, a
            truncated PixelData, no decoder for its transfer syntax; several series; mixed orientation, matrix size
            or pixel spacing; duplicate positions; non-uniform slice spacing; missing or out-of-order
            InstanceNumbers; fewer than 2 slices.
    """
    folder = Path(folder)
    headers, slice_spacing = _series_headers(folder)
    return _info([h.geometry for h in headers], slice_spacing, headers[0].series_uid)


def _info(geometries: list[FrameGeometry], slice_spacing: float, series_uid: str) -> DicomSeriesInfo:
    first = geometries[0]
    return DicomSeriesInfo(
        n_slices=len(geometries),
        rows=first.rows,
        cols=first.cols,
        pixel_spacing=first.pixel_spacing,
        slice_spacing=slice_spacing,
        series_uid=series_uid,
        orientation=tuple(float(v) for v in first.orientation),
    )


# ------------------------------------------------------------------------------------------- any DICOM input form


def multiframe_file(path: Path) -> Path | None:
    """The multi-frame image a case path stands for: the file itself, or the only file of a folder; else None.

    Raises:
        DataError: ``path`` is a file that is not DICOM, or a DICOM file that is not a multi-frame image (one
            slice is a 2D image), or its header is unreadable or malformed.
    """
    path = Path(path)
    if path.is_file():
        if not pydicom.misc.is_dicom(path):
            raise DataError(
                path,
                "unsupported image format: expected a NIfTI file (.nii/.nii.gz), a DICOM series folder or an "
                "enhanced multi-frame DICOM file",
            )
        ds = read_header(path)
        check_image_object(ds, path)
        if number_of_frames(ds, path) < 2:
            raise DataError(
                path,
                "a single-frame DICOM file is one 2D slice; give the folder that holds its whole series instead",
            )
        return path
    files = _list_files(path)
    if len(files) == 1:
        ds = read_header(files[0])
        check_image_object(ds, files[0])
        if number_of_frames(ds, files[0]) > 1:
            return files[0]
    return None


def check_dicom_input(path: Path) -> DicomSeriesInfo:
    """Check any DICOM case image: a single-frame series folder, an enhanced multi-frame file or its folder.

    Raises:
        DataError: naming the file, field or frame and what is wrong (see ``check_dicom_series`` and
            ``fedseg3d.data.dicom_multiframe.check_multiframe``).
    """
    single = multiframe_file(path)
    if single is None:
        return check_dicom_series(path)
    ds = read_header(single)
    geometries, slice_spacing = check_multiframe(single, ds)
    return _info(geometries, slice_spacing, str(field_value(ds, single, "SeriesInstanceUID") or "<none>"))


def source_datasets(path: Path) -> list[Dataset]:
    """The source datasets of a DICOM case image, with pixels, in the order of the loaded volume's k axis.

    For a series, one dataset per slice (``volume[..., k]`` comes from the k-th); for a multi-frame image, its one
    dataset (``volume[..., k]`` is frame k + 1). What a DICOM Segmentation references as its source images.
    An empty SOPClassUID or SOPInstanceUID is filled in from the file meta header, which holds the same value.

    Raises:
        DataError: the input fails ``check_dicom_input``, or a file cannot be read.
    """
    single = multiframe_file(path)
    if single is not None:
        check_multiframe(single)
        files = [single]
    else:
        files = [h.path for h in _series_headers(Path(path))[0]]
    datasets = []
    for file in files:
        try:
            ds = pydicom.dcmread(file)
        except Exception as exc:  # pydicom raises many types for corrupt input
            raise DataError(file, f"not a readable DICOM file ({type(exc).__name__}: {exc})") from exc
        # Anonymisers blank these (the real Siemens series has both empty) while the file meta keeps the values.
        for keyword, meta_keyword in (
            ("SOPClassUID", "MediaStorageSOPClassUID"),
            ("SOPInstanceUID", "MediaStorageSOPInstanceUID"),
        ):
            if not ds.get(keyword) and ds.file_meta.get(meta_keyword):
                setattr(ds, keyword, ds.file_meta[meta_keyword].value)
        datasets.append(ds)
    return datasets
