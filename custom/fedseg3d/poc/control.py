"""Stop a FLARE POC federation that `fedseg3d poc run` prepared, however it was left: what `fedseg3d poc stop` runs.

A POC left running (``--keep-running``), or interrupted hard enough that the runner could not clean up, leaves a
server, sites, job processes and watchdog shells behind, and port 8002 bound. This finds the POC workspace, runs
``nvflare poc stop`` with the same environment the runner used (the POC workspace and its private HOME), kills by
PID whatever still runs from that workspace, and waits until the server's port is free.

The workspace is ``--workspace`` if given, else ``$NVFLARE_POC_WORKSPACE``, else ``workspace/poc`` (where
``make poc`` puts it). It must hold the record the runner writes when it prepares POC (``fedseg3d_poc.json``: the
project, hence the server's port).

Writes nothing; it prints what it stopped and exits 0 once no POC process is left and the port is free.

Example:
    fedseg3d poc stop                                # the POC that `make poc` started
    fedseg3d poc stop --workspace /tmp/my-poc        # one started with `fedseg3d poc run --workspace /tmp/my-poc`
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import yaml

import fedseg3d

ADMIN_USER = "admin@consortium.org"
DEFAULT_WORKSPACE = Path("workspace") / "poc"
# Relative to the repository checkout the command runs from, as `fedseg3d build-jobs` reads `jobs/`.
PROJECT_FILE = Path("provisioning") / "project.yml"
POC_WORKSPACE_ENV = "NVFLARE_POC_WORKSPACE"
# What the runner records about the POC it prepared, so that stopping needs neither the project file nor the runner.
STATE_FILE = "fedseg3d_poc.json"


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


def load_layout(workspace: Path, project_file: Path = PROJECT_FILE) -> PocLayout:
    """The layout POC will have in ``workspace`` for ``project_file``."""
    return PocLayout(Path(workspace).resolve(), yaml.safe_load(Path(project_file).read_text()))


def save_layout(layout: PocLayout) -> Path:
    """Record the project in the workspace, for :func:`layout_of` (``fedseg3d poc stop``)."""
    layout.workspace.mkdir(parents=True, exist_ok=True)
    path = layout.workspace / STATE_FILE
    path.write_text(json.dumps({"project": layout.project}, indent=2) + "\n")
    return path


def layout_of(workspace: Path) -> PocLayout:
    """The layout of a POC the runner prepared in ``workspace``.

    Raises:
        FileNotFoundError: the workspace holds no ``fedseg3d_poc.json`` (no POC prepared there by fedseg3d).
        ValueError: the file is not the runner's record.
    """
    path = Path(workspace).resolve() / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: no POC was prepared by `fedseg3d poc run` in {path.parent}; pass --workspace"
        )
    project = json.loads(path.read_text()).get("project")
    if not isinstance(project, dict) or not project.get("name") or not isinstance(project.get("participants"), list):
        raise ValueError(f"{path}: field 'project' must be the FLARE project (with 'name' and 'participants')")
    return PocLayout(path.parent, project)


def find_workspace(given: Path | None) -> Path:
    """``--workspace``, else ``$NVFLARE_POC_WORKSPACE``, else ``workspace/poc``."""
    if given is not None:
        return Path(given).resolve()
    return Path(os.environ.get(POC_WORKSPACE_ENV) or DEFAULT_WORKSPACE).resolve()


def nvflare_env(workspace: Path) -> dict[str, str]:
    """The environment of every POC process started from ``workspace``.

    POC writes the active admin kit into ~/.nvflare; a private HOME keeps it from re-pointing the user's. The
    directory this fedseg3d package is imported from goes first on PYTHONPATH, so the server and sites (and the job
    processes they start) run the same package as this command: jobs without code name its classes.
    """
    home = workspace / ".home"
    home.mkdir(parents=True, exist_ok=True)
    package_root = str(Path(fedseg3d.__file__).resolve().parents[1])
    python_path = os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH", "")) if p)
    return dict(os.environ, NVFLARE_POC_WORKSPACE=str(workspace), HOME=str(home), PYTHONPATH=python_path)


def nvflare(args: list[str], workspace: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run this environment's ``nvflare`` CLI for the POC in ``workspace``; raises RuntimeError with its output."""
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


def stop(layout: PocLayout, grace: float = 30) -> None:
    """``nvflare poc stop``, then make sure nothing is left: kill stragglers by PID and wait for the port.

    Raises:
        RuntimeError: the port is still bound after the grace period (another server holds it).
    """
    log(f"stopping POC in {layout.workspace}")
    try:
        nvflare(["poc", "stop"], layout.workspace, timeout=60)
    except (RuntimeError, subprocess.TimeoutExpired) as err:
        log(f"poc stop reported a problem ({err}); killing remaining processes")
    deadline = time.monotonic() + grace
    while poc_processes(layout.workspace) and time.monotonic() < deadline:
        time.sleep(1)
    for proc in poc_processes(layout.workspace):
        log(f"killing leftover process {proc.pid}")
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            continue
    while port_in_use(layout.port) and time.monotonic() < deadline + 10:
        time.sleep(1)
    if port_in_use(layout.port):
        raise RuntimeError(f"port {layout.port} still bound after stopping POC in {layout.workspace}")
    log(f"POC stopped: no process left, port {layout.port} free")


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--workspace",
        type=Path,
        default=None,
        help="the POC workspace (default: $NVFLARE_POC_WORKSPACE, workspace/poc)",
    )
    parser.add_argument("--grace", type=float, default=30, help="seconds to let POC stop before killing by PID")
    args = parser.parse_args(argv)
    try:
        layout = layout_of(find_workspace(args.workspace))
        stop(layout, grace=args.grace)
    except (OSError, ValueError, RuntimeError) as err:
        parser.exit(1, f"{parser.prog}: {err}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
