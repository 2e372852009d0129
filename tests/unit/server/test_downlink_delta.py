"""GlobalModelDeltaEncoder (server) / DequantizeFilter + GlobalModelDeltaDecoder (site) on real DXOs and FOBS bytes.

The encoder reads the requesting site from the peer context, as FLARE's ``ServerRunner`` sets it while it filters a
site's task data; the decoder is a plain site-side filter.
"""

from __future__ import annotations

import numpy as np
import pytest
from nvflare.apis.dxo import DXO, DataKind, from_shareable
from nvflare.apis.fl_constant import ReservedKey
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.app_common.decomposers import numpy_decomposers
from nvflare.fuel.utils import fobs

from fedseg3d.compression.fingerprint import fingerprint
from fedseg3d.filters.downlink_delta import DELTA_META_KEY, GlobalModelDeltaDecoder
from fedseg3d.filters.quantize_filter import DequantizeFilter
from fedseg3d.server.downlink_delta import GlobalModelDeltaEncoder, RebaseOnSiteCopy, SiteGapStore


def _ctx(name: str, peer: str | None = None) -> FLContext:
    fl_ctx = FLContext()
    fl_ctx.set_prop(ReservedKey.IDENTITY_NAME, name, private=False, sticky=False)
    if peer is not None:
        peer_ctx = FLContext()
        peer_ctx.set_prop(ReservedKey.IDENTITY_NAME, peer, private=False, sticky=False)
        fl_ctx.set_peer_context(peer_ctx)
    return fl_ctx


def _model(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "conv.weight": rng.standard_normal((16, 8, 3, 3, 3)).astype(np.float32) * 0.1,
        "conv.bias": rng.standard_normal(16).astype(np.float32) * 0.1,
        "norm.running_mean": np.zeros(16, np.float32),  # never trained on the server (FedBN)
        "norm.num_batches_tracked": np.array(0, np.int64),
    }


def _step(model: dict[str, np.ndarray], rng: np.random.Generator, scale: float = 1e-3) -> dict[str, np.ndarray]:
    """One FedAvg round's change to the trained keys only."""
    out = dict(model)
    for key in ("conv.weight", "conv.bias"):
        out[key] = (model[key] + scale * rng.standard_normal(model[key].shape)).astype(np.float32)
    return out


class Link:
    """Server encoder -> FOBS bytes -> site DequantizeFilter -> GlobalModelDeltaDecoder, for one site."""

    def __init__(self, encoder: GlobalModelDeltaEncoder, site: str) -> None:
        self.encoder, self.site = encoder, site
        self.dequantize, self.decoder = DequantizeFilter(), GlobalModelDeltaDecoder()
        self.wire_bytes: list[int] = []

    def encode(self, model: dict[str, np.ndarray]) -> Shareable:
        shareable = DXO(data_kind=DataKind.WEIGHTS, data=model).to_shareable()
        return self.encoder.process(shareable, _ctx("server", peer=self.site))

    def receive(self, sent: Shareable) -> dict[str, np.ndarray]:
        numpy_decomposers.register()
        raw = fobs.dumps(sent)
        self.wire_bytes.append(len(raw))
        site_ctx = _ctx(self.site)
        out = self.decoder.process(self.dequantize.process(fobs.loads(raw), site_ctx), site_ctx)
        dxo = from_shareable(out)
        assert dxo.data_kind == DataKind.WEIGHTS
        return dxo.data

    def send(self, model: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.receive(self.encode(model))


def _gap(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    return float(max(np.abs(a[k].astype(np.float64) - b[k]).max() for k in a if a[k].dtype.kind == "f"))


@pytest.mark.parametrize("single_payload", [False, True], ids=["per-tensor", "single-payload"])
@pytest.mark.parametrize("scheme", ["fp16", "int8", "int4", "int3", "int2", "topk"])
def test_site_copy_equals_server_reference_every_round(scheme, single_payload):
    encoder = GlobalModelDeltaEncoder(scheme=scheme, full_scheme="int8", single_payload=single_payload)
    link, rng, model = Link(encoder, "site-1"), np.random.default_rng(1), _model()
    for _ in range(4):
        received = link.send(model)
        reference = encoder.reference("site-1")
        assert set(received) == set(model)
        for key, value in received.items():
            assert value.dtype == model[key].dtype and value.shape == model[key].shape
            if value.dtype.kind == "f":
                np.testing.assert_array_equal(value, reference[key])
        np.testing.assert_array_equal(received["norm.num_batches_tracked"], model["norm.num_batches_tracked"])
        model = _step(model, rng)


def test_first_message_is_full_then_differences_without_unchanged_tensors():
    encoder = GlobalModelDeltaEncoder(scheme="int8")
    link, model = Link(encoder, "site-1"), _model()
    first = link.encode(model)
    assert from_shareable(first).get_meta_prop(DELTA_META_KEY)["base"] == "full"
    link.receive(first)
    second = link.encode(_step(model, np.random.default_rng(2)))
    dxo = from_shareable(second)
    assert dxo.get_meta_prop(DELTA_META_KEY)["base"] == "delta"
    assert set(dxo.data) == {"conv.weight", "conv.bias"}, "unchanged norm state and integers are not resent"
    link.receive(second)
    assert link.wire_bytes[1] < link.wire_bytes[0]


def test_topk_downlink_error_feedback_catches_up_when_the_model_stops_moving():
    """The gap between global model and site copy is resent: it shrinks round after round, never accumulates."""
    encoder = GlobalModelDeltaEncoder(scheme="topk", topk_fraction=0.1)
    link, rng, model = Link(encoder, "site-1"), np.random.default_rng(3), _model()
    link.send(model)
    for _ in range(3):
        model = _step(model, rng, scale=1e-2)
        received = link.send(model)
    gap_after_moves = _gap(model, received)
    assert gap_after_moves > 1e-3, "top-k 10% cannot carry a dense change in one round"
    for _ in range(40):
        received = link.send(model)
    assert _gap(model, received) < gap_after_moves / 20


def test_sites_have_separate_state_and_a_late_site_gets_full_weights():
    encoder = GlobalModelDeltaEncoder(scheme="int8")
    one, two, model = Link(encoder, "site-1"), Link(encoder, "site-2"), _model()
    one.send(model)
    model = _step(model, np.random.default_rng(4))
    one.send(model)
    sent = two.encode(model)
    assert from_shareable(sent).get_meta_prop(DELTA_META_KEY)["base"] == "full"
    two.receive(sent)
    assert fingerprint(encoder.reference("site-1")) != fingerprint(encoder.reference("site-2"))


def test_a_lost_message_is_detected_by_the_site():
    encoder = GlobalModelDeltaEncoder(scheme="int8")
    link, rng, model = Link(encoder, "site-1"), np.random.default_rng(5), _model()
    link.send(model)
    link.encode(_step(model, rng))  # encoded (server state advanced) but never delivered
    with pytest.raises(ValueError, match=r"difference #3 but this site holds copy #1"):
        link.send(_step(model, rng))


def test_a_tampered_difference_fails_the_fingerprint():
    encoder = GlobalModelDeltaEncoder(scheme="fp16")
    link, model = Link(encoder, "site-1"), _model()
    link.send(model)
    sent = link.encode(_step(model, np.random.default_rng(6)))
    dxo = from_shareable(sent)
    payload = dxo.data["conv.bias"]["payload"].copy()
    payload[0] ^= 0x40
    dxo.data["conv.bias"]["payload"] = payload
    with pytest.raises(ValueError, match="fingerprint"):
        link.receive(dxo.update_shareable(sent))


def test_decoder_refuses_plain_weights_and_undecoded_data():
    decoder = GlobalModelDeltaDecoder()
    plain = DXO(data_kind=DataKind.WEIGHTS, data=_model()).to_shareable()
    with pytest.raises(ValueError, match="GlobalModelDeltaEncoder"):
        decoder.process(plain, _ctx("site-1"))
    encoded = GlobalModelDeltaEncoder().process(plain, _ctx("server", peer="site-1"))
    with pytest.raises(ValueError, match="DequantizeFilter before"):
        decoder.process(encoded, _ctx("site-1"))


def test_encoder_needs_the_requesting_site_and_valid_arguments():
    plain = DXO(data_kind=DataKind.WEIGHTS, data=_model()).to_shareable()
    with pytest.raises(ValueError, match="no requesting site"):
        GlobalModelDeltaEncoder().process(plain, _ctx("server"))
    with pytest.raises(ValueError, match="full_scheme"):
        GlobalModelDeltaEncoder(full_scheme="topk")
    with pytest.raises(ValueError, match="scheme"):
        GlobalModelDeltaEncoder(scheme="int5")
    with pytest.raises(ValueError, match="topk_fraction"):
        GlobalModelDeltaEncoder(topk_fraction=0)
    with pytest.raises(ValueError, match="block_size has no meaning for fp16"):  # refused at start, not in round 1
        GlobalModelDeltaEncoder(scheme="int3", full_scheme="fp16", block_size=64)


def test_the_full_model_codec_follows_the_scheme_unless_given():
    assert GlobalModelDeltaEncoder(scheme="fp16").full_scheme == "fp16"
    assert GlobalModelDeltaEncoder(scheme="int3").full_scheme == "int4"  # 3-bit full weights: a third of a block
    assert GlobalModelDeltaEncoder(scheme="topk").full_scheme == "int8"  # top-k cannot send a full model
    assert GlobalModelDeltaEncoder(scheme="int3", full_scheme="int8").full_scheme == "int8"


class _Engine:
    def __init__(self, components: dict) -> None:
        self.components = components

    def get_component(self, component_id: str):
        return self.components.get(component_id)

    def fire_event(self, event_type: str, fl_ctx: FLContext) -> None:
        """Warnings from a component fire an event through the engine."""


def _with_engine(fl_ctx: FLContext, engine: _Engine) -> FLContext:
    fl_ctx.set_prop(ReservedKey.ENGINE, engine, private=True, sticky=False)
    return fl_ctx


def test_rebase_turns_the_sites_difference_into_local_minus_global():
    """Site trains from its lossy copy; after the rebase, FedAvg adds exactly ``local - global``."""
    store = SiteGapStore()
    engine = _Engine({"downlink_gaps": store})
    encoder = GlobalModelDeltaEncoder(scheme="topk", topk_fraction=0.1, gap_store_id="downlink_gaps")
    link, rng, model = Link(encoder, "site-1"), np.random.default_rng(7), _model()
    link.encoder.process = lambda s, ctx, f=encoder.process: f(s, _with_engine(ctx, engine))
    link.send(model)
    store.mark_answered("site-1")  # the site's first result came back, as RebaseOnSiteCopy records it
    model = _step(model, rng, scale=1e-2)
    copy = link.send(model)  # lossy: top-k of a dense change
    assert _gap(model, copy) > 1e-3
    local = {k: (v + 0.01 if v.dtype.kind == "f" else v) for k, v in copy.items() if k.startswith("conv")}
    site_diff = {k: local[k] - copy[k] for k in local}
    result = DXO(data_kind=DataKind.WEIGHT_DIFF, data=site_diff).to_shareable()
    rebased = from_shareable(
        RebaseOnSiteCopy("downlink_gaps").process(result, _with_engine(_ctx("server", peer="site-1"), engine))
    ).data
    for key in local:
        np.testing.assert_allclose(rebased[key], local[key] - model[key], atol=1e-6)


def test_rebase_fails_closed_without_a_recorded_gap_or_store():
    result = DXO(data_kind=DataKind.WEIGHT_DIFF, data={"conv.bias": np.zeros(16, np.float32)}).to_shareable()
    with pytest.raises(ValueError, match="no downlink gap recorded for site 'site-9'"):
        RebaseOnSiteCopy("gaps").process(
            result, _with_engine(_ctx("server", peer="site-9"), _Engine({"gaps": SiteGapStore()}))
        )
    with pytest.raises(ValueError, match="not a SiteGapStore"):
        RebaseOnSiteCopy("gaps").process(result, _with_engine(_ctx("server", peer="site-9"), _Engine({})))


def _site_result(engine: _Engine, site: str) -> None:
    """A site's train result passing the server's RebaseOnSiteCopy, which marks the downlink answered."""
    result = DXO(data_kind=DataKind.WEIGHT_DIFF, data={"conv.bias": np.zeros(16, np.float32)}).to_shareable()
    RebaseOnSiteCopy("downlink_gaps").process(result, _with_engine(_ctx("server", peer=site), engine))


def test_an_unanswered_message_is_followed_by_full_weights_and_the_site_recovers():
    store = SiteGapStore()
    engine = _Engine({"downlink_gaps": store})
    encoder = GlobalModelDeltaEncoder(scheme="int8", gap_store_id="downlink_gaps")
    link, rng, model = Link(encoder, "site-1"), np.random.default_rng(8), _model()
    link.encoder.process = lambda s, ctx, f=encoder.process: f(s, _with_engine(ctx, engine))
    bases = []
    for round_num in range(5):
        model = _step(model, rng)
        if round_num == 2:
            link.encode(model)  # encoded, never delivered, no result: the site still holds copy #2
            continue
        sent = link.encode(model)
        bases.append(from_shareable(sent).get_meta_prop(DELTA_META_KEY)["base"])
        received = link.receive(sent)
        assert _gap(model, received) < 1e-2  # the site holds (a close copy of) the current global model
        _site_result(engine, "site-1")
    assert bases == ["full", "delta", "full", "delta"]  # one full resend after the lost message, then differences


def test_without_results_every_message_is_full():
    """No RebaseOnSiteCopy answering (a job wired without it) means no acknowledgement: safe, but no savings."""
    store = SiteGapStore()
    engine = _Engine({"downlink_gaps": store})
    encoder = GlobalModelDeltaEncoder(scheme="int8", gap_store_id="downlink_gaps")
    link, model = Link(encoder, "site-1"), _model()
    link.encoder.process = lambda s, ctx, f=encoder.process: f(s, _with_engine(ctx, engine))
    for _ in range(2):
        assert from_shareable(link.encode(model)).get_meta_prop(DELTA_META_KEY)["base"] == "full"
