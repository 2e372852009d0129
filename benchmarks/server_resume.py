"""Server restart figures from a real POC federation: rounds lost, wall time to resume, final Dice against a clean run.

Per seed, in one POC federation (the production participant list, 2 sites, job ``unet3d_fedbn``): an uninterrupted
run of ``--rounds`` rounds, then the same run killed after ``--kill-after`` rounds were saved (SIGKILL of the server
process and its job process, by PID; FLARE's watchdog starts the server again, as an admin or systemd would) and
continued with ``fedseg3d resume``. Printed per seed and as a mean with a t interval over seeds:

- rounds lost: rounds the killed job had started (FedAvg sent the task; sites may have trained it) past the last
  saved round, which the continuation runs again;
- wall time to resume: from the kill until the first round of the continuation is saved, split into the server's
  restart (until it answers the admin API with every site connected), the resume command, and that first round;
- final Dice: mean over the sites of the final global model's validation Dice (cross-site evaluation), resumed run
  minus clean run, paired by seed.

The POC phase holds the machine-wide port lock (``/tmp/fedseg3d-ports.lock``). Run it niced, it takes minutes:

    nice -n 10 python -m benchmarks.server_resume --seeds 0 1 2 --json docs/server_resume_benchmark.json
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.machine import describe, machine_info
from benchmarks.poc_cost import ports_lock
from benchmarks.stats import mean_interval, paired_interval
from fedseg3d.data.synthetic import generate_sites
from fedseg3d.poc.control import load_layout, stop
from fedseg3d.poc.runner import follow_job, prepare, start, submit_job
from fedseg3d.poc.server_restart import kill_server, server_pid, wait_for_server
from fedseg3d.server import run_state
from fedseg3d.tools.build_jobs import build_jobs
from fedseg3d.tools.report import find_cross_site_results, site_rows

REPO = Path(__file__).resolve().parents[1]
SITES = ["site-1", "site-2"]
JOB = "unet3d_fedbn"
STARTED = re.compile(r"Round (\d+) started\.")  # FedAvg's banner at the start of each round


def wait_for_round(state_dir: Path, round_: int, timeout: float) -> float:
    """Wait until the run's state has saved round ``round_`` (0-based); returns the time (perf counter)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        path = state_dir / run_state.STATE_FILE
        saved = json.loads(path.read_text())["last_round"] if path.is_file() else None
        if saved is not None and saved >= round_:
            return time.perf_counter()
        time.sleep(0.2)
    raise TimeoutError(f"round {round_ + 1} not saved in {state_dir} within {timeout:.0f} s")


def final_dice(result_dir: Path) -> float:
    """Mean over sites of the final global model's Dice in a downloaded result."""
    rows = site_rows(json.loads(find_cross_site_results(result_dir).read_text()))
    return sum(float(row["global_final"]) for row in rows) / len(rows)


def last_started_round(layout, job_id: str) -> int:
    """The last round FedAvg started in a job (0-based), from the job's server log (kept when the server dies)."""
    log_file = layout.prod_dir / layout.server_name / job_id / "log.txt"
    return max(int(m) for m in STARTED.findall(log_file.read_text(errors="replace")))


def one_seed(layout, seed: int, args: argparse.Namespace, out: Path) -> dict:
    """A clean run and a killed-and-resumed run of the same seed, in the running POC."""
    state_root = layout.prod_dir / layout.server_name
    knobs = {"num_rounds": args.rounds, "sites_per_round": 2, "local_steps": args.local_steps, "seed": seed}
    results = {}
    clean_job, restart_job = (
        build_jobs(REPO / "jobs", out / f"jobs-{name}", [JOB], {**knobs, "run_name": f"{name}-s{seed}"}, 2, False)[0]
        for name in ("clean", "restart")
    )
    clean_id = submit_job(layout, clean_job)
    status, result = follow_job(layout, clean_id, args.timeout, out / "results")
    results["clean_status"], results["clean_dice"] = status, final_dice(result) if result else None

    state_dir = run_state.run_state_dir(state_root, f"restart-s{seed}")
    first_id = submit_job(layout, restart_job)
    wait_for_round(state_dir, args.kill_after - 1, args.timeout)
    old_pid = server_pid(layout)
    killed = time.perf_counter()
    kill_server(layout)
    saved = run_state.read_state(state_dir)["last_round"]
    restart_seconds = wait_for_server(layout, SITES, old_pid, timeout=300)
    command_started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "fedseg3d", "resume", "--run", f"restart-s{seed}", "--poc-workspace",
         str(layout.workspace), "--out", str(out / "resume")],
        capture_output=True, text=True, timeout=300, check=True,
    )  # fmt: skip
    command_seconds = time.perf_counter() - command_started
    print(done.stdout, flush=True)
    resumed_id = done.stdout.strip().splitlines()[-1].split()[-1]
    first_round_done = wait_for_round(state_dir, saved + 1, args.timeout)
    status, result = follow_job(layout, resumed_id, args.timeout, out / "results")
    lost = last_started_round(layout, first_id) - saved
    results.update(
        resumed_status=status,
        resumed_dice=final_dice(result) if result else None,
        saved_before_kill=saved + 1,
        rounds_lost=lost,
        restart_seconds=restart_seconds,
        resume_command_seconds=command_seconds,
        first_round_seconds=first_round_done - command_started - command_seconds,
        kill_to_first_round_seconds=first_round_done - killed,
    )
    return results


def summarise(per_seed: dict[str, dict]) -> dict:
    def column(name: str) -> dict[str, float | None]:
        return {seed: r.get(name) for seed, r in per_seed.items()}

    summary = {
        name: mean_interval(column(name).values()).as_dict()
        for name in ("rounds_lost", "restart_seconds", "resume_command_seconds", "first_round_seconds",
                     "kill_to_first_round_seconds", "clean_dice", "resumed_dice")
    }  # fmt: skip
    summary["dice_resumed_minus_clean"] = paired_interval(column("resumed_dice"), column("clean_dice")).as_dict()
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--kill-after", type=int, default=3, help="kill once this many rounds are saved")
    parser.add_argument("--local-steps", type=int, default=6)
    parser.add_argument("--workspace", type=Path, default=Path("workspace") / "bench_server_resume")
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    args = parser.parse_args(argv)
    out = args.workspace.resolve()
    data = out / "data"
    if not (data / SITES[-1] / "datalist.json").is_file():
        generate_sites(data, n_sites=len(SITES), seed=7, fov_mm=48.0, cases_scale=0.5)
    info = machine_info()
    print(f"machine: {describe(info)}", flush=True)
    per_seed: dict[str, dict] = {}
    with ports_lock():
        layout = load_layout(out / "poc")
        prepare(layout, data, SITES)
        try:
            start(layout, SITES)
            for seed in args.seeds:
                per_seed[str(seed)] = one_seed(layout, seed, args, out)
                print(f"seed {seed}: {json.dumps(per_seed[str(seed)])}", flush=True)
        finally:
            stop(layout)
    summary = summarise(per_seed)
    for name, interval in summary.items():
        print(f"{name:>30}: {interval['mean']:.4f}  [{interval['low']:.4f}, {interval['high']:.4f}]  n={interval['n']}")
    report = {"machine": info, "settings": {k: v for k, v in vars(args).items() if k not in ("workspace", "json")},
              "per_seed": per_seed, "summary": summary}  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
