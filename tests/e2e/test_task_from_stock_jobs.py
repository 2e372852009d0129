"""Tasks other than the synthetic organ/lesion one run from the stock jobs with ``--set`` only, in the simulator.

- a binary task on the synthetic sites, whose site facts map the lesion to background;
- the five-class real task (``fedseg3d data real``: TotalSegmentator's pinned archive, fetched through pip into
  ``~/.cache/fedseg3d`` the first time) with the CT DICOM site and the MR site, 2 rounds.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from fedseg3d.data import realdata
from fedseg3d.models.presets import PresetUNet
from fedseg3d.tools.build_jobs import build_jobs
from fedseg3d.tools.simulate import run_simulation

REPO = Path(__file__).resolve().parents[2]
SHORT = {"num_rounds": 2, "sites_per_round": 2, "local_steps": 2}

pytestmark = pytest.mark.e2e


def simulate(job: str, overrides: dict, sites_root: Path, sites: list[str], tmp_path: Path) -> Path:
    (job_dir,) = build_jobs(REPO / "jobs", tmp_path / "jobs", [job], overrides, min_clients=len(sites))
    workspace = tmp_path / "ws"
    code = run_simulation(job_dir, workspace, sites_root, sites, timeout=600)
    assert code == 0, f"simulator exited with {code}; logs under {workspace}"
    return workspace / "server" / "simulate_job"


def global_model_classes(server_run: Path, preset: str, num_classes: int) -> int:
    """Output channels of the final global model (it must load into a ``num_classes`` network as it is)."""
    state = torch.load(server_run / "app_server" / "FL_global_model.pt", weights_only=True)["model"]
    model = PresetUNet(preset, num_classes=num_classes)
    model.load_state_dict(state, strict=True)
    with torch.no_grad():
        return int(model.eval()(torch.zeros((1, 1, 16, 16, 16))).shape[1])


def cross_site_metrics(server_run: Path) -> dict:
    return json.loads((server_run / "cross_site_val" / "cross_val_results.json").read_text())


def test_a_binary_task_runs_from_a_stock_job_with_set_only(tiny_sites, tmp_path):
    sites_root = tmp_path / "sites"
    shutil.copytree(tiny_sites, sites_root)
    for site in ("site-1", "site-2"):
        # Site facts, not the job: this consortium segments the organ only, so the lesion (ID 2) is background.
        config_path = sites_root / site / "site.json"
        config = json.loads(config_path.read_text())
        config.update(label_map={"1": "organ"}, unmapped_labels="background")
        config_path.write_text(json.dumps(config))
        datalist_path = sites_root / site / "datalist.json"
        datalist = json.loads(datalist_path.read_text())
        datalist["labels"] = {"0": "background", "1": "organ"}
        datalist_path.write_text(json.dumps(datalist))

    overrides = {**SHORT, "num_rounds": 1, "class_names": ["background", "organ"]}
    server_run = simulate("unet3d_fedbn", overrides, sites_root, ["site-1", "site-2"], tmp_path)

    assert global_model_classes(server_run, "unet3d_tiny", 2) == 2
    matrix = cross_site_metrics(server_run)
    for site in ("site-1", "site-2"):
        own = matrix[site][site]
        assert {k for k in own if k.startswith("val_dice_")} == {"val_dice_organ"}, own
        assert 0.0 <= own["val_dice_organ"] <= 1.0 and own["val_mean_dice"] == own["val_dice_organ"]


def test_a_short_real_data_federation_with_five_classes(tmp_path):
    sites = ["site-2", "site-3"]  # the CT read as its real DICOM series, and the MR
    recipes = [r for r in realdata.SITES if r.name in sites]
    realdata.build_sites(tmp_path / "real", realdata.default_cache(), sites=recipes)
    built = json.loads((tmp_path / "real" / "sites.json").read_text())
    names = [built["classes"][str(i)] for i in range(len(built["classes"]))]
    assert len(names) == 5, names

    overrides = {**SHORT, "class_names": names, "local_steps": 3}
    server_run = simulate("unet3d_fedbn", overrides, tmp_path / "real", sites, tmp_path)

    assert global_model_classes(server_run, "unet3d_tiny", 5) == 5
    matrix = cross_site_metrics(server_run)
    for summary in built["sites"]:
        site = summary["site_name"]
        present = [name for name, voxels in summary["class_voxels_preprocessed"]["val"].items() if voxels]
        assert present, f"{site}: the validation slab holds no consortium class"
        for model in (site, "SRV_FL_global_model.pt"):
            metrics = matrix[site][model]
            for name in present:
                value = metrics.get(f"val_dice_{name}")
                assert value is not None and math.isfinite(value) and 0.0 <= value <= 1.0, (site, model, name, metrics)
