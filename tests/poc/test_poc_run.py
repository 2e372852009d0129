"""One real POC deployment on localhost, used as a user uses it.

Prepare from project.yml, start, submit a short job through the admin API; after its first round, kill the server
(SIGKILL, server and job process, by PID), let FLARE's watchdog start it again, continue the run with
``fedseg3d resume`` and wait for completion; then submit the repository's own job folder as it is (no build, no code:
the POC sites allow the installed package, as production kits do), and while it trains stop everything with the one
documented command, ``fedseg3d poc stop``, checking that no process is left and the port is free.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedseg3d.poc.control import load_layout, poc_processes, port_in_use, stop
from fedseg3d.poc.runner import contributions_file, follow_job, prepare, start, submit_job
from fedseg3d.poc.server_restart import kill_server, server_pid, wait_for_server
from fedseg3d.server import run_state
from fedseg3d.tools.build_jobs import build_jobs
from fedseg3d.tools.report import find_cross_site_results

pytestmark = pytest.mark.poc

REPO = Path(__file__).resolve().parents[2]
PLAIN_JOB = REPO / "jobs" / "unet3d_fedbn"


def submit_plain_job(layout, job_dir: Path) -> str:
    from nvflare.fuel.flare_api.flare_api import new_secure_session

    session = new_secure_session("admin@consortium.org", str(layout.admin_kit()), timeout=30)
    try:
        return session.submit_job(str(job_dir))
    finally:
        session.close()


def wait_for_round(layout, job_id: str, sites: list[str], timeout: float) -> set[str]:
    """Sites whose first training round the server recorded (the job's components were allowed and ran)."""
    path, done = contributions_file(layout, job_id), set()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and done != set(sites):
        if path.is_file():
            entries = [json.loads(line) for line in path.read_text().splitlines()]
            done = {e["site"] for e in entries if e.get("return_code") == "OK"}
        time.sleep(2)
    return done


def wait_for_saved_round(state_dir: Path, timeout: float) -> int:
    """The last round the server saved for the run, once it saved one."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (state_dir / run_state.STATE_FILE).is_file():
            return run_state.read_state(state_dir)["last_round"]
        time.sleep(0.5)
    raise TimeoutError(f"no round state in {state_dir} after {timeout:.0f} s")


def trained_rounds(state_dir: Path, job_id: str) -> set[int]:
    """Rounds in which the server received a site's update for ``job_id`` (from the run's saved records)."""
    path = state_dir / run_state.RECORDS_DIR / job_id / "contributions.jsonl"
    entries = [json.loads(line) for line in path.read_text().splitlines()]
    return {e["round"] for e in entries if e.get("return_code") == "OK"}


def resume_run(workspace: Path, run: str, out: Path) -> str:
    """``fedseg3d resume`` as an admin runs it; returns the continuation's job id."""
    command = ["resume", "--run", run, "--poc-workspace", str(workspace), "--out", str(out)]
    done = subprocess.run(
        [sys.executable, "-m", "fedseg3d", *command],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout.strip().splitlines()[-1].split()[-1]


def test_poc_survives_a_server_restart_runs_plain_jobs_and_stops_with_one_command(tiny_sites, tmp_path):
    workspace = tmp_path / "poc"
    layout = load_layout(workspace)
    sites = ["site-1", "site-2"]
    prepare(layout, tiny_sites, sites)
    run, rounds = "ci-restart", 3
    overrides = {"num_rounds": rounds, "sites_per_round": 2, "local_steps": 2, "run_name": run}
    (job_dir,) = build_jobs(REPO / "jobs", tmp_path / "jobs", ["unet3d_fedbn"], overrides, 2, with_code=False)
    state_dir = run_state.run_state_dir(layout.prod_dir / layout.server_name, run)
    # A verbatim copy, so that FLARE's signing of the submitted folder does not write into the checkout.
    plain_job = shutil.copytree(PLAIN_JOB, tmp_path / "plain" / PLAIN_JOB.name)
    stopped = None
    try:
        start(layout, sites)
        first_id = submit_job(layout, job_dir)
        saved_before_kill = wait_for_saved_round(state_dir, timeout=300)
        old_pid = server_pid(layout)
        kill_server(layout)
        wait_for_server(layout, sites, old_pid, timeout=180)
        job_id = resume_run(workspace, run, tmp_path / "resume")
        status, result_dir = follow_job(layout, job_id, timeout=420, download_to=tmp_path / "results")
        plain_id = submit_plain_job(layout, plain_job)
        trained = wait_for_round(layout, plain_id, sites, timeout=300)
        assert poc_processes(layout.workspace), "POC should still be running before the stop command"
        stopped = subprocess.run(
            [sys.executable, "-m", "fedseg3d", "poc", "stop", "--workspace", str(workspace)],
            capture_output=True,
            text=True,
            timeout=180,
        )
    finally:
        if stopped is None or stopped.returncode != 0:
            stop(layout)
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert not poc_processes(layout.workspace), "POC processes left running after `fedseg3d poc stop`"
    assert not port_in_use(layout.port)
    assert status == "FINISHED:COMPLETED", f"continuation job {job_id} ended {status}"
    matrix = json.loads(find_cross_site_results(result_dir).read_text())
    assert set(matrix) == set(sites)
    # The run went on from the round after the last one saved: at most the round in flight at the kill was lost,
    # and the rounds of the two jobs join without a gap.
    state = run_state.read_state(state_dir)
    assert [job["job_id"] for job in state["jobs"]] == [first_id, job_id]
    assert state["jobs"][1]["start_round"] == saved_before_kill + 1
    assert state["last_round"] == rounds - 1
    before, after = trained_rounds(state_dir, first_id), trained_rounds(state_dir, job_id)
    assert after == set(range(saved_before_kill + 1, rounds))
    assert max(before) - saved_before_kill <= 1, f"rounds {sorted(before)} trained before the kill"
    assert set(range(saved_before_kill + 1)) <= before
    for site in sites:  # every site took its own FedBN state and best models over from the first job
        site_log = (layout.prod_dir / site / job_id / "log.txt").read_text()
        assert f"{site}: continuing the run after round" in site_log, f"{site} started afresh; see its log"
    assert trained == set(sites), f"the plain job folder trained only at {sorted(trained)}; see {layout.prod_dir}"
    site_config = json.loads((layout.prod_dir / "site-1" / "local" / "fedseg3d_site.json").read_text())
    assert Path(site_config["data_root"]) == (tiny_sites / "site-1").resolve()
    budget = json.loads((layout.prod_dir / "site-1" / "local" / "privacy_budget.json").read_text())
    assert budget["epsilon_budget"] == 50.0 and budget["delta"] == 1e-5
