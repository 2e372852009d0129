"""The privacy benchmark's pieces: every configuration builds against the real jobs; the verdict reads the goal
right. (The benchmark itself runs the simulator for minutes: `make bench-privacy BENCH_ARGS=--quick`.)"""

from __future__ import annotations

import json
import math
from dataclasses import asdict

import pytest

from benchmarks.privacy_tradeoff import (
    FULL,
    QUICK,
    REPO,
    Budget,
    configurations,
    dp_sgd_parameters,
    job_overrides,
    main,
    markdown,
    merge_rows,
    parse_row,
    read_outcome,
    verdict,
)
from benchmarks.privacy_tradeoff_report import late_mean, sigma_cell
from fedseg3d.privacy.accounting import PATIENT
from fedseg3d.privacy.ledger import PrivacyLedger, SpendEntry, load_site_privacy_budget
from fedseg3d.privacy.site_budget import write_site_budget
from fedseg3d.tools.build_jobs import build_jobs


@pytest.mark.parametrize("quick", [True, False])
def test_every_configuration_builds_with_its_knobs_applied(quick, tmp_path):
    budget = QUICK if quick else FULL
    for config in configurations(quick):
        overrides = job_overrides(config, budget)
        (job_dir,) = build_jobs(REPO / "jobs", tmp_path / config.name, [config.job], overrides, 2, with_code=False)
        client = json.loads((job_dir / "app" / "config" / "config_fed_client.json").read_text())
        server = json.loads((job_dir / "app" / "config" / "config_fed_server.json").read_text())
        assert server["num_rounds"] == budget.rounds and client["local_steps"] == budget.local_steps
        for name, value in config.overrides.items():
            assert client.get(name, server.get(name)) == value, (config.name, name)


def test_committed_benchmark_builds_exactly_the_jobs_defaults_for_what_it_does_not_vary(tmp_path):
    """The new budget fields default to the jobs' own values, so the committed rows are built as before."""
    for config in configurations(quick=False):
        overrides = job_overrides(config, FULL)
        assert overrides["local_epochs"] == 1
        if config.job == "unet3d_dpsgd":
            assert overrides["patients_per_step"] == 2 and "target_epsilon" not in overrides
        else:
            assert "patients_per_step" not in overrides  # only the DP-SGD job has the knob (build_jobs would refuse)


def test_scaled_rows_calibrate_dpsgd_and_share_the_data_budget(tmp_path):
    budget = Budget(rounds=10, local_steps=0, cases_scale=8.0, fov_mm=64.0, local_epochs=2, patients_per_step=16)
    lever = parse_row("dpsgd_eps8_lr:unet3d_dpsgd:target_epsilon=8,learning_rate=0.01,patients_per_step=32")
    configs = configurations(quick=False, target_epsilons=[8.0, 4.0], extra=[lever])
    names = [c.name for c in configs]
    assert {"fedbn", "fedavg_instancenorm", "dpsgd_eps8", "dpsgd_eps4", "dpsgd_eps8_lr"} <= set(names)
    assert not any(name.startswith("dpsgd_sigma") for name in names)
    for config in configs:
        (job_dir,) = build_jobs(
            REPO / "jobs", tmp_path / config.name, [config.job], job_overrides(config, budget), 2, with_code=False
        )
        client = json.loads((job_dir / "app" / "config" / "config_fed_client.json").read_text())
        assert (client["local_epochs"], client["local_steps"]) == (2, 0)
        if config.job == "unet3d_dpsgd":
            expected = {"dpsgd_eps8": (8.0, 16), "dpsgd_eps4": (4.0, 16), "dpsgd_eps8_lr": (8, 32)}[config.name]
            assert (client["target_epsilon"], client["patients_per_step"]) == expected
    assert lever.overrides == {"target_epsilon": 8, "learning_rate": 0.01, "patients_per_step": 32}


@pytest.mark.parametrize("text", ["nojob", ":unet3d_fedbn", "x:no_such_job", "x:unet3d_fedbn:seed"])
def test_bad_rows_are_refused(text):
    with pytest.raises(ValueError, match="row|override"):
        parse_row(text)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--rounds", "0"], "--rounds must be >= 1"),
        (["--local-epochs", "0"], "--local-epochs must be >= 1"),
        (["--patients-per-step", "0"], "--patients-per-step must be >= 1"),
        (["--cases-scale", "0"], "--cases-scale must be > 0"),
        (["--target-epsilons", "8,x"], "could not convert"),
        (["--only", "dpsgd_sigma1.2", "--target-epsilons", "8"], "unknown configuration"),
    ],
)
def test_command_line_refuses_bad_values_before_running_anything(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main([*argv, "--workspace", str(tmp_path)])
    assert message in capsys.readouterr().err
    assert not any(tmp_path.iterdir()), "nothing generated or run"


def test_dp_sgd_parameters_come_from_each_sites_ledger(tmp_path):
    for site, sigma, patients in (("site-1", 1.1, 104), ("site-2", 1.3, 64)):
        budget = load_site_privacy_budget(write_site_budget(tmp_path / site, 1e6, 1e-5))
        for round_ in range(2):
            entry = SpendEntry(
                job_id="j", round=round_, unit=PATIENT, noise_multiplier=sigma, sample_rate=16 / patients, steps=7,
                details={"patients": patients, "patients_per_step": 16, "max_grad_norm": 1.0, "target_epsilon": 8.0},
            )  # fmt: skip
            PrivacyLedger(budget.ledger_file).charge(entry, budget_epsilon=1e6, delta=1e-5)
    params = dp_sgd_parameters(tmp_path)
    assert params["site-1"]["noise_multipliers"] == [1.1] and params["site-2"]["patients"] == 64
    assert (params["site-1"]["rounds"], params["site-1"]["steps"], params["site-1"]["target_epsilon"]) == (2, 14, 8.0)
    assert dp_sgd_parameters(tmp_path / "nothing") == {}


def test_merge_keeps_earlier_rows_this_run_did_not_redo_and_refuses_another_budget():
    budget = Budget(rounds=10, local_steps=0, cases_scale=8.0, fov_mm=64.0)
    cases = {"site-1": "104/32"}
    earlier = {
        "command": "first",
        "budget": asdict(budget),
        "cases": cases,
        "rows": [row("fedbn", 0.8), row("dpsgd_eps8", 0.5, 8.0, PATIENT)],
    }
    merged = merge_rows(earlier, [row("dpsgd_eps8", 0.6, 8.0, PATIENT), row("lever", 0.7, 8.0, PATIENT)], budget, cases)
    assert [(r["name"], r["mean_dice"]) for r in merged] == [("fedbn", 0.8), ("dpsgd_eps8", 0.6), ("lever", 0.7)]
    assert merged[0]["command"] == "first"
    with pytest.raises(ValueError, match="would not compare"):
        merge_rows(earlier, [], Budget(rounds=5, local_steps=0, cases_scale=8.0, fov_mm=64.0), cases)


def row(name: str, dice: float, epsilon: float | None = None, unit: str | None = None) -> dict:
    return {
        "name": name,
        "job": "j",
        "mean_dice": dice,
        "epsilon": epsilon,
        "unit": unit,
        "attack_auc": 0.5,
        "simulator_seconds": 1.0,
        "load_average_1min": [1.0, 1.0],
    }


def test_verdict_compares_patient_level_rows_with_fedbn_only():
    rows = [
        row("fedbn", 0.80),
        row("dpsgd_a", 0.79, 7.5, "patient"),
        row("dpsgd_b", 0.70, 3.0, "patient"),
        row("dpsgd_c", 0.80, 9.0, "patient"),
        row("fedbn_dp", 0.80, 2.0, "site_update"),
    ]
    lines = verdict(rows)
    assert lines[0].endswith("meets the goal") and "-0.0100" in lines[0]
    assert lines[1].endswith("misses the goal")
    assert "outside the goal" in lines[2]
    assert "not comparable" in lines[3]
    assert verdict(rows[1:]) == ["no non-private FedBN row: nothing to compare against"]


def test_verdict_also_reads_the_mean_of_the_last_rounds_against_the_best_non_private_row():
    """One lucky final round must not read as meeting the goal: the last three global models say where a run is."""
    curve = lambda *late: {str(i): v for i, v in enumerate([0.1, 0.5, 0.6, *late])}  # noqa: E731
    rows = [
        row("fedbn", 0.43) | {"per_round_dice": curve(0.45, 0.53, 0.43)},
        row("fedbn_1pass", 0.70) | {"per_round_dice": curve(0.72, 0.74, 0.70)},
        row("dpsgd", 0.68, 8.0, PATIENT) | {"per_round_dice": curve(0.67, 0.63, 0.68)},
        row("dpsgd_short", 0.69, 8.0, PATIENT) | {"per_round_dice": {"0": 0.1, "1": 0.69}},
    ]
    lines = verdict(rows)
    assert lines[1].startswith("dpsgd: Dice -0.0200 vs the best non-private row (fedbn_1pass")
    assert lines[2] == (
        "dpsgd: mean of the last 3 global models 0.6600, -0.0600 vs the best non-private row's (fedbn_1pass, "
        "0.7200): outside the goal's 0.02"
    )
    # A row without three recorded rounds gets no such line (and so does a report without per-round figures).
    assert not any(line.startswith("dpsgd_short: mean of the last") for line in lines)
    assert late_mean(rows[3]) is None and late_mean(row("x", 0.5)) is None
    assert late_mean(rows[0]) == pytest.approx((0.45 + 0.53 + 0.43) / 3)


def test_markdown_shows_sigma_per_site_per_round_dice_and_every_command():
    dp = row("dpsgd_eps8", 0.6, 7.995, PATIENT) | {
        "dp_sgd": {"site-1": {"noise_multipliers": [1.152]}, "site-2": {"noise_multipliers": [1.318]}},
        "per_round_dice": {"0": 0.06, "1": 0.2, "2": 0.6},
        "site_train_seconds_per_round": {"site-1": 7.2, "site-2": 4.5},
        "class_dice": {"organ": 0.9, "lesion": 0.01},
        "command": "second",
    }
    rows = [row("fedbn", 0.8) | {"per_round_dice": {"0": 0.1, "1": 0.5, "2": 0.8}, "command": "first"}, dp]
    result = {
        "command": "second",
        "date": "today",
        "total_seconds": 60.0,
        "machine": {"cpu_cores": 2, "cpu": "x", "gpu": "none", "torch": "t", "python": "p"},
        "budget": {"seed": 0, "cases_scale": 8.0, "fov_mm": 64.0, "rounds": 2, "local_steps": 0, "local_epochs": 1,
                   "patients_per_step": 16},
        "cases": {"site-1": "13/4", "site-2": "8/4"},
        "rows": rows,
        "verdict": verdict(rows),
    }  # fmt: skip
    text = markdown(result)
    assert text.startswith("# Privacy/utility benchmark") and "`first`" in text and "`second`" in text
    assert "![Dice against epsilon](privacy_benchmark.png)" in text
    assert "| 1.15 / 1.32 |" in text and "7.995" in text and "| 7.2 / 4.5 |" in text
    assert "| dpsgd_eps8 | 0.060 | 0.200 | 0.600 |" in text and "| organ 0.900, lesion 0.010 |" in text
    assert "16 expected patients per step" in text and "2 synthetic sites" in text
    assert "more than one machine" not in text  # neither row recorded one: nothing to tell apart
    rows[1]["machine"] = "2 CPU cores (y)"
    text = markdown(result | {"rows": rows})
    assert "- 2 CPU cores (y): dpsgd_eps8" in text
    assert "- not recorded (run before rows recorded their machine): fedbn" in text


def test_sigma_cell_shows_a_per_round_schedule_as_its_range():
    scheduled = {
        "dp_sgd": {
            "site-2": {"noise_multipliers": [1.665, 2.1, 68.04]},
            "site-1": {"noise_multipliers": [1.408, 57.54, 3.0]},
        }
    }
    assert sigma_cell(scheduled) == "1.41-57.5 / 1.67-68"
    assert sigma_cell({"dp_sgd": {"site-1": {"noise_multipliers": [1.0, 2.0]}}}) == "1/2"
    assert sigma_cell({}) == "-"


def test_markdown_has_one_table_line_per_row():
    rows = [row("fedbn", 0.8), row("dpsgd", math.nan, 1.0, "patient")]
    result = {
        "command": "cmd",
        "date": "today",
        "total_seconds": 60.0,
        "machine": {"cpu_cores": 2, "cpu": "x", "gpu": "none", "torch": "t", "python": "p"},
        "budget": {"seed": 0, "cases_scale": 1.0, "fov_mm": 48.0, "rounds": 2, "local_steps": 2},
        "cases": {"site-1": "13/4", "site-2": "8/4"},
        "rows": rows,
        "verdict": verdict(rows),
    }
    text = markdown(result)
    assert sum(line.startswith("| fedbn |") or line.startswith("| dpsgd |") for line in text.splitlines()) == 2
    assert "`cmd`" in text and "2 CPU cores" in text
    # Without a FedBN row (a report's first row run alone) the comparison column says so instead of "+nan".
    without_reference = markdown(result | {"rows": rows[1:], "verdict": verdict(rows[1:])})
    [line] = [line for line in without_reference.splitlines() if line.startswith("| dpsgd |")]
    assert "nan" not in line.split("|")[5] and line.split("|")[5].strip() == "-"


def test_outcome_is_read_from_a_finished_runs_files(tmp_path):
    """Final Dice per site and class, Dice before each round and epsilon, from the files a simulator run leaves."""
    server = tmp_path / "sim" / "server" / "simulate_job"
    (server / "cross_site_val").mkdir(parents=True)
    (server / "fedseg3d").mkdir()
    final = {
        "site-1": {"val_mean_dice": 0.45, "val_dice_organ": 0.9, "val_dice_lesion": 0.0},
        "site-2": {"val_mean_dice": 0.47, "val_dice_organ": 0.88, "val_dice_lesion": 0.06},
    }
    matrix = {
        site: {"SRV_FL_global_model.pt": scores, "SRV_best_FL_global_model.pt": scores}
        for site, scores in final.items()
    }
    (server / "cross_site_val" / "cross_val_results.json").write_text(json.dumps(matrix))
    contributions = [
        {"round": r, "site": site, "time": float(r), "return_code": "OK",
         "initial_metrics": {"val_mean_dice": 0.1 * r + (0.02 if site == "site-2" else 0.0)},
         "site_metrics": {"train_seconds": 7.0 if site == "site-1" else 4.0}}
        for r in range(2) for site in ("site-1", "site-2")
    ]  # fmt: skip
    (server / "fedseg3d" / "contributions.jsonl").write_text("\n".join(json.dumps(c) for c in contributions))
    records = [
        {"round": 1, "site": s, "epsilon": e, "delta": 1e-5, "unit": PATIENT}
        for s, e in (("site-1", 7.99), ("site-2", 8.0))
    ]
    (server / "fedseg3d" / "privacy.jsonl").write_text("\n".join(json.dumps(r) for r in records))

    outcome = read_outcome(parse_row("x:unet3d_dpsgd"), tmp_path)
    assert outcome["mean_dice"] == pytest.approx(0.46)
    assert outcome["class_dice"] == pytest.approx({"organ": 0.89, "lesion": 0.03})
    assert list(outcome["class_dice"]) == ["organ", "lesion"], "in the job's class order"
    assert outcome["per_round_dice"] == pytest.approx({0: 0.01, 1: 0.11, 2: 0.46})
    assert (outcome["epsilon"], outcome["unit"]) == (8.0, PATIENT)
    assert outcome["site_train_seconds_per_round"] == {"site-1": 7.0, "site-2": 4.0}
    assert outcome["dp_sgd"] == {}, "no ledger kept in this fake run"


def test_merge_with_a_report_of_another_budget_is_refused_before_any_run(tmp_path, capsys, monkeypatch):
    """A wrong --merge must cost seconds, not the simulator runs after which the merge would fail."""
    out = tmp_path / "docs"
    out.mkdir()
    earlier = {"command": "x", "budget": {"rounds": 99}, "cases": {}, "rows": []}
    (out / "privacy_benchmark.json").write_text(json.dumps(earlier))
    monkeypatch.setattr("benchmarks.privacy_tradeoff.run_config", lambda *a, **k: pytest.fail("a run started"))
    argv = ["--quick", "--merge", "--out-dir", str(out), "--workspace", str(tmp_path / "w")]
    with pytest.raises(SystemExit):
        main(argv)
    assert "would not compare" in capsys.readouterr().err
