"""Site facts in the site config: label mapping onto the consortium's classes, and intensity handling that replaces
the job's; each bad value is an error naming the file and the field."""

import json

import nibabel as nib
import numpy as np
import pytest
import torch

from fedseg3d.data.datalist import Case
from fedseg3d.data.dataset import CasePreparer
from fedseg3d.data.errors import DataError
from fedseg3d.data.site_config import SiteConfig
from fedseg3d.data.transforms import PreprocessConfig

CLASSES = {0: "background", 1: "spleen", 2: "liver"}


def _site_json(tmp_path, **fields):
    path = tmp_path / "site.json"
    path.write_text(json.dumps({"data_root": ".", "datalist": "datalist.json", **fields}))
    return path


def _case(tmp_path, image, label, affine=np.eye(4)):
    nib.save(nib.Nifti1Image(image, affine), tmp_path / "img.nii.gz")
    nib.save(nib.Nifti1Image(label, affine), tmp_path / "lab.nii.gz")
    return Case("c", tmp_path / "img.nii.gz", tmp_path / "lab.nii.gz")


def _label(ids):
    label = np.zeros((8, 8, 8), dtype=np.uint8)
    for n, site_id in enumerate(ids):
        label[n, :, :] = site_id
    return label


def test_site_ids_are_mapped_to_the_job_classes_and_declared_others_become_background(tmp_path):
    path = _site_json(tmp_path, label_map={"5": "liver", "1": "spleen"}, unmapped_labels="background")
    relabel = SiteConfig.from_file(path).label_map.for_classes(CLASSES)
    label = torch.from_numpy(_label([5, 1, 117, 0]).astype(np.float32))
    mapped = relabel(tmp_path / "lab.nii.gz", label)
    assert mapped[0].unique().tolist() == [2] and mapped[1].unique().tolist() == [1]
    assert mapped[2].unique().tolist() == [0] and mapped[3].unique().tolist() == [0]


def test_an_unmappable_label_is_refused_naming_the_label_file_and_the_site_field(tmp_path):
    path = _site_json(tmp_path, label_map={"5": "liver", "1": "spleen"})  # unmapped_labels defaults to "error"
    relabel = SiteConfig.from_file(path).label_map.for_classes(CLASSES)
    rng = np.random.default_rng(0)
    case = _case(tmp_path, rng.normal(size=(8, 8, 8)).astype(np.float32), _label([5, 1, 9]))
    with pytest.raises(DataError) as err:
        CasePreparer(PreprocessConfig(), num_classes=len(CLASSES), relabel=relabel)(case)
    message = str(err.value)
    assert str(case.label) in message and "[9]" in message and "label_map" in message and str(path) in message


def test_a_mapped_name_the_job_lacks_is_refused_naming_the_field(tmp_path):
    path = _site_json(tmp_path, label_map={"5": "livr"})
    with pytest.raises(DataError, match=r"label_map\[\"5\"\]' is 'livr'.*not a class of this job") as err:
        SiteConfig.from_file(path).label_map.for_classes(CLASSES)
    assert str(path) in str(err.value)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"label_map": {"0": "liver"}}, r"field 'label_map' key '0' must be a label ID >= 1"),
        ({"label_map": {"x": "liver"}}, r"field 'label_map' key 'x'"),
        ({"label_map": {"5": 2}}, r"field 'label_map\[\"5\"\]' must be a class name"),
        ({"label_map": {"5": "liver"}, "unmapped_labels": "ignore"}, r"field 'unmapped_labels' must be one of"),
        ({"unmapped_labels": "background"}, r"'unmapped_labels' is set but there is no 'label_map'"),
        ({"intensity": {"mode": "window"}}, r"field 'intensity.mode' must be one of"),
        ({"intensity": {"mode": "ct_window"}}, r"field 'intensity.window' must be \[low, high\]"),
        ({"intensity": {"mode": "ct_window", "window": [300, -200]}}, r"'intensity.window' must satisfy low < high"),
        ({"intensity": {"mode": "mr_percentile", "percentiles": [1, 120]}}, r"'intensity.percentiles' must satisfy"),
        ({"intensity": {"mode": "mr_percentile", "window": [1, 99]}}, r"'intensity' has unknown key\(s\) \['window'\]"),
    ],
)
def test_bad_site_facts_name_the_file_and_field(tmp_path, fields, message):
    path = _site_json(tmp_path, **fields)
    with pytest.raises(DataError, match=message) as err:
        SiteConfig.from_file(path)
    assert str(path) in str(err.value)


def test_the_sites_ct_window_replaces_the_jobs_mr_percentiles_in_the_transform(tmp_path):
    job = PreprocessConfig(intensity_mode="mr_percentile", target_spacing=(1.0, 1.0, 1.0))
    site = SiteConfig.from_file(_site_json(tmp_path, intensity={"mode": "ct_window", "window": [-200, 300]}))
    preprocessing = site.preprocessing_for(job)
    assert (preprocessing.intensity_mode, preprocessing.ct_window) == ("ct_window", (-200.0, 300.0))
    hu = np.full((8, 8, 8), 50.0, dtype=np.float32)  # halfway through the window
    hu[0], hu[1] = -1000.0, 1000.0  # air and bone: clipped to the window's ends
    image = CasePreparer(preprocessing, num_classes=2)(_case(tmp_path, hu, _label([1])))["image"]
    assert float(image[0, 4, 4, 4]) == pytest.approx(0.5)
    assert float(image.min()) == 0.0 and float(image.max()) == 1.0
    assert SiteConfig.from_file(_site_json(tmp_path)).preprocessing_for(job) == job  # no site value: the job's
