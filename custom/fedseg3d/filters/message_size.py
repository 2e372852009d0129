"""A pass-through filter that records how many bytes a message takes once FLARE serialises it.

Array byte counts understate what travels: FOBS frames every numpy array (about 280 bytes each) and the header,
meta and key names ride along. This filter measures ``len(fobs.dumps(shareable))``, the serialised Shareable,
and appends one JSON line per message to ``<run dir>/fedseg3d/<output_file>``, so compression claims are made on
bytes, not on ``nbytes``. Put it last in a sender's chain (site ``task_result_filters``, server
``task_data_filters``), after any quantiser; or, on the receiving end, *first* (``side="receiver"``, server
``task_result_filters`` before the ``DequantizeFilter``), which measures what arrived. With both recorders on the
server, one file in the server's run folder (downloaded with the job's results) holds both directions, and
``tb_tag`` streams each message's size to the server's TensorBoard (``TBAnalyticsReceiver``) as
``<tb_tag>/<direction>/<site>`` at step = round.

``fobs.dumps`` without a messaging cell serialises arrays inline (``np.save`` bytes): that is ``bytes``. Between
real FLARE 2.9 processes (simulator and POC alike) the numpy decomposer instead leaves a reference in the message and
the receiver downloads each array as its own ``npz`` item (``ArrayDownloadable.produce_item``): ``streamed_bytes``
is that figure, computed with FLARE's own classes (body minus inline arrays plus one ``npz`` item per array). It has
more framing per array (a zip entry), which costs the quantised messages proportionally more.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from nvflare.apis.analytix import AnalyticsDataType, LogWriterName
from nvflare.apis.dxo import from_shareable
from nvflare.apis.filter import Filter
from nvflare.apis.fl_constant import FLContextKey, ReservedKey
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.apis.utils.analytix_utils import create_analytic_dxo, send_analytic_dxo
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.decomposers import numpy_decomposers
from nvflare.app_common.np.np_downloader import ArrayDownloadable
from nvflare.fuel.utils import fobs

from fedseg3d.filters.quantize_filter import QUANT_META_KEY

DIRECTIONS = ("site_to_server", "server_to_site")
SIDES = ("sender", "receiver")
OUTPUT_SUBDIR = "fedseg3d"


def message_nbytes(shareable: Shareable) -> int:
    """Bytes of ``shareable`` serialised by FOBS, as FLARE encodes a message body."""
    numpy_decomposers.register()  # already done in a FLARE process; needed in tests and scripts (idempotent)
    return len(fobs.dumps(shareable))


def _arrays_in(node: Any, out: list[np.ndarray]) -> list[np.ndarray]:
    if isinstance(node, np.ndarray):
        out.append(node)
    elif isinstance(node, dict):
        for value in node.values():
            _arrays_in(value, out)
    elif isinstance(node, list | tuple):
        for value in node:
            _arrays_in(value, out)
    return out


def streamed_nbytes(shareable: Shareable, inline_nbytes: int | None = None) -> int:
    """Bytes of ``shareable`` when FLARE streams its arrays through the download service (between real processes).

    The message body keeps a short reference per array instead of the array (the difference is a few bytes per
    array and not counted), and each array travels as the ``npz`` item FLARE's ``ArrayDownloadable`` produces.
    ``inline_nbytes``: ``message_nbytes(shareable)`` when the caller has it already (it serialises the message).
    """
    arrays = _arrays_in(shareable, [])
    decomposer = numpy_decomposers.NumpyArrayDecomposer()
    inline_arrays = sum(len(decomposer.native_decompose(a)) for a in arrays)
    items = ArrayDownloadable({f"a{i}": a for i, a in enumerate(arrays)}, 2 * 1024 * 1024)
    body = message_nbytes(shareable) if inline_nbytes is None else inline_nbytes
    return body - inline_arrays + sum(len(items.produce_item(i)) for i in range(len(arrays)))


def raw_float32_nbytes(shareable: Shareable) -> int | None:
    """Array bytes of the message's DXO before quantisation: float arrays at 4 bytes a value. None without a DXO."""
    try:
        dxo = from_shareable(shareable)
    except ValueError:
        return None
    record = dxo.get_meta_prop(QUANT_META_KEY)
    if isinstance(record, dict) and "raw_bytes" in record:
        return int(record["raw_bytes"])
    if not isinstance(dxo.data, dict):
        return None
    arrays = [v for v in dxo.data.values() if isinstance(v, np.ndarray)]
    return int(sum(4 * a.size if a.dtype.kind == "f" else a.nbytes for a in arrays))


class MessageSizeRecorder(Filter):
    """Appends ``{round, site, task, direction, bytes, raw_float32_bytes}`` per message and passes it on unchanged.

    Args:
        direction: ``"site_to_server"`` (task results) or ``"server_to_site"`` (task data).
        output_file: a bare file name, created under ``<run dir>/fedseg3d/``.
        side: ``"sender"`` (last in the sender's chain) or ``"receiver"`` (first in the receiver's chain). With the
            direction it decides where the site name comes from: this process, or the peer.
        tb_tag: when not empty, also stream the byte count as a TensorBoard scalar ``<tb_tag>/<direction>/<site>``
            (an ``analytix_log_stats`` event; on the server the ``TBAnalyticsReceiver`` writes it).

    Raises:
        ValueError: an unknown direction or side, or an output_file that is not a bare file name.
    """

    def __init__(
        self,
        direction: str = "site_to_server",
        output_file: str = "message_sizes.jsonl",
        side: str = "sender",
        tb_tag: str = "",
    ) -> None:
        super().__init__()
        if direction not in DIRECTIONS:
            raise ValueError(f"MessageSizeRecorder: direction must be one of {DIRECTIONS}, got {direction!r}")
        if side not in SIDES:
            raise ValueError(f"MessageSizeRecorder: side must be one of {SIDES}, got {side!r}")
        if not isinstance(tb_tag, str):
            raise ValueError(f"MessageSizeRecorder: tb_tag must be a string, got {tb_tag!r}")
        if not isinstance(output_file, str) or not output_file or Path(output_file).name != output_file:
            raise ValueError(f"MessageSizeRecorder: output_file must be a bare file name, got {output_file!r}")
        if output_file in (".", ".."):
            raise ValueError(f"MessageSizeRecorder: output_file must be a bare file name, got {output_file!r}")
        self.direction = direction
        self.output_file = output_file
        self.side = side
        self.tb_tag = tb_tag
        self._lock = threading.Lock()  # the server filters several sites' messages from several threads

    def process(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        """Measure, append a line, log it, and return ``shareable`` itself."""
        nbytes = message_nbytes(shareable)
        entry = {
            "round": _current_round(shareable, fl_ctx),
            "site": self._site(fl_ctx),
            "task": fl_ctx.get_prop(FLContextKey.TASK_NAME) or shareable.get_header(ReservedKey.TASK_NAME),
            "direction": self.direction,
            "side": self.side,
            "bytes": nbytes,
            "streamed_bytes": streamed_nbytes(shareable, nbytes),
            "raw_float32_bytes": raw_float32_nbytes(shareable),
            "time": time.time(),
        }
        path = self.output_path(fl_ctx)
        with self._lock:
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(entry) + "\n")
        raw = entry["raw_float32_bytes"]
        ratio = f" ({raw / entry['bytes']:.2f}x vs float32 arrays)" if raw else ""
        self.log_info(fl_ctx, f"{self.direction} round {entry['round']} {entry['site']}: {entry['bytes']} bytes{ratio}")
        if self.tb_tag and isinstance(entry["round"], int):
            self._stream(entry, fl_ctx)
        return shareable

    def _stream(self, entry: dict[str, Any], fl_ctx: FLContext) -> None:
        """Fire the analytics event from a fresh context, so the filter's own context keeps its props."""
        tag = f"{self.tb_tag}/{self.direction}/{entry['site'] or 'unknown'}"
        if entry["task"] not in (None, "train"):
            tag += f"/{entry['task']}"
        dxo = create_analytic_dxo(
            tag, entry["bytes"], AnalyticsDataType.SCALAR, LogWriterName.TORCH_TB, global_step=entry["round"]
        )
        with fl_ctx.get_engine().new_context() as event_ctx:
            send_analytic_dxo(self, dxo, event_ctx)

    def output_path(self, fl_ctx: FLContext) -> Path:
        """``<run dir>/fedseg3d/<output_file>`` of this process's workspace.

        Raises:
            RuntimeError: the context has no engine or no job id (not inside a running job).
        """
        engine, job_id = fl_ctx.get_engine(), fl_ctx.get_job_id()
        if engine is None or not job_id:
            raise RuntimeError("MessageSizeRecorder: the FL context has no engine or job id; it must run in a job")
        return Path(engine.get_workspace().get_run_dir(job_id)) / OUTPUT_SUBDIR / self.output_file

    def _site(self, fl_ctx: FLContext) -> str | None:
        on_the_site = (self.direction == "site_to_server") == (self.side == "sender")
        if on_the_site:
            return fl_ctx.get_identity_name() or None
        peer = fl_ctx.get_peer_context()
        return peer.get_identity_name() or None if peer is not None else None


def _current_round(shareable: Shareable, fl_ctx: FLContext) -> Any:
    """The round from the message header (task data), the round cookie FLARE's model controllers put on a task and
    sites echo back (results), else from the context."""
    value = shareable.get_header(AppConstants.CURRENT_ROUND)
    if value is None:
        value = shareable.get_cookie(AppConstants.CONTRIBUTION_ROUND)
    if value is None:
        value = fl_ctx.get_prop(AppConstants.CURRENT_ROUND)
    return int(value) if isinstance(value, int | np.integer) else value
