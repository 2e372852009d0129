"""The toy behind ``keep_optimizer_state``: Adam's first step and the fresh-versus-kept prediction."""

from __future__ import annotations

import pytest

from benchmarks.adam_kept_state import round_displacement


def test_a_fresh_adams_first_step_is_one_learning_rate_on_every_coordinate() -> None:
    # Bias correction makes step one m/sqrt(v) = g/|g|: the fact the knob's argument rests on.
    one_step = round_displacement(steps=1, warm_rounds=0, signal=0.0, coords=10_000)
    mean_square = one_step.spread**2 + one_step.mean**2  # every |step| is 1, so its mean square is 1 exactly
    assert mean_square == pytest.approx(1.0, abs=1e-6)


def test_a_kept_adam_moves_less_through_noise_for_the_same_signal() -> None:
    fresh = round_displacement(steps=20, warm_rounds=0, signal=0.05, coords=50_000)
    kept = round_displacement(steps=20, warm_rounds=5, signal=0.05, coords=50_000)
    assert kept.mean == pytest.approx(fresh.mean, rel=0.15)  # the signal moves both about equally
    assert kept.spread < 0.75 * fresh.spread  # 3.4 against 5.2 in units of the learning rate
    assert kept.signal_to_noise > 1.3 * fresh.signal_to_noise
