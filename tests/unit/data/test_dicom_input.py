"""DICOM as hospitals have it: enhanced multi-frame CT/MR, compressed transfer syntaxes, and malformed headers, on
the real Siemens series (and forms made from it) and on pydicom's real enhanced test files."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from monai.data.image_reader import PydicomReader
from monai.transforms import LoadImage, Orientation
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import RawDataElement
from pydicom.tag import Tag
from pydicom.uid import (
    BasicTextSRStorage,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
    SegmentationStorage,
)

from fedseg3d.data.datalist import load_datalist
from fedseg3d.data.dataset import VolumeLoader
from fedseg3d.data.dicom import check_dicom_input, source_datasets, write_dicom_series
from fedseg3d.data.errors import DataError
from fedseg3d.data.transforms import PreprocessConfig
from fedseg3d.training.site_trainer import SiteTrainer, TrainingConfig
from tests.unit.data.dicom_fixtures import (
    copy_first_slices,
    extract_pydicom_data,
    extract_real_series,
    legacy_enhanced,
    series_datasets,
)
from tests.unit.data.test_dicom import AFFINES

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@pytest.fixture(scope="module")
def real_series(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return extract_real_series(tmp_path_factory.mktemp("real") / "series")


@pytest.fixture(scope="module")
def short_series(real_series: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three consecutive real slices: enough for a 3D stack, small enough to re-encode and corrupt quickly."""
    out = tmp_path_factory.mktemp("short") / "series"
    copy_first_slices(real_series, out, 3)
    return out


@pytest.fixture(scope="module")
def loader() -> VolumeLoader:
    return VolumeLoader()


def _same(a: torch.Tensor, b: torch.Tensor, affine_atol: float = 0.0) -> None:
    """Voxel-exact; the affine exact too unless a tolerance is given (oblique axes: float round-off in geometry)."""
    assert a.shape == b.shape
    assert torch.equal(a.as_tensor(), b.as_tensor()), float((a - b).abs().max())
    assert torch.allclose(a.affine, b.affine, rtol=0.0, atol=affine_atol), (a.affine, b.affine)


# ------------------------------------------------------------------------------------------- enhanced multi-frame


def test_enhanced_ct_from_the_real_series_reads_voxel_exact(real_series: Path, tmp_path: Path, loader) -> None:
    enhanced = legacy_enhanced(series_datasets(real_series), tmp_path / "enhanced" / "ct.dcm")
    single = loader(real_series)
    assert tuple(single.shape) == (1, 512, 512, 20)
    for path in (enhanced, enhanced.parent):  # the file itself, or its folder, is a case image
        _same(loader(path), single)

    info_series, info_enhanced = check_dicom_input(real_series), check_dicom_input(enhanced)
    assert (info_enhanced.n_slices, info_enhanced.slice_spacing) == (info_series.n_slices, info_series.slice_spacing)
    assert info_enhanced.orientation == info_series.orientation

    # source_datasets follows the volume's k axis: slice k's position is the affine's voxel (0, 0, k).
    datasets = source_datasets(real_series)
    ras = [(LPS_TO_RAS @ [*map(float, ds.ImagePositionPatient), 1.0])[:3] for ds in datasets]
    np.testing.assert_allclose(ras, [(single.affine.numpy() @ [0, 0, k, 1])[:3] for k in range(20)], atol=1e-4)
    assert all(ds.SOPInstanceUID and ds.SOPClassUID for ds in datasets)  # blank in the files, kept in the meta
    [frames] = source_datasets(enhanced.parent)
    assert frames.NumberOfFrames == 20 and frames.SOPInstanceUID == pydicom.dcmread(enhanced).SOPInstanceUID

    # Why MONAI's own reader is not used for these files: it reads them with the wrong geometry.
    misread = LoadImage(reader=PydicomReader(), image_only=True, ensure_channel_first=True)(str(enhanced))
    assert misread.shape != single.shape or not torch.allclose(misread.affine, single.affine)


def test_enhanced_mr_oblique_with_frames_stored_top_down(tmp_path: Path, loader) -> None:
    volume = np.random.default_rng(3).uniform(0, 1000, (5, 6, 7)).astype(np.float32)
    write_dicom_series(volume, AFFINES["oblique"], tmp_path / "series", modality="MR")
    slices = [pydicom.dcmread(p) for p in sorted((tmp_path / "series").iterdir())]
    enhanced = legacy_enhanced(slices[::-1], tmp_path / "enhanced.dcm", modality="MR")

    single, frames = loader(tmp_path / "series"), loader(enhanced)
    assert torch.equal(frames[..., 0], single[..., -1])  # volume[..., k] is frame k + 1 of the file
    orient = Orientation(axcodes="RAS")
    _same(orient(frames), orient(single), affine_atol=1e-9)


def test_real_enhanced_files_from_pydicom_data(tmp_path: Path, loader) -> None:
    """Files that scanners and toolkits wrote, not converted here: an Enhanced CT read with its rescale and
    geometry, an 'Enhanced MR' whose functional groups were stripped, a truncated JPEG 2000 one, and a SEG."""
    files = extract_pydicom_data(
        ("eCT_Supplemental.dcm", "emri_small.dcm", "emri_small_jpeg_2k_lossless_too_short.dcm", "liver.dcm"), tmp_path
    )
    ct = pydicom.dcmread(files["eCT_Supplemental.dcm"])
    image = loader(files["eCT_Supplemental.dcm"])
    transform = ct.SharedFunctionalGroupsSequence[0].PixelValueTransformationSequence[0]
    expected = ct.pixel_array * float(transform.RescaleSlope) + float(transform.RescaleIntercept)
    assert torch.equal(image[0], torch.from_numpy(expected.transpose(2, 1, 0).astype(np.float32)))
    first = ct.PerFrameFunctionalGroupsSequence[0].PlanePositionSequence[0].ImagePositionPatient
    np.testing.assert_allclose(image.affine.numpy()[:3, 3], (LPS_TO_RAS @ [*map(float, first), 1.0])[:3])

    for name, problem in (
        ("emri_small.dcm", "without functional groups"),
        ("emri_small_jpeg_2k_lossless_too_short.dcm", "ends before its pixel data"),
        ("liver.dcm", "Segmentation Storage"),
    ):
        with pytest.raises(DataError, match=problem) as err:
            loader(files[name])
        assert err.value.path == str(files[name])


# ------------------------------------------------------------------------------------------------- compression


@pytest.mark.parametrize("syntax", [RLELossless, JPEGLSLossless, JPEG2000Lossless], ids=lambda uid: uid.name)
def test_compressed_series_and_enhanced_decode_to_the_original(short_series, tmp_path, loader, syntax) -> None:
    """The real slices re-encoded with pydicom's encoders (JPEG baseline and JPEG lossless have none) read back
    voxel-exact, as a series and as a compressed enhanced file."""
    original = loader(short_series)
    (tmp_path / "series").mkdir()
    datasets = []
    for path in sorted(short_series.iterdir()):
        ds = pydicom.dcmread(path)
        ds.decompress(generate_instance_uid=False)  # the scanner's files are JPEG 2000
        ds.compress(syntax, generate_instance_uid=False)
        ds.save_as(tmp_path / "series" / path.name)
        datasets.append(ds)
    assert pydicom.dcmread(next((tmp_path / "series").iterdir())).file_meta.TransferSyntaxUID == syntax
    _same(loader(tmp_path / "series"), original)

    enhanced = pydicom.dcmread(legacy_enhanced(series_datasets(short_series), tmp_path / "enhanced.dcm"))
    if enhanced.file_meta.TransferSyntaxUID.is_compressed:  # the converter keeps the scanner's JPEG 2000 frames
        enhanced.decompress(generate_instance_uid=False)
    enhanced.compress(syntax, generate_instance_uid=False)
    enhanced.save_as(tmp_path / "enhanced.dcm")
    _same(loader(tmp_path / "enhanced.dcm"), original)


def test_missing_decoder_names_file_syntax_and_packages(short_series: Path, tmp_path: Path) -> None:
    """Run where the JPEG-LS plugins cannot be imported, as on a site that skipped requirements.txt (a fresh
    process: pydicom finds its plugins at import)."""
    path = tmp_path / "slice.dcm"
    ds = pydicom.dcmread(next(short_series.iterdir()))
    ds.decompress(generate_instance_uid=False)
    ds.compress(JPEGLSLossless, generate_instance_uid=False)
    ds.save_as(path)
    blocked = ("jpeg_ls", "libjpeg", "pylibjpeg")
    code = (
        f"import sys\nfor name in {blocked!r}: sys.modules[name] = None\n"
        "from fedseg3d.data.dicom_headers import check_decodable, read_header\n"
        f"check_decodable(read_header({str(path)!r}), {str(path)!r})\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    message = done.stderr.strip().splitlines()[-1]
    assert message.startswith("fedseg3d.data.errors.DataError: " + str(path)), message
    assert "JPEG-LS Lossless Image Compression" in message and "pyjpegls" in message, message


# ---------------------------------------------------------------------------------------------- malformed headers


def _truncate(ds: pydicom.Dataset) -> None:
    ds.decompress(generate_instance_uid=False)  # uncompressed, so that the PixelData length is checkable
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]


def _raw(ds: pydicom.Dataset, keyword: str, text: str) -> None:
    """Store the bytes a broken exporter writes; pydicom refuses to convert them, so they are kept unconverted."""
    tag = Tag(keyword)
    value = text.encode() + (b" " if len(text) % 2 else b"")
    ds[tag] = RawDataElement(tag, dictionary_VR(tag), len(value), value, 0, False, True)


def _set(**fields):
    def edit(ds: pydicom.Dataset) -> None:
        for keyword, value in fields.items():
            if value is None:
                del ds[keyword]
            elif isinstance(value, str) and keyword not in ("SOPClassUID",):
                _raw(ds, keyword, value)
            else:
                setattr(ds, keyword, value)

    return edit


CORRUPTIONS = {
    "frames_1A": (_set(NumberOfFrames="1A"), "NumberOfFrames (0028,0008) is '1A'"),
    "spacing_text": (_set(PixelSpacing="abc\\0.97"), "PixelSpacing (0028,0030)"),
    "spacing_one_value": (_set(PixelSpacing="0.97"), "PixelSpacing (0028,0030) has 1 values"),
    "position_text": (_set(ImagePositionPatient="1\\x\\3"), "ImagePositionPatient (0020,0032)"),
    "position_missing": (_set(ImagePositionPatient=None), "missing ImagePositionPatient (0020,0032)"),
    "orientation_5": (_set(ImageOrientationPatient="1\\0\\0\\0\\1"), "(0020,0037) has 5 values"),
    "rows_text": (_set(Rows=None), "missing Rows (0028,0010)"),
    "instance_text": (_set(InstanceNumber="7b"), "InstanceNumber (0020,0013) is '7b'"),
    "pixels_short": (_truncate, "PixelData (7FE0,0010) holds"),
    "structured_report": (_set(SOPClassUID=BasicTextSRStorage), "Basic Text SR Storage"),
    "segmentation": (_set(SOPClassUID=SegmentationStorage), "Segmentation Storage"),
    "no_pixels": (_set(PixelData=None), "no PixelData"),
}


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_each_malformed_field_names_file_and_field(short_series: Path, tmp_path: Path, loader, name: str) -> None:
    edit, problem = CORRUPTIONS[name]
    series = shutil.copytree(short_series, tmp_path / "series")
    victim = sorted(series.iterdir())[1]
    ds = pydicom.dcmread(victim)
    edit(ds)
    ds.save_as(victim)
    for read in (loader, check_dicom_input):  # what predict and the training case checks call
        with pytest.raises(DataError) as err:
            read(series)
        assert err.value.path == str(victim) and problem in err.value.problem, str(err.value)


def _enhanced_with(short_series: Path, out: Path, frame: int, position: list[float]) -> Path:
    path = legacy_enhanced(series_datasets(short_series), out)
    ds = pydicom.dcmread(path)
    ds.PerFrameFunctionalGroupsSequence[frame].PlanePositionSequence[0].ImagePositionPatient = position
    ds.save_as(path)
    return path


def test_enhanced_geometry_faults_and_2d_input(short_series: Path, tmp_path: Path, loader) -> None:
    first, second = (pydicom.dcmread(p).ImagePositionPatient for p in sorted(short_series.iterdir())[:2])
    cases = {  # a frame at the previous frame's position: a 4D image or a second stack
        "4d": (_enhanced_with(short_series, tmp_path / "4d.dcm", 2, list(second)), "duplicate slice position"),
        "gap": (
            _enhanced_with(short_series, tmp_path / "gap.dcm", 2, [*first[:2], float(first[2]) + 12.0]),
            "non-uniform slice spacing",
        ),
        "2d": (sorted(short_series.iterdir())[0], "single-frame DICOM file is one 2D slice"),
    }
    for path, problem in cases.values():
        with pytest.raises(DataError, match=problem) as err:
            loader(path)
        assert err.value.path == str(path)


# ------------------------------------------------------------------------------------------ skip_bad_cases, training


def test_a_malformed_study_is_skipped_by_the_real_trainer(tiny_sites: Path, tmp_path: Path) -> None:
    site = shutil.copytree(tiny_sites / "site-2", tmp_path / "site-2")  # the DICOM site
    classes = {int(k): v for k, v in json.loads((site / "datalist.json").read_text())["labels"].items()}
    datalist = load_datalist(site / "datalist.json", site, classes)
    bad = sorted(datalist.training[0].image.iterdir())[1]
    ds = pydicom.dcmread(bad)
    _raw(ds, "NumberOfFrames", "1A")
    ds.save_as(bad)

    def trainer(skip: bool, out: str) -> SiteTrainer:
        prep = PreprocessConfig(roi_size=(16, 16, 16), intensity_mode="mr_percentile")
        training = TrainingConfig(local_steps=1)
        return SiteTrainer("site-2", datalist, classes, prep, training, tmp_path / out, "cpu", skip_bad_cases=skip)

    with pytest.raises(DataError, match="NumberOfFrames") as err:
        trainer(False, "strict")
    assert err.value.path == str(bad)

    kept = trainer(True, "skipping")
    assert [e.path for e in kept.train_cases.skipped] == [str(bad)]
    assert [item["case_id"] for item in kept.train_cases.items] == [c.case_id for c in datalist.training[1:]]
    result = kept.train_round(kept.shared_weights(), current_round=0)  # trains on what is left
    assert result is not None
