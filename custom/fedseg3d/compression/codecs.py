"""Lossy codecs for one float array: fp16, blockwise 8/4/3/2-bit with stochastic rounding, top-k sparsification.

Pure numpy, no ``nvflare``: the FLARE filters in ``quantize_filter`` wrap these, and everything here is unit-testable
on its own.

Every encoder returns a *container*: a plain dict whose only array is one flat ``uint8`` ``payload`` plus a small
header (``scheme``, ``shape``, ``dtype`` and the scheme's parameters). A plain dict of built-in types and one numpy
array is what FLARE's FOBS serialises without registering anything. One array per tensor, not one per part (codes,
scales, indices), because FOBS spends about 280 bytes framing every numpy array: with some 60 tensors, a second and
third array per tensor would add more bytes than the 4-bit scales themselves.

Payload layouts (little-endian throughout)::

    fp16        float16 values                                              2n bytes
    int8        float16 block scales, then int8 codes in [-127, 127]        2*ceil(n/B) + n bytes
    int4        float16 block scales, then codes+7 in [0, 14], two a byte   2*ceil(n/B) + ceil(n/2) bytes
                (element 2i in the low nibble, 2i+1 in the high nibble)
    int3, int2  float16 block scales, then codes+L as a little-endian       2*ceil(n/B) + ceil(b*n/8) bytes
                bit stream of b bits a code (L = 3 or 1; element i in bits
                b*i .. b*i+b-1, least significant first; int4 is the same
                stream with b = 4)
    topk        index section, then value section
                index: a bitmap of n bits (ceil(n/8) bytes) or k int32 indices (4k bytes), whichever is smaller
                value: the k kept values as an int8 container payload (value_bits=8) or as float32 (value_bits=32)

Design choices:

* **absmax (symmetric) scales, not min/max affine.** Weight differences are centred on zero; a symmetric grid keeps
  zero exactly representable (a zero stays zero, no drift) and needs one scale per block instead of two. At 4 bits
  the second scale would cost as much as the extra level it buys.
* **float16 scales.** Half the side information of float32 (at 4 bits and B=64 that is 7.5x instead of 7.1x). Each
  scale is rounded *up* to the next float16, and the encoder quantises with the stored scale, so the decoder uses
  exactly the grid the encoder used (unbiasedness holds with the stored scale) and no code overflows. A block whose
  absmax exceeds float16's range (65504) raises instead of saturating; blocks with absmax below float16's normal range
  (6e-5) get a coarser grid, never a larger error than the bound below, which is stated with the stored scale.
* **Unbiased stochastic rounding** ``q = floor(x/step + u)``, ``u ~ U[0, 1)`` from an explicit
  ``np.random.Generator``: ``E[q * step] = x``, so averaging many sites' quantised updates does not accumulate a
  rounding bias the way round-to-nearest does (Alistarh et al., "QSGD", NeurIPS 2017).
* **Top-k** keeps the ``ceil(fraction * n)`` largest magnitudes (Aji and Heafield, "Sparse Communication for
  Distributed Gradient Descent", EMNLP 2017). It is biased; the filter makes up for it with error feedback.

Error bounds (per element, ``x`` the input, ``x_hat`` the decoded value; :func:`error_bound` computes them):

* fp16 (round to nearest): ``|x - x_hat| <= FP16_RELATIVE_ERROR * |x_hat| + FP16_SUBNORMAL_ERROR``.
* b-bit blockwise: ``|x - x_hat| < scale_block / (2**(b-1) - 1)`` (one grid step; stochastic rounding picks one of
  the two neighbouring grid points), times ``1 + BLOCKWISE_SLACK`` for float32 arithmetic.
* int3 / int2 use 7 and 3 of their 8 and 4 codes (a symmetric grid has an odd number of points): int3's grid step
  is ``absmax/3``, int2's ``absmax`` (ternary, as in TernGrad, Wen et al., NeurIPS 2017). They exist because 4 bits
  cannot clear 8x: fp32 is 32 bits a value, so 8x leaves 4 bits for codes, scales and framing together.
* top-k: kept entries as their value encoding (0 for float32 values); a dropped entry is no larger in magnitude than
  any kept one, so ``|x| <= min over kept of (|x_hat| + bound)``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

SCHEMES = ("fp16", "int8", "int4", "int3", "int2", "topk")
BLOCKWISE_BITS = {"int8": 8, "int4": 4, "int3": 3, "int2": 2}
BLOCKWISE_SCHEMES = {bits: scheme for scheme, bits in BLOCKWISE_BITS.items()}
# Larger blocks amortise the 2-byte scale better but stretch the grid over a wider range. 4-bit gets smaller blocks
# because its grid is coarse already; pass block_size to trade the other way.
DEFAULT_BLOCK_SIZE = {"int8": 256, "int4": 64, "int3": 64, "int2": 64, "topk": 256}
FLOAT_DTYPES = ("float16", "float32", "float64")
INDEX_FORMATS = ("bitmap", "int32")
TOPK_VALUE_BITS = (8, 32)

FP16_RELATIVE_ERROR = 2.0**-11  # unit roundoff of float16 (10 explicit mantissa bits, round to nearest)
FP16_SUBNORMAL_ERROR = 2.0**-25  # half the spacing of float16 subnormals
BLOCKWISE_SLACK = 2.0**-12  # float32 rounding in x/step + u and in q*step, relative to one grid step

_SCALE = np.dtype("<f2")
_FP16 = np.dtype("<f2")
_INDEX = np.dtype("<i4")
_VALUE = np.dtype("<f4")

_HEADER_FIELDS = {
    "fp16": frozenset({"scheme", "shape", "dtype", "payload"}),
    "int8": frozenset({"scheme", "shape", "dtype", "payload", "block_size"}),
    "int4": frozenset({"scheme", "shape", "dtype", "payload", "block_size"}),
    "int3": frozenset({"scheme", "shape", "dtype", "payload", "block_size"}),
    "int2": frozenset({"scheme", "shape", "dtype", "payload", "block_size"}),
    "topk": frozenset({"scheme", "shape", "dtype", "payload", "block_size", "k", "index_format", "value_bits"}),
}


def levels(bits: int) -> int:
    """Largest code magnitude of a symmetric b-bit grid: 127 for 8 bits, 7 for 4, 3 for 3, 1 for 2 (one code unused)."""
    return 2 ** (bits - 1) - 1


def topk_count(n: int, fraction: float) -> int:
    """Entries kept out of ``n``: ``ceil(fraction * n)``, at least one of a non-empty array."""
    return 0 if n == 0 else min(n, max(1, math.ceil(fraction * n)))


def blockwise_nbytes(n: int, bits: int, block_size: int) -> int:
    """Payload bytes of a b-bit blockwise encoding of ``n`` values (scales included)."""
    codes = math.ceil(n * bits / 8)
    return _SCALE.itemsize * math.ceil(n / block_size) + codes


def encoded_nbytes(container: Mapping[str, Any]) -> int:
    """Exact bytes of array data the container carries (its payload; the header adds a few dozen msgpack bytes)."""
    return int(container["payload"].nbytes)


# ---------------------------------------------------------------------------------------------------------- encoders
def _flat_float32(x: np.ndarray) -> np.ndarray:
    if not isinstance(x, np.ndarray) or x.dtype.name not in FLOAT_DTYPES:
        raise ValueError(f"expected a numpy array of {FLOAT_DTYPES}, got {type(x).__name__} {getattr(x, 'dtype', '')}")
    flat = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
    if not np.all(np.isfinite(flat)):
        raise ValueError(f"array holds {int(np.count_nonzero(~np.isfinite(flat)))} non-finite value(s)")
    return flat


def _check_rng(rng: Any) -> np.random.Generator:
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    return rng


def _check_block_size(block_size: Any) -> int:
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    return block_size


def _header(scheme: str, x: np.ndarray, payload: np.ndarray, **params: Any) -> dict[str, Any]:
    return {"scheme": scheme, "shape": [int(d) for d in x.shape], "dtype": x.dtype.name, **params, "payload": payload}


def _fp16_scales(absmax: np.ndarray) -> np.ndarray:
    """float16 scales rounded up, so that every |x| <= its stored scale."""
    with np.errstate(over="ignore"):
        scales = absmax.astype(_SCALE)
    if not np.all(np.isfinite(scales)):
        raise ValueError(f"block absmax {float(absmax.max()):.6g} exceeds the float16 scale range (65504)")
    low = scales.astype(np.float32) < absmax
    scales[low] = np.nextafter(scales[low], np.float16(np.inf))
    return scales


def _quantize_blocks(
    flat: np.ndarray, bits: int, block_size: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Blockwise absmax quantisation with stochastic rounding: (float16 scales, int8 codes in [-L, L])."""
    n, top = flat.size, levels(bits)
    num_blocks = math.ceil(n / block_size)
    blocks = np.zeros(num_blocks * block_size, dtype=np.float32)
    blocks[:n] = flat
    blocks = blocks.reshape(num_blocks, block_size)
    scales = _fp16_scales(np.abs(blocks).max(axis=1) if n else np.zeros(0, np.float32))
    step = scales.astype(np.float32) / top
    with np.errstate(divide="ignore", invalid="ignore"):
        y = np.where(step[:, None] > 0, blocks / step[:, None], 0.0).astype(np.float32)
    q = np.floor(y + rng.random(y.shape, dtype=np.float32))
    codes = np.clip(q, -top, top).astype(np.int8).reshape(-1)[:n]
    return scales, codes


def _pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """Codes in [-L, L] as a little-endian bit stream of ``bits`` bits each (offset by L, so never negative)."""
    offset = (codes.astype(np.int16) + levels(bits)).astype(np.uint8)
    stream = np.unpackbits(offset[:, None], axis=1, count=bits, bitorder="little").reshape(-1)
    return np.packbits(stream, bitorder="little")


def _unpack_codes(packed: np.ndarray, n: int, bits: int) -> np.ndarray:
    """The offset codes (uint8, before subtracting L) of the first ``n`` elements of a bit stream."""
    stream = np.unpackbits(packed, count=n * bits, bitorder="little").reshape(n, bits)
    return np.packbits(stream, axis=1, bitorder="little").reshape(n)


def _blockwise_payload(flat: np.ndarray, bits: int, block_size: int, rng: np.random.Generator) -> np.ndarray:
    scales, codes = _quantize_blocks(flat, bits, block_size, rng)
    body = codes.view(np.uint8) if bits == 8 else _pack_codes(codes, bits)
    return np.concatenate([scales.astype(_SCALE).view(np.uint8), body])


def encode_fp16(x: np.ndarray) -> dict[str, Any]:
    """Round to the nearest float16 (deterministic; values beyond +-65504 raise rather than saturate)."""
    flat = _flat_float32(x)
    with np.errstate(over="ignore"):
        half = flat.astype(_FP16)
    if not np.all(np.isfinite(half)):
        raise ValueError(f"absmax {float(np.abs(flat).max()):.6g} exceeds the float16 range (65504)")
    return _header("fp16", x, half.view(np.uint8))


def encode_blockwise(
    x: np.ndarray, bits: int, rng: np.random.Generator, block_size: int | None = None
) -> dict[str, Any]:
    """Blockwise absmax quantisation to 8, 4, 3 or 2 bits with unbiased stochastic rounding.

    Args:
        x: float array, any shape.
        bits: 8, 4, 3 or 2.
        rng: the source of the rounding noise; pass a seeded generator for reproducible runs.
        block_size: values per scale; ``DEFAULT_BLOCK_SIZE`` for the bit width when None.

    Raises:
        ValueError: bad bits or block size, a non-finite input, or a block beyond the float16 scale range.
    """
    scheme = BLOCKWISE_SCHEMES.get(bits)
    if scheme is None:
        raise ValueError(f"bits must be one of {sorted(BLOCKWISE_SCHEMES)}, got {bits!r}")
    block_size = _check_block_size(DEFAULT_BLOCK_SIZE[scheme] if block_size is None else block_size)
    payload = _blockwise_payload(_flat_float32(x), bits, block_size, _check_rng(rng))
    return _header(scheme, x, payload, block_size=block_size)


def encode_topk(
    x: np.ndarray,
    fraction: float,
    rng: np.random.Generator,
    block_size: int | None = None,
    value_bits: int = 8,
) -> dict[str, Any]:
    """Keep the ``ceil(fraction * n)`` largest-magnitude entries; the rest decode to zero.

    Args:
        x: float array, any shape (at most 2**31 - 1 entries, the int32 index range).
        fraction: share of entries kept, in (0, 1].
        rng: rounding noise for the 8-bit values (unused, but still required, for ``value_bits=32``).
        block_size: values per scale when the kept values are quantised to 8 bits.
        value_bits: 8 (int8 blockwise, stochastic rounding) or 32 (float32, exact).

    Raises:
        ValueError: a bad fraction, block size or value_bits, a non-finite input, or too many entries.
    """
    if isinstance(fraction, bool) or not isinstance(fraction, int | float) or not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction!r}")
    if value_bits not in TOPK_VALUE_BITS:
        raise ValueError(f"value_bits must be one of {TOPK_VALUE_BITS}, got {value_bits!r}")
    block_size = _check_block_size(DEFAULT_BLOCK_SIZE["topk"] if block_size is None else block_size)
    rng = _check_rng(rng)
    flat = _flat_float32(x)
    n = flat.size
    if n > np.iinfo(np.int32).max:
        raise ValueError(f"top-k supports at most {np.iinfo(np.int32).max} entries, got {n}")
    k = topk_count(n, float(fraction))
    index = np.sort(np.argpartition(np.abs(flat), n - k)[n - k :]) if 0 < k < n else np.arange(n)
    if math.ceil(n / 8) <= _INDEX.itemsize * k:
        mask = np.zeros(n, dtype=bool)
        mask[index] = True
        index_format, index_bytes = "bitmap", np.packbits(mask, bitorder="little")
    else:
        index_format, index_bytes = "int32", index.astype(_INDEX).view(np.uint8)
    values = flat[index]
    value_bytes = (
        _blockwise_payload(values, 8, block_size, rng) if value_bits == 8 else values.astype(_VALUE).view(np.uint8)
    )
    payload = np.concatenate([index_bytes, value_bytes])
    return _header(
        "topk", x, payload, block_size=block_size, k=k, index_format=index_format, value_bits=int(value_bits)
    )


def encode(
    x: np.ndarray,
    scheme: str,
    rng: np.random.Generator | None = None,
    block_size: int | None = None,
    topk_fraction: float = 0.1,
) -> dict[str, Any]:
    """Encode ``x`` with ``scheme`` (one of ``SCHEMES``); ``rng`` is required by every scheme but ``fp16``."""
    if scheme == "fp16":
        if block_size is not None:
            raise ValueError("block_size has no meaning for fp16")
        return encode_fp16(x)
    if scheme in BLOCKWISE_BITS:
        return encode_blockwise(x, BLOCKWISE_BITS[scheme], rng, block_size)
    if scheme == "topk":
        return encode_topk(x, topk_fraction, rng, block_size)
    raise ValueError(f"unknown scheme {scheme!r}: expected one of {SCHEMES}")


# ---------------------------------------------------------------------------------------------------------- decoders
@dataclass(frozen=True)
class _Parsed:
    """A validated container: the decoded flat values and what the error bound needs."""

    shape: tuple[int, ...]
    dtype: str
    values: np.ndarray  # flat float32, length n
    step: np.ndarray | None = None  # per-element grid step of a blockwise encoding (of the kept values for top-k)
    kept: np.ndarray | None = None  # top-k: boolean mask of the kept entries


def _fail(name: str, field: str, problem: str) -> ValueError:
    return ValueError(f"{name}: container field '{field}' {problem}")


def _int_field(container: Mapping[str, Any], field: str, name: str, low: int, high: int | None = None) -> int:
    value = container[field]
    out_of_range = isinstance(value, bool) or not isinstance(value, int | np.integer) or value < low
    if out_of_range or (high is not None and value > high):
        raise _fail(name, field, f"must be an int in [{low}, {'inf' if high is None else high}], got {value!r}")
    return int(value)


def _read_header(container: Any, name: str) -> tuple[str, tuple[int, ...], str, np.ndarray]:
    if not isinstance(container, Mapping):
        raise ValueError(f"{name}: expected an encoded container (dict), got {type(container).__name__}")
    scheme = container.get("scheme")
    if scheme not in _HEADER_FIELDS:
        raise _fail(name, "scheme", f"is {scheme!r}, expected one of {SCHEMES}")
    fields = set(container)
    if fields != _HEADER_FIELDS[scheme]:
        missing, extra = sorted(_HEADER_FIELDS[scheme] - fields), sorted(fields - _HEADER_FIELDS[scheme])
        field = (missing or extra)[0]
        raise _fail(name, field, f"is {'missing' if missing else 'unexpected'} for scheme {scheme!r}")
    shape = container["shape"]
    if not isinstance(shape, list | tuple) or not all(
        isinstance(d, int | np.integer) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise _fail(name, "shape", f"must be a list of non-negative ints, got {shape!r}")
    if container["dtype"] not in FLOAT_DTYPES:
        raise _fail(name, "dtype", f"is {container['dtype']!r}, expected one of {FLOAT_DTYPES}")
    payload = container["payload"]
    if not isinstance(payload, np.ndarray) or payload.dtype != np.uint8 or payload.ndim != 1:
        got = f"{type(payload).__name__} {getattr(payload, 'dtype', '')} {getattr(payload, 'shape', '')}"
        raise _fail(name, "payload", f"must be a 1-D uint8 numpy array, got {got}")
    return scheme, tuple(int(d) for d in shape), container["dtype"], payload


def _check_length(payload: np.ndarray, expected: int, name: str, what: str) -> None:
    if payload.size != expected:
        kind = "truncated" if payload.size < expected else "too long"
        raise _fail(name, "payload", f"is {kind}: {payload.size} bytes, expected {expected} for {what}")


def _parse_blockwise(
    payload: np.ndarray, n: int, bits: int, block_size: int, name: str
) -> tuple[np.ndarray, np.ndarray]:
    """(values, per-element step) of a blockwise payload that has already passed its length check."""
    top, num_blocks = levels(bits), math.ceil(n / block_size)
    scales = np.frombuffer(payload, dtype=_SCALE, count=num_blocks).astype(np.float32)
    bad = np.flatnonzero(~np.isfinite(scales) | (scales < 0))
    if bad.size:
        raise _fail(name, "payload", f"has an invalid scale {scales[bad[0]]} in block {int(bad[0])}")
    body = payload[_SCALE.itemsize * num_blocks :]
    codes = body.view(np.int8).astype(np.int16) if bits == 8 else _unpack_codes(body, n, bits).astype(np.int16) - top
    bad = np.flatnonzero(np.abs(codes) > top)
    if bad.size:
        raise _fail(name, "payload", f"has code {int(codes[bad[0]])} outside [-{top}, {top}] at element {int(bad[0])}")
    step = np.repeat(scales / top, block_size)[:n]
    return codes.astype(np.float32) * step, step


def _parse_topk(
    container: Mapping[str, Any], payload: np.ndarray, n: int, name: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(values, per-element step, kept mask) of a top-k payload, all of length n."""
    block_size = _int_field(container, "block_size", name, 1)
    k = _int_field(container, "k", name, 0, n)
    index_format, value_bits = container["index_format"], container["value_bits"]
    if index_format not in INDEX_FORMATS:
        raise _fail(name, "index_format", f"is {index_format!r}, expected one of {INDEX_FORMATS}")
    if value_bits not in TOPK_VALUE_BITS:
        raise _fail(name, "value_bits", f"is {value_bits!r}, expected one of {TOPK_VALUE_BITS}")
    index_nbytes = math.ceil(n / 8) if index_format == "bitmap" else _INDEX.itemsize * k
    value_nbytes = blockwise_nbytes(k, 8, block_size) if value_bits == 8 else _VALUE.itemsize * k
    _check_length(payload, index_nbytes + value_nbytes, name, f"top-k of {k}/{n} ({index_format}, {value_bits}-bit)")
    if index_format == "bitmap":
        bits = np.unpackbits(payload[:index_nbytes], bitorder="little")
        index = np.flatnonzero(bits[:n])
        if index.size != k or bits[n:].any():
            raise _fail(name, "payload", f"bitmap marks {index.size} entries (padding {int(bits[n:].sum())}), k={k}")
    else:
        index = np.frombuffer(payload, dtype=_INDEX, count=k).astype(np.int64)
        if k and (index[0] < 0 or index[-1] >= n or np.any(np.diff(index) <= 0)):
            raise _fail(name, "payload", f"indices are not strictly increasing within [0, {n})")
    value_payload = payload[index_nbytes:]
    if value_bits == 8:
        kept_values, kept_step = _parse_blockwise(value_payload, k, 8, block_size, name)
    else:
        kept_values, kept_step = np.frombuffer(value_payload, dtype=_VALUE).astype(np.float32), np.zeros(k, np.float32)
        if not np.all(np.isfinite(kept_values)):
            raise _fail(name, "payload", "holds non-finite kept values")
    values, step, kept = np.zeros(n, np.float32), np.zeros(n, np.float32), np.zeros(n, bool)
    values[index], step[index], kept[index] = kept_values, kept_step, True
    return values, step, kept


def _parse(container: Any, name: str) -> _Parsed:
    scheme, shape, dtype, payload = _read_header(container, name)
    n = math.prod(shape)
    if scheme == "fp16":
        _check_length(payload, _FP16.itemsize * n, name, f"shape {list(shape)} as fp16")
        values = np.frombuffer(payload, dtype=_FP16).astype(np.float32)
        if not np.all(np.isfinite(values)):
            raise _fail(name, "payload", "holds non-finite fp16 values")
        return _Parsed(shape, dtype, values)
    if scheme == "topk":
        return _Parsed(shape, dtype, *_parse_topk(container, payload, n, name))
    bits = BLOCKWISE_BITS[scheme]
    block_size = _int_field(container, "block_size", name, 1)
    _check_length(payload, blockwise_nbytes(n, bits, block_size), name, f"shape {list(shape)} as {scheme}/{block_size}")
    values, step = _parse_blockwise(payload, n, bits, block_size, name)
    return _Parsed(shape, dtype, values, step)


def decode(container: Mapping[str, Any], name: str = "array") -> np.ndarray:
    """Decode a container back to an array of its original shape and dtype.

    Args:
        container: what an ``encode*`` function returned (possibly after a FOBS round trip).
        name: the tensor's name, used in error messages.

    Raises:
        ValueError: naming the tensor and the container field: an unknown scheme, a missing or unexpected field, a
            shape or length mismatch, a truncated payload, a NaN or negative scale, or an out-of-range code or index.
    """
    parsed = _parse(container, name)
    return parsed.values.reshape(parsed.shape).astype(parsed.dtype)


def error_bound(container: Mapping[str, Any], name: str = "array") -> np.ndarray:
    """Per-element bound on ``|x - decode(container)|`` for the ``x`` that was encoded (see the module docstring)."""
    parsed = _parse(container, name)
    if parsed.step is None:  # fp16
        bound = FP16_RELATIVE_ERROR * np.abs(parsed.values.astype(np.float64)) + FP16_SUBNORMAL_ERROR
    else:
        bound = parsed.step.astype(np.float64) * (1.0 + BLOCKWISE_SLACK)
        if parsed.kept is not None and parsed.kept.any() and not parsed.kept.all():
            # A dropped entry is no larger than any kept one, hence no larger than the smallest kept upper bound.
            ceiling = np.min(np.abs(parsed.values[parsed.kept]) + bound[parsed.kept])
            bound = np.where(parsed.kept, bound, ceiling)
    return bound.reshape(parsed.shape)


# -------------------------------------------------------------------------------------------- one payload per message
def pack_containers(containers: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Join many containers into one: their headers in order, and all payloads in one ``uint8`` array.

    Why: FOBS frames every numpy array (about 280 bytes inline, more as a streamed ``npz`` item), and a model has
    dozens of tensors. At 3 bits a value the framing of ~50 small arrays is a fifth of the message; one array per
    message makes the ratio the codec's own. Headers keep every field but the payload, plus the payload's length.
    """
    entries, parts = [], []
    for key, container in containers.items():
        payload = container["payload"]
        entries.append([key, {k: v for k, v in container.items() if k != "payload"}, int(payload.size)])
        parts.append(payload)
    return {"entries": entries, "payload": np.concatenate(parts) if parts else np.zeros(0, np.uint8)}


def unpack_containers(packed: Any, name: str = "packed") -> dict[str, dict[str, Any]]:
    """Split what :func:`pack_containers` joined back into containers (each still validated by :func:`decode`).

    Raises:
        ValueError: naming the field: not a dict, a malformed entry, a duplicate key, or payload lengths that do not
            add up to the payload.
    """
    if not isinstance(packed, Mapping) or set(packed) != {"entries", "payload"}:
        got = sorted(packed) if isinstance(packed, Mapping) else type(packed).__name__
        raise ValueError(f"{name}: expected a packed dict with 'entries' and 'payload', got {got}")
    entries, payload = packed["entries"], packed["payload"]
    if not isinstance(payload, np.ndarray) or payload.dtype != np.uint8 or payload.ndim != 1:
        raise _fail(name, "payload", f"must be a 1-D uint8 numpy array, got {type(payload).__name__}")
    if not isinstance(entries, list | tuple):
        raise _fail(name, "entries", f"must be a list, got {type(entries).__name__}")
    out: dict[str, dict[str, Any]] = {}
    offset = 0
    for i, entry in enumerate(entries):
        ok = isinstance(entry, list | tuple) and len(entry) == 3
        key, header, size = entry if ok else (None, None, None)
        if not (isinstance(key, str) and isinstance(header, Mapping) and isinstance(size, int) and size >= 0):
            raise _fail(name, "entries", f"item {i} must be [name, header dict, payload length], got {entry!r:.80}")
        if key in out:
            raise _fail(name, "entries", f"names '{key}' twice")
        if "payload" in header:
            raise _fail(name, "entries", f"item '{key}' carries its own payload")
        out[key] = {**header, "payload": payload[offset : offset + size]}
        offset += size
    if offset != payload.size:
        raise _fail(name, "payload", f"is {payload.size} bytes but the entries add up to {offset}")
    return out
