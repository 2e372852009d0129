"""Charge or refuse, without FLARE: the one rule the update filter and DP-SGD share."""

from __future__ import annotations

import logging

import pytest

from fedseg3d.privacy.accounting import PATIENT, SITE_UPDATE, epsilon_for, patient_dpsgd_mechanism
from fedseg3d.privacy.ledger import RUN_DETAIL, PrivacyBudgetExceeded, PrivacyLedger
from fedseg3d.privacy.site_budget import PRIVACY_DIR_ENV, write_site_budget
from fedseg3d.privacy.spend import PrivacyBudgetMissing, PrivacySpend

DELTA = 1e-5
ROUND = patient_dpsgd_mechanism(1.0, 2, 20, 10)


@pytest.fixture
def site_dir(tmp_path):
    """A site ``local/`` folder with a budget of about two rounds."""
    write_site_budget(tmp_path, epsilon_budget=epsilon_for([ROUND] * 2, DELTA) * 1.001, delta=DELTA)
    return tmp_path


def test_a_release_that_fits_is_checked_charged_and_recorded_with_the_site_and_run(site_dir):
    spend = PrivacySpend(PATIENT, "site-1", site_dir)
    assert spend.accounting() == (DELTA, "rdp")
    spend.check(ROUND)
    release = spend.charge(ROUND, "job-a", 0, {"max_grad_norm": 0.25})
    assert (release.epsilon, release.delta, release.unit, release.scope) == (
        pytest.approx(epsilon_for([ROUND], DELTA)), DELTA, PATIENT, "site_ledger",
    )  # fmt: skip
    assert release.meta() == {"dp_epsilon": release.epsilon, "dp_delta": DELTA, "dp_unit": PATIENT,
                              "dp_scope": "site_ledger"}  # fmt: skip
    (entry,) = PrivacyLedger(site_dir / "privacy_ledger.json").entries()
    assert (entry.job_id, entry.round, entry.unit, entry.mechanism) == ("job-a", 0, PATIENT, ROUND)
    assert entry.details == {"site": "site-1", RUN_DETAIL: spend.run_id, "max_grad_norm": 0.25}


def test_a_release_over_budget_is_refused_before_work_and_at_the_charge_naming_the_budget_file(site_dir):
    spend = PrivacySpend(PATIENT, "site-1", site_dir)
    spend.charge(ROUND, "job-a", 0, {})
    spend.charge(ROUND, "job-a", 1, {})
    ledger = (site_dir / "privacy_ledger.json").read_bytes()
    with pytest.raises(PrivacyBudgetExceeded, match="budget file .*privacy_budget.json"):
        spend.check(ROUND)
    with pytest.raises(PrivacyBudgetExceeded, match="budget file .*privacy_budget.json"):
        spend.charge(ROUND, "job-a", 2, {})
    assert (site_dir / "privacy_ledger.json").read_bytes() == ledger, "a refused release records nothing"


def test_units_are_held_to_the_budget_separately(site_dir):
    PrivacySpend(PATIENT, "site-1", site_dir).charge(ROUND, "job-a", 0, {})
    PrivacySpend(PATIENT, "site-1", site_dir).charge(ROUND, "job-a", 1, {})
    PrivacySpend(SITE_UPDATE, "site-1", site_dir).check(ROUND)  # the patient unit's spending does not count here


def test_without_a_budget_a_required_one_refuses_and_otherwise_the_job_alone_is_reported(tmp_path, caplog):
    with pytest.raises(PrivacyBudgetMissing, match="require_budget is set but no site privacy budget was found"):
        PrivacySpend(PATIENT, "site-1", tmp_path).check(ROUND)
    lenient = PrivacySpend(PATIENT, "site-1", tmp_path, require_budget=False, delta=1e-6, accountant="prv")
    assert lenient.accounting() == (1e-6, "prv")
    with caplog.at_level(logging.WARNING):
        lenient.check(ROUND)
        first = lenient.charge(ROUND, "job-a", 0, {})
        second = lenient.charge(ROUND, "job-a", 1, {})
    assert (first.scope, first.delta) == ("job", 1e-6)
    assert second.epsilon == pytest.approx(epsilon_for([ROUND, ROUND], 1e-6, "prv"))
    assert caplog.text.count("no site privacy budget found") == 1, "warned once per run"
    assert not (tmp_path / "privacy_ledger.json").exists()


def test_the_budget_is_found_under_the_privacy_dir_by_site_name(tmp_path, monkeypatch):
    write_site_budget(tmp_path / "site-2", epsilon_budget=10.0, delta=DELTA)
    monkeypatch.setenv(PRIVACY_DIR_ENV, str(tmp_path))
    release = PrivacySpend(SITE_UPDATE, "site-2", None).charge(ROUND, None, None, {})
    assert release.scope == "site_ledger"
    (entry,) = PrivacyLedger(tmp_path / "site-2" / "privacy_ledger.json").entries()
    assert (entry.job_id, entry.round) == ("unknown", None)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"unit": "case"}, "unit must be one of"),
        ({"require_budget": "yes"}, "require_budget must be true or false"),
        ({"delta": 1.0}, "delta must be a number in"),
        ({"accountant": "gdp"}, "accountant must be one of"),
    ],
)
def test_bad_arguments_are_refused_naming_them(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PrivacySpend(**({"unit": PATIENT, "site_name": "site-1"} | kwargs))
