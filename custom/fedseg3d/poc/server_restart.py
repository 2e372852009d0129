"""Kill a POC server the hard way and wait for it to come back: what the server-restart test and benchmark do.

POC starts the server under FLARE's watchdog (``startup/sub_start.sh``), which starts it again within about 5 s when
its process disappears without a ``shutdown.fl`` request. Killing the server process and its job process with SIGKILL
is what a crash, an out-of-memory kill or a power cut does to them; the watchdog's restart stands in for the admin (or
systemd) starting the server again. The sites keep running and register again with the new server process.
"""

from __future__ import annotations

import time
from pathlib import Path

import psutil

from fedseg3d.poc.control import ADMIN_USER, PocLayout, log

PID_FILE = "pid.fl"  # where FLARE's watchdog records the server process it started


def server_pid(layout: PocLayout) -> int | None:
    """The PID of the running server process, from the watchdog's ``pid.fl`` (None when it is not running)."""
    path = layout.prod_dir / layout.server_name / PID_FILE
    try:
        pid = int(path.read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if psutil.pid_exists(pid) else None


def kill_server(layout: PocLayout) -> list[int]:
    """SIGKILL the server process and its job processes, by PID; returns the PIDs killed.

    Raises:
        RuntimeError: no server process is running.
    """
    pid = server_pid(layout)
    if pid is None:
        raise RuntimeError(f"no server running: {layout.prod_dir / layout.server_name / PID_FILE} names no process")
    server = psutil.Process(pid)
    victims = [server, *server.children(recursive=True)]
    for proc in victims:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            continue
    psutil.wait_procs(victims, timeout=10)
    log(f"killed the server process {pid} and its job processes {[p.pid for p in victims[1:]]} with SIGKILL")
    return [p.pid for p in victims]


def wait_for_server(layout: PocLayout, sites: list[str], old_pid: int, timeout: float = 120) -> float:
    """Wait until a new server process answers the admin API with every site in ``sites`` connected.

    Returns:
        The seconds it took.

    Raises:
        TimeoutError: not back within ``timeout`` seconds, naming the sites that were missing.
    """
    from nvflare.fuel.flare_api.flare_api import new_secure_session

    started = time.perf_counter()
    deadline, connected = time.monotonic() + timeout, []
    while time.monotonic() < deadline:
        pid = server_pid(layout)
        if pid is not None and pid != old_pid:
            try:
                session = new_secure_session(ADMIN_USER, str(layout.admin_kit()), timeout=10)
            except Exception:  # the admin port is not listening yet: FLARE raises several kinds
                time.sleep(1)
                continue
            try:
                connected = [client.name for client in session.get_connected_client_list()]
            finally:
                session.close()
            if set(sites) <= set(connected):
                seconds = time.perf_counter() - started
                log(f"server back (process {pid}) with sites {sorted(connected)} after {seconds:.1f} s")
                return seconds
        time.sleep(1)
    missing = sorted(set(sites) - set(connected))
    raise TimeoutError(f"server not back with sites {missing} within {timeout:.0f} s; see {Path(layout.prod_dir)}")
