"""A timed-out simulator run must not leave the processes it forked behind."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from fedseg3d.tools.simulate import run_process_group


def running(pid: int) -> bool:
    """Alive and not a zombie (a killed orphan may wait a moment for init to reap it)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_timeout_kills_the_forked_children_too(tmp_path):
    pid_file = tmp_path / "child.pid"
    # The parent forks a child that outlives it unless the whole group is killed (as FLARE's simulator forks).
    script = (
        "import subprocess, sys, time; "
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
        f"open({str(pid_file)!r}, 'w').write(str(child.pid)); time.sleep(60)"
    )
    started = time.monotonic()
    with pytest.raises(subprocess.TimeoutExpired):
        run_process_group([sys.executable, "-c", script], dict(os.environ), timeout=3)
    assert time.monotonic() - started < 30
    child = int(pid_file.read_text())
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if not running(child):
            break
        time.sleep(0.1)
    else:
        os.kill(child, 9)
        pytest.fail(f"forked child {child} survived the timeout")


def test_exit_code_is_returned():
    assert run_process_group([sys.executable, "-c", "raise SystemExit(3)"], dict(os.environ), timeout=30) == 3
