"""The number format of adapter tensors on the wire in plaintext rounds (`transport.dtype`).

float32 is the adapter's own precision and travels as is. bfloat16 (8 exponent bits, 7
mantissa bits: float32's range, relative error at most 2^-9) and float16 (5 and 10: relative
error at most 2^-11, but nothing beyond 65504) halve the bytes. numpy has no bfloat16, so it
travels as the upper 16 bits of the float32 pattern (uint16, rounded to nearest even); the
receiver tells the formats apart by the array's dtype. Arrays of shape (1,) are the strategies'
weights and counts (n_i, step counts): they keep their full precision.

Only what crosses is rounded: the server keeps its global adapter, and sums the decoded
contributions, in full precision, so the rounding does not accumulate over rounds.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import numpy as np

from fedlora.errors import FedloraError

Arrays = dict[str, np.ndarray]
WireDtype = Literal["float32", "bfloat16", "float16"]

FLOAT16_MAX = float(np.finfo(np.float16).max)


def _is_tensor(value: np.ndarray) -> bool:
    return np.shape(value) != (1,)


def bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), round to nearest, ties to even."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return rounded.astype(np.uint16)


def bf16_values(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) -> float32."""
    return (np.asarray(bits, dtype=np.uint32) << 16).view(np.float32)


def encode(arrays: Mapping[str, np.ndarray], dtype: WireDtype) -> Arrays:
    """The arrays as they travel: tensors in `dtype`, shape-(1,) weights untouched."""
    out: Arrays = {}
    for k, v in arrays.items():
        v = np.asarray(v)
        if not _is_tensor(v) or dtype == "float32":
            out[k] = v.astype(np.float32) if _is_tensor(v) else v
        elif dtype == "bfloat16":
            out[k] = bf16_bits(v)
        else:
            big = float(np.max(np.abs(v), initial=0.0))
            if big > FLOAT16_MAX:
                raise FedloraError(
                    f'transport.dtype = "float16" cannot carry {k} (a value of {big:.3g}; '
                    f'float16 ends at {FLOAT16_MAX:g}); use "bfloat16", which has float32\'s '
                    'range, or "float32".'
                )
            out[k] = v.astype(np.float16)
    return out


def decode(arrays: Mapping[str, np.ndarray]) -> Arrays:
    """Received arrays back in float32 (tensors) or as sent (weights)."""
    out: Arrays = {}
    for k, v in arrays.items():
        v = np.asarray(v)
        if v.dtype == np.uint16:
            out[k] = bf16_values(v)
        elif v.dtype == np.float16:
            out[k] = v.astype(np.float32)
        else:
            out[k] = v
    return out


def round_trip_error(sent: Mapping[str, np.ndarray], received: Mapping[str, np.ndarray]) -> float:
    """Relative L2 error of the tensors, ||received - sent|| / ||sent|| over all of them
    (0 when nothing is lost, or when there is nothing to send)."""
    num = den = 0.0
    for k, v in sent.items():
        if not _is_tensor(np.asarray(v)):
            continue
        exact = np.asarray(v, dtype=np.float64)
        num += float(np.sum((np.asarray(received[k], dtype=np.float64) - exact) ** 2))
        den += float(np.sum(exact**2))
    return float(np.sqrt(num / den)) if den > 0 else 0.0
