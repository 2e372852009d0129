"""The benchmark's quick mode, run for real: direct training, five simulator jobs (FedAvg, FedProx, FedBN, one DP
and one quantised job) and one POC deployment.

Asserts on what the report must contain (every method scored at every site, bytes in both directions, cost figures
from POC), never on how fast it was.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from benchmarks.run import main

pytestmark = [pytest.mark.e2e, pytest.mark.bench]
METHODS = {"local_only", "pooled", "fedavg", "fedprox", "fedbn"}


def _dice(value) -> bool:
    return isinstance(value, float) and 0.0 <= value <= 1.0


def test_quick_benchmark_reports_every_method_and_the_costs(tmp_path: Path, capsys):
    out = tmp_path / "report"
    code = main(["--mode", "quick", "--out", str(out), "--work", str(tmp_path / "work"), "--timeout", "600"])
    printed = capsys.readouterr().out
    assert code == 0, printed[-3000:]
    results = json.loads((out / "results.json").read_text())
    sites = results["config"]["site_names"]
    assert set(results["methods"]) >= METHODS
    summary = results["summary"]
    for method in ("pooled", "fedavg", "fedprox", "fedbn"):
        assert all(_dice(summary[method]["global"][s]) for s in sites), method
    for method in ("local_only", "fedavg", "fedprox", "fedbn"):
        assert all(_dice(summary[method]["own"][s]) for s in sites), method
    local = results["methods"]["local_only"]["matrix"]
    assert all(_dice(local[e][o]) for e in sites for o in sites), "local-only models scored at every site"
    for method in ("fedavg", "fedprox", "fedbn"):
        raw = results["methods"][method]
        assert len(raw["per_round"]) == results["config"]["rounds"] + 1
        rounds = raw["bytes_per_round"]
        assert set(rounds["site_to_server"]) == set(rounds["server_to_site"]) == {"0", "1"}
        assert min(rounds["site_to_server"].values()) > 100_000, "a U-Net update is hundreds of kB"
    poc = results["poc"]
    assert poc["status"] == "FINISHED:COMPLETED", poc
    assert poc["registration_seconds"] > 0 and math.isfinite(poc["overhead_median"]) and poc["overhead_median"] > 1
    assert set(poc["peak_rss_bytes"]) == {"server", *sites} and min(poc["peak_rss_bytes"].values()) > 50 * 2**20
    assert {t["site"] for t in poc["throughput"]} == set(sites) and all(
        t["voxels_per_s"] > 0 for t in poc["throughput"]
    )
    assert [g["met"] for g in results["goals"]][2] is not None
    for png in ("dice_per_round.png", "dice_per_site.png", "dice_vs_bytes.png"):
        assert (out / png).stat().st_size > 10_000, png
    report = (out / "report.md").read_text()
    assert "no GPU" in report and "SCAFFOLD" in report
    # One DP job and one quantised job ride along in quick mode: epsilon per site, and fewer bytes than FedBN's.
    dp = [m for m, raw in results["methods"].items() if raw.get("epsilon")]
    assert len(dp) == 1 and set(results["methods"][dp[0]]["epsilon"]) == set(sites), _dp_diagnosis(tmp_path, results)
    assert all(eps > 0 for eps in results["methods"][dp[0]]["epsilon"].values())
    (quantised,) = set(results["methods"]) - METHODS - set(dp)
    for direction in ("site_to_server", "server_to_site"):
        fp32 = results["methods"]["fedbn"]["bytes_per_round"][direction]
        smaller = results["methods"][quantised]["bytes_per_round"][direction]
        assert smaller["1"] * 2 < fp32["1"], (quantised, direction, smaller, fp32)
    assert (out / "dice_vs_epsilon.png").stat().st_size > 10_000
    assert "| mean" in printed and "federation overhead" in printed


def _dp_diagnosis(tmp_path: Path, results: dict) -> str:
    """What a failed DP check needs to be explained: the methods that failed, the server's records of the DP run and
    the sites' privacy lines in its log (the run's folder is gone by the time CI reports)."""
    lines = []
    sim = tmp_path / "work" / "sim"
    dp_jobs = sorted({p.relative_to(sim).parts[0] for p in sim.rglob("privacy.jsonl")} | {"unet3d_dpsgd"})
    for job in dp_jobs:
        for name in ("contributions.jsonl", "privacy.jsonl"):
            for path in (sim / job).rglob(name):
                records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
                kept = [{k: r.get(k) for k in ("round", "site", "return_code", "epsilon", "privacy")} for r in records]
                lines.append(f"{path}: {kept}")
    for log in (sim / f"{job}.log" for job in dp_jobs if (sim / f"{job}.log").is_file()):
        wanted = ("charged at", "WARNING", "ERROR", "Aggregated", "refuse")
        lines += [f"{log.name}: {line}" for line in log.read_text().splitlines()
                  if any(w in line for w in wanted) and "nvImageCodec" not in line]  # fmt: skip
    lines.append(f"not run: {results.get('not_run')}")  # last: the tail is what survives the cut
    return "\n".join(lines)[-6000:]
