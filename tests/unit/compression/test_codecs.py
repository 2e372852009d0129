"""The pure-numpy codecs: error bounds, unbiased rounding, byte counts and validation of malformed containers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedseg3d.compression import codecs

CASES = [
    ("fp16", {}),
    ("int8", {}),
    ("int8", {"block_size": 64}),
    ("int4", {}),
    ("int4", {"block_size": 256}),
    ("int3", {}),
    ("int3", {"block_size": 256}),
    ("int2", {}),
    ("topk", {"topk_fraction": 0.1}),
    ("topk", {"topk_fraction": 0.01}),
]
SHAPES = [(), (0,), (1,), (7,), (257,), (16, 8, 3, 3, 3)]


def _update(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """Weight-difference-like values: mostly small, a few outliers that stretch their block's scale."""
    rng = np.random.default_rng(seed)
    x = np.asarray(rng.standard_normal(shape) * 1e-3)
    if x.size > 4:
        x.reshape(-1)[rng.choice(x.size, 3, replace=False)] *= 40
    return np.asarray(x, dtype=np.float32)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize(("scheme", "kwargs"), CASES, ids=[f"{s}-{k}" for s, k in CASES])
def test_round_trip_stays_within_the_stated_bound(scheme, kwargs, shape):
    x = _update(shape)
    container = codecs.encode(x, scheme, np.random.default_rng(1), **kwargs)
    x_hat = codecs.decode(container, "w")
    assert x_hat.shape == x.shape and x_hat.dtype == x.dtype
    assert np.all(np.abs(x.astype(np.float64) - x_hat) <= codecs.error_bound(container))


@pytest.mark.parametrize("bits", [8, 4, 3, 2])
def test_blockwise_bound_is_one_grid_step_and_tight(bits):
    block = 64
    x = np.random.default_rng(2).uniform(-1, 1, size=4 * block).astype(np.float32)
    x[::block] = 1.0  # absmax 1.0 in every block: a scale float16 holds exactly
    container = codecs.encode_blockwise(x, bits, np.random.default_rng(3), block_size=block)
    step = 1.0 / codecs.levels(bits)
    np.testing.assert_allclose(codecs.error_bound(container), step * (1 + codecs.BLOCKWISE_SLACK))
    error = np.abs(x - codecs.decode(container))
    assert error.max() <= step * (1 + codecs.BLOCKWISE_SLACK)
    assert error.max() > 0.5 * step  # stochastic rounding really uses the whole step: the bound is not slack


def test_fp16_bound_is_relative_and_covers_subnormals():
    x = np.array([1.0, 1 + 2**-11, -3.14159, 1e-6, -7e-8, 65000.0, 0.0], dtype=np.float32)
    container = codecs.encode_fp16(x)
    x_hat = codecs.decode(container).astype(np.float64)
    bound = codecs.FP16_RELATIVE_ERROR * np.abs(x_hat) + codecs.FP16_SUBNORMAL_ERROR
    np.testing.assert_array_equal(codecs.error_bound(container), bound)
    assert np.all(np.abs(x.astype(np.float64) - x_hat) <= bound)


@pytest.mark.parametrize("bits", [8, 4, 3, 2])
def test_stochastic_rounding_is_unbiased_and_round_to_nearest_is_not(bits):
    """Mean of 2000 quantisations lands within 5 standard errors of x; round-to-nearest misses by far more."""
    draws, block = 2000, 64
    step = 1.0 / codecs.levels(bits)
    frac = np.linspace(0.1, 0.9, block - 1)  # position between two grid points, away from both
    top = codecs.levels(bits)
    x = np.concatenate([[1.0], (np.arange(block - 1) % (2 * top) - top + frac) * step]).astype(np.float32)
    p = (x / step - np.floor(x / step)).astype(np.float64)  # probability of rounding up
    rng = np.random.default_rng(20240517)
    decoded = np.stack([codecs.decode(codecs.encode_blockwise(x, bits, rng, block_size=block)) for _ in range(draws)])

    # Each decode is floor or ceil of x/step times step: a Bernoulli(p) with variance step^2 p (1 - p).
    sd = step * np.sqrt(p * (1 - p))
    tolerance = 5 * sd / math.sqrt(draws) + 1e-7
    assert np.all(np.abs(decoded.mean(axis=0) - x) <= tolerance)
    np.testing.assert_allclose(decoded.std(axis=0)[1:], sd[1:], rtol=0.2)  # the variance the tolerance assumes

    nearest = np.round(x / step) * step
    assert np.all(np.abs(nearest - x)[1:] > 1.5 * tolerance[1:])  # a biased rounding would fail the check above


def test_topk_keeps_the_largest_magnitudes():
    x = _update((40, 50), seed=4)
    container = codecs.encode_topk(x, 0.1, np.random.default_rng(0), value_bits=32)
    x_hat = codecs.decode(container)
    kept = x_hat != 0
    assert kept.sum() == container["k"] == math.ceil(0.1 * x.size)
    np.testing.assert_array_equal(x_hat[kept], x[kept])  # float32 values travel exactly
    assert np.abs(x[kept]).min() >= np.abs(x[~kept]).max()


@pytest.mark.parametrize(("fraction", "index_format"), [(0.1, "bitmap"), (0.03, "int32"), (0.01, "int32")])
def test_topk_picks_the_smaller_index_encoding(fraction, index_format):
    x = _update((10_000,), seed=5)
    container = codecs.encode_topk(x, fraction, np.random.default_rng(0))
    assert container["index_format"] == index_format
    assert np.all(np.abs(x - codecs.decode(container)) <= codecs.error_bound(container))


def test_encoded_bytes_shrink_by_the_expected_factor():
    x = _update((64, 64, 3, 3, 3))
    n, raw = x.size, x.nbytes
    rng = np.random.default_rng(0)
    sizes = {
        "fp16": codecs.encoded_nbytes(codecs.encode(x, "fp16")),
        "int8": codecs.encoded_nbytes(codecs.encode(x, "int8", rng)),
        "int4/64": codecs.encoded_nbytes(codecs.encode(x, "int4", rng)),
        "int4/256": codecs.encoded_nbytes(codecs.encode(x, "int4", rng, block_size=256)),
        "int3/64": codecs.encoded_nbytes(codecs.encode(x, "int3", rng)),
        "int2/64": codecs.encoded_nbytes(codecs.encode(x, "int2", rng)),
        "topk/0.1": codecs.encoded_nbytes(codecs.encode(x, "topk", rng, topk_fraction=0.1)),
        "topk/0.01": codecs.encoded_nbytes(codecs.encode(x, "topk", rng, topk_fraction=0.01)),
    }
    k10, k1 = math.ceil(0.1 * n), math.ceil(0.01 * n)
    assert sizes == {
        "fp16": 2 * n,
        "int8": n + 2 * math.ceil(n / 256),  # int8 codes + float16 scales
        "int4/64": n // 2 + 2 * math.ceil(n / 64),
        "int4/256": n // 2 + 2 * math.ceil(n / 256),
        "int3/64": math.ceil(3 * n / 8) + 2 * math.ceil(n / 64),
        "int2/64": math.ceil(2 * n / 8) + 2 * math.ceil(n / 64),
        "topk/0.1": math.ceil(n / 8) + k10 + 2 * math.ceil(k10 / 256),  # bitmap + int8 values + scales
        "topk/0.01": 4 * k1 + k1 + 2 * math.ceil(k1 / 256),  # int32 indices + int8 values + scales
    }
    ratio = {name: raw / size for name, size in sizes.items()}
    assert ratio["fp16"] == 2.0
    assert 3.95 < ratio["int8"] < 4.0
    assert 7.5 < ratio["int4/64"] < 7.6 and 7.85 < ratio["int4/256"] < 8.0
    assert 9.8 < ratio["int3/64"] < 9.9 and 14.2 < ratio["int2/64"] < 14.3
    assert 17 < ratio["topk/0.1"] < 18 and 75 < ratio["topk/0.01"] < 81


@pytest.mark.parametrize("scheme", ["int8", "int4", "int3", "int2"])
def test_all_zero_and_tiny_blocks_decode_cleanly(scheme):
    x = np.zeros(300, dtype=np.float32)
    x[256:] = 3e-8  # below float16's normal range: the scale rounds up to a subnormal
    container = codecs.encode(x, scheme, np.random.default_rng(0), block_size=256)
    x_hat = codecs.decode(container)
    np.testing.assert_array_equal(x_hat[:256], 0.0)
    assert np.all(np.abs(x - x_hat) <= codecs.error_bound(container))


@pytest.mark.parametrize(
    ("x", "message"),
    [
        (np.array([1.0, np.nan], dtype=np.float32), "non-finite"),
        (np.array([1.0, np.inf], dtype=np.float32), "non-finite"),
        (np.array([1, 2], dtype=np.int64), "numpy array of"),
        (np.array([1e5], dtype=np.float32), "float16"),
    ],
)
@pytest.mark.parametrize("scheme", ["fp16", "int8", "int4", "topk"])
def test_encoders_reject_what_they_cannot_represent(x, message, scheme):
    with pytest.raises(ValueError, match=message):
        codecs.encode(x, scheme, np.random.default_rng(0))


def test_encoders_validate_their_arguments():
    x = np.ones(10, dtype=np.float32)
    with pytest.raises(TypeError, match="Generator"):
        codecs.encode(x, "int8", rng=np.random.RandomState(0))
    with pytest.raises(ValueError, match="block_size"):
        codecs.encode(x, "int4", np.random.default_rng(0), block_size=0)
    with pytest.raises(ValueError, match="fraction"):
        codecs.encode(x, "topk", np.random.default_rng(0), topk_fraction=0.0)
    with pytest.raises(ValueError, match="scheme"):
        codecs.encode(x, "int5", np.random.default_rng(0))
    with pytest.raises(ValueError, match="fp16"):
        codecs.encode(x, "fp16", block_size=64)


def _encoded(scheme: str, **kwargs) -> dict:
    return codecs.encode(_update((1000,)), scheme, np.random.default_rng(0), **kwargs)


def _set_bytes(container: dict, offset: int, values: list[int]) -> dict:
    payload = container["payload"].copy()
    payload[offset : offset + len(values)] = values
    return {**container, "payload": payload}


NAN_FP16 = [0x00, 0x7E]  # little-endian float16 NaN
NEG_FP16 = [0x00, 0xBC]  # -1.0
MALFORMED = {
    "unknown scheme": (lambda: {**_encoded("int8"), "scheme": "int5"}, "'scheme'"),
    "not a dict": (lambda: [1, 2, 3], "expected an encoded container"),
    "missing field": (
        lambda: {k: v for k, v in _encoded("int8").items() if k != "block_size"},
        "'block_size'.*missing",
    ),
    "unexpected field": (lambda: {**_encoded("fp16"), "block_size": 64}, "'block_size'.*unexpected"),
    "shape longer than payload": (lambda: {**_encoded("int8"), "shape": [1001]}, "truncated"),
    "shape shorter than payload": (lambda: {**_encoded("int4"), "shape": [10, 10]}, "too long"),
    "negative shape": (lambda: {**_encoded("int8"), "shape": [-1000]}, "'shape'"),
    "non-float dtype": (lambda: {**_encoded("int8"), "dtype": "int64"}, "'dtype'"),
    "truncated payload": (lambda: {**(c := _encoded("int8")), "payload": c["payload"][:-1]}, "truncated"),
    "payload not uint8": (lambda: {**(c := _encoded("fp16")), "payload": c["payload"].view(np.int8)}, "'payload'"),
    "payload not an array": (lambda: {**(c := _encoded("fp16")), "payload": c["payload"].tobytes()}, "'payload'"),
    "bad block_size": (lambda: {**_encoded("int8"), "block_size": 0}, "'block_size'"),
    "NaN scale": (lambda: _set_bytes(_encoded("int8"), 0, NAN_FP16), "invalid scale nan"),
    "negative scale": (lambda: _set_bytes(_encoded("int4"), 2, NEG_FP16), "invalid scale -1"),
    "int8 code -128": (lambda: _set_bytes(_encoded("int8"), 2 * 4, [0x80]), "code -128"),
    "int4 code 15": (lambda: _set_bytes(_encoded("int4"), 2 * 16, [0xF0]), "code 8"),
    "fp16 NaN": (lambda: _set_bytes(_encoded("fp16"), 10, NAN_FP16), "non-finite"),
    "topk k too large": (lambda: {**_encoded("topk", topk_fraction=0.1), "k": 1001}, "'k'"),
    "topk k disagrees with bitmap": (lambda: {**_encoded("topk", topk_fraction=0.2), "k": 199}, "truncated|too long"),
    "topk bitmap popcount": (lambda: _set_bytes(_encoded("topk", topk_fraction=0.2), 0, [0xFF]), "bitmap marks"),
    "topk index out of range": (
        lambda: _set_bytes(_encoded("topk", topk_fraction=0.01), 36, [0xFF, 0xFF, 0, 0]),
        "strictly increasing",
    ),
    "topk unknown index format": (lambda: {**_encoded("topk"), "index_format": "csr"}, "'index_format'"),
    "topk unknown value_bits": (lambda: {**_encoded("topk"), "value_bits": 16}, "'value_bits'"),
}


@pytest.mark.parametrize("case", MALFORMED, ids=list(MALFORMED))
def test_decode_rejects_malformed_containers_naming_the_tensor(case):
    build, message = MALFORMED[case]
    with pytest.raises(ValueError, match=message) as info:
        codecs.decode(build(), name="model.0.conv.weight")
    assert str(info.value).startswith("model.0.conv.weight:")


@pytest.mark.parametrize("bits", [4, 3, 2])
def test_sub_byte_codes_are_a_little_endian_bit_stream(bits):
    """The documented layout, checked bit by bit: element i's code+L sits in bits b*i .. b*i+b-1 of the payload."""
    n, block = 11, 64
    x = np.linspace(-1, 1, n).astype(np.float32)
    container = codecs.encode_blockwise(x, bits, np.random.default_rng(0), block_size=block)
    body = container["payload"][2:]  # after the one float16 scale
    assert body.size == math.ceil(n * bits / 8)
    stream = np.unpackbits(body, bitorder="little")
    step = float(np.float16(1.0)) / codecs.levels(bits)
    codes = np.rint(codecs.decode(container) / step).astype(int)
    for i, code in enumerate(codes):
        value = sum(int(stream[bits * i + j]) << j for j in range(bits))
        assert value == code + codecs.levels(bits)
    assert not stream[n * bits :].any()  # padding is zero


def test_int2_and_int3_reject_the_unused_code():
    for scheme, byte, code in (("int2", 0b11, "code 2"), ("int3", 0b111, "code 4")):
        container = codecs.encode(np.zeros(8, np.float32), scheme, np.random.default_rng(0))
        payload = container["payload"].copy()
        payload[2] |= byte  # element 0 gets the one offset code a symmetric grid never uses
        with pytest.raises(ValueError, match=code):
            codecs.decode({**container, "payload": payload}, "w")


def test_packed_containers_round_trip_and_account_for_every_byte():
    rng = np.random.default_rng(0)
    arrays = {f"t{i}": _update((i + 1, 5), seed=i) for i in range(4)}
    containers = {k: codecs.encode(v, "int3", rng) for k, v in arrays.items()}
    packed = codecs.pack_containers(containers)
    assert packed["payload"].size == sum(codecs.encoded_nbytes(c) for c in containers.values())
    unpacked = codecs.unpack_containers(packed)
    assert list(unpacked) == list(arrays)
    for key, container in containers.items():
        np.testing.assert_array_equal(codecs.decode(unpacked[key], key), codecs.decode(container, key))


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda p: p.update(payload=p["payload"][:-1]), "entries add up to"),
        (lambda p: p["entries"].append(list(p["entries"][0])), "twice"),
        (lambda p: p["entries"].__setitem__(0, ["t0", {}, -1]), "item 0"),
        (lambda p: p.pop("entries"), "'entries' and 'payload'"),
        (lambda p: p["entries"][0][1].__setitem__("payload", b""), "its own payload"),
    ],
    ids=["short payload", "duplicate", "negative length", "no entries", "nested payload"],
)
def test_unpack_rejects_malformed_packs(mutate, message):
    rng = np.random.default_rng(0)
    packed = codecs.pack_containers({f"t{i}": codecs.encode(np.ones(9, np.float32), "int3", rng) for i in range(2)})
    mutate(packed)
    with pytest.raises(ValueError, match=message):
        codecs.unpack_containers(packed)
