"""A frozen site and a killed training worker in one real simulator run: the job completes, the frozen site's round
closes at its deadline and its late result is dropped with a line naming it, and both sites train again later."""

from __future__ import annotations

import json
import signal

import pytest

from benchmarks.site_faults import FaultedRun, build

pytestmark = pytest.mark.e2e
ROUND_DEADLINE = 20  # seconds: well above a tiny round here, so only the frozen site misses it


def test_frozen_site_and_killed_worker_do_not_stop_the_job(tiny_sites, tmp_path):
    overrides = {
        "num_rounds": 3,
        "sites_per_round": 2,
        "local_steps": 2,
        "round_deadline": ROUND_DEADLINE,
        "training_worker": True,
    }
    job = build("unet3d_fedbn", tmp_path / "jobs", overrides)
    run = FaultedRun(job, tmp_path / "ws", tiny_sites, ["site-1", "site-2"])
    try:
        run.wait_for("site-2", r"round 1/3: training", timeout=300)
        run.freeze("site-2")  # its job process and training worker: alive, silent
        run.wait_for("server", r"round 0 closed at its deadline", timeout=300)
        run.thaw("site-2")
        # An out-of-memory kill of site-1's training process in the middle of its second round.
        run.wait_for("site-1", r"round 2/3: training", timeout=300, poll=0.02)
        worker = run.training_worker("site-1")
        worker.send_signal(signal.SIGSTOP)
        worker.send_signal(signal.SIGKILL)
        assert run.wait(timeout=600) == 0, f"the job did not complete; logs under {run.workspace}"
        server, site_1 = run.log("server"), run.log("site-1")
    finally:
        run.stop()

    assert "late result from site-2 for round 0 dropped" in server
    assert "training worker died during" in site_1 and "killed by SIGKILL" in site_1
    assert "restored 1 round(s) done" in site_1, "the fresh worker got site-1's state back"
    contributions = run.workspace / "server" / "simulate_job" / "fedseg3d" / "contributions.jsonl"
    records = [json.loads(line) for line in contributions.read_text().splitlines()]
    received = {(c["round"], c["site"]) for c in records if c["return_code"] == "OK"}
    assert (0, "site-2") not in received and (0, "site-1") in received
    assert (1, "site-1") not in received, "the killed round sent nothing"
    # Rejoined with a fresh worker: it trained the last round, which the server used or, if the worker's start-up
    # on a busy machine made it miss the deadline, dropped with a line naming it.
    assert "round 3/3 done" in site_1
    assert (2, "site-1") in received or "late result from site-1 for round 2 dropped" in server
    assert any(site == "site-2" and r > 0 for r, site in received), "site-2 rejoined after its hang"
