"""An export records where the model came from: the site's models.json and the server's records of the job."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fedseg3d.data.transforms import PreprocessConfig
from fedseg3d.inference import provenance
from fedseg3d.inference.bundle import METADATA
from fedseg3d.inference.export_command import main as export_main
from fedseg3d.inference.loading import ModelLoadError
from fedseg3d.models.presets import build_model
from fedseg3d.server import contribution_log
from fedseg3d.training.site_models import SiteModelStore, model_recipe

CLASSES = {0: "background", 1: "organ", 2: "lesion"}
PREP = PreprocessConfig(roi_size=(16, 16, 16))


def write_job(root: Path, best_global_round: int = 1, dp: bool = True, last_local_dice: float = 0.35) -> Path:
    """A finished 2-round FedBN job as the simulator leaves it: site-1's models and the server's records."""
    site_models = root / "site-1" / "simulate_job" / "app_site-1" / "site_models"
    store = SiteModelStore("site-1", site_models, model_recipe("unet3d_tiny", CLASSES, PREP, "simulate_job", "site-1"))
    network = build_model("unet3d_tiny")
    store.offer_local(network, 0.30, 0)
    store.offer_global(network, 0.40, best_global_round)  # the deployed model: the global model of that round
    store.offer_local(network, last_local_dice, 1)
    run = root / "server" / "simulate_job"
    (run / "fedseg3d").mkdir(parents=True)
    (run / "cross_site_val").mkdir()
    records = [
        {"round": r, "site": s, "num_rounds": 2, "return_code": "OK", "data_kind": "WEIGHT_DIFF",
         "initial_metrics": {"val_mean_dice": 0.1 * (r + 1) + (0.01 if s == "site-2" else 0)}}
        for r in (0, 1) for s in ("site-1", "site-2")
    ]  # fmt: skip
    records.append({"round": 1, "site": "site-3", "num_rounds": 2, "return_code": "EXECUTION_EXCEPTION"})
    (run / "fedseg3d" / "contributions.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    matrix = {s: {"SRV_FL_global_model.pt": {"val_mean_dice": d}} for s, d in (("site-1", 0.5), ("site-2", 0.6))}
    (run / "cross_site_val" / "cross_val_results.json").write_text(json.dumps(matrix))
    if dp:
        releases = [{"round": r, "site": "site-2", "epsilon": 1.0 + r, "delta": 1e-5, "unit": "patient",
                     "scope": "site_ledger"} for r in (0, 1)]  # fmt: skip
        (run / "fedseg3d" / "privacy.jsonl").write_text("\n".join(json.dumps(r) for r in releases) + "\n")
    return site_models


def test_the_global_model_of_a_round_names_its_training_sites_their_dice_and_epsilon(tmp_path):
    site_models = write_job(tmp_path, best_global_round=1)
    facts = provenance.collect_provenance(site_models, tmp_path)
    assert facts["job_id"] == "simulate_job" and facts["site"] == "site-1" and facts["round"] == 1
    assert facts["deployed"] == "best_global_model.pt" and facts["num_rounds"] == 2
    assert facts["trained_by"] == ["site-1", "site-2"]  # round 0's updates; site-3 failed and counts for nothing
    # Each site's validation of that round's global model; site-1's own figure is that of the deployed file.
    assert facts["site_val_dice"] == {"site-1": 0.40, "site-2": pytest.approx(0.21)}
    assert facts["differential_privacy"] == {
        "site-2": {"round": 0, "epsilon": 1.0, "delta": 1e-5, "unit": "patient", "scope": "site_ledger"}
    }


def test_the_final_global_model_takes_its_dice_from_cross_site_evaluation(tmp_path):
    site_models = write_job(tmp_path, best_global_round=2, dp=False)
    facts = provenance.collect_provenance(site_models, tmp_path / "server" / "simulate_job")
    assert facts["site_val_dice"] == {"site-1": 0.40, "site-2": 0.6}
    assert "cross-site" in facts["site_val_dice_is"] and facts["differential_privacy"] is None


def test_an_own_model_counts_the_global_rounds_before_it_and_its_own_site(tmp_path):
    (tmp_path / "a").mkdir()
    facts = provenance.collect_provenance(write_job(tmp_path / "a", last_local_dice=0.45), tmp_path / "a")
    assert facts["deployed"] == "best_local_model.pt" and facts["round"] == 1 and facts["is_final_own_model"]
    assert facts["trained_by"] == ["site-1", "site-2"]  # round 0's global updates, then site-1 alone
    assert facts["differential_privacy"]["site-2"]["round"] == 0
    # An own model of the first round: no other site's update is in it yet.
    files = provenance.find_server_files(write_job(tmp_path / "b").parents[3])
    first_round = provenance.server_provenance(files, "site-1", "best_local_model.pt", 0)
    assert first_round["trained_by"] == ["site-1"] and first_round["differential_privacy"] is None
    assert first_round["dp_job"]  # the job had DP releases, none of them went into this model


def test_without_the_server_result_only_the_site_facts_are_recorded(tmp_path):
    facts = provenance.collect_provenance(write_job(tmp_path), None)
    assert facts["trained_by"] is None and "no server result" in facts["note"]


def test_a_server_result_of_another_job_is_refused(tmp_path):
    site_models = write_job(tmp_path)
    (tmp_path / "server" / "simulate_job" / "meta.json").write_text(json.dumps({"job_id": "other-job"}))
    with pytest.raises(ModelLoadError, match=r"meta\.json: job_id is 'other-job'"):
        provenance.collect_provenance(site_models, tmp_path)


def test_record_file_names_match_the_server_that_writes_them():
    assert provenance.OUTPUT_SUBDIR == contribution_log.OUTPUT_SUBDIR
    assert provenance.CONTRIBUTIONS_FILE == contribution_log.CONTRIBUTIONS_FILE
    assert provenance.PRIVACY_FILE == contribution_log.PRIVACY_FILE


def test_export_command_writes_a_bundle_with_the_provenance(tmp_path, capsys):
    write_job(tmp_path)
    assert export_main(["--model", str(tmp_path), "--site", "site-1", "--out", str(tmp_path / "bundle")]) == 0
    meta = json.loads((tmp_path / "bundle" / METADATA).read_text())
    assert meta["fedseg3d"]["provenance"]["trained_by"] == ["site-1", "site-2"]
    assert "wrote MONAI bundle" in capsys.readouterr().out
    torch.load(tmp_path / "bundle" / "models" / "model.pt", weights_only=True)
    assert export_main(["--model", str(tmp_path / "nothing"), "--out", str(tmp_path / "b2")]) == 1
    assert "nothing: model path does not exist" in capsys.readouterr().err
