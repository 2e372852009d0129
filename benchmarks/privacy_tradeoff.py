"""Privacy/utility trade-off: Dice, epsilon and membership-attack AUC of the private and non-private jobs.

Every configuration runs for real in the FLARE simulator on the same synthetic sites, with the same seed and the
same training budget (rounds, and patches per round: ``local_steps`` batches of 2 cases (2 patches each) in
FedBN, ``local_steps`` DP-SGD steps of 2 expected patients in DP-SGD). For each it reports:

* Dice: the mean over sites of the final global model's validation Dice, from the job's cross-site evaluation as
  ``fedseg3d.tools.report`` computes it (in FedBN each site scores it with its own batch norm);
* epsilon: the largest cumulative epsilon any site declared (``fedseg3d/privacy.jsonl``) at delta = 1e-5, with the
  protected unit: ``site_update`` (one site's whole update per round) or ``patient`` (one patient, DP-SGD);
* attack AUC: the loss-threshold membership attack (``fedseg3d.tools.privacy_audit``) against the final global
  model as each site uses it, averaged over sites.

Each configuration gets a fresh privacy ledger with a budget no run reaches (so no round is refused and epsilon is
this job's alone), and the server's initial model is seeded (``--seed``, or a row's own ``seed``). Results go to
``docs/privacy_benchmark.md`` and ``.json`` (``--quick``: a smoke run of a few minutes that writes under the
workspace instead, so it never overwrites the committed figures). Each row also records the global model's Dice
before every round, the noise multiplier each site trained with (from its ledger) and the site's sizes.

Options change the data and the budget of every row: ``--cases-scale`` multiplies the patients per site,
``--patients-per-step`` sets DP-SGD's expected batch, ``--rounds`` / ``--local-epochs`` / ``--local-steps`` the
local work, and ``--target-epsilons 8,4`` replaces the fixed-sigma DP-SGD rows by rows whose sites calibrate their
own noise multiplier to that epsilon for the whole job (the job's ``target_epsilon`` knob). ``--row`` adds any job
with any knobs, and ``--merge`` keeps the rows of the earlier report that this run does not redo (each row keeps
its own command). Options other than the defaults make a report that does not compare with the committed one: give
them an ``--out-dir`` of their own.

Usage:
    python benchmarks/privacy_tradeoff.py [--quick] [--workspace workspace/bench-privacy] [--out-dir docs]
    python benchmarks/privacy_tradeoff.py --cases-scale 16 --rounds 10 --local-epochs 5 --patients-per-step 32 \
        --target-epsilons 8 --out-dir workspace/bench-privacy-16x
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "custom"), str(REPO)]  # run from a checkout without an editable install too

from benchmarks.federated import job_variables, parse_run, seed_initial_model  # noqa: E402
from benchmarks.machine import describe as describe_machine  # noqa: E402
from benchmarks.machine import machine_info  # noqa: E402
from benchmarks.privacy_tradeoff_report import markdown, sigma_cell, verdict  # noqa: E402
from benchmarks.report_plots import plot_privacy_rows  # noqa: E402
from fedseg3d.data.site_config import SITES_ROOT_ENV  # noqa: E402
from fedseg3d.data.synthetic import generate_sites  # noqa: E402
from fedseg3d.privacy.accounting import PATIENT  # noqa: E402
from fedseg3d.privacy.ledger import BUDGET_FILE_NAME, PrivacyLedger, load_site_privacy_budget  # noqa: E402
from fedseg3d.privacy.site_budget import PRIVACY_DIR_ENV, write_site_budget  # noqa: E402
from fedseg3d.tools.build_jobs import build_jobs, parse_override  # noqa: E402
from fedseg3d.tools.privacy_audit import find_epsilons, run_audit  # noqa: E402
from fedseg3d.tools.report import FINAL_GLOBAL, find_cross_site_results, site_rows  # noqa: E402
from fedseg3d.tools.simulate import run_process_group, simulator_command  # noqa: E402

DELTA = 1e-5
UNREACHABLE_BUDGET = 1e15  # the benchmark measures epsilon; it must not stop a run (nor a near-noiseless control)
SITES = ["site-1", "site-2"]
REPORT_NAME = "privacy_benchmark"  # the one current report: <out-dir>/privacy_benchmark.{md,json,png}


@dataclass(frozen=True)
class Config:
    """One benchmark row: a job and the top-level variables it is run with."""

    name: str
    job: str
    overrides: dict[str, Any] = field(default_factory=dict)
    note: str = ""


@dataclass(frozen=True)
class Budget:
    """What every configuration gets: data, rounds and local work.

    Attributes:
        local_steps: optimizer steps per round (DP-SGD: DP-SGD steps); 0 means ``local_epochs`` passes instead.
        local_epochs: passes over a site's training cases per round when ``local_steps`` is 0 (DP-SGD: expected
            passes over the patients).
        patients_per_step: DP-SGD's expected batch (Poisson rate = this / the site's patients).
    """

    rounds: int
    local_steps: int
    cases_scale: float
    fov_mm: float
    seed: int = 0
    local_epochs: int = 1
    patients_per_step: int = 2


FULL = Budget(rounds=10, local_steps=10, cases_scale=2.0, fov_mm=64.0)
QUICK = Budget(rounds=2, local_steps=2, cases_scale=1.0, fov_mm=48.0)


def configurations(
    quick: bool, target_epsilons: list[float] | None = None, extra: list[Config] | None = None
) -> list[Config]:
    """The rows: non-private FedBN, FedBN with site-level DP at a few noise levels, and patient-level DP-SGD.

    Args:
        quick: the smoke run's few rows.
        target_epsilons: DP-SGD rows calibrated by each site to these epsilons (``dpsgd_eps<e>``) instead of the
            fixed noise multipliers.
        extra: more rows, appended (``--row``).
    """
    reference = Config("fedbn", "unet3d_fedbn", note="non-private reference")
    site_dp = [
        Config(f"fedbn_dp_sigma{s:g}", "unet3d_fedbn_dp", {"noise_multiplier": s}, "site-level DP, clip 1.0")
        for s in ((1.0,) if quick else (1.0, 2.0, 4.0))
    ]
    if target_epsilons:
        dpsgd = [
            Config(
                f"dpsgd_eps{e:g}", "unet3d_dpsgd", {"target_epsilon": e}, f"patient-level DP-SGD calibrated to {e:g}"
            )
            for e in target_epsilons
        ]
    else:
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
    return [reference, *site_dp, *([] if quick else [instancenorm]), *dpsgd, *(extra or [])]


def parse_row(text: str) -> Config:
    """``NAME:JOB[:knob=value,knob=value]`` (values as in ``build_jobs --set``) as a benchmark row.

    Raises:
        ValueError: the text is not of that form or names no job in ``jobs/``.
    """
    parts = text.split(":", 2)
    if len(parts) < 2 or not parts[0] or not parts[1]:
        raise ValueError(f"row '{text}' must look like NAME:JOB[:knob=value,...]")
    name, job = parts[0], parts[1]
    if not (REPO / "jobs" / job / "meta.json").is_file():
        raise ValueError(f"row '{text}': no job '{job}' in {REPO / 'jobs'}")
    overrides = dict(parse_override(item) for item in parts[2].split(",")) if len(parts) == 3 and parts[2] else {}
    return Config(name, job, overrides, "extra row (--row)")


def job_overrides(config: Config, budget: Budget) -> dict[str, Any]:
    """The shared budget plus the configuration's own knobs (DP-SGD counts ``local_steps`` in DP-SGD steps and
    ``local_epochs`` in expected passes over the patients; ``patients_per_step`` goes to the jobs that have it)."""
    shared = {"num_rounds": budget.rounds, "sites_per_round": len(SITES), "seed": budget.seed}
    shared["local_steps"] = budget.local_steps
    shared["local_epochs"] = budget.local_epochs
    if "patients_per_step" in job_variables(config.job):
        shared["patients_per_step"] = budget.patients_per_step
    return {**shared, **config.overrides}


def run_config(config: Config, budget: Budget, sites_root: Path, workspace: Path, timeout: float) -> dict[str, Any]:
    """Build, simulate, report and audit one configuration; returns its row (raises if the simulator failed)."""
    root = workspace / config.name
    if root.exists():
        shutil.rmtree(root)
    overrides = job_overrides(config, budget)
    (job_dir,) = build_jobs(REPO / "jobs", root / "jobs", [config.job], overrides, len(SITES))
    seed_initial_model(job_dir, int(overrides["seed"]))  # same start for every run of a network, unless re-seeded
    privacy_dir = root / "privacy"
    for site in SITES:
        write_site_budget(privacy_dir / site, UNREACHABLE_BUDGET, DELTA)
    env = dict(os.environ, **{SITES_ROOT_ENV: str(sites_root.resolve()), PRIVACY_DIR_ENV: str(privacy_dir.resolve())})
    run_dir = root / "sim"
    log = root / "simulator.log"
    load_before = os.getloadavg()
    started = time.perf_counter()
    with log.open("w") as stream:
        # Its own process group, killed with every worker on a timeout or a SIGTERM to this script.
        code = run_process_group(
            simulator_command(job_dir.resolve(), run_dir.resolve(), SITES, len(SITES)), env, timeout, stdout=stream
        )
    sim_seconds = time.perf_counter() - started
    if code != 0:
        raise RuntimeError(f"{config.name}: simulator exited with {code}; see {log}")
    started = time.perf_counter()
    audit = [row for row in run_audit(run_dir, sites_root, SITES, resamples=1000) if row["model"] == "global"]
    audit_seconds = time.perf_counter() - started
    return {
        "name": config.name,
        "job": config.job,
        "overrides": config.overrides,
        "note": config.note,
        **read_outcome(config, root),
        "attack_auc": _mean([r["auc"] for r in audit]),
        "site_audit": {
            r["site"]: {k: r[k] for k in ("auc", "auc_low", "auc_high", "n_members", "n_nonmembers")} for r in audit
        },
        "simulator_seconds": round(sim_seconds, 1),
        "audit_seconds": round(audit_seconds, 1),
        "load_average_1min": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        "machine": describe_machine(machine_info()),  # rows kept by --merge keep where they ran
    }


def read_outcome(config: Config, root: Path) -> dict[str, Any]:
    """What the finished run under ``root`` (``<workspace>/<row name>``) measured, from its files alone: final Dice
    (mean, per site, per class), the global Dice before each round, epsilon, each site's DP-SGD parameters from its
    ledger and its training time per round.

    Raises:
        FileNotFoundError: the run did not finish (no cross-site results).
    """
    run_dir, privacy_dir = root / "sim", root / "privacy"
    matrix = json.loads(find_cross_site_results(run_dir).read_text())
    dice_rows = site_rows(matrix)
    site_class_dice = {
        site: {
            k.removeprefix("val_dice_"): float(v) for k, v in scores[FINAL_GLOBAL].items() if k.startswith("val_dice_")
        }
        for site, scores in sorted(matrix.items())
        if FINAL_GLOBAL in scores
    }
    classes = list(dict.fromkeys(name for by_class in site_class_dice.values() for name in by_class))
    epsilons = find_epsilons(run_dir)
    worst = max(epsilons.values(), key=lambda e: e["epsilon"]) if epsilons else None
    parsed = parse_run(config.job, run_dir / "server" / "simulate_job", {})
    return {
        "mean_dice": _mean([float(r["global_final"]) for r in dice_rows]),
        "site_dice": {r["site"]: float(r["global_final"]) for r in dice_rows},
        "class_dice": {c: _mean([d[c] for d in site_class_dice.values() if c in d]) for c in classes},
        "site_class_dice": site_class_dice,
        "per_round_dice": {r: _mean(list(by_site.values())) for r, by_site in sorted(parsed.per_round.items())},
        "epsilon": worst["epsilon"] if worst else None,
        "delta": worst["delta"] if worst else None,
        "unit": worst["unit"] if worst else None,
        "site_epsilon": {site: e["epsilon"] for site, e in epsilons.items()},
        "dp_sgd": dp_sgd_parameters(privacy_dir),
        "site_train_seconds_per_round": {
            site: _mean([r["train_seconds"] for r in parsed.rounds if r["site"] == site and "train_seconds" in r])
            for site in SITES
        },
    }


def dp_sgd_parameters(privacy_dir: Path) -> dict[str, dict[str, Any]]:
    """Per site, what its DP-SGD rounds ran with, from its ledger: noise multiplier, sample rate, patients, expected
    batch, steps in all and the target epsilon it calibrated to (empty for jobs without DP-SGD)."""
    sites = {}
    for site in SITES:
        path = privacy_dir / site / BUDGET_FILE_NAME
        ledger = PrivacyLedger(load_site_privacy_budget(path).ledger_file) if path.is_file() else None
        entries = [e for e in ledger.entries() if e.unit == PATIENT] if ledger else []
        if not entries:
            continue
        last = entries[-1]
        sites[site] = {
            "noise_multipliers": sorted({e.noise_multiplier for e in entries}),
            "sample_rate": last.sample_rate,
            "patients": last.details.get("patients"),
            "patients_per_step": last.details.get("patients_per_step"),
            "max_grad_norm": last.details.get("max_grad_norm"),
            "target_epsilon": last.details.get("target_epsilon"),
            "rounds": len(entries),
            "steps": sum(e.steps for e in entries),
        }
    return sites


def _mean(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else math.nan


def budget_from_args(args: argparse.Namespace) -> Budget:
    """The mode's budget with the command line's changes (``--local-epochs`` alone means ``local_steps`` 0).

    Raises:
        ValueError: a value out of range, naming the option.
    """
    base = QUICK if args.quick else FULL
    changes: dict[str, Any] = {}
    for option, field_name, low in (
        ("rounds", "rounds", 1),
        ("local_epochs", "local_epochs", 1),
        ("local_steps", "local_steps", 0),
        ("patients_per_step", "patients_per_step", 1),
        ("seed", "seed", 0),
    ):
        value = getattr(args, option)
        if value is None:
            continue
        if value < low:
            raise ValueError(f"--{option.replace('_', '-')} must be >= {low}, got {value}")
        changes[field_name] = value
    if args.cases_scale is not None:
        if not args.cases_scale > 0:
            raise ValueError(f"--cases-scale must be > 0, got {args.cases_scale}")
        changes["cases_scale"] = args.cases_scale
    if args.local_epochs is not None and args.local_steps is None:
        changes["local_steps"] = 0
    return replace(base, **changes)


def check_mergeable(earlier: dict[str, Any], budget: Budget, cases: dict) -> None:
    """Refuse to merge with a report whose rows would not compare; called before any run, so that a wrong
    ``--merge`` costs seconds, not the hour of simulator runs after which ``merge_rows`` would refuse it.

    Raises:
        ValueError: the earlier report had another budget or other sites.
    """
    if earlier.get("budget") != asdict(budget) or earlier.get("cases") != cases:
        raise ValueError(
            f"--merge: the earlier report's budget {earlier.get('budget')} / cases {earlier.get('cases')} differ "
            f"from this run's {asdict(budget)} / {cases}; its rows would not compare"
        )


def merge_rows(earlier: dict[str, Any], rows: list[dict[str, Any]], budget: Budget, cases: dict) -> list[dict]:
    """Rows of an earlier report that this run did not redo, in their order, then this run's new rows.

    Raises:
        ValueError: as ``check_mergeable``.
    """
    check_mergeable(earlier, budget, cases)
    new = {r["name"]: r for r in rows}
    merged = [new.pop(r["name"], {"command": earlier["command"], **r}) for r in earlier["rows"]]
    return merged + list(new.values())


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, Budget, list[Config]]:
    """The options, the budget and the rows to run; exits with a message naming the option on a bad value."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 rounds, 3 configurations, smaller data")
    parser.add_argument("--workspace", type=Path, default=REPO / "workspace" / "bench-privacy")
    parser.add_argument("--out-dir", type=Path, default=None, help="default: docs/ (full) or the workspace (quick)")
    parser.add_argument(
        "--only", default=None, help="comma-separated configuration names to run, --row's included (default: all)"
    )
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per simulator run")
    parser.add_argument("--cases-scale", type=float, default=None, help="multiplies each site's patients")
    parser.add_argument("--rounds", type=int, default=None, help="federated rounds of every row")
    parser.add_argument("--local-epochs", type=int, default=None, help="passes per round (sets local steps to 0)")
    parser.add_argument("--local-steps", type=int, default=None, help="steps per round; 0: --local-epochs passes")
    parser.add_argument("--patients-per-step", type=int, default=None, help="DP-SGD's expected batch of patients")
    parser.add_argument("--seed", type=int, default=None, help="data, job and initial-model seed (default 0)")
    parser.add_argument(
        "--target-epsilons", default=None, help="comma-separated epsilons: DP-SGD rows calibrated to each"
    )
    parser.add_argument(
        "--row", action="append", default=[], metavar="NAME:JOB[:knob=value,...]", help="an extra row (repeatable)"
    )
    parser.add_argument("--merge", action="store_true", help="keep the earlier report's rows this run does not redo")
    args = parser.parse_args(argv)
    try:
        budget = budget_from_args(args)
        targets = [float(e) for e in args.target_epsilons.split(",")] if args.target_epsilons else None
        extra = [parse_row(text) for text in args.row]
    except ValueError as err:
        parser.error(str(err))
    configs = configurations(args.quick, targets, extra)
    if len({c.name for c in configs}) != len(configs):
        parser.error(f"two rows share a name: {[c.name for c in configs]}")
    if args.only is not None:
        wanted = [name for name in args.only.split(",") if name]
        unknown = sorted(set(wanted) - {c.name for c in configs})
        if unknown:
            parser.error(f"--only: unknown configuration(s) {unknown}; known: {[c.name for c in configs]}")
        configs = [c for c in configs if c.name in wanted]
    args.out_dir = args.out_dir or (args.workspace if args.quick else REPO / "docs")
    return args, budget, configs


def site_cases(sites_root: Path) -> dict[str, str]:
    """Training/validation cases per site, as the report shows them (members/non-members of the attack)."""
    cases = {}
    for site in SITES:
        datalist = json.loads((sites_root / site / "datalist.json").read_text())
        cases[site] = f"{len(datalist['training'])}/{len(datalist['validation'])}"
    return cases


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args, budget, configs = parse_args(argv)
    json_path, md_path = args.out_dir / f"{REPORT_NAME}.json", args.out_dir / f"{REPORT_NAME}.md"
    earlier = json.loads(json_path.read_text()) if args.merge and json_path.is_file() else None

    started = time.perf_counter()
    sites_root = args.workspace / "data"
    generate_sites(
        sites_root, len(SITES), seed=budget.seed, fov_mm=budget.fov_mm, cases_scale=budget.cases_scale, dicom_sites=()
    )
    cases = site_cases(sites_root)
    print(f"sites (training/validation cases): {cases}; budget {asdict(budget)}", flush=True)
    if earlier is not None:
        try:
            check_mergeable(earlier, budget, cases)
        except ValueError as err:
            print(f"error: {err}", file=sys.stderr)
            raise SystemExit(2) from None
    command = shlex.join(["python", "benchmarks/privacy_tradeoff.py", *argv])
    rows = []
    for config in configs:
        print(f"[{time.perf_counter() - started:6.0f} s] {config.name}: {config.job} {config.overrides}", flush=True)
        row = {"command": command, **run_config(config, budget, sites_root, args.workspace, args.timeout)}
        eps = "-" if row["epsilon"] is None else f"{row['epsilon']:.3g} ({row['unit']})"
        print(
            f"    Dice {row['mean_dice']:.4f}  epsilon {eps}  sigma {sigma_cell(row)}  attack AUC "
            f"{row['attack_auc']:.3f}  sim {row['simulator_seconds']:.0f} s  per round "
            f"{[round(v, 3) for v in row['per_round_dice'].values()]}",
            flush=True,
        )
        rows.append(row)
    if earlier is not None:
        rows = merge_rows(earlier, rows, budget, cases)
    result = {
        "title": "Privacy/utility benchmark",
        "command": command,
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine_info(),
        "budget": asdict(budget),
        "cases": cases,
        "rows": rows,
        "verdict": verdict(rows),
        "total_seconds": round(time.perf_counter() - started, 1),
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    plot_privacy_rows(rows, json_path.with_suffix(".png"))
    report = markdown(result)
    md_path.write_text(report)
    print(report)
    print(f"wrote {md_path}, .json and .png")


if __name__ == "__main__":
    main()
