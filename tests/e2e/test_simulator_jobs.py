"""Each job runs for real in the FLARE simulator (2 sites, 2 rounds, tiny volumes); assertions are on outcomes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from fedseg3d.models.local_state import batchnorm_state_keys
from fedseg3d.models.presets import build_model
from fedseg3d.server.run_outcome import read_outcome
from fedseg3d.tools.build_jobs import build_jobs
from fedseg3d.tools.simulate import NOT_COMPLETED, main, run_simulation

REPO = Path(__file__).resolve().parents[2]
SITES = ["site-1", "site-2"]
OVERRIDES = {"num_rounds": 2, "sites_per_round": 2, "local_steps": 2}

pytestmark = pytest.mark.e2e


def simulate(
    job: str, sites_root: Path, tmp_path: Path, extra: dict | None = None, privacy_dir: Path | None = None
) -> Path:
    (job_dir,) = build_jobs(REPO / "jobs", tmp_path / "jobs", [job], {**OVERRIDES, **(extra or {})}, min_clients=2)
    workspace = tmp_path / "ws"
    code = run_simulation(job_dir, workspace, sites_root, SITES, timeout=600, privacy_dir=privacy_dir)
    assert code == 0, f"simulator exited with {code}; logs under {workspace}"
    return workspace


def contributions(workspace: Path) -> list[dict]:
    path = workspace / "server" / "simulate_job" / "fedseg3d" / "contributions.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def site_model(workspace: Path, site: str) -> dict[str, torch.Tensor]:
    path = workspace / site / "simulate_job" / f"app_{site}" / "site_models" / "local_model.pt"
    return torch.load(path, weights_only=True)


@pytest.mark.parametrize("job", ["unet3d_fedbn", "unet3d_fedavg"])
def test_job_completes_and_keeps_batchnorm_where_it_belongs(job, tiny_sites, tmp_path):
    workspace = simulate(job, tiny_sites, tmp_path)
    server_run = workspace / "server" / "simulate_job"
    assert (server_run / "app_server" / "FL_global_model.pt").is_file()
    assert (server_run / "app_server" / "best_FL_global_model.pt").is_file()
    assert read_outcome(server_run) == {
        "completed": True,
        "workflows": [{"id": "fedavg", "aborted": False}, {"id": "cross_site_eval", "aborted": False}],
    }
    assert list((server_run / "tb_events").rglob("events.out.tfevents*")), "metrics reached the server's TensorBoard"

    received = contributions(workspace)
    assert {(c["round"], c["site"]) for c in received} == {(r, s) for r in (0, 1) for s in SITES}
    assert all(c["data_kind"] == "WEIGHT_DIFF" and c["return_code"] == "OK" for c in received)
    bn_keys = batchnorm_state_keys(build_model("unet3d_tiny"))
    received_keys = set().union(*(c["keys"] for c in received))

    models = [site_model(workspace, site) for site in SITES]
    bn_means = [k for k in bn_keys if k.endswith("running_mean")]
    sites_differ = any(not torch.allclose(models[0][k], models[1][k]) for k in bn_means)
    if job == "unet3d_fedbn":
        assert not received_keys & bn_keys, "FedBN: batch-norm state must never reach the server"
        assert sites_differ, "FedBN: each site keeps its own batch-norm statistics"
        for site in SITES:  # each site says which of its own models to deploy: the best for that site
            folder = workspace / site / "simulate_job" / f"app_{site}" / "site_models"
            index = json.loads((folder / "models.json").read_text())["models"]
            best = max(index[name]["val_mean_dice"] for name in ("best_local_model.pt", "best_global_model.pt"))
            assert (folder / "best_model.pt").is_file() and index["best_model.pt"]["val_mean_dice"] == best
    else:
        assert {k for k in bn_keys if "num_batches" not in k} <= received_keys, "FedAvg shares batch norm"

    matrix = json.loads((server_run / "cross_site_val" / "cross_val_results.json").read_text())
    assert set(matrix) == set(SITES)
    for site in SITES:
        assert {"SRV_FL_global_model.pt", "SRV_best_FL_global_model.pt", *SITES} <= set(matrix[site])
        assert 0.0 <= matrix[site][site]["val_mean_dice"] <= 1.0


def test_site_with_broken_data_does_not_take_the_federation_down(tiny_sites, tmp_path):
    sites_root = tmp_path / "sites"
    shutil.copytree(tiny_sites, sites_root)
    datalist = json.loads((sites_root / "site-2" / "datalist.json").read_text())
    broken = sites_root / "site-2" / datalist["training"][0]["label"]
    broken.write_bytes(broken.read_bytes()[:100])
    workspace = simulate("unet3d_fedbn", sites_root, tmp_path, {"num_rounds": 1})
    received = contributions(workspace)
    assert {c["site"] for c in received if c["return_code"] == "OK"} == {"site-1"}
    assert {c["site"] for c in received if c["return_code"] == "EXECUTION_EXCEPTION"} == {"site-2"}
    site_log = (workspace / "site-2" / "log.txt").read_text()
    assert f"{broken}: unreadable or truncated file" in site_log
    assert (workspace / "server" / "simulate_job" / "app_server" / "FL_global_model.pt").is_file()


def test_simulate_fails_when_a_site_config_error_stops_the_job_at_start(tiny_sites, tmp_path, capsys):
    # FLARE's simulator exits 0 here: every site stops at its config error and the simulator aborts the server.
    overrides = {**OVERRIDES, "num_rounds": 1, "local_steps": 1, "learning_rate": -1}
    (job_dir,) = build_jobs(REPO / "jobs", tmp_path / "jobs", ["unet3d_fedbn"], overrides, min_clients=2)
    workspace = tmp_path / "ws"
    argv = [str(job_dir), "--sites-root", str(tiny_sites), "--sites", ",".join(SITES), "--workspace", str(workspace)]
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    assert stopped.value.code == NOT_COMPLETED
    assert "did not finish: the run was aborted during workflow ['fedavg']" in capsys.readouterr().err
    assert "learning_rate must be > 0, got -1" in (workspace / "site-1" / "log.txt").read_text()
    assert not (workspace / "server" / "simulate_job" / "fedseg3d" / "contributions.jsonl").exists(), "no round ran"
