"""One real POC deployment on localhost, used as a user uses it.

Prepare from project.yml, start, submit a short job through the admin API and wait for completion; then submit the
repository's own job folder as it is (no build, no code: the POC sites allow the installed package, as production
kits do), and while it trains stop everything with the one documented command, ``fedseg3d poc stop``, checking that
no process is left and the port is free.
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
from fedseg3d.poc.runner import contributions_file, prepare, start, submit_and_wait
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


def test_poc_runs_built_and_plain_jobs_and_stops_with_one_command(tiny_sites, tmp_path):
    workspace = tmp_path / "poc"
    layout = load_layout(workspace)
    sites = ["site-1", "site-2"]
    prepare(layout, tiny_sites, sites)
    overrides = {"num_rounds": 1, "sites_per_round": 2, "local_steps": 2}
    (job_dir,) = build_jobs(REPO / "jobs", tmp_path / "jobs", ["unet3d_fedbn"], overrides, 2, with_code=False)
    # A verbatim copy, so that FLARE's signing of the submitted folder does not write into the checkout.
    plain_job = shutil.copytree(PLAIN_JOB, tmp_path / "plain" / PLAIN_JOB.name)
    stopped = None
    try:
        start(layout, sites)
        job_id, status, result_dir = submit_and_wait(layout, job_dir, timeout=420, download_to=tmp_path / "results")
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
    assert status == "FINISHED:COMPLETED", f"job {job_id} ended {status}"
    matrix = json.loads(find_cross_site_results(result_dir).read_text())
    assert set(matrix) == set(sites)
    assert trained == set(sites), f"the plain job folder trained only at {sorted(trained)}; see {layout.prod_dir}"
    site_config = json.loads((layout.prod_dir / "site-1" / "local" / "fedseg3d_site.json").read_text())
    assert Path(site_config["data_root"]) == (tiny_sites / "site-1").resolve()
    budget = json.loads((layout.prod_dir / "site-1" / "local" / "privacy_budget.json").read_text())
    assert budget["epsilon_budget"] == 50.0 and budget["delta"] == 1e-5
