"""Downlink compression, server side: each site gets the *difference* between the global model and its copy.

Full weights do not compress past about 7x at 4 bits (scales and framing eat the rest, see ``quantize_filter``), and
top-k of full weights would zero most of the model. The change of the global model since a site's last copy is an
update like any other, so it takes every scheme, top-k included. The pair:

    server task_data_filters (task "train")  [GlobalModelDeltaEncoder(scheme=...), MessageSizeRecorder(...)]
    site   task_data_filters (task "train")  [DequantizeFilter(), GlobalModelDeltaDecoder()]

``GlobalModelDeltaEncoder`` keeps, per site (the requesting peer's name), the model *as that site reconstructed it*
(what it decoded, not what the server meant to send). It sends ``global - reconstruction``, quantised, and leaves
out tensors that did not change at all since the site's copy (in FedBN the server's never-trained norm layers); the
first message to a site, or one whose keys or shapes changed, carries the full weights (``full_scheme``). Because the
reference is the site's reconstruction, whatever the codec lost in one round is part of the next round's difference:
the gap between the true global model and the site's copy never accumulates (error feedback on the downlink, as in
Karimireddy et al., "Error Feedback Fixes SignSGD", ICML 2019, applied to the server's broadcast). Non-float arrays
(``num_batches_tracked``) travel as exact values, not differences.

The site's half, ``GlobalModelDeltaDecoder``, and the record both halves share live in
:mod:`fedseg3d.filters.downlink_delta`.

Why not stateless: a stateless downlink cannot clear 8x on full weights. Why keyed by the requesting site and not
broadcast once: FLARE 2.9 runs the server's task data filters once per site, when that site pulls its task
(``ServerRunner.process_task_request``, with the site as the peer context), so per-site state is exactly what the
filter chain sees. Only the ``train`` task should go through it: cross-site evaluation sends other models (other
sites', the best global) which are not a continuation of the site's copy.
"""

from __future__ import annotations

import threading
import zlib
from collections.abc import Mapping
from typing import Any

import numpy as np
from nvflare.apis.dxo import DXO, DataKind
from nvflare.apis.dxo_filter import DXOFilter
from nvflare.apis.fl_component import FLComponent
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable

from fedseg3d.compression import codecs
from fedseg3d.compression.fingerprint import fingerprint
from fedseg3d.filters.downlink_delta import DELTA, DELTA_META_KEY, FULL, weight_arrays
from fedseg3d.filters.quantize_filter import (
    QUANT_META_KEY,
    WIRE_DATA_KIND,
    _meta_without,
    check_codec_args,
    pack_encoded,
)

# Codec of a full model (the first message to a site) when ``full_scheme`` is not given, per difference scheme. A full
# model is weights, not a difference: at 3 or 2 bits a grid step is a third of a block's largest weight or all of it,
# so those schemes send it at 4 bits; top-k would zero most of it, so top-k sends it at 8 bits.
DEFAULT_FULL_SCHEME = {"fp16": "fp16", "int8": "int8", "int4": "int4", "int3": "int4", "int2": "int4", "topk": "int8"}


def _check_scheme(name: str, scheme: Any, allowed: tuple[str, ...]) -> str:
    if scheme not in allowed:
        raise ValueError(f"GlobalModelDeltaEncoder: {name} must be one of {allowed}, got {scheme!r}")
    return scheme


class GlobalModelDeltaEncoder(DXOFilter):
    """Server side: quantised difference between the global model and each site's reconstruction of it.

    Args:
        scheme: codec for the differences: ``fp16``, ``int8``, ``int4``, ``int3``, ``int2`` or ``topk``.
        block_size: values per scale (blockwise schemes and top-k values); the codec default when None.
        topk_fraction: share of each tensor's entries sent by ``topk``.
        full_scheme: codec for a full model (first message to a site): ``fp16`` or a blockwise scheme (not top-k,
            which would zero most of the model); ``DEFAULT_FULL_SCHEME[scheme]`` when None, so that changing
            ``scheme`` alone gives a sound pair.
        seed: seeds the stochastic rounding, mixed with the site name.
        gap_store_id: id of a :class:`SiteGapStore` component: when set, the encoder records each site's gap
            (global model sent minus the site's reconstruction) there, for :class:`RebaseOnSiteCopy`, and resends
            full weights to a site whose last message was never answered by a result (see ``SiteGapStore``).
        single_payload: one array for all encoded tensors (see ``QuantizeFilter``).

    Raises:
        ValueError: an invalid argument; at run time, no peer site in the context, a non-array or non-finite value,
            or a ``gap_store_id`` that names no ``SiteGapStore``.
    """

    def __init__(
        self,
        scheme: str = "int8",
        block_size: int | None = None,
        topk_fraction: float = 0.1,
        full_scheme: str | None = None,
        seed: int = 0,
        gap_store_id: str = "",
        single_payload: bool = False,
    ) -> None:
        super().__init__(supported_data_kinds=[DataKind.WEIGHTS], data_kinds_to_filter=[DataKind.WEIGHTS])
        if not isinstance(gap_store_id, str):
            raise ValueError(f"GlobalModelDeltaEncoder: gap_store_id must be a string, got {gap_store_id!r}")
        self.gap_store_id = gap_store_id
        self.scheme = _check_scheme("scheme", scheme, codecs.SCHEMES)
        if full_scheme is None:
            full_scheme = DEFAULT_FULL_SCHEME[self.scheme]
        self.full_scheme = _check_scheme("full_scheme", full_scheme, ("fp16", *codecs.BLOCKWISE_BITS))
        check_codec_args("GlobalModelDeltaEncoder", block_size, topk_fraction, seed, single_payload)
        if block_size is not None and "fp16" in (self.scheme, self.full_scheme):
            # Refused here, at job start, rather than on the first message that uses the fp16 codec.
            raise ValueError(
                f"GlobalModelDeltaEncoder: block_size has no meaning for fp16 (scheme {self.scheme!r}, full_scheme "
                f"{self.full_scheme!r}); leave it unset"
            )
        self.single_payload = single_payload
        self.block_size = block_size
        self.topk_fraction = float(topk_fraction)
        self.seed = seed
        # One instance serves every site, from the threads that answer their task requests.
        self._lock = threading.Lock()
        self._rngs: dict[str, np.random.Generator] = {}
        self._refs: dict[str, dict[str, np.ndarray]] = {}
        self._seq: dict[str, int] = {}

    def reference(self, site: str) -> dict[str, np.ndarray] | None:
        """A copy of the model as ``site`` has reconstructed it (float arrays, float32), or None."""
        with self._lock:
            ref = self._refs.get(site)
            return None if ref is None else {k: v.copy() for k, v in ref.items()}

    def process_dxo(self, dxo: DXO, shareable: Shareable, fl_ctx: FLContext) -> DXO:
        """Encode ``dxo`` (the global WEIGHTS) for the requesting site and advance that site's reference."""
        if QUANT_META_KEY in (dxo.meta or {}) or DELTA_META_KEY in (dxo.meta or {}):
            raise ValueError("GlobalModelDeltaEncoder: the DXO is already encoded")
        peer = fl_ctx.get_peer_context()
        site = peer.get_identity_name() if peer is not None else ""
        if not site:
            raise ValueError("GlobalModelDeltaEncoder: no requesting site in the FL context (server task data only)")
        weights = weight_arrays(dxo.data, "GlobalModelDeltaEncoder")
        store = _gap_store(fl_ctx, self.gap_store_id, "GlobalModelDeltaEncoder") if self.gap_store_id else None
        with self._lock:
            rng = self._rngs.setdefault(site, np.random.default_rng([self.seed, zlib.crc32(site.encode())]))
            ref = self._refs.get(site)
            unanswered = ref is not None and store is not None and not store.answered(site)
            if unanswered:
                self.log_warning(
                    fl_ctx,
                    f"{site} returned no result for downlink #{self._seq.get(site, 0)} (lost, failed or restarted): "
                    "sending full weights so that its copy is rebuilt",
                )
                ref = None
            compatible = ref is not None and _same_layout(ref, weights)
            base = DELTA if compatible else FULL
            scheme = self.scheme if compatible else self.full_scheme
            data, new_ref, dtypes, raw, encoded = {}, {}, {}, 0, 0
            for key, value in weights.items():
                raw += value.nbytes
                if value.dtype.kind != "f":
                    new_ref[key] = value.copy()
                    if not compatible or not np.array_equal(value, ref[key]):
                        data[key] = value  # exact, and only when it changed
                        encoded += value.nbytes
                    continue
                x = value.astype(np.float32) - ref[key] if compatible else value
                if compatible and not np.any(x):
                    new_ref[key] = ref[key]  # unchanged since the site's copy (FedBN's server-side norm layers)
                    continue
                try:
                    container = codecs.encode(x, scheme, rng, self.block_size, self.topk_fraction)
                    decoded = codecs.decode(container, key).astype(np.float32)
                except ValueError as e:
                    raise ValueError(f"GlobalModelDeltaEncoder: '{key}' for {site}: {e}") from e
                new_ref[key] = ref[key] + decoded if compatible else decoded
                data[key] = container
                dtypes[key] = container["dtype"]
                encoded += codecs.encoded_nbytes(container)
            seq = self._seq.get(site, 0) + 1
            delta = {
                "base": base,
                "seq": seq,
                "base_crc": fingerprint(ref) if compatible else None,
                "crc": fingerprint(new_ref),
            }
            gaps = None
            if store is not None:
                gaps = {k: v.astype(np.float32) - new_ref[k] for k, v in weights.items() if v.dtype.kind == "f"}
            # Commit only once everything encoded: a failure leaves the site's state as it was (FLARE retries later).
            self._refs[site], self._seq[site] = new_ref, seq
        if gaps is not None:
            store.put(site, gaps)
        meta = _meta_without(dxo.meta)
        meta[QUANT_META_KEY] = {
            "scheme": scheme,
            "dtypes": dtypes,
            "raw_bytes": int(raw),
            "encoded_bytes": int(encoded),
            "data_kind": (DataKind.WEIGHT_DIFF if compatible else DataKind.WEIGHTS).value,
        }
        meta[DELTA_META_KEY] = delta
        if self.single_payload:
            data = pack_encoded(data, "GlobalModelDeltaEncoder")
        self.log_info(
            fl_ctx,
            f"to {site}: {base} #{seq} as {scheme}, {raw} -> {encoded} array bytes ({raw / max(encoded, 1):.2f}x)",
        )
        return DXO(data_kind=WIRE_DATA_KIND, data=data, meta=meta)


def _same_layout(ref: Mapping[str, np.ndarray], weights: Mapping[str, np.ndarray]) -> bool:
    """Same keys, shapes and kinds (float or not) as the site's copy: only then is a difference meaningful."""
    return set(ref) == set(weights) and all(
        ref[k].shape == v.shape and (ref[k].dtype.kind == "f") == (v.dtype.kind == "f") for k, v in weights.items()
    )


class SiteGapStore(FLComponent):
    """Server component shared by the two filters below: per site, the gap between the global model it was sent and
    the copy it rebuilt (``global - reconstruction``), as of its latest task.

    Why it is needed: a site trains from its reconstruction and reports ``local - reconstruction``, while FedAvg adds
    the reported difference to the *true* global model. With a lossy downlink (top-k above all) the site's training
    partly re-learns the gap, FedAvg adds that on top of a global that already had it, and the model drifts: in the
    benchmark, top-k on the downlink alone cost about 0.45 Dice, top-k on the uplink alone none. Subtracting the
    gap from the site's difference turns it into ``local - global``, so FedAvg averages the models the sites
    actually trained, exactly as without compression.

    It also records which downlink message each site last answered with a result. A site that never answers message
    #N (the message was lost after the server encoded it, the site's decoder refused it, or the site failed or
    restarted) would refuse every later difference, which assumes it holds copy #N; the encoder sees the message
    unanswered and sends full weights instead, so the site recovers in one round rather than failing every round.
    """

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()
        self._gaps: dict[str, dict[str, np.ndarray]] = {}
        self._answered: dict[str, bool] = {}

    def put(self, site: str, gaps: dict[str, np.ndarray]) -> None:
        """Record the gap of the downlink message just sent to ``site`` (not answered yet)."""
        with self._lock:
            self._gaps[site] = gaps
            self._answered[site] = False

    def get(self, site: str) -> dict[str, np.ndarray] | None:
        with self._lock:
            return self._gaps.get(site)

    def mark_answered(self, site: str) -> None:
        """``site`` returned a result for the last message it was sent (so it holds that copy)."""
        with self._lock:
            if site in self._gaps:
                self._answered[site] = True

    def answered(self, site: str) -> bool:
        """Whether ``site`` returned a result for the last downlink message it was sent."""
        with self._lock:
            return self._answered.get(site, False)


class RebaseOnSiteCopy(DXOFilter):
    """Server ``task_result_filters`` (``train``), after ``DequantizeFilter``: ``local - reconstruction`` becomes
    ``local - global`` by subtracting the site's recorded gap (see :class:`SiteGapStore`).

    Args:
        gap_store_id: id of the ``SiteGapStore`` component the ``GlobalModelDeltaEncoder`` writes to.

    Raises:
        ValueError: (from ``process``) no gap recorded for the site (its task did not go through the encoder),
            a key or shape the gap does not have.
    """

    def __init__(self, gap_store_id: str = "downlink_gaps") -> None:
        super().__init__(supported_data_kinds=[DataKind.WEIGHT_DIFF], data_kinds_to_filter=[DataKind.WEIGHT_DIFF])
        if not isinstance(gap_store_id, str) or not gap_store_id:
            raise ValueError(f"RebaseOnSiteCopy: gap_store_id must be a non-empty string, got {gap_store_id!r}")
        self.gap_store_id = gap_store_id

    def process_dxo(self, dxo: DXO, shareable: Shareable, fl_ctx: FLContext) -> DXO:
        peer = fl_ctx.get_peer_context()
        site = peer.get_identity_name() if peer is not None else ""
        store = _gap_store(fl_ctx, self.gap_store_id, "RebaseOnSiteCopy")
        gaps = store.get(site)
        if gaps is None:
            raise ValueError(f"RebaseOnSiteCopy: no downlink gap recorded for site {site!r}")
        data = {}
        for key, value in weight_arrays(dxo.data, "RebaseOnSiteCopy").items():
            if value.dtype.kind != "f":
                data[key] = value
                continue
            if key not in gaps or gaps[key].shape != value.shape:
                raise ValueError(f"RebaseOnSiteCopy: {site} sent '{key}' {value.shape}, which its downlink gap lacks")
            data[key] = (value.astype(np.float32) - gaps[key]).astype(value.dtype)
        store.mark_answered(site)
        return DXO(data_kind=dxo.data_kind, data=data, meta=_meta_without(dxo.meta))


def _gap_store(fl_ctx: FLContext, store_id: str, who: str) -> SiteGapStore:
    engine = fl_ctx.get_engine()
    store = engine.get_component(store_id) if engine is not None else None
    if not isinstance(store, SiteGapStore):
        raise ValueError(f"{who}: component '{store_id}' is not a SiteGapStore (add it to the server's components)")
    return store
