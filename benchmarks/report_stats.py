"""The report's sections over seeds: Dice with 95% intervals per site and per class, FedBN's paired differences,
wall time per method and the goals (from ``results["stats"]`` and ``results["goals"]``)."""

from __future__ import annotations

import math
from typing import Any

from benchmarks.render import label, table


def cell(raw: dict[str, Any] | None, signed: bool = False, spec: str = ".4f") -> str:
    """``mean [low, high]`` (``mean (1 seed)`` without an interval; ``-`` without data)."""
    if not raw or raw.get("n", 0) == 0 or not math.isfinite(raw["mean"]):
        return "-"
    spec = "+" + spec if signed else spec
    if raw["n"] < 2:
        return f"{format(raw['mean'], spec)} (1 seed)"
    return f"{format(raw['mean'], spec)} [{format(raw['low'], spec)}, {format(raw['high'], spec)}]"


def dice_interval_tables(results: dict) -> list[str]:
    stats, sites = results["stats"], results["config"]["site_names"]
    methods = stats["methods"]
    rows = [[s, *(cell(stats["per_site"][m].get(s)) for m in methods)] for s in sites]
    rows.append(["mean over sites", *(cell(stats["mean"][m]) for m in methods)])
    out = [f"### Dice per site, mean [95% interval] over seeds {', '.join(stats['seeds'])}", "",
           "Local-only: each site's own model at that site; pooled: the pooled model; federated: the final global "
           "model (FedBN and FedBN-int3 with the evaluating site's own batch norm).", "",
           table(["site", *map(label, methods)], rows), ""]  # fmt: skip
    classes = sorted({c for m in methods for c in stats["per_class"][m]})
    if classes:
        rows = [[c, *(cell(stats["per_class"][m].get(c)) for m in methods)] for c in classes]
        out += ["### Dice per class (mean over the sites whose validation cases hold the class), over seeds", "",
                table(["class", *map(label, methods)], rows), ""]  # fmt: skip
    return out


def paired_table(results: dict) -> list[str]:
    stats, sites = results["stats"], results["config"]["site_names"]
    diffs = stats.get("fedbn_minus")
    if not diffs:
        return ["### FedBN minus each other method", "", "FedBN did not run: no paired differences.", ""]
    rows = [[label(m), cell(d["mean"], True), *(cell(d["per_site"].get(s), True) for s in sites)]
            for m, d in diffs.items()]  # fmt: skip
    return ["### FedBN minus each other method, paired by seed: mean [95% interval]", "",
            "Each seed's difference is taken between runs with that seed (same data and initial model), then "
            "averaged; positive means FedBN scores higher.", "",
            table(["FedBN minus", "mean over sites", *sites], rows), ""]  # fmt: skip


def wall_table(results: dict) -> list[str]:
    stats = results["stats"]
    per_seed = results["per_seed"]
    rows = []
    for m in stats["methods"]:
        walls = [per_seed[s]["wall_seconds"].get(m) for s in stats["seeds"]]
        runs = ", ".join("-" if w is None else f"{w:.0f}" for w in walls)
        rows.append([label(m), stats["wall_seconds"][m]["mean"], runs])
    total = sum(stats["wall_seconds"][m]["mean"] for m in stats["methods"])
    return ["### Wall time per method and seed (seconds, this machine)", "",
            "Federated: the simulator run (start to finish, cross-site evaluation included); local-only and pooled: "
            "training and scoring in the benchmark process, data preparation included (in both). "
            f"All methods once: {total:.0f} s per seed.", "",
            table(["method", "mean s", "per seed s"], rows, ".0f"), ""]  # fmt: skip


def goals_table(results: dict) -> list[str]:
    rows = [[g["goal"], g["difference"], cell(g["interval"], True), g["sentence"]] for g in results["goals"]]
    cost = results.get("cost_goal")
    lines = ["### Goals (issue 25): reported, never asserted", "",
             "Each goal is read from the 95% interval of the paired difference: met when the whole interval clears "
             "the threshold, missed when it lies wholly short (by how much the mean falls short), not resolved when "
             "it straddles the threshold.", "",
             table(["goal", "difference", "mean [95% interval]", "verdict"], rows), ""]  # fmt: skip
    if cost:
        status = {True: "met", False: "NOT met", None: "not measured"}[cost["met"]]
        lines += [f"Cost goal (issue 6, one POC run): {cost['goal']}: {cost['measured']}, {status}.", ""]
    return lines
