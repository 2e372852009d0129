"""The privacy benchmark's pieces: every configuration builds against the real jobs; the verdict reads the goal
right. (The benchmark itself runs the simulator for minutes: `make bench-privacy BENCH_ARGS=--quick`.)"""

from __future__ import annotations

import json
import math

import pytest

from benchmarks.privacy_tradeoff import FULL, QUICK, REPO, configurations, job_overrides, markdown, verdict
from fedseg3d.tools.build_jobs import build_jobs


@pytest.mark.parametrize("quick", [True, False])
def test_every_configuration_builds_with_its_knobs_applied(quick, tmp_path):
    budget = QUICK if quick else FULL
    for config in configurations(quick):
        overrides = job_overrides(config, budget)
        (job_dir,) = build_jobs(REPO / "jobs", tmp_path / config.name, [config.job], overrides, 2, with_code=False)
        client = json.loads((job_dir / "app" / "config" / "config_fed_client.json").read_text())
        server = json.loads((job_dir / "app" / "config" / "config_fed_server.json").read_text())
        assert server["num_rounds"] == budget.rounds and client["local_steps"] == budget.local_steps
        for name, value in config.overrides.items():
            assert client.get(name, server.get(name)) == value, (config.name, name)


def row(name: str, dice: float, epsilon: float | None = None, unit: str | None = None) -> dict:
    return {
        "name": name,
        "job": "j",
        "mean_dice": dice,
        "epsilon": epsilon,
        "unit": unit,
        "attack_auc": 0.5,
        "simulator_seconds": 1.0,
        "load_average_1min": [1.0, 1.0],
    }


def test_verdict_compares_patient_level_rows_with_fedbn_only():
    rows = [
        row("fedbn", 0.80),
        row("dpsgd_a", 0.79, 7.5, "patient"),
        row("dpsgd_b", 0.70, 3.0, "patient"),
        row("dpsgd_c", 0.80, 9.0, "patient"),
        row("fedbn_dp", 0.80, 2.0, "site_update"),
    ]
    lines = verdict(rows)
    assert lines[0].endswith("meets the goal") and "-0.0100" in lines[0]
    assert lines[1].endswith("misses the goal")
    assert "outside the goal" in lines[2]
    assert "not comparable" in lines[3]
    assert verdict(rows[1:]) == ["no non-private FedBN row: nothing to compare against"]


def test_markdown_has_one_table_line_per_row():
    rows = [row("fedbn", 0.8), row("dpsgd", math.nan, 1.0, "patient")]
    result = {
        "command": "cmd",
        "date": "today",
        "total_seconds": 60.0,
        "machine": {"cpu_cores": 2, "cpu": "x", "gpu": "none", "torch": "t", "python": "p"},
        "budget": {"seed": 0, "cases_scale": 1.0, "fov_mm": 48.0, "rounds": 2, "local_steps": 2},
        "cases": {},
        "rows": rows,
        "verdict": verdict(rows),
    }
    text = markdown(result)
    assert sum(line.startswith("| fedbn |") or line.startswith("| dpsgd |") for line in text.splitlines()) == 2
    assert "`cmd`" in text and "2 CPU cores" in text
