"""The real sites: which reference scan each site holds, its scanner, its intensity handling and its z split.

A site is one subject, so its training and validation cases are slabs of the same scan along z (slice ranges of the
label map), separated by a gap of unused slices: no validation voxel is in a training case, and the slices that
touch the validation slab are not either. Every case written is checked the way training reads it
(``CasePreparer``: DICOM series check, RAS orientation, same geometry for image and label, label mapping).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pydicom

from fedseg3d.data.datalist import Case
from fedseg3d.data.dataset import CasePreparer
from fedseg3d.data.errors import DataError
from fedseg3d.data.site_config import SiteConfig
from fedseg3d.data.transforms import PreprocessConfig

POSITION_TOL_MM = 0.01  # matching a DICOM slice to a label slice; slices here are 2 mm apart
CT_WINDOW = {"mode": "ct_window", "window": [-200.0, 300.0]}  # soft-tissue abdomen window, in HU
MR_PERCENTILES = {"mode": "mr_percentile", "percentiles": [1.0, 99.0]}


@dataclass(frozen=True)
class Slab:
    """Slices ``first`` to ``stop - 1`` of the label map, along its third axis."""

    first: int
    stop: int


@dataclass(frozen=True)
class SiteRecipe:
    """One site built from the reference files.

    Attributes:
        name: the FLARE site name.
        scanner: what a hospital would say about its scanner and format.
        modality: ``CT`` or ``MR``.
        image: NIfTI file or DICOM series folder, relative to ``reference_files``.
        label: the NIfTI label map on the same grid, relative to ``reference_files``.
        task: the TotalSegmentator class map whose IDs ``label`` uses (``total`` for CT, ``total_mr`` for MR).
        intensity: the site's ``intensity`` field (``SiteIntensity``).
        training: the training slabs (one case each).
        validation: the validation slab.
    """

    name: str
    scanner: str
    modality: str
    image: str
    label: str
    task: str
    intensity: dict[str, Any]
    training: tuple[Slab, ...]
    validation: Slab


# A table: each recipe reads as one block.
# fmt: off
SITES = (
    # Organs lie in slices 66-111 of this abdomen-pelvis scan; the slabs keep 60-111 and validate in the middle,
    # where all four default classes are, training on both sides.
    SiteRecipe(
        "site-1", "CT, 3 mm isotropic, NIfTI (TotalSegmentator example_ct)", "CT", "example_ct.nii.gz",
        label="example_seg_fast_force_split.nii.gz", task="total", intensity=CT_WINDOW,
        training=(Slab(60, 84), Slab(100, 112)), validation=Slab(86, 98),
    ),
    SiteRecipe(
        "site-2", "Siemens Biograph40 mCT, CT DICOM series, 0.98 x 0.98 x 2 mm, 3 mm slices (example_ct_dicom)",
        "CT", "example_ct_dicom", label="example_seg_dicom.nii.gz", task="total", intensity=CT_WINDOW,
        training=(Slab(0, 12),), validation=Slab(14, 20),
    ),
    SiteRecipe(
        "site-3", "MR, 3 mm isotropic, NIfTI (example_mr_sm)", "MR", "example_mr_sm.nii.gz",
        label="example_seg_mr.nii.gz", task="total_mr", intensity=MR_PERCENTILES,
        training=(Slab(0, 12),), validation=Slab(14, 20),
    ),
)
# fmt: on


def consortium_classes(sources: dict[str, str]) -> dict[int, str]:
    """Class index -> consortium name, background at 0, in the order ``sources`` lists the classes."""
    return {0: "background", **{i + 1: name for i, name in enumerate(sources)}}


def site_label_map(recipe: SiteRecipe, sources: dict[str, str], class_maps: dict[str, dict[int, str]]) -> dict:
    """The site's ``label_map`` field: the site's own ID of each consortium class (``sources`` maps the consortium's
    name to TotalSegmentator's), read from TotalSegmentator's class map for the site's task.

    Raises:
        DataError: the site's task has no structure of that name.
    """
    ids = {name: site_id for site_id, name in class_maps[recipe.task].items()}
    missing = [source for source in sources.values() if source not in ids]
    if missing:
        raise DataError(recipe.label, f"{missing} are not in TotalSegmentator's '{recipe.task}' class map")
    return {str(ids[source]): name for name, source in sources.items()}


def _check_slabs(recipe: SiteRecipe, depth: int) -> None:
    slabs = sorted([*recipe.training, recipe.validation], key=lambda s: s.first)
    for slab in slabs:
        if not 0 <= slab.first < slab.stop <= depth:
            raise DataError(recipe.label, f"{recipe.name}: slab {slab} is outside slices 0..{depth - 1}")
    for a, b in zip(slabs, slabs[1:], strict=False):
        if a.stop > b.first:
            raise DataError(recipe.label, f"{recipe.name}: slabs {a} and {b} overlap")


def _dicom_slices(folder: Path, label: nib.Nifti1Image, slab: Slab) -> list[Path]:
    """The series files at the label slab's slice positions (matched along the slice normal, in LPS mm)."""
    headers = {p: pydicom.dcmread(p, stop_before_pixels=True) for p in sorted(folder.iterdir()) if p.is_file()}
    orientation = np.asarray([float(v) for v in next(iter(headers.values())).ImageOrientationPatient])
    normal = np.cross(orientation[:3], orientation[3:])
    depth = {p: float(np.asarray([float(v) for v in h.ImagePositionPatient]) @ normal) for p, h in headers.items()}
    chosen = []
    for k in range(slab.first, slab.stop):
        ras = label.affine @ np.array([0.0, 0.0, k, 1.0])
        want = float(np.array([-ras[0], -ras[1], ras[2]]) @ normal)
        match = [p for p, d in depth.items() if abs(d - want) < POSITION_TOL_MM]
        if len(match) != 1:
            raise DataError(folder, f"{len(match)} DICOM slice(s) at label slice {k} ({want:.2f} mm along the normal)")
        chosen.append(match[0])
    return chosen


def _write_case(recipe: SiteRecipe, reference: Path, site_dir: Path, case: str, slab: Slab) -> dict[str, str]:
    label = nib.load(reference / recipe.label)
    label_rel = f"labelsTr/{case}.nii.gz"
    (site_dir / "labelsTr").mkdir(parents=True, exist_ok=True)
    label_slab = label.slicer[:, :, slab.first : slab.stop]
    nib.save(nib.Nifti1Image(np.asarray(label_slab.dataobj).astype(np.uint8), label_slab.affine), site_dir / label_rel)
    source = reference / recipe.image
    if source.is_dir():
        image_rel = f"imagesTr/{case}"
        (site_dir / image_rel).mkdir(parents=True)
        for path in _dicom_slices(source, label, slab):
            shutil.copy2(path, site_dir / image_rel / path.name)  # the scanner's own files, byte for byte
    else:
        image = nib.load(source)
        if image.shape != label.shape or not np.allclose(image.affine, label.affine, atol=1e-3):
            raise DataError(source, f"image grid {image.shape} differs from label {recipe.label} {label.shape}")
        image_rel = f"imagesTr/{case}.nii.gz"
        (site_dir / "imagesTr").mkdir(parents=True, exist_ok=True)
        nib.save(image.slicer[:, :, slab.first : slab.stop], site_dir / image_rel)
    return {"image": image_rel, "label": label_rel}


def _class_voxels(preparer: CasePreparer, case: Case, consortium: dict[int, str]) -> dict[str, int]:
    """Voxels of each consortium class in the case as training sees it (mapped, resampled); checks the case too."""
    label = preparer(case)["label"]
    return {name: int((label == i).sum()) for i, name in consortium.items() if i}


def build_site(
    recipe: SiteRecipe,
    reference: Path,
    out_dir: Path,
    sources: dict[str, str],
    class_maps: dict[str, dict[int, str]],
) -> tuple[Path, dict[str, Any]]:
    """Write one site folder (images, labels, ``datalist.json``, ``site.json``) and return it with a summary.

    ``sources`` maps each consortium class name to the TotalSegmentator structure it is made from.

    Raises:
        DataError: a slab is outside the scan or overlaps another, a case fails the training checks, or the
            validation slab holds no consortium class.
    """
    consortium = consortium_classes(sources)
    label_img = nib.load(reference / recipe.label)
    _check_slabs(recipe, label_img.shape[2])
    site_dir = out_dir / recipe.name
    if site_dir.exists():
        shutil.rmtree(site_dir)
    site_dir.mkdir(parents=True)
    slabs = {f"train_{i + 1}": s for i, s in enumerate(recipe.training)} | {"val": recipe.validation}
    entries = {case: _write_case(recipe, reference, site_dir, case, slab) for case, slab in slabs.items()}
    site = {
        "site_name": recipe.name,
        "data_root": ".",
        "datalist": "datalist.json",
        "num_threads": 1,
        "scanner": recipe.scanner,
        "label_map": site_label_map(recipe, sources, class_maps),
        "unmapped_labels": "background",  # TotalSegmentator labels ~100 other structures: not consortium classes
        "intensity": recipe.intensity,
    }
    datalist = {
        "name": f"fedseg3d real {recipe.name}",
        "description": recipe.scanner,
        "labels": {str(i): name for i, name in consortium.items()},
        "modality": {"0": recipe.modality},
        "training": [entries[c] for c in slabs if c != "val"],
        "validation": [entries["val"]],
    }
    (site_dir / "site.json").write_text(json.dumps(site, indent=2) + "\n")
    (site_dir / "datalist.json").write_text(json.dumps(datalist, indent=2) + "\n")

    # Read back through the site config reader, as a learner will: the written facts are the ones checked.
    written = SiteConfig.from_file(site_dir / "site.json", site_name=recipe.name)
    preprocess = written.preprocessing_for(PreprocessConfig())
    relabel = written.label_map.for_classes(consortium)
    preparer = CasePreparer(preprocess, num_classes=len(consortium), relabel=relabel)
    voxels = {
        case: _class_voxels(preparer, Case(case, site_dir / e["image"], site_dir / e["label"]), consortium)
        for case, e in entries.items()
    }
    if not any(voxels["val"].values()):
        raise DataError(site_dir / "datalist.json", f"validation slab {recipe.validation} has no consortium class")
    spacing = [round(float(v), 4) for v in label_img.header.get_zooms()[:3]]
    ordered = sorted(slabs.values(), key=lambda s: s.first)
    gap = min(b.first - a.stop for a, b in zip(ordered, ordered[1:], strict=False))
    summary = {
        "site_name": recipe.name,
        "scanner": recipe.scanner,
        "modality": recipe.modality,
        "image_format": "dicom" if (reference / recipe.image).is_dir() else "nifti",
        "source_image": recipe.image,
        "source_label": recipe.label,
        "shape": list(label_img.shape),
        "spacing_mm": spacing,
        "slabs": {case: [s.first, s.stop] for case, s in slabs.items()},
        "smallest_gap_mm": round(gap * spacing[2], 4),
        "preprocessed_spacing_mm": list(preprocess.target_spacing),
        "class_voxels_preprocessed": voxels,
    }
    return site_dir, summary
