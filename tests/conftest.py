"""Shared fixtures: tiny synthetic sites written to disk with the real generator."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedseg3d.data.synthetic import generate_sites

CLASS_NAMES = {0: "background", 1: "organ", 2: "lesion"}


@pytest.fixture(scope="session")
def tiny_sites(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two small sites (one DICOM, one NIfTI) of 24 mm volumes: enough for real loading and a few training steps."""
    root = tmp_path_factory.mktemp("sites")
    generate_sites(root, n_sites=2, seed=1, fov_mm=32.0, cases_scale=0.2, dicom_sites=("site-2",))
    return root
