"""Repeated seeds in the privacy benchmark: which rows form a group, and the bound on the difference of means."""

from __future__ import annotations

import math

import pytest
from scipy import stats

from benchmarks.privacy_seed_groups import compare, group_table, group_verdict, seed_groups
from benchmarks.privacy_tradeoff_report import SEED_FIGURES, verdict

DICE = {"final Dice": lambda r: r["mean_dice"]}


def row(name: str, job: str, dice: float, seed: int | None = None, epsilon: float | None = None, **knobs) -> dict:
    overrides = knobs | ({} if seed is None else {"seed": seed})
    unit = None if epsilon is None else "patient"
    return {"name": name, "job": job, "overrides": overrides, "mean_dice": dice, "epsilon": epsilon, "unit": unit}


def test_rows_differing_only_in_seed_form_one_group_and_others_stay_apart():
    rows = [
        row("fedbn_1pass", "fedbn", 0.77, local_epochs=1),  # seed 0: the budget's
        row("fedbn_1pass_seed1", "fedbn", 0.74, 1, local_epochs=1),
        row("fedbn_1pass_again", "fedbn", 0.10, 1, local_epochs=1),  # seed 1 again: the first one counts
        row("fedbn_1pass_seed2", "fedbn", math.nan, 2, local_epochs=1),  # a failed run is no figure
        row("fedbn_shallow", "fedbn", 0.70, local_epochs=1, model_preset="shallow"),  # another network, one seed
        row("dp_seed1", "dpsgd", 0.69, 1, 8.0),
        row("dp_seed2", "dpsgd", 0.70, 2, 7.0),
    ]
    groups = {g.name: g for g in seed_groups(rows, 0, DICE["final Dice"])}
    assert set(groups) == {"fedbn_1pass", "dp"}
    assert groups["fedbn_1pass"].seeds == (0, 1) and groups["fedbn_1pass"].values == (0.77, 0.74)
    assert groups["fedbn_1pass"].epsilon is None
    assert groups["dp"].epsilon == 8.0 and groups["dp"].unit == "patient"
    # Another default seed makes the seed-less row seed 1, a repeat of the row that names seed 1.
    assert [g.seeds for g in seed_groups(rows, 1, DICE["final Dice"]) if g.name == "fedbn_1pass"] == []


def group(job: str, values: list[float], epsilon: float | None = None):
    """One seed group of ``job`` with one row per value, seeds 0, 1, ..."""
    rows = [row(f"{job}_seed{s}", job, d, s, epsilon) for s, d in enumerate(values)]
    [only] = seed_groups(rows, 0, DICE["final Dice"])
    return only


def test_bounds_are_welchs_and_decide_only_what_the_spread_allows():
    reference, noisy_dp = group("fedbn", [0.77, 0.742, 0.649]), group("dp", [0.688, 0.679, 0.703], 8.0)
    c = compare(noisy_dp, reference)
    # Welch by hand: the same numbers (t quantile at the Welch-Satterthwaite degrees of freedom).
    va, vb = reference.sd**2 / 3, noisy_dp.sd**2 / 3
    dof = (va + vb) ** 2 / (va**2 / 2 + vb**2 / 2)
    half = stats.t.ppf(0.95, dof) * math.sqrt(va + vb)
    assert c.loss == pytest.approx(reference.mean - noisy_dp.mean)
    assert c.standard_error == pytest.approx(math.sqrt(va + vb))
    assert (c.lower, c.upper) == pytest.approx((c.loss - half, c.loss + half))
    assert c.reading(0.02) == "not settled by these seeds"

    tight_ref = group("fedbn", [0.700, 0.701, 0.699, 0.700])
    assert compare(group("dp", [0.690, 0.691, 0.689, 0.690], 8.0), tight_ref).reading(0.02) == "confirmed"
    assert compare(group("dp", [0.650, 0.651, 0.649, 0.650], 8.0), tight_ref).reading(0.02) == "refuted"
    exact = compare(group("dp", [0.6, 0.6], 8.0), group("fedbn", [0.61, 0.61]))
    assert exact.standard_error == 0.0 and exact.upper == exact.lower == pytest.approx(0.01)


def test_verdict_compares_repeated_private_groups_within_the_goal_with_the_best_repeated_reference():
    rows = [row("fedbn", "fedbn", 0.60)]  # the single-row verdict's reference
    rows += [row(f"fedbn_1pass_seed{s}", "fedbn", d, s, local_epochs=1) for s, d in enumerate([0.700, 0.701, 0.699])]
    rows += [row(f"fedbn_bad_seed{s}", "fedbn", d, s, local_epochs=9) for s, d in enumerate([0.5, 0.51])]
    rows += [row(f"dp_seed{s}", "dpsgd", d, s, 8.0) for s, d in enumerate([0.690, 0.691, 0.689])]
    rows += [row(f"loose_seed{s}", "dpsgd", d, s, 20.0) for s, d in enumerate([0.70, 0.70])]  # epsilon above 8
    lines = group_verdict(rows, 0, DICE)
    assert len(lines) == 1
    assert lines[0].startswith("dp over seeds 0,1,2 vs fedbn_1pass over seeds 0,1,2, final Dice: mean 0.6900 vs")
    assert lines[0].endswith("loss <= 0.02 confirmed")
    # The report's verdict carries these lines after the single-row ones; without repeats it has none.
    assert verdict(rows)[-1] == lines[0]
    assert not any(" over seeds " in line for line in verdict(rows[:1] + rows[-5:-2]))


def test_table_lists_each_repeated_configuration_once_with_mean_and_sd_of_each_figure():
    curve = {str(i): v for i, v in enumerate([0.1, 0.5, 0.6, 0.7])}
    rows = [row(f"dp_seed{s}", "dpsgd", d, s, 8.0) | {"per_round_dice": curve} for s, d in enumerate([0.6, 0.8])]
    rows.append(row("single", "fedbn", 0.9))
    lines = group_table(rows, 0, SEED_FIGURES)
    assert lines[0] == "| configuration | seeds | final Dice (mean ± sd) | last 3 mean (mean ± sd) |"
    assert lines[2:] == ["| dp | 0,1 | 0.7000 ± 0.1414 | 0.6000 ± 0.0000 |"]
    assert group_table(rows[-1:], 0, SEED_FIGURES) == []
