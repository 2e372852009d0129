"""Runs split by seed merge into the report one run over every seed would give, and mismatched runs are refused."""

import json

import pytest

from benchmarks.aggregate import aggregate, goal_checks
from benchmarks.merge import merge, merge_results
from tests.unit.benchmarks.test_aggregate import SITES, _per_seed

METHODS = ["local_only", "pooled", "fedavg", "fedbn"]


def _run(seeds: list[str], rounds: int = 10, methods: list[str] = METHODS) -> dict:
    per_seed = {
        s: {key: {m: x for m, x in part.items() if m in methods} for key, part in v.items()}
        for s, v in _per_seed().items()
        if s in seeds
    }
    load = {"min": 1.0, "mean": 2.0, "max": 3.0, "samples": 4}
    return {
        "meta": {"command": f"run {seeds}", "wall_seconds": 60.0 * len(seeds), "phases": [], "load_1min": load},
        "config": {"seed": int(seeds[0]), "seeds": [int(s) for s in seeds], "rounds": rounds, "site_names": SITES,
                   "methods": methods, "modalities": {"site-1": "CT", "site-2": "MR"},
                   "val_cases_per_site": {"site-1": 1, "site-2": 1}},
        "methods": {m: {"matrix": m} for m in methods}, "summary": {}, "per_seed": per_seed,
        "not_run": {f"{m} (seed {s})": "failed: left out" for m in METHODS if m not in methods for s in seeds},
    }  # fmt: skip


def test_split_runs_merge_into_the_whole():
    merged = merge_results({"a": _run(["1", "2"]), "b": _run(["0"])}, "merge")
    assert merged["config"]["seeds"] == [0, 1, 2] and merged["config"]["seed"] == 0
    assert merged["stats"] == aggregate(_per_seed(), SITES, METHODS)
    assert merged["meta"]["wall_seconds"] == 120.0, "runs side by side: the longest one's wall time"
    assert merged["meta"]["command"].startswith("merge (merging: run ['1', '2']; run ['0'])")
    assert merged["goals"] == goal_checks(merged["stats"], SITES, odd_site=None)
    assert merged["power"]["available"] and merged["power"]["seeds"] == 3


def test_runs_with_other_settings_or_a_shared_seed_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"b/results.json: settings \['rounds'\] differ"):
        merge_results({"a": _run(["0"]), "b": _run(["1"], rounds=20)}, "merge")
    with pytest.raises(ValueError, match=r"seed 0 of \['fedavg', 'fedbn', 'local_only', 'pooled'\] is also in"):
        merge_results({"a": _run(["0"]), "b": _run(["0", "1"])}, "merge")
    for name, seeds in (("a", ["0"]), ("b", ["1", "2"])):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(_run(seeds)))
    merge([tmp_path / "a", tmp_path / "b"], tmp_path / "out", "merge")
    assert json.loads((tmp_path / "out" / "results.json").read_text())["config"]["seeds"] == [0, 1, 2]


def test_runs_split_by_method_merge_into_the_whole():
    runs = {"a": _run(["0", "1", "2"], methods=["local_only", "fedbn"]), "b": _run(["0", "1", "2"], methods=["fedavg"])}
    runs["c"] = _run(["0", "1", "2"], methods=["pooled"])
    merged = merge_results(runs, "merge")
    assert merged["stats"] == aggregate(_per_seed(), SITES, METHODS)
    assert merged["config"]["methods"] == METHODS, "in the benchmark's order"
    assert merged["not_run"] == {}, "a method another run did is not reported as not run"
    assert set(merged["methods"]) == set(METHODS), "every method's detail tables"
