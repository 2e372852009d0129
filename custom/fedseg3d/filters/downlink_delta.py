"""Downlink compression, site side: rebuild the global model from the server's difference and the site's copy.

The server (:mod:`fedseg3d.server.downlink_delta`) sends each site the *difference* between the global model and
that site's reconstruction of it, quantised; this module holds the site's half and the record both halves share::

    server task_data_filters (task "train")  [GlobalModelDeltaEncoder(scheme=...), MessageSizeRecorder(...)]
    site   task_data_filters (task "train")  [DequantizeFilter(), GlobalModelDeltaDecoder()]

``GlobalModelDeltaDecoder`` runs after ``DequantizeFilter``, adds the difference to the site's copy and hands the
learner ordinary ``WEIGHTS``. Both sides count messages and fingerprint the reconstruction (CRC-32 of every float
array): a site that missed a message, restarted, or decoded something else raises with both sequence numbers instead
of training on a model that silently drifted from the server's.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

import numpy as np
from nvflare.apis.dxo import DXO, DataKind, from_shareable
from nvflare.apis.filter import Filter
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable

from fedseg3d.compression.fingerprint import fingerprint
from fedseg3d.filters.quantize_filter import QUANT_META_KEY, _meta_without

DELTA_META_KEY = "fedseg3d_downlink_delta"
FULL, DELTA = "full", "delta"


class GlobalModelDeltaDecoder(Filter):
    """Site side, after ``DequantizeFilter``: rebuilds the full global model from a difference and the site's copy.

    Fail closed: task data without the encoder's record, a sequence gap, or a fingerprint that differs from the
    server's raises (the site then fails this task with that message) rather than training on a drifted model.
    """

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()
        self._ref: dict[str, np.ndarray] | None = None
        self._seq = 0

    def process(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        """Return a shareable whose DXO is the reconstructed ``WEIGHTS``.

        Raises:
            ValueError: no DXO, no delta record (the server did not encode it), data still encoded (the
                ``DequantizeFilter`` is missing or after this one), a sequence or fingerprint mismatch.
        """
        dxo = from_shareable(shareable)
        record = dxo.get_meta_prop(DELTA_META_KEY)
        if not isinstance(record, Mapping) or record.get("base") not in (FULL, DELTA):
            raise ValueError(
                f"GlobalModelDeltaDecoder: task data has no valid '{DELTA_META_KEY}' record (got {record!r}); the "
                "server must run GlobalModelDeltaEncoder for this task"
            )
        expected_kind = DataKind.WEIGHTS if record["base"] == FULL else DataKind.WEIGHT_DIFF
        if dxo.data_kind != expected_kind or QUANT_META_KEY in (dxo.meta or {}):
            raise ValueError(
                f"GlobalModelDeltaDecoder: expected a decoded {expected_kind} DXO, got {dxo.data_kind}; put "
                "DequantizeFilter before this filter"
            )
        arrays = weight_arrays(dxo.data, "GlobalModelDeltaDecoder")
        seq = record.get("seq")
        with self._lock:
            if record["base"] == FULL:
                ref = {k: v.astype(np.float32) if v.dtype.kind == "f" else v.copy() for k, v in arrays.items()}
            else:
                if self._ref is None or seq != self._seq + 1:
                    raise ValueError(
                        f"GlobalModelDeltaDecoder: server sent difference #{seq} but this site holds copy "
                        f"#{self._seq}: a message was lost or the site restarted; restart the job"
                    )
                if record.get("base_crc") != fingerprint(self._ref):
                    raise ValueError("GlobalModelDeltaDecoder: this site's copy differs from the server's reference")
                unknown = set(arrays) - set(self._ref)
                if unknown:
                    raise ValueError(f"GlobalModelDeltaDecoder: keys not in the site's copy: {sorted(unknown)[:5]}")
                ref = dict(self._ref)  # keys absent from the message did not change
                for key, value in arrays.items():
                    if value.dtype.kind == "f":
                        ref[key] = self._ref[key] + value.astype(np.float32)
                    else:
                        ref[key] = value.copy()
            if record.get("crc") != fingerprint(ref):
                raise ValueError(
                    f"GlobalModelDeltaDecoder: reconstruction #{seq} does not match the server's fingerprint"
                )
            self._ref, self._seq = ref, int(seq)
        weights = {k: v.copy() for k, v in ref.items()}
        meta = _meta_without(dxo.meta, DELTA_META_KEY)
        out = DXO(data_kind=DataKind.WEIGHTS, data=weights, meta=meta)
        self.log_debug(fl_ctx, f"rebuilt global model #{seq} from a {record['base']} message")
        return out.update_shareable(shareable)


def weight_arrays(data: Any, who: str) -> dict[str, np.ndarray]:
    """``data`` as a dict of numpy arrays, or a ValueError naming ``who`` and the key that is not one."""
    if not isinstance(data, Mapping):
        raise ValueError(f"{who}: DXO data must be a dict, got {type(data).__name__}")
    for key, value in data.items():
        if not isinstance(value, np.ndarray):
            raise ValueError(f"{who}: '{key}' is a {type(value).__name__}, expected a numpy array")
    return dict(data)
