"""The server component that writes the job's tamper-evident audit trail and its list of flagged sites.

One record per round in ``<run dir>/fedseg3d/audit_trail.jsonl`` (chained: ``fedseg3d.server.audit_trail``):

- ``sent``: per site, the SHA-256 of the model it was sent for training (the task data before the server's
  filters, i.e. before any downlink encoding) and the round's global model hash;
- ``received``: per site, the SHA-256 of its update as the server received it after the server's result filters
  (decoded: what enters aggregation), its L2 norm, sample count, data kind, the filters the site and server applied
  (the DXO's filter history), the epsilon the site declared it charged (``dp_epsilon`` meta), the return code and
  the quality-control verdict (``ScreenedAggregator``; ``"qc": "off"`` without it);
- ``global_model``: the hash of the global model that resulted.

Sites marked by update QC are written to ``<run dir>/fedseg3d/qc/flagged_sites.json`` as they are marked. After each
round the head hash goes to the server log, so a copy of the log anchors the chain (see ``audit_trail``).
"""

from __future__ import annotations

import json
import math
import threading
from pathlib import Path

import numpy as np
from nvflare.apis.dxo import MetaKey, from_shareable
from nvflare.apis.event_type import EventType
from nvflare.apis.fl_constant import FLContextKey
from nvflare.apis.fl_context import FLContext
from nvflare.app_common.abstract.model import ModelLearnableKey
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.app_event_type import AppEventType
from nvflare.widgets.widget import Widget

from fedseg3d.privacy.record import META_EPSILON
from fedseg3d.server.audit_trail import TRAIL_FILE, AuditTrail
from fedseg3d.server.contribution_log import OUTPUT_SUBDIR
from fedseg3d.server.screened_aggregator import QC_META_KEY
from fedseg3d.server.update_screen import l2_norm, params_digest

FLAGGED_FILE = "qc/flagged_sites.json"


def _arrays(data: dict | None) -> dict[str, np.ndarray]:
    return {k: v for k, v in (data or {}).items() if isinstance(v, np.ndarray)}


def _finite_or_none(value: float | None) -> float | None:
    return value if value is None or math.isfinite(value) else None


class AuditTrailWriter(Widget):
    """Writes one chained audit record per round (see the module docstring). It only reads the federation's data."""

    def __init__(self) -> None:
        super().__init__()
        self._trail: AuditTrail | None = None
        self._out_dir: Path | None = None
        self._lock = threading.Lock()
        self._round: dict | None = None

    def handle_event(self, event_type: str, fl_ctx: FLContext) -> None:
        if event_type == EventType.START_RUN:
            run_dir = Path(fl_ctx.get_engine().get_workspace().get_run_dir(fl_ctx.get_job_id()))
            self._out_dir = run_dir / OUTPUT_SUBDIR
            self._trail = AuditTrail(self._out_dir / TRAIL_FILE)
        elif event_type == AppEventType.ROUND_STARTED:
            self._close_round(fl_ctx, None)  # a round that never aggregated (the job stopped it) is still recorded
            self._round = {
                "round": fl_ctx.get_prop(AppConstants.CURRENT_ROUND),
                "global_model_sent": self._global_digest(fl_ctx),
                "sent": {},
                "received": {},
            }
        elif event_type == EventType.BEFORE_TASK_DATA_FILTER:
            self._record_sent(fl_ctx)
        elif event_type == AppEventType.BEFORE_CONTRIBUTION_ACCEPT:
            self._record_received(fl_ctx)
        elif event_type == AppEventType.AFTER_AGGREGATION:
            self._record_verdicts(fl_ctx)
        elif event_type == AppEventType.AFTER_SHAREABLE_TO_LEARNABLE:
            self._close_round(fl_ctx, self._global_digest(fl_ctx))
        elif event_type == EventType.END_RUN:
            self._close_round(fl_ctx, None)

    @staticmethod
    def _global_digest(fl_ctx: FLContext) -> str | None:
        learnable = fl_ctx.get_prop(AppConstants.GLOBAL_MODEL)
        if not learnable:
            return None
        return params_digest(_arrays(learnable.get(ModelLearnableKey.WEIGHTS)))

    @staticmethod
    def _site(fl_ctx: FLContext) -> str:
        peer = fl_ctx.get_peer_context()
        return peer.get_identity_name(default="?") if peer else "?"

    def _record_sent(self, fl_ctx: FLContext) -> None:
        if self._round is None or fl_ctx.get_prop(FLContextKey.TASK_NAME) != AppConstants.TASK_TRAIN:
            return
        task_data = fl_ctx.get_prop(FLContextKey.TASK_DATA)
        try:
            digest = params_digest(_arrays(from_shareable(task_data).data))
        except (ValueError, TypeError, AttributeError):
            digest = None
        with self._lock:
            self._round["sent"][self._site(fl_ctx)] = {
                "model": digest,
                "round": task_data.get_header(AppConstants.CURRENT_ROUND) if task_data is not None else None,
            }

    def _record_received(self, fl_ctx: FLContext) -> None:
        peer = fl_ctx.get_peer_context()
        shareable = peer.get_prop(FLContextKey.SHAREABLE) if peer else None
        if self._round is None or shareable is None:
            return
        entry: dict = {"return_code": shareable.get_return_code(), "qc": "off"}
        try:
            dxo = from_shareable(shareable)
        except ValueError:
            dxo = None
        if dxo is not None:
            arrays = _arrays(dxo.data)
            meta = dxo.meta or {}
            entry.update(
                digest=params_digest(arrays),
                norm=_finite_or_none(l2_norm(arrays)),
                num_samples=meta.get(MetaKey.NUM_STEPS_CURRENT_ROUND),
                data_kind=dxo.data_kind,
                filters=[str(f) for f in meta.get(MetaKey.FILTER_HISTORY) or []],
                epsilon=meta.get(META_EPSILON),
            )
        with self._lock:
            self._round["received"][self._site(fl_ctx)] = entry

    def _record_verdicts(self, fl_ctx: FLContext) -> None:
        result = fl_ctx.get_prop(AppConstants.AGGREGATION_RESULT)
        meta = getattr(result, "meta", None)
        # Removed here so the next global model does not carry other sites' verdicts to every site.
        summary = meta.pop(QC_META_KEY, None) if isinstance(meta, dict) else None
        if summary is None or self._round is None:
            return
        with self._lock:
            self._round["aggregation_rule"] = summary["aggregation_rule"]
            self._round["update_qc"] = summary["update_qc"]
            for verdict in summary["verdicts"]:
                entry = self._round["received"].setdefault(verdict["site"], {})
                entry["qc"] = {"accepted": verdict["accepted"], "reasons": verdict["reasons"]}
                entry["cosine"] = verdict["cosine"]
        if summary["flagged_sites"] and self._out_dir is not None:
            path = self._out_dir / FLAGGED_FILE
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(summary["flagged_sites"], indent=2, sort_keys=True) + "\n")

    def _close_round(self, fl_ctx: FLContext, global_digest: str | None) -> None:
        with self._lock:
            body, self._round = self._round, None
        if body is None or self._trail is None:
            return
        body["global_model"] = global_digest
        record = self._trail.append(body)
        self.log_info(fl_ctx, f"audit trail: round {body['round']} recorded, head {record['hash']}")
