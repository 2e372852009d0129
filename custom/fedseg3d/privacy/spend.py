"""Charge the site's privacy ledger or refuse: the one rule the update filter and DP-SGD both follow.

Every release of private information at a site goes through ``PrivacySpend``:

1. find the site's budget (``fedseg3d.privacy.site_budget``), re-read at every call so a site admin's change takes
   effect at the next round;
2. ``check`` a planned release before any work is done (DP-SGD trains for minutes; a round the budget cannot afford
   is refused before it starts);
3. ``charge`` the release to the site ledger before it leaves, under the ledger's lock; a refused charge records
   nothing and raises, so the caller sends nothing;
4. without a budget file: refuse when ``require_budget`` is set, otherwise warn once and report the epsilon of this
   job's releases only (scope ``job``), at the caller's ``delta`` and ``accountant``.

The result of a charge is the privacy record the site attaches to the update (``fedseg3d.privacy.record``). Plain
Python, no nvflare: the FLARE adapters call it and turn its exceptions into error replies.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fedseg3d.privacy.accounting import ACCOUNTANTS, UNITS, Mechanism, cost_of, epsilon_for
from fedseg3d.privacy.ledger import RUN_DETAIL, PrivacyBudgetExceeded, PrivacyLedger, SiteBudget, SpendEntry, new_run_id
from fedseg3d.privacy.record import privacy_meta
from fedseg3d.privacy.site_budget import find_site_budget, where_looked

logger = logging.getLogger(__name__)

DEFAULT_DELTA = 1e-5  # the delta a site without a budget file reports at; a budget's delta always wins
SITE_LEDGER, JOB_ONLY = "site_ledger", "job"


class PrivacyBudgetMissing(RuntimeError):
    """``require_budget`` is set and the site has no budget file. Nothing was released."""


@dataclass(frozen=True)
class Release:
    """A charged release: the unit's cumulative epsilon at ``delta``, over the site ledger or this job only."""

    epsilon: float
    delta: float
    unit: str
    scope: str

    def meta(self) -> dict[str, float | str]:
        """The privacy record for the released update's meta."""
        return privacy_meta(self.epsilon, self.delta, self.unit, self.scope)


class PrivacySpend:
    """One site's spending of one privacy unit over a job run.

    Args:
        unit: ``"site_update"`` (update filter) or ``"patient"`` (DP-SGD).
        site_name: the site's identity, used under ``$FEDSEG3D_PRIVACY_DIR`` and recorded with each charge.
        site_config_dir: the site's ``local/`` folder, or ``None`` outside a FLARE run.
        require_budget: refuse every release when the site has no budget file (fail closed).
        delta: the delta to report at without a budget file.
        accountant: ``"rdp"`` or ``"prv"`` without a budget file.

    Raises:
        ValueError: an argument out of range.
    """

    def __init__(
        self,
        unit: str,
        site_name: str,
        site_config_dir: str | os.PathLike | None = None,
        require_budget: bool = True,
        delta: float = DEFAULT_DELTA,
        accountant: str = "rdp",
    ) -> None:
        if unit not in UNITS:
            raise ValueError(f"unit must be one of {UNITS}, got {unit!r}")
        if not isinstance(require_budget, bool):
            raise ValueError(f"require_budget must be true or false, got {require_budget!r}")
        if isinstance(delta, bool) or not isinstance(delta, int | float) or not 0 < delta < 1:
            raise ValueError(f"delta must be a number in (0, 1), got {delta!r}")
        if accountant not in ACCOUNTANTS:
            raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {accountant!r}")
        self.unit = unit
        self.site_name = site_name
        self.site_config_dir = site_config_dir
        self.require_budget = require_budget
        self.delta = float(delta)
        self.accountant = accountant
        self.run_id = new_run_id()  # tells this run's ledger entries apart (the simulator reuses its job id)
        self._job_history: list[Mechanism] = []
        self._warned_no_budget = False

    def budget(self) -> SiteBudget | None:
        """The site's budget, or ``None`` when it has none and none is required.

        Raises:
            PrivacyBudgetMissing: no budget file while ``require_budget``.
            FileNotFoundError, RuntimeError, PrivacyLedgerError: the budget cannot be located or read.
        """
        budget = find_site_budget(self.site_config_dir, self.site_name)
        if budget is not None:
            return budget
        looked = where_looked(self.site_config_dir)
        if self.require_budget:
            raise PrivacyBudgetMissing(
                f"require_budget is set but no site privacy budget was found: looked in {looked}"
            )
        if not self._warned_no_budget:
            self._warned_no_budget = True
            logger.warning(
                "%s: no site privacy budget found (%s): releases are still protected, but no budget is enforced "
                "and the epsilon reported covers this job only",
                self.site_name,
                looked,
            )
        return None

    def accounting(self) -> tuple[float, str]:
        """The delta and accountant the next release is accounted at: the budget's, else this spend's own.

        Raises:
            as ``budget``.
        """
        budget = self.budget()
        return (budget.delta, budget.accountant) if budget is not None else (self.delta, self.accountant)

    def check(self, planned: Mechanism) -> None:
        """Refuse a planned release the budget cannot afford, before any work is done. Records nothing.

        Raises:
            PrivacyBudgetExceeded: the release would take the unit past the budget (``charge`` checks again).
            as ``budget``.
        """
        budget = self.budget()
        if budget is None:
            return
        ledger = PrivacyLedger(budget.ledger_file, accountant=budget.accountant)
        history = [entry.mechanism for entry in ledger.entries() if entry.unit == self.unit]
        cost = cost_of(history, planned, budget.delta, budget.accountant)
        if not cost.epsilon_after <= budget.epsilon_budget:  # also refuses inf and nan
            raise PrivacyBudgetExceeded(
                self.unit, cost.epsilon_before, cost.epsilon_after, budget.epsilon_budget, budget.delta,
                _where(budget),
            )  # fmt: skip

    def charge(
        self, mechanism: Mechanism, job_id: str | None, round_: int | None, details: Mapping[str, Any]
    ) -> Release:
        """Record ``mechanism`` as released by ``job_id`` in ``round_`` and return the unit's cumulative epsilon.

        Args:
            details: what the caller wants kept with the entry (its settings); the site and run id are added.

        Raises:
            PrivacyBudgetExceeded: the release would take the unit past the budget; nothing is recorded.
            PrivacyLedgerError: the ledger or budget file is corrupt.
            as ``budget``.
        """
        budget = self.budget()
        if budget is None:
            self._job_history.append(mechanism)
            return Release(epsilon_for(self._job_history, self.delta, self.accountant), self.delta, self.unit, JOB_ONLY)
        entry = SpendEntry(
            job_id=str(job_id or "unknown"),
            round=round_,
            unit=self.unit,
            noise_multiplier=mechanism.noise_multiplier,
            sample_rate=mechanism.sample_rate,
            steps=mechanism.steps,
            details={"site": self.site_name, RUN_DETAIL: self.run_id, **details},
        )
        ledger = PrivacyLedger(budget.ledger_file, accountant=budget.accountant)
        try:
            epsilon = ledger.charge(entry, budget_epsilon=budget.epsilon_budget, delta=budget.delta)
        except PrivacyBudgetExceeded as err:
            # The same message as a refused check: which ledger and which budget file.
            raise PrivacyBudgetExceeded(
                err.unit, err.spent, err.would_be, err.budget, err.delta, _where(budget)
            ) from err
        return Release(epsilon, budget.delta, self.unit, SITE_LEDGER)


def _where(budget: SiteBudget) -> str:
    return f"{budget.ledger_file}; budget file {budget.source}"
