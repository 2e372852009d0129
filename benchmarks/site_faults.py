"""Hung and killed sites in a real FLARE simulator run: how long a round takes to close after a site freezes, and what
the supervised training worker costs per round.

Each site of the simulator is its own process (``simulator_worker --client NAME``); freezing it with SIGSTOP is a
hung site (its job process alive, answering nothing), killing its training worker with SIGKILL is an out-of-memory
kill. ``FaultedRun`` drives such a run; ``tests/e2e/test_site_faults.py`` uses it too.

Usage (prints the figures of docs/reliability.md, "Hung and killed sites"):
    nice -n 10 python -m benchmarks.site_faults --repeats 3 --deadlines 10 20
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import signal
import statistics
import subprocess
import time
from datetime import datetime
from pathlib import Path

import psutil

from fedseg3d.data.site_config import SITES_ROOT_ENV
from fedseg3d.data.synthetic import generate_sites
from fedseg3d.tools.build_jobs import build_jobs
from fedseg3d.tools.simulate import kill_process_tree, simulator_command

REPO = Path(__file__).resolve().parents[1]
SITES = ["site-1", "site-2"]
STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})")


class FaultedRun:
    """A simulator run in the background whose site processes can be found, frozen, thawed and killed.

    Args:
        job_dir: a built job.
        workspace: the simulator workspace (logs under ``workspace/<site>/log.txt`` and ``workspace/server``).
        sites_root: the sites' data.
        sites: site names (one simulator process each).
    """

    def __init__(self, job_dir: Path, workspace: Path, sites_root: Path, sites: list[str]) -> None:
        self.workspace = Path(workspace)
        self.sites = sites
        env = dict(os.environ, **{SITES_ROOT_ENV: str(Path(sites_root).resolve())})
        command = simulator_command(Path(job_dir).resolve(), self.workspace.resolve(), sites, len(sites))
        self.output = open(self.workspace.parent / f"{self.workspace.name}.out", "w")  # noqa: SIM115 - closed in stop
        self.process = subprocess.Popen(
            command, env=env, start_new_session=True, stdout=self.output, stderr=subprocess.STDOUT
        )

    def log(self, who: str) -> str:
        """The log of ``who`` (a site name or ``server``) so far; empty before it exists."""
        path = self.workspace / who / "log.txt"
        return path.read_text(errors="replace") if path.is_file() else ""

    def wait_for(self, who: str, pattern: str, timeout: float, count: int = 1, poll: float = 0.2) -> str:
        """Wait until ``who``'s log has ``count`` lines matching ``pattern``; return the last of them.

        Raises:
            TimeoutError: not within ``timeout`` seconds, or the run ended first.
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            lines = [line for line in self.log(who).splitlines() if re.search(pattern, line)]
            if len(lines) >= count:
                return lines[count - 1]
            if self.process.poll() is not None:
                raise TimeoutError(f"the run ended (exit {self.process.returncode}) before {who} logged {pattern!r}")
            time.sleep(poll)
        raise TimeoutError(f"{who} did not log {pattern!r} within {timeout} s; logs under {self.workspace}")

    def site_process(self, site: str) -> psutil.Process:
        """The simulator process that runs ``site``'s job."""
        for proc in psutil.Process(self.process.pid).children(recursive=True):
            cmdline = proc.cmdline()
            if "nvflare.private.fed.app.simulator.simulator_worker" in cmdline and site in cmdline:
                return proc
        raise LookupError(f"no simulator_worker process for {site}")

    def training_worker(self, site: str) -> psutil.Process:
        """``site``'s supervised training worker (a spawned child of its job process)."""
        for proc in self.site_process(site).children():
            if any("spawn_main" in part for part in proc.cmdline()):  # not multiprocessing's resource tracker
                return proc
        raise LookupError(f"{site} has no training worker process")

    def freeze(self, site: str) -> None:
        """SIGSTOP the site's job process and its children: alive, silent, as a wedged site."""
        site_process = self.site_process(site)
        for proc in [site_process, *site_process.children(recursive=True)]:
            proc.send_signal(signal.SIGSTOP)

    def thaw(self, site: str) -> None:
        site_process = self.site_process(site)
        for proc in [site_process, *site_process.children(recursive=True)]:
            proc.send_signal(signal.SIGCONT)

    def wait(self, timeout: float) -> int:
        """Wait for the run to finish; its exit code (0 when the job finished)."""
        return self.process.wait(timeout=timeout)

    def stop(self) -> None:
        """Kill whatever is left of the run (frozen processes are thawed first so they die)."""
        if self.process.poll() is None:
            for proc in psutil.Process(self.process.pid).children(recursive=True):
                with contextlib.suppress(psutil.NoSuchProcess):
                    proc.send_signal(signal.SIGCONT)
            kill_process_tree(self.process.pid)
            self.process.wait()
        self.output.close()


def build(job: str, out: Path, overrides: dict) -> Path:
    (job_dir,) = build_jobs(REPO / "jobs", out, [job], overrides, min_clients=len(SITES))
    return job_dir


def stamp(line: str) -> datetime:
    return datetime.strptime(STAMP.match(line).group(1), "%Y-%m-%d %H:%M:%S,%f")


def hang_close_seconds(sites_root: Path, work: Path, deadline: float) -> float:
    """Freeze site-2 as it starts training in round 1 (round 0 is the start-up); seconds from round 1's task being
    sent to the round's close."""
    job = build("unet3d_fedbn", work / "jobs", {"num_rounds": 2, "local_steps": 2, "round_deadline": deadline})
    run = FaultedRun(job, work / "ws", sites_root, SITES)
    try:
        run.wait_for("site-2", r"round 2/2: training", timeout=600, poll=0.02)
        run.freeze("site-2")
        sent = run.wait_for("server", r"Sending task train to", timeout=10, count=2)
        closed = run.wait_for("server", r"round 1 closed at its deadline", timeout=600)
        run.thaw("site-2")
        run.wait(timeout=600)
        return (stamp(closed) - stamp(sent)).total_seconds()
    finally:
        run.stop()


def round_seconds(sites_root: Path, work: Path, training_worker: bool, rounds: int) -> list[float]:
    """Server-side wall time of each round but the first (start-up) and the last (cross-site evaluation follows):
    from one round's task being sent to the next one's."""
    job = build(
        "unet3d_fedbn",
        work / "jobs",
        {"num_rounds": rounds, "local_steps": 5, "training_worker": training_worker},
    )
    run = FaultedRun(job, work / "ws", sites_root, SITES)
    try:
        assert run.wait(timeout=1800) == 0, f"run failed; logs under {work}"
        log = run.log("server").splitlines()
    finally:
        run.stop()
    sent = [stamp(line) for line in log if "Sending task train to" in line]
    return [(b - a).total_seconds() for a, b in zip(sent[1:-1], sent[2:], strict=True)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--deadlines", type=float, nargs="+", default=[10.0, 20.0])
    parser.add_argument("--rounds", type=int, default=5, help="rounds of the overhead runs (first and last not timed)")
    parser.add_argument("--work", type=Path, default=REPO / "build" / "site_faults", help="workspaces (emptied first)")
    args = parser.parse_args(argv)
    shutil.rmtree(args.work, ignore_errors=True)
    work = args.work
    sites_root = work / "sites"
    generate_sites(sites_root, n_sites=len(SITES), seed=1, fov_mm=32.0, cases_scale=0.2)  # the tests' tiny sites
    print("time from a round's start to its close when a site freezes in it (site-2 of 2, min_sites_per_round 1)")
    for deadline in args.deadlines:
        folders = [work / f"hang{deadline:g}_{n}" for n in range(args.repeats)]
        closes = [hang_close_seconds(sites_root, folder, deadline) for folder in folders]
        print(
            f"  round_deadline {deadline:g} s: closes after {statistics.mean(closes):.1f} s "
            f"(runs: {', '.join(f'{c:.1f}' for c in closes)})"
        )
    timed = f"rounds 2 to {args.rounds - 1} of {args.rounds}"
    print(f"round wall time (server, {timed}, 2 sites, unet3d_fedbn, local_steps 5)")
    times: dict[bool, list[float]] = {False: [], True: []}
    for i in range(args.repeats):  # interleaved, so a busier machine in one stretch burdens both alike
        for worker in times:
            times[worker] += round_seconds(sites_root, work / f"rounds{worker}_{i}", worker, args.rounds)
    for worker, seconds in times.items():
        print(
            f"  training_worker {str(worker).lower()}: {statistics.mean(seconds):.2f} s per round "
            f"(sd {statistics.stdev(seconds):.2f}, {len(seconds)} rounds)"
        )
    extra = statistics.mean(times[True]) - statistics.mean(times[False])
    print(f"  overhead of the worker: {extra:+.2f} s per round ({extra / statistics.mean(times[False]):+.0%})")


if __name__ == "__main__":
    main()
