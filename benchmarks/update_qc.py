"""Update quality control against faulty sites: detection, false exclusions and the Dice a fault costs.

One site of four misbehaves in every round (``scale`` x100, ``sign_flip``, ``noise``, ``free_rider``, or trained
on swapped labels: its ``site.json`` maps organ to lesion and lesion to organ). Each fault runs under five server
defences: plain FedAvg (``weighted_mean``, QC off), FedAvg with update QC (the stock jobs' default), and the robust
rules alone (``median``, ``trimmed_mean``, ``norm_bound``, QC off). Per fault and defence it reports:

- detection: rounds in which the faulty site's update was excluded / rounds it attacked (QC only);
- false exclusions: honest updates excluded, over all honest updates (the clean runs are the false-alarm test);
- final Dice: the honest sites' mean validation Dice of the last global model (each with its own FedBN batch
  norm), minus that of a clean plain-FedAvg run of the same seed, with a 95% t interval over the seeds.

How it runs: the federation is driven in this process (no FLARE simulator, so that ~100 runs fit in half an hour on
two cores): each site's ``SiteTrainer`` (the learner's own training round, from the site's own ``site.json``), the
drill's ``corrupt`` faults (``fedseg3d.filters.fault_injection``) and the server's very ``ScreenedAggregator``
called through FLARE's ``ModelAggregator`` methods. The end-to-end test runs the same pieces in the FLARE simulator.

    nice -n 10 python -m benchmarks.update_qc --out build/update_qc [--seeds 0 1 2] [--rounds 5] [--local-steps 2]
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from nvflare.apis.dxo import MetaKey
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType

from benchmarks.centralised import _site_trainer
from benchmarks.config import BenchConfig, centralised_settings
from benchmarks.stats import mean_interval, paired_interval
from fedseg3d.data.synthetic import generate_sites
from fedseg3d.filters.fault_injection import corrupt
from fedseg3d.filters.gaussian_dp import clip_and_noise
from fedseg3d.server.screened_aggregator import QC_META_KEY, ScreenedAggregator

SITES = ["site-1", "site-2", "site-3", "site-4"]
ATTACKER = "site-3"
FAULTS = ["clean", "scale", "sign_flip", "noise", "free_rider", "label_flip", "dp_clean", "dp_scale"]
CLEAN = ("clean", "dp_clean")
# ``dp_*``: every site's update goes through the Gaussian DP filter's mechanism with the DP job's defaults
# (clip to C = 1, noise std sigma * C = 1 per value); ``dp_scale``: the faulty site scales its noised update x100.
DP_CLIP, DP_NOISE = 1.0, 1.0
DEFENCES = {
    "fedavg": {"update_qc": False, "aggregation_rule": "weighted_mean"},
    "fedavg+qc": {"update_qc": True, "aggregation_rule": "weighted_mean"},
    "median": {"update_qc": False, "aggregation_rule": "median"},
    "trimmed_mean": {"update_qc": False, "aggregation_rule": "trimmed_mean"},
    "norm_bound": {"update_qc": False, "aggregation_rule": "norm_bound"},
}
SWAPPED_LABELS = {"1": "lesion", "2": "organ"}  # the synthetic sites' IDs: 1 organ, 2 lesion


def make_sites(root: Path, seed: int) -> dict[str, Path]:
    """Four synthetic sites, and a copy whose ``ATTACKER`` has its organ and lesion labels swapped."""
    clean = root / f"sites_{seed}"
    if not (clean / ATTACKER / "site.json").is_file():
        generate_sites(clean, n_sites=len(SITES), seed=seed, fov_mm=32.0, cases_scale=0.3, dicom_sites=())
    flipped = root / f"sites_{seed}_label_flip"
    if not flipped.is_dir():
        shutil.copytree(clean, flipped)
        config_path = flipped / ATTACKER / "site.json"
        config = json.loads(config_path.read_text())
        config["label_map"] = SWAPPED_LABELS
        config_path.write_text(json.dumps(config, indent=2) + "\n")
    return {"clean": clean, "label_flip": flipped}


def run_federation(
    sites_root: Path, settings: tuple, fault: str, defence: dict, seed: int, rounds: int, work: Path
) -> dict:
    """One federation: ``rounds`` rounds of the four sites, ``ATTACKER`` sending ``fault``; what the server did."""
    torch.manual_seed(seed)
    trainers = {s: _site_trainer(sites_root, s, settings, work / s) for s in SITES}
    weights = trainers[SITES[0]].shared_weights()
    aggregator = ScreenedAggregator(**defence, min_sites=1)
    rng = np.random.default_rng(seed)
    sent_before = None
    excluded: list[tuple[int, str]] = []
    for r in range(rounds):
        aggregator.reset_stats()
        for site, trainer in trainers.items():
            result = trainer.train_round(weights, r, total_rounds=rounds)
            update = result.update
            if fault.startswith("dp_"):
                update, _ = clip_and_noise(update, DP_CLIP, DP_NOISE, rng)
            attack = fault.removeprefix("dp_")
            if site == ATTACKER and attack not in ("clean", "label_flip"):
                update, sent_before = corrupt(attack, update, rng, sent_before), update
            meta = {"client_name": site, MetaKey.NUM_STEPS_CURRENT_ROUND: result.num_cases}
            aggregator.accept_model(FLModel(params_type=ParamsType.DIFF, params=update, current_round=r, meta=meta))
        out = aggregator.aggregate_model()
        summary = out.meta[QC_META_KEY]
        excluded += [(r, v["site"]) for v in summary["verdicts"] if not v["accepted"] and defence["update_qc"]]
        weights = {k: v + out.params[k] if k in out.params else v for k, v in weights.items()}
    honest = [s for s in SITES if s != ATTACKER]
    dice = {s: trainers[s].evaluate_weights(weights).mean_dice for s in honest}
    return {
        "seed": seed,
        "fault": fault,
        "defence": next(name for name, d in DEFENCES.items() if d == defence),
        "rounds": rounds,
        "excluded": excluded,
        "dice": float(np.mean(list(dice.values()))),
        "site_dice": dice,
    }


def summarise(runs: dict, rounds: int) -> dict:
    """Per fault and defence: detection, false exclusions, Dice and its paired difference to clean FedAvg."""
    table = {}
    reference = {s: r["dice"] for (f, d, s), r in runs.items() if (f, d) == ("clean", "fedavg")}
    for fault in FAULTS:
        for defence in DEFENCES:
            cell = {seed: r for (f, d, seed), r in runs.items() if (f, d) == (fault, defence)}
            if not cell:
                continue
            attacked = 0 if fault in CLEAN else rounds * len(cell)
            caught = sum(1 for r in cell.values() for _, s in r["excluded"] if s == ATTACKER and fault not in CLEAN)
            honest_total = rounds * (len(SITES) - (0 if fault in CLEAN else 1)) * len(cell)
            false = sum(1 for r in cell.values() for _, s in r["excluded"] if s != ATTACKER or fault in CLEAN)
            dice = {seed: r["dice"] for seed, r in cell.items()}
            table[f"{fault}/{defence}"] = {
                "fault": fault,
                "defence": defence,
                "detected": caught,
                "attacked": attacked,
                "false_exclusions": false,
                "honest_updates": honest_total,
                "dice": mean_interval(dice.values()).as_dict(),
                "dice_vs_clean_fedavg": paired_interval(dice, reference).as_dict(),
            }
    return table


def render(table: dict, meta: dict) -> str:
    lines = [
        f"Seeds {meta['seeds']}, {meta['rounds']} rounds of {meta['local_steps']} local steps, 4 synthetic sites "
        f"({ATTACKER} faulty in every round); {meta['runs']} runs, {meta['run_seconds']:.0f} s of run time.",
        "",
        "| fault | defence | detected / attacked | false exclusions / honest updates | final Dice | vs clean FedAvg |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for row in table.values():
        detect = f"{row['detected']} / {row['attacked']}" if row["defence"] == "fedavg+qc" and row["attacked"] else "-"
        false = f"{row['false_exclusions']} / {row['honest_updates']}" if row["defence"] == "fedavg+qc" else "-"
        d, diff = row["dice"], row["dice_vs_clean_fedavg"]
        lines.append(
            f"| {row['fault']} | {row['defence']} | {detect} | {false} | {d['mean']:.3f} "
            f"[{d['low']:.3f}, {d['high']:.3f}] | {diff['mean']:+.3f} [{diff['low']:+.3f}, {diff['high']:+.3f}] |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("build/update_qc"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--local-steps", type=int, default=2)
    parser.add_argument("--faults", nargs="+", default=FAULTS, choices=FAULTS)
    parser.add_argument("--defences", nargs="+", default=list(DEFENCES), choices=list(DEFENCES))
    parser.add_argument("--report", action="store_true", help="only summarise the runs saved under --out")
    parser.add_argument(
        "--no-reference", action="store_true", help="skip the clean FedAvg runs (another process runs them)"
    )
    args = parser.parse_args(argv)
    cfg = BenchConfig(mode="update_qc", sites=len(SITES), rounds=args.rounds, local_epochs=1, fov_mm=32.0,
                      cases_scale=0.3, local_steps=args.local_steps)  # fmt: skip
    torch.set_num_threads(1)
    for seed in [] if args.report else args.seeds:
        roots = make_sites(args.out / "data", seed)
        settings = centralised_settings(replace(cfg, seed=seed, seeds=(seed,)), {}, args.out / "job")
        for fault in args.faults:
            for name, defence in DEFENCES.items():
                reference = (fault, name) == ("clean", "fedavg") and not args.no_reference
                if name not in args.defences and not reference:
                    continue
                saved = args.out / "runs" / f"{seed}_{fault}_{name}.json"
                if saved.is_file():
                    continue  # resumable, and several processes (one per seed) can share --out
                root = roots["label_flip" if fault == "label_flip" else "clean"]
                began = time.perf_counter()
                run = run_federation(root, settings, fault, defence, seed, args.rounds, args.out / "work" / saved.stem)
                run["seconds"] = time.perf_counter() - began
                shutil.rmtree(args.out / "work" / saved.stem, ignore_errors=True)
                saved.parent.mkdir(parents=True, exist_ok=True)
                saved.write_text(json.dumps(run) + "\n")
                print(f"seed {seed} {fault:10s} {name:12s} Dice {run['dice']:.3f} excluded {run['excluded']} "
                      f"({time.perf_counter() - began:.0f} s)", flush=True)  # fmt: skip
    runs = {}
    for path in sorted((args.out / "runs").glob("*.json")):
        run = json.loads(path.read_text())
        if run["seed"] in args.seeds and run["rounds"] == args.rounds:
            runs[(run["fault"], run["defence"], run["seed"])] = run
    meta = {"seeds": args.seeds, "rounds": args.rounds, "local_steps": args.local_steps, "runs": len(runs),
            "run_seconds": sum(r["seconds"] for r in runs.values())}  # fmt: skip
    table = summarise(runs, args.rounds)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "update_qc.json").write_text(json.dumps({"meta": meta, "table": table}, indent=2) + "\n")
    print(render(table, meta))


if __name__ == "__main__":
    main()
