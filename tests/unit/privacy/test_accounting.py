"""Accounting wraps Opacus faithfully, and the site-level epsilon it reports is a sound bound."""

from __future__ import annotations

import ast
import math
from pathlib import Path

import numpy as np
import pytest
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.utils import get_noise_multiplier
from scipy.stats import norm

from fedseg3d.privacy import accounting
from fedseg3d.privacy.accounting import (
    compress_history,
    cost_of,
    epsilon_for,
    noise_multiplier_for,
    patient_dpsgd_mechanism,
    rounds_affordable,
    site_update_mechanism,
    would_exceed,
)

DELTA = 1e-5


def _opacus(history, accountant="rdp"):
    engine = RDPAccountant() if accountant == "rdp" else PRVAccountant()
    engine.history = list(history)
    with np.errstate(divide="ignore"):
        return engine.get_epsilon(delta=DELTA)


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_epsilon_equals_opacus_for_mixed_history(accountant):
    history = [(1.0, 1.0, 5), (1.1, 0.02, 300)]
    assert epsilon_for(history, DELTA, accountant) == pytest.approx(_opacus(history, accountant), rel=1e-9)


def test_site_level_round_is_gaussian_mechanism_with_rate_one():
    assert site_update_mechanism(1.3, rounds=7) == (1.3, 1.0, 7)
    assert epsilon_for([site_update_mechanism(1.3)] * 7, DELTA) == pytest.approx(_opacus([(1.3, 1.0, 7)]), rel=1e-12)


def test_patient_dpsgd_sample_rate_is_batch_over_cases():
    assert patient_dpsgd_mechanism(1.1, batch_size=2, n_cases=40, steps=100) == (1.1, 0.05, 100)
    with pytest.raises(ValueError, match="must not exceed"):
        patient_dpsgd_mechanism(1.1, batch_size=50, n_cases=40, steps=1)


@pytest.mark.parametrize("sigma, rounds", [(0.5, 5), (1.0, 20), (2.0, 5)])
def test_site_level_epsilon_is_a_sound_and_tight_bound(sigma, rounds):
    # Independent check, not used by the code: T rounds of the Gaussian mechanism with sample rate 1 are exactly a
    # Gaussian mechanism with mu = sqrt(T) / sigma, whose delta(eps) is known in closed form (Balle and Wang 2018).
    mu = math.sqrt(rounds) / sigma

    def exact_delta(eps):
        return norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * norm.cdf(-eps / mu - mu / 2)

    history = [site_update_mechanism(sigma, rounds)]
    eps_prv, eps_rdp = epsilon_for(history, DELTA, "prv"), epsilon_for(history, DELTA, "rdp")
    assert exact_delta(eps_prv) <= DELTA and exact_delta(eps_rdp) <= DELTA  # both are valid upper bounds
    assert eps_prv <= eps_rdp
    assert exact_delta(eps_prv - 0.1) > DELTA  # PRV is within 0.1 of the exact epsilon


def test_history_order_and_splitting_do_not_change_epsilon():
    split = [(1.0, 1.0, 1)] * 6 + [(2.0, 1.0, 3), (1.0, 1.0, 4)]
    assert compress_history(split) == [(1.0, 1.0, 10), (2.0, 1.0, 3)]
    assert epsilon_for(split, DELTA) == pytest.approx(epsilon_for([(2.0, 1.0, 3), (1.0, 1.0, 10)], DELTA))


def test_empty_history_costs_nothing_and_zero_noise_is_infinite():
    assert epsilon_for([], DELTA) == 0.0
    assert epsilon_for([(0.0, 1.0, 1)], DELTA) == math.inf
    assert epsilon_for([(0.0, 1.0, 1)], DELTA, "prv") == math.inf


@pytest.mark.parametrize(
    "entry",
    [(-1.0, 1.0, 1), (math.nan, 1.0, 1), (math.inf, 1.0, 1), (1.0, 0.0, 1), (1.0, 1.5, 1), (1.0, 1.0, 0),
     (1.0, 1.0, 1.5), (True, 1.0, 1), (1.0, 1.0), "abc"],
)  # fmt: skip
def test_bad_history_entries_raise(entry):
    with pytest.raises(ValueError):
        epsilon_for([entry], DELTA)


@pytest.mark.parametrize("delta", [0, 1, -1e-5, math.nan])
def test_bad_delta_raises(delta):
    with pytest.raises(ValueError, match="delta"):
        epsilon_for([(1.0, 1.0, 1)], delta)


def test_unknown_accountant_raises():
    with pytest.raises(ValueError, match="accountant"):
        epsilon_for([(1.0, 1.0, 1)], DELTA, "gdp")


def test_cost_of_one_more_round_is_known_before_spending():
    past = [site_update_mechanism(1.0, 4)]
    cost = cost_of(past, site_update_mechanism(1.0), DELTA)
    assert cost.epsilon_before == pytest.approx(_opacus([(1.0, 1.0, 4)]))
    assert cost.epsilon_after == pytest.approx(_opacus([(1.0, 1.0, 5)]))
    assert cost.increment > 0
    assert would_exceed(past, site_update_mechanism(1.0), cost.epsilon_after - 1e-6, DELTA)
    assert not would_exceed(past, site_update_mechanism(1.0), cost.epsilon_after + 1e-6, DELTA)


@pytest.mark.parametrize("sigma", [1.0, 2.0, 5.0])
def test_rounds_affordable_is_the_last_round_that_fits(sigma):
    n = rounds_affordable(sigma, budget_epsilon=8.0, delta=DELTA)
    assert n >= 1
    assert (
        epsilon_for([site_update_mechanism(sigma, n)], DELTA)
        <= 8.0
        < epsilon_for([site_update_mechanism(sigma, n + 1)], DELTA)
    )
    past = [site_update_mechanism(sigma, n)]
    assert rounds_affordable(sigma, 8.0, DELTA, history=past) == 0


@pytest.mark.parametrize(
    ("accountant", "target", "rate", "steps"),
    [("rdp", 8.0, 16 / 104, 70), ("rdp", 4.0, 0.25, 40), ("rdp", 1.0, 0.01, 1000), ("prv", 8.0, 1.0, 5)],
)
def test_calibrated_noise_is_opacus_own_and_meets_the_target_by_the_accountant(accountant, target, rate, steps):
    sigma = noise_multiplier_for(target, DELTA, rate, steps, accountant)
    assert sigma == get_noise_multiplier(
        target_epsilon=target, target_delta=DELTA, sample_rate=rate, steps=steps, accountant=accountant
    )
    achieved = epsilon_for([(sigma, rate, steps)], DELTA, accountant)
    assert achieved <= target
    assert achieved > target - 0.05, "Opacus's search stops within its tolerance: not needlessly noisy"
    # Less noise would overspend: the calibration is the smallest sigma (to the search's precision).
    assert epsilon_for([(sigma * 0.97, rate, steps)], DELTA, accountant) > target


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"target_epsilon": 0.0}, "target_epsilon"),
        ({"target_epsilon": -1.0}, "target_epsilon"),
        ({"target_epsilon": math.nan}, "target_epsilon"),
        ({"target_epsilon": math.inf}, "target_epsilon"),
        ({"target_epsilon": True}, "target_epsilon"),
        ({"delta": 0.0}, "delta"),
        ({"sample_rate": 1.5}, "sample_rate"),
        ({"steps": 0}, "steps"),
        ({"accountant": "gdp"}, "accountant"),
        ({"target_epsilon": 1e-9, "sample_rate": 1.0}, "no noise multiplier reaches target_epsilon"),
    ],
)
def test_calibration_refuses_bad_arguments_naming_them(kwargs, match):
    arguments = {"target_epsilon": 8.0, "delta": DELTA, "sample_rate": 0.1, "steps": 100, "accountant": "rdp"}
    with pytest.raises(ValueError, match=match):
        noise_multiplier_for(**(arguments | kwargs))


def test_privacy_package_does_not_import_nvflare():
    package = Path(accounting.__file__).parent
    for source in package.glob("*.py"):
        for node in ast.walk(ast.parse(source.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            assert not any(name.split(".")[0] == "nvflare" for name in names), f"{source} imports nvflare"
