"""``fedseg3d simulate`` exits non-zero when the server says the run did not finish (the simulator itself exits 0)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedseg3d.server.contribution_log import OUTPUT_SUBDIR
from fedseg3d.server.run_outcome import OUTCOME_FILE
from fedseg3d.tools.simulate import NOT_COMPLETED, RUN_OUTCOME_COMPONENT, SIMULATOR_RUN, job_outcome_code


def _job(tmp_path: Path, records_outcome: bool) -> Path:
    config = tmp_path / "job" / "app" / "config" / "config_fed_server.json"
    config.parent.mkdir(parents=True)
    components = [{"id": "run_outcome", "path": RUN_OUTCOME_COMPONENT, "args": {}}] if records_outcome else []
    config.write_text(json.dumps({"components": components}))
    return config.parents[2]


def _outcome(workspace: Path, outcome: dict) -> None:
    path = workspace / "server" / SIMULATOR_RUN / OUTPUT_SUBDIR / OUTCOME_FILE
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(outcome))


def test_a_finished_run_is_zero(tmp_path):
    _outcome(tmp_path / "ws", {"completed": True, "workflows": [{"id": "fedavg", "aborted": False}]})
    assert job_outcome_code(_job(tmp_path, True), tmp_path / "ws") == 0


def test_an_aborted_run_names_the_workflow(tmp_path, capsys):
    _outcome(tmp_path / "ws", {"completed": False, "workflows": [{"id": "fedavg", "aborted": True}]})
    assert job_outcome_code(_job(tmp_path, True), tmp_path / "ws") == NOT_COMPLETED
    assert "aborted during workflow ['fedavg']" in capsys.readouterr().err


@pytest.mark.parametrize("records", [True, False])
def test_no_outcome_fails_only_for_a_job_that_records_one(tmp_path, records):
    expected = NOT_COMPLETED if records else 0
    assert job_outcome_code(_job(tmp_path, records), tmp_path / "ws") == expected
