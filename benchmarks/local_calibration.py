"""Dice and calibration error before and after local calibration, at each real site, after a short FedBN federation.

Trains the stock FedBN job on the real-data task (``fedseg3d data real --out data/real``: 3 sites, one CT NIfTI, one
CT DICOM series, one MR; five classes) in the FLARE simulator, then runs ``fedseg3d calibrate``'s code at each site
on the model that site deploys (``site_models/best_model.pt``): batch-norm refresh, ``--fine-tune-steps`` of
fine-tuning, temperature scaling. Prints one row per site: validation Dice and ECE before and after, the temperature
and what was kept. The figures are one run on one validation case per site: they show what the command does to a
real model, not a statistic.

Usage (from the repository root, with the package on the path):
    PYTHONPATH=custom:. nice -n 10 python -m benchmarks.local_calibration [--sites-root data/real] [--rounds 4]
        [--local-steps 20] [--fine-tune-steps 20] [--learning-rate 1e-4] [--workspace workspace/bench_calibration]
        [--reuse]

``--reuse`` skips the federation when the workspace already holds a finished run.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from benchmarks.machine import describe, machine_info
from benchmarks.tasks import REAL_CLASSES, real_sites
from fedseg3d.data.site_config import SiteConfig
from fedseg3d.inference.calibration import calibrate
from fedseg3d.inference.loading import find_site_models, load_deployable
from fedseg3d.inference.provenance import collect_provenance
from fedseg3d.tools.build_jobs import build_jobs
from fedseg3d.tools.simulate import run_simulation

REPO = Path(__file__).resolve().parents[1]
SITES = ["site-1", "site-2", "site-3"]


def federate(sites_root: Path, workspace: Path, rounds: int, local_steps: int) -> float:
    """Run the FedBN job on the real sites; returns its wall time in seconds."""
    overrides = {
        "num_rounds": rounds,
        "sites_per_round": len(SITES),
        "local_steps": local_steps,
        "class_names": REAL_CLASSES,
        "class_loss_weights": [],
    }
    (job_dir,) = build_jobs(REPO / "jobs", workspace / "jobs", ["unet3d_fedbn"], overrides, min_clients=len(SITES))
    started = time.perf_counter()
    code = run_simulation(job_dir, workspace / "sim", sites_root, SITES, timeout=3600)
    if code != 0:
        raise SystemExit(f"simulator exited with {code}; logs under {workspace / 'sim'}")
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sites-root", type=Path, default=Path("data/real"))
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--local-steps", type=int, default=20)
    parser.add_argument("--fine-tune-steps", type=int, default=20)
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument("--workspace", type=Path, default=Path("workspace/bench_calibration"))
    parser.add_argument("--reuse", action="store_true", help="reuse a finished federation in --workspace")
    args = parser.parse_args()
    sites_root = real_sites(args.sites_root, SITES)
    sim = args.workspace / "sim"
    if args.reuse and (sim / "server").is_dir():
        print(f"reusing the federation in {sim}")
    else:
        seconds = federate(sites_root, args.workspace, args.rounds, args.local_steps)
        print(f"FedBN, {len(SITES)} real sites, {args.rounds} rounds of {args.local_steps} steps: {seconds:.0f} s wall")
    rows = []
    for site in SITES:
        model = load_deployable(sim, site=site)
        model.provenance = {**model.provenance, **collect_provenance(find_site_models(sim, site), sim)}
        started = time.perf_counter()
        _, report = calibrate(
            model,
            SiteConfig.from_file(sites_root / site / "site.json"),
            fine_tune_steps=args.fine_tune_steps,
            learning_rate=args.learning_rate,
        )
        print(report.summary() + f"\n  ({time.perf_counter() - started:.0f} s)", flush=True)
        rows.append((f"{model.provenance['deployed']}, round {model.provenance['round']}", report))
    print(f"\nMachine: {describe(machine_info())}")
    print(f"Fine-tuning: {args.fine_tune_steps} steps at learning rate {args.learning_rate:g}\n")
    print("| site | deployed model | Dice before | Dice after | ECE before | ECE after | temperature | kept |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for deployed, r in rows:
        kept = "adapted network" if r.adapted_network_kept else "original network"
        print(
            f"| {r.site} | {deployed} | {r.before.mean_dice:.4f} | "
            f"{r.after.mean_dice:.4f} | {r.before.ece:.4f} | {r.after.ece:.4f} | {r.temperature:.3g} | {kept} |"
        )
    for _, r in rows:
        print(f"\n{r.site}: {r.decision}")
        print(f"  per class before {r.before.class_dice}\n  per class after  {r.after.class_dice}")


if __name__ == "__main__":
    main()
