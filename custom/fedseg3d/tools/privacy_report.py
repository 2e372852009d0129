"""Print what a site has spent of its privacy budget: the privacy officer's view of a site ledger.

Writes nothing: it prints the report.

Examples:
    fedseg3d privacy-report <site>/local/privacy_budget.json [more budget files ...]
    fedseg3d privacy-report workspace/privacy/*/privacy_budget.json     # simulator sites

For each budget file: the budget, then per protected unit the cumulative epsilon over every job (computed by the
site's accountant from the mechanism parameters in the ledger, never by adding epsilons), what is left, and one
line per job with its rounds and the epsilon the unit had reached after that job's last release. Where one job id
has several runs (the simulator names every job ``simulate_job``), each run gets its own line with its run id and the
time of its first release.
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

from fedseg3d.privacy.accounting import UNITS, epsilon_for
from fedseg3d.privacy.ledger import RUN_DETAIL, PrivacyLedger, SiteBudget, load_site_privacy_budget


def site_report(budget: SiteBudget) -> str:
    """A text report of one site's ledger against its budget."""
    ledger = PrivacyLedger(budget.ledger_file, accountant=budget.accountant)
    entries = ledger.entries()
    lines = [
        f"budget file {budget.source}",
        f"  budget epsilon={budget.epsilon_budget:g} at delta={budget.delta:g} ({budget.accountant} accountant), "
        f"ledger {budget.ledger_file} ({len(entries)} release(s))",
    ]
    for unit in UNITS:
        unit_entries = [e for e in entries if e.unit == unit]
        if not unit_entries:
            continue
        spent = epsilon_for([e.mechanism for e in unit_entries], budget.delta, budget.accountant)
        lines.append(f"  unit {unit}: spent epsilon={spent:.4g}, left {max(budget.epsilon_budget - spent, 0):.4g}")
        runs: dict[tuple[str, str | None], list[int]] = {}
        for index, entry in enumerate(unit_entries):
            runs.setdefault((entry.job_id, entry.details.get(RUN_DETAIL)), []).append(index)
        runs_of_job = Counter(job_id for job_id, _ in runs)
        for (job_id, run), indices in runs.items():
            rounds = [unit_entries[i].round for i in indices]
            after = epsilon_for([e.mechanism for e in unit_entries[: indices[-1] + 1]], budget.delta, budget.accountant)
            # The simulator calls every job simulate_job: name the run (and when it began) where a job id repeats.
            name = (
                job_id
                if runs_of_job[job_id] == 1
                else f"{job_id} (run {run or 'unrecorded'}, from {unit_entries[indices[0]].timestamp})"
            )
            lines.append(f"    job {name}: {len(indices)} release(s), rounds {rounds}, epsilon after it {after:.4g}")
    if len(lines) == 2:
        lines.append("  nothing spent yet")
    return "\n".join(lines)


def main(argv: list[str] | None = None, prog: str | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("budget_files", type=Path, nargs="+", help="privacy_budget.json of each site")
    args = parser.parse_args(argv)
    for path in args.budget_files:
        print(site_report(load_site_privacy_budget(path)))


if __name__ == "__main__":
    main()
