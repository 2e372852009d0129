"""FedAvg that survives a broken site but never silently trains on nothing.

FLARE's ``FedAvg`` offers three ways to treat a site's failed task: abort the job on any failure (strict, and the
default when every sampled site must answer), or ignore failures (resilient) -- in which case a round where every
site failed aggregates an empty update and the job goes on "successfully" with a broken global model. Hospitals
need the middle: carry on without a site whose data is broken, and stop with a clear reason when too few sites
are left to make a round meaningful.
"""

from __future__ import annotations

from nvflare.app_common.abstract.fl_model import FLModel
from nvflare.app_common.workflows.fedavg import FedAvg


class ResilientFedAvg(FedAvg):
    """``FedAvg`` that ignores individual site failures as long as at least ``min_sites`` sites contributed.

    Args:
        min_sites: the fewest contributions a round may aggregate; fewer stops the job with an error naming the
            round and the count.
        *args, **kwargs: passed to ``nvflare.app_common.workflows.fedavg.FedAvg`` (``ignore_result_error`` is
            forced to True: failures are judged here instead).
    """

    def __init__(self, *args, min_sites: int = 1, **kwargs) -> None:
        if not isinstance(min_sites, int) or min_sites < 1:
            raise ValueError(f"min_sites must be a positive integer, got {min_sites!r}")
        kwargs["ignore_result_error"] = True
        super().__init__(*args, **kwargs)
        self.min_sites = min_sites

    def update_model(self, model: FLModel, aggr_result: FLModel) -> FLModel:
        received = int((aggr_result.meta or {}).get("nr_aggregated", 0))
        if received < self.min_sites:
            raise RuntimeError(
                f"round {self.current_round}: only {received} site(s) returned a usable update, min_sites is "
                f"{self.min_sites}; stopping instead of continuing with a global model built from too few sites "
                f"(see the failing sites' logs for why)"
            )
        if received < self._expected_count:
            self.warning(f"round {self.current_round}: aggregated {received} of {self._expected_count} sites")
        return super().update_model(model, aggr_result)
