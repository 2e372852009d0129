"""The privacy officer's report: totals per unit from the accountant over all jobs, and per-job progress."""

from __future__ import annotations

from fedseg3d.privacy.accounting import epsilon_for, site_update_mechanism
from fedseg3d.privacy.ledger import RUN_DETAIL, PrivacyLedger, SpendEntry, load_site_privacy_budget, new_run_id
from fedseg3d.privacy.site_budget import write_site_budget
from fedseg3d.tools.privacy_report import main, site_report


def charge(ledger: PrivacyLedger, job: str, round_: int, unit: str, rate: float = 1.0, run: str | None = None) -> None:
    details = {RUN_DETAIL: run} if run else {}
    entry = SpendEntry(
        job_id=job, round=round_, unit=unit, noise_multiplier=1.0, sample_rate=rate, steps=1, details=details
    )
    ledger.charge(entry, budget_epsilon=100.0, delta=1e-5)


def test_report_totals_per_unit_and_per_job(tmp_path, capsys):
    budget = load_site_privacy_budget(write_site_budget(tmp_path, epsilon_budget=20.0, delta=1e-5))
    assert "nothing spent yet" in site_report(budget)
    ledger = PrivacyLedger(budget.ledger_file)
    for job, rounds in (("job-a", 2), ("job-b", 1)):
        for r in range(rounds):
            charge(ledger, job, r, "site_update")
    charge(ledger, "job-c", 0, "patient", rate=0.5)

    main([str(budget.source)])
    report = capsys.readouterr().out
    three = epsilon_for([site_update_mechanism(1.0, 3)], 1e-5)
    two = epsilon_for([site_update_mechanism(1.0, 2)], 1e-5)
    assert f"unit site_update: spent epsilon={three:.4g}, left {20 - three:.4g}" in report
    assert f"job job-a: 2 release(s), rounds [0, 1], epsilon after it {two:.4g}" in report
    assert f"job job-b: 1 release(s), rounds [0], epsilon after it {three:.4g}" in report
    patient = epsilon_for([(1.0, 0.5, 1)], 1e-5)
    assert f"unit patient: spent epsilon={patient:.4g}" in report


def test_runs_that_share_a_job_id_get_a_line_each(tmp_path):
    """The simulator names every job simulate_job: two runs must not read as one job with rounds [0, 1, 0, 1]."""
    budget = load_site_privacy_budget(write_site_budget(tmp_path, epsilon_budget=20.0, delta=1e-5))
    ledger = PrivacyLedger(budget.ledger_file)
    first, second = new_run_id(), new_run_id()
    assert first != second
    for run in (first, second):
        for r in range(2):
            charge(ledger, "simulate_job", r, "site_update", run=run)
    charge(ledger, "job-x", 0, "site_update", run=new_run_id())
    report = site_report(budget)
    two, four = (epsilon_for([site_update_mechanism(1.0, n)], 1e-5) for n in (2, 4))
    assert f"job simulate_job (run {first}, from " in report
    assert f"2 release(s), rounds [0, 1], epsilon after it {two:.4g}" in report
    assert f"job simulate_job (run {second}, from " in report
    assert f"2 release(s), rounds [0, 1], epsilon after it {four:.4g}" in report
    assert "job job-x: 1 release(s)" in report  # a job id with one run reads as before
