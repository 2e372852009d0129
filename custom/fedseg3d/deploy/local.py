"""Run provisioned startup kits on this machine the way hospitals run them: what `make deploy-local` does.

Each participant is started with its own kit's ``startup/sub_start.sh --once`` (the script ``start.sh`` wraps, minus
its restart loop, so the process we start *is* the FLARE process and can be stopped by its PID), in a new session
so its job processes can be stopped with it. The consortium admin then works only through the admin API
(``nvflare.fuel.flare_api``) with the admin's kit: check that the sites are connected, submit a job, follow it,
download the results. Everything started here is stopped in a ``finally`` by process group, and the port is
waited on until it is free.

Writes, under ``--workspace``: ``provision/`` (fresh signed kits every run, so privacy ledgers start empty),
``jobs/`` (the job built without code, selecting the sites' DP scope) and ``results/`` (the downloaded job result).

Example:
    fedseg3d deploy-local [--sites 4] [--data data/synthetic] [--workspace build/deploy-local] [--port 8002]
        [--job unet3d_fedbn] [--set num_rounds=2 ...] [--timeout 1800] [--keep-running]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import yaml

from fedseg3d.deploy import kits
from fedseg3d.deploy.site_privacy import DP_SCOPE

ADMIN_USER = "admin@consortium.org"
DONE_PREFIX = "FINISHED"


def log(message: str) -> None:
    print(f"[deploy {time.strftime('%H:%M:%S')}] {message}", flush=True)


def port_in_use(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def processes_using(path: Path) -> list[psutil.Process]:
    """Processes whose command line mentions ``path`` (participants and their job processes use their kit path)."""
    marker, found = str(Path(path).resolve()), []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            parts = proc.info["cmdline"] or []
            if proc.pid != os.getpid() and any(marker + os.sep in p or p.endswith(marker) for p in parts):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def free_port() -> int:
    """A port nothing listens on now, so a test deployment can run beside POC (which uses 8002)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def project_copy(project_file: Path, out_file: Path, port: int | None = None, name: str | None = None) -> Path:
    """Write a copy of a project file with another server port and/or project name (tests, parallel runs)."""
    project = kits.load_project(project_file)
    if name:
        project["name"] = name
    if port:
        for server in kits.participants(project, "server"):
            server["fed_learn_port"] = port
    out_file.parent.mkdir(parents=True, exist_ok=True)
    out_file.write_text(yaml.safe_dump(project, sort_keys=False))
    return out_file


def server_port(prod_dir: Path) -> int:
    """The port the server kit listens on (server and admin share it in FLARE 2.9)."""
    config = json.loads((Path(prod_dir) / "server" / "startup" / "fed_server.json").read_text())
    return int(config["servers"][0]["service"]["target"].rsplit(":", 1)[1])


class LocalDeployment:
    """Start and stop the participants of one ``prod_NN`` folder on localhost; talk to it through the admin API."""

    def __init__(self, prod_dir: Path, python_bin: Path | None = None) -> None:
        self.prod_dir = Path(prod_dir).resolve()
        self.port = server_port(self.prod_dir)
        # sub_start.sh runs `python3` from PATH: put this environment's interpreter first, so the site runs with the
        # FLARE and fedseg3d installed here (a hospital does the same by activating its environment).
        self.bin_dir = Path(python_bin or sys.executable).parent
        self.processes: dict[str, subprocess.Popen] = {}

    def kit(self, name: str) -> Path:
        return self.prod_dir / name

    def start(self, name: str, kit: Path | None = None) -> subprocess.Popen:
        """Start one participant from its kit (``kit`` overrides where the kit is, e.g. another prod_NN)."""
        kit = Path(kit or self.kit(name)).resolve()
        script = kit / "startup" / "sub_start.sh"
        if not script.is_file():
            raise FileNotFoundError(f"{script} not found: is {kit} a provisioned startup kit?")
        env = dict(os.environ, PATH=f"{self.bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
        env.pop("NVFL_WORKSPACE", None)
        console = (kit / "console.log").open("ab")
        process = subprocess.Popen(
            ["bash", str(script), "--once"], cwd=kit, env=env, stdout=console, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        console.close()
        self.processes[name] = process
        return process

    def start_server(self, timeout: float = 60) -> None:
        if port_in_use(self.port):
            raise RuntimeError(f"port {self.port} is already in use: is another FLARE server running?")
        self.start("server")
        deadline = time.monotonic() + timeout
        while not port_in_use(self.port):
            if self.processes["server"].poll() is not None:
                raise RuntimeError(f"server exited ({self.processes['server'].returncode}): see {self.log('server')}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"server did not open port {self.port} within {timeout:.0f} s")
            time.sleep(0.5)

    def log(self, name: str) -> Path:
        return self.kit(name) / "log.txt"

    def session(self, user: str = ADMIN_USER, kit: Path | None = None, timeout: float = 30):
        """An admin API session with ``user``'s kit (the caller closes it)."""
        from nvflare.fuel.flare_api.flare_api import new_secure_session

        return new_secure_session(user, str(kit or self.kit(user)), timeout=timeout)

    @staticmethod
    def connected_sites(session) -> set[str]:
        return {client.name for client in session.get_system_info().client_info}

    def wait_for_sites(self, session, sites: list[str], timeout: float = 90) -> float:
        """Wait until the server lists every site in ``sites``; returns the seconds it took."""
        started, deadline = time.monotonic(), time.monotonic() + timeout
        while True:
            missing = set(sites) - self.connected_sites(session)
            if not missing:
                return time.monotonic() - started
            for site in missing:
                process = self.processes.get(site)
                if process is not None and process.poll() is not None:
                    raise RuntimeError(f"{site} exited ({process.returncode}): see {self.kit(site) / 'console.log'}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"sites {sorted(missing)} not registered with the server after {timeout:.0f} s")
            time.sleep(1)

    def stop(self, name: str, grace: float = 10) -> None:
        """Stop one participant and every process it started: SIGTERM, then SIGKILL after ``grace``.

        Job processes may run in a session of their own (FLARE's launcher can detach them), so they are found as
        descendants of the participant's process, by PID, before anything is signalled.
        """
        process = self.processes.pop(name, None)
        if process is None:
            return
        try:
            family = [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            family = []
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        for member in family:
            with contextlib.suppress(psutil.NoSuchProcess):
                member.terminate()
        _, alive = psutil.wait_procs(family, timeout=grace)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        for member in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                member.kill()
        psutil.wait_procs(alive, timeout=grace)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=grace)  # reap it

    def stop_all(self, timeout: float = 30) -> None:
        for name in [n for n in self.processes if n != "server"] + (["server"] if "server" in self.processes else []):
            self.stop(name)
        deadline = time.monotonic() + timeout
        while port_in_use(self.port) and time.monotonic() < deadline:
            time.sleep(0.5)
        if port_in_use(self.port):
            raise RuntimeError(f"port {self.port} still bound after stopping the deployment")


def wait_for_job(session, job_id: str, timeout: float, progress: bool = True) -> str:
    """Poll the job's status until it finishes or ``timeout`` passes (then abort it); returns the status."""
    deadline, last = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        status = session.get_job_meta(job_id).get("status", "?")
        if progress and status != last:
            log(f"job {job_id}: {status}")
            last = status
        if status.startswith(DONE_PREFIX):
            return status
        time.sleep(2)
    session.abort_job(job_id)
    return f"TIMEOUT ({last})"


AUDIT_COMPONENT = {"id": "update_audit", "path": "fedseg3d.server.update_audit.UpdateNormAudit", "args": {}}


def prepare_job(
    name: str, out_dir: Path, overrides: dict, n_sites: int, scope: str | None = DP_SCOPE, with_code: bool = False
) -> Path:
    """Build a job for the provisioned deployment.

    By default without ``app/custom`` (the sites allow only the installed fedseg3d package, no byoc), selecting the
    sites' DP privacy scope in ``meta.json``, and with the server-side ``UpdateNormAudit`` added so the downloaded
    results show what the server received.
    """
    from fedseg3d.tools.build_jobs import build_jobs

    (job_dir,) = build_jobs(Path("jobs"), out_dir, [name], overrides, min_clients=n_sites, with_code=with_code)
    meta_path = job_dir / "meta.json"
    meta = json.loads(meta_path.read_text())
    if scope:
        meta["scope"] = scope
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    server_config = job_dir / "app" / "config" / "config_fed_server.json"
    config = json.loads(server_config.read_text())
    if not any(c.get("id") == AUDIT_COMPONENT["id"] for c in config.get("components", [])):
        config.setdefault("components", []).append(AUDIT_COMPONENT)
    server_config.write_text(json.dumps(config, indent=2) + "\n")
    return job_dir


def audit_table(result_dir: Path) -> str:
    """The server's record of each received update (``UpdateNormAudit``) as a table."""
    files = sorted(Path(result_dir).rglob("received_updates.jsonl"))
    if not files:
        return f"no received_updates.jsonl under {result_dir}"
    rows = [f"{'site':<8} {'round':>5} {'kind':<12} {'values':>8} {'L2 norm':>10} {'epsilon':>8}  filters"]
    for line in files[0].read_text().splitlines():
        e = json.loads(line)
        eps = e.get("dp_meta", {}).get("dp_epsilon")
        rows.append(
            f"{e['site']:<8} {e['round']!s:>5} {e.get('data_kind')!s:<12} {e.get('num_values', 0):>8} "
            f"{e.get('l2_norm', 0.0):>10.3f} {'-' if eps is None else f'{eps:.3f}':>8}  "
            f"{','.join(e.get('filter_history', [])) or '-'}"
        )
    return "\n".join(rows)


def prepare_sites(prod_dir: Path, sites: list[str], data_root: Path) -> None:
    for site in sites:
        kits.write_site_data_config(prod_dir / site, data_root / site)


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sites", type=int, default=4)
    parser.add_argument("--data", type=Path, default=Path("data/synthetic"))
    parser.add_argument("--workspace", type=Path, default=Path("build/deploy-local"))
    parser.add_argument("--port", type=int, default=0, help="server port (default: the project file's)")
    parser.add_argument("--job", default="unet3d_fedbn")
    parser.add_argument("--set", action="append", default=[], dest="overrides", metavar="NAME=VALUE")
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--keep-running", action="store_true")
    args = parser.parse_args(argv)

    from fedseg3d.tools.build_jobs import parse_override
    from fedseg3d.tools.report import report

    workspace = args.workspace.resolve()
    project_file = kits.PROJECT_FILE
    if args.port:
        project_file = project_copy(kits.PROJECT_FILE, workspace / "project.yml", port=args.port)
    project = kits.load_project(project_file)
    sites = [p["name"] for p in kits.participants(project, "client")][: args.sites]
    # A demo workspace: start from fresh kits (and empty privacy ledgers) every run.
    shutil.rmtree(workspace / "provision", ignore_errors=True)
    log(f"provisioning {project_file} into {workspace / 'provision'}")
    prod_dir = kits.provision(project_file, workspace / "provision")
    prepare_sites(prod_dir, sites, args.data)
    overrides = dict(parse_override(o) for o in args.overrides)
    overrides.setdefault("sites_per_round", len(sites))
    job_dir = prepare_job(args.job, workspace / "jobs", overrides, len(sites))

    deployment = LocalDeployment(prod_dir)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    status = "NOT RUN"
    try:
        deployment.start_server()
        log(f"server up on port {deployment.port}; starting {', '.join(sites)}")
        for site in sites:
            deployment.start(site)
        session = deployment.session()
        try:
            took = deployment.wait_for_sites(session, sites)
            log(f"connected: {sorted(deployment.connected_sites(session))} ({took:.1f} s)")
            job_id = session.submit_job(str(job_dir))
            log(f"submitted {job_dir.name} (no custom code, scope {DP_SCOPE}) as {ADMIN_USER}: job {job_id}")
            status = wait_for_job(session, job_id, args.timeout)
            if status.startswith(DONE_PREFIX):
                result = session.download_job_result(job_id, str(workspace / "results"))
                log(f"results downloaded to {result}")
                print(audit_table(Path(result)))
                print(report(Path(result)))
        finally:
            session.close()
    except KeyboardInterrupt:
        status = "INTERRUPTED"
    finally:
        if not args.keep_running:
            deployment.stop_all()
            log("stopped every process started here; port free")
    log(f"job status: {status}")
    return 0 if status == "FINISHED:COMPLETED" else 1


if __name__ == "__main__":
    raise SystemExit(main())
