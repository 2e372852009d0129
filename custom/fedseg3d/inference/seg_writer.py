"""A DICOM Segmentation object for a label map predicted on a DICOM series, with highdicom.

Why highdicom: it is the maintained implementation of the SEG IOD (segment descriptions, coded concepts, frame
references, dimension index), which PACS, 3D Slicer and OHIF read. The SEG references the source series, uses the
consortium's class names as segment labels and SNOMED CT codes for organs it knows (a generic "Tissue" code for
others), and each frame lies on a source slice: frame geometry is the source's, not recomputed.

Geometry: the label map is indexed ``[i, j, k]`` with the RAS affine MONAI's DICOM reader gives the series (see
``fedseg3d.data.dicom``). Each source slice's ImagePositionPatient (LPS) is mapped to a voxel index through that
affine; it must land on ``(0, 0, k)`` for a whole ``k``, and the slice's frame is ``labels[:, :, k].T`` (rows along
``j``, columns along ``i``).
"""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from fedseg3d.data.errors import DataError

SEG_TYPES = ("binary", "labelmap")
# Organ names a consortium is likely to use, as SNOMED CT concepts (pydicom's code dictionary); others get Tissue.
_ORGANS = {
    "spleen": codes.SCT.Spleen,
    "liver": codes.SCT.Liver,
    "stomach": codes.SCT.Stomach,
    "pancreas": codes.SCT.Pancreas,
    "kidney": codes.SCT.Kidney,
    "gallbladder": codes.SCT.Gallbladder,
    "esophagus": codes.SCT.Esophagus,
    "aorta": codes.SCT.Aorta,
    "duodenum": codes.SCT.Duodenum,
    "lung": codes.SCT.Lung,
    "heart": codes.SCT.Heart,
    "bladder": codes.SCT.Bladder,
    "prostate": codes.SCT.Prostate,
    "brain": codes.SCT.Brain,
    "adrenal gland": codes.SCT.AdrenalGland,
    "inferior vena cava": codes.SCT.InferiorVenaCava,
    "colon": codes.SCT.Colon,
    "small intestine": codes.SCT.SmallIntestine,
}
_ABNORMAL = {"lesion": codes.SCT.Lesion, "tumor": codes.SCT.Tumor, "tumour": codes.SCT.Tumor}
_POSITION_TOLERANCE = 1e-2  # in voxels: DS strings keep ~13 digits, far below this


def property_codes(name: str) -> tuple[hd.sr.CodedConcept, hd.sr.CodedConcept]:
    """(category, type) codes for a class name: SNOMED organ or lesion codes when known, else generic Tissue."""
    key = name.strip().lower().replace("_", " ")
    if key in _ORGANS:
        return codes.SCT.Organ, _ORGANS[key]
    if key in _ABNORMAL:
        return codes.SCT.MorphologicallyAbnormalStructure, _ABNORMAL[key]
    return codes.SCT.Tissue, codes.SCT.Tissue


def read_series_headers(folder: Path) -> list[Dataset]:
    """The series' datasets without pixel data (what a SEG needs to reference them), hidden files skipped.

    Raises:
        DataError: a file is not readable as DICOM (naming it).
    """
    datasets = []
    for path in sorted(p for p in Path(folder).iterdir() if p.is_file() and not p.name.startswith(".")):
        try:
            datasets.append(pydicom.dcmread(path, stop_before_pixels=True))
        except Exception as err:  # pydicom raises many types for corrupt files; all mean "not DICOM" here
            raise DataError(path, f"not a readable DICOM file ({type(err).__name__})") from err
    return datasets


def fill_missing_uids(sources: list[Dataset], folder: Path) -> list[str]:
    """Give a series with empty UIDs (some anonymisers blank them) the UIDs a SEG must reference; say what was done.

    The SOP class and instance come from each file's meta header, where the standard keeps the same values. A blank
    study or series UID cannot be recovered: one is derived from the frame of reference (the same for every file,
    and for every run), and the warning says that a viewer will not link the SEG to the series on its own.
    """
    warnings = []
    for ds in sources:
        meta = getattr(ds, "file_meta", Dataset())
        if not ds.get("SOPClassUID") and meta.get("MediaStorageSOPClassUID"):
            ds.SOPClassUID = meta.MediaStorageSOPClassUID
        if not ds.get("SOPInstanceUID") and meta.get("MediaStorageSOPInstanceUID"):
            ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    blank = [ds for ds in sources if not ds.get("SOPClassUID") or not ds.get("SOPInstanceUID")]
    if blank:
        raise DataError(folder, f"{len(blank)} file(s) have no SOPClassUID/SOPInstanceUID, in the header or the meta")
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID"):
        if all(ds.get(keyword) for ds in sources):
            continue
        anchor = str(sources[0].get("FrameOfReferenceUID") or folder.name)
        uid = generate_uid(entropy_srcs=[anchor, keyword])
        for ds in sources:
            setattr(ds, keyword, ds.get(keyword) or uid)
        warnings.append(
            f"{folder}: source files have no {keyword}; the SEG references the derived {uid}, so a viewer will not "
            "link it to the series by itself"
        )
    return warnings


def _frame_positions(ds: Dataset) -> list[np.ndarray]:
    """ImagePositionPatient of each frame: the file's own for a slice, the per-frame groups' for a multi-frame."""
    if "PerFrameFunctionalGroupsSequence" in ds:
        return [
            np.asarray(g.PlanePositionSequence[0].ImagePositionPatient, float)
            for g in ds.PerFrameFunctionalGroupsSequence
        ]
    return [np.asarray(ds.ImagePositionPatient, float)]


def frames_for_sources(labels: np.ndarray, affine_ras: np.ndarray, sources: list[Dataset], folder: Path) -> np.ndarray:
    """The label map as one frame per source frame, in the order of ``sources`` (and their frames).

    Raises:
        DataError: naming ``folder``: a source frame does not lie on a slice of the label map's grid.
    """
    to_voxel = np.linalg.inv(np.asarray(affine_ras, dtype=np.float64))
    frames = []
    for ds in sources:
        for position in _frame_positions(ds):
            ras = np.array([-position[0], -position[1], position[2], 1.0])
            i, j, k = (to_voxel @ ras)[:3]
            slice_index = int(round(k))
            off_grid = max(abs(i), abs(j), abs(k - slice_index)) > _POSITION_TOLERANCE
            if off_grid or not 0 <= slice_index < labels.shape[2]:
                raise DataError(
                    folder,
                    f"slice at {position.tolist()} (SOPInstanceUID {ds.SOPInstanceUID}) is not on the read volume's "
                    f"grid (voxel {np.round([i, j, k], 3).tolist()})",
                )
            frames.append(labels[:, :, slice_index].T)
    return np.stack(frames)


def build_segmentation(
    labels: np.ndarray,
    affine_ras: np.ndarray,
    sources: list[Dataset],
    class_names: dict[int, str],
    folder: Path,
    seg_type: str = "binary",
    software_version: str = "fedseg3d",
    description: str = "",
) -> hd.seg.Segmentation:
    """A DICOM SEG of ``labels`` (``[i, j, k]`` on the series' grid) referencing ``sources``.

    Args:
        labels: uint8 label map, 0 background.
        affine_ras: its voxel-to-RAS affine (MONAI's for the series).
        sources: the series' datasets (``read_series_headers``).
        class_names: index -> name, background at 0; each foreground class becomes a segment with that number.
        folder: the series folder, for errors.
        seg_type: ``binary`` (one bit-frame per segment and slice; read by every SEG viewer) or ``labelmap``
            (one 8-bit frame per slice, DICOM 2024's Label Map Segmentation; fewer viewers read it yet).
        software_version: recorded as SoftwareVersions and the algorithm's version.
        description: SeriesDescription.
    """
    if seg_type not in SEG_TYPES:
        raise ValueError(f"seg_type must be one of {SEG_TYPES}, got {seg_type!r}")
    algorithm = hd.AlgorithmIdentificationSequence(
        name="fedseg3d", family=codes.cid7162.ArtificialIntelligence, version=software_version
    )
    segments = []
    for number in sorted(n for n in class_names if n > 0):
        category, kind = property_codes(class_names[number])
        segments.append(
            hd.seg.SegmentDescription(
                segment_number=number,
                segment_label=class_names[number],
                segmented_property_category=category,
                segmented_property_type=kind,
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                algorithm_identification=algorithm,
            )
        )
    pixel_array = frames_for_sources(labels, affine_ras, sources, folder)
    return hd.seg.Segmentation(
        source_images=sources,
        pixel_array=pixel_array,
        segmentation_type=seg_type.upper(),
        segment_descriptions=segments,
        series_instance_uid=generate_uid(),
        series_number=int(sources[0].get("SeriesNumber") or 0) + 1000,  # a new series next to the source's
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer="fedseg3d",
        manufacturer_model_name="fedseg3d predict",
        software_versions=software_version,
        device_serial_number="none",
        series_description=description[:64] or "fedseg3d segmentation",
    )
