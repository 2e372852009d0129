"""FedAvg that survives a broken, hung or frozen site but never silently trains on nothing.

FLARE's ``FedAvg`` offers three ways to treat a site's failed task: abort the job on any failure (strict, and the
default when every sampled site must answer), or ignore failures (resilient) -- in which case a round where every
site failed aggregates an empty update and the job goes on "successfully" with a broken global model. Hospitals
need the middle: carry on without a site whose data is broken, and stop with a clear reason when too few sites
are left to make a round meaningful.

FLARE 2.9's ``FedAvg`` also sends each round with no timeout and waits for every sampled site: a site whose job
process hangs or is frozen keeps heartbeating through its parent, so it is never declared dead and the federation
stalls without a log line. Here each round has a deadline (``fedseg3d.server.round_clock``): the round closes
without the sites that missed it, their late results are dropped with a warning naming the site and round, and they
are sent the next round. Only the waiting changes: results still flow through FedAvg's own callback, so a custom
``aggregator=`` still gets every on-time update through ``accept_model`` and builds the round with
``aggregate_model``.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable

from nvflare.apis.dxo import MetaKey, from_shareable
from nvflare.apis.event_type import EventType
from nvflare.apis.fl_constant import FLContextKey
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.app_common.abstract.fl_model import FLModel
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.workflows.fedavg import FedAvg

from fedseg3d.server.round_clock import CLOSE, GIVE_UP, WAIT, RoundClock, check_seconds

# Client task id -> (site, round) for the ids of this many recent rounds: enough to name any late result's round.
REMEMBERED_ROUNDS = 20


class ResilientFedAvg(FedAvg):
    """``FedAvg`` with a per-round deadline that goes on without failed or late sites while at least ``min_sites``
    contributed.

    Args:
        min_sites: the fewest contributions a round may aggregate; fewer stops the job with an error naming the
            round, the count and the sites that sent nothing.
        round_deadline: seconds after sending a round's task at which the round closes if ``min_sites`` usable
            updates arrived; below that it waits on (see ``round_time_limit``). 0: wait for every sampled site
            (FLARE's behaviour).
        round_time_limit: seconds after which a round closes whatever arrived (and the job stops if that is fewer
            than ``min_sites``); 0: no limit.
        overdue_warning_every: seconds between WARNING lines naming the awaited sites while a round waits past
            its deadline (or, without a deadline, while it waits at all).
        *args, **kwargs: passed to ``nvflare.app_common.workflows.fedavg.FedAvg`` (``aggregator``, ``start_round``
            and the others keep their meaning; ``ignore_result_error`` is forced to True: failures are judged here).
    """

    def __init__(
        self,
        *args,
        min_sites: int = 1,
        round_deadline: float = 0,
        round_time_limit: float = 0,
        overdue_warning_every: float = 300,
        **kwargs,
    ) -> None:
        if isinstance(min_sites, bool) or not isinstance(min_sites, int) or min_sites < 1:
            raise ValueError(f"min_sites must be a positive integer, got {min_sites!r}")
        self.round_deadline = check_seconds("round_deadline", round_deadline)
        self.round_time_limit = check_seconds("round_time_limit", round_time_limit)
        self.overdue_warning_every = check_seconds("overdue_warning_every", overdue_warning_every)
        if self.round_deadline and self.round_time_limit and self.round_time_limit < self.round_deadline:
            raise ValueError(f"round_time_limit ({round_time_limit}) must be 0 or >= round_deadline ({round_deadline})")
        kwargs["ignore_result_error"] = True
        super().__init__(*args, **kwargs)
        self.min_sites = min_sites
        self._clock: RoundClock | None = None
        self._closed_early = False
        self._owed: list[str] = []  # sites that sent no usable update last round: sampled first next round
        self._task_rounds: dict[str, tuple[str, int]] = {}

    def sample_clients(self, num_clients: int | None = None) -> list[str]:
        """FedAvg's sample, with the sites that missed the last round always in it."""
        sampled = super().sample_clients(num_clients)
        known = {client.name for client in self.engine.get_clients()}
        owed = [site for site in self._owed if site in known]
        if not owed or set(owed) <= set(sampled):
            return sampled
        others = [site for site in sampled if site not in owed]
        random.shuffle(others)
        chosen = (owed + others)[: max(len(sampled), len(owed))]
        self.info(f"round {self.current_round}: {owed} missed the last round and are sent this one; sites {chosen}")
        return chosen

    def send_model(
        self,
        task_name: str = "train",
        data: FLModel | None = None,
        targets: list[str] | None = None,
        min_responses: int | None = None,
        timeout: int = 0,
        callback: Callable[[FLModel], bool | None] | None = None,
    ) -> None:
        """Send the round's task and return once the round closes by the deadline rules (see the module)."""
        if task_name != self.task_name or callback is None:
            return super().send_model(task_name, data, targets, min_responses, timeout, callback)
        sampled = list(targets or [client.name for client in self.engine.get_clients()])
        if data is not None:  # FLARE says num_rounds; a continuation job (start_round > 0) is part of a longer run
            data.total_rounds = self.start_round + self.num_rounds
        clock = RoundClock(
            sampled, self.min_sites, self.round_deadline, self.round_time_limit, self.overdue_warning_every
        )
        self._clock, self._closed_early = clock, False
        current_round = self.current_round

        def on_time(result: FLModel) -> bool:
            site = (result.meta or {}).get("client_name", "?")
            if self._closed_early:  # arrived between closing and FLARE removing the task: late as well
                self._log_late(site, current_round)
                return False
            accepted = callback(result) is not False
            if accepted:
                clock.usable.add(site)
            return accepted

        super().send_model(task_name, data, sampled, min_responses, timeout, on_time)
        self._wait_for_round(clock, current_round)

    def _wait_for_round(self, clock: RoundClock, current_round: int) -> None:
        started = time.monotonic()
        while self.get_num_standing_tasks() and not self.abort_signal.triggered:
            elapsed = time.monotonic() - started
            decision = clock.decide(elapsed)
            if decision != WAIT:
                self._close_round(clock, current_round, decision, elapsed)
                return
            if clock.warning_due(elapsed):
                self.warning(
                    f"round {current_round}: {elapsed:.0f} s, waiting for {clock.missing()}; "
                    f"{len(clock.usable)} usable update(s) so far, min_sites_per_round is {self.min_sites}"
                    + (f", round_deadline {self.round_deadline:g} s" if self.round_deadline else ", no round_deadline")
                    + (f", round_time_limit {self.round_time_limit:g} s" if self.round_time_limit else "")
                )
            time.sleep(self._task_check_period)
        self._owed = [site for site in clock.sampled if site not in clock.usable]

    def _close_round(self, clock: RoundClock, current_round: int, decision: str, elapsed: float) -> None:
        self._closed_early = True
        self.cancel_all_tasks()
        self._owed = [site for site in clock.sampled if site not in clock.usable]
        reason = "its deadline" if decision == CLOSE else "round_time_limit"
        self.warning(
            f"round {current_round} closed at {reason} after {elapsed:.1f} s with {len(clock.usable)} of "
            f"{len(clock.sampled)} sites; no usable update from {self._owed} (sent the next round; a "
            f"late result is dropped)"
        )
        if decision == GIVE_UP and len(clock.usable) < self.min_sites:
            self.error(f"round {current_round}: round_time_limit passed below min_sites_per_round {self.min_sites}")

    def _prepare_task_data(self, client_task, fl_ctx: FLContext) -> None:
        """Remember which site and round each sent task is, so a late result can be named."""
        if client_task.task.name == self.task_name:
            self._task_rounds[client_task.id] = (client_task.client.name, self.current_round)
            oldest = self.current_round - REMEMBERED_ROUNDS
            self._task_rounds = {k: v for k, v in self._task_rounds.items() if v[1] > oldest}
        super()._prepare_task_data(client_task, fl_ctx)

    def _process_result(self, client_task, fl_ctx: FLContext) -> None:
        if self._clock is not None and client_task.task.name == self.task_name:
            self._clock.replied.add(client_task.client.name)
            self._task_rounds.pop(client_task.id, None)  # answered in time: never "late"
        super()._process_result(client_task, fl_ctx)

    def set_communicator(self, communicator) -> None:
        """Also watch the sites' task checks: a site asks whether its task still stands before it sends the result,
        and FLARE then drops a late one at the site with only "task ... is not found" on the server."""
        super().set_communicator(communicator)
        check = communicator.process_task_check

        def process_task_check(task_id: str, fl_ctx: FLContext):
            standing = check(task_id=task_id, fl_ctx=fl_ctx)
            if standing is None:
                self._note_if_late(task_id)
            return standing

        communicator.process_task_check = process_task_check

    def handle_event(self, event_type: str, fl_ctx: FLContext) -> None:
        """Name a result submitted after its round closed (a site that did not check its task first)."""
        super().handle_event(event_type, fl_ctx)
        if event_type == EventType.BEFORE_PROCESS_SUBMISSION:
            task_id = fl_ctx.get_prop(FLContextKey.TASK_ID)
            sent = self._task_rounds.get(task_id)
            if sent is not None and not (sent[1] == self.current_round and not self._closed_early):
                self._note_if_late(task_id, fl_ctx.get_prop(FLContextKey.TASK_RESULT))

    def _note_if_late(self, task_id: str, result: Shareable | None = None) -> None:
        sent = self._task_rounds.pop(task_id, None)  # popped: one line per late result, whichever path saw it
        if sent is not None:
            self._log_late(*sent, result)

    def _log_late(self, site: str, sent_round: int, result: Shareable | None = None) -> None:
        reported = None
        if isinstance(result, Shareable):
            try:
                reported = from_shareable(result).get_meta_prop(MetaKey.CURRENT_ROUND)
            except ValueError:
                reported = result.get_header(AppConstants.CURRENT_ROUND)
        self.warning(
            f"late result from {site} for round {sent_round} dropped: that round closed without it"
            + (f" (the site reports round {reported})" if reported not in (None, sent_round) else "")
        )

    def update_model(self, model: FLModel, aggr_result: FLModel) -> FLModel:
        received = int((aggr_result.meta or {}).get("nr_aggregated", 0))
        if received < self.min_sites:
            missing = [site for site in self._clock.sampled if site not in self._clock.usable] if self._clock else []
            raise RuntimeError(
                f"round {self.current_round}: only {received} site(s) returned a usable update, min_sites is "
                f"{self.min_sites}; stopping instead of continuing with a global model built from too few sites "
                f"(no usable update from {missing}; see the failing sites' logs for why)"
            )
        if received < self._expected_count:
            self.warning(f"round {self.current_round}: aggregated {received} of {self._expected_count} sites")
        return super().update_model(model, aggr_result)
