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


def test_deadline_knobs_are_checked_and_fedavg_arguments_kept():
    with pytest.raises(ValueError, match="round_deadline must be a number of seconds >= 0"):
        ResilientFedAvg(num_clients=2, round_deadline=-1)
    with pytest.raises(ValueError, match="round_time_limit .* must be 0 or >= round_deadline"):
        ResilientFedAvg(num_clients=2, round_deadline=60, round_time_limit=30)
    aggregator = object()
    controller = ResilientFedAvg(num_clients=2, start_round=3, aggregator=aggregator, round_deadline=5)
    assert controller.start_round == 3 and controller.aggregator is aggregator and controller.round_deadline == 5.0
