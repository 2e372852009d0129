"""Repeats of one configuration with other seeds, read together: the goal's 0.02 against the run-to-run spread.

Why: on the synthetic sites one FedBN configuration ends anywhere between 0.65 and 0.77 Dice depending on the
seed, several times the goal's margin. A verdict drawn from one row per configuration (or from the best of several)
says more about the seed than about DP-SGD. Here rows that differ only in ``seed`` form a group, and two groups are
compared by the difference of their means with a one-sided Welch t bound, so the report can say "confirmed",
"refuted" or "not settled by these seeds" instead of a reading the spread cannot carry.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from statistics import fmean, stdev
from typing import Any

from scipy import stats

CONFIDENCE = 0.95  # one-sided: the loss is bounded above (confirmed) or below (refuted) at this level


@dataclass(frozen=True)
class SeedGroup:
    """Rows of one job with the same knobs but ``seed``; ``values`` holds one figure per row (seed order)."""

    key: str  # the job and its knobs other than seed: what makes two rows repeats of each other
    name: str
    job: str
    seeds: tuple[int, ...]
    values: tuple[float, ...]
    epsilon: float | None  # the largest of the rows' (None: non-private)
    unit: str | None

    @property
    def mean(self) -> float:
        return fmean(self.values)

    @property
    def sd(self) -> float:
        return stdev(self.values)


@dataclass(frozen=True)
class GroupComparison:
    """How much ``private`` loses against ``reference`` on average, with a one-sided bound each way."""

    private: SeedGroup
    reference: SeedGroup
    loss: float  # reference mean minus private mean
    standard_error: float
    upper: float  # the loss is below this at CONFIDENCE
    lower: float  # the loss is above this at CONFIDENCE

    def reading(self, margin: float) -> str:
        if self.upper <= margin:
            return "confirmed"
        if self.lower > margin:
            return "refuted"
        return "not settled by these seeds"


def _base_name(name: str) -> str:
    return re.sub(r"_seed\d+$", "", name)


def seed_groups(
    rows: Sequence[dict[str, Any]], default_seed: int, figure: Callable[[dict[str, Any]], float | None]
) -> list[SeedGroup]:
    """Group rows by job and knobs other than ``seed`` (a row without one ran with ``default_seed``); keep groups
    with at least two seeds whose ``figure`` is finite. A seed run twice counts once (its first row)."""
    by_key: dict[str, dict[int, tuple[float, dict[str, Any]]]] = {}
    for row in rows:
        value = figure(row)
        if row.get("job") in (None, "-") or value is None or not math.isfinite(value):
            continue
        overrides = row.get("overrides", {})
        key = repr((row["job"], sorted((k, v) for k, v in overrides.items() if k != "seed")))
        by_key.setdefault(key, {}).setdefault(int(overrides.get("seed", default_seed)), (value, row))
    groups = []
    for key, by_seed in by_key.items():
        if len(by_seed) < 2:
            continue
        seeds = sorted(by_seed)
        first = by_seed[seeds[0]][1]
        epsilons = [by_seed[s][1]["epsilon"] for s in seeds]
        groups.append(
            SeedGroup(
                key=key,
                name=_base_name(first["name"]),
                job=first["job"],
                seeds=tuple(seeds),
                values=tuple(by_seed[s][0] for s in seeds),
                epsilon=None if any(e is None for e in epsilons) else max(epsilons),
                unit=first.get("unit"),
            )
        )
    return groups


def compare(private: SeedGroup, reference: SeedGroup, confidence: float = CONFIDENCE) -> GroupComparison:
    """Welch's unequal-variance t bounds (scipy's) on the difference of the two means. Welch, not a paired test:
    the same seed starts another network and samples other batches in another job, so seeds pair nothing."""
    loss = reference.mean - private.mean
    se = math.sqrt(reference.sd**2 / len(reference.values) + private.sd**2 / len(private.values))
    if se == 0.0:  # every seed gave the same figure in both groups: the difference is exact
        return GroupComparison(private, reference, loss, 0.0, loss, loss)

    # The two one-sided bounds at `confidence` are the ends of one two-sided interval at 2 * confidence - 1.
    test = stats.ttest_ind(reference.values, private.values, equal_var=False)
    interval = test.confidence_interval(2 * confidence - 1)
    return GroupComparison(private, reference, loss, se, float(interval.high), float(interval.low))


def group_verdict(
    rows: Sequence[dict[str, Any]],
    default_seed: int,
    figures: dict[str, Callable[[dict[str, Any]], float | None]],
    goal_epsilon: float = 8.0,
    goal_loss: float = 0.02,
) -> list[str]:
    """For each figure (e.g. final Dice, mean of the last rounds): every repeated patient-level DP group within the
    goal's epsilon against the repeated non-private group with the highest mean on that figure."""
    lines = []
    for label, figure in figures.items():
        groups = seed_groups(rows, default_seed, figure)
        references = [g for g in groups if g.epsilon is None]
        if not references:
            continue
        reference = max(references, key=lambda g: g.mean)
        for group in groups:
            if group.epsilon is None or group.unit != "patient" or group.epsilon > goal_epsilon:
                continue
            c = compare(group, reference)
            lines.append(
                f"{group.name} over seeds {_seeds(group)} vs {reference.name} over seeds {_seeds(reference)}, "
                f"{label}: mean {group.mean:.4f} vs {reference.mean:.4f}, loss {c.loss:+.4f} (standard error "
                f"{c.standard_error:.4f}; {CONFIDENCE:.0%} one-sided bounds {c.lower:+.4f} to {c.upper:+.4f}): "
                f"loss <= {goal_loss:g} {c.reading(goal_loss)}"
            )
    return lines


def _seeds(group: SeedGroup) -> str:
    return ",".join(str(s) for s in group.seeds)


def group_table(rows: Sequence[dict[str, Any]], default_seed: int, figures: dict[str, Callable]) -> list[str]:
    """Markdown lines: one per repeated configuration, mean and standard deviation over its seeds of each figure."""
    columns = {label: {g.key: g for g in seed_groups(rows, default_seed, f)} for label, f in figures.items()}
    keys = list(dict.fromkeys(key for groups in columns.values() for key in groups))
    if not keys:
        return []
    lines = [
        "| configuration | seeds | " + " | ".join(f"{label} (mean ± sd)" for label in figures) + " |",
        "| --- | --- | " + " | ".join("---:" for _ in figures) + " |",
    ]
    for key in keys:
        cells = [f"{g.mean:.4f} ± {g.sd:.4f}" if (g := columns[label].get(key)) else "-" for label in figures]
        any_figure = next(columns[label][key] for label in figures if key in columns[label])
        lines.append(f"| {any_figure.name} | {_seeds(any_figure)} | " + " | ".join(cells) + " |")
    return lines
