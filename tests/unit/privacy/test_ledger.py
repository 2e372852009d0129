"""The site ledger: totals from Opacus over every job, refusal records nothing, corruption is loud."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
from opacus.accountants import PRVAccountant, RDPAccountant

from fedseg3d.privacy.ledger import (
    PrivacyBudgetExceeded,
    PrivacyLedger,
    PrivacyLedgerError,
    SpendEntry,
    load_site_privacy_budget,
)

DELTA = 1e-5


def _site_round(job_id: str, round_: int, sigma: float = 1.0) -> SpendEntry:
    return SpendEntry(job_id=job_id, round=round_, unit="site_update", noise_multiplier=sigma, sample_rate=1.0, steps=1)


def _rdp(history) -> float:
    engine = RDPAccountant()
    engine.history = history
    return engine.get_epsilon(delta=DELTA)


def test_total_equals_opacus_over_all_jobs(tmp_path):
    path = tmp_path / "privacy_ledger.json"
    job_a = PrivacyLedger(path)
    for r in range(3):
        job_a.charge(_site_round("job-a", r), budget_epsilon=100.0, delta=DELTA)
    job_b = PrivacyLedger(path)  # a later job, a new process: only the file carries the history
    total = job_b.charge(_site_round("job-b", 0, sigma=2.0), budget_epsilon=100.0, delta=DELTA)

    expected = _rdp([(1.0, 1.0, 3), (2.0, 1.0, 1)])
    assert total == pytest.approx(expected, rel=1e-12)
    assert PrivacyLedger(path).spent("site_update", DELTA) == pytest.approx(expected, rel=1e-12)
    assert [(e.job_id, e.round) for e in job_b.entries()] == [("job-a", 0), ("job-a", 1), ("job-a", 2), ("job-b", 0)]


def test_prv_ledger_equals_opacus_prv(tmp_path):
    ledger = PrivacyLedger(tmp_path / "l.json", accountant="prv")
    for r in range(4):
        ledger.charge(_site_round("j", r), budget_epsilon=100.0, delta=DELTA)
    engine = PRVAccountant()
    engine.history = [(1.0, 1.0, 4)]
    with np.errstate(divide="ignore"):  # Opacus takes log(1 - q) = log(0) for q = 1 and handles the -inf
        expected = engine.get_epsilon(delta=DELTA)
    assert ledger.spent("site_update", DELTA) == pytest.approx(expected, rel=1e-9)


def test_patient_unit_is_accounted_separately(tmp_path):
    ledger = PrivacyLedger(tmp_path / "l.json")
    ledger.charge(_site_round("j", 0), budget_epsilon=100.0, delta=DELTA)
    patient = SpendEntry("j", 0, "patient", noise_multiplier=1.1, sample_rate=0.05, steps=200)
    ledger.charge(patient, budget_epsilon=100.0, delta=DELTA)
    assert ledger.spent("site_update", DELTA) == pytest.approx(_rdp([(1.0, 1.0, 1)]))
    assert ledger.spent("patient", DELTA) == pytest.approx(_rdp([(1.1, 0.05, 200)]))


def test_refusal_across_jobs_records_nothing(tmp_path):
    path = tmp_path / "privacy_ledger.json"
    budget = _rdp([(1.0, 1.0, 2)]) + 1e-9  # room for exactly two rounds at sigma = 1
    PrivacyLedger(path).charge(_site_round("job-a", 0), budget, DELTA)
    PrivacyLedger(path).charge(_site_round("job-a", 1), budget, DELTA)
    before = path.read_bytes()

    with pytest.raises(PrivacyBudgetExceeded) as refused:
        PrivacyLedger(path).charge(_site_round("job-b", 0), budget, DELTA)
    assert path.read_bytes() == before
    error = refused.value
    assert error.spent == pytest.approx(_rdp([(1.0, 1.0, 2)]))
    assert error.would_be == pytest.approx(_rdp([(1.0, 1.0, 3)]))
    assert error.budget == budget
    message = str(error)
    assert "site_update" in message and str(path) in message and "nothing was recorded" in message
    assert f"{error.would_be:.4g}" in message and f"{budget:.4g}" in message


def test_zero_noise_is_always_refused(tmp_path):
    path = tmp_path / "l.json"
    with pytest.raises(PrivacyBudgetExceeded):
        PrivacyLedger(path).charge(_site_round("j", 0, sigma=0.0), budget_epsilon=1e6, delta=DELTA)
    assert not path.exists()


@pytest.mark.parametrize(
    "content",
    [
        "{not json",
        "",
        json.dumps([]),
        json.dumps({"format": "something-else", "version": 1, "entries": []}),
        json.dumps({"format": "fedseg3d-privacy-ledger", "version": 99, "entries": []}),
        json.dumps({"format": "fedseg3d-privacy-ledger", "version": 1, "entries": [{"job_id": "j"}]}),
        json.dumps(
            {
                "format": "fedseg3d-privacy-ledger",
                "version": 1,
                "entries": [
                    {
                        "job_id": "j",
                        "round": 0,
                        "unit": "site_update",
                        "timestamp": "t",
                        "mechanism": {"type": "gaussian", "noise_multiplier": -1, "sample_rate": 1, "steps": 1},
                    }
                ],
            }
        ),
    ],
)
def test_corrupt_ledger_raises_and_is_left_alone(tmp_path, content):
    path = tmp_path / "privacy_ledger.json"
    path.write_text(content)
    with pytest.raises(PrivacyLedgerError, match="privacy_ledger.json"):
        PrivacyLedger(path).charge(_site_round("j", 0), budget_epsilon=100.0, delta=DELTA)
    with pytest.raises(PrivacyLedgerError):
        PrivacyLedger(path).spent("site_update", DELTA)
    assert path.read_text() == content


def test_concurrent_jobs_lose_no_entries(tmp_path):
    path = tmp_path / "privacy_ledger.json"
    errors: list[BaseException] = []

    def job(name: str) -> None:
        try:
            for r in range(10):
                PrivacyLedger(path).charge(_site_round(name, r), budget_epsilon=1e3, delta=DELTA)
        except BaseException as exc:  # surfaced by the assert below, not lost in the thread
            errors.append(exc)

    threads = [threading.Thread(target=job, args=(f"job-{i}",)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(PrivacyLedger(path).entries()) == 30
    assert sorted(p.name for p in tmp_path.iterdir()) == ["privacy_ledger.json", "privacy_ledger.json.lock"]


def test_entry_round_trips_through_json(tmp_path):
    entry = SpendEntry("j", None, "patient", 1.1, 0.05, 10, details={"batch_size": 2})
    assert SpendEntry.from_json(json.loads(json.dumps(entry.to_json()))) == entry


@pytest.mark.parametrize(
    "kwargs",
    [
        {"job_id": ""},
        {"unit": "hospital"},
        {"round": "3"},
        {"noise_multiplier": -1.0},
        {"sample_rate": 0.0},
        {"steps": 0},
        {"details": {"x": float("nan")}},
    ],
)
def test_bad_entries_are_rejected(kwargs):
    base = {"job_id": "j", "round": 0, "unit": "site_update", "noise_multiplier": 1.0, "sample_rate": 1.0, "steps": 1}
    with pytest.raises(ValueError):
        SpendEntry(**{**base, **kwargs})


@pytest.mark.parametrize("budget", [0, -1.0, float("inf"), float("nan"), True])
def test_bad_budget_is_rejected(tmp_path, budget):
    with pytest.raises(ValueError, match="budget_epsilon"):
        PrivacyLedger(tmp_path / "l.json").charge(_site_round("j", 0), budget_epsilon=budget, delta=DELTA)


def test_site_budget_file(tmp_path):
    path = tmp_path / "local" / "privacy_budget.json"
    path.parent.mkdir()
    path.write_text(json.dumps({"epsilon_budget": 8.0, "delta": 1e-5, "ledger_file": "privacy_ledger.json"}))
    budget = load_site_privacy_budget(path)
    assert (budget.epsilon_budget, budget.delta, budget.accountant) == (8.0, 1e-5, "rdp")
    assert budget.ledger_file == (tmp_path / "local" / "privacy_ledger.json").resolve()


@pytest.mark.parametrize(
    "content, problem",
    [
        ("{oops", "cannot read"),
        (json.dumps({"delta": 1e-5}), "epsilon_budget"),
        (json.dumps({"epsilon_budget": 8.0}), "delta"),
        (json.dumps({"epsilon_budget": 0, "delta": 1e-5}), "epsilon_budget"),
        (json.dumps({"epsilon_budget": 8.0, "delta": 1.0}), "delta"),
        (json.dumps({"epsilon_budget": 8.0, "delta": 1e-5, "epsilon_budjet": 1.0}), "unknown field"),
        (json.dumps({"epsilon_budget": 8.0, "delta": 1e-5, "accountant": "gdp"}), "accountant"),
        (json.dumps({"epsilon_budget": 8.0, "delta": 1e-5, "ledger_file": ""}), "ledger_file"),
    ],
)
def test_bad_site_budget_names_file_and_field(tmp_path, content, problem):
    path = tmp_path / "privacy_budget.json"
    path.write_text(content)
    with pytest.raises(PrivacyLedgerError, match=problem) as raised:
        load_site_privacy_budget(path)
    assert str(path) in str(raised.value)


def test_missing_site_budget_raises(tmp_path):
    with pytest.raises(PrivacyLedgerError, match="privacy_budget.json"):
        load_site_privacy_budget(tmp_path / "privacy_budget.json")
