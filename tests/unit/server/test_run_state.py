"""The run state a server keeps for `fedseg3d resume`: atomic files, checked reads, and the continuation job."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from fedseg3d.server import resume, run_state
from fedseg3d.tools.build_jobs import build_jobs

REPO = Path(__file__).resolve().parents[3]


def test_a_write_that_fails_midway_leaves_the_previous_file(tmp_path):
    path = run_state.atomic_write_json(tmp_path / "state.json", {"last_round": 2})

    def crash(tmp: Path) -> None:
        tmp.write_text('{"last_round": 3, "trunc')
        raise KeyboardInterrupt  # a kill arrives mid-write

    with pytest.raises(KeyboardInterrupt):
        run_state.atomic_write(path, crash)
    assert json.loads(path.read_text()) == {"last_round": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"], "the temporary file must not be left behind"


@pytest.mark.parametrize("name", ["", "../x", ".hidden", "a/b", "x" * 129])
def test_a_run_name_that_is_not_a_folder_name_is_refused(name):
    with pytest.raises(ValueError, match="run_name"):
        run_state.check_run_name(name)


def write_state(state_dir: Path, job_dir: Path, last_round: int, total: int) -> dict:
    """A state as the server writes it after round ``last_round``, around a real built job."""
    shutil.copytree(job_dir, state_dir / run_state.JOB_DIR)
    model = run_state.model_file_name("global_model", last_round)
    torch.save({"model": {"w": torch.zeros(2)}}, state_dir / model)
    state = run_state.new_state("liver", total_rounds=total, first_round=0)
    state.update(last_round=last_round, global_model=model, jobs=[{"job_id": "j1", "start_round": 0}])
    run_state.atomic_write_json(state_dir / run_state.STATE_FILE, state)
    return state


@pytest.fixture
def built_job(tmp_path) -> Path:
    (job,) = build_jobs(REPO / "jobs", tmp_path / "built", ["unet3d_fedbn"], {"num_rounds": 6}, 2, with_code=False)
    return job


def test_the_continuation_starts_after_the_last_completed_round_from_its_model(tmp_path, built_job):
    state_dir = tmp_path / "server" / run_state.STATE_ROOT / "liver"
    write_state(state_dir, built_job, last_round=2, total=6)
    plan = resume.build_continuation(state_dir, tmp_path / "out")
    assert (plan.start_round, plan.num_rounds) == (3, 3)
    server = json.loads((plan.job_dir / resume.SERVER_CONFIG).read_text())
    client = json.loads((plan.job_dir / resume.CLIENT_CONFIG).read_text())
    assert server["num_rounds"] == 3 and server["run_name"] == client["run_name"] == "liver"
    assert Path(server["initial_checkpoint"]) == state_dir.resolve() / "global_model_round_0002.pt"
    (fedavg,) = [w for w in server["workflows"] if "num_rounds" in w["args"]]
    assert fedavg["args"]["start_round"] == 3
    assert json.loads((plan.job_dir / "meta.json").read_text())["name"] == "unet3d_fedbn_from_round_4"
    assert "rounds 4-6" in plan.describe()


def test_a_finished_run_has_nothing_to_resume(tmp_path, built_job):
    write_state(tmp_path / "s", built_job, last_round=5, total=6)
    plan = resume.build_continuation(tmp_path / "s", tmp_path / "out")
    assert plan.num_rounds == 0 and not plan.job_dir.exists()


def test_a_job_whose_schedule_spans_the_run_continues_it(tmp_path):
    (job,) = build_jobs(REPO / "jobs", tmp_path / "b", ["unet3d_fedbn"], {"lr_schedule": "cosine"}, 2, False)
    write_state(tmp_path / "s", job, last_round=1, total=5)
    continuation = resume.build_continuation(tmp_path / "s", tmp_path / "out")
    assert (continuation.start_round, continuation.num_rounds) == (2, 3)


def test_a_dp_sgd_job_with_a_target_epsilon_is_refused_not_silently_recalibrated(tmp_path):
    (job,) = build_jobs(REPO / "jobs", tmp_path / "b", ["unet3d_dpsgd"], {"target_epsilon": 8.0}, 2, False)
    write_state(tmp_path / "s", job, last_round=1, total=5)
    with pytest.raises(ValueError, match="target_epsilon"):
        resume.build_continuation(tmp_path / "s", tmp_path / "out")


def test_a_state_naming_a_missing_model_is_refused_with_the_file(tmp_path, built_job):
    state = write_state(tmp_path / "s", built_job, last_round=1, total=5)
    (tmp_path / "s" / state["global_model"]).unlink()
    with pytest.raises(FileNotFoundError, match="global_model_round_0001.pt"):
        run_state.read_state(tmp_path / "s")


def test_no_state_says_no_round_completed(tmp_path):
    with pytest.raises(FileNotFoundError, match="no round of this run completed"):
        run_state.read_state(tmp_path)


def test_dry_run_prints_the_plan_and_submits_nothing(tmp_path, built_job, capsys):
    server = tmp_path / "server"
    write_state(run_state.run_state_dir(server, "liver"), built_job, last_round=0, total=3)
    argv = ["--run", "liver", "--server-workspace", str(server), "--out", str(tmp_path / "out"), "--dry-run"]
    assert resume.main(argv) == 0
    out = capsys.readouterr().out
    assert "1 of 3 rounds completed" in out and "rounds 2-3" in out and "not submitted" in out


def test_prune_keeps_only_what_the_state_names(tmp_path):
    for name in ("global_model_round_0001.pt", "global_model_round_0002.pt", "best_global_model_round_0001.pt"):
        (tmp_path / name).write_bytes(b"x")
    run_state.prune_models(tmp_path, {"global_model_round_0002.pt", "best_global_model_round_0001.pt"})
    kept = sorted(p.name for p in tmp_path.iterdir())
    assert kept == ["best_global_model_round_0001.pt", "global_model_round_0002.pt"]
