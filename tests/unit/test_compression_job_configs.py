"""The quantised jobs put their filters in the order the wire format needs, for the train task only.

Order matters and a wrong order fails late (or, for DP, silently weakens the claim): the site must noise before it
quantises and quantise last; the server must measure what arrived before it dequantises; the site must dequantise
before it rebuilds the global model from a difference.
"""

import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
QUANT_JOBS = [
    "unet3d_fedbn_int8",
    "unet3d_fedbn_int4",
    "unet3d_fedbn_int3",
    "unet3d_fedbn_topk",
    "unet3d_fedbn_dp_int8",
]
F = "fedseg3d.filters."
S = "fedseg3d.server."


def chain(config: dict, key: str, task: str) -> list[str]:
    matching = [c for c in config[key] if task in c["tasks"]]
    assert len(matching) <= 1, f"{key}: task {task} is in {len(matching)} chains"
    return [f["path"] for f in matching[0]["filters"]] if matching else []


def load(job: str, side: str) -> dict:
    return json.loads((REPO / "jobs" / job / "app" / "config" / f"config_fed_{side}.json").read_text())


@pytest.mark.parametrize("job", QUANT_JOBS)
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


@pytest.mark.parametrize("job", QUANT_JOBS)
def test_cross_site_evaluation_is_not_quantised(job):
    client, server = load(job, "client"), load(job, "server")
    for task in ("validate", "submit_model"):
        assert chain(client, "task_result_filters", task) == []
        assert chain(client, "task_data_filters", task) == []
        assert chain(server, "task_data_filters", task) == [F + "message_size.MessageSizeRecorder"]


def test_dp_job_does_not_serve_unnoised_local_models():
    client, server = load("unet3d_fedbn_dp_int8", "client"), load("unet3d_fedbn_dp_int8", "server")
    assert "submit_model" not in client["executors"][0]["tasks"]
    cross_site = next(w for w in server["workflows"] if w["id"] == "cross_site_eval")
    assert cross_site["args"]["submit_model_task_name"] == ""
