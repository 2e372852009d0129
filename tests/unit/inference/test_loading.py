"""Loading the model a site deploys from a finished job's folders: the recipe travels with the weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fedseg3d.data.datalist import load_datalist
from fedseg3d.data.transforms import PreprocessConfig
from fedseg3d.inference.loading import ModelLoadError, load_deployable
from fedseg3d.models.presets import build_model
from fedseg3d.training.site_models import SiteModelStore, model_recipe
from fedseg3d.training.site_trainer import SiteTrainer, TrainingConfig

CLASSES = {0: "background", 1: "organ", 2: "lesion"}
PREP = PreprocessConfig(roi_size=(16, 16, 16), intensity_mode="ct_window", ct_window=(-100.0, 200.0))


def save_five_class_model(folder: Path) -> None:
    torch.save(build_model("unet3d_tiny", out_channels=5).state_dict(), folder / "best_model.pt")


def write_site_models(folder: Path, site: str, preset: str = "unet3d_tiny", job_id: str = "job-1") -> torch.nn.Module:
    """A site_models folder as training leaves it, with a freshly built network."""
    torch.manual_seed(0)
    model = build_model(preset, out_channels=len(CLASSES))
    store = SiteModelStore(site, folder, model_recipe(preset, CLASSES, PREP.for_classes(CLASSES), job_id, site))
    store.offer_local(model, 0.5, 0)
    return model


def test_training_records_the_recipe_the_site_trained_with(tiny_sites: Path, tmp_path: Path):
    datalist = load_datalist(tiny_sites / "site-1" / "datalist.json", tiny_sites / "site-1", CLASSES)
    training = TrainingConfig(local_steps=1, amp=False)
    trainer = SiteTrainer("site-1", datalist, CLASSES, PREP, training, tmp_path, "cpu", job_id="job-42")
    trainer.train_round(trainer.shared_weights(), 0)
    recipe = json.loads((tmp_path / "models.json").read_text())["model"]
    assert recipe["model_preset"] == "unet3d_tiny" and recipe["job_id"] == "job-42" and recipe["site"] == "site-1"
    assert recipe["class_names"] == ["background", "organ", "lesion"]
    assert PreprocessConfig.from_dict(recipe["preprocessing"]) == trainer.preprocessing
    loaded = load_deployable(tmp_path)
    assert loaded.preprocessing == trainer.preprocessing and loaded.class_names == CLASSES
    for key, value in trainer.model.state_dict().items():  # one round, so the deployed model is the trained one
        assert torch.equal(loaded.network.state_dict()[key], value)


def test_a_site_models_folder_loads_with_weights_recipe_and_provenance(tmp_path: Path):
    model = write_site_models(tmp_path, "site-1")
    loaded = load_deployable(tmp_path)
    assert not loaded.network.training
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.network.state_dict()[key], value)
    assert loaded.model_preset == "unet3d_tiny" and loaded.num_classes == 3
    assert loaded.preprocessing == PREP.for_classes(CLASSES)
    assert loaded.provenance["job_id"] == "job-1" and loaded.provenance["site"] == "site-1"
    assert loaded.provenance["source"].endswith("best_model.pt") and loaded.provenance["val_mean_dice"] == 0.5


def test_a_workspace_with_several_sites_needs_site_and_says_which_exist(tmp_path: Path):
    for site in ("site-1", "site-2"):
        write_site_models(tmp_path / site / "simulate_job" / f"app_{site}" / "site_models", site)
    with pytest.raises(ModelLoadError, match=r"several sites \['site-1', 'site-2'\].*--site"):
        load_deployable(tmp_path)
    assert load_deployable(tmp_path, site="site-2").provenance["site"] == "site-2"
    assert load_deployable(tmp_path / "site-1" / "simulate_job" / "app_site-1").provenance["site"] == "site-1"
    with pytest.raises(ModelLoadError, match="no model of site 'site-9'"):
        load_deployable(tmp_path, site="site-9")


def test_an_older_job_without_the_recipe_says_to_rerun(tmp_path: Path):
    write_site_models(tmp_path, "site-1")
    index = tmp_path / "models.json"
    content = json.loads(index.read_text())
    del content["model"]
    index.write_text(json.dumps(content))
    with pytest.raises(ModelLoadError, match=r"models.json: no 'model' section.*Re-run the job"):
        load_deployable(tmp_path)
    content["model"] = {"model_preset": "unet3d_tiny"}
    index.write_text(json.dumps(content))
    with pytest.raises(ModelLoadError, match=r"lacks field\(s\) \['class_names', 'preprocessing', 'job_id', 'site'\]"):
        load_deployable(tmp_path)


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda folder: (folder / "models.json").write_text("{not json"), "models.json: not valid JSON"),
        (lambda folder: (folder / "best_model.pt").write_bytes(b"garbage"), "best_model.pt: not a readable PyTorch"),
        (lambda folder: (folder / "best_model.pt").unlink(), "best_model.pt: model file not found"),
        (
            save_five_class_model,
            r"best_model.pt: does not fit preset 'unet3d_tiny' with 3 classes: wrong shapes",
        ),
    ],
    ids=["index-not-json", "checkpoint-garbage", "checkpoint-missing", "checkpoint-wrong-classes"],
)
def test_unusable_model_files_are_named(tmp_path: Path, damage, message):
    write_site_models(tmp_path, "site-1")
    damage(tmp_path)
    with pytest.raises(ModelLoadError, match=message):
        load_deployable(tmp_path)


def test_nothing_to_load_is_a_clear_error(tmp_path: Path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_deployable(tmp_path / "absent")
    with pytest.raises(ModelLoadError, match="no site model found"):
        load_deployable(tmp_path)
