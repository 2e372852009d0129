"""One command for the whole benchmark: data, local-only, pooled, FedAvg, FedProx, FedBN, FedBN-int3 on several seeds,
POC cost, report with intervals.

Usage:
    python -m benchmarks.run --mode full  [--seeds 0,1,2] [--out docs/benchmark]
    python -m benchmarks.run --mode quick [--out workspace/bench/quick-synthetic/report]
    python -m benchmarks.run --mode full --data real --real-root data/real   # docs/benchmark/real; first run
        fedseg3d data real --out data/real
    (overrides: --sites N --rounds R --local-epochs E --local-steps S --val-cases V --methods fedbn,pooled --no-poc)
    python -m benchmarks.run --merge DIR1 DIR2 --out DIR   # one report from runs split by seed

Every method runs once per seed with the same seeds; the report gives each method's Dice per site and per class with
a 95% interval over seeds, FedBN's paired difference from each other method, wall times, the goals of issue 25 and
how many seeds and validation cases a +-0.01 interval needs. Writes ``results.json``, ``report.md`` and PNG plots
into ``--out`` and prints the final tables.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import threading
import time
import traceback
from pathlib import Path

import torch

from benchmarks.aggregate import aggregate, goal_checks
from benchmarks.config import ALL_METHODS, CENTRALISED_METHODS, FEDERATED_METHODS, REPO, BenchConfig, make_config
from benchmarks.machine import describe, machine_info
from benchmarks.power import power_analysis
from benchmarks.render import write_plots
from benchmarks.report import report_markdown, summary_text
from benchmarks.summary import (
    bytes_summary,
    method_summary,
    nanmean,
    overhead_goal,
    throughput_from_totals,
    throughput_rows,
)
from benchmarks.tasks import Task, get_task, odd_modality_site, real_sites, site_modalities, synthetic_sites

SCAFFOLD_NOT_RUN = (
    "not run. FLARE 2.9's SCAFFOLD pieces (the `Scaffold` / `ScatterAndGatherScaffold` server workflows and "
    "`PTScaffoldHelper` on the site) exchange control variates in the task and result meta and correct every local "
    "optimizer step; our `SegmentationLearner` would need that step correction and the control-variate exchange, "
    "and the server would lose `ResilientFedAvg`. That is new algorithm code in the learner, not configuration of "
    "built-in pieces, and was not done in this session."
)


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


class LoadSampler(threading.Thread):
    """Samples the 1-minute load average every 10 s: the CPU is shared, so the report states how busy it was."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.samples: list[float] = []
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            self.samples.append(os.getloadavg()[0])
            self._halt.wait(10)

    def stop(self) -> dict[str, float]:
        self._halt.set()
        self.join(timeout=15)
        s = self.samples or [os.getloadavg()[0]]
        return {"min": min(s), "mean": sum(s) / len(s), "max": max(s), "samples": len(s)}


def run_federated(
    cfg: BenchConfig, sites_root: Path, work: Path, task: Task, timeout: float
) -> tuple[dict, dict, dict[str, float]]:
    from benchmarks.federated import run_simulated_checked

    results, failed, walls = {}, {}, {}
    for method, (job, knobs) in FEDERATED_METHODS.items():
        if method not in cfg.methods:
            continue
        log(f"seed {cfg.seed} {method}: simulator run of {job} ({cfg.rounds} rounds, {cfg.sites} sites)")
        began = time.perf_counter()
        try:
            result = run_simulated_checked(
                cfg, job, sites_root, work, timeout, {**task.overrides, **knobs}, name=method
            )
        except Exception as err:  # one failed method must not lose the others' results; it is reported
            failed[method] = f"failed: {type(err).__name__}: {err}"
            log(f"{method} failed: {err}")
            continue
        walls[method] = time.perf_counter() - began
        raw = dataclasses.asdict(result)
        raw["bytes"] = bytes_summary(result.bytes_per_round)
        results[method] = raw
        log(f"seed {cfg.seed} {method}: done in {walls[method]:.0f} s")
    return results, failed, walls


def run_poc(cfg: BenchConfig, sites_root: Path, work: Path, task: Task, timeout: float) -> dict:
    from benchmarks.poc_cost import median, run_poc_cost

    log(f"POC cost run of {cfg.cost_job} (seed {cfg.seed})")
    try:
        cost = run_poc_cost(cfg, sites_root, work, timeout, log=log, knobs=task.overrides)
    except Exception as err:  # reported in the output; the Dice part of the benchmark stands on its own
        traceback.print_exc()
        return {"job": cfg.cost_job, "error": f"{type(err).__name__}: {err}"}
    result = cost.result
    return {
        "job": cfg.cost_job,
        "status": cost.status,
        "registration_seconds": cost.registration_seconds,
        "wall_seconds": result.wall_seconds,
        "peak_rss_bytes": cost.peak_rss_bytes,
        "round_wall_seconds": cost.round_wall_seconds,
        "slowest_train_seconds": cost.slowest_train_seconds,
        "overhead": cost.overhead,
        "overhead_median": median(cost.overhead.values()),
        "bytes": bytes_summary(result.bytes_per_round),
        "bytes_per_round": result.bytes_per_round,
        "throughput": throughput_rows(result.rounds, cfg.site_names),
        "dice_global_mean": nanmean(s.get("global") for s in result.matrix.values()),
    }


def prepare_sites(cfg: BenchConfig, task: Task, work: Path, real_root: Path) -> Path:
    """This seed's sites: drawn for the seed (synthetic) or the real sites built beforehand (the same each seed)."""
    if not task.generated:
        return real_sites(real_root, cfg.site_names)
    log(f"seed {cfg.seed}: writing {cfg.sites} synthetic sites")
    return synthetic_sites(work / "data", cfg.sites, cfg.seed, cfg.fov_mm, cfg.cases_scale, cfg.val_cases)


def run_seed(cfg: BenchConfig, task: Task, work: Path, real_root: Path, timeout: float) -> tuple[dict, dict, Path]:
    """Every method of ``cfg.methods`` once with ``cfg.seed``: (raw results per method, failures, the sites)."""
    from benchmarks.centralised import run_centralised

    seed_work = work / f"seed-{cfg.seed}"
    sites_root = prepare_sites(cfg, task, work, real_root)
    walls: dict[str, float] = {}
    methods, failed = {}, {}
    centralised = tuple(m for m in CENTRALISED_METHODS if m in cfg.methods)
    if centralised:
        log(f"seed {cfg.seed}: {' and '.join(centralised)} training (package training code, no FLARE)")
        try:
            central = run_centralised(cfg, sites_root, seed_work / "centralised", task.overrides, log, centralised)
        except Exception as err:  # reported like a failed federated run
            traceback.print_exc()
            central = {}
            failed.update({m: f"failed: {type(err).__name__}: {err}" for m in centralised})
        for name, result in central.items():
            methods[name] = dataclasses.asdict(result)
            walls[name] = result.wall_seconds
    fed, fed_failed, fed_walls = run_federated(cfg, sites_root, seed_work, task, timeout)
    methods.update(fed)
    failed.update(fed_failed)
    walls.update(fed_walls)
    return {"methods": methods, "wall_seconds": walls}, failed, sites_root


def val_cases_per_site(sites_root: Path, sites: list[str]) -> dict[str, int]:
    """Validation cases each site's datalist lists (the yardstick's size)."""
    out = {}
    for site in sites:
        config = json.loads((sites_root / site / "site.json").read_text())
        datalist = json.loads((sites_root / site / config.get("datalist", "datalist.json")).read_text())
        out[site] = len(datalist.get("validation", []))
    return out


def run(cfg: BenchConfig, out_dir: Path, work: Path, command: str, timeout: float, real_root: Path) -> dict:
    started, load = time.perf_counter(), LoadSampler()
    load.start()
    loadavg_start = [round(v, 2) for v in os.getloadavg()]
    task = get_task(cfg.task)
    per_seed, failed, phases = {}, {}, []
    first: dict = {}
    sites_root = None
    for seed in cfg.seeds:
        seed_cfg = dataclasses.replace(cfg, seed=seed)
        began, load_now = time.perf_counter(), os.getloadavg()[0]
        run_result, seed_failed, sites_root = run_seed(seed_cfg, task, work, real_root, timeout)
        phases.append({"phase": f"seed {seed}", "seconds": time.perf_counter() - began, "load_1min_at_start": load_now})
        failed.update({f"{m} (seed {seed})": why for m, why in seed_failed.items()})
        summaries = {m: method_summary(m, raw, cfg.site_names) for m, raw in run_result["methods"].items()}
        per_seed[str(seed)] = {
            "summary": summaries,
            "wall_seconds": run_result["wall_seconds"],
            "per_round": {m: raw["per_round"] for m, raw in run_result["methods"].items()},
        }
        if not first:
            first = {**run_result, "summary": summaries, "sites_root": sites_root}
    poc = None
    if cfg.poc:
        began, load_now = time.perf_counter(), os.getloadavg()[0]
        poc = run_poc(dataclasses.replace(cfg, seed=cfg.seeds[0]), first["sites_root"], work, task, timeout)
        phases.append({"phase": "POC cost run", "seconds": time.perf_counter() - began, "load_1min_at_start": load_now})

    modalities = site_modalities(first["sites_root"], cfg.site_names)
    val_cases = val_cases_per_site(first["sites_root"], cfg.site_names)
    stats = aggregate(per_seed, cfg.site_names, list(cfg.methods))
    seconds_per_seed = nanmean(sum(run["wall_seconds"].values()) for run in per_seed.values())
    not_run = {
        "SCAFFOLD": SCAFFOLD_NOT_RUN,
        "DP jobs": "not in this benchmark: `make bench-privacy` measures them (docs/privacy_benchmark.md).",
        **failed,
    }
    not_run["GPU"] = "not run: this machine has no GPU." if not torch.cuda.is_available() else "GPU present."
    central_train = {m: first["methods"][m]["train_stats"] for m in CENTRALISED_METHODS if m in first["methods"]}
    results = {
        "meta": {
            "command": command,
            "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
            "machine": describe(machine_info()),
            "loadavg_start": loadavg_start,
            "loadavg_end": [round(v, 2) for v in os.getloadavg()],
            "load_1min": load.stop(),
            "wall_seconds": time.perf_counter() - started,
            "phases": phases,
        },
        "config": {
            **dataclasses.asdict(cfg),
            "site_names": cfg.site_names,
            "total_epochs": cfg.total_epochs,
            "task_overrides": task.overrides,
            "modalities": modalities,
            "val_cases_per_site": val_cases,
        },
        "methods": first["methods"],
        "summary": first["summary"],
        "per_seed": per_seed,
        "stats": stats,
        "goals": goal_checks(stats, cfg.site_names, odd_modality_site(modalities)),
        "cost_goal": overhead_goal((poc or {}).get("overhead_median")),
        "power": power_analysis(stats, min(val_cases.values()), seconds_per_seed),
        "poc": poc,
        "centralised_throughput": [
            throughput_from_totals(f"{name} (no FLARE, 1 thread)", totals, cfg.rounds)
            for family in central_train.values()
            for name, totals in family.items()
        ],
        "not_run": not_run,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    render(out_dir)
    log(f"report: {out_dir / 'report.md'}; total {(time.perf_counter() - started) / 60:.1f} min")
    return results


def render(out_dir: Path) -> None:
    """Write the plots and ``report.md`` from ``out_dir/results.json`` and print the final tables.

    Always from the JSON file (not the in-memory results), so ``--render-only`` gives exactly the same report.
    """
    results = json.loads((out_dir / "results.json").read_text())
    plots = write_plots(results, out_dir)
    (out_dir / "report.md").write_text(report_markdown(results, plots))
    print()
    print(summary_text(results))


def default_out(cfg: BenchConfig) -> Path:
    """One current report per task: ``docs/benchmark`` (synthetic) and ``docs/benchmark/real``; quick mode writes
    under ``workspace/`` only."""
    if cfg.mode == "quick":
        return REPO / "workspace" / "bench" / f"quick-{cfg.task}" / "report"
    return REPO / "docs" / "benchmark" / ("real" if cfg.task == "real" else "")


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from err


def _methods(text: str) -> tuple[str, ...]:
    names = tuple(x.strip() for x in text.split(",") if x.strip())
    unknown = sorted(set(names) - set(ALL_METHODS))
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown method(s) {unknown}; choose from {','.join(ALL_METHODS)}")
    return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=["quick", "full"], default=os.environ.get("BENCH_MODE", "full"))
    parser.add_argument("--data", choices=["synthetic", "real"], default="synthetic", help="the task (see tasks.py)")
    parser.add_argument("--real-root", type=Path, default=REPO / "data" / "real", help="sites of `fedseg3d data real`")
    parser.add_argument("--seeds", type=_int_list, help="comma-separated seeds, the same for every method")
    parser.add_argument("--methods", type=_methods, help=f"comma-separated subset of {','.join(ALL_METHODS)}")
    parser.add_argument("--out", type=Path, default=None, help="report folder (full: docs/benchmark[/real])")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default workspace/bench/<mode>)")
    parser.add_argument("--sites", type=int)
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--local-epochs", type=int)
    parser.add_argument("--local-steps", type=int, help="optimiser steps per round instead of epochs")
    parser.add_argument("--val-cases", type=int, help="synthetic validation cases per site (the yardstick)")
    parser.add_argument("--no-poc", action="store_true", help="skip the POC cost run (no port needed)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds allowed per federated run")
    parser.add_argument("--render-only", type=Path, metavar="DIR", help="re-render DIR/results.json; train nothing")
    parser.add_argument(
        "--merge", type=Path, nargs="+", metavar="DIR",
        help="one report in --out from runs of the same settings on different seeds (DIR/results.json each); "
        "train nothing",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.render_only:
        render(args.render_only)
        return 0
    if args.merge:
        if args.out is None:
            parser.error("--merge needs --out (the merged report's folder)")
        from benchmarks.merge import merge

        merge(args.merge, args.out, "python -m benchmarks.run " + " ".join(argv if argv is not None else sys.argv[1:]))
        render(args.out)
        return 0
    if args.data == "real" and args.val_cases is not None:
        parser.error("--val-cases applies to synthetic sites only; the real sites' split is fixed by their build")
    cfg = make_config(
        args.mode,
        task=args.data,
        seeds=args.seeds,
        methods=args.methods,
        sites=args.sites,
        rounds=args.rounds,
        local_epochs=args.local_epochs,
        local_steps=args.local_steps,
        val_cases=args.val_cases,
        poc=False if args.no_poc else None,
    )
    out = args.out or default_out(cfg)
    work = (args.work or REPO / "workspace" / "bench" / f"{cfg.mode}-{cfg.task}").resolve()
    command = "python -m benchmarks.run " + " ".join(argv if argv is not None else sys.argv[1:])
    results = run(cfg, out, work, command.strip(), args.timeout, args.real_root.resolve())
    failed = [k for k, v in results["not_run"].items() if str(v).startswith("failed")]
    poc_failed = bool((results.get("poc") or {}).get("error"))
    return 1 if failed or poc_failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
