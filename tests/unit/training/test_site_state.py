"""What a site carries from one job of a run to the next: its FedBN batch norm and its best models."""

from __future__ import annotations

import json

import pytest
import torch

from fedseg3d.models.local_state import split_local_state
from fedseg3d.models.presets import build_model
from fedseg3d.training.site_models import BEST, BEST_LOCAL, SiteModelStore
from fedseg3d.training.site_state import load_site_state, restore_local_state, save_site_state


def fedbn_model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model("unet3d_tiny", out_channels=3)


def test_the_next_job_gets_back_the_sites_own_batch_norm(tmp_path):
    trained = fedbn_model(0)
    split = split_local_state(trained, keep_batchnorm_local=True)
    assert split.local, "the preset must have batch norm for FedBN"
    with torch.no_grad():
        for key in split.local:
            if trained.state_dict()[key].is_floating_point():
                trained.state_dict()[key].add_(0.5)  # learned scale/shift and statistics differ from the initial
    save_site_state(tmp_path, trained, split, round_=3, models_dir=tmp_path / "models")
    fresh = fedbn_model(1)
    saved = load_site_state(tmp_path)
    assert saved["round"] == 3
    assert restore_local_state(fresh, split, saved, tmp_path) == len(split.local)
    for key in split.local:
        assert torch.equal(fresh.state_dict()[key], trained.state_dict()[key]), key


def test_a_state_of_another_network_is_refused(tmp_path):
    model = fedbn_model(0)
    save_site_state(tmp_path, model, split_local_state(model, True), 1, tmp_path)
    other = split_local_state(model, keep_batchnorm_local=False)  # FedAvg: nothing local
    with pytest.raises(ValueError, match="local state"):
        restore_local_state(model, other, load_site_state(tmp_path), tmp_path)


def test_no_state_means_a_new_run(tmp_path):
    assert load_site_state(tmp_path) is None


def test_the_best_models_stay_the_best_of_the_whole_run(tmp_path):
    model = fedbn_model(0)
    first = SiteModelStore("site-1", tmp_path / "job1")
    first.offer_local(model, 0.7, current_round=1)
    second = SiteModelStore("site-1", tmp_path / "job2")
    assert BEST_LOCAL in second.continue_from(tmp_path / "job1")
    second.offer_local(model, 0.5, current_round=3)  # worse than round 1's: round 1's stays the best
    index = json.loads((tmp_path / "job2" / "models.json").read_text())["models"]
    assert index[BEST_LOCAL]["round"] == 1 and index[BEST]["val_mean_dice"] == 0.7
    assert (tmp_path / "job2" / BEST).is_file()
