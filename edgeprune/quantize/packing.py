"""Sub-byte weights: pack 4/2-bit codes into bytes, and conv/dense TE kernels that unpack them.

Flash layout: the weight tensor's values in C order (OIHW / OK), element i in byte
``i // (8 // b)`` at bit offset ``b * (i % (8 // b))`` (lowest bits first).  Codes:
* "int" / "ternary" (b = 4 or 2; 3-bit layers use 4-bit slots): the value's b-bit two's complement;
  decoded as ``f - ((f >> (b-1)) << b)``.
* "pow2" (4 bits): 0 -> 0; +-2**k -> sign << 3 | (k + 1) (k = 0..6); the TE kernel here
  multiplies by shifting: ``x << k``, negated when the sign bit is set, branch-free (no multiply
  instruction); the fast kernels decode the value and multiply (SMLAD costs no more).

Because the unpacking sits inside the conv's reduction (one TE compute reading the packed
constant), FoldConstant cannot expand the weights back to int8: flash keeps the packed bytes.
The fast kernels (kernels/int8.py) take over dense layers, convs with groups 1 and depthwise
convs: the layer's PrimFunc carries its layout (PACKED_ATTR); they decode the codes and repack
them in their own order, still b bits each, and multiply the decoded values (pow2 included).
Other packed layers (a depthwise channel multiplier) run these TE kernels.
"""

from __future__ import annotations

import json

import numpy as np

from ..errors import EdgepruneError
from .qmodel import Op, QuantModel


# PrimFunc attribute of a packed conv or dense: its layout (JSON), read by kernels/int8.py
PACKED_ATTR = "edgeprune.packed"


def slot_bits(op: Op) -> int:
    bits = int(op.attrs.get("weight_bits", 8))
    if op.attrs.get("weight_format", "int") == "pow2":
        return 4
    if bits <= 2:
        return 2
    if bits <= 4:
        return 4
    raise EdgepruneError(f"op '{op.name}': {bits}-bit weights are not packed (only <= 4 bits)")


def encode(values: np.ndarray, fmt: str, b: int) -> np.ndarray:
    """Integer weight values -> b-bit codes (uint8, one per value)."""
    v = np.asarray(values, np.int64).ravel()
    if fmt == "pow2":
        mag = np.abs(v)
        k = np.zeros_like(v)
        nz = mag > 0
        k[nz] = np.round(np.log2(mag[nz])).astype(np.int64) + 1
        if np.any(k > 7) or np.any((mag[nz] & (mag[nz] - 1)) != 0):
            raise EdgepruneError("pow2 weights must be 0 or +-2**k with k <= 6")
        return (((v < 0).astype(np.int64) << 3) | k).astype(np.uint8)
    lo, hi = -(1 << (b - 1)), (1 << (b - 1)) - 1
    if v.size and (v.min() < lo or v.max() > hi):
        raise EdgepruneError(f"weights in [{v.min()}, {v.max()}] do not fit {b}-bit codes")
    return (v & ((1 << b) - 1)).astype(np.uint8)


def decode(codes: np.ndarray, fmt: str, b: int) -> np.ndarray:
    """Inverse of `encode` (numpy; the kernels do the same in TIR)."""
    f = np.asarray(codes, np.int64)
    if fmt == "pow2":
        mag = f & 7
        val = np.where(mag == 0, 0, np.left_shift(1, np.maximum(mag - 1, 0)))
        return np.where(f >> 3 == 1, -val, val)
    return f - ((f >> (b - 1)) << b)


def pack(values: np.ndarray, fmt: str, b: int) -> np.ndarray:
    """Values -> packed uint8 array of ceil(n * b / 8) bytes."""
    codes = encode(values, fmt, b)
    per = 8 // b
    n = codes.size
    padded = np.zeros(((n + per - 1) // per) * per, np.uint8)
    padded[:n] = codes
    padded = padded.reshape(-1, per).astype(np.uint16)
    out = np.zeros(len(padded), np.uint16)
    for j in range(per):
        out |= padded[:, j] << (b * j)
    return out.astype(np.uint8)


def unpack(packed: np.ndarray, n: int, fmt: str, b: int) -> np.ndarray:
    per = 8 // b
    p = np.asarray(packed, np.int64)
    codes = np.stack([(p >> (b * j)) & ((1 << b) - 1) for j in range(per)], 1).ravel()[:n]
    return decode(codes, fmt, b)


def _te_product(x, packed, flat, fmt: str, b: int):
    """x * w(flat) in int32 with w decoded from the packed bytes (TIR expression)."""
    from tvm import tirx
    per = 8 // b
    mask = (1 << b) - 1
    byte = packed[flat // per].astype("int32")
    # Constant shifts chosen by the element's slot: a shift *by* an index-derived amount would
    # make Relax's int64 index normalisation widen the whole product to int64 (slow on a
    # 32-bit core).
    pos = flat % per
    f = byte & mask
    for j in range(1, per):
        f = tirx.Select(pos == j, (byte >> (j * b)) & mask, f)
    xi = x.astype("int32")
    if fmt == "pow2":
        # Branch-free, shifts and logic only: nz = (mag != 0); v = (x << (mag - 1)) & -nz;
        # the sign bit s negates by (v ^ -s) + s.  (gcc defines << of negative ints as the
        # two's complement shift.)
        zero = tirx.const(0, "int32")
        mag = f & 7
        nz = (mag + 7) >> 3
        v = (xi << (mag - nz)) & (zero - nz)
        s = f >> 3
        return (v ^ (zero - s)) + s
    w = f - ((f >> (b - 1)) << b)
    return xi * w


def packed_conv(bb, x, qm: QuantModel, op: Op, bias: np.ndarray):
    """int32 conv accumulator (bias included) reading packed weights; zero-padded with zp."""
    from tvm import te, tirx

    from .to_relax import _const
    a = op.attrs
    w = qm.param(op, "weight")
    fmt = a.get("weight_format", "int")
    b = slot_bits(op)
    o, cg, kh, kw = (int(d) for d in w.shape)
    g = int(a["groups"])
    og = o // g
    sh, sw = a["strides"]
    dh, dw = a["dilation"]
    pt, pl, _, _ = a["padding"]
    zp = qm.tensors[op.inputs[0]].zero_point
    out_shape = [int(d) for d in qm.tensors[op.output].shape]
    packed = pack(w, fmt, b)

    def compute(data, pw, bvec):
        n, c, h, wd = data.shape
        ic = te.reduce_axis((0, cg), "ic")
        ry = te.reduce_axis((0, kh), "ry")
        rx = te.reduce_axis((0, kw), "rx")

        def body(nn_, oc, yy, xx):
            iy = yy * sh + ry * dh - pt
            ix = xx * sw + rx * dw - pl
            ch = (oc // og) * cg + ic
            inside = tirx.all(iy >= 0, iy < h, ix >= 0, ix < wd)
            v = tirx.if_then_else(inside, data[nn_, ch, tirx.max(tirx.min(iy, h - 1), 0),
                                               tirx.max(tirx.min(ix, wd - 1), 0)],
                                  tirx.const(zp, data.dtype))
            flat = ((oc * cg + ic) * kh + ry) * kw + rx
            return te.sum(_te_product(v, pw, flat, fmt, b), axis=[ic, ry, rx])
        shape = [data.shape[0]] + out_shape[1:]
        acc = te.compute(shape, body, name="packed_conv")
        return te.compute(shape, lambda n_, oc, yy, xx: acc[n_, oc, yy, xx] + bvec[oc],
                          name="bias_add")
    # what the fast kernels (kernels/int8.py) need to take this conv over from the TE
    layout = {"kind": "conv", "bits": b, "format": fmt, "weight_shape": [o, cg, kh, kw],
              "groups": g, "strides": [int(sh), int(sw)], "dilation": [int(dh), int(dw)],
              "padding": [int(p) for p in a["padding"]], "pad_value": int(zp)}
    return bb.call_te(compute, x, _const(packed, "uint8"), _const(bias, "int32"),
                      primfunc_name_hint=f"packed{b}_{fmt}_conv2d",
                      primfunc_attrs={PACKED_ATTR: json.dumps(layout)})


def packed_dense(bb, x, qm: QuantModel, op: Op, bias: np.ndarray):
    from tvm import te

    from .to_relax import _const
    w = qm.param(op, "weight")
    fmt = op.attrs.get("weight_format", "int")
    b = slot_bits(op)
    o, k = (int(d) for d in w.shape)
    packed = pack(w, fmt, b)

    def compute(data, pw, bvec):
        rk = te.reduce_axis((0, k), "k")
        acc = te.compute([data.shape[0], o],
                         lambda i, j: te.sum(_te_product(data[i, rk], pw, j * k + rk, fmt, b),
                                             axis=rk), name="packed_dense")
        return te.compute([data.shape[0], o], lambda i, j: acc[i, j] + bvec[j], name="bias_add")
    layout = {"kind": "dense", "bits": b, "format": fmt, "weight_shape": [o, k], "groups": 1}
    return bb.call_te(compute, x, _const(packed, "uint8"), _const(bias, "int32"),
                      primfunc_name_hint=f"packed{b}_{fmt}_dense",
                      primfunc_attrs={PACKED_ATTR: json.dumps(layout)})
