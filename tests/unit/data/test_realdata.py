"""Building the real sites from a pinned source archive: a locally made archive with the reference files' layout
(tiny volumes, same names), the hash check, the cache, and the site facts reaching a learner's preprocessing."""

import io
import json
import tarfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from nvflare.apis.fl_constant import ReservedKey
from nvflare.apis.fl_context import FLContext
from nvflare.apis.workspace import Workspace

from fedseg3d.data import realdata, source_archive
from fedseg3d.data.datalist import load_datalist
from fedseg3d.data.dicom import check_dicom_series, write_dicom_series
from fedseg3d.data.errors import DataError
from fedseg3d.data.site_config import SiteConfig
from fedseg3d.data.source_archive import PinnedArchive, sha256_of
from fedseg3d.learners.segmentation_learner import SegmentationLearner

CLASS_MAP_PY = (
    "class_map = {\n"
    "    'total': {1: 'spleen', 5: 'liver', 6: 'stomach', 7: 'pancreas', 117: 'skull'},\n"
    "    'total_mr': {1: 'spleen', 5: 'liver', 6: 'stomach', 7: 'pancreas', 49: 'brain'},\n"
    "}\n"
)
CONSORTIUM = {0: "background", 1: "spleen", 2: "liver", 3: "stomach", 4: "pancreas"}


def _organ_labels(shape, extra_id):
    """Four organ blocks through every slice (TotalSegmentator IDs) and one structure outside the consortium."""
    label = np.zeros(shape, dtype=np.uint8)
    label[2:7, 2:7] = 5
    label[9:14, 9:14] = 1
    label[2:7, 9:14] = 6
    label[9:14, 2:7] = 7
    label[0:2, 0:2] = extra_id
    return label


def _image(label, rng):
    return (-100.0 + 40.0 * label + rng.normal(0, 5, label.shape)).astype(np.int16)


def _reference_files(root: Path) -> None:
    rng = np.random.default_rng(0)
    ct_affine = np.diag([3.0, 3.0, 3.0, 1.0])
    label = _organ_labels((16, 16, 112), 117)
    nib.save(nib.Nifti1Image(_image(label, rng), ct_affine), root / "example_ct.nii.gz")
    nib.save(nib.Nifti1Image(label, ct_affine), root / "example_seg_fast_force_split.nii.gz")
    dicom_affine = np.diag([-0.9765625, 0.9765625, 2.0, 1.0])
    dicom_affine[:3, 3] = [120.0, -60.0, -800.0]
    label = _organ_labels((16, 16, 20), 117)
    write_dicom_series(_image(label, rng).astype(np.float64), dicom_affine, root / "example_ct_dicom", modality="CT")
    nib.save(nib.Nifti1Image(label, dicom_affine), root / "example_seg_dicom.nii.gz")
    mr_affine = np.diag([-3.0, -3.0, 3.0, 1.0])
    label = _organ_labels((16, 16, 20), 49)
    nib.save(nib.Nifti1Image((_image(label, rng) + 200).astype(np.int16), mr_affine), root / "example_mr_sm.nii.gz")
    nib.save(nib.Nifti1Image(label, mr_affine), root / "example_seg_mr.nii.gz")


def _make_archive(path: Path, pin: PinnedArchive, tmp: Path, extra: bytes = b"") -> None:
    reference = tmp / "reference_files"
    reference.mkdir(parents=True)
    _reference_files(reference)
    with tarfile.open(path, "w:gz") as tar:
        tar.add(reference, arcname=f"{pin.top}/tests/reference_files")
        for name, text in (
            ("totalsegmentator/map_to_binary.py", CLASS_MAP_PY.encode()),
            ("LICENSE", b"Apache" + extra),
        ):
            info = tarfile.TarInfo(f"{pin.top}/{name}")
            info.size = len(text)
            tar.addfile(info, io.BytesIO(text))


@pytest.fixture(scope="module")
def local_archive(tmp_path_factory):
    """A locally made archive, and the pin (same name and version, its own sha256) that accepts it."""
    tmp = tmp_path_factory.mktemp("archive")
    unpinned = PinnedArchive("totalsegmentator", "2.18.0", "0" * 64)
    path = tmp / unpinned.filename
    _make_archive(path, unpinned, tmp / "src")
    return path, PinnedArchive(unpinned.name, unpinned.version, sha256_of(path))


@pytest.fixture(scope="module")
def built(local_archive, tmp_path_factory):
    path, pin = local_archive
    cache = tmp_path_factory.mktemp("cache")
    (cache / pin.filename).write_bytes(path.read_bytes())
    out = tmp_path_factory.mktemp("sites") / "real"
    return realdata.build_sites(out, cache, pin=pin), out


def _z_range(label_path: Path) -> tuple[float, float]:
    img = nib.load(label_path)
    zs = [float((img.affine @ [0, 0, k, 1])[2]) for k in (0, img.shape[2] - 1)]
    return min(zs), max(zs)


def test_builds_three_sites_whose_validation_never_touches_training(built):
    result, out = built
    assert [d.name for d in result.site_dirs] == ["site-1", "site-2", "site-3"]
    summary = json.loads((out / "sites.json").read_text())
    assert summary["source"]["sha256"] == sha256_of(result.archive)
    for site_dir in result.site_dirs:
        config = SiteConfig.from_file(site_dir / "site.json", site_name=site_dir.name)
        datalist = load_datalist(config.datalist, config.data_root, label_names=CONSORTIUM)
        assert config.label_map is not None and config.label_map.unmapped == "background"
        val_low, val_high = _z_range(datalist.validation[0].label)
        for case in datalist.training:
            low, high = _z_range(case.label)
            assert high < val_low or low > val_high, f"{site_dir.name}: {case.case_id} overlaps the validation slab"
    modes = {d.name: SiteConfig.from_file(d / "site.json").intensity.mode for d in result.site_dirs}
    assert modes == {"site-1": "ct_window", "site-2": "ct_window", "site-3": "mr_percentile"}
    dicom_case = out / "site-2" / "imagesTr" / "val"
    assert check_dicom_series(dicom_case).n_slices == 6  # the real series files of the slab, not a NIfTI copy


def test_a_second_build_reuses_the_cached_archive_without_pip(built, monkeypatch, tmp_path):
    result, _ = built

    def no_pip(*args, **kwargs):
        raise AssertionError(f"pip was called: {args}")

    monkeypatch.setattr(source_archive.subprocess, "run", no_pip)
    pin = PinnedArchive("totalsegmentator", "2.18.0", sha256_of(result.archive))
    again = realdata.build_sites(tmp_path / "again", result.archive.parent, pin=pin)
    assert len(again.site_dirs) == 3


def test_an_archive_with_another_hash_is_refused_naming_file_and_both_hashes(local_archive, tmp_path):
    _, pin = local_archive
    cache = tmp_path / "cache"
    cache.mkdir()
    tampered = cache / pin.filename
    _make_archive(tampered, pin, tmp_path / "src", extra=b" tampered")
    with pytest.raises(DataError) as err:
        realdata.build_sites(tmp_path / "out", cache, pin=pin)
    message = str(err.value)
    assert str(tampered) in message and pin.sha256 in message and sha256_of(tampered) in message
    assert not (tmp_path / "out" / "site-1").exists()


def test_pip_is_asked_for_the_sdist_in_hash_checking_mode(local_archive, monkeypatch, tmp_path):
    path, pin = local_archive
    seen = {}

    def fake_pip(command, **kwargs):
        seen["command"] = command
        seen["requirement"] = Path(command[command.index("-r") + 1]).read_text()
        target = Path(command[command.index("-d") + 1]) / pin.filename
        target.write_bytes(path.read_bytes())
        return source_archive.subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(source_archive.subprocess, "run", fake_pip)
    cached = source_archive.fetch(pin, tmp_path / "cache")
    assert cached == tmp_path / "cache" / pin.filename and sha256_of(cached) == pin.sha256
    assert {"--no-deps", "--require-hashes", ":all:"} <= set(seen["command"])
    assert seen["requirement"].strip() == f"totalsegmentator==2.18.0 --hash=sha256:{pin.sha256}"


def _learner_context(root: Path, site: str) -> FLContext:
    class Engine:
        def __init__(self) -> None:
            (root / "startup").mkdir(parents=True, exist_ok=True)
            (root / "local").mkdir(exist_ok=True)
            self.workspace = Workspace(str(root), site_name=site)

        def get_workspace(self) -> Workspace:
            return self.workspace

    ctx = FLContext()
    ctx.set_prop(ReservedKey.IDENTITY_NAME, site, private=False, sticky=False)
    ctx.set_prop(ReservedKey.RUN_NUM, "job-1", private=False, sticky=False)
    ctx.set_prop(ReservedKey.ENGINE, Engine(), private=True, sticky=False)
    return ctx


@pytest.mark.parametrize(("site", "mode"), [("site-2", "ct_window"), ("site-3", "mr_percentile")])
def test_site_facts_reach_the_learners_preprocessing(built, monkeypatch, tmp_path, site, mode):
    _, out = built
    monkeypatch.setenv("FEDSEG3D_SITES_ROOT", str(out))
    job_mode = "mr_percentile" if mode == "ct_window" else "ct_window"
    learner = SegmentationLearner(
        class_names={str(k): v for k, v in CONSORTIUM.items()},
        preprocessing={"intensity_mode": job_mode, "roi_size": [16, 16, 16]},
        training={"model_preset": "unet3d_tiny"},
        tb_writer_id="",
    )
    learner.initialize({}, _learner_context(tmp_path / "ws", site))
    assert learner.setup_error is None
    assert learner.trainer.preprocessing.intensity_mode == mode  # the site's, not the job's
    labels = torch.cat([item["label"].flatten() for item in learner.trainer.train_cases.items])
    assert set(torch.unique(labels).tolist()) == set(CONSORTIUM)  # IDs 5, 6, 7, 1 mapped; 117 / 49 background


@pytest.mark.skipif(
    not (realdata.default_cache() / realdata.TOTALSEGMENTATOR.filename).is_file(),
    reason="the real archive is not cached here; `python -m fedseg3d.data.realdata --out DIR` fetches it once",
)
def test_the_real_cached_archive_builds(tmp_path):
    result = realdata.build_sites(tmp_path / "real", realdata.default_cache())
    summary = json.loads((tmp_path / "real" / "sites.json").read_text())
    assert [s["image_format"] for s in summary["sites"]] == ["nifti", "dicom", "nifti"]
    assert all(any(s["class_voxels_preprocessed"]["val"].values()) for s in summary["sites"])
    assert len(result.site_dirs) == 3
