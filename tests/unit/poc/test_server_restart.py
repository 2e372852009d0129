"""Finding the POC server process to kill: the PID FLARE's watchdog records in the server's pid.fl."""

from __future__ import annotations

import os

import psutil
import pytest

from fedseg3d.poc.control import load_layout
from fedseg3d.poc.server_restart import PID_FILE, kill_server, server_pid


@pytest.fixture
def layout(tmp_path):
    layout = load_layout(tmp_path / "poc")
    (layout.prod_dir / layout.server_name).mkdir(parents=True)
    return layout


def test_the_server_is_the_live_process_the_watchdog_recorded(layout):
    (layout.prod_dir / layout.server_name / PID_FILE).write_text(f"{os.getpid()}\n")
    assert server_pid(layout) == os.getpid()


def test_a_stale_or_missing_pid_file_means_no_server(layout):
    assert server_pid(layout) is None
    dead = max(psutil.pids()) + 100_000
    (layout.prod_dir / layout.server_name / PID_FILE).write_text(str(dead))
    assert server_pid(layout) is None
    with pytest.raises(RuntimeError, match="no server running"):
        kill_server(layout)
