"""The two DP jobs run for real in the FLARE simulator; the privacy record and the site ledgers are checked on disk.

Budgets live in a privacy folder that outlives the simulator runs (``--privacy-dir`` / ``FEDSEG3D_PRIVACY_DIR``),
as a hospital's ``local/privacy_budget.json`` outlives its jobs.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from fedseg3d.models.local_state import batchnorm_state_keys, split_local_state
from fedseg3d.models.presets import build_model
from fedseg3d.privacy.accounting import PATIENT, SITE_UPDATE, epsilon_for, site_update_mechanism
from fedseg3d.privacy.ledger import RUN_DETAIL, PrivacyLedger, load_site_privacy_budget
from fedseg3d.privacy.site_budget import write_site_budget
from fedseg3d.tools.build_jobs import build_jobs
from fedseg3d.tools.privacy_report import site_report
from fedseg3d.tools.simulate import run_simulation

REPO = Path(__file__).resolve().parents[2]
SITES = ["site-1", "site-2"]
DELTA = 1e-5

pytestmark = pytest.mark.e2e


def simulate(job: str, sites_root: Path, privacy_dir: Path, out: Path, overrides: dict) -> Path:
    (job_dir,) = build_jobs(REPO / "jobs", out / "jobs", [job], {"num_rounds": 2, **overrides}, min_clients=2)
    workspace = out / "ws"
    code = run_simulation(job_dir, workspace, sites_root, SITES, timeout=600, privacy_dir=privacy_dir)
    assert code == 0, f"simulator exited with {code}; logs under {workspace}"
    return workspace


def server_file(workspace: Path, name: str) -> list[dict]:
    path = workspace / "server" / "simulate_job" / "fedseg3d" / name
    return [json.loads(line) for line in path.read_text().splitlines()]


def ledger(privacy_dir: Path, site: str) -> PrivacyLedger:
    return PrivacyLedger(privacy_dir / site / "privacy_ledger.json")


def tensorboard_scalars(workspace: Path, site: str, tag: str) -> list[float]:
    (events,) = (workspace / "server" / "simulate_job" / "tb_events" / site).glob("events.out.tfevents*")
    accumulator = EventAccumulator(str(events))
    accumulator.Reload()
    return [event.value for event in accumulator.Scalars(tag)] if tag in accumulator.Tags()["scalars"] else []


def test_fedbn_dp_records_epsilon_per_site_and_round_and_an_exhausted_site_is_refused_in_the_next_job(
    tiny_sites, tmp_path
):
    sigma = 1.0
    two_rounds = epsilon_for([site_update_mechanism(sigma, 2)], DELTA)
    privacy = tmp_path / "privacy"
    write_site_budget(privacy / "site-1", epsilon_budget=100.0, delta=DELTA)
    write_site_budget(privacy / "site-2", epsilon_budget=two_rounds * 1.01, delta=DELTA)  # room for job 1 only
    overrides = {"sites_per_round": 2, "local_steps": 2, "noise_multiplier": sigma, "clip_norm": 1.0}

    # Job 1: both sites release two noised updates; every figure is recorded at the site, on the server and in TB.
    first = simulate("unet3d_fedbn_dp", tiny_sites, privacy, tmp_path / "job1", overrides)
    records = server_file(first, "privacy.jsonl")
    assert {(r["round"], r["site"]) for r in records} == {(r, s) for r in (0, 1) for s in SITES}
    for record in records:
        expected = epsilon_for([site_update_mechanism(sigma, record["round"] + 1)], DELTA)
        assert record["epsilon"] == pytest.approx(expected)
        assert (record["delta"], record["unit"], record["scope"]) == (DELTA, SITE_UPDATE, "site_ledger")
    for site in SITES:
        assert [e.round for e in ledger(privacy, site).entries()] == [0, 1]
        assert ledger(privacy, site).spent(SITE_UPDATE, DELTA) == pytest.approx(two_rounds)
        assert tensorboard_scalars(first, site, "dp_epsilon_site_update") == pytest.approx(
            [epsilon_for([site_update_mechanism(sigma, r)], DELTA) for r in (1, 2)]
        )
        assert "cumulative epsilon=" in (first / site / "log.txt").read_text()
    # The filter saw (and the server received) exactly the shared keys: batch norm stays out of the mechanism.
    model = build_model("unet3d_tiny")
    shared = set(split_local_state(model, keep_batchnorm_local=True).shared)
    received = server_file(first, "contributions.jsonl")
    assert all(set(c["keys"]) == shared for c in received)
    assert not shared & batchnorm_state_keys(model)

    # Job 2 at the same sites: site-2 cannot afford a third round, refuses, and its ledger is untouched.
    site2_ledger = (privacy / "site-2" / "privacy_ledger.json").read_bytes()
    second = simulate("unet3d_fedbn_dp", tiny_sites, privacy, tmp_path / "job2", overrides)
    assert (privacy / "site-2" / "privacy_ledger.json").read_bytes() == site2_ledger
    contributions = server_file(second, "contributions.jsonl")
    assert {c["site"] for c in contributions if c["return_code"] == "OK"} == {"site-1"}
    refused = [c for c in contributions if c["site"] == "site-2"]
    assert refused and all(c["return_code"] == "TASK_RESULT_FILTER_ERROR" for c in refused)
    assert all(c.get("data_kind") is None for c in refused), "a refused round sends no payload"
    log = (second / "site-2" / "log.txt").read_text()
    assert "site site-2 refuses to send round 1's update" in log
    assert f"budget file {privacy.resolve() / 'site-2' / 'privacy_budget.json'}" in log
    assert "this release would make it" in log and "> budget" in log
    # site-1 carried on and its epsilon continues across jobs (rounds 3 and 4 of its life).
    records = server_file(second, "privacy.jsonl")
    assert [(r["site"], r["round"]) for r in sorted(records, key=lambda r: r["round"])] == [
        ("site-1", 0),
        ("site-1", 1),
    ]
    assert [r["epsilon"] for r in sorted(records, key=lambda r: r["round"])] == pytest.approx(
        [epsilon_for([site_update_mechanism(sigma, r)], DELTA) for r in (3, 4)]
    )
    assert (second / "server" / "simulate_job" / "app_server" / "FL_global_model.pt").is_file()
    # Both runs are called simulate_job; the ledger's run ids keep them apart in the privacy officer's report.
    runs = [e.details[RUN_DETAIL] for e in ledger(privacy, "site-1").entries()]
    assert runs[0] == runs[1] != runs[2] == runs[3]
    report = site_report(load_site_privacy_budget(privacy / "site-1" / "privacy_budget.json"))
    assert report.count("job simulate_job (run ") == 2


def test_dpsgd_job_completes_and_records_patient_epsilon_per_site_and_round(tiny_sites, tmp_path):
    privacy = tmp_path / "privacy"
    for site in SITES:
        write_site_budget(privacy / site, epsilon_budget=100.0, delta=DELTA)
    overrides = {"sites_per_round": 2, "local_steps": 2, "patients_per_step": 1, "noise_multiplier": 1.1}
    workspace = simulate("unet3d_dpsgd", tiny_sites, privacy, tmp_path, overrides)

    records = server_file(workspace, "privacy.jsonl")
    assert {(r["round"], r["site"]) for r in records} == {(r, s) for r in (0, 1) for s in SITES}
    for site in SITES:
        entries = ledger(privacy, site).entries()
        assert [e.round for e in entries] == [0, 1]
        assert {(e.unit, e.noise_multiplier, e.steps) for e in entries} == {(PATIENT, 1.1, 2)}
        patients = entries[0].details["patients"]
        assert entries[0].sample_rate == pytest.approx(1 / patients)
        for record in (r for r in records if r["site"] == site):
            expected = epsilon_for([e.mechanism for e in entries[: record["round"] + 1]], DELTA)
            assert record["epsilon"] == pytest.approx(expected)
            assert (record["unit"], record["scope"]) == (PATIENT, "site_ledger")
        assert len(tensorboard_scalars(workspace, site, "dp_epsilon_patient")) == 2
    server_run = workspace / "server" / "simulate_job"
    assert (server_run / "app_server" / "FL_global_model.pt").is_file()
    matrix = json.loads((server_run / "cross_site_val" / "cross_val_results.json").read_text())
    assert set(matrix) == set(SITES)


def test_dpsgd_job_with_a_target_epsilon_calibrates_each_site_and_ends_within_it(tiny_sites, tmp_path):
    privacy = tmp_path / "privacy"
    for site in SITES:
        write_site_budget(privacy / site, epsilon_budget=100.0, delta=DELTA)
    # Two patches per patient (augmentation multiplicity): the calibration and the ledger are those of one patient.
    overrides = {
        "sites_per_round": 2,
        "num_rounds": 2,
        "local_steps": 2,
        "patients_per_step": 1,
        "target_epsilon": 6.0,
        "patches_per_patient": 2,
        "lr_schedule": "cosine",
    }
    workspace = simulate("unet3d_dpsgd", tiny_sites, privacy, tmp_path, overrides)

    records = server_file(workspace, "privacy.jsonl")
    for site in SITES:
        entries = ledger(privacy, site).entries()
        assert [e.round for e in entries] == [0, 1]
        first, second = (e.noise_multiplier for e in entries)
        assert first == second != 1.0, "the site's own calibrated sigma for the whole job, not the job's default"
        assert {e.details["patches_per_patient"] for e in entries} == {2}
        final = max((r for r in records if r["site"] == site), key=lambda r: r["round"])
        assert 6.0 - 0.05 < final["epsilon"] <= 6.0
