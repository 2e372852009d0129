"""PresetModelPersistor: FLARE's persistor, plus a clear refusal of a checkpoint that does not fit the preset."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from nvflare.apis.event_type import EventType
from nvflare.apis.fl_constant import FLContextKey
from nvflare.apis.fl_context import FLContext

from fedseg3d.models.checkpoint import save_checkpoint
from fedseg3d.models.presets import PresetUNet
from fedseg3d.server.persistor import PresetModelPersistor

REPO = Path(__file__).resolve().parents[3]


def _load(tmp_path: Path, checkpoint: str, preset: str = "unet3d_tiny"):
    persistor = PresetModelPersistor(
        model={"path": "fedseg3d.models.presets.PresetUNet", "args": {"preset": preset, "num_classes": 3, "seed": 0}},
        source_ckpt_file_full_name=checkpoint,
    )
    fl_ctx = FLContext()
    fl_ctx.set_prop(FLContextKey.APP_ROOT, str(tmp_path / "app"), private=True, sticky=False)
    persistor.handle_event(EventType.START_RUN, fl_ctx)
    return persistor.load_model(fl_ctx)


def test_empty_initial_checkpoint_means_the_presets_own_initialisation(tmp_path: Path):
    weights = _load(tmp_path, "")["weights"]
    fresh = PresetUNet("unet3d_tiny", 3, seed=0).state_dict()
    assert weights.keys() == fresh.keys()
    assert np.array_equal(weights["model.0.conv.unit0.conv.weight"], fresh["model.0.conv.unit0.conv.weight"].numpy())


def test_a_fitting_checkpoint_is_the_initial_model(tmp_path: Path):
    torch.manual_seed(5)
    trained = PresetUNet("unet3d_tiny", 3).state_dict()
    path = save_checkpoint(trained, tmp_path / "public.pt", {"model_preset": "unet3d_tiny"})
    weights = _load(tmp_path, str(path))["weights"]
    key = "model.0.conv.unit0.conv.weight"
    assert np.array_equal(weights[key], trained[key].numpy())


def test_a_checkpoint_of_another_preset_stops_the_job_naming_the_file(tmp_path: Path):
    path = save_checkpoint(PresetUNet("unet3d_tiny_instancenorm", 3).state_dict(), tmp_path / "in.pt")
    with pytest.raises(ValueError, match=rf"initial checkpoint {path} does not fit .*'unet3d_tiny'.*missing keys"):
        _load(tmp_path, str(path))


def test_every_job_exposes_initial_checkpoint_empty_by_default():
    for config_path in sorted(REPO.glob("jobs/*/app/config/config_fed_server.json")):
        config = json.loads(config_path.read_text())
        assert config["initial_checkpoint"] == "", config_path
        (persistor,) = [c for c in config["components"] if c["id"] == "persistor"]
        assert persistor["path"] == "fedseg3d.server.persistor.PresetModelPersistor", config_path
        assert persistor["args"]["source_ckpt_file_full_name"] == "{initial_checkpoint}", config_path
