"""QuantizeFilter / DequantizeFilter / MessageSizeRecorder on real DXOs and bare FLContexts.

The quantisation filters read one thing from the context, the site name (``get_identity_name``), to keep per-site
generators and residuals apart; a bare ``FLContext()`` gives "". The recorder also needs an engine with a workspace
and a job id (where to write), the round (message header ``current_round``) and, for ``server_to_site``, the peer.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from nvflare.apis.dxo import DXO, DataKind, MetaKey, from_shareable
from nvflare.apis.fl_constant import FLContextKey, ReservedKey
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable, make_copy
from nvflare.apis.workspace import Workspace
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.decomposers import numpy_decomposers
from nvflare.fuel.utils import fobs

from fedseg3d.compression import codecs
from fedseg3d.filters.message_size import MessageSizeRecorder, message_nbytes, streamed_nbytes
from fedseg3d.filters.quantize_filter import PACKED_KEY, QUANT_META_KEY, DequantizeFilter, QuantizeFilter

SCHEMES = ["fp16", "int8", "int4", "int3", "int2", "topk"]


def _update(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "model.0.conv.weight": (rng.standard_normal((8, 4, 3, 3, 3)) * 1e-3).astype(np.float32),
        "model.0.conv.bias": (rng.standard_normal(8) * 1e-3).astype(np.float32),
        "model.0.adn.A.weight": np.array([2e-4], dtype=np.float32),
        "model.0.steps": np.array([12, 7], dtype=np.int64),
    }


def _unet_like_update(seed: int = 0) -> dict[str, np.ndarray]:
    """60 tensors, about 320k values: conv kernel, bias and PReLU weight per block, as in a small 3D U-Net."""
    rng = np.random.default_rng(seed)
    channels = [(1, 8), (8, 8), (8, 16), (16, 16), (16, 32), (32, 32), (32, 64), (64, 48), (48, 32), (64, 16)]
    channels += [(16, 16), (32, 8), (8, 8), (16, 8), (8, 8), (8, 3), (3, 3), (24, 24), (16, 16), (32, 16)]
    update = {}
    for i, (c_in, c_out) in enumerate(channels):
        update[f"block{i}.conv.weight"] = (rng.standard_normal((c_out, c_in, 3, 3, 3)) * 1e-3).astype(np.float32)
        update[f"block{i}.conv.bias"] = (rng.standard_normal(c_out) * 1e-3).astype(np.float32)
        update[f"block{i}.adn.A.weight"] = (rng.standard_normal(1) * 1e-3).astype(np.float32)
    return update


def _shareable(data: dict, kind: DataKind = DataKind.WEIGHT_DIFF, round_num: int = 3) -> Shareable:
    shareable = DXO(data_kind=kind, data=data, meta={MetaKey.NUM_STEPS_CURRENT_ROUND: 40}).to_shareable()
    shareable.set_header(AppConstants.CURRENT_ROUND, round_num)
    return shareable


def _site_ctx(name: str) -> FLContext:
    fl_ctx = FLContext()
    fl_ctx.set_prop(ReservedKey.IDENTITY_NAME, name, private=False, sticky=False)
    return fl_ctx


def _over_the_wire(shareable: Shareable) -> Shareable:
    """Serialise and deserialise as FLARE does between processes (FLARE registers the numpy decomposer itself)."""
    numpy_decomposers.register()
    return fobs.loads(fobs.dumps(shareable))


# ---------------------------------------------------------------------------------------------- quantise/dequantise
@pytest.mark.parametrize(
    "kwargs",
    [
        {"scheme": "int5"},
        {"scheme": "fp16", "block_size": 64},
        {"scheme": "int8", "block_size": 0},
        {"scheme": "int8", "block_size": 64.0},
        {"scheme": "topk", "topk_fraction": 0.0},
        {"scheme": "topk", "topk_fraction": 1.5},
        {"scheme": "topk", "error_feedback": "yes"},
        {"scheme": "int8", "seed": -1},
        {"scheme": "int3", "single_payload": 1},
    ],
)
def test_quantizer_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError, match="QuantizeFilter"):
        QuantizeFilter(**kwargs)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_round_trip_restores_arrays_kind_and_meta(scheme):
    update = _update()
    wire = QuantizeFilter(scheme=scheme).process(_shareable(update), FLContext())

    sent = from_shareable(wire)
    assert sent.data_kind == DataKind.APP_DEFINED  # a receiver without a dequantiser cannot mistake it for weights
    record = sent.get_meta_prop(QUANT_META_KEY)
    assert record["scheme"] == scheme and record["data_kind"] == "WEIGHT_DIFF"
    assert record["dtypes"] == {k: "float32" for k in update if k != "model.0.steps"}
    assert record["raw_bytes"] == sum(v.nbytes for v in update.values())
    assert record["encoded_bytes"] < record["raw_bytes"]
    assert sent.data["model.0.steps"] is update["model.0.steps"]  # integers pass through untouched
    assert sent.get_filter_history() == ["QuantizeFilter"]

    restored = from_shareable(DequantizeFilter().process(_over_the_wire(wire), FLContext()))
    assert restored.data_kind == DataKind.WEIGHT_DIFF
    assert QUANT_META_KEY not in restored.meta and restored.meta[MetaKey.NUM_STEPS_CURRENT_ROUND] == 40
    assert restored.data.keys() == update.keys()
    np.testing.assert_array_equal(restored.data["model.0.steps"], update["model.0.steps"])
    assert restored.data["model.0.steps"].dtype == np.int64
    for key, container in sent.data.items():
        if key == "model.0.steps":
            continue
        assert restored.data[key].dtype == np.float32 and restored.data[key].shape == update[key].shape
        assert np.all(np.abs(restored.data[key] - update[key]) <= codecs.error_bound(container))


@pytest.mark.parametrize("scheme", ["int8", "int3", "topk"])
def test_single_payload_sends_one_array_and_restores_the_same_values(scheme):
    update = _update()
    per_tensor = QuantizeFilter(scheme=scheme, seed=5).process(_shareable(update), FLContext())
    packed = QuantizeFilter(scheme=scheme, seed=5, single_payload=True).process(_shareable(update), FLContext())
    sent = from_shareable(packed)
    assert set(sent.data) == {PACKED_KEY, "model.0.steps"}  # one container for the floats, integers as they were
    assert message_nbytes(packed) < message_nbytes(per_tensor)
    restored = from_shareable(DequantizeFilter().process(_over_the_wire(packed), FLContext())).data
    expected = from_shareable(DequantizeFilter().process(_over_the_wire(per_tensor), FLContext())).data
    assert restored.keys() == update.keys()
    for key, value in expected.items():  # same seed, same draws: identical values
        np.testing.assert_array_equal(restored[key], value)


def test_single_payload_refuses_a_tensor_named_like_the_pack():
    with pytest.raises(ValueError, match=PACKED_KEY):
        QuantizeFilter(scheme="int8", single_payload=True).process(
            _shareable({PACKED_KEY: np.ones(3, np.float32)}), FLContext()
        )


def test_dequantizer_refuses_a_tensor_both_packed_and_loose():
    wire = QuantizeFilter(scheme="int8", single_payload=True).process(_shareable(_update()), FLContext())
    dxo = from_shareable(wire)
    dxo.data["model.0.conv.bias"] = np.ones(8, np.int64)
    with pytest.raises(ValueError, match="both packed and sent on its own"):
        DequantizeFilter().process(dxo.update_shareable(wire), FLContext())


def test_server_side_quantisation_leaves_the_shared_global_model_alone():
    """The server gives each site a shallow copy of one task: quantising one copy must not touch the others."""
    weights = _update()
    del weights["model.0.steps"]
    task = _shareable(weights, kind=DataKind.WEIGHTS)
    quantizer = QuantizeFilter(scheme="int8")
    first = quantizer.process(make_copy(task), _site_ctx("server"))
    second = quantizer.process(make_copy(task), _site_ctx("server"))

    original = from_shareable(task)
    assert original.data_kind == DataKind.WEIGHTS and QUANT_META_KEY not in original.meta
    assert all(original.data[k] is weights[k] for k in weights)
    assert not original.get_filter_history()
    for wire in (first, second):
        assert from_shareable(wire).get_filter_history() == ["QuantizeFilter"]
    # Independent rounding noise per copy: sites do not all receive the same quantisation error.
    a, b = (from_shareable(w).data["model.0.conv.weight"]["payload"] for w in (first, second))
    assert not np.array_equal(a, b)


def test_topk_of_full_weights_raises():
    with pytest.raises(ValueError, match="WEIGHT_DIFF"):
        QuantizeFilter(scheme="topk").process(_shareable(_update(), kind=DataKind.WEIGHTS), FLContext())


@pytest.mark.parametrize(
    ("bad", "message"),
    [([0.1, 0.2], "expected a numpy array"), (np.array([np.nan], np.float32), "non-finite")],
)
def test_quantizer_raises_on_values_it_cannot_encode(bad, message):
    update = {**_update(), "model.9.weight": bad}
    with pytest.raises(ValueError, match=f"model.9.weight.*{message}"):
        QuantizeFilter(scheme="int8").process(_shareable(update), FLContext())


def test_error_feedback_carries_the_residual_into_the_next_round():
    key = "model.0.conv.weight"
    first, second = _update(seed=1), _update(seed=2)
    quantizer = QuantizeFilter(scheme="topk", topk_fraction=0.1)
    site = _site_ctx("site-1")

    sent_1 = from_shareable(quantizer.process(_shareable(first), site)).data[key]
    residual_1 = quantizer.residual(key, "site-1")
    np.testing.assert_allclose(residual_1, first[key] - codecs.decode(sent_1), atol=1e-9)
    assert np.count_nonzero(residual_1) >= 0.85 * residual_1.size  # most of the update was held back

    sent_2 = from_shareable(quantizer.process(_shareable(second), site)).data[key]
    residual_2 = quantizer.residual(key, "site-1")
    # The second round encoded update + residual, so what was sent plus what is held adds up to both updates.
    np.testing.assert_allclose(
        codecs.decode(sent_1) + codecs.decode(sent_2) + residual_2, first[key] + second[key], atol=1e-8
    )
    corrected = second[key] + residual_1
    kept = codecs.decode(sent_2) != 0
    assert np.abs(corrected[kept]).min() >= np.abs(corrected[~kept]).max() - 1e-6  # selection saw the residual

    assert quantizer.residual(key, "site-2") is None  # state is per site
    no_feedback = QuantizeFilter(scheme="topk", topk_fraction=0.1, error_feedback=False)
    no_feedback.process(_shareable(first), site)
    assert no_feedback.residual(key, "site-1") is None


@pytest.mark.parametrize(("scheme", "gain"), [("int3", 3.0), ("int2", 1.3)])
def test_error_feedback_keeps_the_accumulated_rounding_error_within_one_step(scheme, gain):
    """40 rounds of the same update: with feedback, what was sent in all differs from the sum of the updates by the
    last residual only, which is within one grid step of the last encoding; without it the independent rounding
    errors add up (a random walk, several steps). Ternary codes gain less: a grid step is the block's whole absmax,
    so the residual is often as large as the value itself (medians about 5x apart for int3, 1.9x for int2)."""
    key, rounds = "model.0.conv.weight", 40
    update = _update(seed=3)
    drift, last_bound = {}, None
    for feedback in (True, False):
        quantizer = QuantizeFilter(scheme=scheme, error_feedback=feedback, seed=11)
        sent = np.zeros_like(update[key])
        for _ in range(rounds):
            container = from_shareable(quantizer.process(_shareable(update), _site_ctx("site-1"))).data[key]
            sent += codecs.decode(container)
        drift[feedback] = np.abs(sent - rounds * update[key])
        if feedback:
            last_bound = codecs.error_bound(container)
            np.testing.assert_allclose(sent + quantizer.residual(key, "site-1"), rounds * update[key], atol=1e-6)
    assert np.all(drift[True] <= last_bound + 1e-6)
    assert np.median(drift[False]) > gain * np.median(drift[True])


def test_error_feedback_leaves_full_weights_alone():
    quantizer = QuantizeFilter(scheme="int3")
    quantizer.process(_shareable(_update(), kind=DataKind.WEIGHTS), _site_ctx("site-1"))
    assert quantizer.residual("model.0.conv.weight", "site-1") is None


def test_error_feedback_raises_when_a_tensor_changes_shape():
    quantizer = QuantizeFilter(scheme="topk")
    quantizer.process(_shareable(_update()), FLContext())
    changed = {**_update(), "model.0.conv.bias": np.zeros(16, np.float32)}
    with pytest.raises(ValueError, match="model.0.conv.bias.*residual"):
        quantizer.process(_shareable(changed), FLContext())


def _tamper(wire: Shareable, change) -> Shareable:
    dxo = from_shareable(wire)
    change(dxo)
    return dxo.update_shareable(wire)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda d: d.data["model.0.conv.weight"].update(payload=d.data["model.0.conv.weight"]["payload"][:-3]),
            "model.0.conv.weight: container field 'payload' is truncated",
        ),
        (lambda d: d.data.pop("model.0.conv.bias"), r"\['model.0.conv.bias'\].*missing"),
        (lambda d: d.data.update({"model.0.conv.bias": np.zeros(8, np.float32)}), "model.0.conv.bias.*non-float"),
        (lambda d: d.data["model.0.conv.bias"].update(scheme="fp16"), "model.0.conv.bias.*record says 'int4'"),
        (lambda d: d.meta[QUANT_META_KEY].update(data_kind="METRICS"), "data_kind"),
        (lambda d: d.meta[QUANT_META_KEY].update(scheme="int5"), "scheme"),
    ],
    ids=["truncated payload", "missing tensor", "float array", "scheme mismatch", "bad data kind", "bad scheme"],
)
def test_dequantizer_raises_on_malformed_payloads(change, message):
    wire = _over_the_wire(QuantizeFilter(scheme="int4").process(_shareable(_update()), FLContext()))
    with pytest.raises(ValueError, match=message):
        DequantizeFilter().process(_tamper(wire, change), FLContext())


def test_dequantizer_passes_unquantised_messages_through():
    update = _update()
    shareable = _shareable(update)
    out = from_shareable(DequantizeFilter().process(shareable, FLContext()))
    assert out.data_kind == DataKind.WEIGHT_DIFF and all(out.data[k] is update[k] for k in update)


@pytest.mark.parametrize(
    ("scheme", "kwargs", "low", "high"),
    [
        ("fp16", {}, 1.9, 2.0),
        ("int8", {}, 3.6, 4.0),
        ("int4", {}, 6.5, 7.5),
        ("int4", {"block_size": 256}, 6.8, 7.9),
        ("topk", {"topk_fraction": 0.1}, 12.0, 18.0),
        ("int3", {}, 7.5, 8.5),  # 3.25 bits a value: only per-tensor framing keeps it near 8x
        ("int4", {"single_payload": True}, 7.3, 7.6),  # framing gone, 4.25 bits a value: still short of 8x
        ("int3", {"single_payload": True}, 9.2, 9.8),  # headers and record: about 5% of the message
        ("int2", {"single_payload": True}, 13.0, 14.0),
    ],
)
def test_wire_bytes_of_a_unet_sized_update(scheme, kwargs, low, high):
    """Serialised (FOBS) size against the float32 message, framing of all 60 tensors included."""
    update = _unet_like_update()
    assert len(update) == 60 and 300_000 < sum(v.size for v in update.values()) < 330_000
    baseline = message_nbytes(_shareable(update))
    wire = QuantizeFilter(scheme=scheme, **kwargs).process(_shareable(update), FLContext())
    assert low <= baseline / message_nbytes(wire) <= high


# ------------------------------------------------------------------------------------------------- message sizes
class _Engine:
    def __init__(self, workspace: Workspace) -> None:
        self._workspace = workspace

    def get_workspace(self) -> Workspace:
        return self._workspace


def _job_ctx(tmp_path, identity: str, peer: str | None = None) -> FLContext:
    (tmp_path / "startup").mkdir(exist_ok=True)
    (tmp_path / "local").mkdir(exist_ok=True)
    fl_ctx = _site_ctx(identity)
    fl_ctx.set_prop(ReservedKey.ENGINE, _Engine(Workspace(str(tmp_path), identity)), private=True, sticky=False)
    fl_ctx.set_prop(ReservedKey.RUN_NUM, "simulate_job", private=False, sticky=False)
    if peer is not None:
        fl_ctx.set_peer_context(_site_ctx(peer))
    return fl_ctx


@pytest.mark.parametrize("kwargs", [{"direction": "up"}, {"output_file": "../sizes.jsonl"}, {"output_file": "a/b"}])
def test_recorder_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError, match="MessageSizeRecorder"):
        MessageSizeRecorder(**kwargs)


def test_recorder_appends_the_serialised_size_and_passes_the_message_on(tmp_path):
    update = _update()
    fl_ctx = _job_ctx(tmp_path, "site-1")
    recorder = MessageSizeRecorder(direction="site_to_server")
    quantised = QuantizeFilter(scheme="int8").process(_shareable(update, round_num=4), fl_ctx)
    plain = _shareable(update, round_num=5)

    assert recorder.process(quantised, fl_ctx) is quantised
    assert recorder.process(plain, fl_ctx) is plain

    lines = (tmp_path / "simulate_job" / "fedseg3d" / "message_sizes.jsonl").read_text().splitlines()
    first, second = (json.loads(line) for line in lines)
    raw = sum(v.nbytes for v in update.values())
    assert first["bytes"] == len(fobs.dumps(quantised)) and second["bytes"] == len(fobs.dumps(plain))
    assert {k: first[k] for k in ("round", "site", "direction", "raw_float32_bytes")} == {
        "round": 4,
        "site": "site-1",
        "direction": "site_to_server",
        "raw_float32_bytes": raw,
    }
    assert second["round"] == 5 and second["raw_float32_bytes"] == raw
    assert second["bytes"] > first["bytes"]


def test_recorder_names_the_receiving_site_on_the_server(tmp_path):
    fl_ctx = _job_ctx(tmp_path, "server", peer="site-2")
    MessageSizeRecorder(direction="server_to_site", output_file="down.jsonl").process(_shareable(_update()), fl_ctx)
    entry = json.loads((tmp_path / "simulate_job" / "fedseg3d" / "down.jsonl").read_text())
    assert entry["site"] == "site-2" and entry["direction"] == "server_to_site"


def test_recorder_outside_a_job_raises():
    with pytest.raises(RuntimeError, match="engine"):
        MessageSizeRecorder().process(_shareable(_update()), FLContext())


class _EventEngine(_Engine):
    """An engine that hands out contexts and records the events fired with them (as FLARE's engines do)."""

    def __init__(self, workspace: Workspace) -> None:
        super().__init__(workspace)
        self.events: list[tuple[str, Shareable]] = []

    def new_context(self) -> FLContext:
        fl_ctx = FLContext()
        fl_ctx.set_prop(ReservedKey.ENGINE, self, private=True, sticky=False)
        return fl_ctx

    def fire_event(self, event_type: str, fl_ctx: FLContext) -> None:
        self.events.append((event_type, fl_ctx.get_prop(FLContextKey.EVENT_DATA)))


def test_recorder_on_the_receiving_server_names_the_sender_round_task_and_streams_to_tensorboard(tmp_path):
    fl_ctx = _job_ctx(tmp_path, "server", peer="site-2")
    engine = _EventEngine(fl_ctx.get_engine().get_workspace())
    fl_ctx.set_prop(ReservedKey.ENGINE, engine, private=True, sticky=False)
    fl_ctx.set_prop(FLContextKey.TASK_NAME, "train", private=True, sticky=False)
    result = DXO(data_kind=DataKind.WEIGHT_DIFF, data=_update()).to_shareable()
    result.add_cookie(AppConstants.CONTRIBUTION_ROUND, 7)  # what a site echoes back from its task
    recorder = MessageSizeRecorder(direction="site_to_server", side="receiver", tb_tag="message_bytes")
    assert recorder.process(result, fl_ctx) is result

    entry = json.loads((tmp_path / "simulate_job" / "fedseg3d" / "message_sizes.jsonl").read_text())
    assert {k: entry[k] for k in ("round", "site", "task", "side")} == {
        "round": 7,
        "site": "site-2",
        "task": "train",
        "side": "receiver",
    }
    ((event_type, data),) = engine.events
    analytic = from_shareable(data).data
    assert event_type == "analytix_log_stats"
    assert analytic["track_key"] == "message_bytes/site_to_server/site-2"
    assert analytic["track_value"] == entry["bytes"] and analytic["global_step"] == 7


def test_streamed_size_swaps_inline_arrays_for_one_npz_item_each():
    import io

    plain = Shareable()
    plain.set_header("note", "no arrays")
    assert streamed_nbytes(plain) == message_nbytes(plain)

    update = _update()
    quantised = QuantizeFilter(scheme="int8").process(_shareable(update), FLContext())
    arrays = [v["payload"] if isinstance(v, dict) else v for v in from_shareable(quantised).data.values()]
    extra = 0
    for i, array in enumerate(arrays):
        npy, npz = io.BytesIO(), io.BytesIO()
        np.save(npy, array, allow_pickle=False)
        np.savez(npz, allow_pickle=False, **{f"a{i}": array})
        extra += len(npz.getvalue()) - len(npy.getvalue())
    assert extra > 0
    assert streamed_nbytes(quantised) == message_nbytes(quantised) + extra
