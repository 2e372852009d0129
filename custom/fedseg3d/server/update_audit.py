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

import numpy as np
from nvflare.apis.dxo import DXO, MetaKey
from nvflare.apis.fl_context import FLContext

from fedseg3d.filters.gaussian_dp import global_l2_norm
from fedseg3d.server.contribution_log import ContributionRecorder

AUDIT_FILE = "received_updates.jsonl"


class UpdateNormAudit(ContributionRecorder):
    """Appends one JSON line per site update the server accepts: site, round, data kind, L2 norm, filter trail."""

    def records(self, fl_ctx: FLContext, entry: dict, dxo: DXO | None) -> list[tuple[str, dict]]:
        if dxo is None:
            return [(AUDIT_FILE, entry | {"data_kind": None})]
        arrays = {k: v for k, v in (dxo.data or {}).items() if isinstance(v, np.ndarray)}
        meta = dxo.meta or {}
        entry.update(
            data_kind=dxo.data_kind,
            num_values=int(sum(v.size for v in arrays.values())),
            l2_norm=global_l2_norm(arrays),
            filter_history=list(meta.get(MetaKey.FILTER_HISTORY) or []),
            dp_meta={k: v for k, v in meta.items() if str(k).startswith("dp_")},
        )
        return [(AUDIT_FILE, entry)]
