"""The round state a run keeps outside FLARE's job folder, so that a run survives a server restart.

FLARE 2.9 cannot resume a job: ``ServerEngine.persist_components`` does nothing since high availability was removed,
and a server that restarts marks its running job as ended. What it can do is start a *new* job from an earlier global
model (the persistor's ``source_ckpt_file_full_name``, our ``initial_checkpoint``) at a given round (``FedAvg``'s
``start_round``). This module is the rest: a folder per run that the server rewrites after every completed round,
and that ``fedseg3d resume`` reads to build the continuation job.

Layout of ``<workspace>/fedseg3d_state/<run>/`` (``workspace``: the server's or a site's FLARE workspace; ``run``:
the job's ``run_name`` knob, or the first job's id when it is empty)::

    state.json                        what the files below are; written last, so it only names finished files
    job/                              the run's first job as submitted (meta.json, app/config/*.json)
    global_model_round_0003.pt        the global model after the last completed round (FLARE checkpoint format)
    best_global_model_round_0002.pt   the server's best global model so far (key metric), when there is one
    records/<job id>/*.jsonl          each job's server records (contributions, update audit, ...)

Every file is written to a temporary name and renamed (``os.replace``), and ``state.json`` is renamed only after the
files it names: a server killed mid-write leaves the previous, complete state. No nvflare import: the resume command
and the tests read this without a federation.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

STATE_ROOT = "fedseg3d_state"
STATE_FILE = "state.json"
JOB_DIR = "job"
RECORDS_DIR = "records"
FORMAT = 1
_RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def check_run_name(run_name: str) -> str:
    """``run_name`` if it can name a folder (letters, digits, ``.``, ``_``, ``-``; not starting with a dot).

    Raises:
        ValueError: naming the field and what is allowed.
    """
    if not isinstance(run_name, str) or not _RUN_NAME.match(run_name):
        raise ValueError(
            f"run_name must be 1-128 letters, digits, '.', '_' or '-' (not starting with '.' or '-'), got {run_name!r}"
        )
    return run_name


def run_state_dir(workspace_root: str | os.PathLike, run_name: str) -> Path:
    """``<workspace_root>/fedseg3d_state/<run_name>``: where a participant keeps a run's state across jobs."""
    return Path(workspace_root) / STATE_ROOT / check_run_name(run_name)


def atomic_write(path: Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a temporary file next to ``path``, flush it to disk and rename it to ``path``.

    Why: a process killed mid-write (the very case this state is for) must leave either the old file or the new
    one, never a truncated file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with tmp.open("rb+") as stream:
            os.fsync(stream.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_write_json(path: Path, data: dict[str, Any]) -> Path:
    """``data`` as indented JSON at ``path``, atomically."""
    return atomic_write(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2) + "\n"))


def atomic_copy(source: Path, target: Path) -> Path:
    """Copy ``source`` to ``target`` atomically."""
    return atomic_write(target, lambda tmp: shutil.copyfile(source, tmp))


def copy_tree_atomically(source: Path, target: Path) -> None:
    """Copy the files of ``source`` into ``target``, each atomically (a folder of records, mid-run)."""
    for path in sorted(Path(source).rglob("*")):
        if path.is_file():
            atomic_copy(path, Path(target) / path.relative_to(source))


def model_file_name(kind: str, round_: int) -> str:
    """``global_model_round_0003.pt``: one file per round, so ``state.json`` can switch to it in one rename."""
    return f"{kind}_round_{round_:04d}.pt"


def read_state(state_dir: Path) -> dict[str, Any]:
    """The run's ``state.json``, checked: the files it names exist.

    Raises:
        FileNotFoundError: no state (no round of this run completed on this server), or a file it names is missing.
        ValueError: the file is not this format; the message names the file and field.
    """
    path = Path(state_dir) / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: no round of this run completed on this server (or --state points elsewhere)"
        )
    try:
        state = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err
    if state.get("format") != FORMAT:
        raise ValueError(f"{path}: field 'format' must be {FORMAT}, got {state.get('format')!r}")
    for field in ("run", "last_round", "total_rounds", "global_model", "jobs"):
        if field not in state:
            raise ValueError(f"{path}: field '{field}' is missing")
    for name in [state["global_model"], (state.get("best") or {}).get("file")]:
        if name and not (path.parent / name).is_file():
            raise FileNotFoundError(f"{path}: names {name}, which is not in {path.parent}")
    if not (path.parent / JOB_DIR / "meta.json").is_file():
        raise FileNotFoundError(f"{path.parent / JOB_DIR}/meta.json not found: the run's job was not recorded")
    return state


def new_state(run: str, total_rounds: int, first_round: int) -> dict[str, Any]:
    """The state of a run before its first round completes."""
    return {
        "format": FORMAT,
        "run": run,
        "first_round": first_round,
        "total_rounds": total_rounds,
        "last_round": None,
        "global_model": None,
        "best": None,
        "jobs": [],
        "updated": time.time(),
    }


def rounds_left(state: dict[str, Any]) -> tuple[int, int]:
    """``(start_round, num_rounds)`` of the job that continues ``state``: the round after the last completed one,
    and the rounds still to run (0 when the run's training is complete)."""
    start = int(state["last_round"]) + 1
    return start, max(int(state["total_rounds"]) - start, 0)


def prune_models(state_dir: Path, keep: set[str]) -> None:
    """Delete the round model files that ``state.json`` no longer names (after it was rewritten)."""
    for path in Path(state_dir).glob("*_round_*.pt"):
        if path.name not in keep:
            path.unlink(missing_ok=True)
