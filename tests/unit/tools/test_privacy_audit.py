"""The audit CLI on a run folder laid out as the simulator writes it (real job config, real checkpoints)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from fedseg3d.models.local_state import batchnorm_state_keys
from fedseg3d.models.presets import PresetUNet
from fedseg3d.tools.build_jobs import build_jobs
from fedseg3d.tools.privacy_audit import find_epsilons, format_table, load_job_setup, main, run_audit

REPO = Path(__file__).resolve().parents[3]
SITES = ("site-1", "site-2")


def fake_run(tmp_path: Path, job: str = "unet3d_fedbn", local_models: bool = True) -> Path:
    """Simulator layout: the job's client config and local models per site, the global model at the server."""
    (job_dir,) = build_jobs(REPO / "jobs", tmp_path / "jobs", [job], {}, min_clients=2, with_code=False)
    run = tmp_path / "run"
    torch.manual_seed(0)
    model = PresetUNet("unet3d_tiny", num_classes=3)
    server_app = run / "server" / "simulate_job" / "app_server"
    server_app.mkdir(parents=True)
    torch.save({"model": model.state_dict(), "train_conf": {}}, server_app / "FL_global_model.pt")
    for index, site in enumerate(SITES):
        app = run / site / "simulate_job" / f"app_{site}"
        shutil.copytree(job_dir / "app" / "config", app / "config")
        if local_models:
            state = {k: v.clone() for k, v in model.state_dict().items()}
            for key in batchnorm_state_keys(model):
                if key.endswith("running_mean"):
                    state[key] += 0.5 * (index + 1)  # each site's own batch-norm statistics
            (app / "site_models").mkdir()
            torch.save(state, app / "site_models" / "local_model.pt")
    return run


def test_audits_global_and_local_model_of_each_site(tiny_sites, tmp_path):
    run = fake_run(tmp_path)
    records = run / "server" / "simulate_job" / "fedseg3d" / "privacy.jsonl"
    records.parent.mkdir(parents=True)
    records.write_text(
        "\n".join(
            json.dumps({"round": r, "site": s, "epsilon": 1.0 + r, "delta": 1e-5, "unit": "patient", "scope": "job"})
            for r in (1, 0)
            for s in SITES
        )
    )
    rows = run_audit(run, tiny_sites, resamples=20)
    assert [(r["site"], r["model"]) for r in rows] == [(s, m) for s in SITES for m in ("global", "local")]
    for row in rows:
        datalist = json.loads((tiny_sites / row["site"] / "datalist.json").read_text())
        assert (row["n_members"], row["n_nonmembers"]) == (len(datalist["training"]), len(datalist["validation"]))
        assert 0.0 <= row["auc_low"] <= row["auc"] <= row["auc_high"] <= 1.0
        assert (row["epsilon"], row["unit"], row["round"]) == (2.0, "patient", 1)  # the latest round, not the last line
    by_key = {(r["site"], r["model"]): r for r in rows}
    # FedBN: the global model is scored with the site's own batch norm. Here the shared weights equal the local
    # model's, so both rows must score the same; with the global file's initial batch norm they would not.
    assert by_key[("site-1", "global")]["member_loss"] == pytest.approx(by_key[("site-1", "local")]["member_loss"])
    table = format_table(rows)
    assert len(table.splitlines()) == 2 + len(rows) and "patient" in table


def test_fedbn_without_the_sites_batch_norm_is_refused(tiny_sites, tmp_path):
    run = fake_run(tmp_path, local_models=False)
    with pytest.raises(FileNotFoundError, match="site-1: the job keeps normalisation layers at the site but no local"):
        run_audit(run, tiny_sites, sites=["site-1"], resamples=20)


def test_fedavg_needs_no_local_model_and_cli_writes_json(tiny_sites, tmp_path, capsys):
    run = fake_run(tmp_path, job="unet3d_fedavg", local_models=False)
    out = tmp_path / "audit.json"
    main(["--run-dir", str(run), "--sites-root", str(tiny_sites), "--resamples", "20", "--json", str(out)])
    rows = json.loads(out.read_text())
    assert [(r["site"], r["model"]) for r in rows] == [(s, "global") for s in SITES]
    assert "Loss-threshold membership attack" in capsys.readouterr().out


def test_job_setup_reads_the_learner_with_variables_resolved(tmp_path):
    setup = load_job_setup(fake_run(tmp_path, job="unet3d_dpsgd", local_models=False))
    assert setup.training.model_preset == "unet3d_tiny_instancenorm"
    assert setup.training.keep_batchnorm_local is False
    assert setup.class_names == {0: "background", 1: "organ", 2: "lesion"}


def test_missing_or_malformed_results_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="config_fed_client.json"):
        load_job_setup(tmp_path)
    bad = tmp_path / "fedseg3d" / "privacy.jsonl"
    bad.parent.mkdir()
    bad.write_text('{"site": "site-1", "round": 0}\n')
    with pytest.raises(ValueError, match=r"privacy.jsonl:1: not a privacy record"):
        find_epsilons(tmp_path)
