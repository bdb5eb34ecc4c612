"""SIMD int8 kernels: Helium (MVE) for cores whose target lists the "mve-i" feature (Cortex-M55);
the same kernels with NEON inside for "neon" (Cortex-A, see simd_c's docstring).

Each layer becomes a TIR PrimFunc that only allocates its scratch (so the planner sees it) and
calls one C function of simd_c.SIMD_PRELUDE with the layer's shape as literals:

* conv (groups=1) / dense: the input is copied once into a zero-point-padded NHWC int8 scratch,
  so one output's reduction is a few contiguous runs (a kernel row = kw x C bytes); weights stay
  int8 in flash, OHWI, each run zero-padded to a multiple of 16 bytes. A tile is 4 neighbouring
  output pixels x Q output channels; every 16 bytes of a run cost one weight load per channel,
  one input load per pixel and 4 x Q VMLADAVA (16 MACs each). Where the runs are short (few input
  channels: a first layer) the tile's windows are first gathered into one contiguous patch; so
  are the taps an intra-kernel pattern keeps (taps zero in every filter are not gathered).
* depthwise: one padded int8 plane per channel, 4 outputs per vector lane group, VMLA by a weight
  held in a core register.
* requantization on 4 outputs at once (VMULH / VRMULH, see simd_c), else 64-bit per output.
Results are bit-exact with the integer reference (the same arithmetic, reordered sums of int32).
"""

from __future__ import annotations

import numpy as np

from .int8 import KERNEL_ATTR, OVERWRITES_INPUT, QLayer, _kept_taps, _shape, rnd_high_words

MVE_FEATURE = "mve-i"
# Cortex-A (AArch64 NEON) runs the same kernels: simd_c's EP_NEON branches (conv steps by
# SMULL + SADALP, the NHWC fill by 8x8 byte transposes); the arguments and layouts are the same.
SIMD_FEATURES = (MVE_FEATURE, "neon")


def wants_simd(layer: QLayer, features) -> bool:
    """This module's kernels (Helium, or NEON on Cortex-A) for an int8-input layer with int8
    weights (sub-byte weights take int8.py's kernel, which keeps them packed in flash)."""
    return any(f in SIMD_FEATURES for f in tuple(features or ())) and layer.x_dtype == "int8" \
        and layer.weight_bits == 8


def _requant(layer: QLayer, n_out: int | None = None):
    """Per-channel (bias, M, rnd, s), padded with zeros to n_out channels, and the C
    requantization mode: 1 VMULH, exact when every s >= 32 and rnd's low word is 0 (see
    simd_c; the quantizer's usual s >= 33), rnd then kept as its high word, else 0: 64-bit per
    output, rnd as the int32 halves of its int64 values (simd_c.ep_rnd)."""
    s = layer.shift.astype(np.int64)
    high = rnd_high_words(layer)
    mode = int(high is not None)
    pad = (n_out or len(s)) - len(s)
    consts = [np.pad(a, (0, pad)) for a in (layer.bias.astype(np.int32),
                                            layer.mult.astype(np.int32),
                                            layer.rnd.astype(np.int64) if high is None else high,
                                            s.astype(np.int32))]
    if not mode:
        consts[2] = consts[2].view(np.int32)    # the targets are little-endian, as numpy here
    return consts, mode


def _header(layer: QLayer, nw: int, o: int, tag: str, mode: int, nqp: int = 0,
            overwrites: bool = False, ntab: int = 0) -> list[str]:
    nrnd = o if mode else 2 * o   # see _requant
    qp = f'qp: T.Buffer(({nqp},), "int32"), ' if nqp else ""
    qp += f'tab: T.Buffer(({ntab},), "int32"), ' if ntab else ""
    extra = f', "{OVERWRITES_INPUT}": 1' if overwrites else ""
    return [
        "@T.prim_func(private=True)",
        f'def main(x: T.Buffer({_shape(layer.x_shape)}, "int8"), w: T.Buffer(({nw},), "int8"), '
        f'bias: T.Buffer(({o},), "int32"), mult: T.Buffer(({o},), "int32"), '
        f'rnd: T.Buffer(({nrnd},), "int32"), shift: T.Buffer(({o},), "int32"), {qp}'
        f'y: T.Buffer({_shape(layer.y_shape)}, "{layer.out_dtype}")):',
        f'    T.func_attr({{"tirx.noalias": True, "op_pattern": 8, "{KERNEL_ATTR}": "{tag}"'
        f'{extra}}})',
    ]


def _plane(layer: QLayer):
    """How the scratch is filled: (Hs, Ws, pt, pl, hi_n, wi_n, fh, fw, conv strides)."""
    _, _, h, w = layer.x_shape
    kh, kw = layer.weight.shape[2:]
    t, l, b, r = layer.padding
    if kh == kw == 1 and not any(layer.padding):  # copy only the pixels the strides visit
        oh, ow = layer.y_shape[2:]
        return oh, ow, 0, 0, oh, ow, layer.strides[0], layer.strides[1], (1, 1)
    return h + t + b, w + l + r, t, l, h, w, 1, 1, layer.strides


def _call(fn: str, layer: QLayer, xs: str, ints: list[int], qp: bool = False,
          tab: bool = False) -> str:
    suffix = "16" if layer.out_dtype == "int16" else "8"
    args = ", ".join(str(int(v)) for v in ints)
    tables = ("qp.data, " if qp else "") + ("tab.data, " if tab else "")
    return (f'    T.evaluate(T.call_extern("int32", "{fn}{suffix}", x.data, {xs}, w.data, bias.data, '
            f"mult.data, rnd.data, shift.data, {tables}y.data, {args}))")


def conv_kernel(layer: QLayer):
    """conv (groups=1) or dense -> (TVMScript, constants after the input)."""
    if layer.kind == "dense":
        n, c = layer.x_shape
        o = layer.weight.shape[0]
        w4 = layer.weight.reshape(o, c, 1, 1)
        h = wd = hs = ws = oh = ow = hi_n = wi_n = fh = fw = 1
        pt = pl = 0
        sh = sw = dh = dw = 1
    else:
        n, c, h, wd = layer.x_shape
        w4 = layer.weight
        o = w4.shape[0]
        oh, ow = layer.y_shape[2:]
        hs, ws, pt, pl, hi_n, wi_n, fh, fw, (sh, sw) = _plane(layer)
        dh, dw = layer.dilation
    kh, kw = w4.shape[2:]
    direct = int(hs == ws == 1 and h == wd == 1)  # a 1x1 NCHW image already is NHWC
    # Runs of one output's reduction in the NHWC scratch: kernel rows, or taps when dilated.
    if dw == 1:
        nsy, nsx, seg, offy, offx = kh, 1, kw * c, dh * ws * c, 0
    else:
        nsy, nsx, seg, offy, offx = kh, kw, c, dh * ws * c, dw * c
    k = kh * kw * c
    kept = None if layer.kind == "dense" or direct else _kept_taps(w4)
    if kept is not None:
        # Window taps zero in every filter (an intra-kernel pattern): the patch gathers only
        # the kept taps' C bytes each, from the offsets in `taps` (pnsx = -1 says so), and the
        # weights keep only theirs.
        rows, cols = (list(v) for v in zip(*kept))
        k = len(kept) * c
        wo = w4[:, :, rows, cols].transpose(0, 2, 1)
        taps = np.array([r * offy + q * dw * c for r, q in kept], np.int32)
        piece, patch = (c, len(kept), -1, 0, 0), True
    else:
        taps = np.zeros(1, np.int32)
        patch = -(-k // 16) < nsy * nsx * -(-seg // 16)
        wo = w4.transpose(0, 2, 3, 1).reshape(o, nsy, nsx, seg)  # OHWI, one run per row
        piece = (seg, nsy, nsx, offy, offx)
    if patch:  # the MAC loop sees one run per output: its k bytes, then bytes of no weight
        nsy, nsx, seg, offy, offx = 1, 1, -(-k // 16) * 16, 0, 0
        wo = np.pad(wo.reshape(o, 1, 1, k), ((0, 0), (0, 0), (0, 0), (0, seg - k)))
    segp = -(-seg // 16) * 16
    # Tiles of 4 outputs: 2 channels x 2 pixels, or 4 channels of a lone pixel.
    g = 4 if oh * ow == 1 else 2
    ng = -(-o // g)
    consts, mode = _requant(layer, ng * g)
    # Weights in the order a tile reads them: [group][run][16-byte step][channel][16].
    wpad = np.zeros((ng * g, nsy, nsx, segp), np.int8)
    wpad[:o, ..., :seg] = wo
    wpad = wpad.reshape(ng, g, nsy, nsx, segp // 16, 16).transpose(0, 2, 3, 4, 1, 5)
    # Per group, per lane (pixel * g + channel): M, rnd >> 32, -(s - 32).
    _, m, rnd, sft = consts
    lanes = (np.arange(ng)[:, None] * g + np.arange(4)[None, :] % g)
    t = np.maximum(sft.astype(np.int64) - 32, 0)  # (padding channels: s = 0, never stored)
    radd, zp = (rnd.astype(np.int64) if mode else rnd.view(np.int64) >> 32), layer.zp_out
    # ((h + radd) >> t) + zp == (h + radd + (zp << t)) >> t: one vector add less, if it fits
    # (|h| <= 2^30, see simd_c); mode 2 tells the vector code (the portable C adds zp itself).
    if mode == 1 and np.all(np.abs(radd + (zp << t)) < 2 ** 30):
        radd, mode = radd + (zp << t), 2
    qp = np.stack([m[lanes], radd[lanes], -t[lanes]], 1)
    scratch = 0 if direct else hs * ws * c
    patch_off = -1
    if patch:
        patch_off = -(-scratch // 16) * 16
        scratch = patch_off + (4 // g) * segp
    # one image copied whole into the NHWC scratch before any output: in place is safe
    L = _header(layer, wpad.size, ng * g, layer.kind, mode, qp.size,
                overwrites=not direct and n == 1, ntab=taps.size)
    xs = "x.data"
    if scratch:
        L.append(f'    xs = T.alloc_buffer(({scratch},), "int8")')
        xs = "xs.data"
    # mode | 4: no weight is -128 (NEON sums two products in int16; Helium ignores the bit)
    w127 = 4 * int(wpad.min(initial=0) > -128)
    ints = [n, c, h, wd, hi_n, wi_n, hs, ws, pt, pl, layer.pad_value, fh, fw, direct, patch_off,
            oh, ow, o, sh, sw, nsy, nsx, offy, offx, seg, *piece, mode | w127, zp,
            layer.lo, layer.hi, g]
    L.append(_call("ep_simd_conv", layer, xs, ints, qp=True, tab=True))
    return "\n".join(L), [np.ascontiguousarray(wpad).reshape(-1)] + consts \
        + [qp.astype(np.int32).reshape(-1), taps]


def _dw_shape(layer: QLayer) -> tuple[list[int], list[int], dict]:
    """What every depthwise C function takes around its `mode`: the shape arguments before it,
    the output clamp after it, and the sizes the generators need."""
    n, c, h, wd = layer.x_shape
    o, _, kh, kw = layer.weight.shape
    oh, ow = layer.y_shape[2:]
    hs, ws, pt, pl, hi_n, wi_n, fh, fw, (sh, sw) = _plane(layer)
    dh, dw = layer.dilation
    head = [n, c, h, wd, hi_n, wi_n, hs, ws, pt, pl, layer.pad_value, fh, fw, oh, ow, kh, kw,
            sh, sw, dh, dw]
    return head, [layer.zp_out, layer.lo, layer.hi], dict(c=c, o=o, kh=kh, kw=kw, oh=oh, ow=ow,
                                                          hs=hs, ws=ws, sh=sh, sw=sw)


def depthwise_kernel(layer: QLayer):
    consts, mode = _requant(layer)
    head, clamp, d = _dw_shape(layer)
    o, kh, kw, oh, ow, hs, ws, sh, sw = (d[k] for k in ("o", "kh", "kw", "oh", "ow", "hs", "ws",
                                                        "sh", "sw"))
    # Per output (NCHW order, in tiles of 8, the last one repeated): its window's corner in the
    # channel's padded plane, the gather offsets of the tiles' lanes.
    j = np.minimum(np.arange(-(-oh * ow // 8) * 8), oh * ow - 1)
    po = ((j // ow) * sh * ws + (j % ow) * sw).astype(np.int32)
    L = _header(layer, o * kh * kw, o, "depthwise", mode, po.size)
    L.append(f'    xs = T.alloc_buffer(({hs * ws},), "int8")')
    L.append(_call("ep_simd_dw", layer, "xs.data", head + [mode] + clamp, qp=True))
    return "\n".join(L), [layer.weight.reshape(-1).astype(np.int8)] + consts + [po]


def neon_depthwise_kernel(layer: QLayer):
    """depthwise on Cortex-A. Channels a multiple of 16, vector requantization (mode 1), int8
    out, no -128 weight: channels in lanes on the NHWC scratch (simd_c.ep_simd_neon_dwc, weights
    [C / 16][tap][16]); else simd_c.ep_simd_neon_dw: per channel a padded plane as above, tiles of
    8 outputs of a row, contiguous 8- or 16-byte loads per tap."""
    consts, mode = _requant(layer)
    head, clamp, d = _dw_shape(layer)
    c, o, kh, kw, hs, ws, sw = (d[k] for k in ("c", "o", "kh", "kw", "hs", "ws", "sw"))
    if (c % 16 == 0 and o == c and mode == 1 and layer.out_dtype == "int8"
            and layer.weight.min() > -128):  # channels in lanes (ep_simd_neon_dwc)
        wc = layer.weight.reshape(c // 16, 16, kh * kw).transpose(0, 2, 1)
        L = _header(layer, o * kh * kw, o, "depthwise", mode)
        L.append(f'    xs = T.alloc_buffer(({hs * ws * c},), "int8")')
        args = ", ".join(str(int(v)) for v in head + clamp)
        L.append('    T.evaluate(T.call_extern("int32", "ep_simd_neon_dwc8", x.data, xs.data, w.data, '
                 f"bias.data, mult.data, rnd.data, shift.data, y.data, {args}))")
        return "\n".join(L), [np.ascontiguousarray(wc).reshape(-1).astype(np.int8)] + consts
    # A tile reads at most 8 * sw bytes past its last output's window: slack past the plane.
    scratch = hs * ws + 8 * sw + 16
    L = _header(layer, o * kh * kw, o, "depthwise", mode)
    L.append(f'    xs = T.alloc_buffer(({scratch},), "int8")')
    L.append(_call("ep_simd_neon_dw", layer, "xs.data", head + [mode] + clamp))
    return "\n".join(L), [layer.weight.reshape(-1).astype(np.int8)] + consts


def simd_kernel(layer: QLayer, features):
    """(TVMScript, constants) of a layer wants_simd accepted, for Helium or NEON."""
    if layer.kind != "depthwise":
        return conv_kernel(layer)
    if MVE_FEATURE in tuple(features or ()):
        return depthwise_kernel(layer)
    return neon_depthwise_kernel(layer)


def add_source(shape, a_t: str, b_t: str, out_dtype: str, mults, rnd: int, sh: int, zp: int,
               lo: int, hi: int) -> str | None:
    """The requantized residual add clamp(zp + ((a * Ma + b * Mb + rnd) >> sh)) on 4 lanes of
    int32 (simd_c's ep_simd_add), or None where that is not exact: int8 inputs, sh >= 16."""
    if (a_t, b_t) != ("int8", "int8") or sh < 16 or abs(rnd >> 16) >= 2 ** 29:
        return None
    size = int(np.prod(shape))
    ma, mb = (int(m) for m in mults)
    ints = [size, ma >> 16, ma & 0xFFFF, mb >> 16, mb & 0xFFFF, rnd >> 16, rnd & 0xFFFF, sh - 16,
            zp, lo, hi]
    suffix = "16" if out_dtype == "int16" else "8"
    return "\n".join([
        "@T.prim_func(private=True)",
        f'def main(a: T.Buffer({_shape(shape)}, "int8"), b: T.Buffer({_shape(shape)}, "int8"), '
        f'm: T.Buffer((2,), "int32"), y: T.Buffer({_shape(shape)}, "{out_dtype}")):',
        f'    T.func_attr({{"tirx.noalias": True, "op_pattern": 8, "{KERNEL_ATTR}": "add"}})',
        f'    T.evaluate(T.call_extern("int32", "ep_simd_add{suffix}", a.data, b.data, y.data, '
        + ", ".join(str(v) for v in ints) + "))"])
