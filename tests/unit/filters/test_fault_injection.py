"""The fault drill filter changes only the named site's update, by the round's scheduled fault."""

import json

import numpy as np
import pytest
from nvflare.apis.dxo import DXO, DataKind, MetaKey, from_shareable
from nvflare.apis.fl_context import FLContextManager

from fedseg3d.filters.fault_injection import FaultInjectionFilter, add_fault_injection, corrupt


def context(site):
    manager = FLContextManager(engine=None, identity_name=site, job_id="j", public_stickers={}, private_stickers={})
    return manager.new_context()


def shareable(round_num, value=1.0):
    data = {"w": np.full(4, value, dtype=np.float32)}
    return DXO(DataKind.WEIGHT_DIFF, data, meta={MetaKey.CURRENT_ROUND: round_num}).to_shareable()


def test_only_the_named_site_is_corrupted_by_the_rounds_fault():
    drill = FaultInjectionFilter("site-3", ["scale", "sign_flip", "free_rider", "none"])
    assert np.all(from_shareable(drill.process(shareable(0), context("site-1"))).data["w"] == 1.0)
    expected = {0: 100.0, 1: -1.0, 2: 0.0, 3: 1.0, 4: 100.0}
    for r, value in expected.items():
        assert np.all(from_shareable(drill.process(shareable(r), context("site-3"))).data["w"] == value)


def test_noise_keeps_the_size_and_replay_resends_the_previous_update():
    rng = np.random.default_rng(0)
    update = {"w": np.linspace(-1, 1, 10_000).astype(np.float32)}
    noisy = corrupt("noise", update, rng, None)
    assert noisy["w"].dtype == np.float32 and abs(noisy["w"].std() - update["w"].std()) < 0.02
    previous = {"w": np.ones(3)}
    assert np.array_equal(corrupt("replay", update, rng, previous)["w"], previous["w"])


def test_bad_settings_and_data_kinds_are_refused():
    with pytest.raises(ValueError, match="faults must be a non-empty list"):
        FaultInjectionFilter("site-1", ["explode"])
    drill = FaultInjectionFilter("site-1", ["scale"])
    weights = DXO(DataKind.WEIGHTS, {"w": np.ones(2)}).to_shareable()
    with pytest.raises(ValueError, match="needs WEIGHT_DIFF"):
        drill.process(weights, context("site-1"))


def test_added_before_the_quantizer_of_a_built_job(tmp_path):
    config_dir = tmp_path / "app" / "config"
    config_dir.mkdir(parents=True)
    filters = [{"path": "x.GaussianDPFilter"}, {"path": "x.QuantizeFilter"}]
    config = {"task_result_filters": [{"tasks": ["train"], "filters": filters}]}
    (config_dir / "config_fed_client.json").write_text(json.dumps(config))
    path = add_fault_injection(tmp_path, "site-2", ["noise"])
    names = [f["path"].rsplit(".", 1)[-1] for f in json.loads(path.read_text())["task_result_filters"][0]["filters"]]
    assert names == ["GaussianDPFilter", "FaultInjectionFilter", "QuantizeFilter"]
