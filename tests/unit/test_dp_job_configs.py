"""The DP jobs are wired so that nothing leaves a site un-noised: checked on the committed JSON."""

from __future__ import annotations

import json
from pathlib import Path

from fedseg3d.models.presets import build_model
from fedseg3d.training.dpsgd import DPSGDConfig, check_model_supports_dpsgd
from tests.unit.test_job_configs import load_config

JOBS = Path(__file__).resolve().parents[2] / "jobs"


def configs(job: str) -> tuple[dict, dict]:
    config_dir = JOBS / job / "app" / "config"
    return load_config(config_dir / "config_fed_client.json"), load_config(config_dir / "config_fed_server.json")


def test_fedbn_dp_noises_every_train_result_and_never_serves_unnoised_local_models():
    client, server = configs("unet3d_fedbn_dp")
    (scope,) = client["task_result_filters"]
    assert scope["tasks"] == ["train"]
    assert [f["path"] for f in scope["filters"]] == ["fedseg3d.filters.gaussian_dp.GaussianDPFilter"]
    assert scope["filters"][0]["args"]["require_budget"] is True
    (executor,) = client["executors"]
    assert "submit_model" not in executor["tasks"], "a site's local model was never noised"
    cross_site = next(w for w in server["workflows"] if w["id"] == "cross_site_eval")
    assert cross_site["args"]["submit_model_task_name"] == ""
    learner = next(c for c in client["components"] if c["id"] == "learner")
    assert learner["args"]["training"]["keep_batchnorm_local"] is True


def test_dpsgd_job_uses_a_model_opacus_accepts_and_one_patch_per_patient():
    client, _ = configs("unet3d_dpsgd")
    learner = next(c for c in client["components"] if c["id"] == "learner")["args"]
    preset = learner["training"]["model_preset"]
    check_model_supports_dpsgd(build_model(preset), preset)
    assert DPSGDConfig.from_dict(learner["dp_sgd"]) is not None
    assert client["target_epsilon"] == 0, "the committed job trains with its noise_multiplier unless told otherwise"
    assert learner["require_budget"] is True
    assert learner["preprocessing"]["samples_per_volume"] == 1
    assert json.loads((JOBS / "unet3d_dpsgd" / "meta.json").read_text())["name"] == "unet3d_dpsgd"
