"""Combine the per-seed runs into what the report states: each method's Dice with a 95% interval over seeds (per
site, per class, mean over sites), FedBN's paired difference from every other method, wall time, and the goals.

Input is ``results["per_seed"]``: seed -> ``{"summary": method -> method_summary(...), "wall_seconds": method -> s}``.
"""

from __future__ import annotations

import math
from typing import Any

from benchmarks.stats import Interval, mean_interval, paired_interval, verdict
from benchmarks.summary import LOCAL_ONLY, POOLED, nanmean

FEDBN, FEDAVG, INT3 = "fedbn", "fedavg", "fedbn_int3"


def per_seed_scores(per_seed: dict[str, dict], method: str, site: str | None = None) -> dict[str, float]:
    """seed -> the method's score at ``site`` (None: the mean over sites), for the seeds the method ran."""
    out = {}
    for seed, run in per_seed.items():
        summary = run["summary"].get(method)
        if summary is None:
            continue
        score = summary["score"]
        out[seed] = score.get(site, math.nan) if site is not None else nanmean(score.values())
    return out


def _class_means(per_seed: dict[str, dict], method: str) -> dict[str, dict[str, float]]:
    """class -> seed -> mean over sites of the class's Dice (sites whose validation cases lack the class left out)."""
    out: dict[str, dict[str, float]] = {}
    for seed, run in per_seed.items():
        summary = run["summary"].get(method)
        if summary is None:
            continue
        classes = {c for per_site in summary["class_score"].values() for c in per_site}
        for c in sorted(classes):
            out.setdefault(c, {})[seed] = nanmean(per_site.get(c) for per_site in summary["class_score"].values())
    return out


def aggregate(per_seed: dict[str, dict], sites: list[str], methods: list[str]) -> dict[str, Any]:
    """Intervals over seeds for every method, FedBN's paired differences, wall times (JSON-ready dicts)."""
    ran = [m for m in methods if any(m in run["summary"] for run in per_seed.values())]
    out: dict[str, Any] = {"seeds": sorted(per_seed, key=int), "methods": ran}
    out["mean"] = {m: mean_interval(per_seed_scores(per_seed, m).values()).as_dict() for m in ran}
    out["per_site"] = {
        m: {s: mean_interval(per_seed_scores(per_seed, m, s).values()).as_dict() for s in sites} for m in ran
    }
    out["per_class"] = {
        m: {c: mean_interval(v.values()).as_dict() for c, v in _class_means(per_seed, m).items()} for m in ran
    }
    out["wall_seconds"] = {
        m: mean_interval(run["wall_seconds"].get(m) for run in per_seed.values()).as_dict() for m in ran
    }
    if FEDBN in ran:
        fedbn = {None: per_seed_scores(per_seed, FEDBN), **{s: per_seed_scores(per_seed, FEDBN, s) for s in sites}}
        out["fedbn_minus"] = {
            other: {
                "mean": paired_interval(fedbn[None], per_seed_scores(per_seed, other)).as_dict(),
                "per_site": {
                    s: paired_interval(fedbn[s], per_seed_scores(per_seed, other, s)).as_dict() for s in sites
                },
            }
            for other in ran
            if other != FEDBN
        }
    return out


def _interval(raw: dict[str, Any]) -> Interval:
    return Interval(raw["mean"], raw["low"], raw["high"], raw["n"], raw["sd"])


def goal_checks(stats: dict[str, Any], sites: list[str], odd_site: str | None) -> list[dict[str, Any]]:
    """Issue 25's goals, read from the paired intervals; reported, never asserted.

    Each row: ``goal``, ``difference`` (what is compared), ``threshold``, ``interval`` (dict), ``status`` and
    ``sentence`` (``benchmarks.stats.verdict``).
    """
    diffs = stats.get("fedbn_minus", {})
    rows = []

    def add(goal: str, difference: str, raw: dict[str, Any] | None, threshold: float, note: str = "") -> None:
        interval = _interval(raw) if raw else mean_interval([])
        status, sentence = verdict(interval, threshold)
        if note and status == "no data":
            sentence = note
        rows.append({"goal": goal, "difference": difference, "threshold": threshold, "interval": interval.as_dict(),
                     "status": status, "sentence": sentence})  # fmt: skip

    for site in sites:
        raw = diffs.get(LOCAL_ONLY, {}).get("per_site", {}).get(site)
        add(f"FedBN at {site} >= {site}'s local-only model", f"FedBN - local-only at {site}", raw, 0.0)
    add("FedBN within 0.01 of pooled (mean over sites)", "FedBN - pooled", diffs.get(POOLED, {}).get("mean"), -0.01)
    if odd_site is None:
        add("FedBN >= FedAvg + 0.02 at the site whose modality differs", "FedBN - FedAvg", None, 0.02,
            "not applicable: no single site has a modality the others lack")  # fmt: skip
    else:
        raw = diffs.get(FEDAVG, {}).get("per_site", {}).get(odd_site)
        add(f"FedBN >= FedAvg + 0.02 at {odd_site} (modality differs)", f"FedBN - FedAvg at {odd_site}", raw, 0.02)
    # int3 against float32: the sign flips (int3 - FedBN = -(FedBN - int3)), so the interval is mirrored.
    raw = diffs.get(INT3, {}).get("mean")
    mirrored = None
    if raw:
        mirrored = {**raw, "mean": -raw["mean"], "low": -raw["high"], "high": -raw["low"]}
    add("FedBN-int3 within 0.01 of FedBN float32 (mean over sites)", "FedBN-int3 - FedBN", mirrored, -0.01)
    return rows
