"""The benchmark's plain parts: settings from the committed job, byte probes, parsing, overhead and goals."""

import json
import math
from pathlib import Path

import pytest

from benchmarks.config import centralised_settings, job_learner_args, make_config
from benchmarks.federated import BYTES_FILES, RECORDER, SiteMissing, add_byte_probes, build_bench_job, parse_run
from benchmarks.poc_cost import round_overhead
from benchmarks.summary import method_summary, overhead_goal


def test_modes_and_overrides():
    quick = make_config("quick", rounds=3, seed=None)
    assert quick.rounds == 3 and quick.seed == 0 and quick.total_epochs == 3 * quick.local_epochs
    assert len(quick.seeds) >= 2, "quick mode exercises the interval code"
    assert make_config("full", seeds=(4, 5)).seed == 4
    real = make_config("full", task="real")
    assert real.sites == 3 and real.local_steps > 0
    with pytest.raises(ValueError, match="unknown method"):
        make_config("quick", methods=("fedbn", "scaffold"))
    with pytest.raises(ValueError, match="seeds must be distinct"):
        make_config("quick", seeds=(1, 1))
    with pytest.raises(ValueError, match="unknown benchmark mode"):
        make_config("medium")
    with pytest.raises(ValueError, match="sites must be >= 2"):
        make_config("quick", sites=1)


def test_centralised_training_uses_the_reference_jobs_knobs(tmp_path):
    args = job_learner_args("unet3d_fedbn")
    assert not any(isinstance(v, str) and v.startswith("{") for v in args["training"].values()), "variables resolved"
    cfg = make_config("quick", seed=7)
    classes, prep, training = centralised_settings(cfg, {"learning_rate": 0.001}, tmp_path)
    assert classes == {0: "background", 1: "organ", 2: "lesion"}
    assert training.learning_rate == 0.001, "the task's knobs reach local-only and pooled too"
    assert training.keep_batchnorm_local
    assert training.local_epochs == cfg.local_epochs and training.local_steps == 0 and training.seed == 7
    assert list(prep.roi_size) == args["preprocessing"]["roi_size"]


def test_byte_probes_go_last_in_the_train_chains(tmp_path):
    cfg = make_config("quick")
    job_dir = build_bench_job(cfg, "unet3d_fedprox", tmp_path)
    quantised = build_bench_job(cfg, "unet3d_fedbn_quantized", tmp_path, {"scheme": "int3"})
    for name in ("config_fed_client.json", "config_fed_server.json"):
        assert json.loads((quantised / "app/config" / name).read_text())["scheme"] == "int3", name
    client = json.loads((job_dir / "app/config/config_fed_client.json").read_text())
    server = json.loads((job_dir / "app/config/config_fed_server.json").read_text())
    assert client["local_epochs"] == cfg.local_epochs and client["seed"] == cfg.seed
    assert server["num_rounds"] == cfg.rounds and client["fedprox_mu"] > 0
    (chain,) = client["task_result_filters"]
    assert chain["tasks"] == ["train"] and chain["filters"][-1]["path"] == RECORDER
    assert server["task_data_filters"][0]["filters"][-1]["args"]["direction"] == "server_to_site"
    # A job that already filters train results (a quantiser) keeps its filter first, the probe after it.
    client["task_result_filters"] = [{"tasks": ["train"], "filters": [{"path": "x.Quantizer", "args": {}}]}]
    (job_dir / "app/config/config_fed_client.json").write_text(json.dumps(client))
    add_byte_probes(job_dir)
    chain = json.loads((job_dir / "app/config/config_fed_client.json").read_text())["task_result_filters"][0]
    assert [f["path"] for f in chain["filters"]] == ["x.Quantizer", RECORDER]


def _write_run(tmp_path: Path) -> tuple[Path, dict[str, Path]]:
    server = tmp_path / "server"
    (server / "cross_site_val").mkdir(parents=True)
    (server / "fedseg3d").mkdir()
    matrix = {s: {"SRV_FL_global_model.pt": {"val_mean_dice": d, "val_dice_organ": d + 0.1, "val_dice_lesion": d - 0.1},
                  "SRV_best_FL_global_model.pt": {"val_mean_dice": 0},
                  "site-1": {"val_mean_dice": d - 0.1}, "site-2": {"val_mean_dice": d - 0.2}}
              for s, d in (("site-1", 0.8), ("site-2", 0.6))}  # fmt: skip
    (server / "cross_site_val" / "cross_val_results.json").write_text(json.dumps(matrix))
    lines = []
    for r in (0, 1):
        for i, site in enumerate(("site-1", "site-2")):
            lines.append({"round": r, "site": site, "time": 100 + 10 * r + i, "return_code": "OK", "array_bytes": 40,
                          "initial_metrics": {"val_mean_dice": 0.1 * (r + 1)},
                          "site_metrics": {"train_seconds": 2.0 + i, "train_cases": 4, "train_patches": 8,
                                           "train_voxels": 800}})  # fmt: skip
    lines.append({"round": 1, "site": "site-3", "time": 130, "return_code": "EXECUTION_EXCEPTION"})
    (server / "fedseg3d" / "contributions.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    down = [{"round": r, "bytes": 100} for r in (0, 0, 1, 1)]
    (server / "fedseg3d" / BYTES_FILES["server_to_site"]).write_text("\n".join(map(json.dumps, down)) + "\n")
    sites = {}
    for site in ("site-1", "site-2"):
        sites[site] = tmp_path / site
        (sites[site] / "fedseg3d").mkdir(parents=True)
        up = [{"round": None, "bytes": 60}, {"round": None, "bytes": 70}]
        (sites[site] / "fedseg3d" / BYTES_FILES["site_to_server"]).write_text("\n".join(map(json.dumps, up)) + "\n")
    return server, sites


def test_parse_run_reads_dice_bytes_and_timings(tmp_path):
    server, sites = _write_run(tmp_path)
    result = parse_run("unet3d_fedbn", server, sites)
    assert result.matrix["site-1"] == pytest.approx({"global": 0.8, "site-1": 0.7, "site-2": 0.6})
    assert result.class_matrix["site-2"]["global"] == pytest.approx({"organ": 0.7, "lesion": 0.5})
    assert result.per_round[0] == pytest.approx({"site-1": 0.1, "site-2": 0.1})
    assert result.per_round[2] == pytest.approx({"site-1": 0.8, "site-2": 0.6}), (
        "after the last round: the final global model"
    )
    assert result.bytes_per_round == {"server_to_site": {0: 200, 1: 200}, "site_to_server": {0: 120, 1: 140}}
    assert len(result.rounds) == 4, "failed contributions are not counted"
    wall, slowest, overhead = round_overhead(result)
    assert wall == {1: 10.0} and slowest == {1: 3.0} and overhead[1] == pytest.approx(10 / 3)


def test_parse_run_names_the_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="cross_val_results.json"):
        parse_run("unet3d_fedbn", tmp_path, {})


def test_a_dp_run_with_a_contribution_lacking_its_privacy_record_is_refused(tmp_path):
    server, sites = _write_run(tmp_path)
    path = server / "fedseg3d" / "contributions.jsonl"
    entries = [json.loads(line) for line in path.read_text().splitlines()]
    privacy = {"epsilon": 1.5, "delta": 1e-5, "unit": "patient", "scope": "job"}
    records = []

    def declare(site: str) -> None:
        """``site``'s accepted updates carry a privacy record, as a DP site's do."""
        for entry in entries:
            if entry["return_code"] == "OK" and entry["site"] == site:
                entry["privacy"] = privacy
                records.append({"round": entry["round"], "site": site, **privacy})
        path.write_text("".join(json.dumps(e) + "\n" for e in entries))
        (server / "fedseg3d" / "privacy.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))

    declare("site-2")
    with pytest.raises(ValueError, match=r"contributions.jsonl: a DP run.*site-1 \(last accepted round 1\)$"):
        parse_run("unet3d_dpsgd", server, sites)
    declare("site-1")  # once site-1 declares its epsilon too, the run parses and both sites have one
    assert parse_run("unet3d_dpsgd", server, sites).epsilon == {"site-1": 1.5, "site-2": 1.5}


def test_summaries_name_the_model_each_method_hands_a_site():
    sites = ["site-1", "site-2"]
    local = method_summary("local_only", {"matrix": {"site-1": {"site-1": 0.8, "site-2": 0.2},
                                                     "site-2": {"site-1": 0.4, "site-2": 0.6}}}, sites)  # fmt: skip
    assert local["own"] == {"site-1": 0.8, "site-2": 0.6} and local["all_sites_mean"] == pytest.approx(0.5)
    assert local["score"] == local["own"]
    classes = {s: {"pooled": {"organ": 0.9, "lesion": 0.5}} for s in sites}
    pooled = method_summary("pooled", {"matrix": {s: {"pooled": 0.7} for s in sites}, "class_matrix": classes}, sites)
    assert pooled["score"] == {"site-1": 0.7, "site-2": 0.7} and pooled["class_score"]["site-1"]["lesion"] == 0.5
    fedbn = method_summary("fedbn", {"matrix": {s: {"global": 0.695, s: 0.7} for s in sites}}, sites)
    assert fedbn["score"] == {"site-1": 0.695, "site-2": 0.695} and fedbn["class_score"] == {s: {} for s in sites}
    assert overhead_goal(1.3)["met"] is False and overhead_goal(math.nan)["met"] is None


def test_every_method_starts_from_the_same_weights(tmp_path):
    import torch
    from monai.utils import set_determinism

    from fedseg3d.models.presets import PresetUNet, build_model

    cfg = make_config("quick", seed=3)
    job_dir = build_bench_job(cfg, "unet3d_fedbn", tmp_path)
    server = json.loads((job_dir / "app/config/config_fed_server.json").read_text())
    (persistor,) = [c for c in server["components"] if c["id"] == "persistor"]
    model_args = persistor["args"]["model"]["args"]
    assert model_args["seed"] == 3
    served = PresetUNet(server["model_preset"], server["num_classes"], model_args["seed"]).state_dict()
    set_determinism(seed=3)  # what SiteTrainer does before building its model
    local = build_model("unet3d_tiny", out_channels=3).state_dict()
    set_determinism(seed=None)
    assert all(torch.equal(served[k], local[k]) for k in local)
    assert not torch.equal(PresetUNet(num_classes=3, seed=4).state_dict()[next(iter(local))], served[next(iter(local))])


def test_parse_run_refuses_a_run_that_a_site_never_joined(tmp_path):
    server, sites = _write_run(tmp_path)
    sites["site-3"] = tmp_path / "site-3" / "simulate_job"  # a site of the federation with no update and no row
    with pytest.raises(SiteMissing, match=r"\['site-3'\]"):
        parse_run("unet3d_fedbn", server, sites)
