"""What the server actually received: the L2 norm and filter trail of every site update, for a privacy review.

A site's privacy policy (``local/privacy.json``) adds filters the job never names, so the job's own config cannot
show that they ran. This widget records, on the server, per contribution: the global L2 norm of the received
arrays, the DXO's ``filter_history`` (the filters that touched it at the site) and any ``dp_*`` meta the site's DP
filter attached. A reviewer can then check, from the job's downloaded results alone, that each site's update left
clipped to C and noised with std sigma * C (its norm is close to ``sigma * C * sqrt(number of values)``), rather
than trusting the sites' logs.

It writes ``<run dir>/fedseg3d/received_updates.jsonl`` (downloaded with the job's results). It only reads.
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
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.app_event_type import AppEventType
from nvflare.widgets.widget import Widget

OUTPUT_SUBDIR = "fedseg3d"
AUDIT_FILE = "received_updates.jsonl"


def l2_norm(arrays: dict) -> float:
    """Global L2 norm over every numpy array in ``arrays`` (float64 accumulation)."""
    total = 0.0
    for value in arrays.values():
        if isinstance(value, np.ndarray) and value.size:
            flat = value.ravel().astype(np.float64)
            total += float(np.dot(flat, flat))
    return math.sqrt(total)


def _plain(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value if isinstance(value, str | int | float | bool | type(None)) else str(value)


class UpdateNormAudit(Widget):
    """Appends one JSON line per site update the server accepts: site, round, data kind, L2 norm, filter trail."""

    def __init__(self) -> None:
        super().__init__()
        self._path: Path | None = None
        self._lock = threading.Lock()

    def handle_event(self, event_type: str, fl_ctx: FLContext) -> None:
        if event_type == EventType.START_RUN:
            run_dir = Path(fl_ctx.get_engine().get_workspace().get_run_dir(fl_ctx.get_job_id()))
            self._path = run_dir / OUTPUT_SUBDIR / AUDIT_FILE
            self._path.parent.mkdir(parents=True, exist_ok=True)
        elif event_type == AppEventType.BEFORE_CONTRIBUTION_ACCEPT:
            self._record(fl_ctx)

    def _record(self, fl_ctx: FLContext) -> None:
        peer_ctx = fl_ctx.get_peer_context()
        shareable = peer_ctx.get_prop(FLContextKey.SHAREABLE) if peer_ctx else None
        if shareable is None or self._path is None:
            return
        entry = {
            "site": peer_ctx.get_identity_name(default="?"),
            "round": fl_ctx.get_prop(AppConstants.CURRENT_ROUND),
            "return_code": shareable.get_return_code(),
        }
        try:
            dxo = from_shareable(shareable)
        except ValueError:
            entry["data_kind"] = None
        else:
            data = dxo.data or {}
            meta = dxo.meta or {}
            entry.update(
                data_kind=dxo.data_kind,
                num_values=int(sum(v.size for v in data.values() if isinstance(v, np.ndarray))),
                l2_norm=l2_norm(data),
                filter_history=_plain(meta.get(MetaKey.FILTER_HISTORY) or []),
                dp_meta={k: _plain(v) for k, v in meta.items() if str(k).startswith("dp_")},
            )
        with self._lock, self._path.open("a") as stream:
            stream.write(json.dumps(entry) + "\n")
