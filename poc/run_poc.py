"""Run the federation on this workstation in FLARE POC mode, the way a user would from the admin console.

Steps: assemble the job from ``jobs/`` and the package, prepare a POC workspace from ``provisioning/project.yml``
(the same participant list as production), point every site at its data (``local/fedseg3d_site.json``), start the
server and sites, submit the job through the admin API as ``admin@consortium.org``, print progress (round k of n,
per-site Dice) while it runs, download the results, print the Dice table, and stop everything -- also on Ctrl-C
or an error, checking afterwards that no POC process is left and the port is free.

Usage:
    python poc/run_poc.py [--job unet3d_fedbn] [--sites 4] [--data data/synthetic] [--workspace workspace/poc]
        [--set num_rounds=10 ...] [--timeout 900] [--keep-running] [--privacy-budget 50]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import psutil
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "custom"))

from fedseg3d.data.site_config import SITE_CONFIG_FILENAME  # noqa: E402
from fedseg3d.privacy.site_budget import write_site_budget  # noqa: E402
from fedseg3d.tools.build_jobs import build_jobs  # noqa: E402
from fedseg3d.tools.report import report  # noqa: E402

PROJECT_FILE = REPO / "provisioning" / "project.yml"
ADMIN_USER = "admin@consortium.org"
DONE_PREFIX = "FINISHED"
# FederatedServer's line for a site that joined, e.g. "2026-11-23 14:35:04,668 - FederatedServer - INFO - client
# site-2 registered with site_config keys: [...]".
REGISTERED_LINE = re.compile(r"^(?P<stamp>\S+ \S+) - FederatedServer - INFO - client (?P<site>\S+) registered")


def log(message: str) -> None:
    print(f"[poc {time.strftime('%H:%M:%S')}] {message}", flush=True)


@dataclass
class PocLayout:
    """Where POC put things for a project."""

    workspace: Path
    project: dict

    @property
    def prod_dir(self) -> Path:
        return self.workspace / self.project["name"] / "prod_00"

    @property
    def site_names(self) -> list[str]:
        return [p["name"] for p in self.project["participants"] if p["type"] == "client"]

    @property
    def server_name(self) -> str:
        return next(p["name"] for p in self.project["participants"] if p["type"] == "server")

    @property
    def port(self) -> int:
        server = next(p for p in self.project["participants"] if p["type"] == "server")
        return int(server.get("fed_learn_port", 8002))

    def admin_kit(self, user: str = ADMIN_USER) -> Path:
        return self.prod_dir / user


def nvflare_env(workspace: Path) -> dict[str, str]:
    """POC writes the active admin kit into ~/.nvflare; a private HOME keeps it from re-pointing the user's."""
    home = workspace / ".home"
    home.mkdir(parents=True, exist_ok=True)
    return dict(os.environ, NVFLARE_POC_WORKSPACE=str(workspace), HOME=str(home))


def nvflare(args: list[str], workspace: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    command = [str(Path(sys.executable).parent / "nvflare"), *args]
    result = subprocess.run(command, env=nvflare_env(workspace), capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError(
            f"`nvflare {' '.join(args)}` failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
        )
    return result


def port_in_use(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def poc_processes(workspace: Path) -> list[psutil.Process]:
    """Every process whose command line mentions this POC workspace (server, sites, job runners, watchdogs)."""
    marker = str(workspace)
    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if proc.pid != os.getpid() and any(marker in part for part in (proc.info["cmdline"] or [])):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def load_layout(workspace: Path, project_file: Path = PROJECT_FILE) -> PocLayout:
    return PocLayout(workspace.resolve(), yaml.safe_load(project_file.read_text()))


def prepare(
    layout: PocLayout,
    data_root: Path,
    sites: list[str],
    project_file: Path = PROJECT_FILE,
    threads_per_site: int = 1,
    privacy_budget: float = 50.0,
    privacy_delta: float = 1e-5,
) -> None:
    """``nvflare poc prepare -i project.yml`` and write each started site's data config and privacy budget into its
    ``local/``.

    In production a site's privacy budget is its own decision (hospital IT writes ``local/privacy_budget.json``); in
    POC this runner plays every site's IT, so it writes one budget for all of them. ``poc prepare --force`` starts
    from empty site folders, so each POC run also starts with empty privacy ledgers.
    """
    if port_in_use(layout.port):
        raise RuntimeError(f"port {layout.port} is already in use: is another FLARE server running?")
    unknown = set(sites) - set(layout.site_names)
    if unknown:
        raise ValueError(f"sites {sorted(unknown)} are not in {project_file} (known: {layout.site_names})")
    for site in sites:
        if not (data_root / site / "datalist.json").is_file():
            raise FileNotFoundError(f"{data_root / site}/datalist.json not found: run `make data` first")
    log(f"preparing POC workspace {layout.workspace} from {project_file}")
    nvflare(["poc", "prepare", "-i", str(project_file), "--force"], layout.workspace)
    for site in sites:
        config = {
            "site_name": site,
            "data_root": str((data_root / site).resolve()),
            "datalist": "datalist.json",
            "num_threads": threads_per_site,
        }
        (layout.prod_dir / site / "local" / SITE_CONFIG_FILENAME).write_text(json.dumps(config, indent=2) + "\n")
        write_site_budget(layout.prod_dir / site / "local", privacy_budget, privacy_delta, overwrite=True)


def registered_sites(layout: PocLayout) -> dict[str, float]:
    """Sites the server has registered, with the time (epoch seconds) of registration, from the server's log."""
    log_file = layout.prod_dir / layout.server_name / "log.txt"
    found: dict[str, float] = {}
    if not log_file.is_file():
        return found
    for line in log_file.read_text(errors="replace").splitlines():
        match = REGISTERED_LINE.match(line)
        if match and match["site"] not in found:
            stamp = datetime.strptime(match["stamp"], "%Y-%m-%d %H:%M:%S,%f")
            found[match["site"]] = stamp.timestamp()
    return found


def start(layout: PocLayout, sites: list[str], timeout: float = 120) -> float:
    """Start the server and the chosen sites; returns once they have registered, with the seconds that took.

    ``nvflare poc start`` blocks until its admin-session readiness probe sees every site. On a loaded machine that
    probe (1 s connection timeout, fixed in FLARE 2.9) was seen to hang past its own deadline although every site
    had registered; then the server's log decides, and a site that is not in it is an error.
    """
    excluded = [s for s in layout.site_names if s not in sites]
    args = ["poc", "start", "--timeout", str(int(timeout))]
    for name in excluded:
        args += ["-ex", name]
    started, started_at = time.perf_counter(), time.time()
    log(f"starting server and sites {', '.join(sites)}")
    try:
        nvflare(args, layout.workspace, timeout=timeout + 30)
    except subprocess.TimeoutExpired:
        registered = registered_sites(layout)
        missing = [site for site in sites if site not in registered]
        if missing:
            raise RuntimeError(
                f"sites {missing} did not register within {timeout:.0f} s; see {layout.prod_dir}/<site>/log.txt"
            ) from None
        seconds = max(registered[site] for site in sites) - started_at
        log(f"`nvflare poc start` did not return, but the server log shows every site registered after {seconds:.1f} s")
        return seconds
    seconds = time.perf_counter() - started
    log(f"all sites registered after {seconds:.1f} s")
    return seconds


def stop(layout: PocLayout, grace: float = 30) -> None:
    """``nvflare poc stop``, then make sure nothing is left: kill stragglers by PID and wait for the port."""
    log("stopping POC")
    try:
        nvflare(["poc", "stop"], layout.workspace, timeout=60)
    except (RuntimeError, subprocess.TimeoutExpired) as err:
        log(f"poc stop reported a problem ({err}); killing remaining processes")
    deadline = time.monotonic() + grace
    while poc_processes(layout.workspace) and time.monotonic() < deadline:
        time.sleep(1)
    for proc in poc_processes(layout.workspace):
        log(f"killing leftover process {proc.pid}")
        proc.kill()
    while port_in_use(layout.port) and time.monotonic() < deadline + 10:
        time.sleep(1)
    if port_in_use(layout.port):
        raise RuntimeError(f"port {layout.port} still bound after stopping POC")
    log("POC stopped: no process left, port free")


def contributions_file(layout: PocLayout, job_id: str) -> Path:
    return layout.prod_dir / layout.server_name / job_id / "fedseg3d" / "contributions.jsonl"


def print_progress(lines: list[str]) -> None:
    for line in lines:
        entry = json.loads(line)
        total = entry.get("num_rounds") or "?"
        global_dice = (entry.get("initial_metrics") or {}).get("val_mean_dice")
        local_dice = (entry.get("site_metrics") or {}).get("local_val_mean_dice")
        parts = [f"round {entry['round'] + 1}/{total}", f"{entry['site']:>8}"]
        if entry.get("return_code") != "OK":
            log("  ".join([*parts, f"FAILED ({entry.get('return_code')}): see that site's log"]))
            continue
        if global_dice is not None:
            parts.append(f"global-model Dice {global_dice:.4f}")
        if local_dice is not None:
            parts.append(f"after local training {local_dice:.4f}")
        log("  ".join(parts))


def submit_and_wait(
    layout: PocLayout, job_dir: Path, timeout: float, download_to: Path
) -> tuple[str, str, Path | None]:
    """Submit through the admin API, follow progress, download results. Returns (job id, final status, result dir)."""
    from nvflare.fuel.flare_api.flare_api import new_secure_session

    session = new_secure_session(ADMIN_USER, str(layout.admin_kit()), timeout=30)
    try:
        job_id = session.submit_job(str(job_dir))
        log(f"submitted {job_dir.name} as job {job_id}")
        progress_path, seen, status = contributions_file(layout, job_id), 0, "SUBMITTED"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = session.get_job_meta(job_id).get("status", "?")
            if progress_path.is_file():
                lines = progress_path.read_text().splitlines()
                print_progress(lines[seen:])
                seen = len(lines)
            if status.startswith(DONE_PREFIX):
                break
            time.sleep(2)
        else:
            log(f"job {job_id} still {status} after {timeout:.0f} s: aborting it")
            session.abort_job(job_id)
            return job_id, f"TIMEOUT ({status})", None
        log(f"job {job_id} ended with status {status}")
        download_to.mkdir(parents=True, exist_ok=True)
        result_dir = Path(session.download_job_result(job_id, str(download_to)))
        log(f"results downloaded to {result_dir}")
        return job_id, status, result_dir
    finally:
        session.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--job", default="unet3d_fedbn")
    parser.add_argument("--sites", type=int, default=0, help="number of sites to start (default: all in project.yml)")
    parser.add_argument("--data", type=Path, default=REPO / "data" / "synthetic")
    parser.add_argument("--workspace", type=Path, default=REPO / "workspace" / "poc")
    parser.add_argument("--set", action="append", default=[], dest="overrides", metavar="NAME=VALUE")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds to wait for the job")
    parser.add_argument("--threads-per-site", type=int, default=1)
    parser.add_argument("--keep-running", action="store_true", help="leave POC running after the job")
    parser.add_argument(
        "--privacy-budget", type=float, default=50.0, help="epsilon budget written to every site (DP jobs charge it)"
    )
    parser.add_argument("--privacy-delta", type=float, default=1e-5, help="delta of every site's privacy budget")
    args = parser.parse_args(argv)

    from fedseg3d.tools.build_jobs import parse_override

    overrides = dict(parse_override(o) for o in args.overrides)
    layout = load_layout(args.workspace)
    sites = layout.site_names[: args.sites] if args.sites else layout.site_names
    prepare(
        layout,
        args.data,
        sites,
        threads_per_site=args.threads_per_site,
        privacy_budget=args.privacy_budget,
        privacy_delta=args.privacy_delta,
    )
    overrides.setdefault("sites_per_round", len(sites))
    (job_dir,) = build_jobs(REPO / "jobs", args.workspace / "jobs", [args.job], overrides, min_clients=len(sites))
    # SIGTERM (e.g. from a CI runner) takes the same clean-up path as Ctrl-C.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    started = time.perf_counter()
    status = "NOT RUN"
    try:
        start(layout, sites)
        job_id, status, result_dir = submit_and_wait(layout, job_dir, args.timeout, args.workspace / "results")
        if result_dir is not None:
            print()
            print(report(result_dir))
            print(f"\nJob {job_id}: {status}. Results: {result_dir}")
            print(f"TensorBoard: tensorboard --logdir {result_dir}")
    except KeyboardInterrupt:
        log("interrupted")
        status = "INTERRUPTED"
    finally:
        if not args.keep_running:
            stop(layout)
    log(f"total {time.perf_counter() - started:.0f} s")
    return 0 if status == "FINISHED:COMPLETED" else 1


if __name__ == "__main__":
    raise SystemExit(main())
