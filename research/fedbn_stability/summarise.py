"""Tables for the README from measure.py's JSON: collapses, best versus final per site, statistic gaps.

Example:
    python research/fedbn_stability/summarise.py research/fedbn_stability/reports/*.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

COLLAPSE = 0.5  # a site-round collapses when its Dice falls below this fraction of that site's best earlier round


def collapses(records: list[dict], track: str) -> list[str]:
    """Site-rounds (round >= 2) whose ``track`` Dice fell below COLLAPSE x the site's best earlier value."""
    best: dict[str, float] = {}
    found = []
    for r in records:
        earlier = best.get(r["site"], 0.0)
        if r["round"] >= 2 and r[track] < COLLAPSE * earlier:
            found.append(f"{r['site']} r{r['round']} {r[track]:.3f} (best {earlier:.3f})")
        best[r["site"]] = max(earlier, r[track])
    return found


def summarise(path: Path) -> str:
    data = json.loads(path.read_text())
    runs = data["runs"]
    lines = [f"## {path.name} ({data['seconds'] / 60:.1f} min, recalibrate {data['args']['recalibrate']})", ""]
    for track in ("own", "global_site"):
        found = [f"seed {run['seed']}: {c}" for run in runs for c in collapses(run["records"], track)]
        total = sum(1 for run in runs for r in run["records"] if r["round"] >= 2)
        by_site = {site: sum(f" {site} " in f" {c} " for c in found) for site in sorted(runs[0]["final"])}
        lines.append(f"- collapsed site-rounds, {track}: {len(found)} of {total}, by site {by_site}: {found}")
    sites = sorted(runs[0]["final"])
    lines += [
        "",
        "| site | seed | own final | global final | server best global | best_local_model.pt | "
        "best_global_model.pt | best_model.pt |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    cols = ["own_final", "global_final", "server_best_global", "best_local_model.pt", "best_global_model.pt",
            "best_model.pt"]  # fmt: skip
    for site in sites:
        for run in runs:
            row = run["final"][site]
            lines.append(
                f"| {site} | {run['seed']} | " + " | ".join(f"{row.get(c, float('nan')):.3f}" for c in cols) + " |"
            )
    for site in sites:
        finals = [max(run["final"][site]["own_final"], run["final"][site]["global_final"]) for run in runs]
        noise = float(np.std(finals, ddof=1)) if len(finals) > 1 else float("nan")
        for best in ("server_best_global", "best_local_model.pt", "best_model.pt"):
            gaps = [run["final"][site].get(best, float("nan")) - f for run, f in zip(runs, finals, strict=True)]
            lines.append(f"- {site}: {best} minus the better final model, per seed: "
                         f"{[round(g, 3) for g in gaps]}; run-to-run SD of that final: {noise:.3f}")  # fmt: skip
    diag = [r for run in runs for r in run["records"] if "gap_running_vs_recal" in r]
    if diag:
        for key in ("gap_running_vs_recal", "gap_recal_vs_val"):
            z = np.mean([r[key]["z_mean"] for r in diag])
            lv = np.mean([r[key]["logvar_mean"] for r in diag])
            lvmax = np.max([r[key]["logvar_max"] for r in diag])
            lines.append(f"- {key}: mean |dmean|/sd {z:.3f}, mean |log var ratio| {lv:.3f}, worst layer {lvmax:.2f}")
        for a, b in [
            pair
            for pair in (
                ("own", "own_batchstats"),
                ("own", "own_recal"),
                ("own_recal", "own_recal_jitter"),
                ("own_recal", "own_recal_windows"),
                ("global_site", "global_recal"),
            )
            if all(pair[1] in r for r in diag)
        ]:
            diff = np.array([r[b] - r[a] for r in diag])
            lines.append(
                f"- {b} minus {a}: mean {diff.mean():+.3f}, max {diff.max():+.3f} over {len(diff)} site-rounds"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    print("\n\n".join(summarise(Path(p)) for p in sys.argv[1:]))
