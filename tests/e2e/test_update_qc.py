"""Update QC in the FLARE simulator: one site of four misbehaves, the server excludes it and the job completes.

The drill run makes site-3 send a different fault each round (the fault-injection filter) and train on swapped
labels (a wrong ``label_map`` in its site.json); a clean run of the same sites must exclude nothing. Both runs' audit
trails must verify, and an edited copy must not.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from fedseg3d.data.synthetic import generate_sites
from fedseg3d.filters.fault_injection import add_fault_injection
from fedseg3d.server.audit_trail import verify
from fedseg3d.tools.build_jobs import build_jobs
from fedseg3d.tools.simulate import run_simulation

REPO = Path(__file__).resolve().parents[2]
SITES = ["site-1", "site-2", "site-3", "site-4"]
DRILL = ["scale", "sign_flip", "noise", "free_rider"]

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def four_sites(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("four_sites")
    generate_sites(root, n_sites=4, seed=1, fov_mm=32.0, cases_scale=0.2, dicom_sites=())
    return root


def simulate(tmp_path: Path, sites_root: Path, rounds: int, faults: list[str] | None) -> Path:
    overrides = {"num_rounds": rounds, "sites_per_round": 4, "local_steps": 1}
    (job_dir,) = build_jobs(REPO / "jobs", tmp_path / "jobs", ["unet3d_fedbn"], overrides, min_clients=4)
    if faults:
        add_fault_injection(job_dir, "site-3", faults)
    workspace = tmp_path / "ws"
    code = run_simulation(job_dir, workspace, sites_root, SITES, timeout=600)
    assert code == 0, f"simulator exited with {code}; logs under {workspace}"
    return workspace / "server" / "simulate_job"


def trail(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "fedseg3d" / "audit_trail.jsonl").read_text().splitlines()]


def excluded(records: list[dict]) -> set[tuple[int, str]]:
    return {(r["round"], s) for r in records for s, e in r["received"].items() if not e["qc"]["accepted"]}


def test_each_fault_is_excluded_and_the_trail_shows_it(four_sites, tmp_path):
    sites_root = tmp_path / "sites"
    shutil.copytree(four_sites, sites_root)
    config_path = sites_root / "site-3" / "site.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "label_map": {"1": "lesion", "2": "organ"}}))
    run_dir = simulate(tmp_path, sites_root, len(DRILL) + 1, DRILL + ["none"])

    assert (run_dir / "app_server" / "FL_global_model.pt").is_file()
    records = trail(run_dir)
    assert [r["round"] for r in records] == list(range(len(DRILL) + 1))
    assert {(r, "site-3") for r in range(len(DRILL))} <= excluded(records), "every injected fault is excluded"
    assert all(s == "site-3" for _, s in excluded(records)), "no honest site is excluded"
    reasons = [" ".join(records[r]["received"]["site-3"]["qc"]["reasons"]) for r in range(len(DRILL))]
    assert "x the round's median" in reasons[0] and "free rider" in reasons[3]
    assert "direction" in reasons[1] and "direction" in reasons[2]
    assert records[0]["received"]["site-3"]["filters"] == ["FaultInjectionFilter:scale"], "the drill is on record"
    flagged = json.loads((run_dir / "fedseg3d" / "qc" / "flagged_sites.json").read_text())
    assert set(flagged) == {"site-3"} and flagged["site-3"]["exclusions"] >= 3
    # The chain links the rounds: each round's sites were sent the model the round before produced.
    for before, after in zip(records, records[1:], strict=False):
        assert {e["model"] for e in after["sent"].values()} == {before["global_model"]}

    assert verify(run_dir / "fedseg3d" / "audit_trail.jsonl").ok
    edited = tmp_path / "edited.jsonl"
    lines = (run_dir / "fedseg3d" / "audit_trail.jsonl").read_text().splitlines()
    record = json.loads(lines[1])
    record["received"]["site-3"]["qc"]["accepted"] = True
    edited.write_text("\n".join([lines[0], json.dumps(record), *lines[2:]]) + "\n")
    result = verify(edited)
    assert not result.ok and "record 1 (line 2)" in result.message


def test_a_clean_run_excludes_nothing(four_sites, tmp_path):
    run_dir = simulate(tmp_path, four_sites, 2, None)
    records = trail(run_dir)
    assert len(records) == 2 and excluded(records) == set()
    assert all(len(r["received"]) == 4 for r in records)
    assert not (run_dir / "fedseg3d" / "qc" / "flagged_sites.json").exists()
    assert verify(run_dir / "fedseg3d" / "audit_trail.jsonl").ok
