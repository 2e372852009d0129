import json
from pathlib import Path

import pytest

from fedseg3d.tools.build_jobs import build_jobs, parse_override

REPO = Path(__file__).resolve().parents[3]


def test_build_bundles_code_and_applies_overrides(tmp_path):
    overrides = dict(parse_override(o) for o in ["num_rounds=2", "local_steps=3", "keep_batchnorm_local=false"])
    (job,) = build_jobs(REPO / "jobs", tmp_path, ["unet3d_fedbn"], overrides, min_clients=2)
    server = json.loads((job / "app/config/config_fed_server.json").read_text())
    client = json.loads((job / "app/config/config_fed_client.json").read_text())
    assert server["num_rounds"] == 2 and client["local_steps"] == 3 and client["keep_batchnorm_local"] is False
    assert json.loads((job / "meta.json").read_text())["min_clients"] == 2
    assert (job / "app/custom/fedseg3d/learners/segmentation_learner.py").is_file()
    assert not list(job.rglob("__pycache__"))


def test_unknown_variable_or_job_is_an_error(tmp_path):
    with pytest.raises(ValueError, match=r"no top-level variable\(s\) \['num_round'\]"):
        build_jobs(REPO / "jobs", tmp_path, ["unet3d_fedbn"], {"num_round": 2})
    with pytest.raises(ValueError, match=r"unknown job\(s\) \['nope'\]"):
        build_jobs(REPO / "jobs", tmp_path, ["nope"])


def test_override_values_parse_as_json():
    assert parse_override("a=2") == ("a", 2)
    assert parse_override("b=true") == ("b", True)
    assert parse_override("c=unet3d_tiny") == ("c", "unet3d_tiny")
    with pytest.raises(ValueError, match="name=value"):
        parse_override("novalue")
