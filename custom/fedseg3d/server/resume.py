"""Continue a run after a server restart: build the job that picks up after its last completed round, and submit it.

FLARE 2.9 has no job resume: a server that restarts does not continue the job it was running. Every stock job saves
its round state on the server after each completed round (``fedseg3d.server.round_state``, in
``<server workspace>/fedseg3d_state/<run>/``). This command reads that state and builds the continuation job: the
run's own job as first submitted (same config), starting from the last global model (``initial_checkpoint``), at
the round after the last completed one (``start_round``), for the rounds left, under the same ``run_name`` (so the
server keeps saving into the same state, and every site finds its own state: FedBN batch norm, its best models).
Then it submits the job through the admin API with an explicit admin startup kit. At most the round that was running
when the server stopped is lost.

Run it on the server's machine (the checkpoint path it writes into the job is the state's path there). The run is
the job's ``run_name`` knob, or the id of the run's first job when that was empty. ``--dry-run`` prints the plan and
writes the job folder without submitting it.

Writes: the continuation job folder under ``--out`` (default ``build/resume``).

Examples:
    fedseg3d resume --run 3f2a...                  # the POC that `fedseg3d poc run --keep-running` started
    fedseg3d resume --run liver-2026 --server-workspace /opt/flare/server --startup-kit /opt/flare/admin@org
    fedseg3d resume --run liver-2026 --poc-workspace workspace/poc --dry-run
"""

from __future__ import annotations

import argparse
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from fedseg3d.server import run_state
from fedseg3d.tools.build_jobs import apply_overrides
from fedseg3d.tools.job_config import learner_args

SERVER_CONFIG = Path("app") / "config" / "config_fed_server.json"
CLIENT_CONFIG = Path("app") / "config" / "config_fed_client.json"


@dataclass
class Continuation:
    """The job that continues a run: its folder and the rounds it runs (0-based ``start_round``)."""

    state: dict
    state_dir: Path
    job_dir: Path
    start_round: int
    num_rounds: int

    def describe(self) -> str:
        last = self.state["last_round"] + 1
        total = self.state["total_rounds"]
        lines = [
            f"run {self.state['run']}: {last} of {total} rounds completed; state in {self.state_dir}",
            f"  global model after round {last}: {self.state['global_model']}",
        ]
        best = self.state.get("best")
        if best:
            lines.append(f"  best global model: {best['file']} (key metric {best['metric']:.4f})")
        lines.append(f"  jobs so far: {', '.join(job['job_id'] for job in self.state['jobs'])}")
        if self.num_rounds:
            lines.append(
                f"continuation job {self.job_dir}: rounds {self.start_round + 1}-{total} (start_round "
                f"{self.start_round}, num_rounds {self.num_rounds}), from {self.state['global_model']}"
            )
        return "\n".join(lines)


def resume_blockers(job_dir: Path) -> list[str]:
    """Settings a continuation job would get wrong, with why (empty: it can be resumed).

    ``ResilientFedAvg`` sends the sites the run's round count (``start_round + num_rounds``) and the run's round
    numbers, so a learning-rate schedule carries on where it was. A DP-SGD ``target_epsilon`` is still refused: its
    noise is calibrated once per job, and a continuation would calibrate again against a ledger already charged.
    """
    args = learner_args(job_dir)
    problems = []
    if (args.get("dp_sgd") or {}).get("target_epsilon"):
        problems.append("dp_sgd.target_epsilon calibrates its noise once per job; a continuation would calibrate again")
    return problems


def set_start_round(config_path: Path, start_round: int) -> None:
    """Set ``start_round`` of the job's FedAvg workflow (the workflow whose arguments have ``num_rounds``).

    Raises:
        ValueError: no such workflow, naming the file.
    """
    config = json.loads(config_path.read_text())
    workflows = [w for w in config.get("workflows", []) if "num_rounds" in (w.get("args") or {})]
    if len(workflows) != 1:
        raise ValueError(f"{config_path}: expected one workflow with a 'num_rounds' argument, found {len(workflows)}")
    workflows[0]["args"]["start_round"] = start_round
    config_path.write_text(json.dumps(config, indent=2) + "\n")


def build_continuation(state_dir: Path, out_dir: Path) -> Continuation:
    """Write the job that continues the run in ``state_dir`` under ``out_dir``.

    Raises:
        FileNotFoundError, ValueError: no usable state (see ``run_state.read_state``), or a job it cannot resume.
    """
    state_dir = Path(state_dir).resolve()
    state = run_state.read_state(state_dir)
    start_round, num_rounds = run_state.rounds_left(state)
    source = state_dir / run_state.JOB_DIR
    meta = json.loads((source / "meta.json").read_text())
    name = f"{meta.get('name', state['run'])}_from_round_{start_round + 1}"
    job_dir = Path(out_dir).resolve() / name
    continuation = Continuation(state, state_dir, job_dir, start_round, num_rounds)
    if num_rounds == 0:
        return continuation
    blockers = resume_blockers(source)
    if blockers:
        raise ValueError(f"{source}: cannot continue this job: {'; '.join(blockers)}")
    if job_dir.exists():
        shutil.rmtree(job_dir)
    shutil.copytree(source, job_dir)
    meta["name"] = name
    (job_dir / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    overrides = {
        "run_name": state["run"],
        "initial_checkpoint": str(state_dir / state["global_model"]),
        "num_rounds": num_rounds,
    }
    apply_overrides(job_dir / "app" / "config", overrides)
    set_start_round(job_dir / SERVER_CONFIG, start_round)
    return continuation


def submit(job_dir: Path, admin_kit: Path, user: str) -> str:
    """Submit ``job_dir`` through the admin API with the startup kit in ``admin_kit``; returns the job id."""
    from nvflare.fuel.flare_api.flare_api import new_secure_session

    session = new_secure_session(user, str(admin_kit), timeout=30)
    try:
        return session.submit_job(str(job_dir))
    finally:
        session.close()


def locate(args: argparse.Namespace) -> tuple[Path, Path | None, str]:
    """(state folder, admin kit, admin user) from the command line; what is not given comes from the POC workspace.

    Raises:
        FileNotFoundError, ValueError: a POC workspace is needed and has no ``fedseg3d_poc.json``.
    """
    from fedseg3d.poc.control import ADMIN_USER, find_workspace, layout_of

    user = args.user or ADMIN_USER
    need_state = args.state is None and args.server_workspace is None
    need_kit = args.startup_kit is None and not args.dry_run
    layout = layout_of(find_workspace(args.poc_workspace)) if need_state or need_kit else None
    if args.state is not None:
        state_dir = args.state
    else:
        server_workspace = args.server_workspace or layout.prod_dir / layout.server_name
        state_dir = run_state.run_state_dir(server_workspace, args.run)
    admin_kit = args.startup_kit or (layout.admin_kit(user) if layout is not None else None)
    return Path(state_dir), admin_kit, user


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--run", required=True, help="the run: its run_name knob, or its first job's id")
    parser.add_argument("--server-workspace", type=Path, default=None, help="the server's FLARE workspace (kit)")
    parser.add_argument("--state", type=Path, default=None, help="the run's state folder, if not under the workspace")
    parser.add_argument("--startup-kit", type=Path, default=None, help="an admin startup kit (folder with startup/)")
    parser.add_argument("--user", default=None, help="the admin user of the startup kit (default: the POC admin)")
    parser.add_argument(
        "--poc-workspace", type=Path, default=None, help="a POC started by fedseg3d (default: $NVFLARE_POC_WORKSPACE)"
    )
    parser.add_argument("--out", type=Path, default=Path("build") / "resume", help="where the job folder is written")
    parser.add_argument("--dry-run", action="store_true", help="write and print the plan, submit nothing")
    args = parser.parse_args(argv)
    try:
        state_dir, admin_kit, user = locate(args)
        continuation = build_continuation(state_dir, args.out)
    except (OSError, ValueError) as err:
        parser.exit(1, f"{parser.prog}: {err}\n")
    print(continuation.describe(), flush=True)
    if continuation.num_rounds == 0:
        print(f"run {continuation.state['run']}: every round is done; nothing to resume")
        return 0
    if args.dry_run:
        print("dry run: not submitted")
        return 0
    job_id = submit(continuation.job_dir, admin_kit, user)
    print(f"submitted {continuation.job_dir.name} as job {job_id}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
