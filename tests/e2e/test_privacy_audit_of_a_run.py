"""The audit CLI against a real simulator run: it finds FLARE's checkpoints and the sites' batch norm where the
simulator leaves them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedseg3d.tools.build_jobs import build_jobs
from fedseg3d.tools.privacy_audit import main
from fedseg3d.tools.simulate import run_simulation

REPO = Path(__file__).resolve().parents[2]
SITES = ["site-1", "site-2"]

pytestmark = pytest.mark.e2e


def test_audit_of_a_fedbn_simulator_run(tiny_sites, tmp_path, capsys):
    overrides = {"num_rounds": 1, "sites_per_round": 2, "local_steps": 2}
    (job_dir,) = build_jobs(REPO / "jobs", tmp_path / "jobs", ["unet3d_fedbn"], overrides, min_clients=2)
    workspace = tmp_path / "ws"
    assert run_simulation(job_dir, workspace, tiny_sites, SITES, timeout=600) == 0, f"see logs under {workspace}"

    out = tmp_path / "audit.json"
    main(["--run-dir", str(workspace), "--sites-root", str(tiny_sites), "--resamples", "50", "--json", str(out)])
    rows = json.loads(out.read_text())
    assert [(r["site"], r["model"]) for r in rows] == [(s, m) for s in SITES for m in ("global", "local")]
    for row in rows:
        datalist = json.loads((tiny_sites / row["site"] / "datalist.json").read_text())
        assert (row["n_members"], row["n_nonmembers"]) == (len(datalist["training"]), len(datalist["validation"]))
        assert 0.0 <= row["auc"] <= 1.0 and row["member_loss"] > 0 and "epsilon" not in row  # not a DP job
    assert "site-2  local" in capsys.readouterr().out
