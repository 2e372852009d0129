import json

import pytest

from fedseg3d.data.datalist import load_datalist
from fedseg3d.data.errors import DataError

NAMES = {0: "background", 1: "organ", 2: "lesion"}


def write(tmp_path, content):
    path = tmp_path / "datalist.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


def good():
    return {
        "labels": {"0": "background", "1": "organ", "2": "lesion"},
        "training": [{"image": "imagesTr/a.nii.gz", "label": "labelsTr/a.nii.gz"}],
        "validation": [{"image": "imagesTr/b", "label": "labelsTr/b.nii.gz"}],
    }


def test_paths_resolve_against_data_root(tmp_path):
    datalist = load_datalist(write(tmp_path, good()), tmp_path / "root", NAMES)
    assert datalist.training[0].image == tmp_path / "root" / "imagesTr/a.nii.gz"
    assert datalist.training[0].case_id == "a"
    assert datalist.validation[0].case_id == "b"
    assert datalist.labels == NAMES


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "not valid JSON"),
        ({"training": []}, "no 'validation' field"),
        ({**good(), "training": []}, "'training' is empty"),
        ({**good(), "training": [{"image": "/abs/a.nii.gz", "label": "l.nii.gz"}]}, "training[0].image is absolute"),
        ({**good(), "validation": [{"image": "b.nii.gz"}]}, "validation[0].label must be a non-empty path"),
        ({**good(), "labels": {"0": "background", "1": "liver"}}, "but the job expects"),
        ({**good(), "training": "a.nii.gz"}, "must be a list"),
        ({k: v for k, v in good().items() if k != "labels"}, "datalist has no 'labels' field"),
        ({**good(), "labels": {"1": "organ"}}, "field 'labels' must map 0 (background) .. N-1"),
    ],
)
def test_bad_datalists_name_the_file_and_field(tmp_path, content, message):
    path = write(tmp_path, content)
    with pytest.raises(DataError) as err:
        load_datalist(path, tmp_path, NAMES)
    assert str(path) in str(err.value)
    assert message in str(err.value)


def test_missing_datalist(tmp_path):
    with pytest.raises(DataError, match="datalist file not found"):
        load_datalist(tmp_path / "nope.json", tmp_path)


def test_a_datalist_without_labels_is_refused_even_when_no_classes_are_expected(tmp_path):
    # The old behaviour took the job's classes silently: a binary datalist then trained the job's 3 classes.
    path = write(tmp_path, {k: v for k, v in good().items() if k != "labels"})
    with pytest.raises(DataError, match="no 'labels' field: declare the classes") as err:
        load_datalist(path, tmp_path)
    assert str(path) in str(err.value)
