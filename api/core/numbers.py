"""Numbers as both dialects write them: logprobs are f32 in TGI's router, so they are printed as the
shortest decimal that reads back as the same f32."""
from __future__ import annotations

import math
import struct


def _f32_bits(x: float) -> bytes:
    return struct.pack("<f", x)


def f32_logprob(x: float | None) -> float | None:
    """The shortest decimal that is the same f32 as `x` (so `-1.8267672`, not `-1.8267672061920166`)."""
    if x is None or not math.isfinite(x):
        return None
    try:
        target = _f32_bits(x)
    except OverflowError:
        return None
    for digits in range(1, 10):
        candidate = float(f"{x:.{digits}g}")
        if _f32_bits(candidate) == target:
            return candidate
    return x
