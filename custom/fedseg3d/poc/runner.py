"""Run the federation on this workstation in FLARE POC mode, the way a user would from the admin console.

Steps: prepare a POC workspace from ``provisioning/project.yml`` (the same participant list as production) with
the production kits' resources and class allow-list (``provisioning/site_policies/*/resources.json``), point every
site at its data (``local/fedseg3d_site.json``), start the server and sites, build the job from ``jobs/`` without
code (the POC processes run this installed package, as hospitals do), submit it through the admin API as
``admin@consortium.org``, print progress (round k of n, per-site Dice) while it runs, download the results, print
the Dice table, and stop everything -- also on Ctrl-C or an error, checking afterwards that no POC process is left
and the port is free.

Writes, under ``--workspace``: the POC kits (``fedseg3d/prod_00/<participant>``, logs included), ``jobs/<job>``
(the job as submitted), ``results/<job id>`` (the downloaded result) and ``fedseg3d_poc.json`` (what
``fedseg3d poc stop`` reads).

With ``--keep-running`` the federation stays up after the job: the runner prints how to open the admin console
(and submit any job folder, e.g. ``jobs/unet3d_fedbn``) and the one command that stops it, ``fedseg3d poc stop``.

Example:
    fedseg3d poc run --job unet3d_fedbn --sites 2 --set num_rounds=3 [--keep-running]
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

from fedseg3d.data.site_config import SITE_CONFIG_FILENAME
from fedseg3d.deploy import kits
from fedseg3d.poc.control import (
    ADMIN_USER,
    DEFAULT_WORKSPACE,
    PROJECT_FILE,
    PocLayout,
    load_layout,
    log,
    nvflare,
    port_in_use,
    save_layout,
    stop,
)
from fedseg3d.privacy.site_budget import write_site_budget
from fedseg3d.tools.build_jobs import build_jobs, parse_override
from fedseg3d.tools.report import report

POLICIES_DIR = PROJECT_FILE.parent / "site_policies"
JOBS_DIR = Path("jobs")
DONE_PREFIX = "FINISHED"
# FederatedServer's line for a site that joined, e.g. "2026-11-23 14:35:04,668 - FederatedServer - INFO - client
# site-2 registered with site_config keys: [...]".
REGISTERED_LINE = re.compile(r"^(?P<stamp>\S+ \S+) - FederatedServer - INFO - client (?P<site>\S+) registered")


def install_production_resources(layout: PocLayout, policies_dir: Path = POLICIES_DIR) -> None:
    """Give POC's server and sites the production kits' ``local/resources.json`` (``provisioning/site_policies``).

    Why: POC's own resources allow only FLARE's classes, so a job folder without code (what hospitals run, since
    their kits allow ``fedseg3d.``) was refused with ``ComponentNotAuthorized`` on POC; and POC turns on job log
    streaming, whose component the production allow-list does not name. With the same file as the kits, a job that
    runs on one runs on the other. Only resources: the privacy policy and budgets stay the POC runner's.

    Raises:
        FileNotFoundError: a template is missing, or POC did not write a participant's ``local/`` folder.
        ValueError: a template is not JSON or has no ``class_allow_list``; the message names the file.
    """
    for name, kind in [(layout.server_name, "server"), *((site, "site") for site in layout.site_names)]:
        template = policies_dir / kind / "resources.json"
        kit = layout.prod_dir / name
        text = template.read_text().replace(kits.WORKSPACE_PLACEHOLDER, str(kit))
        try:
            allow_list = json.loads(text).get("class_allow_list")
        except json.JSONDecodeError as err:
            raise ValueError(f"{template}: not valid JSON ({err})") from err
        if not isinstance(allow_list, list) or not allow_list:
            raise ValueError(f"{template}: field 'class_allow_list' must be a non-empty list")
        if not (kit / "local").is_dir():
            raise FileNotFoundError(f"{kit / 'local'} not found: did `nvflare poc prepare` write {name}'s kit?")
        (kit / "local" / "resources.json").write_text(text)


def prepare(
    layout: PocLayout,
    data_root: Path,
    sites: list[str],
    project_file: Path = PROJECT_FILE,
    threads_per_site: int = 1,
    privacy_budget: float = 50.0,
    privacy_delta: float = 1e-5,
    policies_dir: Path = POLICIES_DIR,
) -> None:
    """``nvflare poc prepare -i project.yml``, the production kits' resources, and each started site's data config
    and privacy budget in its ``local/``.

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
    nvflare(["poc", "prepare", "-i", str(Path(project_file).resolve()), "--force"], layout.workspace)
    save_layout(layout)
    install_production_resources(layout, policies_dir)
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


def submit_job(layout: PocLayout, job_dir: Path) -> str:
    """Submit ``job_dir`` through the admin API as the POC admin; returns the job id."""
    from nvflare.fuel.flare_api.flare_api import new_secure_session

    session = new_secure_session(ADMIN_USER, str(layout.admin_kit()), timeout=30)
    try:
        job_id = session.submit_job(str(job_dir))
    finally:
        session.close()
    log(f"submitted {job_dir.name} as job {job_id}")
    return job_id


def follow_job(layout: PocLayout, job_id: str, timeout: float, download_to: Path) -> tuple[str, Path | None]:
    """Print a job's progress until it ends, then download its results. Returns (final status, result dir)."""
    from nvflare.fuel.flare_api.flare_api import new_secure_session

    session = new_secure_session(ADMIN_USER, str(layout.admin_kit()), timeout=30)
    try:
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
            return f"TIMEOUT ({status})", None
        log(f"job {job_id} ended with status {status}")
        download_to.mkdir(parents=True, exist_ok=True)
        result_dir = Path(session.download_job_result(job_id, str(download_to)))
        log(f"results downloaded to {result_dir}")
        return status, result_dir
    finally:
        session.close()


def submit_and_wait(
    layout: PocLayout, job_dir: Path, timeout: float, download_to: Path
) -> tuple[str, str, Path | None]:
    """Submit through the admin API, follow progress, download results. Returns (job id, final status, result dir)."""
    job_id = submit_job(layout, job_dir)
    status, result_dir = follow_job(layout, job_id, timeout, download_to)
    return job_id, status, result_dir


def console_instructions(layout: PocLayout, job_dir: Path) -> str:
    """What a user types to work with a POC left running: the admin console, a submission, and the stop command."""
    bin_dir = Path(sys.executable).parent
    console = layout.admin_kit() / "startup" / "fl_admin.sh"
    # fl_admin.sh runs `python3`: this environment's, so that the console has FLARE.
    workspace = shlex.quote(str(layout.workspace))
    return "\n".join(
        [
            f"POC is still running (server port {layout.port}, workspace {layout.workspace}).",
            "Admin console (log in as admin@consortium.org):",
            f"    PATH={shlex.quote(str(bin_dir))}:$PATH {shlex.quote(str(console))}",
            "In the console, submit a job folder (no build needed: POC allows the fedseg3d package) and follow it:",
            f"    submit_job {job_dir.resolve()}",
            "    list_jobs",
            "Stop POC (server, sites, job processes; waits until the port is free):",
            f"    fedseg3d poc stop --workspace {workspace}",
        ]
    )


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--job", default="unet3d_fedbn", help="job folder name under --jobs-dir")
    parser.add_argument("--jobs-dir", type=Path, default=JOBS_DIR, help="where the job folders are (default: jobs)")
    parser.add_argument("--project", type=Path, default=PROJECT_FILE, help="FLARE project file (participants, port)")
    parser.add_argument("--sites", type=int, default=0, help="number of sites to start (default: all in project.yml)")
    parser.add_argument("--data", type=Path, default=Path("data") / "synthetic", help="one folder per site")
    parser.add_argument(
        "--workspace", type=Path, default=DEFAULT_WORKSPACE, help="POC workspace (default: workspace/poc)"
    )
    parser.add_argument("--set", action="append", default=[], dest="overrides", metavar="NAME=VALUE")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds to wait for the job")
    parser.add_argument("--threads-per-site", type=int, default=1)
    parser.add_argument(
        "--keep-running",
        action="store_true",
        help="leave POC running after the job; prints the console and stop commands",
    )
    parser.add_argument(
        "--privacy-budget", type=float, default=50.0, help="epsilon budget written to every site (DP jobs charge it)"
    )
    parser.add_argument("--privacy-delta", type=float, default=1e-5, help="delta of every site's privacy budget")
    args = parser.parse_args(argv)

    overrides = dict(parse_override(o) for o in args.overrides)
    workspace = args.workspace.resolve()
    layout = load_layout(workspace, args.project)
    sites = layout.site_names[: args.sites] if args.sites else layout.site_names
    prepare(
        layout,
        args.data,
        sites,
        project_file=args.project,
        threads_per_site=args.threads_per_site,
        privacy_budget=args.privacy_budget,
        privacy_delta=args.privacy_delta,
        policies_dir=args.project.parent / "site_policies",
    )
    overrides.setdefault("sites_per_round", len(sites))
    (job_dir,) = build_jobs(
        args.jobs_dir, workspace / "jobs", [args.job], overrides, min_clients=len(sites), with_code=False
    )
    # SIGTERM (e.g. from a CI runner) takes the same clean-up path as Ctrl-C.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    started = time.perf_counter()
    status = "NOT RUN"
    try:
        start(layout, sites)
        job_id, status, result_dir = submit_and_wait(layout, job_dir, args.timeout, workspace / "results")
        if result_dir is not None:
            print()
            print(report(result_dir))
            print(f"\nJob {job_id}: {status}. Results: {result_dir}")
            print(f"TensorBoard: tensorboard --logdir {result_dir}")
    except KeyboardInterrupt:
        log("interrupted")
        status = "INTERRUPTED"
    finally:
        if args.keep_running and status != "INTERRUPTED":
            print()
            print(console_instructions(layout, args.jobs_dir / args.job))
        else:
            stop(layout)
    log(f"total {time.perf_counter() - started:.0f} s")
    return 0 if status == "FINISHED:COMPLETED" else 1


if __name__ == "__main__":
    raise SystemExit(main())
