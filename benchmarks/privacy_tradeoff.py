"""Privacy/utility trade-off: Dice, epsilon and membership-attack AUC of the private and non-private jobs.

Every configuration runs for real in the FLARE simulator on the same synthetic sites, with the same seed and the
same training budget (rounds, and patches per round: ``local_steps`` batches of 2 patches in FedBN, ``local_steps``
DP-SGD steps of 2 expected patients in DP-SGD). For each it reports:

* Dice: the mean over sites of the final global model's validation Dice, from the job's cross-site evaluation as
  ``fedseg3d.tools.report`` computes it (in FedBN each site scores it with its own batch norm);
* epsilon: the largest cumulative epsilon any site declared (``fedseg3d/privacy.jsonl``) at delta = 1e-5, with the
  protected unit: ``site_update`` (one site's whole update per round) or ``patient`` (one patient, DP-SGD);
* attack AUC: the loss-threshold membership attack (``fedseg3d.tools.privacy_audit``) against the final global
  model as each site uses it, averaged over sites.

Each configuration gets a fresh privacy ledger with a budget no run reaches (so no round is refused and epsilon is
this job's alone). Results go to ``docs/privacy_benchmark.md`` and ``.json`` (``--quick``: a smoke run of a few
minutes that writes under the workspace instead, so it never overwrites the committed figures).

Usage:
    python benchmarks/privacy_tradeoff.py [--quick] [--workspace workspace/bench-privacy] [--out-dir docs]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "custom"), str(REPO)]  # run from a checkout without an editable install too

from benchmarks.machine import machine_info  # noqa: E402
from fedseg3d.data.site_config import SITES_ROOT_ENV  # noqa: E402
from fedseg3d.data.synthetic import generate_sites  # noqa: E402
from fedseg3d.privacy.site_budget import PRIVACY_DIR_ENV, write_site_budget  # noqa: E402
from fedseg3d.tools.build_jobs import build_jobs  # noqa: E402
from fedseg3d.tools.privacy_audit import find_epsilons, run_audit  # noqa: E402
from fedseg3d.tools.report import find_cross_site_results, site_rows  # noqa: E402
from fedseg3d.tools.simulate import simulator_command  # noqa: E402

DELTA = 1e-5
UNREACHABLE_BUDGET = 1e6  # the benchmark measures epsilon; it must not stop a run
SITES = ["site-1", "site-2"]


@dataclass(frozen=True)
class Config:
    """One benchmark row: a job and the top-level variables it is run with."""

    name: str
    job: str
    overrides: dict[str, Any] = field(default_factory=dict)
    note: str = ""


@dataclass(frozen=True)
class Budget:
    """What every configuration gets: data, rounds and local work."""

    rounds: int
    local_steps: int
    cases_scale: float
    fov_mm: float
    seed: int = 0


FULL = Budget(rounds=10, local_steps=10, cases_scale=2.0, fov_mm=64.0)
QUICK = Budget(rounds=2, local_steps=2, cases_scale=1.0, fov_mm=48.0)


def configurations(quick: bool) -> list[Config]:
    """The rows: non-private FedBN, FedBN with site-level DP at a few noise levels, and patient-level DP-SGD."""
    reference = Config("fedbn", "unet3d_fedbn", note="non-private reference")
    site_dp = [
        Config(f"fedbn_dp_sigma{s:g}", "unet3d_fedbn_dp", {"noise_multiplier": s}, "site-level DP, clip 1.0")
        for s in ((1.0,) if quick else (1.0, 2.0, 4.0))
    ]
    dpsgd = [
        Config(f"dpsgd_sigma{s:g}", "unet3d_dpsgd", {"noise_multiplier": s}, "patient-level DP-SGD, clip 1.0")
        for s in ((1.0,) if quick else (1.2, 2.0))
    ]
    # DP-SGD needs instance norm and plain FedAvg: its fair non-private reference is that network without DP.
    instancenorm = Config(
        "fedavg_instancenorm",
        "unet3d_fedavg",
        {"model_preset": "unet3d_tiny_instancenorm"},
        "non-private reference for DP-SGD (same network)",
    )
    return [reference, *site_dp, *([] if quick else [instancenorm]), *dpsgd]


def job_overrides(config: Config, budget: Budget) -> dict[str, Any]:
    """The shared budget plus the configuration's own knobs (DP-SGD counts ``local_steps`` in DP-SGD steps)."""
    shared = {"num_rounds": budget.rounds, "sites_per_round": len(SITES), "seed": budget.seed}
    shared["local_steps"] = budget.local_steps
    return {**shared, **config.overrides}


def run_config(config: Config, budget: Budget, sites_root: Path, workspace: Path, timeout: float) -> dict[str, Any]:
    """Build, simulate, report and audit one configuration; returns its row (raises if the simulator failed)."""
    root = workspace / config.name
    if root.exists():
        shutil.rmtree(root)
    (job_dir,) = build_jobs(REPO / "jobs", root / "jobs", [config.job], job_overrides(config, budget), len(SITES))
    privacy_dir = root / "privacy"
    for site in SITES:
        write_site_budget(privacy_dir / site, UNREACHABLE_BUDGET, DELTA)
    env = dict(os.environ, **{SITES_ROOT_ENV: str(sites_root.resolve()), PRIVACY_DIR_ENV: str(privacy_dir.resolve())})
    run_dir = root / "sim"
    log = root / "simulator.log"
    load_before = os.getloadavg()
    started = time.perf_counter()
    with log.open("w") as stream:
        code = subprocess.run(
            simulator_command(job_dir.resolve(), run_dir.resolve(), SITES, len(SITES)),
            env=env,
            stdout=stream,
            stderr=subprocess.STDOUT,
            timeout=timeout,
            check=False,
        ).returncode
    sim_seconds = time.perf_counter() - started
    if code != 0:
        raise RuntimeError(f"{config.name}: simulator exited with {code}; see {log}")
    dice_rows = site_rows(json.loads(find_cross_site_results(run_dir).read_text()))
    started = time.perf_counter()
    audit = [row for row in run_audit(run_dir, sites_root, SITES, resamples=1000) if row["model"] == "global"]
    audit_seconds = time.perf_counter() - started
    epsilons = find_epsilons(run_dir)
    worst = max(epsilons.values(), key=lambda e: e["epsilon"]) if epsilons else None
    return {
        "name": config.name,
        "job": config.job,
        "overrides": config.overrides,
        "note": config.note,
        "mean_dice": _mean([float(r["global_final"]) for r in dice_rows]),
        "site_dice": {r["site"]: float(r["global_final"]) for r in dice_rows},
        "epsilon": worst["epsilon"] if worst else None,
        "delta": worst["delta"] if worst else None,
        "unit": worst["unit"] if worst else None,
        "site_epsilon": {site: e["epsilon"] for site, e in epsilons.items()},
        "attack_auc": _mean([r["auc"] for r in audit]),
        "site_audit": {
            r["site"]: {k: r[k] for k in ("auc", "auc_low", "auc_high", "n_members", "n_nonmembers")} for r in audit
        },
        "simulator_seconds": round(sim_seconds, 1),
        "audit_seconds": round(audit_seconds, 1),
        "load_average_1min": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
    }


def _mean(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else math.nan


def verdict(rows: list[dict[str, Any]], goal_epsilon: float = 8.0, goal_loss: float = 0.02) -> list[str]:
    """Read the results against the goal (patient-level epsilon <= 8 loses at most 0.02 Dice vs FedBN)."""
    reference = next((r for r in rows if r["name"] == "fedbn"), None)
    if reference is None:
        return ["no non-private FedBN row: nothing to compare against"]
    lines = []
    for row in rows:
        if row["epsilon"] is None:
            continue
        loss = reference["mean_dice"] - row["mean_dice"]
        head = f"{row['name']}: Dice {-loss:+.4f} vs FedBN at {row['unit']} epsilon {row['epsilon']:.3g}"
        if row["unit"] != "patient":
            lines.append(f"{head}: a site-level epsilon, not comparable with the goal's patient-level one")
        elif row["epsilon"] > goal_epsilon:
            lines.append(f"{head}: epsilon above {goal_epsilon:g}, outside the goal")
        else:
            lines.append(f"{head}: {'meets' if loss <= goal_loss else 'misses'} the goal")
    return lines


def markdown(result: dict[str, Any]) -> str:
    """The report: command, machine, date, budget, the table and the verdict."""
    m, b = result["machine"], result["budget"]
    lines = [
        "# Privacy/utility benchmark",
        "",
        f"Generated by `{result['command']}` on {result['date']} ({result['total_seconds'] / 60:.1f} min).",
        f"Machine: {m['cpu_cores']} CPU cores ({m['cpu']}), GPU: {m['gpu']}; torch {m['torch']}, Python {m['python']}.",
        "The CPU was shared with other work: see the load average (1 min, before and after each run).",
        "",
        f"Budget per configuration: {len(SITES)} synthetic sites (seed {b['seed']}, `cases_scale` {b['cases_scale']}, "
        f"{b['fov_mm']:g} mm volumes), {b['rounds']} rounds, {b['local_steps']} local steps per round (FedBN/FedAvg: "
        "batches of 2 patches; DP-SGD: steps of 2 expected patients), the same seed everywhere. Cases per site "
        f"(members/non-members): {result['cases']}.",
        "",
        "Dice: mean over sites of the final global model's validation Dice (cross-site evaluation, as "
        "`fedseg3d.tools.report`). Epsilon: the largest cumulative epsilon any site declared, at delta = 1e-5, "
        "for the unit named (site = one site's whole update per round; patient = one patient). AUC: "
        "loss-threshold membership attack on the final global model as each site uses it, mean over sites "
        "(0.5 = no better than chance; per-site 95% bootstrap intervals in the JSON).",
        "",
        "| configuration | job | Dice | Dice vs FedBN | epsilon | unit | attack AUC | sim s | load before/after |",
        "| --- | --- | ---: | ---: | ---: | --- | ---: | ---: | --- |",
    ]
    reference = next((r["mean_dice"] for r in result["rows"] if r["name"] == "fedbn"), math.nan)
    for r in result["rows"]:
        eps = "-" if r["epsilon"] is None else f"{r['epsilon']:.3g}"
        lines.append(
            f"| {r['name']} | {r['job']} | {r['mean_dice']:.4f} | {r['mean_dice'] - reference:+.4f} | {eps} "
            f"| {r['unit'] or '-'} | {r['attack_auc']:.3f} | {r['simulator_seconds']:.0f} "
            f"| {r['load_average_1min'][0]:.2f} / {r['load_average_1min'][1]:.2f} |"
        )
    lines += ["", "Against the goal (patient-level epsilon <= 8 at delta 1e-5 loses at most 0.02 Dice vs FedBN):", ""]
    lines += [f"- {line}" for line in result["verdict"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 rounds, 3 configurations, smaller data")
    parser.add_argument("--workspace", type=Path, default=REPO / "workspace" / "bench-privacy")
    parser.add_argument("--out-dir", type=Path, default=None, help="default: docs/ (full) or the workspace (quick)")
    parser.add_argument("--only", default=None, help="comma-separated configuration names to run (default: all)")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per simulator run")
    args = parser.parse_args(argv)
    budget = QUICK if args.quick else FULL
    out_dir = args.out_dir or (args.workspace if args.quick else REPO / "docs")
    configs = configurations(args.quick)
    if args.only:
        wanted = args.only.split(",")
        unknown = sorted(set(wanted) - {c.name for c in configs})
        if unknown:
            parser.error(f"--only: unknown configuration(s) {unknown}; known: {[c.name for c in configs]}")
        configs = [c for c in configs if c.name in wanted]

    started = time.perf_counter()
    sites_root = args.workspace / "data"
    generate_sites(
        sites_root, len(SITES), seed=budget.seed, fov_mm=budget.fov_mm, cases_scale=budget.cases_scale, dicom_sites=()
    )
    cases = {}
    for site in SITES:
        datalist = json.loads((sites_root / site / "datalist.json").read_text())
        cases[site] = f"{len(datalist['training'])}/{len(datalist['validation'])}"
    rows = []
    for config in configs:
        print(f"[{time.perf_counter() - started:6.0f} s] {config.name}: {config.job} {config.overrides}", flush=True)
        row = run_config(config, budget, sites_root, args.workspace, args.timeout)
        eps = "-" if row["epsilon"] is None else f"{row['epsilon']:.3g} ({row['unit']})"
        print(f"    Dice {row['mean_dice']:.4f}  epsilon {eps}  attack AUC {row['attack_auc']:.3f}", flush=True)
        rows.append(row)
    command = "python benchmarks/privacy_tradeoff.py" + (" --quick" if args.quick else "")
    if args.only:
        command += f" --only {args.only}"
    result = {
        "command": command,
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine_info(),
        "budget": asdict(budget),
        "cases": cases,
        "rows": rows,
        "verdict": verdict(rows),
        "total_seconds": round(time.perf_counter() - started, 1),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "privacy_benchmark.json").write_text(json.dumps(result, indent=2) + "\n")
    report = markdown(result)
    (out_dir / "privacy_benchmark.md").write_text(report)
    print(report)
    print(f"wrote {out_dir / 'privacy_benchmark.md'} and .json")


if __name__ == "__main__":
    main()
