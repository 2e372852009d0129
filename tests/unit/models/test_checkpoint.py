"""Initial-model checkpoints: FLARE's format, and mismatches that name the file and the keys."""

from pathlib import Path

import pytest
import torch

from fedseg3d.models.checkpoint import (
    check_state_matches,
    checkpoint_provenance,
    load_checkpoint_state,
    save_checkpoint,
    state_mismatches,
)
from fedseg3d.models.presets import build_model


def test_a_saved_checkpoint_loads_back_with_its_provenance(tmp_path: Path):
    model = build_model("unet3d_tiny")
    path = save_checkpoint(model.state_dict(), tmp_path / "sub" / "ckpt.pt", {"model_preset": "unet3d_tiny"})
    state = load_checkpoint_state(path)
    assert state.keys() == model.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert checkpoint_provenance(path) == {"model_preset": "unet3d_tiny"}
    # FLARE's persistor reads it with its safe loader: a dict with the state under "model"
    assert set(torch.load(path, weights_only=True)) == {"model", "fedseg3d_provenance"}


def test_a_bare_state_dict_is_accepted(tmp_path: Path):
    torch.save(build_model("unet3d_tiny").state_dict(), tmp_path / "bare.pt")
    assert "model.0.conv.unit0.conv.weight" in load_checkpoint_state(tmp_path / "bare.pt")


def test_unreadable_or_missing_files_are_named(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_checkpoint_state(tmp_path / "nope.pt")
    (tmp_path / "text.pt").write_text("not a checkpoint")
    with pytest.raises(ValueError, match="text.pt is not a readable PyTorch checkpoint"):
        load_checkpoint_state(tmp_path / "text.pt")


def test_another_preset_is_refused_with_file_keys_and_shapes():
    expected = build_model("unet3d_tiny").state_dict()
    assert state_mismatches(expected, expected) == []
    other = build_model("unet3d_tiny_instancenorm").state_dict()  # no batch-norm buffers
    message = r"initial checkpoint /x/other.pt does not fit .*preset 'unet3d_tiny'.*missing"
    with pytest.raises(ValueError, match=message):
        check_state_matches(expected, other, "/x/other.pt", "preset 'unet3d_tiny'")
    two_classes = build_model("unet3d_tiny", out_channels=2).state_dict()
    problems = state_mismatches(expected, two_classes)
    assert len(problems) == 1 and problems[0].startswith("wrong shapes")
    assert "(16, 2, 3, 3, 3) instead of (16, 3, 3, 3, 3)" in problems[0]
