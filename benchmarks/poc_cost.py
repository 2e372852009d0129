"""Cost figures from a real POC deployment: registration time, process memory, round overhead, bytes.

The federated job runs exactly as ``make poc`` runs it (``fedseg3d poc run``: project.yml, admin API submission), with
the benchmark's byte probes added. While it runs, a thread samples the resident memory (RSS) of every process of
each participant (server or site: the parent, its job process and any helper, found by the participant's folder on
their command line) every ``SAMPLE_SECONDS``; the peak of the per-participant sum is reported.

Port 8002 is shared with other users of this machine, so the whole POC phase holds an exclusive ``flock`` on
``/tmp/fedseg3d-ports.lock`` (the same lock ``flock(1)`` takes).
"""

from __future__ import annotations

import contextlib
import fcntl
import shutil
import statistics
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from benchmarks.config import BenchConfig
from benchmarks.federated import FederatedResult, build_bench_job, parse_run
from fedseg3d.poc.control import load_layout, stop
from fedseg3d.poc.runner import prepare, start, submit_and_wait

PORTS_LOCK = Path("/tmp/fedseg3d-ports.lock")
SAMPLE_SECONDS = 0.5


@dataclass
class PocCost:
    """The POC cost figures (seconds, bytes)."""

    registration_seconds: float
    peak_rss_bytes: dict[str, int]
    round_wall_seconds: dict[int, float]
    slowest_train_seconds: dict[int, float]
    overhead: dict[int, float] = field(default_factory=dict)
    result: FederatedResult | None = None
    status: str = ""


@contextlib.contextmanager
def ports_lock(log=print) -> Iterator[None]:
    """Hold the machine-wide POC port lock (blocks while another user's POC runs)."""
    with PORTS_LOCK.open("a") as handle:
        log(f"waiting for {PORTS_LOCK}")
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class RssSampler(threading.Thread):
    """Samples, per participant, the summed RSS of the processes whose command line names its POC folder."""

    def __init__(self, participant_dirs: dict[str, Path]) -> None:
        super().__init__(daemon=True)
        self.markers = {name: str(path) for name, path in participant_dirs.items()}
        self.peak: dict[str, int] = dict.fromkeys(participant_dirs, 0)
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            sums = dict.fromkeys(self.markers, 0)
            for proc in psutil.process_iter(["cmdline", "memory_info"]):
                try:
                    cmdline = " ".join(proc.info["cmdline"] or [])
                    for name, marker in self.markers.items():
                        if marker + "/" in cmdline + "/" or f"{marker} " in cmdline:
                            sums[name] += proc.info["memory_info"].rss
                            break
                except (psutil.NoSuchProcess, psutil.AccessDenied, TypeError):
                    continue
            for name, value in sums.items():
                self.peak[name] = max(self.peak[name], value)
            self._halt.wait(SAMPLE_SECONDS)

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=10)


def round_overhead(result: FederatedResult) -> tuple[dict[int, float], dict[int, float], dict[int, float]]:
    """Per round r >= 1: wall time (last contribution of r minus last of r-1), slowest site's pure training time,
    and their ratio. Round 0 is left out: its start (job deployment, data preparation) has no clean boundary."""
    last: dict[int, float] = {}
    slowest: dict[int, float] = {}
    for row in result.rounds:
        last[row["round"]] = max(last.get(row["round"], 0.0), row["time"])
        slowest[row["round"]] = max(slowest.get(row["round"], 0.0), float(row.get("train_seconds", 0.0)))
    wall = {r: last[r] - last[r - 1] for r in sorted(last) if r - 1 in last}
    overhead = {r: wall[r] / slowest[r] for r in wall if slowest.get(r, 0) > 0}
    return wall, {r: slowest[r] for r in wall}, overhead


def run_poc_cost(
    cfg: BenchConfig, sites_root: Path, work_dir: Path, timeout: float, log=print, knobs: dict | None = None
) -> PocCost:
    """Prepare, start (timed until all sites registered), submit, sample memory, download, stop; parse the run.
    ``knobs`` are the task's job knobs (``benchmarks.tasks``).

    Raises:
        RuntimeError: the job did not complete.
    """
    work_dir = work_dir.resolve()
    workspace = work_dir / "poc"
    if workspace.exists():
        shutil.rmtree(workspace)
    layout = load_layout(workspace)
    job_dir = build_bench_job(cfg, cfg.cost_job, work_dir / "poc_jobs", knobs)
    participants = [layout.server_name, *cfg.site_names]
    with ports_lock(log):
        prepare(layout, sites_root, cfg.site_names)
        sampler = RssSampler({name: layout.prod_dir / name for name in participants})
        sampler.start()
        try:  # every path out stops POC first: the port and the lock are shared
            registration = start(layout, cfg.site_names)
            submitted = time.perf_counter()
            job_id, status, result_dir = submit_and_wait(layout, job_dir, timeout, work_dir / "poc_results")
            wall = time.perf_counter() - submitted
            # Copy what the sites recorded before POC stops (sites may clean their job folders up).
            site_runs = {}
            for site in cfg.site_names:
                source = layout.prod_dir / site / job_id
                site_runs[site] = work_dir / "poc_sites" / site
                if source.is_dir():
                    shutil.copytree(source, site_runs[site], dirs_exist_ok=True)
        finally:
            try:
                sampler.stop()
            finally:
                stop(layout)
    if status != "FINISHED:COMPLETED" or result_dir is None:
        raise RuntimeError(f"POC job {job_id} ended {status}; logs under {layout.prod_dir}")
    matrix_file = next(result_dir.rglob("cross_val_results.json"))
    result = parse_run(cfg.cost_job, matrix_file.parent.parent, site_runs)
    result.wall_seconds = wall
    round_wall, slowest, overhead = round_overhead(result)
    return PocCost(
        registration_seconds=registration,
        peak_rss_bytes=sampler.peak,
        round_wall_seconds=round_wall,
        slowest_train_seconds=slowest,
        overhead=overhead,
        result=result,
        status=status,
    )


def median(values) -> float:
    values = list(values)
    return statistics.median(values) if values else float("nan")
