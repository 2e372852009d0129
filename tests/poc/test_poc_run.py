"""One real POC deployment on localhost: prepare from project.yml, start, submit through the admin API, wait for
completion, download, and stop (in a finally) with no process left behind."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from fedseg3d.tools.build_jobs import build_jobs  # noqa: E402
from fedseg3d.tools.report import find_cross_site_results  # noqa: E402
from poc.run_poc import load_layout, poc_processes, port_in_use, prepare, start, stop, submit_and_wait  # noqa: E402

pytestmark = pytest.mark.poc


def test_poc_federation_runs_a_job_submitted_through_the_admin_api(tiny_sites, tmp_path):
    workspace = tmp_path / "poc"
    layout = load_layout(workspace)
    sites = ["site-1", "site-2"]
    prepare(layout, tiny_sites, sites)
    overrides = {"num_rounds": 1, "sites_per_round": 2, "local_steps": 2}
    (job_dir,) = build_jobs(REPO / "jobs", tmp_path / "jobs", ["unet3d_fedbn"], overrides, min_clients=2)
    try:
        start(layout, sites)
        job_id, status, result_dir = submit_and_wait(layout, job_dir, timeout=420, download_to=tmp_path / "results")
    finally:
        stop(layout)
    assert status == "FINISHED:COMPLETED", f"job {job_id} ended {status}"
    matrix = json.loads(find_cross_site_results(result_dir).read_text())
    assert set(matrix) == set(sites)
    site_config = json.loads((layout.prod_dir / "site-1" / "local" / "fedseg3d_site.json").read_text())
    assert Path(site_config["data_root"]) == (tiny_sites / "site-1").resolve()
    budget = json.loads((layout.prod_dir / "site-1" / "local" / "privacy_budget.json").read_text())
    assert budget["epsilon_budget"] == 50.0 and budget["delta"] == 1e-5
    assert not poc_processes(layout.workspace), "POC processes left running"
    assert not port_in_use(layout.port)
