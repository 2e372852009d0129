"""One command for the whole benchmark: data, local-only, pooled, FedAvg, FedProx, FedBN, POC cost, report.

Usage:
    python -m benchmarks.run --mode full  [--out docs/benchmark] [--work workspace/bench/full] [--no-poc]
    python -m benchmarks.run --mode quick [--out workspace/bench/quick/report]
    (overrides: --sites N --rounds R --local-epochs E --seed S)

Writes ``results.json``, ``report.md`` and PNG plots into ``--out`` and prints the final tables.
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

from benchmarks.config import (
    FEDERATED_JOBS,
    JOBS_DIR,
    REPO,
    BenchConfig,
    is_dp_job,
    is_quantised_job,
    make_config,
)
from benchmarks.machine import describe, machine_info
from benchmarks.render import write_plots
from benchmarks.report import report_markdown, summary_text
from benchmarks.summary import bytes_summary, goals, method_summary, nanmean, throughput_from_totals, throughput_rows
from fedseg3d.data.synthetic import generate_sites

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


def optional_jobs(quick: bool) -> dict[str, str]:
    """DP and quantised jobs in ``jobs/``, told apart by their knobs (a build without them reports them as not
    available).

    The quick mode (a CI smoke test) runs one of each kind: enough to prove the path, not the whole sweep.
    """
    found: dict[str, str] = {}
    for path in sorted(p for p in JOBS_DIR.iterdir() if (p / "meta.json").is_file()):
        if path.name in FEDERATED_JOBS.values():
            continue
        if is_dp_job(path.name) or is_quantised_job(path.name):
            found[path.name.removeprefix("unet3d_")] = path.name
    if quick:
        first_dp = next((m for m, job in found.items() if is_dp_job(job) and not is_quantised_job(job)), None)
        first_q = next((m for m, job in found.items() if is_quantised_job(job) and not is_dp_job(job)), None)
        found = {m: found[m] for m in (first_dp, first_q) if m is not None}
    return found


def run_federated(cfg: BenchConfig, sites_root: Path, work: Path, methods: dict, timeout: float) -> tuple[dict, dict]:
    from benchmarks.federated import run_simulated

    results, failed = {}, {}
    for method, job in methods.items():
        log(f"{method}: simulator run of {job} ({cfg.rounds} rounds x {cfg.local_epochs} epochs, {cfg.sites} sites)")
        try:
            result = run_simulated(cfg, job, sites_root, work, timeout)
        except Exception as err:  # one failed method must not lose the others' results; it is reported
            failed[method] = f"failed: {type(err).__name__}: {err}"
            log(f"{method} failed: {err}")
            continue
        raw = dataclasses.asdict(result)
        raw["bytes"] = bytes_summary(result.bytes_per_round)
        results[method] = raw
        log(f"{method}: done in {result.wall_seconds:.0f} s")
    return results, failed


def run_poc(cfg: BenchConfig, sites_root: Path, work: Path, timeout: float) -> dict:
    from benchmarks.poc_cost import median, run_poc_cost

    log(f"POC cost run of {cfg.cost_job}")
    try:
        cost = run_poc_cost(cfg, sites_root, work, timeout, log=log)
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


def run(cfg: BenchConfig, out_dir: Path, work: Path, command: str, timeout: float) -> dict:
    from benchmarks.centralised import run_centralised

    started, load = time.perf_counter(), LoadSampler()
    load.start()
    loadavg_start = [round(v, 2) for v in os.getloadavg()]
    sites_root = work / "data"
    log(f"writing {cfg.sites} synthetic sites to {sites_root}")
    generate_sites(sites_root, n_sites=cfg.sites, seed=cfg.seed, fov_mm=cfg.fov_mm, cases_scale=cfg.cases_scale)

    phases = []

    def phase(name: str, began: float, load_at_start: float) -> None:
        phases.append({"phase": name, "seconds": time.perf_counter() - began, "load_1min_at_start": load_at_start})

    log("local-only and pooled training (package training code, no FLARE)")
    began, load_now = time.perf_counter(), os.getloadavg()[0]
    central = run_centralised(cfg, sites_root, work / "centralised", log=log)
    phase("local-only + pooled", began, load_now)
    methods = {name: dataclasses.asdict(result) for name, result in central.items()}
    extra = optional_jobs(quick=cfg.mode == "quick")
    began, load_now = time.perf_counter(), os.getloadavg()[0]
    fed, failed = run_federated(cfg, sites_root, work, {**FEDERATED_JOBS, **extra}, timeout)
    phase("federated (simulator)", began, load_now)
    methods.update(fed)
    began, load_now = time.perf_counter(), os.getloadavg()[0]
    poc = run_poc(cfg, sites_root, work, timeout) if cfg.poc else None
    phase("POC cost run", began, load_now)

    not_run = {"SCAFFOLD": SCAFFOLD_NOT_RUN, **failed}
    if not any(is_dp_job(job) for job in extra.values()):
        not_run["DP (Dice against epsilon)"] = "not available in this build: no DP job in jobs/."
    if not any(is_quantised_job(job) for job in extra.values()):
        not_run["quantised updates"] = "not available in this build: no quantisation job in jobs/."
    not_run["GPU"] = "not run: this machine has no GPU." if not torch.cuda.is_available() else "GPU present."

    summaries = {name: method_summary(name, raw, cfg.site_names) for name, raw in methods.items()}
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
        "config": {**dataclasses.asdict(cfg), "site_names": cfg.site_names, "total_epochs": cfg.total_epochs},
        "methods": methods,
        "summary": summaries,
        "poc": poc,
        "centralised_throughput": [
            throughput_from_totals(f"{name} (no FLARE, 1 thread)", totals, cfg.rounds)
            for family in central.values()
            for name, totals in family.train_stats.items()
        ],
        "goals": goals(summaries, (poc or {}).get("overhead_median")),
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=["quick", "full"], default=os.environ.get("BENCH_MODE", "full"))
    parser.add_argument("--out", type=Path, default=None, help="report folder (full: docs/benchmark)")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default workspace/bench/<mode>)")
    parser.add_argument("--sites", type=int)
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--local-epochs", type=int)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--no-poc", action="store_true", help="skip the POC cost run (no port needed)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds allowed per federated run")
    parser.add_argument("--render-only", type=Path, metavar="DIR", help="re-render DIR/results.json; train nothing")
    args = parser.parse_args(argv)
    if args.render_only:
        render(args.render_only)
        return 0
    cfg = make_config(
        args.mode,
        sites=args.sites,
        rounds=args.rounds,
        local_epochs=args.local_epochs,
        seed=args.seed,
        poc=False if args.no_poc else None,
    )
    out = args.out or (
        REPO / "docs" / "benchmark" if cfg.mode == "full" else REPO / "workspace" / "bench" / "quick" / "report"
    )
    work = (args.work or REPO / "workspace" / "bench" / cfg.mode).resolve()
    command = "python -m benchmarks.run " + " ".join(argv if argv is not None else sys.argv[1:])
    results = run(cfg, out, work, command.strip(), args.timeout)
    failed = [k for k, v in results["not_run"].items() if str(v).startswith("failed")]
    poc_failed = bool((results.get("poc") or {}).get("error"))
    return 1 if failed or poc_failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
