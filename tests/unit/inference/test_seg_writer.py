"""The DICOM SEG re-reads with pydicom and highdicom, lies on the source slices and holds the predicted labels."""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from predict_scans import AFFINE, block_volume
from pydicom.sr.codedict import codes

from fedseg3d.data.dataset import VolumeLoader
from fedseg3d.data.errors import DataError
from fedseg3d.inference.seg_writer import build_segmentation, fill_missing_uids, property_codes, read_series_headers

CLASSES = {0: "background", 1: "liver", 2: "lesion", 3: "blob"}


def labels_for(shape: tuple[int, int, int]) -> np.ndarray:
    labels = np.zeros(shape, dtype=np.uint8)
    labels[3:15, 5:17, 2:7] = 1
    labels[5:8, 6:9, 3:5] = 2
    labels[20:, :4, 8:] = 3
    return labels


@pytest.mark.parametrize("seg_type", ["binary", "labelmap"])
def test_the_seg_lies_on_the_source_slices_and_holds_the_labels(dicom_scan: Path, tmp_path: Path, seg_type: str):
    image = VolumeLoader()(dicom_scan)
    labels = labels_for(tuple(image.shape[1:]))
    sources = read_series_headers(dicom_scan)
    seg = build_segmentation(labels, np.asarray(image.affine), sources, CLASSES, dicom_scan, seg_type)
    seg.save_as(tmp_path / "seg.dcm")

    raw = pydicom.dcmread(tmp_path / "seg.dcm")
    assert raw.Modality == "SEG" and raw.SegmentationType == seg_type.upper()
    assert raw.ReferencedSeriesSequence[0].SeriesInstanceUID == sources[0].SeriesInstanceUID
    assert raw.FrameOfReferenceUID == sources[0].FrameOfReferenceUID
    shared = raw.SharedFunctionalGroupsSequence[0]
    assert [float(v) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient] == pytest.approx(
        [float(v) for v in sources[0].ImageOrientationPatient]
    )
    assert [float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing] == pytest.approx(
        [float(v) for v in sources[0].PixelSpacing]
    )
    by_uid = {ds.SOPInstanceUID: ds for ds in sources}
    for frame in raw.PerFrameFunctionalGroupsSequence:
        source = by_uid[frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID]
        position = frame.PlanePositionSequence[0].ImagePositionPatient
        assert [float(v) for v in position] == pytest.approx([float(v) for v in source.ImagePositionPatient])

    seg_read = hd.seg.segread(tmp_path / "seg.dcm")
    labelled = {d.segment_number: d.segment_label for d in seg_read.SegmentSequence if d.segment_number > 0}
    assert labelled == {1: "liver", 2: "lesion", 3: "blob"}  # a label map SEG also describes background (0)
    uids = [ds.SOPInstanceUID for ds in sources]
    pixels = seg_read.get_pixels_by_source_instance(uids, combine_segments=True, skip_overlap_checks=True)
    to_voxel = np.linalg.inv(np.asarray(image.affine))
    for ds, frame in zip(sources, pixels, strict=True):
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        k = int(round((to_voxel @ [-x, -y, z, 1])[2]))
        np.testing.assert_array_equal(frame, labels[:, :, k].T)


def test_known_organs_get_snomed_codes_and_others_a_generic_one():
    assert property_codes("Liver") == (codes.SCT.Organ, codes.SCT.Liver)
    assert property_codes("lesion")[1] == codes.SCT.Lesion
    assert property_codes("left_thing") == (codes.SCT.Tissue, codes.SCT.Tissue)


def test_blank_uids_are_filled_from_the_meta_header_or_derived_with_a_warning(dicom_scan: Path):
    sources = read_series_headers(dicom_scan)
    expected = [ds.SOPInstanceUID for ds in sources]
    for ds in sources:
        ds.SOPInstanceUID, ds.SOPClassUID, ds.SeriesInstanceUID = "", "", ""
    warnings = fill_missing_uids(sources, dicom_scan)
    assert [ds.SOPInstanceUID for ds in sources] == expected
    assert len({ds.SeriesInstanceUID for ds in sources}) == 1 and sources[0].SeriesInstanceUID
    assert len(warnings) == 1 and "no SeriesInstanceUID" in warnings[0]


def test_a_slice_off_the_volume_grid_is_refused(dicom_scan: Path):
    image = VolumeLoader()(dicom_scan)
    sources = read_series_headers(dicom_scan)
    sources[2].ImagePositionPatient = [float(v) + 0.7 for v in sources[2].ImagePositionPatient]
    with pytest.raises(DataError, match="is not on the read volume's grid"):
        build_segmentation(labels_for(block_volume().shape), np.asarray(AFFINE), sources, CLASSES, dicom_scan)
    del image
