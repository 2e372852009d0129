"""Fixtures of the inference tests: a small CT block as NIfTI and as a DICOM series, and a site's model folder."""

from __future__ import annotations

from pathlib import Path

import pytest
from predict_scans import write_dicom_scan, write_nifti_scan, write_site_models


@pytest.fixture
def nifti_scan(tmp_path: Path) -> Path:
    return write_nifti_scan(tmp_path / "scans" / "ct.nii.gz")


@pytest.fixture
def dicom_scan(tmp_path: Path) -> Path:
    return write_dicom_scan(tmp_path / "scans" / "series")


@pytest.fixture
def site_models(tmp_path: Path) -> Path:
    return write_site_models(tmp_path / "job" / "app_site-1" / "site_models")
