"""The golden model: numpy integer execution of a QuantModel, bit for bit what the C code does.

All values are integers.  Convolutions and dense layers accumulate exactly: products and sums
are formed with a BLAS matmul on integer-valued float arrays, which is exact because every
partial sum is an integer whose magnitude is bounded by sum|w| * max|x - zp| (below 2**31, checked
statically by `qmodel.accumulator_bound`): float32 is used when that bound is below 2**24, float64
(exact below 2**53) otherwise, so no rounding can occur; `exact_int64=True` uses a pure int64
matmul instead (slower; the tests check both agree).  Requantization is `requant.requantize` in
int64.
"""

from __future__ import annotations

import numpy as np

from ..errors import EdgepruneError
from .qmodel import Op, QuantModel, TensorInfo, adaptive_windows
from .requant import (SOFTMAX_RECIP_BITS, layernorm_normalized, linear_frac_bits, linear_taps,
                      requantize, rounding_shift, softmax_row_reciprocal)


def quantize_input(qm: QuantModel, x: np.ndarray) -> np.ndarray:
    """Float input -> integer input: clamp(floor(x / scale + 0.5) + zp) (round half up)."""
    t = qm.input_info
    q = np.floor(np.asarray(x, np.float64) / t.scale + 0.5) + t.zero_point
    return np.clip(q, t.qmin, t.qmax).astype(t.dtype)


def dequantize_output(qm: QuantModel, y, output: int | None = None):
    """Integer output -> float: scale * (y - zp); of a model with several outputs, the list
    `run` returns (or output k's array alone)."""
    if qm.more_outputs and output is None:
        return [dequantize_output(qm, v, k) for k, v in enumerate(y)]
    t = qm.tensors[qm.outputs[output or 0]]
    return (t.scale * (np.asarray(y, np.float64) - t.zero_point)).astype(np.float32)


def _windows(x: np.ndarray, kernel, strides, padding, dilation, pad_value) -> np.ndarray:
    """(N, C, OH, OW, KH, KW) view of the padded input's sliding windows."""
    kh, kw = kernel
    pt, pl, pb, pr = padding
    if any(padding):
        x = np.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr)), constant_values=pad_value)
    dh, dw = dilation
    ekh, ekw = dh * (kh - 1) + 1, dw * (kw - 1) + 1
    win = np.lib.stride_tricks.sliding_window_view(x, (ekh, ekw), axis=(2, 3))
    return win[:, :, ::strides[0], ::strides[1], ::dh, ::dw]


def _work_dtype(qm: QuantModel, op: Op, exact_int64: bool):
    """The narrowest type in which this op's integer matmul is exact (see the module doc)."""
    if exact_int64:
        return np.int64
    return np.float32 if _product_bound(qm, op) < 2 ** 24 else np.float64


def _matmul(a: np.ndarray, b: np.ndarray, dtype) -> np.ndarray:
    """Integer-valued a @ b computed in `dtype` (exact by the caller's bound), as int64."""
    y = np.matmul(a.astype(dtype, copy=False), b.astype(dtype, copy=False))
    return y if dtype is np.int64 else np.rint(y).astype(np.int64)


def _product_bound(qm: QuantModel, op: Op) -> int:
    """max over output channels of sum|w| * max|x - zp|: bounds every partial sum."""
    t = qm.tensors[op.inputs[0]]
    w = qm.param(op, "weight")
    xmax = max(t.qmax - t.zero_point, t.zero_point - t.qmin)
    return int(np.abs(w.astype(np.int64)).reshape(w.shape[0], -1).sum(1).max(initial=0)) * xmax


def conv_accumulator(qm: QuantModel, op: Op, x: np.ndarray, exact_int64: bool = False
                     ) -> np.ndarray:
    """int32 accumulator (as int64) of a conv2d: bias + sum (x - zp_in) * w, zero-padded."""
    a = op.attrs
    zp = qm.tensors[op.inputs[0]].zero_point
    w = qm.param(op, "weight")
    o, cg, kh, kw = w.shape
    g = int(a["groups"])
    dt = _work_dtype(qm, op, exact_int64)
    xs = x.astype(dt) - dt(zp)
    win = _windows(xs, (kh, kw), a["strides"], a["padding"], a["dilation"], 0)
    n, c, oh, ow = win.shape[:4]
    # One GEMM per group over the whole batch: (G, Og, K) @ (G, K, N*OH*OW), both contiguous
    # (a broadcast batch dimension would make numpy skip BLAS).
    cols = win.reshape(n, g, cg, oh, ow, kh, kw).transpose(1, 2, 5, 6, 0, 3, 4)
    cols = np.ascontiguousarray(cols).reshape(g, cg * kh * kw, n * oh * ow)
    wm = w.reshape(g, o // g, cg * kh * kw)
    acc = _matmul(wm, cols, dt).reshape(o, n, oh, ow).transpose(1, 0, 2, 3)
    return acc + qm.param(op, "bias").astype(np.int64).reshape(1, o, 1, 1)


def dense_accumulator(qm: QuantModel, op: Op, x: np.ndarray, exact_int64: bool = False
                      ) -> np.ndarray:
    zp = qm.tensors[op.inputs[0]].zero_point
    w = qm.param(op, "weight")
    dt = _work_dtype(qm, op, exact_int64)
    acc = _matmul(x.astype(dt) - dt(zp), w.T, dt)
    return acc + qm.param(op, "bias").astype(np.int64)[None]


def _requant_out(qm: QuantModel, op: Op, acc: np.ndarray, per_channel_shape) -> np.ndarray:
    out: TensorInfo = qm.tensors[op.output]
    m = qm.param(op, "multiplier").reshape(per_channel_shape)
    sh = qm.param(op, "shift").reshape(per_channel_shape)
    lo, hi = op.attrs["clamp"]
    return requantize(acc, m, sh, out.zero_point, lo, hi).astype(out.dtype)


def run_op(qm: QuantModel, op: Op, env: dict[str, np.ndarray], exact_int64: bool = False
           ) -> np.ndarray:
    """Execute one op on the integer tensors in `env`; returns its output array."""
    a = op.attrs
    x = env[op.inputs[0]]
    tin = qm.tensors[op.inputs[0]]
    out = qm.tensors[op.output]
    if op.kind == "conv2d":
        acc = conv_accumulator(qm, op, x, exact_int64)
        return _requant_out(qm, op, acc, (1, -1, 1, 1))
    if op.kind == "dense":
        acc = dense_accumulator(qm, op, x, exact_int64)
        return _requant_out(qm, op, acc, (1, -1))
    if op.kind == "add":
        tb = qm.tensors[op.inputs[1]]
        ma, mb = (int(v) for v in a["multipliers"])
        s = int(a["shift_total"])
        acc = (np.int64(ma) * (x.astype(np.int64) - tin.zero_point)
               + np.int64(mb) * (env[op.inputs[1]].astype(np.int64) - tb.zero_point))
        lo, hi = a["clamp"]
        y = rounding_shift(acc, s) + out.zero_point
        return np.clip(y, lo, hi).astype(out.dtype)
    if op.kind == "addconst":
        lo, hi = a["clamp"]
        y = rounding_shift((x.astype(np.int64) - tin.zero_point) * int(a["multiplier"]),
                           31 - int(a["shift"]))
        return np.clip(y + qm.param(op, "bias").astype(np.int64) + out.zero_point, lo,
                       hi).astype(out.dtype)
    if op.kind == "matmul":
        b = env[op.inputs[1]].astype(np.int64) - qm.tensors[op.inputs[1]].zero_point
        lo, hi = a["clamp"]
        acc = np.matmul(x.astype(np.int64) - tin.zero_point, b)
        return requantize(acc, int(a["multiplier"]), int(a["shift"]), out.zero_point, lo,
                          hi).astype(out.dtype)
    if op.kind == "mul":
        b = env[op.inputs[1]].astype(np.int64) - qm.tensors[op.inputs[1]].zero_point
        lo, hi = a["clamp"]
        return requantize((x.astype(np.int64) - tin.zero_point) * b, int(a["multiplier"]),
                          int(a["shift"]), out.zero_point, lo, hi).astype(out.dtype)
    if op.kind in ("concat", "maximum", "minimum"):   # each input at the output's scale
        lo, hi = a["clamp"]
        parts = [requantize(env[i].astype(np.int64) - qm.tensors[i].zero_point, int(m), int(sh),
                            out.zero_point, lo, hi)
                 for i, m, sh in zip(op.inputs, a["multipliers"], a["shifts"])]
        if op.kind != "concat":
            return getattr(np, op.kind)(*parts).astype(out.dtype)
        return np.concatenate(parts, axis=int(a.get("axis", 1))).astype(out.dtype)
    if op.kind == "layernorm":
        n = layernorm_normalized(x, tin.zero_point, int(a["eps_steps"]), a.get("center", True))
        lo, hi = a["clamp"]
        s = 31 - qm.param(op, "shift").astype(np.int64)
        y = rounding_shift(n * qm.param(op, "multiplier").astype(np.int64), s) \
            + qm.param(op, "bias").astype(np.int64) + out.zero_point
        return np.clip(y, lo, hi).astype(out.dtype)
    if op.kind == "prelu":
        xi = x.astype(np.int64) - tin.zero_point
        lo, hi = a["clamp"]
        per_channel = (-1,) + (1,) * (x.ndim - 2)
        pos = requantize(xi, int(a["multiplier"]), int(a["shift"]), out.zero_point, lo, hi)
        neg = requantize(xi, qm.param(op, "multiplier").reshape(per_channel),
                         qm.param(op, "shift").reshape(per_channel), out.zero_point, lo, hi)
        return np.where(xi >= 0, pos, neg).astype(out.dtype)
    if op.kind == "lut":
        return qm.param(op, "table")[x.astype(np.int64) - tin.qmin].astype(out.dtype)
    if op.kind == "softmax":
        ax = int(a["axis"])
        xi, keep = x.astype(np.int64), qm.params.get(f"{op.name}.keep")
        kept = np.broadcast_to(True if keep is None else keep != 0, x.shape)
        mx = np.where(kept, xi, -128).max(axis=ax, keepdims=True)   # over the kept keys
        d = np.where(kept, xi - mx, -255)
        e = qm.param(op, "table").astype(np.int64)[d + 255] * kept   # a removed key: e = 0
        inv = softmax_row_reciprocal(e.sum(axis=ax, keepdims=True))
        y = ((e * inv + (np.int64(1) << (SOFTMAX_RECIP_BITS - 1))) >> SOFTMAX_RECIP_BITS) - 128
        return np.clip(y, -128, 127).astype(out.dtype)
    if op.kind == "log_softmax":
        ax = int(a["axis"])
        d = x.astype(np.int64) - x.max(axis=ax, keepdims=True)
        total = qm.param(op, "table").astype(np.int64)[d + 255].sum(axis=ax, keepdims=True)
        msb = sum((total >> i) > 0 for i in range(1, 31)).astype(np.int64)  # floor(log2 S)
        frac = ((total << (30 - msb)) >> 22) - 256
        lg = 65536 * (msb - 16) + qm.param(op, "log2_table").astype(np.int64)[frac]
        acc = int(a["multiplier"]) * d - int(a["ln2"]) * lg
        return np.clip(127 + ((acc + (1 << 27)) >> 28), -128, 127).astype(out.dtype)
    if op.kind in ("maxpool", "avgpool") and "output_size" in a:   # adaptive windows
        xs = x.astype(np.int64) - (tin.zero_point if op.kind == "avgpool" else 0)
        h, w = x.shape[2:]
        oh, ow = (int(d) for d in a["output_size"])
        fold = np.max if op.kind == "maxpool" else np.sum
        acc = np.stack([np.stack([fold(xs[:, :, hs:he, ws:we], axis=(2, 3))
                                  for ws, we in adaptive_windows(w, ow)], -1)
                        for hs, he in adaptive_windows(h, oh)], -2)
        if op.kind == "maxpool":
            return acc.astype(out.dtype)
        m, sh = qm.param(op, "multiplier"), qm.param(op, "shift")
        return requantize(acc, m, sh, out.zero_point, *a["clamp"]).astype(out.dtype)
    if op.kind == "maxpool":
        win = _windows(x, a["kernel"], a["strides"], a["padding"], a.get("dilation", [1, 1]),
                       tin.qmin)
        return win.max(axis=(4, 5)).astype(out.dtype)
    if op.kind == "avgpool":
        xs = x.astype(np.int64) - tin.zero_point
        win = _windows(xs, a["kernel"], a["strides"], a["padding"], a.get("dilation", [1, 1]), 0)
        acc = win.sum(axis=(4, 5))
        lo, hi = a["clamp"]
        if a.get("count_include_pad", True):
            m, sh = int(a["multiplier"]), int(a["shift"])
        else:   # a divisor per output position
            m, sh = qm.param(op, "multiplier"), qm.param(op, "shift")
        return requantize(acc, m, sh, out.zero_point, lo, hi).astype(out.dtype)
    if op.kind == "reshape":
        return x.reshape([int(s) for s in a["shape"]])
    if op.kind == "transpose":
        return np.ascontiguousarray(x.transpose([int(d) for d in a["perm"]]))
    if op.kind == "pad":
        widths = [(0, 0)] * x.ndim
        widths[int(a["axis"])] = (int(a["before"]), int(a["after"]))
        mode = a.get("mode", "constant")
        if mode == "constant":
            return np.pad(x, widths, constant_values=tin.zero_point)
        return np.pad(x, widths, mode={"reflect": "reflect", "replicate": "edge",
                                       "circular": "wrap"}[mode])
    if op.kind == "slice":
        index = [slice(None)] * int(a["axis"]) + [slice(a["start"], a["stop"], a["step"])]
        return np.ascontiguousarray(x[tuple(index)])
    if op.kind == "upsample" and a.get("mode", "nearest") == "nearest" and "rows" in a:
        return np.ascontiguousarray(x[:, :, a["rows"]][:, :, :, a["cols"]])
    if op.kind == "upsample" and a.get("mode", "nearest") == "nearest":
        sh, sw = (int(f) for f in a["factors"])
        return np.repeat(np.repeat(x, sh, axis=2), sw, axis=3)
    if op.kind == "upsample":   # bilinear: integer weights per axis, one rounding at the end
        f = linear_frac_bits(tin.dtype)
        y = x.astype(np.int64)
        for axis, n_out in ((2, out.shape[2]), (3, out.shape[3])):
            i0, i1, w1 = linear_taps(y.shape[axis], n_out, bool(a["align_corners"]), f)
            shape = [1, 1, 1, 1]
            shape[axis] = n_out
            y = (np.take(y, i0, axis) * ((1 << f) - w1).reshape(shape)
                 + np.take(y, i1, axis) * w1.reshape(shape))
        return rounding_shift(y, 2 * f).astype(out.dtype)
    if op.kind == "dilate":   # the inserted values are zeros: the zero point
        sh, sw = (int(s) for s in a["strides"])
        n, c, h, w = x.shape
        y = np.full((n, c, (h - 1) * sh + 1, (w - 1) * sw + 1), out.zero_point, x.dtype)
        y[:, :, ::sh, ::sw] = x
        return y
    raise EdgepruneError(f"reference: op '{op.name}' has unknown kind '{op.kind}'")


def run(qm: QuantModel, x: np.ndarray, return_all: bool = False, exact_int64: bool = False):
    """Integer forward pass.  `x` is the integer input with the model's static shape (its batch
    may differ: any N is accepted).  Returns the integer output, or every tensor if
    `return_all`."""
    tin = qm.input_info
    x = np.asarray(x)
    if list(x.shape[1:]) != list(tin.shape[1:]):
        raise EdgepruneError(f"reference: input shape {list(x.shape)} does not match the "
                             f"model's {tin.shape} (any batch size is fine)")
    if x.dtype.kind not in "iu" or x.min(initial=0) < tin.qmin or x.max(initial=0) > tin.qmax:
        raise EdgepruneError(f"reference: input must be integers in [{tin.qmin}, {tin.qmax}] "
                             "(use quantize_input on float data)")
    env = {qm.input: x.astype(tin.dtype)}
    n = x.shape[0]
    for op in qm.ops:
        if op.kind == "reshape":       # static shapes carry the model's batch: use the live one
            env[op.output] = env[op.inputs[0]].reshape([n] + [int(s) for s in op.attrs["shape"][1:]])
        else:
            env[op.output] = run_op(qm, op, env, exact_int64)
    if return_all:
        return env
    return env[qm.output] if not qm.more_outputs else [env[o] for o in qm.outputs]


def predict(qm: QuantModel, x_float: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Dequantized float outputs of the integer model for float inputs (batched)."""
    if qm.more_outputs:
        raise EdgepruneError(f"the model has {len(qm.outputs)} outputs; predictions and "
                             "accuracy are of a model with one")
    outs = []
    for i in range(0, len(x_float), batch_size):
        xq = quantize_input(qm, x_float[i:i + batch_size])
        outs.append(dequantize_output(qm, run(qm, xq)))
    return np.concatenate(outs) if outs else np.zeros((0,) + tuple(qm.output_info.shape[1:]))


def accuracy(qm: QuantModel, x_float: np.ndarray, y: np.ndarray, batch_size: int = 256) -> float:
    """Top-1 accuracy (percent) of the integer model (R² on regression targets: its dequantized
    outputs, edgeprune.task)."""
    from ..task import score
    return score(predict(qm, x_float, batch_size).reshape(len(x_float), -1), y)
