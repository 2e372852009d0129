"""The quantised jobs: one job per base job, every scheme one ``--set scheme=...`` away, filters in wire order.

Order matters and a wrong order fails late (or, for DP, silently weakens the claim): the site must noise before it
quantises and quantise last; the server must measure what arrived before it dequantises; the site must dequantise
before it rebuilds the global model from a difference.

One source: a quantised job is its base job plus the compression parts, nothing else, so a change to the base job
that is not made to its quantised twin fails here, naming the part that drifted.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
from nvflare.apis.dxo import DXO, DataKind, from_shareable

from fedseg3d.compression import codecs
from fedseg3d.filters.downlink_delta import GlobalModelDeltaDecoder
from fedseg3d.filters.quantize_filter import DequantizeFilter, QuantizeFilter
from fedseg3d.server.downlink_delta import GlobalModelDeltaEncoder
from fedseg3d.tools.build_jobs import build_jobs
from tests.unit.server.test_downlink_delta import _ctx
from tests.unit.test_job_configs import load_config

REPO = Path(__file__).resolve().parents[2]
# quantised job -> the job it compresses
QUANT_JOBS = {"unet3d_fedbn_quantized": "unet3d_fedbn", "unet3d_fedbn_dp_quantized": "unet3d_fedbn_dp"}
F = "fedseg3d.filters."
S = "fedseg3d.server."
COMPRESSION_PATHS = {
    F + "quantize_filter.QuantizeFilter",
    F + "quantize_filter.DequantizeFilter",
    S + "downlink_delta.GlobalModelDeltaEncoder",
    F + "downlink_delta.GlobalModelDeltaDecoder",
    S + "downlink_delta.RebaseOnSiteCopy",
    S + "downlink_delta.SiteGapStore",
}
COMPRESSION_KNOBS = {"scheme", "block_size", "topk_fraction", "full_scheme", "error_feedback", "quant_seed"}
COMPRESSION_KNOBS |= {"single_payload"}
SIDES = ("client", "server")


def chain(config: dict, key: str, task: str) -> list[str]:
    matching = [c for c in config[key] if task in c["tasks"]]
    assert len(matching) <= 1, f"{key}: task {task} is in {len(matching)} chains"
    return [f["path"] for f in matching[0]["filters"]] if matching else []


def load(job: str, side: str) -> dict:
    return json.loads((REPO / "jobs" / job / "app" / "config" / f"config_fed_{side}.json").read_text())


def split_compression(config: dict) -> tuple[dict, dict]:
    """(the config without its compression parts, the compression parts): knobs, components and filters."""
    rest = copy.deepcopy(config)
    parts = {"knobs": {k: rest.pop(k) for k in COMPRESSION_KNOBS if k in rest}, "components": [], "filters": {}}
    parts["components"] = [c for c in rest.get("components", []) if c["path"] in COMPRESSION_PATHS]
    rest["components"] = [c for c in rest.get("components", []) if c["path"] not in COMPRESSION_PATHS]
    for key in ("task_data_filters", "task_result_filters"):
        chains = []
        for c in rest[key]:
            ours = [f for f in c["filters"] if f["path"] in COMPRESSION_PATHS]
            parts["filters"][f"{key} {c['tasks']}"] = [{k: v for k, v in f.items() if k != "id"} for f in ours]
            kept = [f for f in c["filters"] if f["path"] not in COMPRESSION_PATHS]
            if kept:
                chains.append({**c, "filters": kept})
        rest[key] = chains
    return rest, parts


@pytest.mark.parametrize("job", sorted(QUANT_JOBS))
@pytest.mark.parametrize("side", SIDES)
def test_quantised_job_is_its_base_job_plus_the_compression_parts(job, side):
    rest, _ = split_compression(load(job, side))
    base = load(QUANT_JOBS[job], side)
    drifted = sorted(k for k in set(rest) | set(base) if rest.get(k) != base.get(k))
    assert not drifted, f"jobs/{job} config_fed_{side}.json differs from jobs/{QUANT_JOBS[job]} in {drifted}"
    meta, base_meta = (json.loads((REPO / "jobs" / j / "meta.json").read_text()) for j in (job, QUANT_JOBS[job]))
    assert meta == {**base_meta, "name": job}


@pytest.mark.parametrize("side", SIDES)
def test_every_quantised_job_compresses_the_same_way(side):
    parts = {job: split_compression(load(job, side))[1] for job in QUANT_JOBS}
    first, *others = parts
    for job in others:
        assert parts[job] == parts[first], f"{job} and {first} differ in their compression parts ({side})"


@pytest.mark.parametrize("job", sorted(QUANT_JOBS))
def test_filter_order_for_training(job):
    client, server = load(job, "client"), load(job, "server")
    site_out = chain(client, "task_result_filters", "train")
    assert site_out[-1] == F + "quantize_filter.QuantizeFilter"
    if "_dp_" in job:
        assert site_out == [F + "gaussian_dp.GaussianDPFilter", F + "quantize_filter.QuantizeFilter"]
    assert chain(server, "task_result_filters", "train") == [
        F + "message_size.MessageSizeRecorder",
        F + "quantize_filter.DequantizeFilter",
        S + "downlink_delta.RebaseOnSiteCopy",
    ]
    stores = [c["id"] for c in server["components"] if c["path"] == S + "downlink_delta.SiteGapStore"]
    encoder = next(c for c in server["task_data_filters"] if "train" in c["tasks"])["filters"][0]
    rebase = next(c for c in server["task_result_filters"] if "train" in c["tasks"])["filters"][-1]
    assert stores == [encoder["args"]["gap_store_id"]] == [rebase["args"]["gap_store_id"]]
    assert chain(server, "task_data_filters", "train") == [
        S + "downlink_delta.GlobalModelDeltaEncoder",
        F + "message_size.MessageSizeRecorder",
    ]
    assert chain(client, "task_data_filters", "train") == [
        F + "quantize_filter.DequantizeFilter",
        F + "downlink_delta.GlobalModelDeltaDecoder",
    ]


@pytest.mark.parametrize("job", sorted(QUANT_JOBS))
def test_cross_site_evaluation_is_not_quantised(job):
    client, server = load(job, "client"), load(job, "server")
    for task in ("validate", "submit_model"):
        assert chain(client, "task_result_filters", task) == []
        assert chain(client, "task_data_filters", task) == []
        assert chain(server, "task_data_filters", task) == [F + "message_size.MessageSizeRecorder"]


def test_dp_job_does_not_serve_unnoised_local_models():
    client, server = load("unet3d_fedbn_dp_quantized", "client"), load("unet3d_fedbn_dp_quantized", "server")
    assert "submit_model" not in client["executors"][0]["tasks"]
    cross_site = next(w for w in server["workflows"] if w["id"] == "cross_site_eval")
    assert cross_site["args"]["submit_model_task_name"] == ""


def built_filters(tmp_path: Path, overrides: dict) -> tuple[QuantizeFilter, GlobalModelDeltaEncoder]:
    """The job as ``build_jobs --set`` writes it, its two encoders constructed as FLARE does at job start."""
    (job_dir,) = build_jobs(REPO / "jobs", tmp_path, ["unet3d_fedbn_quantized"], overrides, with_code=False)
    client = load_config(job_dir / "app" / "config" / "config_fed_client.json")
    server = load_config(job_dir / "app" / "config" / "config_fed_server.json")
    site_filters = [f for c in client["task_result_filters"] for f in c["filters"]]
    server_filters = [f for c in server["task_data_filters"] for f in c["filters"]]
    (quantize,) = (f for f in site_filters if f["path"].endswith(".QuantizeFilter"))
    (encode,) = (f for f in server_filters if f["path"].endswith(".GlobalModelDeltaEncoder"))
    return QuantizeFilter(**quantize["args"]), GlobalModelDeltaEncoder(**encode["args"])


@pytest.mark.parametrize("scheme", codecs.SCHEMES)
def test_one_knob_gives_a_working_job_for_every_scheme(scheme, tmp_path):
    """``--set scheme=X`` alone: both directions use X, with block size and first-model codec that suit X."""
    quantize, encoder = built_filters(tmp_path, {"scheme": scheme})
    # The gap store (a server component, unit-tested with the encoder) does not depend on the scheme.
    encoder.gap_store_id = ""
    assert quantize.scheme == encoder.scheme == scheme
    if scheme == "fp16":
        assert encoder.full_scheme == "fp16"
    else:  # a full model is never top-k (it would zero most weights) nor coarser than 4 bits or than the differences
        full_bits = codecs.BLOCKWISE_BITS[encoder.full_scheme]
        assert full_bits >= max(4, codecs.BLOCKWISE_BITS.get(scheme, 0))
    rng = np.random.default_rng(0)
    model = {"w": rng.standard_normal((8, 4, 3, 3, 3)).astype(np.float32), "b": np.zeros(8, np.float32)}
    # Downlink twice (full model, then a difference) and uplink once, through the job's own filters.
    decoder, dequantize = GlobalModelDeltaDecoder(), DequantizeFilter()
    for step in (0.0, 0.01):
        moved = {k: v + step for k, v in model.items()}
        sent = encoder.process(DXO(DataKind.WEIGHTS, moved).to_shareable(), _ctx("server", peer="site-1"))
        received = from_shareable(decoder.process(dequantize.process(sent, _ctx("site-1")), _ctx("site-1"))).data
        assert set(received) == set(model) and all(np.all(np.isfinite(v)) for v in received.values())
    diff = {k: rng.standard_normal(v.shape).astype(np.float32) * 1e-3 for k, v in model.items()}
    up = quantize.process(DXO(DataKind.WEIGHT_DIFF, diff).to_shareable(), _ctx("site-1"))
    restored = from_shareable(dequantize.process(up, _ctx("server")))
    assert restored.data_kind == DataKind.WEIGHT_DIFF and set(restored.data) == set(diff)


@pytest.mark.parametrize(
    ("knob", "value"),
    [("scheme", "int9"), ("full_scheme", "topk"), ("block_size", 0), ("topk_fraction", 0), ("block_size", 64)],
    ids=["scheme", "full_scheme", "block_size", "topk_fraction", "block_size_with_fp16"],
)
def test_a_bad_knob_fails_at_job_start_naming_the_knob(knob, value, tmp_path):
    overrides = {knob: value, "scheme": "fp16"} if knob == "block_size" and value == 64 else {knob: value}
    with pytest.raises(ValueError, match=knob):
        built_filters(tmp_path, overrides)
