"""The benchmark's statistics against values worked out by hand or printed in standard t tables."""

import math

import pytest

from benchmarks.stats import (
    Interval,
    mean_interval,
    paired_differences,
    paired_interval,
    sd_upper_bound,
    seeds_for_half_width,
    t_quantile,
    verdict,
)


def test_t_quantiles_match_the_printed_table():
    # Two-sided 95 %: 12.706 (1 df), 4.303 (2 df), 2.776 (4 df), 2.262 (9 df).
    assert [round(t_quantile(n), 3) for n in (2, 3, 5, 10)] == [12.706, 4.303, 2.776, 2.262]
    with pytest.raises(ValueError, match="at least 2 values"):
        t_quantile(1)


def test_mean_interval_of_known_values():
    # 1, 2, 3: mean 2, sd 1, half-width 4.3027 / sqrt(3) = 2.48414.
    interval = mean_interval([1.0, 2.0, 3.0])
    assert interval.mean == 2.0 and interval.sd == pytest.approx(1.0) and interval.n == 3
    assert (interval.low, interval.high) == pytest.approx((2 - 2.48414, 2 + 2.48414), abs=1e-4)
    assert interval.half_width == pytest.approx(2.48414, abs=1e-4)


def test_missing_runs_are_left_out_and_one_run_has_no_interval():
    interval = mean_interval([0.5, None, math.nan])
    assert interval.n == 1 and interval.mean == 0.5 and math.isnan(interval.low) and math.isnan(interval.sd)
    assert mean_interval([]).n == 0 and math.isnan(mean_interval([]).mean)


def test_paired_difference_uses_only_seeds_both_ran():
    a = {"0": 0.80, "1": 0.70, "2": 0.75, "3": None}
    b = {"0": 0.78, "1": 0.66, "2": math.nan, "4": 0.5}
    assert paired_differences(a, b) == pytest.approx({"0": 0.02, "1": 0.04})
    interval = paired_interval(a, b)
    # differences 0.02 and 0.04: mean 0.03, sd 0.014142, half-width 12.706 * 0.014142 / sqrt(2) = 0.12706.
    assert interval.mean == pytest.approx(0.03) and interval.half_width == pytest.approx(0.12706, abs=1e-5)


def test_pairing_removes_what_seeds_share():
    # Seed effects of +-0.1 shared by both methods; the difference is always 0.01, so its interval has no width.
    a = {"0": 0.61, "1": 0.81, "2": 0.71}
    b = {"0": 0.60, "1": 0.80, "2": 0.70}
    assert paired_interval(a, b).half_width == pytest.approx(0.0, abs=1e-12)
    assert mean_interval(a.values()).half_width > 0.2


def test_verdicts():
    assert verdict(Interval(0.03, 0.01, 0.05, 3, 0.01), 0.0)[0] == "met"
    status, sentence = verdict(Interval(-0.05, -0.07, -0.03, 3, 0.01), -0.01)
    assert status == "missed" and sentence.startswith("missed by 0.0400")
    assert verdict(Interval(0.0, -0.02, 0.02, 3, 0.01), 0.0) == (
        "not resolved",
        "not resolved (interval straddles +0.00)",
    )
    assert verdict(mean_interval([0.2]), 0.0)[0] == "not resolved"
    assert verdict(mean_interval([]), 0.0)[0] == "no data"


def test_seeds_for_a_target_half_width():
    # sd 0.05, target 0.01: normal approximation (1.96 * 5)^2 = 96.04; the t quantile at 98 values (1.9845)
    # gives 0.010023 > 0.01, at 99 values (1.9845 * 0.05 / 9.95) 0.009972: 99 seeds.
    assert seeds_for_half_width(0.05, 0.01) == 99
    assert seeds_for_half_width(0.0, 0.01) == 2
    n = seeds_for_half_width(0.02, 0.01)
    assert t_quantile(n) * 0.02 / math.sqrt(n) <= 0.01 < t_quantile(n - 1) * 0.02 / math.sqrt(n - 1)
    with pytest.raises(ValueError, match="target"):
        seeds_for_half_width(0.05, 0.0)


def test_upper_bound_of_a_standard_deviation():
    # 2 values (1 df): chi2 5 % quantile 0.0039321, so the bound is sd * sqrt(1 / 0.0039321) = 15.947 sd.
    assert sd_upper_bound(1.0, 2) == pytest.approx(15.947, abs=1e-3)
    # 10 values (9 df): chi2 5 % quantile 3.3251, bound sqrt(9 / 3.3251) = 1.6452.
    assert sd_upper_bound(0.05, 10) == pytest.approx(0.05 * 1.6452, abs=1e-4)
