"""Epsilon for a history of Gaussian mechanisms, computed by Opacus's accountants (never by a formula of ours).

Both privacy units this project accounts for are compositions of the (sub)sampled Gaussian mechanism, so one
history format serves both: a list of ``(noise_multiplier, sample_rate, steps)`` entries, the format of
``opacus.accountants.IAccountant.history``.

* Site level (``SITE_UPDATE``): each round the site releases its clipped weight difference plus Gaussian noise
  of std ``noise_multiplier * clip_norm`` (DP-FedAvg; McMahan et al., "Learning Differentially Private Recurrent
  Language Models", ICLR 2018). Every round is one Gaussian mechanism with ``sample_rate = 1.0``: the site is not
  sub-sampled from its own point of view, and counting the server's client sampling as amplification would need
  the sampling to be secret and done by someone the site trusts, which FLARE does not promise. Rounds compose.
* Patient level (``PATIENT``): DP-SGD inside local training (Abadi et al., "Deep Learning with Differential
  Privacy", CCS 2016) with ``sample_rate = batch_size / n_cases`` and one mechanism per optimizer step.

Two accountants are offered, both Opacus's: ``"rdp"`` (Renyi DP, Mironov 2017, converted to (epsilon, delta) with
Balle et al. 2020) and ``"prv"`` (numerical composition of privacy-loss random variables, Gopi et al. 2021, which
gives a tighter bound; Opacus returns its upper estimate). Both are valid upper bounds on epsilon; PRV is slower
(tens of milliseconds per distinct entry).

Composition is commutative, so entries with the same ``(noise_multiplier, sample_rate)`` are merged before they
reach the accountant: a ledger of hundreds of one-round entries then costs one accountant term.
"""

from __future__ import annotations

import logging
import math
import numbers
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.utils import get_noise_multiplier

logger = logging.getLogger(__name__)

SITE_UPDATE = "site_update"
PATIENT = "patient"
UNITS = (SITE_UPDATE, PATIENT)
ACCOUNTANTS = ("rdp", "prv")


class Mechanism(NamedTuple):
    """``steps`` compositions of the Gaussian mechanism, Poisson-subsampled at ``sample_rate``.

    ``noise_multiplier`` is the noise std divided by the L2 sensitivity (the clip norm), as in Opacus.
    """

    noise_multiplier: float
    sample_rate: float
    steps: int


def validate_mechanism(mechanism: Iterable) -> Mechanism:
    """Check one history entry and return it as a ``Mechanism``.

    Raises:
        ValueError: not a triple, a non-finite or negative noise multiplier, a sample rate outside (0, 1], or a
            step count that is not a positive integer.
    """
    try:
        noise_multiplier, sample_rate, steps = mechanism
    except (TypeError, ValueError) as exc:
        raise ValueError(f"history entry {mechanism!r}: expected (noise_multiplier, sample_rate, steps)") from exc
    for name, value in (("noise_multiplier", noise_multiplier), ("sample_rate", sample_rate)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
            raise ValueError(f"history entry {mechanism!r}: {name} must be a finite number, got {value!r}")
    if noise_multiplier < 0:
        raise ValueError(f"history entry {mechanism!r}: noise_multiplier must be >= 0, got {noise_multiplier}")
    if not 0 < sample_rate <= 1:
        raise ValueError(f"history entry {mechanism!r}: sample_rate must be in (0, 1], got {sample_rate}")
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 1:
        raise ValueError(f"history entry {mechanism!r}: steps must be an integer >= 1, got {steps!r}")
    return Mechanism(float(noise_multiplier), float(sample_rate), int(steps))


def site_update_mechanism(noise_multiplier: float, rounds: int = 1) -> Mechanism:
    """``rounds`` releases of a site's noised update: the Gaussian mechanism with sample rate 1 (see module doc)."""
    return validate_mechanism((noise_multiplier, 1.0, rounds))


def patient_dpsgd_mechanism(noise_multiplier: float, batch_size: int, n_cases: int, steps: int) -> Mechanism:
    """``steps`` DP-SGD steps over ``n_cases`` patients with expected batch size ``batch_size``.

    The sample rate is ``batch_size / n_cases``, which is what Opacus's Poisson sampling uses; the guarantee assumes
    the data loader really samples each case independently with that probability (Opacus's
    ``DPDataLoader``), not shuffled fixed-size batches.

    Raises:
        ValueError: ``batch_size`` or ``n_cases`` not positive integers, or ``batch_size > n_cases``.
    """
    for name, value in (("batch_size", batch_size), ("n_cases", n_cases)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if batch_size > n_cases:
        raise ValueError(f"batch_size ({batch_size}) must not exceed n_cases ({n_cases})")
    return validate_mechanism((noise_multiplier, batch_size / n_cases, steps))


def compress_history(history: Iterable[Iterable]) -> list[Mechanism]:
    """Validate ``history`` and merge entries with equal (noise_multiplier, sample_rate), summing their steps."""
    merged: dict[tuple[float, float], int] = {}
    for entry in history:
        mechanism = validate_mechanism(entry)
        key = (mechanism.noise_multiplier, mechanism.sample_rate)
        merged[key] = merged.get(key, 0) + mechanism.steps
    return [Mechanism(sigma, rate, steps) for (sigma, rate), steps in merged.items()]


def _check_delta(delta: float) -> float:
    if isinstance(delta, bool) or not isinstance(delta, numbers.Real) or not 0 < delta < 1:
        raise ValueError(f"delta must be a number in (0, 1), got {delta!r}")
    return float(delta)


def epsilon_for(history: Iterable[Iterable], delta: float, accountant: str = "rdp") -> float:
    """The (epsilon, ``delta``)-DP epsilon of composing every mechanism in ``history``, from an Opacus accountant.

    Args:
        history: ``(noise_multiplier, sample_rate, steps)`` entries, in any order.
        delta: the target delta.
        accountant: ``"rdp"`` or ``"prv"`` (see module doc).

    Returns:
        Epsilon; 0.0 for an empty history and ``math.inf`` when any entry adds no noise (no privacy at all).

    Raises:
        ValueError: a bad entry, delta or accountant name.
        RuntimeError: the accountant failed or returned something that is not a number; never silently 0.
    """
    delta = _check_delta(delta)
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {accountant!r}")
    mechanisms = compress_history(history)
    if not mechanisms:
        return 0.0
    if any(m.noise_multiplier == 0 for m in mechanisms):
        # Neither accountant handles sigma = 0 uniformly (RDP gives inf, PRV fails); the answer is not in doubt.
        return math.inf
    engine = RDPAccountant() if accountant == "rdp" else PRVAccountant()
    engine.history = [tuple(m) for m in mechanisms]
    try:
        with warnings.catch_warnings(record=True) as caught, np.errstate(divide="ignore"):
            # np.errstate: PRV takes log(1 - q), which is log(0) for q = 1; Opacus handles the -inf correctly.
            warnings.simplefilter("always")
            epsilon = float(engine.get_epsilon(delta=delta))
    except Exception as exc:
        raise RuntimeError(f"Opacus {accountant} accountant failed for history {engine.history}: {exc}") from exc
    for warning in caught:
        # RDP warns when the best order sits at the edge of its grid: the bound is valid but looser than it could be.
        logger.info("Opacus %s accountant: %s", accountant, warning.message)
    if math.isnan(epsilon) or epsilon < 0:
        raise RuntimeError(f"Opacus {accountant} accountant returned epsilon={epsilon} for {engine.history}")
    return epsilon


def noise_multiplier_for(
    target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str = "rdp"
) -> float:
    """The smallest noise multiplier (to Opacus's search tolerance) whose ``steps`` subsampled Gaussian steps at
    ``sample_rate`` cost at most ``target_epsilon`` at ``delta``: Opacus's own calibration,
    ``opacus.accountants.utils.get_noise_multiplier``, then checked with ``epsilon_for`` (the function every ledger
    uses) so that a calibrated job never reports more than its target.

    Args:
        target_epsilon: the epsilon the whole run (all ``steps``) may spend; > 0.
        delta: the target delta.
        sample_rate: Poisson sampling rate per step, in (0, 1].
        steps: number of steps the run will take; >= 1.
        accountant: ``"rdp"`` or ``"prv"``.

    Raises:
        ValueError: a bad argument, or a target so small that no noise multiplier Opacus searches reaches it.
        RuntimeError: the calibrated noise multiplier does not meet the target by the accountant (never expected).
    """
    if isinstance(target_epsilon, bool) or not isinstance(target_epsilon, numbers.Real):
        raise ValueError(f"target_epsilon must be a finite number > 0, got {target_epsilon!r}")
    if not 0 < target_epsilon < math.inf:  # NaN fails this too
        raise ValueError(f"target_epsilon must be a finite number > 0, got {target_epsilon!r}")
    delta = _check_delta(delta)
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {accountant!r}")
    mechanism = validate_mechanism((1.0, sample_rate, steps))  # checks the rate and the step count
    try:
        with warnings.catch_warnings(), np.errstate(divide="ignore"):
            warnings.simplefilter("ignore")  # RDP's "optimal order is the largest alpha" notes, as in epsilon_for
            sigma = float(
                get_noise_multiplier(
                    target_epsilon=float(target_epsilon),
                    target_delta=delta,
                    sample_rate=mechanism.sample_rate,
                    steps=mechanism.steps,
                    accountant=accountant,
                )
            )
    except ValueError as exc:  # Opacus: "The privacy budget is too low." past its largest sigma
        raise ValueError(
            f"no noise multiplier reaches target_epsilon={target_epsilon} at delta={delta} for {steps} steps at "
            f"sample rate {mechanism.sample_rate:.4g} ({accountant}): {exc}"
        ) from exc
    achieved = epsilon_for([(sigma, mechanism.sample_rate, mechanism.steps)], delta, accountant)
    if not achieved <= target_epsilon:
        raise RuntimeError(
            f"calibrated noise_multiplier={sigma} gives epsilon={achieved} > target {target_epsilon} ({accountant})"
        )
    return sigma


@dataclass(frozen=True)
class Cost:
    """Epsilon before and after one more mechanism is composed onto a history."""

    epsilon_before: float
    epsilon_after: float

    @property
    def increment(self) -> float:
        """Epsilon the extra mechanism adds (composition is not additive in epsilon, so this depends on the past)."""
        return self.epsilon_after - self.epsilon_before


def cost_of(history: Iterable[Iterable], mechanism: Iterable, delta: float, accountant: str = "rdp") -> Cost:
    """What adding ``mechanism`` to ``history`` would cost, computed before anything is released."""
    past = list(history)
    return Cost(
        epsilon_before=epsilon_for(past, delta, accountant),
        epsilon_after=epsilon_for([*past, mechanism], delta, accountant),
    )


def would_exceed(
    history: Iterable[Iterable], mechanism: Iterable, budget_epsilon: float, delta: float, accountant: str = "rdp"
) -> bool:
    """True when composing ``mechanism`` onto ``history`` would push epsilon above ``budget_epsilon``."""
    return not cost_of(history, mechanism, delta, accountant).epsilon_after <= budget_epsilon


def rounds_affordable(
    noise_multiplier: float,
    budget_epsilon: float,
    delta: float,
    history: Iterable[Iterable] = (),
    accountant: str = "rdp",
    max_rounds: int = 100_000,
) -> int:
    """How many more site-level rounds at ``noise_multiplier`` fit in ``budget_epsilon`` after ``history``.

    Useful to plan a job before it starts (for instance, refuse a 50-round job when 12 rounds are left). Epsilon grows
    with the number of rounds, so a doubling then bisection search over the accountant finds the answer.

    Returns:
        A number of rounds in ``[0, max_rounds]``.
    """
    if isinstance(budget_epsilon, bool) or not isinstance(budget_epsilon, numbers.Real) or not budget_epsilon > 0:
        raise ValueError(f"budget_epsilon must be a number > 0, got {budget_epsilon!r}")
    if isinstance(max_rounds, bool) or not isinstance(max_rounds, numbers.Integral) or max_rounds < 1:
        raise ValueError(f"max_rounds must be an integer >= 1, got {max_rounds!r}")
    past = list(history)

    def fits(rounds: int) -> bool:
        return (
            epsilon_for([*past, site_update_mechanism(noise_multiplier, rounds)], delta, accountant) <= budget_epsilon
        )

    if not fits(1):
        return 0
    low, high = 1, 2
    while high <= max_rounds and fits(high):
        low, high = high, high * 2
    if high > max_rounds:
        if fits(max_rounds):
            return max_rounds
        high = max_rounds
    while high - low > 1:  # invariant: fits(low) and not fits(high)
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low
