import pytest
from nvflare.app_common.abstract.fl_model import FLModel

from fedseg3d.server.fedavg import ResilientFedAvg


def test_round_with_too_few_sites_stops_with_the_reason():
    controller = ResilientFedAvg(num_clients=3, num_rounds=2, min_sites=2)
    controller.current_round = 4
    with pytest.raises(RuntimeError, match=r"round 4: only 1 site\(s\) returned a usable update, min_sites is 2"):
        controller.update_model(FLModel(params={}), FLModel(params={}, meta={"nr_aggregated": 1}))


def test_individual_failures_are_judged_here_not_by_flare():
    assert ResilientFedAvg(num_clients=2, min_sites=1)._ignore_result_error is True
    with pytest.raises(ValueError, match="min_sites must be a positive integer"):
        ResilientFedAvg(num_clients=2, min_sites=0)
