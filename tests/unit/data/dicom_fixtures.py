"""The real Siemens CT series (TotalSegmentator's pinned archive) and DICOM forms made from it for the input tests."""

from __future__ import annotations

import shutil
import tarfile
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import pydicom
import pytest
from highdicom.legacy import LegacyConvertedEnhancedCTImage, LegacyConvertedEnhancedMRImage
from pydicom.dataset import Dataset

from fedseg3d.data import realdata, source_archive

SERIES = "tests/reference_files/example_ct_dicom"


def extract_real_series(out: Path) -> Path:
    """The real series' 20 files (JPEG 2000 lossless, as the scanner's PACS export wrote them) in ``out``.

    Skips the test where the pinned archive can be neither found in the cache nor fetched through pip.
    """
    try:
        archive = source_archive.fetch(realdata.TOTALSEGMENTATOR, realdata.default_cache())
    except RuntimeError as err:
        pytest.skip(f"the pinned real-data archive is not cached and cannot be fetched: {err}")
    source_archive.extract_tree(archive, realdata.TOTALSEGMENTATOR, SERIES, out)
    return out


def copy_first_slices(series: Path, out: Path, count: int) -> list[Path]:
    """The ``count`` slices with the lowest InstanceNumbers, copied byte for byte: a shorter, still real, series."""
    numbered = sorted(series.iterdir(), key=lambda p: int(pydicom.dcmread(p, stop_before_pixels=True).InstanceNumber))
    out.mkdir(parents=True)
    return [Path(shutil.copy2(p, out / p.name)) for p in numbered[:count]]


def series_datasets(series: Path) -> list[Dataset]:
    """The slices with pixels, in InstanceNumber order, with the SOP UIDs the anonymiser blanked restored from the
    file meta (highdicom's converter needs them)."""
    datasets = [pydicom.dcmread(p) for p in sorted(series.iterdir())]
    for ds in datasets:
        ds.SOPClassUID = ds.SOPClassUID or ds.file_meta.MediaStorageSOPClassUID
        ds.SOPInstanceUID = ds.SOPInstanceUID or ds.file_meta.MediaStorageSOPInstanceUID
    return sorted(datasets, key=lambda ds: int(ds.InstanceNumber))


def legacy_enhanced(datasets: list[Dataset], out: Path, modality: str = "CT") -> Path:
    """Convert single-frame slices (in the given frame order) to one Legacy Converted Enhanced CT or MR file."""
    convert = LegacyConvertedEnhancedCTImage if modality == "CT" else LegacyConvertedEnhancedMRImage
    enhanced = convert(
        datasets, series_instance_uid=hd.UID(), series_number=99, sop_instance_uid=hd.UID(), instance_number=1
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    enhanced.save_as(out)
    return out


@dataclass(frozen=True)
class _DashedSdist(source_archive.PinnedArchive):
    """pydicom-data's sdist predates PEP 625: its file and top folder keep the dash of the project name."""

    @property
    def filename(self) -> str:
        return f"{self.name}-{self.version}.tar.gz"


# pydicom's test data set (MIT): real enhanced multi-frame CT and MR files and a real Segmentation object.
PYDICOM_DATA = _DashedSdist(
    name="pydicom-data", version="1.0.0", sha256="93f2094f219b6fec1e6dbed2e5039fb879272f678646a351b46172f6d0bf110f"
)


def extract_pydicom_data(names: tuple[str, ...], out: Path) -> dict[str, Path]:
    """The named files of ``data_store/data`` in the pinned pydicom-data sdist (fetched once through pip)."""
    try:
        archive = source_archive.fetch(PYDICOM_DATA, realdata.default_cache())
    except RuntimeError as err:
        pytest.skip(f"pydicom-data {PYDICOM_DATA.version} is not cached and cannot be fetched: {err}")
    out.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive, "r:gz") as tar:
        for name in names:
            member = tar.getmember(f"{PYDICOM_DATA.top}/data_store/data/{name}")
            handle = tar.extractfile(member)
            assert handle is not None, name
            (out / name).write_bytes(handle.read())
    return {name: out / name for name in names}
