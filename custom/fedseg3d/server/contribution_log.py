"""A server-side record of exactly what each site sent, round by round.

It answers the questions a privacy officer and an ML engineer both ask of a federation: which tensors did the
server actually receive from each site (FedBN promises that batch-norm layers never arrive), how large were they,
and what Dice did each site report. It writes one JSON line per accepted contribution to
``<run dir>/fedseg3d/contributions.jsonl`` (downloaded with the job's results) and is what the POC runner tails for
live progress.

Differential privacy: a contribution whose DXO meta carries ``dp_epsilon`` (set at the site by
``GaussianDPFilter`` or the DP-SGD learner, after the site charged its ledger) also gets a line in
``<run dir>/fedseg3d/privacy.jsonl``: site, round, cumulative epsilon, delta, the protected unit and whether the
figure comes from the site's persistent ledger or this job only. The site's ledger stays the authority; this is the
job's copy of what each site declared.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
from nvflare.apis.dxo import DXO, MetaKey, from_shareable
from nvflare.apis.event_type import EventType
from nvflare.apis.fl_constant import FLContextKey
from nvflare.apis.fl_context import FLContext
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.app_event_type import AppEventType
from nvflare.widgets.widget import Widget

from fedseg3d.privacy.record import PRIVACY_META

OUTPUT_SUBDIR = "fedseg3d"
CONTRIBUTIONS_FILE = "contributions.jsonl"
PRIVACY_FILE = "privacy.jsonl"


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value if isinstance(value, str | int | float | bool | type(None)) else str(value)


class ContributionRecorder(Widget):
    """Base of the server's per-contribution records: one JSON line per site result the server is about to accept.

    FedAvg fires ``BEFORE_CONTRIBUTION_ACCEPT`` for every result, error replies included, after the server's own
    result filters. Subclasses say what to write (``records``); this class finds the result and the run folder and
    appends under a lock (results of different sites arrive on different threads).
    """

    def __init__(self) -> None:
        super().__init__()
        self._out_dir: Path | None = None
        self._lock = threading.Lock()

    def handle_event(self, event_type: str, fl_ctx: FLContext) -> None:
        if event_type == EventType.START_RUN:
            run_dir = Path(fl_ctx.get_engine().get_workspace().get_run_dir(fl_ctx.get_job_id()))
            self._out_dir = run_dir / OUTPUT_SUBDIR
            self._out_dir.mkdir(parents=True, exist_ok=True)
        elif event_type == AppEventType.BEFORE_CONTRIBUTION_ACCEPT:
            self._record(fl_ctx)

    def records(self, fl_ctx: FLContext, entry: dict, dxo: DXO | None) -> list[tuple[str, dict]]:
        """``(file name, JSON record)`` pairs for one contribution.

        Args:
            entry: what every record starts from: ``site``, ``round``, ``return_code``.
            dxo: the result's DXO, or None when the reply carries none (an error reply).
        """
        raise NotImplementedError

    def _record(self, fl_ctx: FLContext) -> None:
        peer_ctx = fl_ctx.get_peer_context()
        shareable = peer_ctx.get_prop(FLContextKey.SHAREABLE) if peer_ctx else None
        if shareable is None or self._out_dir is None:
            # Never silent: a contribution missing from the record is what a privacy officer would be misled by.
            missing = "the run folder (no START_RUN seen)" if self._out_dir is None else "the site's result"
            self.log_warning(fl_ctx, f"{type(self).__name__}: a contribution is not recorded: {missing} not found")
            return
        entry = {
            "round": fl_ctx.get_prop(AppConstants.CURRENT_ROUND),
            "site": peer_ctx.get_identity_name(default="?"),
            "return_code": shareable.get_return_code(),
        }
        try:
            dxo = from_shareable(shareable)
        except ValueError:
            dxo = None
        lines = self.records(fl_ctx, entry, dxo)
        with self._lock:
            for filename, record in lines:
                with (self._out_dir / filename).open("a") as stream:
                    # allow_nan: epsilon is infinity when a job deliberately runs without noise; say so, not fail.
                    stream.write(json.dumps(_jsonable(record)) + "\n")


class ContributionLog(ContributionRecorder):
    """Appends a JSON line per contribution the server receives (after the server's own result filters)."""

    def __init__(self) -> None:
        super().__init__()
        self._num_rounds = None

    def handle_event(self, event_type: str, fl_ctx: FLContext) -> None:
        if event_type == AppEventType.ROUND_STARTED:
            # FedAvg sets NUM_ROUNDS as a non-sticky prop: remember the last value seen.
            self._num_rounds = fl_ctx.get_prop(AppConstants.NUM_ROUNDS) or self._num_rounds
        super().handle_event(event_type, fl_ctx)

    def records(self, fl_ctx: FLContext, entry: dict, dxo: DXO | None) -> list[tuple[str, dict]]:
        entry = {"time": time.time(), "num_rounds": self._num_rounds, **entry}
        if dxo is None:
            return [(CONTRIBUTIONS_FILE, entry | {"data_kind": None})]
        data = dxo.data or {}
        arrays = {k: v for k, v in data.items() if isinstance(v, np.ndarray)}
        entry.update(
            data_kind=dxo.data_kind,
            keys=sorted(data),
            array_bytes=int(sum(v.nbytes for v in arrays.values())),
            num_values=int(sum(v.size for v in arrays.values())),
            num_cases=dxo.get_meta_prop(MetaKey.NUM_STEPS_CURRENT_ROUND),
            initial_metrics=dxo.get_meta_prop(MetaKey.INITIAL_METRICS),
            site_metrics=dxo.get_meta_prop("site_metrics"),
        )
        privacy = {name: dxo.get_meta_prop(key) for key, name in PRIVACY_META.items()}
        if privacy["epsilon"] is None:
            return [(CONTRIBUTIONS_FILE, entry)]
        entry["privacy"] = privacy
        record = {k: entry[k] for k in ("time", "round", "site")} | privacy
        return [(CONTRIBUTIONS_FILE, entry), (PRIVACY_FILE, record)]
