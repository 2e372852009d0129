"""Synthetic multi-site data: reproducible, varied between sites, readable, and learnable."""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from monai.transforms import LoadImage, Orientation

from fedseg3d.data.dicom import MONAI_DICOM_READER_ARGS, check_dicom_series
from fedseg3d.data.synthetic import generate_case, generate_sites, grid_affine, main, make_profile

TINY = {"fov_mm": 24.0, "cases_scale": 0.1}


@pytest.fixture(scope="module")
def tiny_sites(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path], float]:
    out = tmp_path_factory.mktemp("synthetic")
    start = time.perf_counter()
    site_dirs = generate_sites(out, n_sites=4, seed=0, **TINY)
    return out, site_dirs, time.perf_counter() - start


def _datalist(site_dir: Path) -> dict:
    return json.loads((site_dir / "datalist.json").read_text())


def _load_ras(path: Path) -> tuple[np.ndarray, np.ndarray]:
    args = MONAI_DICOM_READER_ARGS if path.is_dir() else {}
    reader = "PydicomReader" if path.is_dir() else "NibabelReader"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        image = Orientation(axcodes="RAS")(
            LoadImage(reader=reader, image_only=True, ensure_channel_first=True, **args)(path)
        )
    return image.numpy()[0], image.affine.numpy()


def test_tiny_run_is_fast_and_complete(tiny_sites) -> None:
    out, site_dirs, seconds = tiny_sites
    assert seconds < 5.0  # about a second on 2 cores; generous for a loaded CI runner
    assert [d.name for d in site_dirs] == ["site-1", "site-2", "site-3", "site-4"]
    sites = json.loads((out / "sites.json").read_text())
    assert sites["seed"] == 0 and sites["fov_mm"] == 24.0 and sites["dicom_sites"] == ["site-2"]
    assert [s["image_format"] for s in sites["sites"]] == ["nifti", "dicom", "nifti", "nifti"]
    for entry in sites["sites"]:
        assert (out / entry["site_config"]).is_file()


def test_site_json_and_datalist_paths_resolve(tiny_sites) -> None:
    _, site_dirs, _ = tiny_sites
    for site_dir in site_dirs:
        site = json.loads((site_dir / "site.json").read_text())
        assert site["site_name"] == site_dir.name and site["scanner"]["site_name"] == site_dir.name
        root = site_dir / site["data_root"]
        datalist = json.loads((site_dir / site["datalist"]).read_text())
        assert datalist["labels"] == {"0": "background", "1": "organ", "2": "lesion"}
        assert datalist["modality"] == {"0": "MR"}
        assert len(datalist["training"]) >= 2 and len(datalist["validation"]) >= 2
        for entry in datalist["training"] + datalist["validation"]:
            assert (root / entry["image"]).exists() and (root / entry["label"]).is_file()
            assert not Path(entry["image"]).is_absolute()


def test_labels_and_geometry_match_images(tiny_sites) -> None:
    _, site_dirs, _ = tiny_sites
    for site_dir in site_dirs:
        entry = _datalist(site_dir)["training"][0]
        label_nifti = nib.load(site_dir / entry["label"])
        assert label_nifti.get_data_dtype() == np.uint8
        image, image_affine = _load_ras(site_dir / entry["image"])
        label, label_affine = _load_ras(site_dir / entry["label"])
        assert image.shape == label.shape
        np.testing.assert_allclose(image_affine, label_affine, atol=1e-3)
        assert set(np.unique(label).tolist()) == {0, 1, 2}


def test_dicom_site_passes_series_check(tiny_sites) -> None:
    _, site_dirs, _ = tiny_sites
    site_2 = site_dirs[1]
    for entry in _datalist(site_2)["training"] + _datalist(site_2)["validation"]:
        info = check_dicom_series(site_2 / entry["image"])
        label_shape = nib.load(site_2 / entry["label"]).shape
        assert (info.cols, info.rows, info.n_slices) == label_shape
        assert info.slice_spacing == pytest.approx(1.5)


def test_same_seed_same_data_other_seed_other_data(tmp_path: Path) -> None:
    kwargs = {"n_sites": 2, "fov_mm": 24.0, "cases_scale": 0.1}
    generate_sites(tmp_path / "a", seed=3, **kwargs)
    generate_sites(tmp_path / "b", seed=3, **kwargs)
    generate_sites(tmp_path / "c", seed=4, **kwargs)
    for rel in ("site-1/imagesTr/case_000.nii.gz", "site-1/labelsTr/case_001.nii.gz"):
        a, b, c = (np.asarray(nib.load(tmp_path / run / rel).dataobj) for run in "abc")
        np.testing.assert_array_equal(a, b)
        assert not np.array_equal(a, c)
    dicom_a = sorted((tmp_path / "a/site-2/imagesTr/case_000").iterdir())
    dicom_b = sorted((tmp_path / "b/site-2/imagesTr/case_000").iterdir())
    assert [p.read_bytes() for p in dicom_a] == [p.read_bytes() for p in dicom_b]  # UIDs are derived from the seed


def test_sites_differ_like_scanners() -> None:
    profiles = [make_profile(i, seed=0) for i in range(4)]
    assert len({p.spacing for p in profiles}) == 4
    assert any(p.orientation != "RAS" for p in profiles)
    assert {p.lesion_polarity for p in profiles} == {"bright", "dark"}
    scales = [p.intensity_scale for p in profiles]
    assert all(200 <= s <= 2000 for s in scales) and len(set(scales)) == 4
    assert make_profile(2, seed=0) == make_profile(2, seed=0)
    assert make_profile(2, seed=0) != make_profile(2, seed=1)


def test_case_counts_scale_but_never_below_two() -> None:
    full, tiny = make_profile(0, seed=0), make_profile(0, seed=0, cases_scale=0.01)
    assert 8 <= full.n_train <= 16 and full.n_val == 4
    assert tiny.n_train == 2 and tiny.n_val == 2


def test_validation_cases_can_be_set_without_changing_the_training_cases() -> None:
    base, more = make_profile(1, seed=3), make_profile(1, seed=3, val_cases=12)
    assert more.n_val == 12 and more.n_train == base.n_train
    # Training cases come first, so their indices (and so their images) are the same with more validation cases.
    assert base.n_val == 4


def test_grid_affine_is_centred_with_requested_axes() -> None:
    affine = grid_affine("PIR", (1.25, 1.25, 2.5), (5, 5, 3))
    np.testing.assert_allclose(affine[:3, :3], [[0, 0, 2.5], [-1.25, 0, 0], [0, -1.25, 0]])
    np.testing.assert_allclose(affine @ [2, 2, 1, 1], [0, 0, 0, 1])  # the centre voxel sits at the world origin
    with pytest.raises(ValueError, match="orientation"):
        grid_affine("RRS", (1, 1, 1), (2, 2, 2))


@pytest.mark.parametrize("site_index", [0, 1])
def test_organ_is_visible_and_lesion_polarity_follows_the_site(site_index: int) -> None:
    profile = make_profile(site_index, seed=0)
    image, label, _ = generate_case(profile, np.random.default_rng(7), fov_mm=32.0)
    z = (image - image.mean()) / image.std()
    background, organ, lesion = z[label == 0], z[label == 1], z[label == 2]
    assert (organ.mean() - background.mean()) / background.std() > 3.0  # contrast-to-noise after normalisation
    lesion_brighter = lesion.mean() > organ.mean()
    assert lesion_brighter == (profile.lesion_polarity == "bright")


def test_rerun_replaces_own_output_but_not_foreign_folders(tmp_path: Path) -> None:
    generate_sites(tmp_path, n_sites=2, dicom_sites=(), **TINY)
    generate_sites(tmp_path, n_sites=2, dicom_sites=("site-2",), **TINY)  # same folders, now with DICOM
    assert (tmp_path / "site-2/imagesTr/case_000").is_dir()
    assert not (tmp_path / "site-2/imagesTr/case_000.nii.gz").exists()
    foreign = tmp_path / "other" / "site-1"
    foreign.mkdir(parents=True)
    (foreign / "precious.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="precious|not overwriting"):
        generate_sites(tmp_path / "other", n_sites=1, dicom_sites=(), **TINY)
    assert (foreign / "precious.txt").read_text() == "keep"


@pytest.mark.parametrize(
    ("kwargs", "problem"),
    [
        ({"n_sites": 0}, "n_sites"),
        ({"fov_mm": 8.0}, "fov_mm"),
        ({"cases_scale": 0.0}, "cases_scale"),
        ({"n_sites": 2, "dicom_sites": ("site-9",)}, "site-9"),
    ],
)
def test_bad_arguments_raise(tmp_path: Path, kwargs: dict, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        generate_sites(tmp_path, **kwargs)


def test_cli_prints_one_line_per_site(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    main(["--out", str(tmp_path), "--sites", "2", "--seed", "1", "--fov-mm", "24", "--cases-scale", "0.1"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("site-1:") and "dicom" in lines[1]
