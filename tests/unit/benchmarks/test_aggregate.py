"""Seeds combined into intervals, FedBN's paired differences, the goals' verdicts, the power section and the tasks."""

import json

import pytest

from benchmarks.aggregate import aggregate, goal_checks
from benchmarks.power import power_analysis, power_markdown
from benchmarks.tasks import get_task, odd_modality_site, real_sites, site_modalities

SITES = ["site-1", "site-2"]


def _summary(scores: dict[str, float], classes: dict[str, dict[str, float]] | None = None) -> dict:
    return {"score": scores, "class_score": classes or {s: {} for s in scores}}


def _per_seed() -> dict:
    """Three seeds; FedBN beats pooled by exactly 0.02 at both sites every seed, FedAvg by 0.05 at site-2 only."""
    out = {}
    for seed, base in (("0", 0.70), ("1", 0.60), ("2", 0.65)):
        out[seed] = {
            "summary": {
                "fedbn": _summary({"site-1": base + 0.02, "site-2": base + 0.02},
                                  {"site-1": {"organ": 0.9, "lesion": 0.5}, "site-2": {"organ": 0.8}}),
                "pooled": _summary({"site-1": base, "site-2": base}),
                "fedavg": _summary({"site-1": base + 0.02, "site-2": base - 0.03}),
                "local_only": _summary({"site-1": base + 0.1, "site-2": base - 0.2}),
            },
            "wall_seconds": {"fedbn": 30.0 + int(seed), "pooled": 10.0, "fedavg": 31.0, "local_only": 8.0},
        }  # fmt: skip
    return out


def test_intervals_over_seeds_and_paired_differences():
    stats = aggregate(_per_seed(), SITES, ["local_only", "pooled", "fedavg", "fedprox", "fedbn"])
    assert stats["methods"] == ["local_only", "pooled", "fedavg", "fedbn"], "a method that never ran is left out"
    assert stats["mean"]["pooled"]["mean"] == pytest.approx(0.65) and stats["mean"]["pooled"]["n"] == 3
    assert stats["mean"]["pooled"]["high"] - stats["mean"]["pooled"]["low"] > 0.1, "seed effects widen it"
    paired = stats["fedbn_minus"]["pooled"]["mean"]
    assert paired["mean"] == pytest.approx(0.02) and paired["high"] - paired["low"] == pytest.approx(0, abs=1e-9)
    assert stats["fedbn_minus"]["fedavg"]["per_site"]["site-2"]["mean"] == pytest.approx(0.05)
    # a class is averaged over the sites whose validation cases hold it
    assert stats["per_class"]["fedbn"]["organ"]["mean"] == pytest.approx(0.85)
    assert stats["per_class"]["fedbn"]["lesion"]["mean"] == pytest.approx(0.5)
    assert stats["wall_seconds"]["fedbn"]["mean"] == pytest.approx(31.0)


def test_goals_say_met_missed_or_not_resolved():
    stats = aggregate(_per_seed(), SITES, ["local_only", "pooled", "fedavg", "fedbn"])
    rows = {r["goal"]: r for r in goal_checks(stats, SITES, odd_site="site-2")}
    assert rows["FedBN at site-1 >= site-1's local-only model"]["status"] == "missed"
    assert rows["FedBN at site-1 >= site-1's local-only model"]["sentence"].startswith("missed by 0.0800")
    assert rows["FedBN at site-2 >= site-2's local-only model"]["status"] == "met"
    assert rows["FedBN within 0.01 of pooled (mean over sites)"]["status"] == "met"
    assert rows["FedBN >= FedAvg + 0.02 at site-2 (modality differs)"]["status"] == "met"
    assert rows["FedBN-int3 within 0.01 of FedBN float32 (mean over sites)"]["status"] == "no data"
    no_odd = goal_checks(stats, SITES, odd_site=None)
    assert any(r["sentence"].startswith("not applicable") for r in no_odd)


def test_int3_goal_reads_the_mirrored_difference():
    per_seed = _per_seed()
    for seed, run in per_seed.items():
        fedbn = run["summary"]["fedbn"]["score"]
        drop = 0.03 if seed == "0" else 0.0  # int3 0.01 lower on average, with spread: not resolved
        run["summary"]["fedbn_int3"] = _summary({s: v - drop for s, v in fedbn.items()})
    stats = aggregate(per_seed, SITES, ["pooled", "fedbn", "fedbn_int3"])
    (row,) = [r for r in goal_checks(stats, SITES, None) if r["goal"].startswith("FedBN-int3")]
    assert row["interval"]["mean"] == pytest.approx(-0.01) and row["status"] == "not resolved"
    assert row["interval"]["low"] < -0.01 < row["interval"]["high"]


def test_power_from_the_measured_spread():
    per_seed = _per_seed()
    per_seed["1"]["summary"]["fedbn"]["score"] = {"site-1": 0.66, "site-2": 0.66}  # difference 0.06 at seed 1
    stats = aggregate(per_seed, SITES, ["pooled", "fedbn"])
    power = power_analysis(stats, val_cases=4, seconds_per_seed=3600.0)
    assert power["available"] and power["sd"] == pytest.approx(stats["fedbn_minus"]["pooled"]["mean"]["sd"])
    first, last = power["rows"][0], power["rows"][-1]
    assert first["val_cases"] == 4 and last["val_cases"] == 32
    assert first["seeds_if_case_noise"] == first["seeds_if_model_noise"]
    assert last["seeds_if_case_noise"] < last["seeds_if_model_noise"], "more cases help only the case-noise end"
    assert power["sd_upper_95"] > power["sd"] and power["seeds_at_sd_upper"] >= first["seeds_if_model_noise"]
    text = "\n".join(power_markdown(power))
    assert "| 32 |" in text and f"{power['sd']:.4f}" in text
    one_seed = aggregate({"0": per_seed["0"]}, SITES, ["pooled", "fedbn"])
    assert not power_analysis(one_seed, 4, 1.0)["available"]
    assert "Not computed" in "\n".join(power_markdown(power_analysis(one_seed, 4, 1.0)))


def test_the_site_whose_modality_differs_comes_from_the_site_facts(tmp_path):
    for site, intensity in (("site-1", "ct_window"), ("site-2", "ct_window"), ("site-3", "mr_percentile")):
        (tmp_path / site).mkdir()
        (tmp_path / site / "site.json").write_text(json.dumps({"datalist": "datalist.json",
                                                               "intensity": {"mode": intensity}}))  # fmt: skip
    modalities = site_modalities(tmp_path, ["site-1", "site-2", "site-3"])
    assert modalities == {"site-1": "CT", "site-2": "CT", "site-3": "MR"}
    assert odd_modality_site(modalities) == "site-3"
    assert odd_modality_site({"site-1": "MR", "site-2": "MR"}) is None
    assert odd_modality_site({"site-1": "CT", "site-2": "MR"}) is None, "two sites: neither is the odd one"
    with pytest.raises(FileNotFoundError, match="fedseg3d data real --out"):
        real_sites(tmp_path, ["site-1", "site-4"])


def test_tasks_carry_the_agreed_knobs():
    real = get_task("real")
    assert real.overrides["class_names"][0] == "background" and len(real.overrides["class_names"]) == 5
    assert not real.generated and get_task("synthetic").overrides == {}
    with pytest.raises(ValueError, match="unknown --data"):
        get_task("mnist")
