"""A knob that several jobs (or both config files of one job) define has one default everywhere.

Jobs are JSON folders a user submits as they are, so the same knob is written in several files; this keeps the
copies from drifting. A difference a job is meant to have is listed below with its reason; a listed difference
that no longer exists fails too, so the list stays true.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
JOBS = sorted(p for p in (REPO / "jobs").iterdir() if (p / "meta.json").is_file())

# knob -> (jobs whose default differs from every other job's, why)
INTENDED_DIFFERENCES = {
    "keep_batchnorm_local": (
        {"unet3d_fedavg", "unet3d_fedprox", "unet3d_dpsgd"},
        "FedBN keeps batch norm at each site; FedAvg and FedProx share the whole model, DP-SGD's preset has none",
    ),
    "model_preset": (
        {"unet3d_dpsgd"},
        "DP-SGD needs per-patient gradients, which batch norm's cross-sample statistics break: instance norm",
    ),
}


def knob_defaults() -> dict[str, dict[str, object]]:
    """knob -> {"job/config file": default}, for every top-level variable of every job."""
    found: dict[str, dict[str, object]] = defaultdict(dict)
    for job in JOBS:
        for path in sorted((job / "app" / "config").glob("config_fed_*.json")):
            config = json.loads(path.read_text())
            for name, value in config.items():
                if name != "format_version" and not isinstance(value, list | dict):
                    found[name][f"{job.name}/{path.name}"] = value
    return found


KNOBS = knob_defaults()
SHARED = sorted(name for name, where in KNOBS.items() if len(where) > 1)


def test_some_knobs_are_shared():
    assert {"num_rounds", "learning_rate", "seed"} <= set(SHARED)


@pytest.mark.parametrize("knob", SHARED)
def test_a_shared_knob_has_one_default(knob):
    differing, reason = INTENDED_DIFFERENCES.get(knob, (set(), ""))
    usual = {where: v for where, v in KNOBS[knob].items() if where.split("/")[0] not in differing}
    values = {json.dumps(v) for v in usual.values()}
    assert len(values) <= 1, f"knob '{knob}' has drifted between jobs: {usual}"
    if differing:
        (common,) = values
        others = {where: v for where, v in KNOBS[knob].items() if where not in usual}
        stale = sorted(where for where, v in others.items() if json.dumps(v) == common)
        assert not stale, f"'{knob}' is listed as differing ({reason}) but {stale} have the common default {common}"
        missing = differing - {where.split("/")[0] for where in others}
        assert not missing, f"'{knob}' is listed as differing in {sorted(missing)}, which do not define it"
