"""A checksum of a model's arrays that a sender and a receiver compute alike.

The downlink sends differences against the site's copy; both ends fingerprint the copy so that a site that missed a
message or decoded something else refuses to train on a model that drifted from the server's. Pure numpy.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping

import numpy as np


def fingerprint(weights: Mapping[str, np.ndarray]) -> int:
    """CRC-32 of every array (names and bytes, float arrays as float32, in key order): both ends compute the same."""
    crc = 0
    for key in sorted(weights):
        value = weights[key]
        dtype = np.float32 if value.dtype.kind == "f" else value.dtype
        crc = zlib.crc32(key.encode(), crc)
        crc = zlib.crc32(np.ascontiguousarray(value, dtype=dtype).tobytes(), crc)
    return crc
