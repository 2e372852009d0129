"""Segment one study and write its outputs all at once, or not at all.

Outputs go to a hidden temporary folder next to the final one and are renamed into place only when every file is
written, so a study that fails (unreadable series, bad geometry, an interrupted run) leaves no partial output that a
viewer or a script could mistake for a result.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch

from fedseg3d.data.dataset import VolumeLoader
from fedseg3d.data.dicom import check_dicom_series
from fedseg3d.inference.deployable import DeployableModel
from fedseg3d.inference.seg_writer import build_segmentation, fill_missing_uids, read_series_headers
from fedseg3d.inference.segment import class_volumes_ml, segment_volume
from fedseg3d.inference.studies import Study

LABELS_FILE = "labels.nii.gz"
SEG_FILE = "seg.dcm"
SUMMARY_FILE = "summary.json"


@dataclass(frozen=True)
class PredictSettings:
    """How every study of a run is segmented and written."""

    device: torch.device
    overlap: float = 0.25
    amp: bool = True
    seg_type: str = "binary"
    overwrite: bool = False
    software_version: str = "fedseg3d"


def output_folder(out_dir: Path, study: Study) -> Path:
    return Path(out_dir) / study.study_id


def check_output_free(out_dir: Path, study: Study, overwrite: bool) -> None:
    """Refuse before any work when the study's outputs exist and may not be replaced.

    Raises:
        FileExistsError: naming the folder.
    """
    final = output_folder(out_dir, study)
    if final.exists() and not overwrite:
        raise FileExistsError(f"{final}: output exists; use another --out or --overwrite")


def segment_study(
    study: Study, model: DeployableModel, out_dir: Path, settings: PredictSettings, model_info: dict[str, Any]
) -> dict[str, Any]:
    """Segment ``study`` and write ``labels.nii.gz`` (and ``seg.dcm`` for DICOM) plus ``summary.json``.

    ``model_info`` (the model's path, preset, classes and provenance) goes into the summary as it is.

    Returns:
        The study's summary (also written as ``summary.json``).

    Raises:
        DataError: the study cannot be read or is not a single 3D scan (nothing is written).
        FileExistsError: its output folder exists and ``settings.overwrite`` is false.
    """
    started = time.perf_counter()
    check_output_free(out_dir, study, settings.overwrite)
    if study.kind == "dicom":
        check_dicom_series(study.path)  # a broken series is refused, never silently stacked
    image = VolumeLoader()(study.path)
    labels = segment_volume(model, image, study.path, settings.device, settings.overlap, settings.amp)
    array, affine = labels.numpy(), np.asarray(labels.affine, dtype=np.float64)
    seg, warnings = None, []
    if study.kind == "dicom":
        sources = read_series_headers(study.path)
        warnings = fill_missing_uids(sources, study.path)
        seg = build_segmentation(
            array,
            affine,
            sources,
            model.class_names,
            study.path,
            settings.seg_type,
            settings.software_version,
            f"fedseg3d {model.model_preset}",
        )
    summary = {
        "study": study.study_id,
        "input": str(study.path),
        "kind": study.kind,
        "shape": list(array.shape),
        "voxel_size_mm": [round(float(v), 4) for v in np.linalg.norm(affine[:3, :3], axis=0)],
        "volumes_ml": class_volumes_ml(array, affine, model.class_names),
        "outputs": [LABELS_FILE, *([SEG_FILE] if seg is not None else []), SUMMARY_FILE],
        "warnings": warnings,
        "device": str(settings.device),
        "amp": settings.amp and settings.device.type == "cuda",
        "sliding_window": {"roi_size": list(model.preprocessing.roi_size), "overlap": settings.overlap},
        "model": model_info,
    }
    _write_atomically(output_folder(out_dir, study), array, affine, seg, summary, started, settings.overwrite)
    return summary


def _write_atomically(
    final: Path, array: np.ndarray, affine: np.ndarray, seg, summary: dict, started: float, overwrite: bool
) -> None:
    final.parent.mkdir(parents=True, exist_ok=True)
    partial = final.parent / f".{final.name}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    try:
        partial.mkdir()
        image = nib.Nifti1Image(array.astype(np.uint8), affine)
        image.set_qform(affine, code=1)  # scanner coordinates: viewers place the labels on the scan
        image.set_sform(affine, code=1)
        nib.save(image, partial / LABELS_FILE)
        if seg is not None:
            seg.save_as(partial / SEG_FILE)
        summary["seconds"] = round(time.perf_counter() - started, 2)
        (partial / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
        if final.exists() and overwrite:
            shutil.rmtree(final)
        partial.rename(final)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
