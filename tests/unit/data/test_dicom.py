"""DICOM series writing, header checks, and the DICOM -> MONAI geometry round trip against NIfTI."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from monai.transforms import LoadImage, Orientation
from pydicom.uid import BasicTextSRStorage, CTImageStorage, ExplicitVRLittleEndian, MRImageStorage
from scipy.spatial.transform import Rotation

from fedseg3d.data.dicom import MONAI_DICOM_READER_ARGS, DicomSeriesInfo, check_dicom_series, write_dicom_series
from fedseg3d.data.errors import DataError

SHAPE = (5, 6, 7)


def _affine(columns: np.ndarray, origin: tuple[float, float, float]) -> np.ndarray:
    affine = np.eye(4)
    affine[:3, :3] = columns
    affine[:3, 3] = origin
    return affine


# Columns are the RAS-mm steps of axes i, j, k. Anisotropic on purpose so a swapped axis changes the spacing.
AFFINES = {
    "ras_anisotropic": _affine(np.diag([0.8, 1.2, 2.5]), (-10.0, 5.0, 3.0)),
    "lps": _affine(np.diag([-0.8, -1.2, 2.5]), (10.0, 5.0, -3.0)),
    "las": _affine(np.diag([-0.8, 1.2, 2.5]), (10.0, -5.0, 3.0)),
    "pir": _affine(np.array([[0.0, 0.0, 2.5], [-0.8, 0.0, 0.0], [0.0, -1.2, 0.0]]), (1.0, 2.0, 3.0)),
    "oblique": _affine(
        Rotation.from_euler("xyz", [20, -35, 50], degrees=True).as_matrix() @ np.diag([0.8, 1.2, 2.5]), (3, -4, 5)
    ),
}


def _volume(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(500.0, 150.0, SHAPE).astype(np.float32)


def _series(folder: Path, affine: np.ndarray | None = None, shape: tuple[int, int, int] = SHAPE, **kw) -> list[Path]:
    volume = np.random.default_rng(1).uniform(0, 1000, shape).astype(np.float32)
    return write_dicom_series(volume, AFFINES["ras_anisotropic"] if affine is None else affine, folder, **kw)


def _edit(path: Path, **attributes) -> None:
    ds = pydicom.dcmread(path)
    for name, value in attributes.items():
        setattr(ds, name, value)
    ds.save_as(path)


def _load_ras(path: Path, reader: str, **reader_args) -> tuple[np.ndarray, np.ndarray]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MONAI deprecation chatter, not what this test is about
        loaded = LoadImage(reader=reader, image_only=True, ensure_channel_first=True, **reader_args)(str(path))
        oriented = Orientation(axcodes="RAS")(loaded)
    return oriented.numpy(), oriented.affine.numpy()


# ------------------------------------------------------------------------------------------------------------ write


def test_write_sets_geometry_uids_and_pixels(tmp_path: Path) -> None:
    volume = _volume()
    affine = AFFINES["ras_anisotropic"]
    paths = write_dicom_series(volume, affine, tmp_path / "s", series_uid="1.2.3.4")
    assert len(paths) == SHAPE[2]
    slices = [pydicom.dcmread(p) for p in paths]
    first = slices[0]
    assert first.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert first.SOPClassUID == MRImageStorage and first.Modality == "MR"
    assert first.PhotometricInterpretation == "MONOCHROME2" and first.SamplesPerPixel == 1
    assert first.pixel_array.dtype == np.uint16
    assert [float(v) for v in first.ImageOrientationPatient] == [-1, 0, 0, 0, -1, 0]  # RAS i, j in LPS
    assert [float(v) for v in first.PixelSpacing] == [1.2, 0.8]  # (between rows = along j, between columns = i)
    assert float(first.SliceThickness) == float(first.SpacingBetweenSlices) == 2.5
    assert [float(v) for v in slices[2].ImagePositionPatient] == [10.0, -5.0, 3.0 + 2 * 2.5]
    assert [s.InstanceNumber for s in slices] == list(range(1, SHAPE[2] + 1))
    assert {s.SeriesInstanceUID for s in slices} == {"1.2.3.4"}
    assert len({s.StudyInstanceUID for s in slices}) == len({s.FrameOfReferenceUID for s in slices}) == 1
    assert len({s.SOPInstanceUID for s in slices}) == SHAPE[2]

    slope, intercept = float(first.RescaleSlope), float(first.RescaleIntercept)
    restored = slices[3].pixel_array * slope + intercept
    np.testing.assert_allclose(restored, volume[:, :, 3].T, atol=slope / 2 + 1e-4)  # pixel[r, c] = volume[c, r, k]


def test_write_ct_and_reproducible_uids(tmp_path: Path) -> None:
    a = write_dicom_series(_volume(), np.eye(4), tmp_path / "a", series_uid="1.2.3", modality="CT")
    b = write_dicom_series(_volume(), np.eye(4), tmp_path / "b", series_uid="1.2.3", modality="CT")
    assert pydicom.dcmread(a[0]).SOPClassUID == CTImageStorage
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]


def test_write_explicit_rescale_that_does_not_fit_raises(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="do not fit uint16"):
        write_dicom_series(_volume(), np.eye(4), tmp_path / "s", rescale_slope=0.001, rescale_intercept=0.0)


@pytest.mark.parametrize(
    ("volume", "affine", "modality", "problem"),
    [
        (np.zeros((4, 4)), np.eye(4), "MR", "3D"),
        (np.zeros((4, 0, 4)), np.eye(4), "MR", "non-empty"),
        (np.zeros((4, 4, 4)), np.eye(3), "MR", "4x4"),
        (np.full((4, 4, 4), np.nan), np.eye(4), "MR", "NaN"),
        (np.zeros((4, 4, 4)), np.eye(4), "US", "modality"),
        (np.zeros((4, 4, 4)), _affine(np.array([[1.0, 1.0, 0], [0, 1.0, 0], [0, 0, 1.0]]), (0, 0, 0)), "MR", "orth"),
    ],
)
def test_write_rejects_bad_input(tmp_path: Path, volume, affine, modality: str, problem: str) -> None:
    with pytest.raises(DataError, match=problem):
        write_dicom_series(volume, affine, tmp_path / "s", modality=modality)


def test_write_refuses_non_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "old.dcm").write_text("left over")
    with pytest.raises(DataError, match="not empty") as info:
        write_dicom_series(_volume(), np.eye(4), tmp_path)
    assert str(tmp_path) in str(info.value)


# ------------------------------------------------------------------------------------------------------ round trip


@pytest.mark.parametrize("name", sorted(AFFINES))
def test_monai_loads_dicom_like_nifti(tmp_path: Path, name: str) -> None:
    """The DICOM series and the NIfTI written from the same volume and affine agree after RAS orientation."""
    volume, affine = _volume(), AFFINES[name]
    write_dicom_series(volume, affine, tmp_path / "series")
    nib.save(nib.Nifti1Image(volume, affine), tmp_path / "image.nii.gz")
    slope = float(pydicom.dcmread(next((tmp_path / "series").iterdir())).RescaleSlope)

    dicom_array, dicom_affine = _load_ras(tmp_path / "series", "PydicomReader", **MONAI_DICOM_READER_ARGS)
    nifti_array, nifti_affine = _load_ras(tmp_path / "image.nii.gz", "NibabelReader")

    assert dicom_array.shape == nifti_array.shape
    np.testing.assert_allclose(dicom_affine, nifti_affine, atol=1e-3)
    np.testing.assert_allclose(dicom_array, nifti_array, atol=slope / 2 + 1e-3)


# ------------------------------------------------------------------------------------------------------------ check


def test_check_accepts_written_series(tmp_path: Path) -> None:
    _series(tmp_path / "s", series_uid="1.2.3")
    (tmp_path / "s" / ".DS_Store").write_text("hidden files are ignored")
    info = check_dicom_series(tmp_path / "s")
    assert info == DicomSeriesInfo(
        n_slices=7, rows=6, cols=5, pixel_spacing=(1.2, 0.8), slice_spacing=2.5, series_uid="1.2.3",
        orientation=(-1.0, 0.0, 0.0, 0.0, -1.0, 0.0),
    )  # fmt: skip


@pytest.mark.parametrize("name", sorted(AFFINES))
def test_check_accepts_every_orientation(tmp_path: Path, name: str) -> None:
    _series(tmp_path / "s", AFFINES[name])
    assert check_dicom_series(tmp_path / "s").slice_spacing == pytest.approx(2.5)


def _assert_rejected(path: Path, expected_name: Path, *problems: str) -> None:
    with pytest.raises(DataError) as info:
        check_dicom_series(path)
    message = str(info.value)
    assert str(expected_name) in message, message
    for problem in problems:
        assert problem in message, message


def test_missing_folder(tmp_path: Path) -> None:
    _assert_rejected(tmp_path / "nope", tmp_path / "nope", "does not exist")


def test_empty_folder(tmp_path: Path) -> None:
    (tmp_path / ".hidden").write_text("")
    _assert_rejected(tmp_path, tmp_path, "empty")


def test_subfolder(tmp_path: Path) -> None:
    _series(tmp_path / "s")
    (tmp_path / "s" / "nested").mkdir()
    _assert_rejected(tmp_path / "s", tmp_path / "s" / "nested", "sub-folder")


def test_non_dicom_file(tmp_path: Path) -> None:
    _series(tmp_path / "s")
    (tmp_path / "s" / "notes.txt").write_text("not an image")
    _assert_rejected(tmp_path / "s", tmp_path / "s" / "notes.txt", "not a readable DICOM file")


def test_file_without_geometry_is_not_an_image(tmp_path: Path) -> None:
    paths = _series(tmp_path / "s")
    ds = pydicom.dcmread(paths[2])
    del ds.ImagePositionPatient
    ds.save_as(paths[2])
    _assert_rejected(tmp_path / "s", paths[2], "missing ImagePositionPatient (0020,0032)")


def test_non_image_sop_class(tmp_path: Path) -> None:
    paths = _series(tmp_path / "s")
    _edit(paths[0], SOPClassUID=BasicTextSRStorage)
    _assert_rejected(tmp_path / "s", paths[0], "Basic Text SR Storage", "not an image storage class")


def test_colour_file(tmp_path: Path) -> None:
    paths = _series(tmp_path / "s")
    ds = pydicom.dcmread(paths[1])
    ds.set_pixel_data(np.zeros((ds.Rows, ds.Columns, 3), np.uint8), "RGB", 8, generate_instance_uid=False)
    ds.save_as(paths[1])
    _assert_rejected(tmp_path / "s", paths[1], "colour image", "RGB", "SamplesPerPixel 3")


def test_multi_frame_file(tmp_path: Path) -> None:
    paths = _series(tmp_path / "s")
    ds = pydicom.dcmread(paths[0])
    ds.set_pixel_data(np.zeros((2, ds.Rows, ds.Columns), np.uint16), "MONOCHROME2", 16, generate_instance_uid=False)
    ds.save_as(paths[0])
    _assert_rejected(tmp_path / "s", paths[0], "multi-frame", "2 frames", "must be alone in its folder")


def test_mixed_series(tmp_path: Path) -> None:
    a = _series(tmp_path / "a", series_uid="1.2.3.1")
    b = _series(tmp_path / "b", AFFINES["lps"], shape=(5, 6, 3), series_uid="1.2.3.2")
    (tmp_path / "mixed").mkdir()
    for prefix, paths in (("a", a), ("b", b)):
        for p in paths:
            shutil.copy(p, tmp_path / "mixed" / f"{prefix}_{p.name}")
    _assert_rejected(tmp_path / "mixed", tmp_path / "mixed", "mixes 2 series", "1.2.3.1 (7 files", "1.2.3.2 (3 files")


def test_mixed_orientation(tmp_path: Path) -> None:
    paths = _series(tmp_path / "s")
    _edit(paths[3], ImageOrientationPatient=[0.0, -1.0, 0.0, -1.0, 0.0, 0.0])
    _assert_rejected(tmp_path / "s", tmp_path / "s", "different ImageOrientationPatient", paths[3].name)


def test_mixed_matrix_size(tmp_path: Path) -> None:
    paths = _series(tmp_path / "s")
    _edit(paths[4], Rows=3)  # fewer rows: the pixel data is still long enough, only the size differs
    _assert_rejected(tmp_path / "s", tmp_path / "s", "different Rows x Columns", paths[4].name)


def test_mixed_pixel_spacing(tmp_path: Path) -> None:
    paths = _series(tmp_path / "s")
    _edit(paths[4], PixelSpacing=["1.0", "1.0"])
    _assert_rejected(tmp_path / "s", tmp_path / "s", "different PixelSpacing", paths[4].name)


def test_duplicate_position(tmp_path: Path) -> None:
    paths = _series(tmp_path / "s")
    _edit(paths[2], ImagePositionPatient=pydicom.dcmread(paths[1]).ImagePositionPatient)
    _assert_rejected(tmp_path / "s", tmp_path / "s", "duplicate slice position", paths[1].name, paths[2].name)


def test_non_uniform_spacing(tmp_path: Path) -> None:
    paths = _series(tmp_path / "s")
    paths[3].unlink()  # a missing slice: MONAI would stretch the remaining ones over the gap
    _assert_rejected(tmp_path / "s", tmp_path / "s", "non-uniform slice spacing", "from 2.5 to 5 mm")


def test_single_slice(tmp_path: Path) -> None:
    _series(tmp_path / "s", shape=(5, 6, 1))
    _assert_rejected(tmp_path / "s", tmp_path / "s", "only 1 slice", "at least 2")


def test_instance_numbers_out_of_position_order(tmp_path: Path) -> None:
    paths = _series(tmp_path / "s")
    _edit(paths[0], InstanceNumber=3)
    _edit(paths[2], InstanceNumber=1)
    _assert_rejected(tmp_path / "s", tmp_path / "s", "InstanceNumber order does not follow slice position")


def test_missing_instance_number(tmp_path: Path) -> None:
    paths = _series(tmp_path / "s")
    ds = pydicom.dcmread(paths[5])
    del ds.InstanceNumber
    ds.save_as(paths[5])
    _assert_rejected(tmp_path / "s", tmp_path / "s", "lack InstanceNumber", paths[5].name)
