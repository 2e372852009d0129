"""A job started from a checkpoint (``initial_checkpoint``), run for real in the FLARE simulator: a fitting checkpoint
is the first global model; one of another preset stops the job at the server with the file named."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fedseg3d.models.checkpoint import save_checkpoint
from fedseg3d.models.presets import PresetUNet
from fedseg3d.tools.build_jobs import build_jobs
from fedseg3d.tools.simulate import run_simulation

REPO = Path(__file__).resolve().parents[2]
SITES = ["site-1", "site-2"]
pytestmark = pytest.mark.e2e


def _run(checkpoint: Path, tiny_sites: Path, tmp_path: Path) -> tuple[int, Path]:
    overrides = {"num_rounds": 1, "sites_per_round": 2, "local_steps": 1, "initial_checkpoint": str(checkpoint)}
    (job_dir,) = build_jobs(REPO / "jobs", tmp_path / "jobs", ["unet3d_fedbn"], overrides, min_clients=2)
    workspace = tmp_path / "ws"
    return run_simulation(job_dir, workspace, tiny_sites, SITES, timeout=600), workspace


def test_a_fitting_checkpoint_is_where_the_job_starts(tiny_sites, tmp_path):
    torch.manual_seed(11)
    start = PresetUNet("unet3d_tiny", 3).state_dict()
    bn = "model.0.conv.unit0.adn.N.running_mean"
    start[bn].fill_(0.5)  # not a fresh network's value: only the checkpoint can have put it there
    path = save_checkpoint(start, tmp_path / "start.pt")
    code, workspace = _run(path, tiny_sites, tmp_path)
    assert code == 0
    server = workspace / "server" / "simulate_job"
    log = (workspace / "server" / "log.txt").read_text()
    assert f"checkpoint {path} fits preset 'unet3d_tiny'" in log
    final = torch.load(server / "app_server" / "FL_global_model.pt", weights_only=True)["model"]
    # FedBN: batch norm is never sent, so the server's copy is still the checkpoint's
    assert np.array_equal(np.asarray(final[bn]), start[bn].numpy())


def test_a_checkpoint_of_another_preset_stops_the_job_naming_the_file(tiny_sites, tmp_path):
    path = save_checkpoint(PresetUNet("unet3d_tiny_instancenorm", 3).state_dict(), tmp_path / "other.pt")
    code, workspace = _run(path, tiny_sites, tmp_path)
    log = (workspace / "server" / "log.txt").read_text()
    assert f"initial checkpoint {path} does not fit the job's network (preset 'unet3d_tiny')" in log
    assert not (workspace / "server" / "simulate_job" / "app_server" / "FL_global_model.pt").is_file()
