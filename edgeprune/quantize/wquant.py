"""Weight quantizers: per-output-channel symmetric scale `a` and integer levels Q, w ~= a * Q.

Formats (integer level sets, `levels(fmt, bits)`):
* "int", b bits: {-(2**(b-1)-1), ..., 2**(b-1)-1} (symmetric, no -2**(b-1), so negation is safe)
* "pow2", b bits: {0, +-1, +-2, +-4, ..., +-2**(2**(b-1)-2)}  (sign + exponent code; 4 bits ->
  up to +-64), Leng et al.'s {0, +-a, +-2a, +-4a, ...}
* "ternary": {-1, 0, 1}

`project` is the G-step of ADMM (Leng et al., AAAI 2018): for fixed Q, the best a is
<w, Q> / <Q, Q>; for fixed a, the best Q is the nearest level to w / a; alternate a few times.
PTQ uses it directly for sub-8-bit weights; 8-bit uses the plain max-abs scale.
"""

from __future__ import annotations

import numpy as np

from ..errors import EdgepruneError


def levels(fmt: str, bits: int) -> np.ndarray:
    """Sorted integer levels a layer's weight codes may take."""
    if fmt == "int":
        if not 2 <= bits <= 8:
            raise EdgepruneError(f"int weights need 2..8 bits, got {bits}")
        q = 2 ** (bits - 1) - 1
        return np.arange(-q, q + 1, dtype=np.int64)
    if fmt == "pow2":
        if not 2 <= bits <= 4:
            raise EdgepruneError(f"pow2 weights need 2..4 bits, got {bits}")
        mags = 2 ** np.arange(0, 2 ** (bits - 1) - 1, dtype=np.int64)
        return np.concatenate([-mags[::-1], [0], mags])
    if fmt == "ternary":
        return np.array([-1, 0, 1], dtype=np.int64)
    raise EdgepruneError(f"unknown weight format '{fmt}' (int, pow2, ternary)")


def nearest_level(v: np.ndarray, lv: np.ndarray) -> np.ndarray:
    """Each element of v mapped to the nearest level (ties to the level of smaller magnitude)."""
    lvf = lv.astype(np.float64)
    idx = np.clip(np.searchsorted(lvf, v), 1, len(lv) - 1)
    lo, hi = lvf[idx - 1], lvf[idx]
    d_lo, d_hi = np.abs(v - lo), np.abs(hi - v)
    pick_hi = (d_hi < d_lo) | ((d_hi == d_lo) & (np.abs(hi) < np.abs(lo)))
    return np.where(pick_hi, lv[idx], lv[idx - 1])


def project(w: np.ndarray, fmt: str, bits: int, iters: int = 100,
            scale: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(Q int8 same shape as w, a float64 (O,)) minimising ||w - a*Q||^2 per output channel.

    Alternates Q <- nearest(w / a) and a <- <w,Q>/<Q,Q>, starting from a = max|w| / max level
    (or `scale` when given, e.g. the previous ADMM iterate), until a stops changing (`iters` at
    most; 10 was too few for some channels: the result was not yet a fixed point).  Several
    starting clip ratios are tried and the lowest error kept, since the alternation only finds
    a local optimum.
    """
    lv = levels(fmt, bits)
    o = w.shape[0]
    wf = np.asarray(w, np.float64).reshape(o, -1)
    amax = np.abs(wf).max(1)
    top = float(lv.max())
    starts = [scale] if scale is not None else [amax / top * r for r in (1.0, 0.8, 0.6, 0.45, 0.3)]
    best_q, best_a, best_err = None, None, None
    for a0 in starts:
        a = np.where(np.asarray(a0) > 0, a0, 1.0).astype(np.float64)
        for _ in range(iters):
            q = nearest_level(wf / a[:, None], lv)
            qq = (q * q).sum(1)
            a_new = np.where(qq > 0, (wf * q).sum(1) / np.maximum(qq, 1), a)
            a_new = np.where(a_new > 0, a_new, a)
            if np.allclose(a_new, a, rtol=1e-9, atol=0):
                a = a_new
                break
            a = a_new
        q = nearest_level(wf / a[:, None], lv)
        err = ((wf - a[:, None] * q) ** 2).sum(1)
        if best_err is None:
            best_q, best_a, best_err = q, a, err
        else:
            better = err < best_err
            best_q = np.where(better[:, None], q, best_q)
            best_a = np.where(better, a, best_a)
            best_err = np.minimum(err, best_err)
    return best_q.reshape(w.shape).astype(np.int8), best_a


def quantize_weights(w: np.ndarray, fmt: str = "int", bits: int = 8
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel symmetric quantization: (Q int8, scale float64 (O,)).

    8-bit int uses scale = max|w_c| / 127 (the usual PTQ rule, no clipping); anything coarser
    uses the error-minimising `project`.
    """
    if fmt == "int" and bits == 8:
        o = w.shape[0]
        amax = np.abs(np.asarray(w, np.float64).reshape(o, -1)).max(1)
        a = np.where(amax > 0, amax / 127.0, 1.0)
        q = np.clip(np.round(np.asarray(w, np.float64) / a.reshape((o,) + (1,) * (w.ndim - 1))),
                    -127, 127)
        return q.astype(np.int8), a
    return project(w, fmt, bits)
