"""The privacy benchmark's public pretraining (--pretrain): which rows start from which checkpoint, what the report
says, and that nothing runs on bad options."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest

from benchmarks.privacy_pretrain import (
    PublicSettings,
    display_overrides,
    job_preset,
    pretrain_command,
    public_data,
    with_checkpoints,
)
from benchmarks.privacy_tradeoff import (
    REPO,
    Budget,
    configurations,
    job_overrides,
    main,
    markdown,
    merge_rows,
    parse_row,
)
from benchmarks.privacy_tradeoff_report import verdict
from fedseg3d.tools.build_jobs import build_jobs

SETTINGS = PublicSettings(sites=1, seed=1000, cases_scale=8.0, fov_mm=64.0, epochs=15, train_seed=0)


def test_each_row_starts_from_its_networks_checkpoint_unless_it_names_its_own(tmp_path: Path):
    own = parse_row("own:unet3d_dpsgd:initial_checkpoint=/data/mine.pt")
    configs = configurations(False, [8.0], [own])
    checkpoints = {p: {"checkpoint": tmp_path / f"{p}.pt"} for p in ("unet3d_tiny", "unet3d_tiny_instancenorm")}
    assert job_preset("unet3d_fedbn", {}) == "unet3d_tiny"
    assert job_preset("unet3d_fedavg", {"model_preset": "unet3d_tiny_instancenorm"}) == "unet3d_tiny_instancenorm"
    started = {c.name: c.overrides["initial_checkpoint"] for c in with_checkpoints(configs, checkpoints)}
    assert started["fedbn"] == started["fedbn_dp_sigma1"] == str(tmp_path / "unet3d_tiny.pt")
    assert started["dpsgd_eps8"] == started["fedavg_instancenorm"] == str(tmp_path / "unet3d_tiny_instancenorm.pt")
    assert started["own"] == "/data/mine.pt"
    budget = Budget(rounds=2, local_steps=0, cases_scale=8.0, fov_mm=64.0, patients_per_step=16)
    for config in with_checkpoints(configs[:1], checkpoints):
        (job_dir,) = build_jobs(REPO / "jobs", tmp_path / "b", [config.job], job_overrides(config, budget), 2, False)
        server = json.loads((job_dir / "app" / "config" / "config_fed_server.json").read_text())
        assert server["initial_checkpoint"] == str(tmp_path / "unet3d_tiny.pt")


def test_public_data_is_never_the_private_sites_and_commands_are_reproducible(tmp_path: Path):
    with pytest.raises(ValueError, match="not be disjoint"):
        public_data(SETTINGS, tmp_path, private_seed=1000)
    command = pretrain_command(SETTINGS, "unet3d_tiny", ["w/public/data/site-1"], "w/public/unet3d_tiny.pt")
    assert command[:3] == ["python", "-m", "fedseg3d.tools.pretrain"]
    assert command[command.index("--epochs") + 1] == "15" and command[command.index("--job") + 1] == "jobs/unet3d_fedbn"
    assert display_overrides({"initial_checkpoint": str(REPO / "w" / "x.pt")}) == {"initial_checkpoint": "w/x.pt"}
    assert display_overrides({"seed": 1}) == {"seed": 1}


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--pretrain", "--pretrain-epochs", "0"], "--pretrain-epochs must be >= 1"),
        (["--pretrain", "--public-sites", "0"], "--public-sites must be >= 1"),
        (["--pretrain", "--public-cases-scale", "0"], "--public-cases-scale must be > 0"),
    ],
)
def test_bad_pretraining_options_are_refused_before_running_anything(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main([*argv, "--workspace", str(tmp_path)])
    assert message in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def _row(name: str, dice: float, **extra) -> dict:
    base = {"name": name, "job": "j", "mean_dice": dice, "epsilon": None, "unit": None, "attack_auc": 0.5}
    return base | {"simulator_seconds": 1.0, "load_average_1min": [1.0, 1.0]} | extra


def test_report_describes_the_public_data_and_shows_the_checkpoint_alone():
    public_only = _row("public_only_unet3d_tiny", 0.4, job="-", attack_auc=None, simulator_seconds=None)
    rows = [public_only, _row("fedbn", 0.8, overrides={"initial_checkpoint": "w/public/unet3d_tiny.pt"})]
    checkpoint = {
        "command": "python -m fedseg3d.tools.pretrain ...",
        "train_cases": 96,
        "val_cases": 32,
        "public_val_dice": 0.7,
        "public_val_class_dice": {"organ": 0.9, "lesion": 0.5},
        "seconds": 120.0,
    }
    result = {
        "title": "Pretrained", "command": "cmd", "date": "today", "total_seconds": 60.0,
        "machine": {"cpu_cores": 2, "cpu": "x", "gpu": "none", "torch": "t", "python": "p"},
        "budget": {"seed": 0, "cases_scale": 8.0, "fov_mm": 64.0, "rounds": 2, "local_steps": 0, "local_epochs": 1},
        "cases": {"site-1": "104/32", "site-2": "64/32"},
        "pretraining": {"settings": asdict(SETTINGS), "checkpoints": {"unet3d_tiny": checkpoint}},
        "rows": rows, "verdict": verdict(rows),
    }  # fmt: skip
    text = markdown(result)
    assert "seed 1000 (the private sites use 0" in text and "never a dark lesion like site-2's" in text
    assert "96 public training cases, public validation Dice 0.700 (organ 0.900, lesion 0.500)" in text
    assert "| public_only_unet3d_tiny | - | model_preset" not in text  # knobs as given
    line = next(x for x in text.splitlines() if x.startswith("| public_only_unet3d_tiny |"))
    assert "| -0.4000 |" in line and line.count("| - |") >= 3
    assert "initial_checkpoint=unet3d_tiny.pt" in text


def test_merge_refuses_rows_made_with_other_public_pretraining():
    budget = Budget(rounds=10, local_steps=0, cases_scale=8.0, fov_mm=64.0)
    earlier = {"command": "c", "budget": asdict(budget), "cases": {}, "rows": [_row("fedbn", 0.8)]}
    earlier["pretraining"] = {"settings": asdict(SETTINGS)}
    assert len(merge_rows(earlier, [], budget, {}, asdict(SETTINGS))) == 1
    with pytest.raises(ValueError, match="public pretraining"):
        merge_rows(earlier, [], budget, {}, None)


def test_verdict_also_measures_against_the_best_non_private_row_when_fedbn_is_not_it():
    rows = [
        _row("public_only_unet3d_tiny", 0.9, job="-"),  # not trained on the private data: never the reference
        _row("fedbn", 0.55),
        _row("fedbn_scratch", 0.70),
        _row("dpsgd_eps8", 0.62, epsilon=8.0, unit="patient"),
    ]
    lines = verdict(rows)
    assert lines[0].endswith("meets the goal")
    assert (
        lines[1]
        == "dpsgd_eps8: Dice -0.0800 vs the best non-private row (fedbn_scratch, 0.7000): outside the goal's 0.02 of it"
    )
    assert len(verdict(rows[1:2] + rows[3:])) == 1, "FedBN is the best non-private row: one line"


def test_a_merged_report_keeps_the_checkpoints_of_rows_it_did_not_redo(tmp_path: Path):
    from benchmarks.privacy_pretrain import describe

    earlier = {"checkpoints": {"unet3d_tiny_instancenorm": {"command": "old"}, "unet3d_tiny": {"command": "old"}}}
    info = {"checkpoint": tmp_path / "unet3d_tiny.pt", "command": "new", "provenance": {"train_cases": 80}}
    described = describe(SETTINGS, {"unet3d_tiny": info}, earlier)["checkpoints"]
    assert described["unet3d_tiny_instancenorm"] == {"command": "old"} and described["unet3d_tiny"]["command"] == "new"
