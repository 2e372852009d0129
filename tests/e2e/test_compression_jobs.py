"""The quantised job in the real FLARE simulator, one scheme per ``--set scheme=...``: the bytes each message takes on
the wire shrink by the expected factor against the float32 job, in both directions, and the federation still trains
(2 sites, 2 rounds, tiny volumes). A scheme the filters do not know stops the job at start, naming the knob.

Both runs record every message on the server (``fedseg3d/message_sizes.jsonl``): what the server sends, after its
quantiser, and what it receives, before its dequantiser. The ratios compare the same (round, site, direction).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from fedseg3d.privacy.site_budget import write_site_budget
from fedseg3d.tools.build_jobs import build_jobs
from fedseg3d.tools.simulate import run_simulation
from tests.e2e.test_simulator_jobs import OVERRIDES, REPO, SITES, contributions, simulate

pytestmark = pytest.mark.e2e

# case -> (job, --set overrides, (uplink low, high), (first downlink low, high), (later downlink low, high)). The job
# sends one payload a message, so the float32 message's per-tensor framing counts for the quantised ones: int8 is 4x
# on array bytes less its scales (1/128) and headers; int3 is 32/3.25 = 9.8x less headers, its first (full) model
# goes at 4 bits (32/4.25 = 7.5x); top-k 10% with int8 values is at most 32/(1 + 8 * 0.1 * 1.008) = 17.7x on array
# bytes, its first model goes at int8, and it clears 8x once the site holds a copy. The DP job at its default (int8)
# also proves the filter order: were the update quantised before the DP filter, that filter would refuse the encoded
# DXO and the site would fail its rounds.
CASES = {
    "int3": ("unet3d_fedbn_quantized", {"scheme": "int3"}, (8.5, 10.5), (6.5, 8.2), (8.5, 11.0)),
    "topk": ("unet3d_fedbn_quantized", {"scheme": "topk"}, (8.0, 18.0), (3.0, 4.2), (8.0, 20.0)),
    "dp_int8": ("unet3d_fedbn_dp_quantized", {}, (3.3, 4.2), (3.0, 4.2), (3.3, 4.4)),
}


def message_sizes(workspace: Path) -> dict[tuple[int, str, str, str], int]:
    """(round, site, direction, field) -> bytes, for the inline (``bytes``) and streamed (``streamed_bytes``) sizes."""
    path = workspace / "server" / "simulate_job" / "fedseg3d" / "message_sizes.jsonl"
    entries = [json.loads(line) for line in path.read_text().splitlines()]
    train = [e for e in entries if e["task"] == "train"]
    sizes = {
        (e["round"], e["site"], e["direction"], field): e[field] for e in train for field in ("bytes", "streamed_bytes")
    }
    assert len(train) == 2 * len(SITES) * 2 and len(sizes) == 2 * len(train), f"one per round, site, direction: {train}"
    return sizes


@pytest.fixture(scope="module")
def float32_run(tiny_sites, tmp_path_factory) -> dict[tuple[int, str, str, str], int]:
    return message_sizes(simulate("unet3d_fedbn", tiny_sites, tmp_path_factory.mktemp("fp32")))


@pytest.mark.parametrize("case", sorted(CASES))
def test_quantised_job_shrinks_both_directions_and_still_trains(case, float32_run, tiny_sites, tmp_path):
    job, overrides, (up_low, up_high), (first_low, first_high), (down_low, down_high) = CASES[case]
    privacy_dir = None
    if "_dp_" in job:  # the DP filter requires each site's budget, as a deployed site's local/privacy_budget.json
        privacy_dir = tmp_path / "privacy"
        for site in SITES:
            write_site_budget(privacy_dir / site, epsilon_budget=50.0, delta=1e-5)
    workspace = simulate(job, tiny_sites, tmp_path, extra=overrides, privacy_dir=privacy_dir)
    sizes = message_sizes(workspace)
    assert set(sizes) == set(float32_run)
    for (round_num, site, direction, field), size in sizes.items():
        ratio = float32_run[(round_num, site, direction, field)] / size
        if direction == "site_to_server":
            low, high = up_low, up_high
        else:
            low, high = (first_low, first_high) if round_num == 0 else (down_low, down_high)
        assert low <= ratio <= high, (
            f"{case} round {round_num} {site} {direction} {field}: {ratio:.2f}x not in [{low}, {high}]"
        )

    received = contributions(workspace)
    assert {(c["round"], c["site"]) for c in received} == {(r, s) for r in (0, 1) for s in SITES}
    assert all(c["data_kind"] == "WEIGHT_DIFF" for c in received), "the server aggregates restored differences"
    for c in received:
        assert math.isfinite(c["site_metrics"]["local_val_mean_dice"])
    if "_dp_" in job:
        for site in SITES:
            assert "DP update released" in (workspace / site / "log.txt").read_text()
    server_run = workspace / "server" / "simulate_job"
    events = list((server_run / "tb_events").rglob("events.out.tfevents*"))
    assert any(e.parent.name not in SITES for e in events), "the server wrote its byte counts to TensorBoard"


def test_an_unknown_scheme_stops_the_job_at_start_naming_the_knob(tiny_sites, tmp_path):
    overrides = {**OVERRIDES, "scheme": "int9"}
    (job_dir,) = build_jobs(REPO / "jobs", tmp_path / "jobs", ["unet3d_fedbn_quantized"], overrides, min_clients=2)
    workspace = tmp_path / "ws"
    code = run_simulation(job_dir, workspace, tiny_sites, SITES, timeout=600)
    assert code != 0, "the simulator ran a job whose scheme no filter knows"
    log = (workspace / "server" / "log.txt").read_text()
    assert "scheme must be one of" in log and "'int9'" in log, "the server's error names the knob and the value"
    assert not (workspace / "server" / "simulate_job" / "fedseg3d" / "contributions.jsonl").exists(), "no round ran"
