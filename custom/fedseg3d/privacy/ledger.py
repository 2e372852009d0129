"""A site's privacy ledger: every release of private information, kept across jobs, checked against a budget.

Why a file at the site and not a counter in the filter: a budget that resets with every job is no budget. A
hospital that allows epsilon = 8 means 8 over the life of its data, whatever number of jobs the federation runs.
So each release is appended to a JSON file in the site's workspace, and the cumulative epsilon is recomputed from
the mechanism parameters of *all* entries (every job, every round) with an Opacus accountant
(``fedseg3d.privacy.accounting``). Storing parameters rather than epsilons keeps the total honest: epsilons of
separate runs do not add up to the epsilon of their composition, and a site may later change its delta or
accountant and still get a correct total.

Site budget file (a site setting, never a job setting), ``<workspace>/local/privacy_budget.json``::

    {"epsilon_budget": 8.0, "delta": 1e-5, "ledger_file": "privacy_ledger.json", "accountant": "rdp"}

* ``epsilon_budget`` (required, > 0): the most epsilon the site will spend per privacy unit (see below).
* ``delta`` (required, in (0, 1)): the delta every epsilon is computed at; pick well below 1 / number of patients.
* ``ledger_file`` (optional, default ``privacy_ledger.json``): relative paths are resolved against the folder of the
  budget file. Put it where backups reach: deleting the ledger resets the site's spending to zero.
* ``accountant`` (optional, ``"rdp"`` (default) or ``"prv"``).

Units: ``site_update`` (site-level DP of the released updates) and ``patient`` (patient-level DP-SGD) protect
different neighbouring relations, so each has its own cumulative epsilon and each is held to ``epsilon_budget``.

Ledger file format (version 1)::

    {"format": "fedseg3d-privacy-ledger", "version": 1, "entries": [
      {"job_id": "...", "round": 3, "unit": "site_update", "timestamp": "2025-01-01T00:00:00+00:00",
       "mechanism": {"type": "gaussian", "noise_multiplier": 1.0, "sample_rate": 1.0, "steps": 1},
       "details": {"clip_norm": 1.0}}]}

Concurrency and failure: several jobs may run at a site at once, each in its own process. ``charge`` holds an
exclusive ``fcntl.flock`` on a sibling ``<ledger>.lock`` file across read, check and write (the lock is on a
separate file because ``os.replace`` swaps the ledger's inode, and a lock on a replaced inode protects nothing), and
writes a temporary file, fsyncs it and ``os.replace``-s it into place, so readers see the old or the new ledger,
never half of one. A ledger that cannot be parsed raises ``PrivacyLedgerError`` naming the file; it is never
treated as empty. A refused charge records nothing. Every release is charged, retries included: a result that was
sent twice was seen twice.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import numbers
import os
import tempfile
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fedseg3d.privacy.accounting import ACCOUNTANTS, UNITS, Mechanism, epsilon_for, validate_mechanism

LEDGER_FORMAT = "fedseg3d-privacy-ledger"
LEDGER_VERSION = 1
BUDGET_FILE_NAME = "privacy_budget.json"
DEFAULT_LEDGER_FILE = "privacy_ledger.json"
_BUDGET_KEYS = {"epsilon_budget", "delta", "ledger_file", "accountant"}


class PrivacyLedgerError(RuntimeError):
    """A ledger or budget file is unreadable or malformed. The message names the file and what is wrong."""

    def __init__(self, path: str | os.PathLike, problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class PrivacyBudgetExceeded(RuntimeError):
    """A release was refused because it would take the site past its budget. Nothing was recorded."""

    def __init__(self, unit: str, spent: float, would_be: float, budget: float, delta: float, ledger: str) -> None:
        self.unit, self.spent, self.would_be, self.budget, self.delta = unit, spent, would_be, budget, delta
        super().__init__(
            f"privacy budget exceeded for unit '{unit}' (ledger {ledger}): spent epsilon={spent:.4g}, this release "
            f"would make it {would_be:.4g} > budget {budget:.4g} at delta={delta:g}; the release was refused and "
            f"nothing was recorded. Raise the noise, run fewer rounds, or have the site raise its budget."
        )


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


RUN_DETAIL = "run"  # details key: which run of a job released it (see new_run_id)


def new_run_id() -> str:
    """A random id for one run of a job at a site, recorded with each release under ``details["run"]``.

    Why: the FLARE simulator names every job ``simulate_job``, so without it the ledger cannot tell two simulator
    runs apart; in POC and production the job id is unique and the run id only repeats that.
    """
    return uuid.uuid4().hex[:8]


@dataclass(frozen=True)
class SpendEntry:
    """One charge: ``steps`` Gaussian mechanisms released by ``job_id`` in ``round`` (``None`` when unknown)."""

    job_id: str
    round: int | None
    unit: str
    noise_multiplier: float
    sample_rate: float
    steps: int
    timestamp: str = field(default_factory=_now)
    details: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.job_id, str) or not self.job_id:
            raise ValueError(f"job_id must be a non-empty string, got {self.job_id!r}")
        if self.round is not None and (isinstance(self.round, bool) or not isinstance(self.round, int)):
            raise ValueError(f"round must be an int or None, got {self.round!r}")
        if self.unit not in UNITS:
            raise ValueError(f"unit must be one of {UNITS}, got {self.unit!r}")
        if not isinstance(self.timestamp, str):
            raise ValueError(f"timestamp must be an ISO 8601 string, got {self.timestamp!r}")
        if not isinstance(self.details, Mapping):
            raise ValueError(f"details must be a mapping, got {type(self.details).__name__}")
        try:
            json.dumps(dict(self.details), allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"details must be plain JSON (finite numbers, strings, lists, dicts): {exc}") from exc
        validate_mechanism(self.mechanism)

    @property
    def mechanism(self) -> Mechanism:
        return Mechanism(self.noise_multiplier, self.sample_rate, self.steps)

    def to_json(self) -> dict[str, Any]:
        return {
            "job_id": self.job_id,
            "round": self.round,
            "unit": self.unit,
            "timestamp": self.timestamp,
            "mechanism": {
                "type": "gaussian",
                "noise_multiplier": self.noise_multiplier,
                "sample_rate": self.sample_rate,
                "steps": self.steps,
            },
            "details": dict(self.details),
        }

    @classmethod
    def from_json(cls, obj: Any) -> SpendEntry:
        """Parse one ledger entry. Raises ``ValueError`` (or ``KeyError``/``TypeError``) when malformed."""
        if not isinstance(obj, dict):
            raise ValueError(f"expected an object, got {type(obj).__name__}")
        mechanism = obj["mechanism"]
        if not isinstance(mechanism, dict) or mechanism.get("type") != "gaussian":
            raise ValueError(f"mechanism must be an object with type 'gaussian', got {mechanism!r}")
        return cls(
            job_id=obj["job_id"],
            round=obj["round"],
            unit=obj["unit"],
            noise_multiplier=mechanism["noise_multiplier"],
            sample_rate=mechanism["sample_rate"],
            steps=mechanism["steps"],
            timestamp=obj["timestamp"],
            details=obj.get("details", {}),
        )


@dataclass(frozen=True)
class SiteBudget:
    """A site's privacy budget, read from its ``privacy_budget.json`` (see module doc)."""

    epsilon_budget: float
    delta: float
    ledger_file: Path
    accountant: str
    source: Path


def load_site_privacy_budget(path: str | os.PathLike) -> SiteBudget:
    """Read and validate a site budget file. Unknown keys are errors, so a misspelt field cannot go unnoticed.

    Raises:
        PrivacyLedgerError: the file is missing, not JSON, or a field is missing or out of range.
    """
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PrivacyLedgerError(path, f"cannot read site privacy budget: {exc}") from exc
    if not isinstance(raw, dict):
        raise PrivacyLedgerError(path, f"expected a JSON object, got {type(raw).__name__}")
    unknown = sorted(set(raw) - _BUDGET_KEYS)
    if unknown:
        raise PrivacyLedgerError(path, f"unknown field(s) {unknown}; allowed: {sorted(_BUDGET_KEYS)}")
    epsilon_budget, delta = raw.get("epsilon_budget"), raw.get("delta")
    if not _is_number(epsilon_budget) or not 0 < epsilon_budget < math.inf:
        raise PrivacyLedgerError(path, f"'epsilon_budget' must be a finite number > 0, got {epsilon_budget!r}")
    if not _is_number(delta) or not 0 < delta < 1:
        raise PrivacyLedgerError(path, f"'delta' must be a number in (0, 1), got {delta!r}")
    ledger_file = raw.get("ledger_file", DEFAULT_LEDGER_FILE)
    if not isinstance(ledger_file, str) or not ledger_file:
        raise PrivacyLedgerError(path, f"'ledger_file' must be a non-empty string, got {ledger_file!r}")
    accountant = raw.get("accountant", "rdp")
    if accountant not in ACCOUNTANTS:
        raise PrivacyLedgerError(path, f"'accountant' must be one of {ACCOUNTANTS}, got {accountant!r}")
    ledger_path = Path(ledger_file)
    if not ledger_path.is_absolute():
        ledger_path = path.parent / ledger_path
    return SiteBudget(float(epsilon_budget), float(delta), ledger_path.resolve(), accountant, path)


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


class PrivacyLedger:
    """The spend history of one site, stored in one JSON file shared by all its jobs.

    Args:
        path: the ledger file; created (with its folder) on the first charge.
        accountant: ``"rdp"`` or ``"prv"``, used for every total this ledger reports.
    """

    def __init__(self, path: str | os.PathLike, accountant: str = "rdp") -> None:
        if accountant not in ACCOUNTANTS:
            raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {accountant!r}")
        self.path = Path(path)
        self.accountant = accountant

    @property
    def lock_path(self) -> Path:
        return self.path.with_name(self.path.name + ".lock")

    def entries(self) -> list[SpendEntry]:
        """Every recorded charge, oldest first."""
        with self._locked(exclusive=False):
            return self._read()

    def spent(self, unit: str, delta: float) -> float:
        """Cumulative epsilon of ``unit`` over all recorded charges, at ``delta``."""
        return self._epsilon(self.entries(), unit, delta)

    def charge(self, entry: SpendEntry, budget_epsilon: float, delta: float) -> float:
        """Record ``entry`` if the unit's new total stays within ``budget_epsilon``; refuse otherwise.

        Check and write happen under one exclusive lock, so two jobs cannot both squeeze into the last bit of budget.

        Returns:
            The unit's cumulative epsilon including ``entry``.

        Raises:
            PrivacyBudgetExceeded: the new total would exceed the budget; the ledger is left unchanged.
            PrivacyLedgerError: the existing ledger is corrupt.
            ValueError: a bad budget or delta.
        """
        if not isinstance(entry, SpendEntry):
            raise TypeError(f"entry must be a SpendEntry, got {type(entry).__name__}")
        if not _is_number(budget_epsilon) or not 0 < budget_epsilon < math.inf:
            raise ValueError(f"budget_epsilon must be a finite number > 0, got {budget_epsilon!r}")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._locked(exclusive=True):
            entries = self._read()
            spent = self._epsilon(entries, entry.unit, delta)
            would_be = self._epsilon([*entries, entry], entry.unit, delta)
            if not would_be <= budget_epsilon:  # also refuses inf and nan
                raise PrivacyBudgetExceeded(entry.unit, spent, would_be, budget_epsilon, delta, str(self.path))
            self._write([*entries, entry])
        return would_be

    def _epsilon(self, entries: list[SpendEntry], unit: str, delta: float) -> float:
        if unit not in UNITS:
            raise ValueError(f"unit must be one of {UNITS}, got {unit!r}")
        return epsilon_for([e.mechanism for e in entries if e.unit == unit], delta, self.accountant)

    @contextlib.contextmanager
    def _locked(self, exclusive: bool) -> Iterator[None]:
        if not exclusive and not self.lock_path.parent.exists():
            yield  # nothing to read yet, nothing to lock
            return
        with open(self.lock_path, "a") as lock_file:
            fcntl.flock(lock_file.fileno(), fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            try:
                yield
            finally:
                fcntl.flock(lock_file.fileno(), fcntl.LOCK_UN)

    def _read(self) -> list[SpendEntry]:
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return []
        except (OSError, UnicodeDecodeError) as exc:
            raise PrivacyLedgerError(self.path, f"cannot read privacy ledger: {exc}") from exc
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise PrivacyLedgerError(
                self.path, f"privacy ledger is not valid JSON ({exc}); refusing to reset it"
            ) from exc
        if not isinstance(raw, dict) or raw.get("format") != LEDGER_FORMAT:
            raise PrivacyLedgerError(self.path, f"not a privacy ledger: expected 'format': '{LEDGER_FORMAT}'")
        if raw.get("version") != LEDGER_VERSION:
            raise PrivacyLedgerError(self.path, f"unsupported ledger version {raw.get('version')!r}")
        if not isinstance(raw.get("entries"), list):
            raise PrivacyLedgerError(self.path, "'entries' must be a list")
        entries = []
        for index, item in enumerate(raw["entries"]):
            try:
                entries.append(SpendEntry.from_json(item))
            except (KeyError, TypeError, ValueError) as exc:
                raise PrivacyLedgerError(self.path, f"entry {index} is malformed: {exc!r}") from exc
        return entries

    def _write(self, entries: list[SpendEntry]) -> None:
        payload = {"format": LEDGER_FORMAT, "version": LEDGER_VERSION, "entries": [e.to_json() for e in entries]}
        text = json.dumps(payload, indent=2, allow_nan=False) + "\n"
        fd, tmp_name = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as tmp:
                tmp.write(text)
                tmp.flush()
                os.fsync(tmp.fileno())
            os.replace(tmp_name, self.path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp_name)
            raise
        dir_fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # make the rename itself durable
        finally:
            os.close(dir_fd)
