"""The benchmark's quick mode, run for real: two seeds of direct training and four simulator jobs (FedAvg, FedProx,
FedBN, FedBN-int3), one POC deployment, and the report over seeds.

Asserts on what the report must contain (every method scored at every site on both seeds, an interval for each,
FedBN's paired differences, a verdict for every goal, the power section, bytes in both directions, cost figures from
POC), never on how fast it was or which goal was met.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from benchmarks.run import main

pytestmark = [pytest.mark.e2e, pytest.mark.bench]
METHODS = ["local_only", "pooled", "fedavg", "fedprox", "fedbn", "fedbn_int3"]
VERDICTS = {"met", "missed", "not resolved", "no data"}


def _dice(value) -> bool:
    return isinstance(value, float) and 0.0 <= value <= 1.0


def _interval(raw: dict, n: int) -> bool:
    return raw["n"] == n and raw["low"] <= raw["mean"] <= raw["high"] and math.isfinite(raw["sd"])


def test_quick_benchmark_reports_every_method_over_seeds_and_the_costs(tmp_path: Path, capsys):
    out = tmp_path / "report"
    code = main(["--mode", "quick", "--out", str(out), "--work", str(tmp_path / "work"), "--timeout", "600"])
    printed = capsys.readouterr().out
    assert code == 0, printed[-3000:]
    results = json.loads((out / "results.json").read_text())
    sites, seeds = results["config"]["site_names"], results["config"]["seeds"]
    assert len(seeds) == 2 and sorted(results["per_seed"]) == sorted(map(str, seeds))
    for seed, run in results["per_seed"].items():
        assert sorted(run["summary"]) == sorted(METHODS), seed
        for method, summary in run["summary"].items():
            assert all(_dice(summary["score"][s]) for s in sites), (seed, method)
            assert all(summary["class_score"][s] for s in sites), (seed, method, "per-class Dice")
        assert all(run["wall_seconds"][m] > 0 for m in METHODS), seed
    stats = results["stats"]
    assert stats["methods"] == METHODS
    for method in METHODS:
        assert _interval(stats["mean"][method], 2), method
        assert all(_interval(stats["per_site"][method][s], 2) for s in sites), method
        assert set(stats["per_class"][method]) == {"organ", "lesion"}, method
    assert set(stats["fedbn_minus"]) == set(METHODS) - {"fedbn"}
    assert all(_interval(d["mean"], 2) for d in stats["fedbn_minus"].values())
    goals = results["goals"]
    assert len(goals) == len(sites) + 3 and {g["status"] for g in goals} <= VERDICTS
    assert all(g["status"] != "no data" for g in goals if not g["sentence"].startswith("not applicable"))
    assert results["power"]["available"] and results["power"]["rows"][0]["seeds_if_model_noise"] >= 2
    local = results["methods"]["local_only"]["matrix"]
    assert all(_dice(local[e][o]) for e in sites for o in sites), "local-only models scored at every site"
    for method in ("fedavg", "fedprox", "fedbn", "fedbn_int3"):
        raw = results["methods"][method]
        assert len(raw["per_round"]) == results["config"]["rounds"] + 1
        rounds = raw["bytes_per_round"]
        assert set(rounds["site_to_server"]) == set(rounds["server_to_site"]) == {"0", "1"}
    for direction in ("site_to_server", "server_to_site"):
        fp32 = results["methods"]["fedbn"]["bytes_per_round"][direction]
        int3 = results["methods"]["fedbn_int3"]["bytes_per_round"][direction]
        assert min(fp32.values()) > 100_000, "a U-Net update is hundreds of kB"
        assert int3["1"] * 4 < fp32["1"], (direction, int3, fp32)
    poc = results["poc"]
    assert poc["status"] == "FINISHED:COMPLETED", poc
    assert poc["registration_seconds"] > 0 and math.isfinite(poc["overhead_median"]) and poc["overhead_median"] > 1
    assert set(poc["peak_rss_bytes"]) == {"server", *sites} and min(poc["peak_rss_bytes"].values()) > 50 * 2**20
    assert {t["site"] for t in poc["throughput"]} == set(sites) and all(
        t["voxels_per_s"] > 0 for t in poc["throughput"]
    )
    assert results["cost_goal"]["met"] is not None
    for png in ("dice_intervals.png", "dice_per_round.png", "dice_per_site.png", "dice_vs_bytes.png"):
        assert (out / png).stat().st_size > 10_000, png
    report = (out / "report.md").read_text()
    assert "no GPU" in report and "SCAFFOLD" in report and "bench-privacy" in report
    for heading in ("95% interval] over seeds", "FedBN minus each other method", "Goals (issue 25)",
                    "Can this benchmark resolve 0.01", "Wall time per method"):  # fmt: skip
        assert heading in report, heading
    assert "| mean over sites" in printed and "federation overhead" in printed
