"""Integer-only requantization: the one rounding rule every integer op in edgeprune shares.

A real scale r (e.g. s_in * s_w / s_out) is represented as a 32-bit multiplier M and a shift:
``r ~= M * 2**(shift - 31)`` with ``M`` in [2**30, 2**31).  Applying it to an int32 accumulator
uses *single rounding* (CMSIS-NN's ``CMSIS_NN_USE_SINGLE_ROUNDING``, expressible in TIR as plain
int64 ops): with the total right shift ``s = 31 - shift`` (1 <= s <= 62)

    y = clamp(zp + ((int64(acc) * M + (1 << (s - 1))) >> s), lo, hi)

where ``>>`` is an arithmetic (floor) shift of a signed int64.  That is round-half-up:
``acc * M / 2**s`` rounded to the nearest integer, **ties towards +infinity** (so -2.5 -> -2,
2.5 -> 3).  The C code, the Relax graph and the numpy reference all compute exactly this.
"""

from __future__ import annotations

import math

import numpy as np

from ..errors import EdgepruneError

INT32_MIN, INT32_MAX = -(1 << 31), (1 << 31) - 1
MIN_SHIFT_TOTAL, MAX_SHIFT_TOTAL = 1, 62


def quantize_multiplier(real_scale: float) -> tuple[int, int]:
    """(M, shift) with ``real_scale ~= M * 2**(shift - 31)`` and M in [2**30, 2**31).

    Exact for powers of two; otherwise the relative error is below 2**-31.  ``real_scale == 0``
    (a dead channel) gives ``(0, 30)``, which maps every accumulator to 0.  Scales so small that
    the total shift would exceed 62 are flushed to ``(0, 30)`` too: for any int32 accumulator the
    result would round to 0 anyway (|acc * M| < 2**62 <= 2**(s-1)).
    """
    r = float(real_scale)
    if not math.isfinite(r) or r < 0:
        raise EdgepruneError(f"requantization scale {real_scale!r} must be finite and >= 0")
    if r == 0.0:
        return 0, 30
    mant, exp = math.frexp(r)            # r = mant * 2**exp, mant in [0.5, 1)
    m = int(round(mant * (1 << 31)))    # in [2**30, 2**31]
    if m == (1 << 31):                   # mantissa rounded up to 1.0
        m //= 2
        exp += 1
    shift = exp                          # r ~= m * 2**(exp - 31)
    s = 31 - shift
    if s > MAX_SHIFT_TOTAL:
        return 0, 30
    if s < MIN_SHIFT_TOTAL:
        raise EdgepruneError(f"requantization scale {r:.6g} is too large (>= 2**30): the "
                             "int32 accumulator cannot be scaled up that far; check the "
                             "calibration ranges")
    return m, shift


def quantize_multipliers(real_scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel ``quantize_multiplier``: (M int64[C], shift int64[C])."""
    pairs = [quantize_multiplier(float(r)) for r in np.asarray(real_scales, np.float64).ravel()]
    m = np.array([p[0] for p in pairs], dtype=np.int64)
    sh = np.array([p[1] for p in pairs], dtype=np.int64)
    return m, sh


def shared_shift_multipliers(real_scales: list[float]) -> tuple[list[int], int]:
    """Several multipliers that share one total right shift ``s`` (for elementwise add).

    ``real_scales[i] ~= M_i / 2**s``; the largest scale gets a full 31-bit M in [2**30, 2**31),
    the others the same absolute precision (fewer significant bits).  Returns (Ms, s).
    """
    big = max(real_scales)
    if big <= 0:
        return [0 for _ in real_scales], 1
    _, shift = quantize_multiplier(big)
    s = 31 - shift
    if s > MAX_SHIFT_TOTAL:
        return [0 for _ in real_scales], 1
    ms = [int(round(r * (2.0 ** s))) for r in real_scales]
    # round() may push the largest to 2**31; keep every M below 2**31 by dropping one bit.
    if max(ms) >= (1 << 31):
        s -= 1
        ms = [int(round(r * (2.0 ** s))) for r in real_scales]
    if s < MIN_SHIFT_TOTAL:
        raise EdgepruneError(f"add scales {real_scales} too large to requantize")
    return ms, s


SOFTMAX_RECIP_BITS = 30    # softmax: 256 * e / sum(e) as e * (2**(8 + R) / sum) >> R


def softmax_row_reciprocal(total: np.ndarray) -> np.ndarray:
    """round(2**(8 + R) / total) for a row's sum of exp-table values: one division per row,
    a multiply and a shift per probability."""
    total = np.asarray(total, np.int64)
    return ((np.int64(1) << (8 + SOFTMAX_RECIP_BITS)) + total // 2) // total


LAYERNORM_FRAC_BITS = 16    # a LayerNorm's normalized values, (x - mean) / std, in fixed point
LAYERNORM_RECIP_BITS = 24   # ... computed as e * (2**(F + R) / r) >> R: one division per row


def layernorm_row_reciprocal(v: np.ndarray) -> np.ndarray:
    """round(2**(F + R) / isqrt(v)) for a row's v = sum(e**2) // C + eps_steps; the square
    root's floor is exact from a double sqrt corrected by one step."""
    v = np.asarray(v, np.int64)
    r = np.sqrt(v.astype(np.float64)).astype(np.int64)
    r = np.where(r * r > v, r - 1, r)
    r = np.where((r + 1) * (r + 1) <= v, r + 1, r)
    r = np.maximum(r, 1)
    return ((np.int64(1) << (LAYERNORM_FRAC_BITS + LAYERNORM_RECIP_BITS)) + r // 2) // r


def layernorm_normalized(x: np.ndarray, zero_point: int, eps_steps: int,
                         center: bool = True) -> np.ndarray:
    """(x - mean) / sqrt(var + eps) over the last axis, times 2**LAYERNORM_FRAC_BITS, from
    integers alone: with d = x - zp and e = C * d - sum(d) (C times the deviation, exact),
    e / isqrt(sum(e**2) // C + eps_steps) (eps_steps = eps * C**2 / scale**2), through the
    row's fixed-point reciprocal so that each value costs a multiply and a shift. Uncentred
    (RMSNorm: x / sqrt(mean(x**2) + eps)), e = C * d."""
    d = np.asarray(x, np.int64) - np.int64(zero_point)
    c = d.shape[-1]
    e = d * c - (d.sum(-1, keepdims=True) if center else 0)
    inv = layernorm_row_reciprocal((e * e).sum(-1, keepdims=True) // c + np.int64(eps_steps))
    return (e * inv + (np.int64(1) << (LAYERNORM_RECIP_BITS - 1))) >> LAYERNORM_RECIP_BITS


def rounding_shift(x: np.ndarray, s: np.ndarray | int) -> np.ndarray:
    """``(x + 2**(s-1)) >> s`` in int64 (floor shift): x / 2**s rounded half up."""
    x = np.asarray(x, np.int64)
    s = np.asarray(s, np.int64)
    return (x + (np.int64(1) << (s - 1))) >> s


def shifted_fits_int32(reach: int, m: int, rnd: int, s: int, offset: int) -> bool:
    """Whether (acc * m + rnd) >> s + offset fits int32 for every |acc| <= reach (|m|, |rnd|,
    |offset| their largest, s the smallest shift): then a kernel adds the offset and clamps in
    32 bits, where 64-bit compares take several instructions on 32-bit cores."""
    return ((reach * abs(m) + abs(rnd)) >> s) + 1 + abs(offset) <= INT32_MAX


def requantize(acc: np.ndarray, M: np.ndarray | int, shift: np.ndarray | int, zp: int,
               lo: int, hi: int) -> np.ndarray:
    """``clamp(zp + ((int64(acc) * M + (1 << (s-1))) >> s), lo, hi)`` with ``s = 31 - shift``.

    ``acc`` is an int32 accumulator (any shape); M and shift broadcast against it (per-channel
    arrays must already be shaped for broadcasting, e.g. (C, 1, 1) for NCHW).  Rounding is
    half-up: ties go towards +infinity.  Returns int64 values in [lo, hi].
    """
    acc = np.asarray(acc, np.int64)
    m = np.asarray(M, np.int64)
    s = 31 - np.asarray(shift, np.int64)
    if np.any((s < MIN_SHIFT_TOTAL) | (s > MAX_SHIFT_TOTAL)):
        raise EdgepruneError(f"requantize: total shift 31 - shift must be in [1, 62], got "
                             f"{np.unique(s).tolist()}")
    y = rounding_shift(acc * m, s) + np.int64(zp)
    return np.clip(y, lo, hi)


def linear_frac_bits(dtype: str) -> int:
    """Fraction bits of a linear-interpolation weight per axis: the two axes' product times a
    value of `dtype` stays inside int32 (int8: 2**22 * 2**7; int16: 2**14 * 2**15)."""
    return 11 if dtype == "int8" else 7


def linear_taps(n_in: int, n_out: int, align_corners: bool, frac_bits: int):
    """Linear interpolation of one axis from n_in to n_out samples, as torch's
    ``interpolate(mode="bilinear")`` defines it: output o reads input i0 and i1 with weights
    (2**frac_bits - w1, w1).  The source coordinate is (o + 0.5) * n_in / n_out - 0.5 clamped
    at 0 (align_corners false) or o * (n_in - 1) / (n_out - 1); both are the exact fractions
    P / Q below, and w1 is their fractional part rounded half up to frac_bits.  Returns int64
    arrays i0, i1, w1 of length n_out."""
    o = np.arange(n_out, dtype=np.int64)
    if align_corners:
        p, q = o * (n_in - 1), max(n_out - 1, 1)
    else:
        p, q = np.maximum((2 * o + 1) * n_in - n_out, 0), 2 * n_out
    i0 = p // q
    w1 = ((p - i0 * q) * (1 << (frac_bits + 1)) + q) // (2 * q)
    return np.minimum(i0, n_in - 1), np.minimum(i0 + 1, n_in - 1), w1
