"""Turn the raw measurements into the figures the report states: per-site Dice tables, goals, cost rows.

Definitions (also in docs/benchmark.md):
- global: the final model of a method at each site. Federated: the final global model (FedBN: with the
  evaluating site's own batch norm, FedBN's protocol). Pooled: the pooled model. Local-only: has no global model.
- own: each site's own final model at that site (local-only: trained alone; federated: the site's last local model).
- on all sites (local-only): the mean over every (model, evaluating site) pair -- what a model trained at one
  hospital scores at a hospital picked at random.
"""

from __future__ import annotations

import math
from typing import Any

LOCAL_ONLY, POOLED = "local_only", "pooled"


def nanmean(values) -> float:
    finite = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return sum(finite) / len(finite) if finite else math.nan


def method_summary(name: str, raw: dict[str, Any], sites: list[str]) -> dict[str, Any]:
    """Per-site and mean Dice of one method from its ``matrix`` (evaluating site -> model owner -> Dice).

    ``score`` is the model the method hands each site and the goals compare: local-only, the site's own model;
    pooled, the pooled model; federated, the final global model (FedBN: with the site's own batch norm).
    ``class_score`` is the same model's Dice per foreground class (a class no validation case holds is absent).
    """
    matrix, classes = raw["matrix"], raw.get("class_matrix") or {}
    if name == LOCAL_ONLY:
        own = {s: matrix[s][s] for s in sites}
        all_pairs = [matrix[e][o] for e in sites for o in sites]
        other = {s: nanmean(matrix[s][o] for o in sites if o != s) for s in sites}
        return {"global": None, "own": own, "others_models": other, "all_sites_mean": nanmean(all_pairs),
                "global_mean": math.nan, "own_mean": nanmean(own.values()), "score": own,
                "class_score": {s: classes.get(s, {}).get(s, {}) for s in sites}}  # fmt: skip
    if name == POOLED:
        glob = {s: matrix[s][POOLED] for s in sites}
        return {"global": glob, "own": None, "global_mean": nanmean(glob.values()), "own_mean": math.nan,
                "score": glob, "class_score": {s: classes.get(s, {}).get(POOLED, {}) for s in sites}}  # fmt: skip
    glob = {s: matrix[s].get("global", math.nan) for s in sites}
    own = {s: matrix[s].get(s, math.nan) for s in sites}
    return {"global": glob, "own": own, "global_mean": nanmean(glob.values()), "own_mean": nanmean(own.values()),
            "score": glob, "class_score": {s: classes.get(s, {}).get("global", {}) for s in sites}}  # fmt: skip


def mean_curve(per_round: dict) -> dict[int, float]:
    """Rounds -> mean Dice over sites (JSON turns int keys into strings; accept both)."""
    return {int(r): nanmean(scores.values()) for r, scores in sorted(per_round.items(), key=lambda kv: int(kv[0]))}


def overhead_goal(overhead_median: float | None) -> dict[str, Any]:
    """The POC cost goal (issue 6): federation overhead at most 1.10 (one run: a measurement, not an interval)."""
    if overhead_median is None or math.isnan(overhead_median):
        return {"goal": "federation overhead <= 1.10", "measured": "POC not run", "met": None}
    return {"goal": "federation overhead <= 1.10", "measured": f"median {overhead_median:.2f}",
            "met": bool(overhead_median <= 1.10)}  # fmt: skip


def throughput_rows(rounds: list[dict], sites: list[str]) -> list[dict[str, float | str]]:
    """Per site: pure training seconds, cases/s, patches/s and voxels/s summed over all rounds of a run."""
    out = []
    for site in sites:
        mine = [r for r in rounds if r["site"] == site and "train_seconds" in r]
        seconds = sum(r["train_seconds"] for r in mine)
        if not mine or seconds <= 0:
            continue
        out.append({"site": site, "rounds": len(mine), "train_seconds": seconds,
                    "cases_per_s": sum(r["train_cases"] for r in mine) / seconds,
                    "patches_per_s": sum(r["train_patches"] for r in mine) / seconds,
                    "voxels_per_s": sum(r["train_voxels"] for r in mine) / seconds})  # fmt: skip
    return out


def throughput_from_totals(name: str, totals: dict[str, float], rounds: int) -> dict[str, float | str]:
    """The same row as ``throughput_rows`` from a directly trained model's totals (local-only site or pooled)."""
    seconds = max(totals["train_seconds"], 1e-9)
    return {"site": name, "rounds": rounds, "train_seconds": totals["train_seconds"],
            "cases_per_s": totals["train_cases"] / seconds, "patches_per_s": totals["train_patches"] / seconds,
            "voxels_per_s": totals["train_voxels"] / seconds}  # fmt: skip


def bytes_summary(bytes_per_round: dict[str, dict]) -> dict[str, float]:
    """Mean bytes per round per direction, and the run's total over both directions."""
    out: dict[str, float] = {}
    total = 0
    for direction, per_round in bytes_per_round.items():
        values = [int(v) for v in per_round.values()]
        if values:
            out[f"{direction}_per_round"] = sum(values) / len(values)
            if direction in ("site_to_server", "server_to_site"):
                total += sum(values)
    out["total"] = total
    return out
