"""Run a built job in the FLARE simulator, the way FLARE's own ``SimEnv`` does (a ``simulator`` subprocess).

Writes the simulator workspace (``--workspace``): the server's global models and cross-site evaluation matrix, each
site's logs and local models; ``fedseg3d report WORKSPACE`` prints the Dice table from it.

Example:
    fedseg3d simulate build/jobs/unet3d_fedbn --sites-root data/synthetic --sites site-1,site-2 \
        --workspace workspace/sim

Exit status: 0 when the job finished; FLARE's simulator's own code when it failed (2: a fatal server error); 3 when
the simulator exited 0 but the run was cut short, which it does when every site stops (a site's config error at
start, such as a bad ``--set`` value the learner refuses): the server's ``fedseg3d/run_outcome.json`` tells, and
the message names the workflow that was aborted and where the logs are. ``make sim`` then stops before its report.

The sites find their data through ``FEDSEG3D_SITES_ROOT`` (``<root>/<site>/site.json``), since simulated sites have
no ``local/`` folder of their own.

Privacy budgets (DP jobs): simulated site workspaces are thrown away after each run, but a privacy budget must outlive
jobs. ``--privacy-dir DIR`` sets ``FEDSEG3D_PRIVACY_DIR`` so each site reads ``DIR/<site>/privacy_budget.json`` and
keeps its ledger beside it across runs. ``--default-budget EPSILON`` stands in for the site admin: it writes that
budget for sites that have none yet (an existing budget file is never changed). Delete ``DIR`` to start afresh.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import IO

import psutil

from fedseg3d.data.site_config import SITES_ROOT_ENV
from fedseg3d.privacy.site_budget import PRIVACY_DIR_ENV, write_site_budget
from fedseg3d.server.run_outcome import read_outcome

# Exit status when the simulator exited 0 but the job's run did not finish (FLARE's own codes are 0, 1 and 2).
NOT_COMPLETED = 3


SIMULATOR_RUN = "simulate_job"  # the run folder FLARE's simulator gives every job
RUN_OUTCOME_COMPONENT = "fedseg3d.server.run_outcome.RunOutcome"


def simulator_command(job_dir: Path, workspace: Path, sites: list[str], threads: int) -> list[str]:
    return [
        sys.executable, "-m", "nvflare.private.fed.app.simulator.simulator", str(job_dir),
        "-w", str(workspace), "-c", ",".join(sites), "-t", str(threads),
    ]  # fmt: skip


def run_simulation(
    job_dir: Path,
    workspace: Path,
    sites_root: Path,
    sites: list[str],
    threads: int | None = None,
    timeout: float | None = None,
    privacy_dir: Path | None = None,
) -> int:
    """Run the simulator to completion and return 0 only when the job finished.

    The simulator's own exit code is 0 even when the run was cut short because every site stopped (a site's config
    error at start, say); the server's run outcome (``fedseg3d.server.run_outcome``) tells, and such a run returns
    ``NOT_COMPLETED``. ``privacy_dir`` (optional) is exported as ``FEDSEG3D_PRIVACY_DIR``: where the sites' budgets
    and ledgers live.
    """
    env = dict(os.environ, **{SITES_ROOT_ENV: str(Path(sites_root).resolve())})
    if privacy_dir is not None:
        env[PRIVACY_DIR_ENV] = str(Path(privacy_dir).resolve())
    command = simulator_command(job_dir.resolve(), workspace.resolve(), sites, threads or len(sites))
    code = run_process_group(command, env, timeout)
    return code or job_outcome_code(job_dir, workspace)


def job_outcome_code(job_dir: Path, workspace: Path) -> int:
    """0 when the server says the run finished, ``NOT_COMPLETED`` (with the reason on stderr) when it says it did
    not or, for a job that records its outcome, wrote nothing; 0 for a job that does not record it (nothing to go
    by beyond the simulator's exit code)."""
    outcome = read_outcome(Path(workspace) / "server" / SIMULATOR_RUN)
    if outcome is None and not _records_outcome(job_dir):
        return 0
    if outcome is not None and outcome.get("completed"):
        return 0
    where = f"{workspace}/server/log.txt and {workspace}/<site>/log.txt"
    if outcome is None:
        why = "the server never reached the end of its run"
    else:
        cut = [w["id"] for w in outcome.get("workflows", []) if w.get("aborted")]
        why = f"the run was aborted during workflow {cut or outcome.get('workflows')}"
    print(f"fedseg3d simulate: job {Path(job_dir).name} did not finish: {why} (see {where})", file=sys.stderr)
    return NOT_COMPLETED


def _records_outcome(job_dir: Path) -> bool:
    config = Path(job_dir) / "app" / "config" / "config_fed_server.json"
    return config.is_file() and RUN_OUTCOME_COMPONENT in config.read_text()


def run_process_group(command: list[str], env: dict[str, str], timeout: float | None, stdout: IO | None = None) -> int:
    """Run ``command`` in its own process group and wait; on a timeout or any interruption kill it and every
    process it started.

    Why: the FLARE simulator forks helper processes with the same command line, and starts each site's
    ``simulator_worker`` in a process group of its own. ``subprocess.run``'s timeout kills only the direct child,
    which left those helpers running (and using the CPU) after a benchmark's timeout; killing the group alone
    leaves the workers. So the descendants are listed (``psutil``) before anything is killed, then the group and
    each of them get SIGKILL. The group has its own session, so a signal to the caller does not reach it: in the
    main thread, SIGTERM (``kill``, a CI runner stopping a job) is turned into ``SystemExit`` for the duration, so
    that it too kills them.

    Args:
        stdout: where the command's stdout and stderr go (a file opened for writing); ``None``: the caller's.

    Raises:
        subprocess.TimeoutExpired: ``timeout`` passed; every process started has been killed.
        SystemExit: the caller received SIGTERM (exit status 143); every process started has been killed.
    """
    redirect = {"stdout": stdout, "stderr": subprocess.STDOUT} if stdout is not None else {}
    process = subprocess.Popen(command, env=env, start_new_session=True, **redirect)
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm) if in_main_thread else None
    try:
        return process.wait(timeout=timeout)
    except BaseException:
        kill_process_tree(process.pid)
        process.wait()
        raise
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)


def kill_process_tree(pid: int) -> None:
    """SIGKILL ``pid``'s process group and every descendant of ``pid``, wherever its group or session is."""
    try:
        descendants = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        descendants = []
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)
    for child in descendants:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()
    psutil.wait_procs(descendants, timeout=10)


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None, prog: str | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("job_dir", type=Path)
    parser.add_argument("--sites-root", type=Path, default=Path("data/synthetic"))
    parser.add_argument("--sites", default="site-1,site-2", help="comma-separated site names")
    parser.add_argument("--workspace", type=Path, default=Path("workspace/sim"))
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--privacy-dir", type=Path, default=None, help="site budgets and ledgers (DP jobs)")
    parser.add_argument(
        "--default-budget", type=float, default=None, metavar="EPSILON",
        help="write this epsilon budget for sites under --privacy-dir that have none (never overwrites)",
    )  # fmt: skip
    parser.add_argument("--default-delta", type=float, default=1e-5, help="delta of budgets --default-budget writes")
    args = parser.parse_args(argv)
    sites = args.sites.split(",")
    if args.default_budget is not None:
        if args.privacy_dir is None:
            parser.error("--default-budget needs --privacy-dir")
        for site in sites:
            path = write_site_budget(args.privacy_dir / site, args.default_budget, args.default_delta)
            print(f"{site}: privacy budget {path}")
    code = run_simulation(
        args.job_dir, args.workspace, args.sites_root, sites, args.threads, privacy_dir=args.privacy_dir
    )
    raise SystemExit(code)


if __name__ == "__main__":
    main()
