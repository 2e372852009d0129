"""The few statistics the benchmark reports: a mean with its Student-t interval over seeds, the paired difference of
two methods run with the same seeds, a goal's verdict read from an interval, and the seeds a target width needs.

Why Student's t over seeds: each seed is one independent run of the whole pipeline (data draw, initial model,
training order), so seeds are the replicates; with 3 to 10 of them the normal quantile would understate the width.
Why paired: methods run with the same seed share the data and the initial model, so the difference per seed removes
what they share; its interval is never wider than one from two unpaired means when the runs are correlated.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from scipy.stats import chi2
from scipy.stats import t as student_t

CONFIDENCE = 0.95


@dataclass(frozen=True)
class Interval:
    """A mean over runs and its two-sided confidence interval (``low``/``high`` NaN below 2 runs).

    Attributes:
        mean: the mean of the finite values.
        low, high: the interval's ends.
        n: how many finite values went in.
        sd: their sample standard deviation (NaN below 2).
    """

    mean: float
    low: float
    high: float
    n: int
    sd: float

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    def as_dict(self) -> dict[str, float | int]:
        return {"mean": self.mean, "low": self.low, "high": self.high, "n": self.n, "sd": self.sd}


def t_quantile(n: int, confidence: float = CONFIDENCE) -> float:
    """The two-sided Student-t quantile for ``n`` values (``n - 1`` degrees of freedom).

    Raises:
        ValueError: ``n`` below 2 or ``confidence`` outside (0, 1).
    """
    if n < 2:
        raise ValueError(f"a t interval needs at least 2 values, got {n}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    return float(student_t.ppf(0.5 + confidence / 2, n - 1))


def mean_interval(values: Iterable[float | None], confidence: float = CONFIDENCE) -> Interval:
    """Mean and t interval of the finite ``values`` (None and NaN are runs that produced no figure: left out)."""
    xs = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    n = len(xs)
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, 0, math.nan)
    mean = math.fsum(xs) / n
    if n < 2:
        return Interval(mean, math.nan, math.nan, 1, math.nan)
    sd = math.sqrt(math.fsum((x - mean) ** 2 for x in xs) / (n - 1))
    half = t_quantile(n, confidence) * sd / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n, sd)


def paired_differences(a: Mapping[str, float | None], b: Mapping[str, float | None]) -> dict[str, float]:
    """``a - b`` for every seed both have a finite figure for (seed keys as in results.json)."""
    out = {}
    for seed in a.keys() & b.keys():
        x, y = a[seed], b[seed]
        if x is not None and y is not None and math.isfinite(x) and math.isfinite(y):
            out[seed] = float(x) - float(y)
    return dict(sorted(out.items()))


def paired_interval(a: Mapping[str, float | None], b: Mapping[str, float | None]) -> Interval:
    """The interval of the mean paired difference ``a - b`` over the seeds both ran."""
    return mean_interval(paired_differences(a, b).values())


def verdict(interval: Interval, threshold: float) -> tuple[str, str]:
    """Whether ``interval`` shows its mean is at least ``threshold``: ``(status, sentence)``.

    ``met`` when the whole interval is at or above the threshold, ``missed`` when it is wholly below (the sentence
    says by how much the mean falls short), ``not resolved`` when it straddles the threshold or there is no interval
    (one seed), ``no data`` when nothing was measured.
    """
    if interval.n == 0 or not math.isfinite(interval.mean):
        return "no data", "no data (the method did not run or failed)"
    if interval.n < 2:
        return "not resolved", f"not resolved (one seed: {interval.mean:+.4f}, no interval)"
    if interval.low >= threshold:
        return "met", f"met (interval lies at or above {threshold:+.2f})"
    if interval.high < threshold:
        return "missed", f"missed by {threshold - interval.mean:.4f} (interval lies below {threshold:+.2f})"
    return "not resolved", f"not resolved (interval straddles {threshold:+.2f})"


def seeds_for_half_width(sd: float, target: float, confidence: float = CONFIDENCE, limit: int = 100_000) -> int:
    """The fewest seeds whose t interval of a mean with this ``sd`` has a half-width at most ``target``.

    Raises:
        ValueError: ``sd`` not finite or negative, or ``target`` not positive.
    """
    if not math.isfinite(sd) or sd < 0:
        raise ValueError(f"sd must be finite and >= 0, got {sd}")
    if target <= 0:
        raise ValueError(f"target half-width must be > 0, got {target}")
    # The t quantile shrinks as n grows, so start from the normal approximation and walk up from there.
    z = float(student_t.ppf(0.5 + confidence / 2, 10**9))
    n = max(2, math.floor((z * sd / target) ** 2))
    while n < limit and t_quantile(n, confidence) * sd / math.sqrt(n) > target:
        n += 1
    return n


def sd_upper_bound(sd: float, n: int, confidence: float = CONFIDENCE) -> float:
    """The one-sided upper confidence bound of a standard deviation estimated from ``n`` values (chi-square): a
    spread measured on few seeds may be much larger, and a seed count planned from it should say so.

    Raises:
        ValueError: ``n`` below 2.
    """
    if n < 2:
        raise ValueError(f"a standard deviation needs at least 2 values, got {n}")
    return sd * math.sqrt((n - 1) / float(chi2.ppf(1 - confidence, n - 1)))
