"""``fedseg3d predict`` on the real scans (``fedseg3d data real``): the scanner's own CT DICOM series gets a DICOM SEG
that re-reads with pydicom and highdicom on the source slices, and the NIfTI CT keeps its affine and shape.

No training: a freshly initialised network saved in a job's site_models layout, since what is tested is geometry,
referencing and labels, not accuracy.
"""

from __future__ import annotations

import json
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from pydicom.sr.codedict import codes

from fedseg3d.cli import main as cli
from fedseg3d.data import realdata
from fedseg3d.data.dataset import VolumeLoader
from fedseg3d.data.transforms import PreprocessConfig
from fedseg3d.inference.seg_writer import fill_missing_uids, read_series_headers
from fedseg3d.models.presets import build_model
from fedseg3d.training.site_models import SiteModelStore, model_recipe

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def real_sites(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("real")
    recipes = [r for r in realdata.SITES if r.name in ("site-1", "site-2")]
    realdata.build_sites(root, realdata.default_cache(), sites=recipes)
    return root


@pytest.fixture(scope="module")
def workspace(real_sites: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A simulator-like workspace with site-2's model folder (and a second site, so --site is needed)."""
    built = json.loads((real_sites / "sites.json").read_text())
    classes = {int(k): v for k, v in built["classes"].items()}
    prep = PreprocessConfig(intensity_mode="ct_window").for_classes(classes)
    root = tmp_path_factory.mktemp("workspace")
    torch.manual_seed(0)
    model = build_model("unet3d_tiny", out_channels=len(classes))
    for site in ("site-1", "site-2"):
        folder = root / site / "simulate_job" / f"app_{site}" / "site_models"
        SiteModelStore(site, folder, model_recipe("unet3d_tiny", classes, prep, "real-job", site)).offer_local(
            model, 0.1, 0
        )
    return root


def test_the_real_dicom_series_gets_a_seg_on_its_own_slices(real_sites: Path, workspace: Path, tmp_path: Path):
    series = real_sites / "site-2" / "imagesTr" / "val"
    out = tmp_path / "out"
    argv = ["predict", "--model", str(workspace), "--site", "site-2", "--input", str(series), "--out", str(out)]
    assert cli(argv) == 0
    labels_img = nib.load(out / "val" / "labels.nii.gz")
    source = VolumeLoader()(series)
    labels = np.asarray(labels_img.dataobj)
    assert labels.shape == tuple(source.shape[1:]) and labels.dtype == np.uint8
    np.testing.assert_allclose(labels_img.affine, np.asarray(source.affine), atol=1e-4)

    sources = read_series_headers(series)
    fill_missing_uids(sources, series)  # this public series was anonymised with blank UIDs
    summary = json.loads((out / "val" / "summary.json").read_text())
    assert any("SeriesInstanceUID" in w for w in summary["warnings"]), "the derived series UID is reported"
    assert summary["model"]["provenance"]["site"] == "site-2"
    voxel_ml = abs(np.linalg.det(labels_img.affine[:3, :3])) / 1000
    assert summary["volumes_ml"]["liver"] == pytest.approx((labels == 2).sum() * voxel_ml, abs=1e-3)

    raw = pydicom.dcmread(out / "val" / "seg.dcm")
    assert raw.Modality == "SEG" and raw.ReferencedSeriesSequence[0].SeriesInstanceUID == sources[0].SeriesInstanceUID
    assert raw.FrameOfReferenceUID == sources[0].FrameOfReferenceUID
    shared = raw.SharedFunctionalGroupsSequence[0]
    orientation = [float(v) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient]
    assert orientation == pytest.approx([float(v) for v in sources[0].ImageOrientationPatient])
    spacing = [float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing]
    assert spacing == pytest.approx([float(v) for v in sources[0].PixelSpacing])
    by_uid = {ds.SOPInstanceUID: ds for ds in sources}
    for frame in raw.PerFrameFunctionalGroupsSequence:
        referenced = by_uid[frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID]
        position = [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient]
        assert position == pytest.approx([float(v) for v in referenced.ImagePositionPatient])

    seg = hd.seg.segread(out / "val" / "seg.dcm")
    segments = {d.segment_number: d for d in seg.SegmentSequence}
    assert [segments[n].segment_label for n in sorted(segments)] == ["spleen", "liver", "stomach", "pancreas"]
    assert segments[2].segmented_property_type == codes.SCT.Liver
    uids = [ds.SOPInstanceUID for ds in sources]
    pixels = seg.get_pixels_by_source_instance(uids, combine_segments=True, skip_overlap_checks=True)
    to_voxel = np.linalg.inv(labels_img.affine)
    for ds, frame in zip(sources, pixels, strict=True):
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        k = int(round((to_voxel @ [-x, -y, z, 1])[2]))
        np.testing.assert_array_equal(frame, labels[:, :, k].T)


def test_the_real_nifti_ct_keeps_its_affine_and_shape(real_sites: Path, workspace: Path, tmp_path: Path):
    scan = real_sites / "site-1" / "imagesTr" / "val.nii.gz"
    model = workspace / "site-1" / "simulate_job" / "app_site-1"
    assert cli(["predict", "--model", str(model), "--input", str(scan), "--out", str(tmp_path / "out")]) == 0
    source, labels = nib.load(scan), nib.load(tmp_path / "out" / "val" / "labels.nii.gz")
    assert labels.shape == source.shape and labels.get_data_dtype() == np.uint8
    np.testing.assert_allclose(labels.affine, source.affine, atol=1e-5)
    assert not (tmp_path / "out" / "val" / "seg.dcm").exists()
