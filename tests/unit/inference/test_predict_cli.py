"""``fedseg3d predict`` end to end on tiny scans: outputs in the scan's geometry, and bad input refused with the file
named and nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pytest
from predict_scans import block_volume, write_dicom_scan, write_nifti_scan
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from fedseg3d.cli import main as cli
from fedseg3d.inference.studies import find_studies


def predict(*args: str | Path) -> int:
    return cli(["predict", "--device", "cpu", *(str(a) for a in args)])


def test_a_nifti_scan_gets_labels_with_its_affine_and_shape_and_a_summary(site_models, nifti_scan, tmp_path):
    out = tmp_path / "out"
    assert predict("--model", site_models, "--input", nifti_scan, "--out", out) == 0
    source, labels = nib.load(nifti_scan), nib.load(out / "ct" / "labels.nii.gz")
    assert labels.shape == source.shape and labels.get_data_dtype() == np.uint8
    np.testing.assert_allclose(labels.affine, source.affine, atol=1e-5)
    summary = json.loads((out / "ct" / "summary.json").read_text())
    assert set(summary["volumes_ml"]) == {"liver"} and summary["device"] == "cpu" and summary["seconds"] > 0
    assert summary["model"]["provenance"]["job_id"] == "job-1" and summary["outputs"] == [
        "labels.nii.gz",
        "summary.json",
    ]
    assert json.loads((out / "summary.json").read_text())["studies"][0]["study"] == "ct"


def test_a_folder_of_studies_with_one_broken_series_writes_the_others_and_fails(site_models, tmp_path, capsys):
    studies = tmp_path / "studies"
    write_nifti_scan(studies / "a.nii.gz")
    write_dicom_scan(studies / "patient" / "ct")
    broken = write_dicom_scan(studies / "patient" / "gappy")
    sorted(broken.iterdir())[4].unlink()  # a missing slice
    (studies / "DICOMDIR.txt").write_text("not a study")
    out = tmp_path / "out"
    assert predict("--model", site_models, "--input", studies, "--out", out) == 1
    assert sorted(p.name for p in out.iterdir()) == ["a", "patient_ct", "summary.json"]  # no partial folder left
    assert (out / "patient_ct" / "seg.dcm").is_file()
    run = json.loads((out / "summary.json").read_text())
    assert [f["study"] for f in run["failed"]] == ["patient_gappy"] and "slice is missing" in run["failed"][0]["error"]
    printed = capsys.readouterr()
    assert "[3/3] patient_gappy: FAILED, nothing written" in printed.err and "[1/3] a:" in printed.out


def non_image_object(folder: Path) -> Path:
    """A Basic Text SR (a report, not an image) in its own folder, as a PACS export holds next to the images."""
    folder.mkdir(parents=True)
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.88.11", generate_uid()
    ds.Modality, ds.SeriesInstanceUID = "SR", generate_uid()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.save_as(folder / "report.dcm", enforce_file_format=True)
    return folder


def missing_slice(folder: Path) -> Path:
    write_dicom_scan(folder)
    sorted(folder.iterdir())[4].unlink()
    return folder


def four_d(folder: Path) -> Path:
    return write_nifti_scan(folder / "dynamic.nii.gz", np.stack([block_volume()] * 3, axis=-1))


def two_d(folder: Path) -> Path:
    return write_nifti_scan(folder / "slice.nii.gz", block_volume()[:, :, 0])


@pytest.mark.parametrize(
    "make, named, message",
    [
        (non_image_object, "report.dcm", "not an image storage class"),
        (missing_slice, "series", "a slice is missing"),
        (four_d, "dynamic.nii.gz", "expected a single-channel 3D image"),
        (two_d, "slice.nii.gz", "expected a single-channel 3D image"),
    ],
    ids=["non-image-dicom", "missing-slice", "4d", "2d"],
)
def test_bad_input_is_named_and_writes_nothing(site_models, tmp_path, capsys, make, named, message):
    scan = make(tmp_path / "scans" / "series" if make in (missing_slice, non_image_object) else tmp_path / "scans")
    out = tmp_path / "out"
    assert predict("--model", site_models, "--input", scan, "--out", out) == 1
    error = capsys.readouterr().err
    assert named in error and message in error, error
    assert not out.exists()


def test_a_model_whose_classes_differ_from_the_request_is_refused(site_models, nifti_scan, tmp_path, capsys):
    out = tmp_path / "out"
    assert predict("--model", site_models, "--input", nifti_scan, "--out", out, "--classes", "spleen,liver") == 2
    error = capsys.readouterr().err
    assert "['liver']" in error and "['spleen', 'liver']" in error and str(site_models) in error
    assert not out.exists()
    assert predict("--model", site_models, "--input", nifti_scan, "--out", out, "--classes", "background,liver") == 0


def test_an_unreadable_model_file_is_named_and_nothing_is_written(site_models, nifti_scan, tmp_path, capsys):
    (site_models / "best_model.pt").write_bytes(b"\x00truncated")
    out = tmp_path / "out"
    assert predict("--model", site_models, "--input", nifti_scan, "--out", out) == 2
    assert "best_model.pt: not a readable PyTorch checkpoint" in capsys.readouterr().err
    assert not out.exists()


def test_existing_outputs_are_kept_unless_overwrite(site_models, nifti_scan, tmp_path, capsys):
    out = tmp_path / "out"
    assert predict("--model", site_models, "--input", nifti_scan, "--out", out) == 0
    assert predict("--model", site_models, "--input", nifti_scan, "--out", out) == 2
    assert "output exists; use another --out or --overwrite" in capsys.readouterr().err
    assert predict("--model", site_models, "--input", nifti_scan, "--out", out, "--overwrite") == 0


def test_a_failure_while_writing_leaves_no_partial_output(site_models, dicom_scan, tmp_path, monkeypatch, capsys):
    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(hd.seg.Segmentation, "save_as", disk_full)  # after labels.nii.gz is written
    out = tmp_path / "out"
    assert predict("--model", site_models, "--input", dicom_scan, "--out", out) == 1
    assert "No space left on device" in capsys.readouterr().err
    assert list(out.iterdir()) == []  # neither the study's folder nor its hidden partial one


def test_studies_are_found_as_files_series_folders_and_folders_of_both(tmp_path):
    write_nifti_scan(tmp_path / "in" / "x.nii.gz")
    write_dicom_scan(tmp_path / "in" / "p1" / "s1")
    (tmp_path / "in" / "notes.txt").write_text("")
    studies, ignored = find_studies(tmp_path / "in")
    assert [(s.study_id, s.kind) for s in studies] == [("p1_s1", "dicom"), ("x", "nifti")]
    assert ignored == [tmp_path / "in" / "notes.txt"]
    assert [s.kind for s in find_studies(tmp_path / "in" / "p1" / "s1")[0]] == ["dicom"]
