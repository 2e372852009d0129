"""ScreenedAggregator through FLARE's ModelAggregator methods, as FedAvg calls them."""

import logging

import numpy as np
import pytest
from nvflare.apis.dxo import MetaKey
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
from nvflare.app_common.utils.fl_model_utils import FLModelUtils

from fedseg3d.server.screened_aggregator import QC_META_KEY, ScreenedAggregator

SITES = ["site-1", "site-2", "site-3", "site-4"]


def result(site, params, round_num, samples=10):
    meta = {"client_name": site, MetaKey.NUM_STEPS_CURRENT_ROUND: samples}
    return FLModel(params_type=ParamsType.DIFF, params=params, current_round=round_num, meta=meta)


def honest(rng, dim=500):
    common = rng.normal(size=dim)
    return [{"w": (common + 0.3 * rng.normal(size=dim)).astype(np.float32)} for _ in SITES]


def run_round(aggregator, params, round_num):
    aggregator.reset_stats()
    for site, p in zip(SITES, params, strict=True):
        aggregator.accept_model(result(site, p, round_num))
    return aggregator.aggregate_model()


def test_a_bad_update_is_excluded_and_logged_and_the_rest_averaged(caplog):
    rng = np.random.default_rng(0)
    params = honest(rng)
    params[2] = {"w": params[2]["w"] * 100}
    with caplog.at_level(logging.WARNING):
        out = run_round(ScreenedAggregator(), params, 3)
    np.testing.assert_allclose(out.params["w"], np.mean([params[i]["w"] for i in (0, 1, 3)], axis=0), rtol=1e-5)
    assert out.params_type == ParamsType.DIFF
    assert "update QC: round 3: excluded the update of site-3: norm" in caplog.text
    verdicts = {v["site"]: v["accepted"] for v in out.meta[QC_META_KEY]["verdicts"]}
    assert verdicts == {"site-1": True, "site-2": True, "site-3": False, "site-4": True}


def test_with_qc_off_everything_is_aggregated():
    rng = np.random.default_rng(1)
    params = honest(rng)
    params[2] = {"w": params[2]["w"] * 100}
    out = run_round(ScreenedAggregator(update_qc=False), params, 0)
    np.testing.assert_allclose(out.params["w"], np.mean([p["w"] for p in params], axis=0), rtol=1e-5)


def test_repeated_exclusions_mark_the_site(caplog):
    rng = np.random.default_rng(2)
    aggregator = ScreenedAggregator(exclusions_to_flag=2)
    with caplog.at_level(logging.ERROR):
        for r in range(3):
            params = honest(rng)
            params[1] = {"w": -params[1]["w"]}
            out = run_round(aggregator, params, r)
    assert "update QC: site site-2 marked for the admin: 2 of its updates excluded (rounds [0, 1])" in caplog.text
    assert caplog.text.count("marked for the admin") == 1
    assert out.meta[QC_META_KEY]["flagged_sites"]["site-2"]["rounds"] == [0, 1, 2]


def test_too_few_passing_updates_keep_the_global_model(caplog):
    rng = np.random.default_rng(3)
    params = honest(rng)
    params[0] = {"w": np.full(500, np.nan, dtype=np.float32)}
    with caplog.at_level(logging.ERROR):
        out = run_round(ScreenedAggregator(min_sites=4), params, 5)
    assert "round 5: 3 of 4 updates passed, min_sites is 4: the global model is kept unchanged" in caplog.text
    model = FLModel(params_type=ParamsType.FULL, params={"w": np.ones(500)})
    assert np.array_equal(FLModelUtils.update_model(model, out).params["w"], np.ones(500))


@pytest.mark.parametrize("rule", ["median", "trimmed_mean", "norm_bound"])
def test_robust_rules_are_selectable(rule):
    params = honest(np.random.default_rng(4))
    out = run_round(ScreenedAggregator(update_qc=False, aggregation_rule=rule), params, 0)
    assert out.params["w"].shape == (500,) and out.meta[QC_META_KEY]["aggregation_rule"] == rule


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="aggregation_rule must be one of"):
        ScreenedAggregator(aggregation_rule="mean")
    with pytest.raises(ValueError, match="exclusions_to_flag must be a positive integer"):
        ScreenedAggregator(exclusions_to_flag=0)
