"""An exported bundle is a real MONAI bundle: MONAI runs it, reads its metadata, and it loads back to the same model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser

from fedseg3d.data.dataset import VolumeLoader
from fedseg3d.data.transforms import PreprocessConfig, orientation_transform, resample_and_normalise_transform
from fedseg3d.inference.bundle import INFERENCE, METADATA, TORCHSCRIPT, WEIGHTS, export_bundle, load_bundle
from fedseg3d.inference.bundle_config import inference_config
from fedseg3d.inference.deployable import DeployableModel
from fedseg3d.inference.loading import ModelLoadError, load_deployable
from fedseg3d.inference.segment import segment_volume
from fedseg3d.models.presets import build_model

CLASSES = {0: "background", 1: "organ", 2: "lesion"}
PREP = PreprocessConfig(roi_size=(16, 16, 16), target_spacing=(2.0, 2.0, 2.0), intensity_mode="ct_window")
PROVENANCE = {"job_id": "job-7", "site": "site-1", "round": 3, "val_mean_dice": 0.5, "trained_by": ["site-1"]}


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> tuple[DeployableModel, Path]:
    torch.manual_seed(0)
    model = DeployableModel(build_model("unet3d_tiny").eval(), "unet3d_tiny", CLASSES, PREP, PROVENANCE, 1.7)
    return model, export_bundle(model, tmp_path_factory.mktemp("bundle") / "site-1")


def test_bundle_has_monai_layout_and_records_classes_provenance_and_temperature(bundle):
    model, path = bundle
    for rel in (METADATA, INFERENCE, WEIGHTS, TORCHSCRIPT):
        assert (path / rel).is_file(), rel
    meta = json.loads((path / METADATA).read_text())
    pred = meta["network_data_format"]["outputs"]["pred"]
    assert pred["channel_def"] == {"0": "background", "1": "organ", "2": "lesion"} and pred["num_channels"] == 3
    assert meta["network_data_format"]["inputs"]["image"]["modality"] == "CT"
    assert meta["fedseg3d"]["provenance"] == PROVENANCE and meta["fedseg3d"]["temperature"] == 1.7
    assert {"monai", "nibabel"} <= set(meta["required_packages_version"])
    # The TorchScript file is MONAI's export of the same weights, with the metadata embedded.
    extra = {"metadata.json": ""}
    scripted = torch.jit.load(str(path / TORCHSCRIPT), _extra_files=extra)
    assert json.loads(extra["metadata.json"])["fedseg3d"]["provenance"] == PROVENANCE
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        assert torch.allclose(scripted(x), model.network(x), atol=1e-5)


def test_load_bundle_round_trip_gives_the_same_outputs(bundle):
    model, path = bundle
    loaded = load_deployable(path)  # what predict calls: it recognises the bundle
    assert loaded.class_names == CLASSES and loaded.preprocessing == PREP and loaded.model_preset == "unet3d_tiny"
    assert loaded.temperature == 1.7 and loaded.provenance == PROVENANCE
    x = torch.randn(2, 1, 16, 16, 16)
    with torch.no_grad():
        assert torch.equal(loaded.network(x), model.network(x))


def test_metadata_passes_monais_verify_metadata(bundle, tmp_path):
    """MONAI's schema check needs ``jsonschema`` and the schema file (downloaded, or MONAI_META_SCHEMA for a copy)."""
    pytest.importorskip("jsonschema")
    from monai.bundle import verify_metadata

    _, path = bundle
    schema = Path(os.environ.get("MONAI_META_SCHEMA", tmp_path / "schema.json"))
    try:
        verify_metadata(str(path / METADATA), filepath=str(schema))
    except (OSError, RuntimeError) as err:  # no network to fetch the schema: nothing was checked
        if schema.is_file():
            raise
        pytest.skip(f"MONAI's metadata schema could not be downloaded: {err}")


def test_monai_bundle_run_writes_label_maps_on_the_input_grid(bundle, tmp_path):
    model, path = bundle
    images = tmp_path / "images"
    images.mkdir()
    # LPS, anisotropic voxels, an offset origin: inversion must bring the labels back to exactly this grid.
    affine = np.diag([-1.5, -1.5, 2.5, 1.0])
    affine[:3, 3] = (40.0, 30.0, -20.0)
    grid = np.stack(np.meshgrid(*(np.linspace(-1, 1, n) for n in (30, 26, 12)), indexing="ij"))
    ball = 250.0 * ((grid**2).sum(0) < 0.4) - 100.0  # a bright ball in dark tissue, as a scan has structures
    volume = (ball + np.random.default_rng(0).normal(0, 10, size=ball.shape)).astype(np.float32)
    nib.save(nib.Nifti1Image(volume, affine), images / "case_a.nii.gz")
    out = tmp_path / "labels"
    command = [
        sys.executable, "-m", "monai.bundle", "run",
        "--config_file", str(path / INFERENCE), "--meta_file", str(path / METADATA), "--bundle_root", str(path),
        "--dataset_dir", str(images), "--output_dir", str(out),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    written = nib.load(out / "case_a_seg.nii.gz")
    assert written.shape == volume.shape
    np.testing.assert_allclose(written.affine, affine, atol=1e-4)
    labels = np.asarray(written.dataobj)
    assert written.get_data_dtype() == np.uint8 and set(np.unique(labels)) <= set(CLASSES)
    # Exactly the labels fedseg3d predict writes for the same model and scan.
    predicted = segment_volume(model, VolumeLoader()(images / "case_a.nii.gz"), images, torch.device("cpu"))
    np.testing.assert_array_equal(predicted.numpy(), labels)


def test_an_incomplete_or_unreadable_bundle_is_refused_naming_the_file(bundle, tmp_path):
    _, path = bundle
    broken = tmp_path / "broken"
    (broken / "configs").mkdir(parents=True)
    (broken / "models").mkdir()
    with pytest.raises(ModelLoadError, match=r"metadata\.json: missing"):
        load_bundle(broken)
    (broken / METADATA).write_text("{not json")
    with pytest.raises(ModelLoadError, match=r"metadata\.json: not valid JSON"):
        load_bundle(broken)
    (broken / METADATA).write_text(json.dumps({"version": "1"}))
    with pytest.raises(ModelLoadError, match=r"metadata\.json: field 'fedseg3d' is missing"):
        load_bundle(broken)
    (broken / METADATA).write_text((path / METADATA).read_text())
    with pytest.raises(ModelLoadError, match=r"model\.pt: missing"):
        load_bundle(broken)
    (broken / WEIGHTS).write_bytes((path / WEIGHTS).read_bytes()[:500])
    with pytest.raises(ModelLoadError, match=r"model\.pt: not the weights of a unet3d_tiny with 3 classes"):
        load_bundle(broken)
    torch.save(build_model("unet3d_tiny", out_channels=5).state_dict(), broken / WEIGHTS)
    with pytest.raises(ModelLoadError, match=r"model\.pt: not the weights"):
        load_deployable(broken)


@pytest.mark.parametrize(
    "prep",
    [PREP, PreprocessConfig(roi_size=(16, 16, 16), target_spacing=(1.5, 2.0, 3.0), mr_percentiles=(2.0, 98.0))],
    ids=["ct_window", "mr_percentile"],
)
def test_bundle_preprocessing_equals_the_training_preprocessing(prep, tmp_path):
    affine = np.diag([-1.2, 1.0, 2.5, 1.0])
    volume = np.random.default_rng(1).normal(0, 300, size=(21, 17, 8)).astype(np.float32)
    nib.save(nib.Nifti1Image(volume, affine), tmp_path / "scan.nii.gz")
    model = DeployableModel(build_model("unet3d_tiny"), "unet3d_tiny", CLASSES, prep)
    bundle_side = ConfigParser(inference_config(model)).get_parsed_content("preprocessing")
    bundled = bundle_side({"image": str(tmp_path / "scan.nii.gz")})["image"]
    image = VolumeLoader()(tmp_path / "scan.nii.gz")
    trained = resample_and_normalise_transform(prep)(orientation_transform()({"image": image, "label": image * 0}))
    assert bundled.shape == trained["image"].shape
    assert torch.allclose(torch.as_tensor(bundled), torch.as_tensor(trained["image"]), atol=1e-5)
