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


@pytest.mark.parametrize("own_session", [False, True], ids=["same-group", "own-session"])
def test_timeout_kills_the_forked_children_too(tmp_path, own_session):
    pid_file = tmp_path / "child.pid"
    # The parent forks a child that outlives it unless the whole group is killed (as FLARE's simulator forks), or
    # one in a session of its own that only a walk of the process tree finds (as FLARE's simulator_worker).
    script = (
        "import subprocess, sys, time; "
        f"child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'], "
        f"start_new_session={own_session}); "
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


def test_exit_code_is_returned_and_output_goes_to_the_given_file(tmp_path):
    assert run_process_group([sys.executable, "-c", "raise SystemExit(3)"], dict(os.environ), timeout=30) == 3
    log = tmp_path / "out.log"
    with log.open("w") as stream:
        script = "import sys; print('to stdout'); print('to stderr', file=sys.stderr)"
        assert run_process_group([sys.executable, "-c", script], dict(os.environ), timeout=30, stdout=stream) == 0
    assert log.read_text().split() == ["to", "stdout", "to", "stderr"]


def test_sigterm_to_the_caller_kills_the_forked_children_too(tmp_path):
    """``kill <benchmark pid>`` used to leave the simulator's own session running: the caller must take it down."""
    pid_file = tmp_path / "child.pid"
    grandchild = (
        "import subprocess, sys, time; "
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'], start_new_session=True); "
        f"open({str(pid_file)!r}, 'w').write(str(child.pid)); time.sleep(60)"
    )
    caller = (
        "import os, sys; from fedseg3d.tools.simulate import run_process_group; "
        f"run_process_group([sys.executable, '-c', {grandchild!r}], dict(os.environ), timeout=60)"
    )
    process = subprocess.Popen([sys.executable, "-c", caller])
    deadline = time.monotonic() + 20
    while not pid_file.is_file() or not pid_file.read_text():
        assert time.monotonic() < deadline, "the forked child never started"
        time.sleep(0.1)
    process.terminate()
    assert process.wait(timeout=20) == 143
    child = int(pid_file.read_text())
    deadline = time.monotonic() + 5
    while running(child):
        if time.monotonic() > deadline:
            os.kill(child, 9)
            pytest.fail(f"forked child {child} survived SIGTERM to the caller")
        time.sleep(0.1)
