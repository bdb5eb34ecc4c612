"""QuantModel -> Relax IRModule computing exactly the golden model's integer arithmetic.

`to_relax(qm)` returns a module whose ``main(input: int8/int16 NCHW) -> int8/int16`` uses plain
Relax ops, arranged so that the standard CPU legalization (LegalizeOps, AnnotateTIROpPattern,
FoldConstant, FuseOps, FuseTIR) puts each conv/dense and its whole requantization into ONE fused
kernel (conv2d -> add bias -> int64 -> *M -> +round -> >>s -> +zp -> clip -> cast).

How each op maps (integer identities; the golden model's formulas are in qmodel.py):
* conv2d / dense: sum((x - zp) * w) + bias == sum(x * w) + (bias - zp * sum(w)), provided every
  window element is real data or padding *with value zp*.  So the input is padded explicitly
  with zp (``nn.pad``, only when there is padding and zp != 0), the conv itself runs on the raw
  int8 (or int16) input with int8 weights and ``out_dtype="int32"``, and the zero-point
  correction is folded into the int32 bias constant.  Both forms are checked to fit int32.
* requantization: per-channel int64 constants M, 2**(s-1) and s (shape (1, C, 1, 1)).
* add: int64 ((a*Ma + b*Mb + (2**(s-1) - zp_a*Ma - zp_b*Mb)) >> s) + zp_out, clip, cast.
* mul: int64 (a - zp_a) * (b - zp_b) (broadcast), then requantized like a conv.
* concat: each input requantized to the output scale like avgpool's sum (skipped where it is
  the identity), then ``concat`` on its axis; maximum and minimum the same, then the max/min.
* lut: ``take`` from the 256-entry table at x - qmin (int32 index).
* softmax: integer max, table, sum and floor divisions, as the golden model spells them.
* log_softmax: the same max, table and sum, then the sum's top bit (a count of the thresholds
  it reaches), a log2 table for the 8 bits below it, and one fixed-point combination.
* avgpool: global -> int32 sum over H, W; windowed -> depthwise conv2d with all-ones int8
  weights; then int64 ((sum*M + 2**(s-1) - K*zp_in*M) >> s) + zp_out (K = window size).
* maxpool: ``nn.max_pool2d`` (pads with the dtype minimum, like the golden model).
* sub-byte weights (weight_bits <= 4): see `_packed_conv` / `_packed_dense` (packed constants
  unpacked inside the kernel) when ``pack_subbyte=True``.
Constants are built with their dtype spelled out: ``relax.const`` silently turns int64 numpy
arrays into int32 when no dtype is given.
"""

from __future__ import annotations

import numpy as np

from ..errors import EdgepruneError
from .qmodel import Op, QuantModel, adaptive_windows, validate
from .requant import linear_frac_bits, linear_taps, shifted_fits_int32

INT32_MIN, INT32_MAX = -(1 << 31), (1 << 31) - 1


def _const(arr, dtype: str):
    from tvm import relax
    a = np.asarray(arr)
    if a.dtype.kind in "iu":
        info = np.iinfo(dtype)
        if a.size and (a.min() < info.min or a.max() > info.max):
            raise EdgepruneError(f"constant out of {dtype} range: [{a.min()}, {a.max()}]")
    return relax.const(a.astype(dtype), dtype)


def _scalar(v: int, dtype: str = "int64"):
    return _const(np.array(v), dtype)


def _narrowest(a: np.ndarray) -> str:
    """The smallest signed integer dtype that holds every value of `a`: a constant stored in
    flash in it and widened where a kernel reads it (a ViT's positional embedding, 17 x 32
    values, took 4.3 KiB as int64 and takes 1.1 KiB as int16)."""
    for dtype in ("int8", "int16", "int32"):
        info = np.iinfo(dtype)
        if a.size == 0 or (a.min() >= info.min and a.max() <= info.max):
            return dtype
    return "int64"


def folded_bias(qm: QuantModel, op: Op) -> np.ndarray:
    """bias - zp_in * sum(w) per output channel (int32; raises if it does not fit)."""
    w = qm.param(op, "weight").astype(np.int64)
    zp = qm.tensors[op.inputs[0]].zero_point
    b = qm.param(op, "bias").astype(np.int64) - zp * w.reshape(w.shape[0], -1).sum(1)
    tin = qm.tensors[op.inputs[0]]
    xabs = max(abs(tin.qmin), abs(tin.qmax))
    worst = np.abs(w.reshape(w.shape[0], -1)).sum(1) * xabs + np.abs(b)
    if b.size and (worst.max() > INT32_MAX):
        raise EdgepruneError(f"op '{op.name}': zero-point-folded accumulator bound "
                             f"{int(worst.max())} does not fit int32")
    return b.astype(np.int32)


def _requant(bb, acc, op: Op, qm: QuantModel, m: np.ndarray, shift: np.ndarray, cshape,
             offset: np.ndarray | int = 0, bound: int | None = None):
    """int32/int64 acc -> clamp(zp + ((acc*M + 2**(s-1) + offset) >> s)) as the output dtype.

    `offset` (int64, broadcastable) is folded into the rounding constant (zero-point terms).
    `bound`: the largest |acc| there can be; where the shifted value then fits 32 bits, the
    zero point and the clamp are added in 32 bits (requant.shifted_fits_int32)."""
    from tvm import relax
    out = qm.tensors[op.output]
    s = 31 - np.asarray(shift, np.int64)
    if np.any((s < 1) | (s > 62)):
        raise EdgepruneError(f"op '{op.name}': total shift outside [1, 62]: {np.unique(s)}")
    rnd = (np.int64(1) << (s - 1)) + np.asarray(offset, np.int64)
    m = np.asarray(m, np.int64)
    uniform = m.size == 1 or (np.all(s == s.flat[0]) and np.all(m == m.flat[0])
                              and np.all(rnd == rnd.flat[0]))

    def c(v):
        v = np.asarray(v, np.int64)
        if uniform:
            return _scalar(int(v.flat[0]))
        return _const(np.broadcast_to(v, cshape) if v.size == 1 else v.reshape(cshape), "int64")
    y = relax.op.astype(acc, "int64")
    y = relax.op.multiply(y, c(m))
    y = relax.op.add(y, c(rnd))
    y = relax.op.right_shift(y, c(s))
    if bound is not None and shifted_fits_int32(bound, int(np.abs(m).max()),
                                                int(np.abs(rnd).max()), int(s.min()),
                                                out.zero_point):
        y = relax.op.add(relax.op.astype(y, "int32"), _scalar(out.zero_point, "int32"))
    else:
        y = relax.op.add(y, _scalar(out.zero_point))
    lo, hi = op.attrs["clamp"]
    y = relax.op.clip(y, int(lo), int(hi))
    return bb.emit(relax.op.astype(y, out.dtype), name_hint=_ident(op.output))


def _requant_by_position(bb, acc, op: Op, qm: QuantModel, m: np.ndarray, shift: np.ndarray):
    """_requant of an (N, C, H, W) int32 `acc` whose multiplier varies by output position (m,
    shift: (H, W)), as a pooling window clipped by the edges divides by the taps it holds.
    The quantizer gives every position one shift (shared_shift_multipliers), so the kernel
    takes it and its rounding constant as literals and reads one int32 M per position: stored
    whole in int64, M, 2**(s-1) and s took 24 bytes a position, 18.8 KiB for a 28 x 28 map.
    Positions with their own shifts (a model quantized before) are scaled to the largest,
    which is exact: (a*M*2**d + 2**(s+d-1)) >> (s+d) == (a*M + 2**(s-1)) >> s."""
    from tvm import te, tirx
    out = qm.tensors[op.output]
    s = 31 - np.asarray(shift, np.int64)
    if np.any((s < 1) | (s > 62)):
        raise EdgepruneError(f"op '{op.name}': total shift outside [1, 62]: {np.unique(s)}")
    top = int(s.max())
    m = np.left_shift(np.asarray(m, np.int64), top - s)
    lo, hi = (int(v) for v in op.attrs["clamp"])

    def i64(v):
        return tirx.const(int(v), "int64")

    def compute(a, mp):
        def value(n, c, i, j):
            y = tirx.shift_right(a[n, c, i, j].astype("int64") * mp[i, j].astype("int64")
                                 + i64(1 << (top - 1)), i64(top))
            return tirx.max(tirx.min(y + i64(out.zero_point), i64(hi)), i64(lo)).astype(out.dtype)
        return te.compute(a.shape, value, name="requant_by_position")
    return bb.emit(bb.call_te(compute, acc, _const(m, _narrowest(m)),
                              primfunc_name_hint="requant_by_position"),
                   name_hint=_ident(op.output))


def _let(x, use, name: str):
    """use(v), v a variable bound once to the TIR expression x (tirx.Let). Written inline,
    TVM's simplifier copies x into every use and pushes a cast of x into x's own terms: a
    32-bit value widened for a product becomes 64-bit arithmetic, three multiplies on a
    32-bit core instead of one."""
    from tvm import tirx
    v = tirx.Var(name, str(x.ty))
    return tirx.Let(v, x, use(v))


def _ident(name: str) -> str:
    s = "".join(ch if ch.isalnum() or ch == "_" else "_" for ch in name)
    return s if s and not s[0].isdigit() else "t_" + s


def _pad_zp(bb, x, padding, zp: int):
    """Pad H/W explicitly with the zero point; returns (x, conv padding)."""
    from tvm import relax
    pt, pl, pb, pr = (int(p) for p in padding)
    if not any(padding) or zp == 0:
        return x, [pt, pl, pb, pr]
    return bb.emit(relax.op.nn.pad(x, [0, 0, 0, 0, pt, pb, pl, pr], pad_value=float(zp))), [0, 0, 0, 0]


def _dilate(bb, x, in_shape, strides, zp: int, name: str):
    """Zero points between pixels (the int8 `dilate` op): each pixel padded by s - 1 zero
    points after it along a new axis, the axes merged, the trailing ones cut."""
    from tvm import relax
    n, c, h, w = (int(d) for d in in_shape)
    sh, sw = (int(s) for s in strides)
    six = bb.emit(relax.op.reshape(x, (n, c, h, 1, w, 1)))
    padded = bb.emit(relax.op.nn.pad(six, [0, 0, 0, 0, 0, 0, 0, sh - 1, 0, 0, 0, sw - 1],
                                     pad_value=float(zp)))
    flat = bb.emit(relax.op.reshape(padded, (n, c, h * sh, w * sw)))
    return bb.emit(relax.op.strided_slice(flat, axes=[2, 3], begin=[0, 0],
                                          end=[(h - 1) * sh + 1, (w - 1) * sw + 1]),
                   name_hint=name)


def _bilinear(bb, x, qm: QuantModel, op: Op):
    """Bilinear resizing as reference.py computes it, in one kernel that writes the output
    dtype: per output pixel, the 2 x 2 input taps weighted by the integer weights of
    requant.linear_taps (tables in flash: rows i0, i1, w1 per axis), one rounding shift."""
    from tvm import te, tirx
    tin, out = qm.tensors[op.inputs[0]], qm.tensors[op.output]
    f = linear_frac_bits(tin.dtype)
    tables = [_const(np.stack(linear_taps(int(tin.shape[axis]), int(out.shape[axis]),
                                          bool(op.attrs["align_corners"]), f)), "int32")
              for axis in (2, 3)]

    def compute(data, th, tw):
        one = tirx.const(1 << f, "int32")

        def body(n, c, y, xx):
            def row(i):   # input row i interpolated along W
                return ((one - tw[2, xx]) * data[n, c, i, tw[0, xx]].astype("int32")
                        + tw[2, xx] * data[n, c, i, tw[1, xx]].astype("int32"))
            acc = (one - th[2, y]) * row(th[0, y]) + th[2, y] * row(th[1, y])
            return tirx.shift_right(acc + tirx.const(1 << (2 * f - 1), "int32"),
                                    tirx.const(2 * f, "int32")).astype(out.dtype)
        return te.compute([data.shape[0], *(int(d) for d in out.shape[1:])], body,
                          name="bilinear")
    return bb.emit(bb.call_te(compute, x, *tables, primfunc_name_hint="bilinear_resize"),
                   name_hint=_ident(op.output))


SPLIT_GROUPS_MAX = 16  # more groups than this stay one kernel (code size)


def _conv(bb, env, qm: QuantModel, op: Op, pack_subbyte: bool):
    from tvm import relax
    a = op.attrs
    tin = qm.tensors[op.inputs[0]]
    w = qm.param(op, "weight")
    o = w.shape[0]
    bias = folded_bias(qm, op)
    subbyte = pack_subbyte and int(a.get("weight_bits", 8)) <= 4
    g = int(a["groups"])
    if not subbyte and 1 < g <= SPLIT_GROUPS_MAX and w.shape[1] >= 2:
        return _grouped_conv(bb, env, qm, op, bias)
    if subbyte:
        from .packing import packed_conv
        acc = packed_conv(bb, env[op.inputs[0]], qm, op, bias)
    else:
        x = env[op.inputs[0]]
        if 1 < g == tin.shape[1] and w.shape[1] == 1 and o > g:
            # a depthwise multiplier: with each input channel repeated o / g times it is a
            # plain depthwise conv (output c reads input c // (o / g) either way), which the
            # fast kernels run
            x, g = bb.emit(relax.op.repeat(x, o // g, axis=1)), o
        x, pad = _pad_zp(bb, x, a["padding"], tin.zero_point)
        acc = relax.op.nn.conv2d(x, _const(w, "int8"), strides=a["strides"], padding=pad,
                                 dilation=a["dilation"], groups=g, out_dtype="int32")
        acc = relax.op.add(acc, _const(bias.reshape(1, o, 1, 1), "int32"))
    return _requant(bb, acc, op, qm, qm.param(op, "multiplier"), qm.param(op, "shift"),
                    (1, o, 1, 1))


def _grouped_conv(bb, env, qm: QuantModel, op: Op, bias: np.ndarray):
    """A grouped conv as one ordinary conv per group on its slice of the channels, then a
    concat: each group is then the chain the fast int8 kernels recognise (TVM's own grouped
    conv runs ~6 instructions per MAC on a Cortex-M7, the kernels 1-2)."""
    from tvm import relax
    a = op.attrs
    tin = qm.tensors[op.inputs[0]]
    w = qm.param(op, "weight")
    g, ci = int(a["groups"]), w.shape[1]
    co = w.shape[0] // g
    m, shift = qm.param(op, "multiplier"), qm.param(op, "shift")
    parts = []
    for k in range(g):
        xk = bb.emit(relax.op.strided_slice(env[op.inputs[0]], axes=[1], begin=[k * ci],
                                            end=[(k + 1) * ci]))
        xk, pad = _pad_zp(bb, xk, a["padding"], tin.zero_point)
        acc = relax.op.nn.conv2d(xk, _const(w[k * co:(k + 1) * co], "int8"), strides=a["strides"],
                                 padding=pad, dilation=a["dilation"], out_dtype="int32")
        acc = relax.op.add(acc, _const(bias[k * co:(k + 1) * co].reshape(1, co, 1, 1), "int32"))
        parts.append(_requant(bb, acc, op, qm, m[k * co:(k + 1) * co],
                              shift[k * co:(k + 1) * co], (1, co, 1, 1)))
    return bb.emit(relax.op.concat(parts, axis=1), name_hint=_ident(op.output))


def _dense(bb, env, qm: QuantModel, op: Op, pack_subbyte: bool):
    from tvm import relax
    w = qm.param(op, "weight")
    o = w.shape[0]
    bias = folded_bias(qm, op)
    x = env[op.inputs[0]]
    in_shape = [int(d) for d in x.ty.shape.values]   # with the batch being built
    if len(in_shape) > 2:   # over the last axis of (N, ..., K): as rows of (N * ..., K)
        x = bb.emit(relax.op.reshape(x, (int(np.prod(in_shape[:-1])), in_shape[-1])))
    if pack_subbyte and int(op.attrs.get("weight_bits", 8)) <= 4:
        from .packing import packed_dense
        acc = packed_dense(bb, x, qm, op, bias)
    else:
        acc = relax.op.matmul(x, _const(np.ascontiguousarray(w.T), "int8"), out_dtype="int32")
        acc = relax.op.add(acc, _const(bias.reshape(1, o), "int32"))
    y = _requant(bb, acc, op, qm, qm.param(op, "multiplier"), qm.param(op, "shift"), (1, o))
    if len(in_shape) > 2:
        y = bb.emit(relax.op.reshape(y, (*in_shape[:-1], o)), name_hint=_ident(op.output))
    return y


def _add(bb, env, qm: QuantModel, op: Op):
    from tvm import relax
    ta, tb = qm.tensors[op.inputs[0]], qm.tensors[op.inputs[1]]
    ma, mb = (int(v) for v in op.attrs["multipliers"])
    s = int(op.attrs["shift_total"])
    ya = relax.op.multiply(relax.op.astype(env[op.inputs[0]], "int64"), _scalar(ma))
    yb = relax.op.multiply(relax.op.astype(env[op.inputs[1]], "int64"), _scalar(mb))
    acc = relax.op.add(ya, yb)
    offset = -ta.zero_point * ma - tb.zero_point * mb
    # _requant multiplies by M; here the multipliers are already applied: M = 1, shift = 31 - s.
    return _requant(bb, acc, op, qm, np.array(1), np.array(31 - s), None, offset)


def _mul(bb, env, qm: QuantModel, op: Op):
    """A product of two activations (a gate: GLU, squeeze-and-excitation), in 32 bits where it
    fits (int8 operands) and widened for the requantization."""
    from tvm import relax
    tensors = [qm.tensors[i] for i in op.inputs]
    bound = int(np.prod([max(abs(t.qmin - t.zero_point), abs(t.qmax - t.zero_point))
                         for t in tensors]))
    dt = "int32" if bound <= INT32_MAX else "int64"
    a, b = ((relax.op.subtract(relax.op.astype(env[i], dt), _scalar(t.zero_point, dt)))
            for i, t in zip(op.inputs, tensors))
    return _requant(bb, relax.op.multiply(a, b), op, qm, np.array(int(op.attrs["multiplier"])),
                    np.array(int(op.attrs["shift"])), None, bound=bound)


def _addconst(bb, env, qm: QuantModel, op: Op):
    from tvm import relax, te
    out = qm.tensors[op.output]
    s = 31 - int(op.attrs["shift"])
    x = relax.op.subtract(relax.op.astype(env[op.inputs[0]], "int64"),
                          _scalar(qm.tensors[op.inputs[0]].zero_point))
    y = relax.op.add(relax.op.multiply(x, _scalar(int(op.attrs["multiplier"]))),
                     _scalar(1 << (s - 1)))
    y = bb.emit(relax.op.right_shift(y, _scalar(s)))
    bias = qm.param(op, "bias").astype(np.int64) + out.zero_point   # one sample's shape
    tin = qm.tensors[op.inputs[0]]
    reach = max(abs(tin.qmin - tin.zero_point), abs(tin.qmax - tin.zero_point))
    shifted = (reach * abs(int(op.attrs["multiplier"])) >> s) + 1
    # the sum in 32 bits where it fits: a 32-bit core adds a widened int16 to an int64 in
    # more instructions than it stores int64 constants in bytes
    wide = "int32" if shifted + int(np.abs(bias).max(initial=0)) <= INT32_MAX else "int64"

    def add_bias(t, b):   # widened as it is read, so that flash keeps the narrow constant
        return te.compute(t.shape, lambda n, *i: t(n, *i).astype(wide) + b(*i).astype(wide),
                          name="add_constant")
    y = bb.emit(bb.call_te(add_bias, y, _const(bias, _narrowest(bias)),
                           primfunc_name_hint="add_constant"))
    lo, hi = op.attrs["clamp"]
    return bb.emit(relax.op.astype(relax.op.clip(y, int(lo), int(hi)), out.dtype),
                   name_hint=_ident(op.output))


def _matmul(bb, env, qm: QuantModel, op: Op):
    from tvm import relax
    ta, tb = (qm.tensors[i] for i in op.inputs)
    bound = ta.shape[-1] * (ta.qmax - ta.qmin) * (tb.qmax - tb.qmin)
    dt = "int32" if bound < 2 ** 31 else "int64"      # int16 operands need 64-bit sums
    out = qm.tensors[op.output]
    if (ta.dtype, tb.dtype, dt) == ("int8", "int8", "int32"):   # its sums are int32
        from ..kernels.int8 import matmul_kernel
        s = 31 - int(op.attrs["shift"])
        if not 1 <= s <= 62:
            raise EdgepruneError(f"op '{op.name}': total shift {s} outside [1, 62]")
        lo, hi = (int(v) for v in op.attrs["clamp"])
        a, b = (env[i] for i in op.inputs)
        sa, sb = ([int(d) for d in v.ty.shape.values] for v in (a, b))  # with the batch built
        prim, m = matmul_kernel(sa, sb, ta.zero_point, tb.zero_point,
                                int(op.attrs["multiplier"]), s, out.zero_point, lo, hi,
                                out.dtype)
        return bb.emit(relax.call_tir(bb.add_func(prim, "matmul"), [a, b, _const(m, "int32")],
                                      relax.TensorType([*sa[:-1], sb[-1]], out.dtype)),
                       name_hint=_ident(op.output))
    a, b = ((relax.op.subtract(relax.op.astype(env[i], dt),
                               _scalar(qm.tensors[i].zero_point, dt))) for i in op.inputs)
    return _requant(bb, relax.op.matmul(a, b, out_dtype=dt), op, qm,
                    np.array(int(op.attrs["multiplier"])), np.array(int(op.attrs["shift"])), None)


def _concat(bb, env, qm: QuantModel, op: Op):
    """concat, maximum, minimum: each input requantized to the output's scale first."""
    from tvm import relax
    out = qm.tensors[op.output]
    lo, hi = op.attrs["clamp"]
    parts = []
    for i, m, sh in zip(op.inputs, op.attrs["multipliers"], op.attrs["shifts"]):
        t = qm.tensors[i]
        same = ((t.dtype, t.zero_point) == (out.dtype, out.zero_point)
                and (int(m), int(sh)) == (1 << 30, 1) and (lo, hi) == (out.qmin, out.qmax))
        parts.append(env[i] if same else  # identity: M * 2**(shift-31) == 1, no clamp
                     _requant(bb, env[i], op, qm, np.array(int(m)), np.array(int(sh)), None,
                              -t.zero_point * int(m)))
    if op.kind != "concat":
        return bb.emit(getattr(relax.op, op.kind)(*parts), name_hint=_ident(op.output))
    return bb.emit(relax.op.concat(parts, axis=int(op.attrs.get("axis", 1))),
                   name_hint=_ident(op.output))


def _lut(bb, env, qm: QuantModel, op: Op):
    from tvm import relax
    tin, out = qm.tensors[op.inputs[0]], qm.tensors[op.output]
    idx = relax.op.subtract(relax.op.astype(env[op.inputs[0]], "int32"),
                            _scalar(tin.qmin, "int32"))
    table = _const(qm.param(op, "table"), out.dtype)
    # "clip", not "fast": indices are always in range, and "fast" makes TVM warn on every build
    return bb.emit(relax.op.take(table, idx, axis=0, mode="clip"), name_hint=_ident(op.output))


def _prelu(bb, env, qm: QuantModel, op: Op):
    """reference.run_op's prelu: each side requantized, then chosen by the input's sign (as
    kernels.prelu_kernel does, one side per value, where its shifts allow)."""
    from tvm import relax
    tin, out = qm.tensors[op.inputs[0]], qm.tensors[op.output]
    pos = (int(op.attrs["multiplier"]), 31 - int(op.attrs["shift"]))
    neg = (qm.param(op, "multiplier"), 31 - qm.param(op, "shift").astype(np.int64))
    lo, hi = (int(v) for v in op.attrs["clamp"])
    shape = [int(d) for d in env[op.inputs[0]].ty.shape.values]   # with the batch built
    made = None
    if out.dtype in ("int8", "int16") and all(1 <= v <= 62 for v in [pos[1], *neg[1].flat]):
        from ..kernels.int8 import prelu_kernel
        made = prelu_kernel(shape, tin.dtype, out.dtype, tin.zero_point, out.zero_point, lo, hi,
                            pos, neg)
    if made is not None:
        prim, params = made
        return bb.emit(relax.call_tir(bb.add_func(prim, "prelu"),
                                      [env[op.inputs[0]], _const(params, "int32")],
                                      relax.TensorType(shape, out.dtype)),
                       name_hint=_ident(op.output))
    x = relax.op.subtract(relax.op.astype(env[op.inputs[0]], "int64"),
                          _scalar(tin.zero_point))
    cshape = (1, -1) + (1,) * (len(tin.shape) - 2)
    pos_y = _requant(bb, x, op, qm, np.array(pos[0]), np.array(int(op.attrs["shift"])), None)
    neg_y = _requant(bb, x, op, qm, qm.param(op, "multiplier"), qm.param(op, "shift"), cshape)
    return bb.emit(relax.op.where(relax.op.greater_equal(x, _scalar(0)), pos_y, neg_y),
                   name_hint=_ident(op.output))


def _layernorm(bb, env, qm: QuantModel, op: Op):
    """reference.run_op's layernorm in one kernel: per row the sums, the integer square root
    and its reciprocal (once per row, not per value), then per value a multiply and a shift
    (requant.layernorm_normalized) and the per-channel requantization."""
    from tvm import te, tirx

    from .requant import LAYERNORM_FRAC_BITS, LAYERNORM_RECIP_BITS
    tin, out = qm.tensors[op.inputs[0]], qm.tensors[op.output]
    c = int(tin.shape[-1])
    s = 31 - qm.param(op, "shift").astype(np.int64)
    # the rounding constant 2**(s-1) is made from s in the kernel: stored, it needs int64
    per_channel = np.stack([qm.param(op, "multiplier").astype(np.int64), s,
                            qm.param(op, "bias").astype(np.int64) + out.zero_point])
    lo, hi = (int(v) for v in op.attrs["clamp"])
    # C times a deviation reaches 2 C (qmax - qmin); a normalized value |d| / r stays under
    # 3 sqrt(C) (r is the root of the mean of d**2, at least 1), times 2**F
    narrow = "int32" if 2 * c * (tin.qmax - tin.qmin) < INT32_MAX else "int64"
    normal = "int32" if 3 * np.sqrt(c) * 2 ** LAYERNORM_FRAC_BITS < INT32_MAX else "int64"
    # with one shift, the offset and the clamp in 32 bits where the largest normalized value
    # leaves room (3 sqrt(C) 2**F, as above)
    clamp32 = len(set(s.tolist())) == 1 and shifted_fits_int32(
        int(3 * np.sqrt(c) * 2 ** LAYERNORM_FRAC_BITS) + 1, int(np.abs(per_channel[0]).max()),
        1 << int(s.flat[0] - 1), int(s.flat[0]), int(np.abs(per_channel[2]).max()))

    def i64(v):
        return tirx.const(int(v), "int64")

    def compute(data, pc):
        lead = list(data.shape[:-1])

        def lit(v):
            return tirx.const(int(v), narrow)

        def dev(i, k):   # C times the deviation from the row's mean: exact
            return (data[(*i, k)].astype(narrow) - lit(tin.zero_point)) * lit(c) - total[i]
        k1 = te.reduce_axis((0, c), "k1")
        total = te.compute(lead, lambda *i: te.sum(
            data[(*i, k1)].astype(narrow) - lit(tin.zero_point), axis=k1), name="ln_sum") \
            if op.attrs.get("center", True) else te.compute(lead, lambda *i: lit(0))
        k2 = te.reduce_axis((0, c), "k2")

        def wide(x, use):   # 32-bit x widened where `use` reads it
            return _let(x, lambda v: use(v.astype("int64")), "ln_d")
        sq = te.compute(lead, lambda *i: te.sum(wide(dev(i, k2), lambda d: d * d), axis=k2),
                        name="ln_sq")

        def reciprocal(*i):
            # each step bound once (Let): written as nested expressions, the Selects copied
            # the root into C 10 times per row, each a double sqrt (soft-float on most
            # targets)
            v, r0, r1, r = (tirx.Var(n, "int64") for n in ("ln_v", "ln_r0", "ln_r1", "ln_r"))
            body = tirx.floordiv(i64(1 << (LAYERNORM_FRAC_BITS + LAYERNORM_RECIP_BITS))
                                 + tirx.floordiv(r, i64(2)), r)
            body = tirx.Let(r, tirx.max(tirx.Select((r1 + i64(1)) * (r1 + i64(1)) <= v,
                                                    r1 + i64(1), r1), i64(1)), body)
            body = tirx.Let(r1, tirx.Select(r0 * r0 > v, r0 - i64(1), r0), body)
            body = tirx.Let(r0, tirx.sqrt(v.astype("float64")).astype("int64"), body)
            return tirx.Let(v, tirx.floordiv(sq[i], i64(c)) + i64(op.attrs["eps_steps"]), body)
        inv = te.compute(lead, reciprocal, name="ln_inv")

        def value(*idx):
            i, ch = idx[:-1], idx[-1]
            n = wide(dev(i, ch), lambda d: tirx.shift_right(
                d * inv[i] + i64(1 << (LAYERNORM_RECIP_BITS - 1)), i64(LAYERNORM_RECIP_BITS)))
            k = ch if per_channel.shape[1] > 1 else 0     # one value for all channels
            m, b = pc[0, k].astype("int64"), pc[2, k].astype("int64")
            if len(set(s.tolist())) == 1:   # one shift (the usual case): constants in the code
                sh, rnd = i64(s.flat[0]), i64(1 << int(s.flat[0] - 1))
            else:
                sh = pc[1, k].astype("int64")
                rnd = tirx.shift_left(i64(1), sh - i64(1))
            y = wide(n.astype(normal), lambda n: tirx.shift_right(n * m + rnd, sh))
            if clamp32:
                y = y.astype("int32") + pc[2, k].astype("int32")
                return tirx.max(tirx.min(y, tirx.const(hi, "int32")),
                                tirx.const(lo, "int32")).astype(out.dtype)
            return tirx.max(tirx.min(y + b, i64(hi)), i64(lo)).astype(out.dtype)
        return te.compute(list(data.shape), value, name="layernorm")
    return bb.emit(bb.call_te(compute, env[op.inputs[0]],
                              _const(per_channel, _narrowest(per_channel)),
                              primfunc_name_hint="layernorm"), name_hint=_ident(op.output))


def _softmax(bb, env, qm: QuantModel, op: Op):
    """reference.run_op's softmax in one kernel: per row the max, the sum of the exp table and
    its fixed-point reciprocal (requant.softmax_row_reciprocal), then per value a multiply and
    a shift. A mask (params keep) leaves the removed keys out of the max and the sum. An int8
    input without a mask runs kernels.softmax_kernel, the same in 32-bit arithmetic."""
    from tvm import relax, te, tirx

    from .requant import SOFTMAX_RECIP_BITS
    shape = [int(d) for d in env[op.inputs[0]].ty.shape.values]
    ax = int(op.attrs["axis"]) % len(shape)
    n_ax = shape[ax]
    keep = qm.params.get(f"{op.name}.keep")
    sums = "int32" if n_ax << 16 <= INT32_MAX else "int64"
    if keep is None and str(env[op.inputs[0]].ty.dtype) == "int8":
        from ..kernels.int8 import softmax_kernel
        prim = softmax_kernel(shape, ax, SOFTMAX_RECIP_BITS, sums)
        return bb.emit(relax.call_tir(bb.add_func(prim, "softmax"),
                                      [env[op.inputs[0]], _const(qm.param(op, "table"), "int32")],
                                      relax.TensorType(shape, "int8")),
                       name_hint=_ident(op.output))

    def i64(v):
        return tirx.const(int(v), "int64")

    def compute(data, table, *mask):
        rows = shape[:ax] + [1] + shape[ax + 1:]

        def at(i, k):        # index i with position k along the axis
            return (*i[:ax], k, *i[ax + 1:])

        def kept(i):         # the mask's entry for index i (its axes of size 1 broadcast)
            return mask[0][tuple(0 if m == 1 else v for m, v in zip(keep.shape, i))] != 0

        def value_at(i, k):
            v = data[at(i, k)].astype("int32")
            return tirx.Select(kept(at(i, k)), v, tirx.const(-128, "int32")) if mask else v
        k1 = te.reduce_axis((0, n_ax), "k1")
        mx = te.compute(rows, lambda *i: te.max(value_at(i, k1), axis=k1), name="sm_max")

        def exp(i, k):   # table values are at most 2**16 (exp(0)), sums of them int32
            idx = data[at(i, k)].astype("int32") - mx[at(i, 0)] + tirx.const(255, "int32")
            if not mask:
                return table[idx]
            idx = tirx.min(tirx.max(idx, tirx.const(0, "int32")), tirx.const(255, "int32"))
            return tirx.Select(kept(at(i, k)), table[idx], tirx.const(0, "int32"))  # in bounds
        k2 = te.reduce_axis((0, n_ax), "k2")
        total = te.compute(rows, lambda *i: te.sum(exp(i, k2).astype(sums), axis=k2),
                           name="sm_sum")
        # one division per row: the sum is positive (the row's maximum adds 2**16), so C's
        # division is the floor division, which TVM writes as a division and a remainder,
        # two 64-bit library calls on a 32-bit core. The reciprocal is at most 2**22, and a
        # row with every key masked (sum 0) gives -128 whatever it is, as in the reference
        inv = te.compute(rows, lambda *i: tirx.truncdiv(
            i64(1 << (8 + SOFTMAX_RECIP_BITS)) + tirx.shift_right(total[i], 1).astype("int64"),
            tirx.max(total[i].astype("int64"), i64(1))).astype("int32"), name="sm_inv")

        def value(*i):   # int32 operands widened at the product: one multiply on 32 bits;
            # the probability, at most 2**38 >> 30, and its clamp back in 32 bits
            p = tirx.shift_right(exp(i, i[ax]).astype("int64") * inv[at(i, 0)].astype("int64")
                                 + i64(1 << (SOFTMAX_RECIP_BITS - 1)),
                                 i64(SOFTMAX_RECIP_BITS)).astype("int32")
            return _let(p, lambda v: tirx.max(tirx.min(v - tirx.const(128, "int32"),
                                                       tirx.const(127, "int32")),
                                              tirx.const(-128, "int32")).astype("int8"), "sm_p")
        return te.compute(shape, value, name="softmax")
    extra = [] if keep is None else [_const(keep, "int8")]
    return bb.emit(bb.call_te(compute, env[op.inputs[0]],
                              _const(qm.param(op, "table"), "int32"), *extra,
                              primfunc_name_hint="softmax"), name_hint=_ident(op.output))


def _log_softmax(bb, env, qm: QuantModel, op: Op):
    from tvm import relax
    a = op.attrs
    ax = int(a["axis"])
    x = relax.op.astype(env[op.inputs[0]], "int64")
    d = relax.op.subtract(x, relax.op.max(x, axis=[ax], keepdims=True))
    idx = relax.op.astype(relax.op.add(d, _scalar(255)), "int32")
    e = relax.op.astype(relax.op.take(_const(qm.param(op, "table"), "int32"), idx, axis=0,
                                      mode="clip"), "int64")
    total = relax.op.sum(e, axis=[ax], keepdims=True)
    msb = None   # floor(log2 total): how many of 2, 4, ..., 2**30 it reaches
    for i in range(1, 31):
        hit = relax.op.astype(relax.op.greater_equal(total, _scalar(1 << i)), "int64")
        msb = hit if msb is None else relax.op.add(msb, hit)
    frac = relax.op.subtract(relax.op.right_shift(
        relax.op.left_shift(total, relax.op.subtract(_scalar(30), msb)), _scalar(22)),
        _scalar(256))
    lg = relax.op.add(relax.op.multiply(relax.op.subtract(msb, _scalar(16)), _scalar(65536)),
                      relax.op.astype(relax.op.take(_const(qm.param(op, "log2_table"), "int32"),
                                                    relax.op.astype(frac, "int32"), axis=0,
                                                    mode="clip"), "int64"))
    acc = relax.op.subtract(relax.op.multiply(d, _scalar(int(a["multiplier"]))),
                            relax.op.multiply(lg, _scalar(int(a["ln2"]))))
    y = relax.op.floor_divide(relax.op.add(acc, _scalar(1 << 27)), _scalar(1 << 28))
    y = relax.op.clip(relax.op.add(y, _scalar(127)), -128, 127)
    return bb.emit(relax.op.astype(y, "int8"), name_hint=_ident(op.output))


def _adaptive_pool(bb, x, qm: QuantModel, op: Op):
    """Adaptive pooling with windows of several sizes (qmodel.adaptive_windows): per output
    position, the max of its window, or the int32 sum of x - zp for avgpool."""
    from tvm import te, tirx
    tin = qm.tensors[op.inputs[0]]
    h, w = (int(d) for d in tin.shape[2:])
    oh, ow = (int(d) for d in op.attrs["output_size"])
    rows, cols = adaptive_windows(h, oh), adaptive_windows(w, ow)
    kh, kw = max(e - s for s, e in rows), max(e - s for s, e in cols)
    is_max = op.kind == "maxpool"

    def compute(data):
        rh, rw = te.reduce_axis((0, kh), "rh"), te.reduce_axis((0, kw), "rw")

        def body(n, c, i, j):
            hs, ws = tirx.floordiv(i * h, oh), tirx.floordiv(j * w, ow)     # the windows of
            he = tirx.floordiv((i + 1) * h + oh - 1, oh)                   # adaptive_windows
            we = tirx.floordiv((j + 1) * w + ow - 1, ow)
            v = data[n, c, tirx.min(hs + rh, h - 1), tirx.min(ws + rw, w - 1)]
            inside = tirx.all(hs + rh < he, ws + rw < we)
            # taps past a window's end read as the dtype's lowest value (or add 0): te.max
            # with a `where` mask took taps outside the window on TVM 0.27
            if is_max:
                return te.max(tirx.if_then_else(inside, v, tirx.min_value(tin.dtype)),
                              axis=[rh, rw])
            return te.sum(tirx.if_then_else(inside, v.astype("int32") - tin.zero_point, 0),
                          axis=[rh, rw])
        return te.compute([data.shape[0], data.shape[1], oh, ow], body,
                          name="adaptive_max" if is_max else "adaptive_sum")
    return bb.emit(bb.call_te(compute, x, primfunc_name_hint="adaptive_pool"),
                   name_hint=_ident(op.output if is_max else op.output + "_sum"))


def _avgpool(bb, env, qm: QuantModel, op: Op):
    from tvm import relax
    a = op.attrs
    tin = qm.tensors[op.inputs[0]]
    n, c, h, w = tin.shape
    kh, kw = a["kernel"]
    x = env[op.inputs[0]]
    if "output_size" in a:
        return _requant_by_position(bb, _adaptive_pool(bb, x, qm, op), op, qm,
                                    qm.param(op, "multiplier"), qm.param(op, "shift"))
    is_global = ([kh, kw] == [h, w] and not any(a["padding"])
                 and qm.tensors[op.output].shape[2:] == [1, 1])
    if is_global:
        acc = relax.op.sum(relax.op.astype(x, "int32"), axis=[2, 3], keepdims=True)
    else:
        x, pad = _pad_zp(bb, x, a["padding"], tin.zero_point)
        ones = np.ones((c, 1, kh, kw), np.int8)
        acc = relax.op.nn.conv2d(x, _const(ones, "int8"), strides=a["strides"], padding=pad,
                                 dilation=a.get("dilation", [1, 1]), groups=c, out_dtype="int32")
    if not a.get("count_include_pad", True):   # a divisor per output position
        # the padding read as zp: the windows' sums of (x - zp) are exact in int32
        acc = bb.emit(relax.op.subtract(acc, _scalar(kh * kw * tin.zero_point, "int32")))
        return _requant_by_position(bb, acc, op, qm, qm.param(op, "multiplier"),
                                    qm.param(op, "shift"))
    m = np.array(int(a["multiplier"]))
    return _requant(bb, acc, op, qm, m, np.array(int(a["shift"])), None,
                    -kh * kw * tin.zero_point * m.astype(np.int64))


def to_relax(qm: QuantModel, batch: int | None = None, pack_subbyte: bool = True,
             func_name: str = "main"):
    """A `tvm.IRModule` whose `main(input)` returns the integer output of `qm`, bit-exact.

    batch: override the model's static batch size (e.g. to run many samples per call on the
    host); default the QuantModel's own.  pack_subbyte: keep <= 4-bit weights packed in the
    constants and unpack them inside the kernel (else they are stored as int8).
    """
    from tvm import relax

    validate(qm)

    def shape(name):
        s = list(qm.tensors[name].shape)
        if batch is not None:
            s[0] = int(batch)
        return s

    tin = qm.input_info
    x = relax.Var("input", relax.TensorType(shape(qm.input), tin.dtype))
    bb = relax.BlockBuilder()
    with bb.function(func_name, [x]):
        with bb.dataflow():
            env = {qm.input: x}
            for op in qm.ops:
                if op.kind == "conv2d":
                    y = _conv(bb, env, qm, op, pack_subbyte)
                elif op.kind == "dense":
                    y = _dense(bb, env, qm, op, pack_subbyte)
                elif op.kind == "add":
                    y = _add(bb, env, qm, op)
                elif op.kind == "mul":
                    y = _mul(bb, env, qm, op)
                elif op.kind == "matmul":
                    y = _matmul(bb, env, qm, op)
                elif op.kind == "addconst":
                    y = _addconst(bb, env, qm, op)
                elif op.kind in ("concat", "maximum", "minimum"):
                    y = _concat(bb, env, qm, op)
                elif op.kind == "lut":
                    y = _lut(bb, env, qm, op)
                elif op.kind == "prelu":
                    y = _prelu(bb, env, qm, op)
                elif op.kind == "layernorm":
                    y = _layernorm(bb, env, qm, op)
                elif op.kind == "softmax":
                    y = _softmax(bb, env, qm, op)
                elif op.kind == "log_softmax":
                    y = _log_softmax(bb, env, qm, op)
                elif op.kind == "avgpool":
                    y = _avgpool(bb, env, qm, op)
                elif op.kind == "maxpool" and "output_size" in op.attrs:
                    y = _adaptive_pool(bb, env[op.inputs[0]], qm, op)
                elif op.kind == "maxpool":
                    a = op.attrs
                    y = bb.emit(relax.op.nn.max_pool2d(
                        env[op.inputs[0]], pool_size=a["kernel"], strides=a["strides"],
                        padding=a["padding"], dilation=a.get("dilation", [1, 1])),
                        name_hint=_ident(op.output))
                elif op.kind == "reshape":
                    y = bb.emit(relax.op.reshape(env[op.inputs[0]], shape(op.output)),
                                name_hint=_ident(op.output))
                elif op.kind == "transpose":
                    y = bb.emit(relax.op.permute_dims(env[op.inputs[0]], op.attrs["perm"]),
                                name_hint=_ident(op.output))
                elif op.kind == "pad":
                    a, nd = op.attrs, len(shape(op.inputs[0]))
                    widths = [0] * (2 * nd)
                    widths[2 * a["axis"]:2 * a["axis"] + 2] = [a["before"], a["after"]]
                    y = bb.emit(relax.op.nn.pad(
                        env[op.inputs[0]], widths, pad_mode=a.get("mode", "constant"),
                        pad_value=float(qm.tensors[op.inputs[0]].zero_point)),
                        name_hint=_ident(op.output))
                elif op.kind == "slice":
                    a = op.attrs
                    y = bb.emit(relax.op.strided_slice(
                        env[op.inputs[0]], axes=[a["axis"]], begin=[a["start"]],
                        end=[a["stop"]], strides=[a["step"]]), name_hint=_ident(op.output))
                elif op.kind == "dilate":
                    y = _dilate(bb, env[op.inputs[0]], shape(op.inputs[0]), op.attrs["strides"],
                                qm.tensors[op.output].zero_point, _ident(op.output))
                elif op.kind == "upsample" and "rows" in op.attrs:   # nearest, any size
                    rows = bb.emit(relax.op.take(env[op.inputs[0]], _const(
                        np.asarray(op.attrs["rows"], np.int32), "int32"), axis=2))
                    y = bb.emit(relax.op.take(rows, _const(np.asarray(
                        op.attrs["cols"], np.int32), "int32"), axis=3),
                        name_hint=_ident(op.output))
                elif op.kind == "upsample" and op.attrs.get("mode", "nearest") == "nearest":
                    sh, sw = (int(f) for f in op.attrs["factors"])
                    rows = bb.emit(relax.op.repeat(env[op.inputs[0]], sh, axis=2))
                    y = bb.emit(relax.op.repeat(rows, sw, axis=3), name_hint=_ident(op.output))
                elif op.kind == "upsample":
                    y = _bilinear(bb, env[op.inputs[0]], qm, op)
                else:
                    raise EdgepruneError(f"to_relax: op '{op.name}' kind '{op.kind}' unsupported")
                env[op.output] = y
            out = bb.emit_output(env[qm.output] if not qm.more_outputs else
                                 relax.Tuple([env[o] for o in qm.outputs]))
        bb.emit_func_output(out)
    mod = bb.get()
    return mod


def legalize_and_fuse(mod, target: str = "c"):
    """The CPU legalization + fusion passes the C pipeline uses (for tests and inspection)."""
    import tvm
    from tvm import relax
    seq = tvm.transform.Sequential([
        relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(),
        relax.transform.FoldConstant(), relax.transform.FuseOps(), relax.transform.FuseTIR(),
        relax.transform.DeadCodeElimination()])
    with tvm.target.Target(target):
        return seq(mod)


def build_host(mod):
    """Compile for the host CPU (llvm) and return a callable numpy -> numpy (tests, checks);
    a model with several outputs returns a list of them."""
    import tvm
    from tvm import relax
    ex = tvm.compile(mod, target="llvm")
    vm = relax.VirtualMachine(ex, tvm.cpu())

    def run(x: np.ndarray):
        y = vm["main"](tvm.runtime.tensor(np.ascontiguousarray(x)))
        return y.numpy() if hasattr(y, "numpy") else [t.numpy() for t in y]
    return run
