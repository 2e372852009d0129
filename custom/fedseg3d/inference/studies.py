"""What ``fedseg3d predict`` is given, as a list of studies: one NIfTI file, one DICOM series folder, or a folder of
several (each NIfTI file and each folder of DICOM files below it is one study).

A folder is a DICOM series when it holds files and no sub-folders or NIfTI files; whether its files really form one
clean series is checked per study when it is read, so one bad series fails alone instead of stopping the run.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fedseg3d.data.case_checks import NIFTI_SUFFIXES, is_nifti
from fedseg3d.data.errors import DataError


@dataclass(frozen=True)
class Study:
    """One scan to segment: its id (unique within the run; names its outputs), its path and its kind."""

    study_id: str
    path: Path
    kind: str  # "nifti" or "dicom"


def _visible(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


def _strip_nifti(name: str) -> str:
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def is_series_folder(folder: Path) -> bool:
    """Files only, none of them NIfTI: read as one DICOM series."""
    entries = _visible(folder)
    return bool(entries) and all(p.is_file() and not is_nifti(p) for p in entries)


def find_studies(source: Path) -> tuple[list[Study], list[Path]]:
    """The studies under ``source``, and the files skipped as neither NIfTI nor part of a series folder.

    Raises:
        DataError: ``source`` does not exist, is a file that is not NIfTI, or holds no study.
    """
    source = Path(source)
    if not source.exists():
        raise DataError(source, "input not found")
    if source.is_file():
        if not is_nifti(source):
            raise DataError(source, "unsupported input: expected a NIfTI file (.nii/.nii.gz) or a folder")
        return [Study(_strip_nifti(source.name), source, "nifti")], []
    if is_series_folder(source):
        return [Study(source.name, source, "dicom")], []
    studies: list[Study] = []
    ignored: list[Path] = []
    _collect(source, source, studies, ignored)
    if not studies:
        raise DataError(source, "no NIfTI file or DICOM series folder found")
    return studies, ignored


def _collect(root: Path, folder: Path, studies: list[Study], ignored: list[Path]) -> None:
    for entry in _visible(folder):
        relative = entry.relative_to(root)
        if entry.is_dir():
            if is_series_folder(entry):
                studies.append(Study("_".join(relative.parts), entry, "dicom"))
            else:
                _collect(root, entry, studies, ignored)
        elif is_nifti(entry):
            studies.append(Study(_strip_nifti("_".join(relative.parts)), entry, "nifti"))
        else:
            ignored.append(entry)  # e.g. a DICOMDIR or a README next to the series folders
