"""How many seeds and validation cases the benchmark needs for FedBN minus pooled to be known to +-0.01 (issue 25,
item 7), computed from the run's own per-seed spread.

The model: each seed's difference d = (model effect of that seed) + (validation-case noise), with variance
``sd_model^2 + sd_case^2 / V`` for V validation cases per site. One run measures only their sum at its own V, so
the answer for more cases is a range: at best (all the spread is case noise) the variance falls as V grows, at worst
(all of it is the models' seed-to-seed difference) more cases change nothing and only seeds help.
"""

from __future__ import annotations

import math
from typing import Any

from benchmarks.stats import sd_upper_bound, seeds_for_half_width
from benchmarks.summary import POOLED

TARGET = 0.01
CASE_FACTORS = (1, 2, 4, 8)


def power_analysis(stats: dict[str, Any], val_cases: int, seconds_per_seed: float, target: float = TARGET) -> dict:
    """The half-width reached and, per validation-case factor, the seeds needed (best and worst case) and their
    cost in hours at this run's wall time per seed (evaluation grows with V; training does not).

    Returns ``{"available": False, "why": ...}`` when the run has fewer than 2 seeds of FedBN and pooled.
    """
    diff = stats.get("fedbn_minus", {}).get(POOLED, {}).get("mean")
    if not diff or diff["n"] < 2 or not math.isfinite(diff["sd"]):
        return {"available": False, "why": "needs FedBN and pooled on at least 2 seeds"}
    sd, n = diff["sd"], diff["n"]
    rows = []
    for factor in CASE_FACTORS:
        best_sd = sd / math.sqrt(factor)
        rows.append({
            "val_cases": val_cases * factor,
            "seeds_if_case_noise": seeds_for_half_width(best_sd, target),
            "seeds_if_model_noise": seeds_for_half_width(sd, target),
        })  # fmt: skip
    worst = sd_upper_bound(sd, n)
    return {
        "available": True,
        "target": target,
        "seeds": n,
        "val_cases": val_cases,
        "sd": sd,
        "sd_upper_95": worst,
        "half_width": (diff["high"] - diff["low"]) / 2,
        "seconds_per_seed": seconds_per_seed,
        "seeds_at_sd_upper": seeds_for_half_width(worst, target),
        "rows": rows,
    }


def power_markdown(power: dict[str, Any]) -> list[str]:
    """The report's section on item 7."""
    lines = ["### Can this benchmark resolve 0.01? (FedBN - pooled)", ""]
    if not power.get("available"):
        return lines + [f"Not computed: {power.get('why', 'no data')}.", ""]
    hours = power["seconds_per_seed"] / 3600
    lines += [
        f"Measured: the per-seed difference FedBN - pooled (mean over sites) has a standard deviation of "
        f"**{power['sd']:.4f}** over {power['seeds']} seeds with {power['val_cases']} validation cases per site; "
        f"the 95% interval of its mean is **+-{power['half_width']:.4f}** (target +-{power['target']:.2f}). "
        f"With {power['seeds']} seeds that spread is itself uncertain: its 95% upper bound is "
        f"{power['sd_upper_95']:.4f}, which would need {power['seeds_at_sd_upper']} seeds.",
        "",
        f"Seeds needed for +-{power['target']:.2f} (one seed = every method of this run once, {hours:.2f} h here): "
        "more validation cases help only as far as the spread is validation-case noise, so each row gives both ends.",
        "",
        "| validation cases per site | seeds if the spread is all case noise | seeds if it is all model noise | "
        "hours (best - worst) |",
        "| ---: | ---: | ---: | ---: |",
    ]
    for row in power["rows"]:
        best, worst = row["seeds_if_case_noise"], row["seeds_if_model_noise"]
        lines.append(f"| {row['val_cases']} | {best} | {worst} | {best * hours:.1f} - {worst * hours:.1f} |")
    lines += [
        "",
        "Hours use this run's wall time per seed; more validation cases add evaluation time, not training time, so "
        "they are a lower bound for the rows below the first. Which end holds is measured by running "
        "`--val-cases` at two values with the same seeds.",
        "",
    ]
    return lines
