"""The privacy officer's report: totals per unit from the accountant over all jobs, and per-job progress."""

from __future__ import annotations

from fedseg3d.privacy.accounting import epsilon_for, site_update_mechanism
from fedseg3d.privacy.ledger import PrivacyLedger, SpendEntry, load_site_privacy_budget
from fedseg3d.privacy.site_budget import write_site_budget
from fedseg3d.tools.privacy_report import main, site_report


def charge(ledger: PrivacyLedger, job: str, round_: int, unit: str, rate: float = 1.0) -> None:
    entry = SpendEntry(job_id=job, round=round_, unit=unit, noise_multiplier=1.0, sample_rate=rate, steps=1)
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
