"""One report from several benchmark runs of the same settings on different seeds or different methods.

Why: seeds and methods are independent, so a benchmark can be split across processes or machines (``--seeds 0``,
``--seeds 1``, ... or ``--methods fedavg``) and its intervals, paired differences, goals and power read from all of
them together, exactly as if one run had done everything. Runs whose settings differ in anything but the seeds and
methods are refused, and so is a method that two runs ran with the same seed.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from benchmarks.aggregate import aggregate, goal_checks
from benchmarks.config import ALL_METHODS
from benchmarks.power import power_analysis
from benchmarks.summary import nanmean
from benchmarks.tasks import odd_modality_site

# Settings that may differ between the runs merged: which seeds and methods each ran.
PER_RUN_KEYS = ("seed", "seeds", "methods")


def _settings(results: dict) -> dict[str, Any]:
    return {k: v for k, v in results["config"].items() if k not in PER_RUN_KEYS}


def merge_results(runs: dict[str, dict], command: str) -> dict:
    """``results.json`` content for the union of ``runs`` (folder name -> its ``results.json``).

    The per-method detail tables (seed-level matrices, bytes, throughput) come from the runs holding the lowest seed;
    the wall time is the longest run's (they ran side by side), and every run's seed phases are kept.

    Raises:
        ValueError: no runs, settings that differ beyond the seeds and methods, or a method and seed in two runs.
    """
    if not runs:
        raise ValueError("nothing to merge: give at least one report folder")
    names = list(runs)
    reference = _settings(runs[names[0]])
    for name in names[1:]:
        differ = sorted(
            k for k in {*reference, *_settings(runs[name])} if reference.get(k) != _settings(runs[name]).get(k)
        )
        if differ:
            raise ValueError(f"{name}/results.json: settings {differ} differ from {names[0]}/results.json")
    per_seed: dict[str, dict] = {}
    for name in names:
        for seed, entry in runs[name]["per_seed"].items():
            held = per_seed.setdefault(seed, {"summary": {}, "wall_seconds": {}, "per_round": {}})
            twice = sorted(set(held["summary"]) & set(entry["summary"]))
            if twice:
                raise ValueError(f"{name}/results.json: seed {seed} of {twice} is also in another run")
            for key in held:
                held[key].update(entry.get(key, {}))
    seeds = sorted(int(s) for s in per_seed)
    per_seed = {str(s): per_seed[str(s)] for s in seeds}
    first = next(runs[n] for n in names if str(seeds[0]) in runs[n]["per_seed"])
    ran = {m for entry in per_seed.values() for m in entry["summary"]}
    methods = [m for m in ALL_METHODS if m in ran]
    cfg = {**first["config"], "seed": seeds[0], "seeds": seeds, "methods": methods}
    sites = cfg["site_names"]
    stats = aggregate(per_seed, sites, methods)
    val_cases = cfg["val_cases_per_site"]
    loads = [r["meta"]["load_1min"] for r in runs.values()]
    meta = {
        **first["meta"],
        "command": command + " (merging: " + "; ".join(r["meta"]["command"] for r in runs.values()) + ")",
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "wall_seconds": max(r["meta"]["wall_seconds"] for r in runs.values()),
        "phases": [p for r in runs.values() for p in r["meta"]["phases"]],
        "load_1min": {
            "min": min(x["min"] for x in loads),
            "mean": sum(x["mean"] * x["samples"] for x in loads) / sum(x["samples"] for x in loads),
            "max": max(x["max"] for x in loads),
            "samples": sum(x["samples"] for x in loads),
        },
        "merged_from": names,
    }
    # A method one run could not do for a seed that another run did is not "not run".
    done = {f"{m} (seed {seed})" for seed, entry in per_seed.items() for m in entry["summary"]}
    not_run = {k: v for r in runs.values() for k, v in r["not_run"].items() if k not in done}
    # Detail tables of the lowest seed: every method's, whichever run holds it.
    detail = {m: raw for n in names if str(seeds[0]) in runs[n]["per_seed"] for m, raw in runs[n]["methods"].items()}
    summary = {m: v for n in names if str(seeds[0]) in runs[n]["per_seed"] for m, v in runs[n]["summary"].items()}
    return {
        **first,
        "meta": meta,
        "config": cfg,
        "methods": {m: detail[m] for m in methods if m in detail},
        "summary": {m: summary[m] for m in methods if m in summary},
        "per_seed": per_seed,
        "stats": stats,
        "goals": goal_checks(stats, sites, odd_modality_site(cfg["modalities"])),
        "power": power_analysis(
            stats, min(val_cases.values()), nanmean(sum(r["wall_seconds"].values()) for r in per_seed.values())
        ),
        "not_run": not_run,
    }


def merge(folders: list[Path], out_dir: Path, command: str) -> dict:
    """Read each folder's ``results.json``, merge them and write ``out_dir/results.json``."""
    runs = {str(f): json.loads((Path(f) / "results.json").read_text()) for f in folders}
    merged = merge_results(runs, command)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(merged, indent=1, default=str) + "\n")
    return merged
