"""Every bad-input case the site must refuse before training, each through the real loading path."""

import gzip
import logging
import shutil

import nibabel as nib
import numpy as np
import pytest

from fedseg3d.data.datalist import Case
from fedseg3d.data.dataset import CasePreparer, prepare_cases
from fedseg3d.data.errors import DataError
from fedseg3d.data.transforms import PreprocessConfig

AFFINE = np.diag([2.0, 2.0, 2.0, 1.0])


def volume(shape=(12, 12, 12), seed=0):
    return np.random.default_rng(seed).normal(100, 10, shape).astype(np.float32)


def label_map(shape=(12, 12, 12)):
    label = np.zeros(shape, dtype=np.uint8)
    label[3:9, 3:9, 3:9] = 1
    label[5:7, 5:7, 5:7] = 2
    return label


def write_case(tmp_path, name="c", image=None, label=None, image_affine=AFFINE, label_affine=AFFINE):
    image_path, label_path = tmp_path / f"{name}_img.nii.gz", tmp_path / f"{name}_seg.nii.gz"
    nib.save(nib.Nifti1Image(volume() if image is None else image, image_affine), image_path)
    nib.save(nib.Nifti1Image(label_map() if label is None else label, label_affine), label_path)
    return Case(name, image_path, label_path)


@pytest.fixture
def preparer():
    return CasePreparer(PreprocessConfig(target_spacing=(2.0, 2.0, 2.0), roi_size=(8, 8, 8)), num_classes=3)


def test_good_case_is_resampled_and_normalised(tmp_path, preparer):
    item = preparer(write_case(tmp_path))
    assert tuple(item["image"].shape) == (1, 12, 12, 12)
    assert float(item["image"].min()) >= 0.0 and float(item["image"].max()) <= 1.0
    assert set(item["label"].unique().tolist()) == {0.0, 1.0, 2.0}


def expect(preparer, case, path, message):
    with pytest.raises(DataError) as err:
        preparer(case)
    assert err.value.path == str(path)
    assert message in str(err.value)


def test_missing_image(tmp_path, preparer):
    case = write_case(tmp_path)
    case.image.unlink()
    expect(preparer, case, case.image, "image not found")


def test_missing_label(tmp_path, preparer):
    case = write_case(tmp_path)
    case.label.unlink()
    expect(preparer, case, case.label, "label not found")


def test_truncated_file(tmp_path, preparer):
    case = write_case(tmp_path)
    data = case.image.read_bytes()
    case.image.write_bytes(data[: len(data) // 2])
    expect(preparer, case, case.image, "unreadable or truncated file")


def test_truncated_uncompressed_nifti(tmp_path, preparer):
    case = write_case(tmp_path)
    raw = tmp_path / "raw.nii"
    with gzip.open(case.image) as src, raw.open("wb") as dst:
        shutil.copyfileobj(src, dst)
    raw.write_bytes(raw.read_bytes()[:-500])
    expect(preparer, Case("c", raw, case.label), raw, "unreadable or truncated file")


def test_unsupported_format(tmp_path, preparer):
    case = write_case(tmp_path)
    png = tmp_path / "scan.png"
    png.write_bytes(b"\x89PNG")
    expect(preparer, Case("c", png, case.label), png, "unsupported image format")


def test_shape_mismatch(tmp_path, preparer):
    case = write_case(tmp_path, label=label_map((12, 12, 10)))
    expect(preparer, case, case.label, "label shape (12, 12, 10) differs from image shape (12, 12, 12)")


def test_geometry_mismatch(tmp_path, preparer):
    shifted = AFFINE.copy()
    shifted[:3, 3] = [5.0, 0.0, 0.0]
    case = write_case(tmp_path, label_affine=shifted)
    expect(preparer, case, case.label, "label geometry differs from image")


def test_same_grid_in_another_orientation_is_accepted(tmp_path, preparer):
    flipped_affine = AFFINE.copy()
    flipped_affine[0, 0] = -2.0
    flipped_affine[0, 3] = 22.0  # voxel 11 of the flipped axis sits where voxel 0 of the original does
    case = write_case(tmp_path, label=label_map()[::-1].copy(), label_affine=flipped_affine)
    item = preparer(case)
    assert item["label"].sum() > 0


def test_label_values_outside_classes(tmp_path, preparer):
    label = label_map()
    label[0, 0, 0] = 7
    case = write_case(tmp_path, label=label)
    expect(preparer, case, case.label, "label values [7] are outside the declared classes 0..2")


def test_non_integer_label(tmp_path, preparer):
    label = label_map().astype(np.float32)
    label[0, 0, 0] = 0.5
    case = write_case(tmp_path, label=label)
    expect(preparer, case, case.label, "non-integer values")


def test_empty_image(tmp_path, preparer):
    case = write_case(tmp_path, image=np.zeros((12, 12, 12), np.float32))
    expect(preparer, case, case.image, "empty image: every voxel has the same value (0.0)")


def test_non_finite_image(tmp_path, preparer):
    image = volume()
    image[1, 1, 1] = np.nan
    case = write_case(tmp_path, image=image)
    expect(preparer, case, case.image, "non-finite voxel")


def test_dicom_folder_mixing_series_is_refused(tmp_sites_with_dicom, preparer):
    case, folder = tmp_sites_with_dicom
    expect(preparer, case, folder, "series")


@pytest.fixture
def tmp_sites_with_dicom(tiny_sites, tmp_path):
    """A DICOM case whose folder gets a second series' slices mixed in."""
    import json

    site = tiny_sites / "site-2"
    entries = json.loads((site / "datalist.json").read_text())["training"]
    first, second = (site / entries[0]["image"]), (site / entries[1]["image"])
    mixed = tmp_path / "mixed"
    shutil.copytree(first, mixed)
    for index, path in enumerate(sorted(second.iterdir())):
        shutil.copy(path, mixed / f"other_{index}.dcm")
    return Case("mixed", mixed, site / entries[0]["label"]), mixed


def test_dicom_case_loads_through_the_same_checks(tiny_sites, preparer):
    import json

    site = tiny_sites / "site-2"
    entry = json.loads((site / "datalist.json").read_text())["training"][0]
    item = preparer(Case("d", site / entry["image"], site / entry["label"]))
    assert item["label"].max() == 2


def test_skip_bad_cases_keeps_the_good_ones(tmp_path, preparer, caplog):
    good = write_case(tmp_path, "good")
    bad = write_case(tmp_path, "bad")
    bad.label.unlink()
    with pytest.raises(DataError, match="label not found"):
        prepare_cases([good, bad], preparer, skip_bad_cases=False, split="training")
    with caplog.at_level(logging.WARNING):
        prepared = prepare_cases([good, bad], preparer, skip_bad_cases=True, split="training")
    assert [item["case_id"] for item in prepared.items] == ["good"]
    assert len(prepared.skipped) == 1
    assert "skipping training case bad" in caplog.text


def test_all_cases_bad_is_an_error_even_when_skipping(tmp_path, preparer):
    bad = write_case(tmp_path, "bad")
    bad.image.unlink()
    with pytest.raises(DataError, match="no usable validation case left after skipping 1"):
        prepare_cases([bad], preparer, skip_bad_cases=True, split="validation")
