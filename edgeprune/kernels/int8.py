"""Shape-specialized int8 conv / depthwise / dense kernels for microcontrollers.

The quantizer's Relax graph (quantize/to_relax.py) spells a quantized layer as a chain:
  [nn.pad(x, zp)] -> conv2d|matmul(int8, const int8 w, out int32) -> add(const bias)
  -> astype(int64) -> multiply(M) -> add(rnd) -> right_shift(s) -> add(zp_out) -> clip -> astype
TVM's default lowering of that chain runs at ~5 instructions per MAC on a Cortex-M7.
`specialize_int8` replaces each such chain by one `call_tir` to a PrimFunc written here for
the layer's exact shape, with its weights repacked at build time:

* conv (groups=1) and dense (= 1x1 conv on a 1x1 image): the input is copied into a
  scratch of int32 words, each holding two input channels as signed 16-bit halves, padded
  with the zero point (so the MAC loop has no bounds checks); one band of rows at a time
  (BAND_PIXELS outputs), so the scratch is a few rows, not twice the image. Weights stay int8 in flash,
  one word holding the same channel pair of two output channels (bytes 0,2 and 1,3: the
  lanes of SXTB16 and SXTB16 ROR #8); per block of OC_BLOCK output channels they are widened
  once into a small int16-pair scratch (in the MAC loop the unpacking would spill registers).
  A tile keeps OC_BLOCK channels x PX_BLOCK
  neighbouring pixels (8 sums) in registers, unrolls the kernel window, and does two MACs per
  `ep_smlad` (SMLAD on cores with the DSP extension, portable C elsewhere; see C_PRELUDE).
  Where pairing channels wastes half the SMLADs (one input channel, e.g. a grey image or a
  spectrogram) the words pair two neighbouring taps of a row instead. Window taps zero in
  every filter, and channel pairs zero in every filter of a block (prune/patterns.py), are
  neither stored nor multiplied.
  Measured on the M7 (issue 9 layers L7/L2, instr/MAC): 8x1 1.13/1.26, 4x2 0.90/1.02,
  2x4 1.11/1.24, 4x3 1.12/1.29, 3x3 1.05/1.36.
* depthwise (groups = channels = outputs): per channel, a zero-point-padded int16 copy of the
  plane; tiles of DW_PX_BLOCK outputs of a row share each weight load; on cores with the DSP
  extension two horizontal taps per SMLAD (one unaligned word load), else scalar MLA.
* conv on 64-bit cores without SIMD ("xlen64": riscv64): two neighbouring pixels' inputs as
  the 32-bit lanes of one int64, so one multiply by a weight does both pixels' MACs
  (_pair_lane_conv_kernel).
* cores with Helium ("mve-i" in the target's features, Cortex-M55) get the MVE kernels of
  simd.py instead for int8 inputs; so do Cortex-A cores ("neon"), in their NEON form.
* sub-byte convs (groups 1) and dense layers (4/2-bit two's-complement, ternary or
  power-of-two codes; quantize/packing.py): the same kernel on every core, with the codes packed 32 / 4b int8
  words to a word in flash and widened per channel block (ep_widen_sub) into the same int16
  pairs, or decoded inline (ep_sub_pair) where a tile has one pixel and each weight is used
  once. The MAC loop is unchanged: on the M7, ResNet-8's layer1.conv1 takes 1.81 M
  instructions at 4 bits, 1.80 M at 8 (TVM's lowering of the packed TE conv: 27.9 M); a
  784x128 dense 469 k at 4 bits, 203 k at 8 (TE: 1.26 M). A sub-byte depthwise conv keeps
  each channel's codes in whole words and decodes them once per channel (ep_dw_codes).
* requantization is fused per output (C helpers ep_requant_h32 / ep_requant_hi / ep_requant):
  acc*M + rnd in one 64-bit multiply-accumulate; when every channel's shift is >= 32 only the
  high word is kept (exact: floor division composes), then SSAT. When rnd's low word is 0 as
  well (every shift >= 33 and no offset below 2^32: the usual case), flash keeps rnd >> 32 as
  int32 (4 bytes per channel instead of 8; a depthwise channel's 3x3 weights take 9).
* requantized residual add (to_relax._add): one pass, two 64-bit multiply-accumulates per
  element, when the shifted sum provably fits 32 bits (then SSAT).
* max pooling (maxpool_kernel): the window's rows, then its columns, through a padded row
  buffer; four int8 lanes a word (SSUB8 + SEL) on cores with the DSP extension.
Inputs may be int8 or int16 (both fit SMLAD's 16-bit halves), outputs int8 or int16. Anything
else (grouped convs with a channel multiplier, other layouts) keeps TVM's lowering.
"""

from __future__ import annotations

import functools
from contextvars import ContextVar
from dataclasses import dataclass

import numpy as np

# A conv tile keeps OC_BLOCK x PX_BLOCK sums in registers (Cortex-M has 13 usable): per kernel
# tap it loads PX_BLOCK input words and OC_BLOCK weight words for OC_BLOCK*PX_BLOCK SMLADs.
OC_BLOCK, PX_BLOCK = 4, 2
# Without SMLAD (RISC-V) each MAC is a multiply and an add of two loaded halves: 2 channels x 4
# pixels measured fastest on most of ResNet-8's convs on riscv32 (`edgeprune tune`)
ROW_TILE_WITHOUT_DSP = (2, 4)
BAND_PIXELS = 128  # conv scratch: the input rows of about this many outputs (see _conv_kernel)
BAND_PIXELS_1X1 = 32  # 1x1 windows refill no overlapping rows: shorter bands cost less
DW_PX_BLOCK = 4  # depthwise: outputs of one row computed together (weights loaded once)

# Prepended to the kernels' C file when a kernel uses ep_smlad. TVM's codegen declares the
# extern itself afterwards; a later declaration without `static` keeps the internal linkage.
C_PRELUDE = """\
/* edgeprune int8 kernels: two 16x16-bit multiply-accumulates per call. */
#include <stdint.h>
#if (defined(__ARM_FEATURE_DSP) && __ARM_FEATURE_DSP) || (defined(__ARM_FEATURE_SAT) && __ARM_FEATURE_SAT)
#include <arm_acle.h>
#endif
#if defined(__ARM_FEATURE_DSP) && __ARM_FEATURE_DSP
static inline int32_t ep_smlad(int32_t a, int32_t b, int32_t acc) { return __smlad(a, b, acc); }
/* Weights are int8 in flash: bytes 0,2 (ep_sxtb16) and 1,3 (ep_sxtb16_ror8) of a word,
   sign-extended into two 16-bit halves, as SXTB16 / SXTB16 ROR #8 do. */
static inline int32_t ep_sxtb16(int32_t w) { return __sxtb16(w); }
static inline int32_t ep_sxtb16_ror8(int32_t w) {  /* GCC 12 won't fold a rotate into SXTB16 */
  int32_t r;
  __asm__("sxtb16 %0, %1, ror #8" : "=r"(r) : "r"(w));
  return r;
}
#else
static inline int32_t ep_smlad(int32_t a, int32_t b, int32_t acc) {
  return (int32_t)((uint32_t)acc + (uint32_t)((int16_t)a * (int16_t)b)
                   + (uint32_t)((a >> 16) * (b >> 16)));
}
static inline int32_t ep_sxtb16(int32_t w) {
  return (int32_t)(((uint32_t)(int32_t)(int8_t)w & 0xFFFFu) | ((uint32_t)(int8_t)(w >> 16) << 16));
}
static inline int32_t ep_sxtb16_ror8(int32_t w) { return ep_sxtb16(w >> 8); }
#endif
/* ep_smlad on two words in memory. Without SMLAD, two sign-extending halfword loads per
   operand are cheaper than extracting the halves of a loaded word (in the unrolled tiles GCC
   spills the extracted halves). */
typedef int16_t __attribute__((may_alias)) ep_i16;
static inline int32_t ep_mac2(int32_t *a, int32_t *b, int32_t acc) {
#if defined(__ARM_FEATURE_DSP) && __ARM_FEATURE_DSP
  return __smlad(*a, *b, acc);
#else
  const ep_i16 *x = (const ep_i16 *)a, *y = (const ep_i16 *)b;
  return (int32_t)((uint32_t)acc + (uint32_t)(x[0] * y[0]) + (uint32_t)(x[1] * y[1]));
#endif
}
/* Without SMLAD, one output channel's pair of int8 weights read where they lie in its weight
   word (bytes k and k + 2 of the word at w, k = 0 or 1) with sign-extending byte loads,
   against the int16 pair of x at a: a one-pixel tile (a dense layer) uses each weight once,
   and extracting the halves (SXTB16 in C) took RISC-V 13 instructions a MAC. */
static inline int32_t ep_mac2_b(int32_t *a, int32_t *w, int32_t k, int32_t acc) {
  const ep_i16 *x = (const ep_i16 *)a;
  const int8_t *b = (const int8_t *)w + k;
  return (int32_t)((uint32_t)acc + (uint32_t)(x[0] * b[0]) + (uint32_t)(x[1] * b[2]));
}
/* Widen n words of int8 weight pairs into 2n int16-pair words (SXTB16, SXTB16 ROR #8). One
   small shared copy: written as a loop in each kernel, GCC unrolled it into ~0.5 KB of flash
   per conv, for a loop that runs once per output-channel block. */
__attribute__((noinline, unused, optimize("no-unroll-loops"))) static int32_t ep_widen(
    int32_t *w, int32_t *wu, int32_t n) {  /* TVM declares it without const */
  for (; n >= 2; n -= 2, w += 2, wu += 4) {  /* two words a step: LDRD, STRD x2 */
    int32_t a = w[0], b = w[1];
    wu[0] = ep_sxtb16(a), wu[1] = ep_sxtb16_ror8(a), wu[2] = ep_sxtb16(b), wu[3] = ep_sxtb16_ror8(b);
  }
  if (n) wu[0] = ep_sxtb16(w[0]), wu[1] = ep_sxtb16_ror8(w[0]);
  return 0;
}
/* The weight a b-bit code in the low bits of c stands for (quantize/packing.py): its two's
   complement, or with `pow2` (4 bits) sign << 3 | (k + 1) for +-2**k and 0 for 0. */
static inline int32_t ep_code(uint32_t c, int32_t b, int32_t pow2) {
  if (pow2) {
    int32_t m = (int32_t)(c & 7u), v = m ? 1 << (m - 1) : 0;
    return (c & 8u) ? -v : v;
  }
  return (int32_t)(c << (32 - b)) >> (32 - b);
}
/* ep_widen for b-bit (4 or 2) weight codes: n words of four lanes packed 32 / 4b to a word,
   lowest bits first (int8._pack_lanes), into the same int16-pair words as ep_widen. */
__attribute__((noinline, unused, optimize("no-unroll-loops"))) static int32_t ep_widen_sub(
    int32_t *w, int32_t *wu, int32_t n, int32_t b, int32_t pow2) {
  const int32_t per = 32 / (4 * b);
  for (int32_t i = 0; i < n; i += per, w++) {
    uint32_t v = (uint32_t)*w;
    for (int32_t j = 0; j < per && i + j < n; j++, wu += 2) {
      int32_t l0 = ep_code(v, b, pow2), l1 = ep_code(v >> b, b, pow2);
      int32_t l2 = ep_code(v >> 2 * b, b, pow2), l3 = ep_code(v >> 3 * b, b, pow2);
      wu[0] = (int32_t)(((uint32_t)l0 & 0xFFFFu) | ((uint32_t)l2 << 16));
      wu[1] = (int32_t)(((uint32_t)l1 & 0xFFFFu) | ((uint32_t)l3 << 16));
      v >>= 4 * b;
    }
  }
  return 0;
}
/* Depthwise: one channel's m b-bit codes (lowest bits first) -> wl: with `pairs`, int16 pairs
   (value 2k in the low half of word k), else one value per word. */
__attribute__((noinline, unused, optimize("no-unroll-loops"))) static int32_t ep_dw_codes(
    int32_t *w, int32_t *wl, int32_t m, int32_t b, int32_t pairs, int32_t pow2) {
  const int32_t per = 32 / b;
  for (int32_t k = 0; k < m; k++) {
    int32_t v = ep_code((uint32_t)w[k / per] >> (b * (k % per)), b, pow2);
    if (!pairs) wl[k] = v;
    else if (k & 1) wl[k >> 1] = (int32_t)(((uint32_t)wl[k >> 1] & 0xFFFFu) | ((uint32_t)v << 16));
    else wl[k >> 1] = v & 0xFFFF;
  }
  return 0;
}
/* The int16 pair of one output channel from a packed word (as ep_widen_sub): the b-bit
   codes at bit `off` and `off + 2b`. */
static inline int32_t ep_sub_pair(int32_t w, int32_t off, int32_t b, int32_t pow2) {
  int32_t lo = ep_code((uint32_t)w >> off, b, pow2);
  int32_t hi = ep_code((uint32_t)w >> (off + 2 * b), b, pow2);
  return (int32_t)(((uint32_t)lo & 0xFFFFu) | ((uint32_t)hi << 16));
}
/* Two neighbouring int16 values as one word, p[0] in the low half (one LDR; v7-M and later
   allow it unaligned): a pair of horizontal taps of a depthwise plane for ep_smlad. */
static inline int32_t ep_ld2(int16_t *p) {
  int32_t v;
  __builtin_memcpy(&v, p, 4);
  return v;
}
/* Four int8 lanes as one word, and back (v7-M and later allow both unaligned). */
static inline int32_t ep_ld4(int8_t *p) {
  int32_t v;
  __builtin_memcpy(&v, p, 4);
  return v;
}
static inline int32_t ep_st4(int8_t *p, int32_t v) {
  __builtin_memcpy(p, &v, 4);
  return 0;
}
/* The signed max of each of four int8 lanes: SSUB8 sets a lane's GE bit where a >= b, SEL
   takes those lanes from a and the rest from b (one asm: GCC does not track the GE bits). */
static inline int32_t ep_max4(int32_t a, int32_t b) {
#if defined(__ARM_FEATURE_DSP) && __ARM_FEATURE_DSP
  int32_t r;
  __asm__("ssub8 %0, %1, %2\\n\\tsel %0, %1, %2" : "=&r"(r) : "r"(a), "r"(b));
  return r;
#else
  uint32_t r = 0;
  for (int k = 0; k < 32; k += 8) {
    int8_t x = (int8_t)(a >> k), y = (int8_t)(b >> k);
    r |= (uint32_t)(uint8_t)(x > y ? x : y) << k;
  }
  return (int32_t)r;
#endif
}
/* clamp(v, lo, hi); one SSAT when [lo, hi] is the whole int8/int16 range. */
static inline int32_t ep_clamp(int32_t v, int32_t lo, int32_t hi) {
#if defined(__ARM_FEATURE_SAT) && __ARM_FEATURE_SAT
  if (lo == -128 && hi == 127) return __ssat(v, 8);
  if (lo == -32768 && hi == 32767) return __ssat(v, 16);
#endif
  v = v < lo ? lo : v;
  return v > hi ? hi : v;
}
/* clamp(zp + ((acc * m + rnd) >> (sh + 32)), lo, hi): the high word of one 64-bit
   multiply-accumulate (SMLAL), for total shifts >= 32. */
static inline int32_t ep_requant_hi(int32_t acc, int32_t m, int64_t rnd, int32_t sh, int32_t zp,
                                    int32_t lo, int32_t hi) {
  return ep_clamp(((int32_t)(((int64_t)acc * m + rnd) >> 32) >> sh) + zp, lo, hi);
}
/* The same when rnd's low word is 0, given rh = rnd >> 32: (acc * m + rh * 2^32) >> 32 is
   (acc * m >> 32) + rh exactly (SMMUL, ADD); |rh| < 2^29 keeps the sum within 32 bits. */
static inline int32_t ep_requant_h32(int32_t acc, int32_t m, int32_t rh, int32_t sh, int32_t zp,
                                     int32_t lo, int32_t hi) {
  return ep_clamp((((int32_t)(((int64_t)acc * m) >> 32) + rh) >> sh) + zp, lo, hi);
}
/* Requantized residual add: clamp(zp + ((a * ma + b * mb + rnd) >> sh), lo, hi), two 64-bit
   multiply-accumulates; the generator checks that the shifted sum fits 32 bits. */
static inline int32_t ep_requant_add(int32_t a, int32_t ma, int32_t b, int32_t mb, int64_t rnd,
                                     int32_t sh, int32_t zp, int32_t lo, int32_t hi) {
  return ep_clamp((int32_t)(((int64_t)a * ma + (int64_t)b * mb + rnd) >> sh) + zp, lo, hi);
}
/* The same for any total shift in [1, 62], in 64 bits. */
static inline int32_t ep_requant(int32_t acc, int32_t m, int64_t rnd, int32_t sh, int32_t zp,
                                 int32_t lo, int32_t hi) {
  int64_t v = (((int64_t)acc * m + rnd) >> sh) + zp;
  return (int32_t)(v < lo ? lo : v > hi ? hi : v);
}
"""

KERNEL_ATTR = "edgeprune.kernel"

# Set by the tuner (kernels/tune.py) around one lowering: the (oc_block, px_block) tile per
# layer key, and a dict that receives kernel name -> layer key as the kernels are made.
TUNED_TILES: ContextVar[dict] = ContextVar("edgeprune_tuned_tiles", default={})
KERNEL_LAYERS: ContextVar[dict | None] = ContextVar("edgeprune_kernel_layers", default=None)
# Every kernel here is marked opaque (op_pattern 8) so that FuseOps keeps it a call of its own.
PRELUDE_FUNCS = ("ep_smlad", "ep_mac2", "ep_sxtb16", "ep_requant", "ep_clamp", "ep_sub_pair",
                 "ep_ld4")


def with_prelude(c_source: str) -> str:
    """The kernels' C file, with C_PRELUDE in front when a kernel calls one of its helpers
    (and the Helium kernels of simd_c when one calls those)."""
    from .simd_c import SIMD_PRELUDE
    if "ep_simd_" in c_source:
        return C_PRELUDE + SIMD_PRELUDE + c_source
    return C_PRELUDE + c_source if any(f in c_source for f in PRELUDE_FUNCS) else c_source


@dataclass
class QLayer:
    """One quantized conv/dense layer, NCHW, as read off the Relax chain."""
    kind: str                 # "conv" | "depthwise" | "dense"
    x_shape: tuple            # input (unpadded) shape
    y_shape: tuple
    out_dtype: str
    weight: np.ndarray        # int8, (O, I, KH, KW) or (O, K)
    bias: np.ndarray          # int32 (O,)
    mult: np.ndarray          # int64 (O,)
    rnd: np.ndarray           # int64 (O,)
    shift: np.ndarray         # int64 (O,) total right shift s
    zp_out: int
    lo: int
    hi: int
    x_dtype: str = "int8"
    strides: tuple = (1, 1)
    dilation: tuple = (1, 1)
    padding: tuple = (0, 0, 0, 0)  # top, left, bottom, right
    pad_value: int = 0
    weight_bits: int = 8      # 4 / 2: the flash keeps b-bit codes (_pack_lanes)
    weight_format: str = "int"  # of the codes: "int" / "ternary" (two's complement), "pow2"


def _tiled(layer: QLayer, features) -> bool:
    """Whether the layer's kernel is the SMLAD conv/dense whose register tile the tuner picks."""
    from .simd import wants_simd
    return layer.kind in ("conv", "dense") and not wants_simd(layer, features) \
        and not _pair_lanes(layer, features)


def layer_key(layer: QLayer) -> str:
    """What a conv/dense kernel's speed depends on (shapes, not weight values): the tuner's key."""
    parts = [layer.kind, f"x{_shape(layer.x_shape)}", f"w{_shape(layer.weight.shape)}",
             f"y{_shape(layer.y_shape)}", f"s{_shape(layer.strides)}", f"d{_shape(layer.dilation)}",
             f"p{_shape(layer.padding)}", f"{layer.x_dtype}->{layer.out_dtype}"]
    if layer.weight_bits != 8:
        parts.append(f"w{layer.weight_bits}b{layer.weight_format}")
    return "|".join(parts).replace(" ", "")


# --------------------------------------------------------------------------------------------
# Relax side: find the chains, repack constants, swap in call_tir.

def _op(value) -> str | None:
    return getattr(getattr(value, "op", None), "name", None)


def _const(expr):
    import tvm
    return expr.value.numpy() if isinstance(expr, tvm.ir.GenericConst) else None


def _per_channel(arr, o: int, dtype) -> np.ndarray | None:
    a = np.asarray(arr)
    if a.size == 1:
        return np.full(o, a.reshape(()), dtype)
    if a.size == o:
        return a.reshape(o).astype(dtype)
    return None


def _uses(func) -> dict:
    from tvm import relax
    count: dict = {}

    def visit(e):
        if isinstance(e, relax.Var):
            count[e] = count.get(e, 0) + 1
        elif isinstance(e, relax.Tuple):
            for f in e.fields:
                visit(f)
        elif hasattr(e, "args") and hasattr(e, "op"):
            for a in e.args:
                visit(a)
    for block in func.body.blocks:
        for b in block.bindings:
            visit(b.value)
    visit(func.body.body)
    return count


def _match(end, defs: dict, uses: dict, mod=None) -> tuple[QLayer, object] | None:
    """The chain ending in binding var `end`, or None. Returns (layer, unpadded input var).
    With `mod`, a sub-byte conv or dense (quantize/packing.py's TE kernel, bias included) is
    a core too."""
    def producer(var, op_name, n_uses=1):
        v = defs.get(var)
        if v is None or _op(v) != op_name or uses.get(var, 0) != n_uses:
            return None
        return v

    last = defs.get(end)
    if _op(last) != "relax.astype" or str(last.attrs.dtype) not in ("int8", "int16"):
        return None
    steps = {}
    var = last.args[0]
    for name in ("relax.clip", "relax.add", "relax.right_shift", "relax.add", "relax.multiply",
                 "relax.astype"):
        v = producer(var, name)
        if v is None:
            return None
        steps.setdefault(name, []).append(v)
        var = v.args[0]
    clip = steps["relax.clip"][0]
    add_zp, add_rnd = steps["relax.add"]
    if str(steps["relax.astype"][0].attrs.dtype) != "int64":
        return None
    consts = [_const(a.args[1]) for a in (steps["relax.multiply"][0], add_rnd,
                                         steps["relax.right_shift"][0], add_zp)]
    if any(c is None for c in consts):
        return None
    add_bias = producer(var, "relax.add")
    if add_bias is None:
        return _match_packed(defs.get(var), uses.get(var, 0), mod, consts, clip, end)
    var = add_bias.args[0]
    core = defs.get(var)
    if uses.get(var, 0) != 1 or _op(core) not in ("relax.nn.conv2d", "relax.matmul"):
        return None
    x = core.args[0]
    w = _const(core.args[1])
    bias = _const(add_bias.args[1])
    if w is None or w.dtype != np.int8 or bias is None:
        return None
    x_dtype = str(x.ty.dtype)
    if x_dtype not in ("int8", "int16"):  # 16-bit activations fit SMLAD's halves as well
        return None
    x_shape = tuple(int(d.value) for d in x.ty.shape.values)
    if _op(core) == "relax.matmul":
        if len(x_shape) != 2 or w.ndim != 2 or str(core.attrs.out_dtype) != "int32":
            return None
        weight, kind, extra = np.ascontiguousarray(w.T), "dense", {}
    else:
        a = core.attrs
        if (str(a.data_layout), str(a.kernel_layout), str(a.out_layout)) != ("NCHW", "OIHW", "NCHW") \
                or str(a.out_dtype) != "int32":
            return None
        o, groups, c = w.shape[0], int(a.groups), x_shape[1]
        if groups == 1:
            kind = "conv"
        elif groups == c == o and w.shape[1] == 1:
            kind = "depthwise"
        else:
            return None
        weight = w
        t, l, b, r = (int(p) for p in a.padding)
        extra = {"strides": tuple(int(s) for s in a.strides),
                 "dilation": tuple(int(d) for d in a.dilation),
                 "padding": (t, l, b, r), "pad_value": 0}
        pad = defs.get(x)
        # Fold an explicit zero-point pad (H/W only) into the kernel.
        if _op(pad) == "relax.nn.pad" and uses.get(x, 0) == 1 and not any(extra["padding"]):
            pw = [int(p) for p in pad.attrs.pad_width]
            pv = float(pad.attrs.pad_value)
            if len(pw) == 8 and not any(pw[:4]) and str(pad.attrs.pad_mode) == "constant" \
                    and pv == int(pv) and -128 <= pv <= 127:
                x = pad.args[0]
                x_shape = tuple(int(d.value) for d in x.ty.shape.values)
                extra["padding"] = (pw[4], pw[6], pw[5], pw[7])
                extra["pad_value"] = int(pv)
    layer = _layer(kind, x_shape, end, weight, bias, consts, clip, x_dtype, extra)
    return (layer, x) if layer else None


def _layer(kind, x_shape, end, weight, bias, consts, clip, x_dtype, extra) -> QLayer | None:
    """The QLayer of a matched chain, if its requantization constants suit the kernels."""
    mult, rnd, shift, zp = consts
    if zp.size != 1:
        return None
    o = weight.shape[0]
    per = [_per_channel(v, o, dt) for v, dt in ((bias, np.int32), (mult, np.int64),
                                                 (rnd, np.int64), (shift, np.int64))]
    if any(p is None for p in per) or np.any(per[1] < 0) or np.any(per[1] >= 2 ** 31) \
            or np.any((per[3] < 1) | (per[3] > 62)):  # M must fit SMLAL's int32, s a shift
        return None
    lo, hi = (int(v.value) for v in clip.args[1:3])
    y_shape = tuple(int(d.value) for d in end.ty.shape.values)
    return QLayer(kind, x_shape, y_shape, str(end.ty.dtype), weight, *per,
                  int(zp.reshape(())), lo, hi, x_dtype, **extra)


def _match_packed(core, n_uses: int, mod, consts, clip, end) -> tuple[QLayer, object] | None:
    """A sub-byte conv (groups 1), depthwise conv or dense layer (any code format) whose TE
    kernel quantize/packing.py made: decoded here, repacked by _conv_kernel /
    _depthwise_kernel."""
    import json

    from ..quantize.packing import PACKED_ATTR, unpack
    if mod is None or n_uses != 1 or _op(core) != "relax.call_tir":
        return None
    attrs = mod[core.args[0]].attrs
    if attrs is None or PACKED_ATTR not in attrs:
        return None
    info = json.loads(str(attrs[PACKED_ATTR]))
    x, packed, bias = core.args[1].fields
    packed, bias = _const(packed), _const(bias)
    x_dtype = str(x.ty.dtype)
    shape = info["weight_shape"]
    kind = info["kind"]
    if kind == "conv" and info["groups"] != 1:  # depthwise (no channel multiplier) or none
        depthwise = info["groups"] == shape[0] == int(x.ty.shape.values[1]) and shape[1] == 1
        kind = "depthwise" if depthwise else None
    if kind is None or packed is None or bias is None or x_dtype not in ("int8", "int16"):
        return None
    weight = unpack(packed, int(np.prod(shape)), info["format"], info["bits"])
    extra = {"weight_bits": info["bits"], "weight_format": info["format"]}
    if info["kind"] == "conv":  # conv or depthwise
        extra.update({"strides": tuple(info["strides"]), "dilation": tuple(info["dilation"]),
                      "padding": tuple(info["padding"]), "pad_value": info["pad_value"]})
    x_shape = tuple(int(d.value) for d in x.ty.shape.values)
    layer = _layer(kind, x_shape, end, weight.reshape(shape).astype(np.int8), bias,
                   consts, clip, x_dtype, extra)
    return (layer, x) if layer else None


MATMUL_TILE = (2, 4)   # rows, columns: the sums a pass of the matmul kernel keeps in registers


def matmul_kernel(a_shape, b_shape, zp_a: int, zp_b: int, m: int, sh: int, zp: int, lo: int,
                  hi: int, out_dtype: str):
    """An int8 product of two activations, (..., T, D) @ (..., D, U) (attention's q k^T and
    a v), requantized in the same loop: clamp(zp + (sum (a - zp_a)(b - zp_b) * m +
    2**(sh-1)) >> sh). Each row of a is widened once, less its zero point, and b's is taken
    off the row's sum. Outputs go in tiles of MATMUL_TILE, whose sums stay in registers: a
    widened a value serves a tile's columns, a byte of b its rows, and b is read in order
    (TVM's matmul on relax casts had copied both operands to int32 in the arena and
    requantized in a kernel of its own; one output at a time, reading b's column, took 4.9
    and 7.3 instructions a MAC on the M7 for q k^T and a v of 49 frames of 8). Pure TIR (no
    C helpers), so that the host's LLVM build runs it too.
    Returns (PrimFunc, the multiplier array it takes)."""
    from ..quantize.requant import shifted_fits_int32
    *lead, t, d = (int(v) for v in a_shape)
    u = int(b_shape[-1])
    n = int(np.prod(lead)) if lead else 1
    y_shape = (*lead, t, u)
    rows, cols = MATMUL_TILE
    # the zero point and the clamp in 32 bits where the largest sum, shifted, leaves room
    reach = d * (128 + abs(zp_a)) * (128 + abs(zp_b))
    wide = "int32" if shifted_fits_int32(reach, m, 1 << (sh - 1), sh, zp) else "int64"

    def tile(pad: str, r_n: int, i0: str, c_n: int, j0: str) -> list[str]:
        """r_n x c_n outputs from row i0 and column j0; acc[r * cols + c] their sums, acc[rows *
        cols + r] row r's correction for b's zero point."""
        out = [f"{pad}acc[{r * cols + c}] = acc[{rows * cols + r}]"
               for r in range(r_n) for c in range(c_n)]
        out.append(f"{pad}for k in range({d}):")
        out += [f"{pad}    acc[{r * cols + c}] = acc[{r * cols + c}] + row[{r * d} + k] * "
                f'T.Cast("int32", bf[(l * {d} + k) * {u} + {j0} + {c}])'
                for r in range(r_n) for c in range(c_n)]
        out += [f'{pad}yf[(l * {t} + {i0} + {r}) * {u} + {j0} + {c}] = T.Cast("{out_dtype}", '
                f'T.max(T.min(T.Cast("{wide}", T.shift_right(T.Cast("int64", '
                f'acc[{r * cols + c}]) * T.Cast("int64", mr[0]) + T.int64({1 << (sh - 1)}), '
                f"T.int64({sh}))) + T.{wide}({zp}), T.{wide}({hi})), T.{wide}({lo})))"
                for r in range(r_n) for c in range(c_n)]   # ep_requant written out
        return out

    def band(pad: str, r_n: int, i0: str) -> list[str]:
        """rows i0 .. i0 + r_n - 1: widen them, then their tiles."""
        out = []
        for r in range(r_n):
            s = f"acc[{rows * cols + r}]"
            out += [f"{pad}{s} = 0", f"{pad}for k in range({d}):",
                    f'{pad}    row[{r * d} + k] = T.Cast("int32", af[(l * {t} + {i0} + {r}) * {d}'
                    f" + k]) - {zp_a}",
                    f"{pad}    {s} = {s} + row[{r * d} + k]",
                    f"{pad}{s} = 0 - {zp_b} * {s}"]
        full, tail = divmod(u, cols)
        if full:
            out += [f"{pad}for jb in range({full}):"] + tile(pad + "    ", r_n, i0, cols,
                                                              f"jb * {cols}")
        if tail:
            out += tile(pad, r_n, i0, tail, str(full * cols))
        return out

    src = [
        "@T.prim_func(private=True)",
        f'def main(a: T.Buffer({_shape(a_shape)}, "int8"), b: T.Buffer({_shape(b_shape)}, "int8"), '
        f'm: T.Buffer((1,), "int32"), y: T.Buffer({_shape(y_shape)}, "{out_dtype}")):',
        f'    T.func_attr({{"tirx.noalias": True, "op_pattern": 8, "{KERNEL_ATTR}": "matmul"}})',
        f'    af = T.decl_buffer(({n * t * d},), "int8", data=a.data)',
        f'    bf = T.decl_buffer(({n * d * u},), "int8", data=b.data)',
        f'    yf = T.decl_buffer(({n * t * u},), "{out_dtype}", data=y.data)',
        f'    row = T.alloc_buffer(({rows * d},), "int32")',
        f'    acc = T.alloc_buffer(({rows * cols + rows},), "int32")',
        '    mr = T.alloc_buffer((1,), "int32")',
        "    mr[0] = m[0]",   # a local, not a literal: one SMULL (see _add_chain)
        f"    for l in range({n}):",
    ]
    full, tail = divmod(t, rows)
    if full:
        src += [f"        for ib in range({full}):"] + band(" " * 12, rows, f"ib * {rows}")
    if tail:
        src += band(" " * 8, tail, str(full * rows))
    return (_parse("\n".join(src), f"matmul {tuple(a_shape)} @ {tuple(b_shape)}"),
            np.array([m], np.int32))


SOFTMAX_ROW_BUFFER = 256   # keys whose exp a softmax keeps on the stack between its passes


def softmax_kernel(shape, axis: int, recip_bits: int, sums: str):
    """reference.run_op's softmax over `axis` of an int8 tensor, without a mask: per row the
    max, the sum of the exp table (`sums`: int32 or int64) and its fixed-point reciprocal
    (requant.softmax_row_reciprocal), then per value a multiply and a shift. Each row's exps
    stay in a stack buffer between the passes (rows up to SOFTMAX_ROW_BUFFER keys), and every
    index is 32-bit: in TE, the table's int64 shape had made its index arithmetic 64-bit.
    Pure TIR, so that the host's LLVM build runs it too."""
    shape = [int(v) for v in shape]
    outer, n = int(np.prod(shape[:axis])), shape[axis]
    inner = int(np.prod(shape[axis + 1:]))
    keep = n <= SOFTMAX_ROW_BUFFER
    at = f"(o * {n} + k) * {inner} + j"
    look = f'tb[T.Cast("int32", xf[{at}]) - r[0] + 255]'
    src = [
        "@T.prim_func(private=True)",
        f'def main(x: T.Buffer({_shape(shape)}, "int8"), table: T.Buffer((256,), "int32"), '
        f'y: T.Buffer({_shape(shape)}, "int8")):',
        f'    T.func_attr({{"tirx.noalias": True, "op_pattern": 8, "{KERNEL_ATTR}": "softmax"}})',
        f'    xf = T.decl_buffer(({outer * n * inner},), "int8", data=x.data)',
        f'    yf = T.decl_buffer(({outer * n * inner},), "int8", data=y.data)',
        '    tb = T.decl_buffer((256,), "int32", data=table.data)',
        f'    e = T.alloc_buffer(({n if keep else 1},), "int32")',
        '    r = T.alloc_buffer((2,), "int32")',      # the row's max, then its reciprocal
        f'    s = T.alloc_buffer((1,), "{sums}")',
        f"    for o in range({outer}):",
        f"        for j in range({inner}):",
        "            r[0] = -128",
        f"            for k in range({n}):",
        f'                r[0] = T.max(r[0], T.Cast("int32", xf[{at}]))',
        "            s[0] = 0",
        f"            for k in range({n}):",
        *([f"                e[k] = {look}",
           f'                s[0] = s[0] + T.Cast("{sums}", e[k])'] if keep
          else [f'                s[0] = s[0] + T.Cast("{sums}", {look})']),
        # one division per row (the sum is positive: the row's max adds 2**16); a 64-bit
        # numerator, the reciprocal at most 2**22, kept times 2**(32 - recip_bits): then
        # (e r + 2**(recip_bits-1)) >> recip_bits is the rounded high word of one product
        # (SMMULR on cores with the DSP extension; it took a 64-bit add and shift)
        f'            r[1] = T.Cast("int32", T.truncdiv(T.int64({1 << (8 + recip_bits)}) + '
        f'T.Cast("int64", T.shift_right(s[0], T.{sums}(1))), '
        f'T.max(T.Cast("int64", s[0]), T.int64(1)))) * {1 << (32 - recip_bits)}',
        f"            for k in range({n}):",   # the probability is at least 0: no lower clamp
        f'                yf[{at}] = T.Cast("int8", T.min(T.Cast("int32", T.shift_right('
        f'T.Cast("int64", {"e[k]" if keep else look}) * T.Cast("int64", r[1]) + '
        f"T.int64({1 << 31}), T.int64(32))) - 128, 127))",
    ]
    return _parse("\n".join(src), f"softmax over axis {axis} of {tuple(shape)}")


def prelu_kernel(shape, in_dtype: str, out_dtype: str, zp_in: int, zp_out: int, lo: int,
                 hi: int, pos: tuple[int, int], neg: tuple[np.ndarray, np.ndarray]):
    """reference.run_op's prelu: clamp(zp_out + requantize(x - zp_in)) with one multiplier and
    total shift `pos` for x >= zp_in and one per channel (`neg`, channel axis 1) below it. Each
    requantization is one 32 x 32 -> 64-bit product and its high word: (a * M + 2**(s-1)) >> s
    is exactly ((a << d) * M + 2**(31+e)) >> 32 >> e, with d = 32 - s where s < 32 and e =
    s - 32 where s > 32 (no shift of a 64-bit value). TVM's lowering had requantized each value
    both ways in 64 bits, then chosen: 25 instructions a value on the M7, now 18. Pure TIR, so
    that the host's LLVM build runs it too.
    Returns (PrimFunc, its (C + 1, 3) int32 parameters: M, d, e for x >= zp_in, then per
    channel), or None where a left shift could overflow."""
    shape = [int(v) for v in shape]
    n, c = shape[0], shape[1]
    inner = int(np.prod(shape[2:]))
    reach = int(np.iinfo(in_dtype).max) - int(np.iinfo(in_dtype).min)   # |x - zp_in|
    neg_m, neg_s = (np.asarray(v, np.int64).reshape(-1) for v in neg)
    if neg_m.size not in (1, c) or neg_s.size not in (1, c):
        return None
    ms = np.concatenate([[pos[0]], np.broadcast_to(neg_m, (c,))])
    ss = np.concatenate([[pos[1]], np.broadcast_to(neg_s, (c,))])
    d, e = np.maximum(32 - ss, 0), np.maximum(ss - 32, 0)
    if np.any(np.abs(ms) >= 2 ** 31) or np.any(reach << d >= 2 ** 31):
        return None
    params = np.stack([ms, d, e], 1).astype(np.int32)

    def side(k: int) -> str:   # ((a << d) * M + 2**(31+e)) >> 32 >> e with row k's M, d, e
        return (f'T.shift_right(T.Cast("int32", T.shift_right(T.Cast("int64", T.shift_left('
                f'a[0], q[{3 * k + 1}])) * T.Cast("int64", q[{3 * k}]) + r[{k}], T.int64(32))), '
                f"q[{3 * k + 2}])")

    def load(k: int, row: str, pad: str) -> list[str]:   # row `row` of p into q[3k:], r[k]
        return [f"{pad}for k in range(3):", f"{pad}    q[{3 * k} + k] = p[{row}, k]",
                f'{pad}r[{k}] = T.shift_left(T.int64(1), T.Cast("int64", q[{3 * k + 2}] + 31))']
    size = n * c * inner
    src = [
        "@T.prim_func(private=True)",
        f'def main(x: T.Buffer({_shape(shape)}, "{in_dtype}"), p: T.Buffer(({c + 1}, 3), '
        f'"int32"), y: T.Buffer({_shape(shape)}, "{out_dtype}")):',
        f'    T.func_attr({{"tirx.noalias": True, "op_pattern": 8, "{KERNEL_ATTR}": "prelu"}})',
        f'    xf = T.decl_buffer(({size},), "{in_dtype}", data=x.data)',
        f'    yf = T.decl_buffer(({size},), "{out_dtype}", data=y.data)',
        # locals: M, d, e and the rounding constant for x >= zp_in, then the channel's
        '    q = T.alloc_buffer((6,), "int32")',
        '    r = T.alloc_buffer((2,), "int64")',
        '    a = T.alloc_buffer((1,), "int32")',
        *load(0, "0", "    "),
        f"    for b, ch in T.grid({n}, {c}):",
        *load(1, "ch + 1", "        "),
        f"        for i in range({inner}):",
        f'            a[0] = T.Cast("int32", xf[(b * {c} + ch) * {inner} + i]) - {zp_in}',
        f'            yf[(b * {c} + ch) * {inner} + i] = T.Cast("{out_dtype}", T.max(T.min('
        f"T.if_then_else(a[0] >= 0, {side(0)}, {side(1)}) + {zp_out}, {hi}), {lo}))",
    ]
    return _parse("\n".join(src), f"prelu of {tuple(shape)}"), params


def maxpool_kernel(x_shape, dtype: str, kernel, strides, padding, dilation, y_shape,
                   dsp: bool = False, simd_rows: int = 0):
    """max_pool2d (NCHW, padding with the dtype's minimum, as TVM and the golden model do) in
    two passes per output row: the max over the window's rows into a padded row buffer (`v`,
    its ends the dtype minimum), then the max over the window's columns. Output rows whose
    window lies inside the input take no bounds checks; the few others are written out with the
    rows they reach. With `dsp` (SSUB8 + SEL) int8 rows go four lanes to a word (ep_max4): the
    vertical pass always, the horizontal one at strides 1 and 2; with `simd_rows` (Helium: 1,
    NEON: 8) rows at least that long go sixteen lanes a vector (simd_c's ep_simd_max2) where
    the pass reads whole rows: the vertical one, and the horizontal one at stride 1 (NEON,
    without predication, ran shorter rows slower than scalar code). TVM's lowering had read,
    compared and written the output for every tap: 27 instructions per 3x3 output, 19 per 2x2
    stride-2 output on the M7."""
    n, c, h, w = (int(d) for d in x_shape)
    oh, ow = (int(d) for d in y_shape[2:])
    kh, kw = (int(d) for d in kernel)
    sh, sw = (int(d) for d in strides)
    dh, dw = (int(d) for d in dilation)
    pt, pl = int(padding[0]), int(padding[1])
    qmin = -(1 << (8 * np.dtype(dtype).itemsize - 1))
    words = dsp and dtype == "int8"
    # the row buffer: left padding, the input row, and whatever the last window (and a word
    # load from the last output pair) reaches beyond it
    size = max(pl + w, (ow - 1) * sw + (kw - 1) * dw + 1) + 4
    rows_of = [[r for r in (i * sh - pt + k * dh for k in range(kh)) if 0 <= r < h]
               for i in range(oh)]
    inner = [i for i in range(oh) if len(rows_of[i]) == kh]
    i0, i1 = (inner[0], inner[-1] + 1) if inner else (0, 0)

    def cast(v: str) -> str:
        return f'T.Cast("int32", {v})'

    def ld4(buf: str) -> str:
        return f'T.call_extern("int32", "ep_ld4", T.address_of({buf}))'

    vectors = simd_rows and dtype == "int8"

    def max2(pad: str, dst: str, a: str, b: str, count: int) -> str:   # dst[:count] = max(a, b)
        return (f'{pad}T.evaluate(T.call_extern("int32", "ep_simd_max2", T.address_of({dst}), '
                f"T.address_of({a}), T.address_of({b}), {count}))")

    def vertical(pad: str, rows: list[str], vb: int) -> list[str]:
        """v[vb, pl:pl + w] = the max of input rows `rows` (expressions) of plane (b, ch)."""
        if not rows:
            return [f"{pad}for j in range({w}):", f"{pad}    v[{vb}, {pl} + j] = T.{dtype}({qmin})"]
        if vectors and w >= simd_rows:
            first = [f"x[b, ch, {r}, 0]" for r in rows[:2]]
            return [max2(pad, f"v[{vb}, {pl}]", first[0], first[-1], w)] + \
                [max2(pad, f"v[{vb}, {pl}]", f"v[{vb}, {pl}]", f"x[b, ch, {r}, 0]", w)
                 for r in rows[2:]]
        out, full = [], w // 4 if words else 0
        if full:
            acc = ld4(f"x[b, ch, {rows[0]}, jb * 4]")
            for r in rows[1:]:
                acc = f'T.call_extern("int32", "ep_max4", {acc}, {ld4(f"x[b, ch, {r}, jb * 4]")})'
            out += [f"{pad}for jb in range({full}):",
                    f'{pad}    T.evaluate(T.call_extern("int32", "ep_st4", '
                    f"T.address_of(v[{vb}, {pl} + jb * 4]), {acc}))"]
        if w > 4 * full:
            acc = cast(f"x[b, ch, {rows[0]}, j]")
            for r in rows[1:]:
                acc = f"T.max({acc}, {cast(f'x[b, ch, {r}, j]')})"
            out += [f"{pad}for j in range({4 * full}, {w}):",
                    f'{pad}    v[{vb}, {pl} + j] = T.Cast("{dtype}", {acc})']
        return out

    def horizontal(pad: str, i: str, vb: int) -> list[str]:
        """y[b, ch, i, :] = the max over each window's columns of v[vb]."""
        if vectors and sw == 1 and ow >= simd_rows:
            row = f"y[b, ch, {i}, 0]"
            return [max2(pad, row, f"v[{vb}, 0]", f"v[{vb}, {dw if kw > 1 else 0}]", ow)] + \
                [max2(pad, row, row, f"v[{vb}, {k * dw}]", ow) for k in range(2, kw)]
        lanes = {1: 4, 2: 2}.get(sw, 1) if words else 1
        full, out = ow // lanes if lanes > 1 else 0, []
        if full:
            acc = ld4(f"v[{vb}, jb * 4]")
            for k in range(1, kw):
                acc = (f'T.call_extern("int32", "ep_max4", {acc}, '
                       f'{ld4(f"v[{vb}, jb * 4 + {k * dw}]")})')
            if sw == 1:
                out += [f"{pad}for jb in range({full}):",
                        f'{pad}    T.evaluate(T.call_extern("int32", "ep_st4", '
                        f"T.address_of(y[b, ch, {i}, jb * 4]), {acc}))"]
            else:   # stride 2: lanes 0 and 2 of the word hold outputs 2 jb and 2 jb + 1
                out += [f"{pad}for jb in range({full}):", f"{pad}    m[0] = {acc}",
                        f'{pad}    y[b, ch, {i}, jb * 2] = T.Cast("int8", m[0])',
                        f'{pad}    y[b, ch, {i}, jb * 2 + 1] = T.Cast("int8", '
                        f"T.shift_right(m[0], 16))"]
        if ow > lanes * full:
            acc = cast(f"v[{vb}, j * {sw}]")
            for k in range(1, kw):
                acc = f"T.max({acc}, {cast(f'v[{vb}, j * {sw} + {k * dw}]')})"
            out += [f"{pad}for j in range({lanes * full}, {ow}):",
                    f'{pad}    y[b, ch, {i}, j] = T.Cast("{dtype}", {acc})']
        return out

    # A row buffer for the interior rows and one for each border row: TIR's common
    # subexpression elimination does not see the extern calls write a buffer, and had reused
    # a border row's loads of v in the interior rows.
    border = [i for i in range(oh) if not i0 <= i < i1]
    body = [f'v = T.sblock_alloc_buffer(({len(border) + 1}, {size}), "{dtype}")',
            'm = T.sblock_alloc_buffer((1,), "int32")',
            f"for r, j in T.grid({len(border) + 1}, {size}):",
            f"    v[r, j] = T.{dtype}({qmin})",
            f"for b, ch in T.grid({n}, {c}):"]
    for vb, i in enumerate(border, 1):   # the rows that reach the padding, one by one
        body += vertical("    ", [str(r) for r in rows_of[i]], vb) + horizontal("    ", str(i), vb)
    if i1 > i0:
        body += [f"    for i in range({i0}, {i1}):"]
        body += vertical("        ", [f"i * {sh} + {k * dh - pt}" for k in range(kh)], 0)
        body += horizontal("        ", "i", 0)
    # an s_tir function with a root block: with one input and an output of its size, Relax's
    # RewriteDataflowReshape asks whether the kernel is a reshape, which needs one
    L = ["@T.prim_func(private=True, s_tir=True)",
         f'def main(x: T.Buffer({_shape(x_shape)}, "{dtype}"), '
         f'y: T.Buffer({_shape(y_shape)}, "{dtype}")):',
         f'    T.func_attr({{"tirx.noalias": True, "op_pattern": 8, "{KERNEL_ATTR}": "maxpool"}})',
         '    with T.sblock("root"):'] + ["        " + line for line in body]
    return _parse("\n".join(L), f"max pool {kh}x{kw} of {tuple(x_shape)}")


def _add_chain(end, defs: dict, uses: dict, features=()):
    """The quantizer's requantized add (to_relax._add) ending in `end`:
    astype(clip(((a*Ma + b*Mb) * 1 + rnd) >> s + zp)) -> (TVMScript, [a, b], [Ma, Mb]) or None."""
    last = defs.get(end)
    out_dtype = str(last.attrs.dtype)
    if out_dtype not in ("int8", "int16"):
        return None
    steps, var = [], last.args[0]
    for name in ("relax.clip", "relax.add", "relax.right_shift", "relax.add", "relax.multiply",
                 "relax.astype", "relax.add"):
        v = defs.get(var)
        if v is None or _op(v) != name or uses.get(var, 0) != 1:
            return None
        steps.append(v)
        var = v.args[0]
    clip, add_zp, shr, add_rnd, mul1, cast64, add_ab = steps
    scalars = [_const(v.args[1]) for v in (add_zp, shr, add_rnd, mul1)]
    if any(c is None or c.size != 1 for c in scalars) or int(scalars[3]) != 1 \
            or str(cast64.attrs.dtype) != "int64":
        return None
    zp, sh, rnd = (int(c.reshape(())) for c in scalars[:3])
    inputs, mults = [], []
    for y in add_ab.args:
        mul = defs.get(y)
        if _op(mul) != "relax.multiply" or uses.get(y, 0) != 1:
            return None
        m, cast = _const(mul.args[1]), defs.get(mul.args[0])
        if m is None or m.size != 1 or not abs(int(m.reshape(()))) < 2 ** 31 \
                or _op(cast) != "relax.astype" or uses.get(mul.args[0], 0) != 1:
            return None
        x = cast.args[0]
        if str(x.ty.dtype) not in ("int8", "int16"):
            return None
        inputs.append(x)
        mults.append(int(m.reshape(())))
    shape = tuple(int(d.value) for d in end.ty.shape.values)
    if any(tuple(int(d.value) for d in x.ty.shape.values) != shape for x in inputs) \
            or not 1 <= sh <= 62:
        return None
    lo, hi = (int(v.value) for v in clip.args[1:3])
    xmax = max(2 ** (8 * np.dtype(str(x.ty.dtype)).itemsize - 1) for x in inputs)
    # ep_requant_add's sum must fit int32 (a difference has a negative multiplier)
    if ((xmax * sum(map(abs, mults)) + abs(rnd)) >> sh) + abs(zp) >= 2 ** 31:
        return None
    size = int(np.prod(shape))
    a_t, b_t = (str(x.ty.dtype) for x in inputs)
    from . import simd
    if any(f in simd.SIMD_FEATURES for f in tuple(features or ())):  # Helium / NEON, if it can
        src = simd.add_source(shape, a_t, b_t, out_dtype, mults, rnd, sh, zp, lo, hi)
        if src is not None:
            return src, inputs, np.array(mults, np.int32)
    # The multipliers come in as an array, copied to locals: as literals GCC would multiply
    # by a 64-bit constant (UMULL + MLA fix-ups) instead of one SMULL / SMLAL.
    src = "\n".join([
        "@T.prim_func(private=True)",
        f'def main(a: T.Buffer({_shape(shape)}, "{a_t}"), b: T.Buffer({_shape(shape)}, "{b_t}"), '
        f'm: T.Buffer((2,), "int32"), y: T.Buffer({_shape(shape)}, "{out_dtype}")):',
        f'    T.func_attr({{"tirx.noalias": True, "op_pattern": 8, "{KERNEL_ATTR}": "add"}})',
        f'    af = T.decl_buffer(({size},), "{a_t}", data=a.data)',
        f'    bf = T.decl_buffer(({size},), "{b_t}", data=b.data)',
        f'    yf = T.decl_buffer(({size},), "{out_dtype}", data=y.data)',
        '    mr = T.alloc_buffer((2,), "int32")',
        "    mr[0] = m[0]",
        "    mr[1] = m[1]",
        f"    for i in range({size}):",
        f'        yf[i] = T.Cast("{out_dtype}", T.call_extern("int32", "ep_requant_add", '
        f'T.Cast("int32", af[i]), mr[0], T.Cast("int32", bf[i]), mr[1], '
        f"T.int64({rnd}), {sh}, {zp}, {lo}, {hi}))"])
    return src, inputs, np.array(mults, np.int32)


def _parse(src: str, what: str):
    try:
        return _parsed(src)
    except Exception as e:  # a generator bug: say which layer and show the source
        from ..errors import EdgepruneError
        raise EdgepruneError(f"int8 kernel for {what} did not parse: {e}\n{src}") from None


@functools.lru_cache(maxsize=512)
def _parsed(src: str):
    """The PrimFunc of a kernel's TVMScript. Kept: a search compiles many models whose layers
    are mostly the same, and parsing is most of the lowering's time (TVM's IR is immutable)."""
    import tvm
    from tvm.script import tirx as T  # noqa: F401  (the parsed source refers to T)

    return tvm.script.from_source(src)


def _maxpool(value, features):
    """maxpool_kernel for a quantizer's int8/int16 nn.max_pool2d (NCHW), else None."""
    if _op(value) != "relax.nn.max_pool2d":
        return None
    a, x = value.attrs, value.args[0]
    dtype = str(x.ty.dtype)
    if dtype not in ("int8", "int16") or a.layout != "NCHW" or a.out_layout != "NCHW" \
            or bool(a.ceil_mode) or len(x.ty.shape.values) != 4:
        return None
    shape = [int(d.value) for d in x.ty.shape.values]
    y_shape = [int(d.value) for d in value.ty.shape.values]
    from .simd import MVE_FEATURE
    features = tuple(features or ())
    simd_rows = 1 if MVE_FEATURE in features else 8 if "neon" in features else 0
    return maxpool_kernel(shape, dtype, [int(k) for k in a.pool_size], [int(k) for k in a.strides],
                          [int(k) for k in a.padding], [int(k) for k in a.dilation], y_shape,
                          dsp="dsp" in features, simd_rows=simd_rows)


def specialize_int8(mod, prefix_hint: str = "ep_int8", features=()):
    """Replace every recognised quantized conv/dense chain in `main` by one specialized kernel.
    `features`: the target's [chip] features; "mve-i" selects the Helium kernels (simd.py)."""
    import tvm
    from tvm import relax

    func = mod["main"]
    if not isinstance(func.body, relax.SeqExpr):
        return mod
    defs = {b.var: b.value for block in func.body.blocks for b in block.bindings}
    uses = _uses(func)
    bb = relax.BlockBuilder(mod)  # registers each new PrimFunc with a typed GlobalVar
    blocks, added = [], 0
    for block in func.body.blocks:
        bindings = []
        for b in block.bindings:
            pool = _maxpool(b.value, features)
            if pool is not None:
                gv = bb.add_func(pool, f"{prefix_hint}_maxpool{added}")
                added += 1
                bindings.append(relax.VarBinding(b.var, relax.call_tir(
                    gv, relax.Tuple([b.value.args[0]]), b.var.ty)))
                continue
            if _op(b.value) != "relax.astype":
                bindings.append(b)
                continue
            conv, add = _match(b.var, defs, uses, mod), None
            if conv is None:
                add = _add_chain(b.var, defs, uses, features)
                if add is None:
                    bindings.append(b)
                    continue
            if conv is not None:
                layer, x = conv
                prim, consts = build_kernel(layer, features)
                kind, args = layer.kind, [x] + [relax.const(c, str(c.dtype)) for c in consts]
            else:
                prim, kind = _parse(add[0], f"add {b.var.name}"), "add"
                args = add[1] + [relax.const(add[2], "int32")]
            gv = bb.add_func(prim, f"{prefix_hint}_{kind}{added}")
            if conv is not None and KERNEL_LAYERS.get() is not None and _tiled(layer, features):
                KERNEL_LAYERS.get()[gv.name_hint] = layer_key(layer)
            added += 1
            bindings.append(relax.VarBinding(b.var, relax.call_tir(gv, relax.Tuple(args), b.var.ty)))
        blocks.append(type(block)(bindings))
    if not added:
        return mod
    new_main = relax.Function(func.params, relax.SeqExpr(blocks, func.body.body), func.ret_ty,
                              func.is_pure, func.attrs)
    funcs = {gv: (new_main if gv.name_hint == "main" else f) for gv, f in bb.get().functions.items()}
    return relax.transform.Normalize()(tvm.IRModule(funcs, attrs=mod.attrs))


# --------------------------------------------------------------------------------------------
# TIR side: the kernels, as TVMScript generated for one shape.

def rnd_high_words(layer: QLayer) -> np.ndarray | None:
    """rnd >> 32 as int32 where that is rnd exactly for every channel (every total shift >= 32,
    every low word 0) and small enough (< 2^29) for the C to add it in 32 bits; else None."""
    rnd = layer.rnd.astype(np.int64)
    if np.all(layer.shift >= 32) and np.all(rnd & 0xFFFFFFFF == 0) and \
            np.all(np.abs(rnd >> 32) < 2 ** 29):
        return (rnd >> 32).astype(np.int32)
    return None


def _requant_consts(layer: QLayer):
    """(bias, M as int32, rnd, shift) and the C helper that is exact for every channel:
    ep_requant_h32 (rnd as its high word, int32), ep_requant_hi or ep_requant."""
    rnd = layer.rnd.astype(np.int64)
    bias, mult = layer.bias.astype(np.int32), layer.mult.astype(np.int32)
    if not np.all(layer.shift >= 32):
        return [bias, mult, rnd, layer.shift.astype(np.int32)], "ep_requant"
    shift = (layer.shift - 32).astype(np.int32)
    high = rnd_high_words(layer)
    if high is not None:
        return [bias, mult, high, shift], "ep_requant_h32"
    return [bias, mult, rnd, shift], "ep_requant_hi"


def _requant_expr(acc: str, oc: str, fn: str, layer: QLayer) -> str:
    return (f'T.Cast("{layer.out_dtype}", T.call_extern("int32", "{fn}", {acc}, mult[{oc}], '
            f"rnd[{oc}], shift[{oc}], {layer.zp_out}, {layer.lo}, {layer.hi}))")


def _shape(s) -> str:
    return "(" + ", ".join(str(int(d)) for d in s) + ("," if len(s) == 1 else "") + ")"


# A kernel with this attribute reads every input byte (into its scratch) before it writes
# output bytes over it, whatever the shapes: the memory plan may put its output over its input
# where the input dies (plan.inplace_aliases).
OVERWRITES_INPUT = "edgeprune.overwrites_input"


def _header(layer: QLayer, wshape, wdtype: str, o: int, tag: str, rnd_dtype: str,
            overwrites: bool = False, pairs_shape=None) -> list[str]:
    extra = f', "{OVERWRITES_INPUT}": 1' if overwrites else ""
    pairs = f'pairs: T.Buffer({_shape(pairs_shape)}, "int32"), ' if pairs_shape else ""
    return [
        "@T.prim_func(private=True)",
        f'def main(x: T.Buffer({_shape(layer.x_shape)}, "{layer.x_dtype}"), '
        f'w: T.Buffer({_shape(wshape)}, "{wdtype}"), bias: T.Buffer(({o},), "int32"), '
        f'mult: T.Buffer(({o},), "int32"), rnd: T.Buffer(({o},), "{rnd_dtype}"), '
        f'shift: T.Buffer(({o},), "int32"), {pairs}'
        f'y: T.Buffer({_shape(layer.y_shape)}, "{layer.out_dtype}")):',
        f'    T.func_attr({{"tirx.noalias": True, "op_pattern": 8, "{KERNEL_ATTR}": "{tag}"'
        f'{extra}}})',
    ]


def _geometry(layer: QLayer):
    """Scratch plane size and how output pixels index it: (Hs, Ws, sample, step)."""
    if layer.kind == "dense":
        return 1, 1, False, (1, 1)
    _, _, h, w = layer.x_shape
    kh, kw = layer.weight.shape[2:]
    t, l, b, r = layer.padding
    if kh == kw == 1 and not any(layer.padding):
        # 1x1 without padding: copy only the pixels the strides visit.
        return layer.y_shape[2], layer.y_shape[3], True, (1, 1)
    return h + t + b, w + l + r, False, layer.strides


def _fill_loops(layer: QLayer, hs: int, ws: int, sample: bool, dst, src, ind: str) -> list[str]:
    """Copy the input into the scratch's interior: dst(i, j) = src(input row, input column).
    The zero-point border is written once by `_border_loops`."""
    lines = []
    if layer.kind == "dense" or sample:
        lines.append(f"{ind}for i, j in T.grid({hs}, {ws}):")
        si, sj = (f"i * {layer.strides[0]}", f"j * {layer.strides[1]}") if sample else ("i", "j")
        lines.append(f"{ind}    {dst('i', 'j')} = {src(si, sj)}")
        return lines
    _, _, h, w = layer.x_shape
    t, l = layer.padding[:2]
    lines.append(f"{ind}for i, j in T.grid({h}, {w}):")
    lines.append(f"{ind}    {dst(f'i + {t}', f'j + {l}')} = {src('i', 'j')}")
    return lines


def _border_loops(layer: QLayer, hs: int, ws: int, dst, pad: str, ind: str) -> list[str]:
    """Write `pad` into the scratch cells around the input (the zero-point padding)."""
    if layer.kind == "dense" or not any(layer.padding):
        return []
    _, _, h, w = layer.x_shape
    t, l, b, r = layer.padding
    lines = []
    for start, count in ((0, t), (t + h, b)):
        if count:
            lines += [f"{ind}for i, j in T.grid({count}, {ws}):",
                      f"{ind}    {dst(f'i + {start}', 'j')} = {pad}"]
    for start, count in ((0, l), (l + w, r)):
        if count:
            lines += [f"{ind}for i, j in T.grid({h}, {count}):",
                      f"{ind}    {dst(f'i + {t}', f'j + {start}')} = {pad}"]
    return lines


def _pack_pair(lo: str, hi: str | None) -> str:
    lo = f'(T.Cast("int32", {lo}) & 65535)'
    return lo if hi is None else f'({lo} | (T.Cast("int32", {hi}) * 65536))'


def _unpack(word: str, k: int) -> str:
    """Output channel k's int16 pair from its int8 weight word (bytes 0,2 or 1,3)."""
    return f'T.call_extern("int32", "{"ep_sxtb16_ror8" if k % 2 else "ep_sxtb16"}", {word})'


def _conv_kernel(layer: QLayer, oc_block: int | None = None, px_block: int | None = None,
                 dsp: bool = True):
    """conv (groups=1) or dense: SMLAD on channel pairs; each tile keeps oc_block output
    channels x px_block neighbouring pixels of one row in registers. Without `dsp` (no SMLAD:
    RISC-V, Cortex-A's scalar path) a pair's MACs read their operands as two int16 halves from
    memory (ep_mac2) instead of extracting them from a word."""
    dense = layer.kind == "dense"
    if oc_block is None:  # the tuner's measured choice for this shape (kernels/tune.py), if any
        oc_block, px_block = TUNED_TILES.get().get(layer_key(layer), (None, None))
    if oc_block is None:  # one-pixel rows (dense) spend the registers on output channels
        one_px = dense or layer.y_shape[3] == 1
        oc_block, px_block = (OC_BLOCK * PX_BLOCK, 1) if one_px else \
            (OC_BLOCK, PX_BLOCK) if dsp else ROW_TILE_WITHOUT_DSP
    sub = layer.weight_bits < 8
    per = 32 // (4 * layer.weight_bits) if sub else 1  # int8 words in one packed word
    pow2 = int(layer.weight_format == "pow2")
    if sub and px_block == 1 and ((oc_block + 1) // 2) % per:
        # one pixel per tile decodes the codes inline (ep_sub_pair), which needs each tap's
        # words to fill whole packed words; else widen per block (unpack_loops) like two pixels
        oc_block, px_block = OC_BLOCK, PX_BLOCK
    if dense:
        o, c = layer.weight.shape
        kh = kw = 1
        w4 = layer.weight.reshape(o, c, 1, 1)
        oh_n, ow_n = 1, 1
    else:
        o, c, kh, kw = layer.weight.shape
        w4 = layer.weight
        oh_n, ow_n = layer.y_shape[2:]
    n = layer.x_shape[0]
    ob = -(-o // oc_block)
    consts, requant = _requant_consts(layer)
    hs, ws, sample, (sh, sw) = _geometry(layer)
    dh, dw = layer.dilation
    pv = layer.pad_value
    # SMLAD pairs: two input channels per word, or, where that needs fewer SMLADs (one or few
    # input channels, e.g. a first layer on a grey image), two horizontal taps per word.
    kq = -(-kw // 2)
    by_width = not dense and not sample and c * kh * kq < -(-c // 2) * kh * kw
    if by_width:
        nred, taps, step = c, kq, 2 * dw   # word (i, j) = (v(i, j), v(i, j + dw))
        wpad = np.zeros((ob * oc_block, c, kh, 2 * kq), np.int64)
        wpad[:o, :, :, :kw] = w4
        wpad = wpad.reshape(ob, oc_block, c, kh, kq, 2).transpose(0, 2, 3, 4, 1, 5)
    else:
        nred, taps, step = (c + 1) // 2, kw, dw  # word (i, j) = (x[2c](i, j), x[2c+1](i, j))
        wpad = np.zeros((ob * oc_block, nred * 2, kh, kw), np.int64)
        wpad[:o, :c] = w4
        wpad = wpad.reshape(ob, oc_block, nred, 2, kh, kw).transpose(0, 2, 4, 5, 1, 3)
    # Window taps whose weights are zero in every filter (intra-kernel pattern pruning,
    # prune/patterns.py) are neither stored nor multiplied: the weights keep one row of the
    # kept taps, and the MAC loop visits only those.
    kept = None if dense or by_width else _kept_taps(w4)
    if kept is not None:
        rows, cols = zip(*kept)
        wpad = wpad[:, :, list(rows), list(cols)][:, :, None]
    wkh, wtaps = (1, len(kept)) if kept is not None else (kh, taps)  # weight tap axes
    # Channel pairs whose weights are zero in every filter of a block (kernel-wise pruning in
    # the kernel's tiles, prune/patterns.py) are neither stored nor multiplied: each block
    # loops over its own list of live pairs (`pairs`, padded with a dead one to one length).
    live = None if by_width else _live_pairs(wpad)
    if live is not None:
        wpad = np.take_along_axis(wpad, live.reshape(live.shape + (1,) * 4), axis=1)
    nlive = nred if live is None else live.shape[1]
    # Weights stay int8 in flash: (ob, nlive, kh, taps, oc_block / 2) words, each holding the
    # pair of output channel 2q in bytes 0,2 and of channel 2q+1 in bytes 1,3, the lanes that
    # ep_sxtb16 / ep_sxtb16_ror8 (SXTB16, SXTB16 ROR #8) widen to 16-bit halves for SMLAD.
    if oc_block % 2:
        wpad = np.concatenate([wpad, np.zeros(wpad.shape[:-2] + (1, 2), wpad.dtype)], axis=-2)
    b = (wpad & 0xFF).astype(np.uint32)
    words = (b[..., 0::2, 0] | (b[..., 1::2, 0] << 8) | (b[..., 0::2, 1] << 16)
             | (b[..., 1::2, 1] << 24)).view(np.int32)
    words = np.ascontiguousarray(words)
    if sub:  # flash keeps b-bit codes: each word's four lanes in 4b bits, 32 / 4b words a word
        words = _pack_lanes(words.reshape(ob, -1), layer.weight_bits, layer.weight_format)

    def xin(ch, i, j):
        return f"x[nb, {ch}]" if dense else f"x[nb, {ch}, {i}, {j}]"

    # Row bands: the scratch holds only the padded-input rows of `band` output rows, refilled
    # per band, instead of the whole image (the scratch is 2-4x the input: it set the arena
    # peak of the first layers). The band is long enough (BAND_PIXELS outputs) that widening
    # the weights once per band and channel block, and refilling the rows the window overlaps,
    # stay small next to the MACs.
    pixels = BAND_PIXELS_1X1 if kh * kw == 1 else BAND_PIXELS
    band = oh_n if dense or by_width else min(oh_n, max(1, -(-pixels // ow_n)))
    hb = hs if band == oh_n else (band - 1) * sh + (kh - 1) * dh + 1
    # In place (one image): one band fills the scratch with the whole input before any output
    # is written; a 1x1 stride-1 conv's band of input rows is the band of output rows it writes
    # (with elements of one size an output byte lands on an input byte of that band, or past
    # the input).
    overwrites = n == 1 and (band == oh_n or (
        kh == kw == 1 and tuple(layer.strides) == (1, 1) and not any(layer.padding)
        and np.dtype(layer.out_dtype).itemsize == np.dtype(layer.x_dtype).itemsize))
    L = _header(layer, words.shape, "int32", o, layer.kind, consts[2].dtype.name, overwrites,
                None if live is None else live.shape)
    if px_block > 1:  # the block's weights widened to int16 pairs (unpack_loops)
        wu_shape = (nlive, wkh, wtaps, oc_block + oc_block % 2)
        L.append(f'    wu = T.alloc_buffer({wu_shape}, "int32")')
    L += [f'    xs = T.alloc_buffer(({nred}, {hb}, {ws}), "int32")',
          f'    acc = T.alloc_buffer(({oc_block * px_block},), "int32")',
          f'    res = T.alloc_buffer(({oc_block * px_block},), "{layer.out_dtype}")']
    L.append(f"    for nb in range({n}):")

    def fill(ind: str, r0: str) -> list[str]:
        """The band's scratch rows: padded-input rows r0 .. r0 + hb - 1 (zero point outside)."""
        if dense:
            return _dense_fill(ind)
        if by_width:
            _, _, h, w = layer.x_shape
            t, l = layer.padding[:2]

            def v(i, j):
                return (f"T.if_then_else({t} <= {i} and {i} < {t + h} and {l} <= {j} and "
                        f"{j} < {l + w}, {xin('cc', f'{i} - {t}', f'{j} - {l}')}, "
                        f"T.{layer.x_dtype}({pv}))")
            return [f"{ind}for cc, i, j in T.grid({c}, {hs}, {ws}):",
                    f"{ind}    xs[cc, i, j] = {_pack_pair(v('i', 'j'), v('i', f'j + {dw}'))}"]
        if sample:
            h_in, w_in, t, l, fh, fw = hs, ws, 0, 0, layer.strides[0], layer.strides[1]
        else:
            (_, _, h_in, w_in), (t, l), fh, fw = layer.x_shape, layer.padding[:2], 1, 1
        pad = _pack_pair(str(pv), str(pv))
        lines = []
        for lo, hi, odd in ((0, c // 2, False), (c // 2, nred, True)):
            if hi <= lo:
                continue

            ch = f"(cc + {lo})" if lo else "cc"
            row, col = f"({r0} + i - {t}) * {fh}", f"j * {fw}"
            src = _pack_pair(xin(f"{ch} * 2", row, col),
                             None if odd else xin(f"{ch} * 2 + 1", row, col))
            # A row is input (with its zero-point columns) or all zero point. The columns are
            # rewritten per band: a separate loop for them, unrolled by GCC, cost more flash.
            r = ws - l - w_in
            lines += [f"{ind}for cc, i in T.grid({hi - lo}, {hb}):",
                      f"{ind}    if {t} <= {r0} + i and {r0} + i < {t + h_in}:",
                      *[f"{ind}        for j in range({n_}):\n{ind}            xs[{ch}, i, j + {j0}] = {pad}"
                        for j0, n_ in ((0, l), (l + w_in, r)) if n_],
                      f"{ind}        for j in range({w_in}):",
                      f"{ind}            xs[{ch}, i, j + {l}] = {src}",
                      f"{ind}    else:",
                      f"{ind}        for j in range({ws}):",
                      f"{ind}            xs[{ch}, i, j] = {pad}"]
        return lines

    def _dense_fill(ind: str) -> list[str]:
        lines = []
        if c // 2:
            lines += [f"{ind}for cc in range({c // 2}):",
                      f"{ind}    xs[cc, 0, 0] = {_pack_pair(xin('cc * 2', 0, 0), xin('cc * 2 + 1', 0, 0))}"]
        if c % 2:
            lines += [f"{ind}xs[{c // 2}, 0, 0] = {_pack_pair(xin(str(c - 1), 0, 0), None)}"]
        return lines

    def tile(ind: str, obv: str, count: int, owv: str, npx: int, orow: str) -> list[str]:
        """One tile: `count` output channels from block `obv`, `npx` pixels from column `owv`,
        output row `orow` (scratch row ohl of the band)."""
        def a(k, p):
            return f"acc[{p * count + k}]"

        lines = [f"{ind}{a(k, p)} = bias[{obv} * {oc_block} + {k}]"
                 for p in range(npx) for k in range(count)]
        # Small windows (1x1) unroll channel pairs too, so the loop overhead is shared.
        u = next(f for f in (4, 2, 1) if nlive % f == 0 and wkh * wtaps * f <= 4 or f == 1)
        lines += [f"{ind}for cco in range({nlive // u}):",
                  f"{ind}    for cci in T.unroll({u}):"]
        cc = f"cco * {u} + cci"   # the weights' pair; the scratch's is xc
        xc = cc if live is None else f"pairs[{obv}, {cc}]"

        def wk(k, wy, wx):  # output channel k's two int16 halves at weight tap (wy, wx)
            if px_block > 1:  # widened once per channel block (unpack_loops)
                return f"wu[{cc}, {wy}, {wx}, {k}]"
            if sub:  # lanes k % 2 and k % 2 + 2 of int8 word k // 2 of this tap, see _pack_lanes
                b, nw = layer.weight_bits, (oc_block + 1) // 2
                tap = f"(({cc}) * {wkh * wtaps} + {wy} * {wtaps} + {wx})"
                word = f"w[{obv}, {tap} * {nw // per} + {k // 2 // per}]"
                return (f'T.call_extern("int32", "ep_sub_pair", {word}, '
                        f"{(k // 2 % per) * 4 * b + k % 2 * b}, {b}, {pow2})")
            return _unpack(f"w[{obv}, {cc}, {wy}, {wx}, {k // 2}]", k)

        def macs(ry, rx, wy, wx, ind2):
            """The tile's MACs at window row ry, word column rx (weight tap wy, wx)."""
            out = []
            for k in range(count):
                for p in range(npx):
                    x = f"xs[{xc}, ohl * {sh} + {ry} * {dh}, ({owv} + {p}) * {sw} + {rx} * {step}]"
                    if not dsp and px_block > 1:
                        m = (f'T.call_extern("int32", "ep_mac2", T.address_of({x}), '
                             f"T.address_of({wk(k, wy, wx)}), {a(k, p)})")
                    elif not dsp and not sub:
                        m = (f'T.call_extern("int32", "ep_mac2_b", T.address_of({x}), '
                             f"T.address_of(w[{obv}, {cc}, {wy}, {wx}, {k // 2}]), {k % 2}, "
                             f"{a(k, p)})")
                    else:
                        m = f'T.call_extern("int32", "ep_smlad", {x}, {wk(k, wy, wx)}, {a(k, p)})'
                    out.append(f"{ind2}{a(k, p)} = {m}")
            return out
        if kept is None:
            lines += [f"{ind}        for ry in {'T.unroll' if dsp else 'range'}({kh}):",
                      f"{ind}            for rx in T.unroll({taps}):"]
            lines += macs("ry", "rx", "ry", "rx", ind + "                ")
        else:
            for t, (ry, rx) in enumerate(kept):
                lines += macs(ry, rx, 0, t, ind + "        ")
        # All results first, then the stores: an int8 store may alias any constant, which
        # would force the per-channel constants to be reloaded for every pixel.
        for p in range(npx):
            for k in range(count):
                oc = f"{obv} * {oc_block} + {k}"
                rq = _requant_expr(a(k, p), oc, requant, layer)
                lines.append(f"{ind}res[{p * count + k}] = {rq}")
        for p in range(npx):
            for k in range(count):
                oc = f"{obv} * {oc_block} + {k}"
                dst = f"y[nb, {oc}]" if dense else f"y[nb, {oc}, {orow}, {owv} + {p}]"
                lines.append(f"{ind}{dst} = res[{p * count + k}]")
        return lines

    def unpack_loops(ind: str, obv: str) -> list[str]:
        """Widen block `obv`'s int8 weights into wu once, shared by all its pixel tiles; inline
        the SXTB16s would need more registers than a Cortex-M has and spill (+30 % on L7)."""
        if px_block == 1:  # one pixel per tile: each weight is used once anyway
            return []
        n_words = nlive * wkh * wtaps * ((oc_block + 1) // 2)
        if sub:
            return [f'{ind}T.evaluate(T.call_extern("int32", "ep_widen_sub", '
                    f"T.address_of(w[{obv}, 0]), wu.data, {n_words}, {layer.weight_bits}, "
                    f"{pow2}))"]
        return [f'{ind}T.evaluate(T.call_extern("int32", "ep_widen", '
                f"T.address_of(w[{obv}, 0, 0, 0, 0]), wu.data, {n_words}))"]

    def band_loops(ind: str, bv: str, rows: str) -> list[str]:
        """Fill band `bv` (`rows` output rows), then every channel block over its rows."""
        lines = fill(ind, f"{bv} * {band * sh}")
        px_full, px_tail = divmod(ow_n, px_block)
        for count, blocks in ((oc_block, o // oc_block), (o % oc_block, 1 if o % oc_block else 0)):
            if not blocks or not count:
                continue
            obv, ind2 = ("ob", ind + "    ") if count == oc_block else (str(o // oc_block), ind)
            if count == oc_block:
                lines.append(f"{ind}for ob in range({blocks}):")
            lines += unpack_loops(ind2, obv)
            lines.append(f"{ind2}for ohl in range({rows}):")
            orow = f"{bv} * {band} + ohl"
            if px_full:
                lines.append(f"{ind2}    for owb in range({px_full}):")
                lines += tile(ind2 + "        ", obv, count, f"owb * {px_block}", px_block, orow)
            if px_tail:
                lines += tile(ind2 + "    ", obv, count, str(px_full * px_block), px_tail, orow)
        return lines

    # One loop over the bands (the last may be shorter): a copy of the tiles for a tail band
    # would cost code size (flash) for a few rows.
    nbands = -(-oh_n // band)
    rows = str(band) if oh_n % band == 0 else f"T.min({band}, {oh_n} - bnd * {band})"
    L.append(f"        for bnd in range({nbands}):")
    L += band_loops("            ", "bnd", rows)
    return "\n".join(L), [words] + consts + ([] if live is None else [live])


# Cores with 64-bit integer registers and no packed SIMD (rv64): two neighbouring output pixels
# per multiply, as the 32-bit lanes of one 64-bit product (_pair_lane_conv_kernel)
XLEN64_FEATURE = "xlen64"
PAIR_LANE_TILE = (4, 2)   # output channels, pixel pairs: 8 int64 sums in registers


def _pair_lanes(layer: QLayer, features) -> bool:
    """Whether the layer runs _pair_lane_conv_kernel: a conv (groups 1) of 8-bit weights whose
    rows have two pixels or more, on a core with 64-bit registers."""
    return XLEN64_FEATURE in tuple(features or ()) and layer.kind == "conv" \
        and layer.weight_bits == 8 and layer.y_shape[3] >= 2


def _pair_lane_conv_kernel(layer: QLayer):
    """conv (groups 1, 8-bit weights) on 64-bit cores without SIMD: the inputs of two
    neighbouring output pixels at one window tap, x0 and x1, make one int64 word x0 + x1 * 2**32,
    and word * w adds both pixels' products in one multiply: its low 32 bits hold pixel 0's sum
    and, less that sum, its high 32 bits pixel 1's (exact while each sum fits int32, as the
    int32 sums of the other kernels must). A tile keeps PAIR_LANE_TILE output channels x pixel
    pairs of one row; each tap loads its int8 weights once for the tile, each input byte once
    per pixel pair. Padded convs read a band of zero-point-padded int8 rows (BAND_PIXELS
    outputs), others the input itself. Window taps zero in every filter are skipped. ResNet-8's
    layer1 3x3 conv on rv64: 3.6 instructions a MAC in int16 pairs (a multiply and an add per
    MAC, and spills), 2.2 so; tiles of (2, 2), (4, 1), (2, 3), (3, 2), (8, 1), (4, 3), (6, 2)
    and (8, 2) measured slower than (4, 2)."""
    o, c, kh, kw = layer.weight.shape
    n, _, h, w = layer.x_shape
    oh_n, ow_n = layer.y_shape[2:]
    sh, sw = layer.strides
    dh, dw = layer.dilation
    t, l, b, r = layer.padding
    ocb, npair = PAIR_LANE_TILE
    ob = -(-o // ocb)
    consts, requant = _requant_consts(layer)
    kept = _kept_taps(layer.weight) or [(i, j) for i in range(kh) for j in range(kw)]
    wt = np.zeros((ob * ocb, c, len(kept)), np.int8)
    wt[:o] = layer.weight[:, :, [i for i, _ in kept], [j for _, j in kept]]
    wt = np.ascontiguousarray(wt.reshape(ob, ocb, c, len(kept)).transpose(0, 2, 3, 1))
    padded = any(layer.padding)
    band = min(oh_n, max(1, -(-BAND_PIXELS // ow_n))) if padded else oh_n
    hb, ws = (band - 1) * sh + (kh - 1) * dh + 1, w + l + r
    L = _header(layer, wt.shape, "int8", o, "conv", consts[2].dtype.name)
    L += [f'    acc = T.alloc_buffer(({ocb * npair},), "int64")',
          f'    pw = T.alloc_buffer(({npair},), "int64")',
          f'    res = T.alloc_buffer(({2 * ocb * npair},), "{layer.out_dtype}")']
    if padded:
        L.append(f'    xs = T.alloc_buffer(({c}, {hb}, {ws}), "{layer.x_dtype}")')
    L.append(f"    for nb in range({n}):")

    def xv(ch: str, row: str, col: str) -> str:   # row: of the band's first output row
        if padded:
            return f"xs[{ch}, {row}, {col}]"
        return f"x[nb, {ch}, bnd * {band * sh} + {row}, {col}]"

    def fill(ind: str) -> list[str]:
        """The band's rows of the zero-point-padded input (as _conv_kernel's fill, in int8)."""
        if not padded:
            return []
        pv, r0 = f"T.{layer.x_dtype}({layer.pad_value})", f"bnd * {band * sh} + i"
        return [f"{ind}for cc, i in T.grid({c}, {hb}):",
                f"{ind}    if {t} <= {r0} and {r0} < {t + h}:",
                *[f"{ind}        for j in range({k}):\n{ind}            xs[cc, i, j + {j0}] = {pv}"
                  for j0, k in ((0, l), (l + w, r)) if k],
                f"{ind}        for j in range({w}):",
                f"{ind}            xs[cc, i, j + {l}] = x[nb, cc, {r0} - {t}, j]",
                f"{ind}    else:",
                f"{ind}        for j in range({ws}):",
                f"{ind}            xs[cc, i, j] = {pv}"]

    def tile(ind: str, obv: str, count: int, j0: str, pairs: int, single: bool) -> list[str]:
        """`count` channels of block `obv` x `pairs` pixel pairs (and one more pixel if
        `single`) from output column j0 of band row ohl."""
        words = pairs + single
        lines = [f'{ind}acc[{k * npair + q}] = T.Cast("int64", bias[{obv} * {ocb} + {k}]) * '
                 f"T.int64({2 ** 32 + 1})" for k in range(count) for q in range(words)]

        def at(ind2: str, ry: str, rx: int, tap: str) -> list[str]:   # one window tap
            row, out = f"ohl * {sh} + {ry} * {dh}", []
            for q in range(words):
                col = f"({j0} + {2 * q}) * {sw} + {rx * dw}"
                word = f'T.Cast("int64", {xv("cc", row, col)})'
                if q < pairs:
                    word += f' + T.Cast("int64", {xv("cc", row, f"{col} + {sw}")}) * ' \
                            f"T.int64({2 ** 32})"
                out.append(f"{ind2}pw[{q}] = {word}")
            return out + [f"{ind2}acc[{k * npair + q}] = acc[{k * npair + q}] + pw[{q}] * "
                          f'T.Cast("int64", w[{obv}, cc, {tap}, {k}])'
                          for k in range(count) for q in range(words)]
        lines.append(f"{ind}for cc in range({c}):")
        if len(kept) == kh * kw:   # a loop over the window's rows: unrolled whole, GCC kept
            lines.append(f"{ind}    for ry in range({kh}):")   # too much live and spilled
            for rx in range(kw):
                lines += at(ind + "        ", "ry", rx, f"ry * {kw} + {rx}")
        else:
            for tap, (ry, rx) in enumerate(kept):
                lines += at(ind + "    ", str(ry), rx, str(tap))
        outs = []   # per result: (channel k, pixel offset, its int32 sum)
        for k in range(count):
            for q in range(words):
                a = f"acc[{k * npair + q}]"
                low = f'T.Cast("int32", {a})'
                outs.append((k, 2 * q, low))
                if q < pairs:
                    outs.append((k, 2 * q + 1, f'T.Cast("int32", T.shift_right({a} - '
                                               f'T.Cast("int64", {low}), T.int64(32)))'))
        # all results first, then the stores (as _conv_kernel's tile)
        lines += [f"{ind}res[{i}] = {_requant_expr(v, f'{obv} * {ocb} + {k}', requant, layer)}"
                  for i, (k, _, v) in enumerate(outs)]
        lines += [f"{ind}y[nb, {obv} * {ocb} + {k}, bnd * {band} + ohl, {j0} + {p}] = res[{i}]"
                  for i, (k, p, _) in enumerate(outs)]
        return lines

    nbands = -(-oh_n // band)
    rows = str(band) if oh_n % band == 0 else f"T.min({band}, {oh_n} - bnd * {band})"
    L.append(f"        for bnd in range({nbands}):")
    L += fill("            ")
    full, rest = divmod(ow_n, 2 * npair)
    for count, blocks in ((ocb, o // ocb), (o % ocb, 1 if o % ocb else 0)):
        if not blocks or not count:
            continue
        obv, ind = ("ob", " " * 16) if count == ocb else (str(o // ocb), " " * 12)
        if count == ocb:
            L.append(f"            for ob in range({blocks}):")
        L.append(f"{ind}for ohl in range({rows}):")
        if full:
            L.append(f"{ind}    for pg in range({full}):")
            L += tile(ind + "        ", obv, count, f"pg * {2 * npair}", npair, False)
        if rest:
            L += tile(ind + "    ", obv, count, str(full * 2 * npair), rest // 2, rest % 2 == 1)
    return "\n".join(L), [wt] + consts


def _live_pairs(wpad: np.ndarray) -> np.ndarray | None:
    """(blocks, K) int32: per block of output channels, the input-channel pairs with a
    non-zero weight in some of its filters, padded to one length K with a pair that has none
    (it adds zero); None when every block uses every pair (the dense loop). `wpad` is
    (blocks, pairs, ...)."""
    used = np.any(wpad != 0, axis=tuple(range(2, wpad.ndim)))
    k = max(1, int(used.sum(axis=1).max()))
    if k == used.shape[1]:   # some block uses every pair: the table would only add loads
        return None
    table = np.zeros((len(used), k), np.int32)
    for b, row in enumerate(used):
        live = list(np.nonzero(row)[0])
        dead = int(np.nonzero(~row)[0][0]) if len(live) < k else 0
        table[b] = live + [dead] * (k - len(live))
    return table


def _kept_taps(w4: np.ndarray) -> list[tuple[int, int]] | None:
    """The window taps (row, column) with a non-zero weight in some filter, when some tap has
    none (else None: the dense loop)."""
    used = np.any(w4 != 0, axis=(0, 1))
    if used.all():
        return None
    return [(int(i), int(j)) for i, j in zip(*np.nonzero(used))] or [(0, 0)]


def _pack_codes(values: np.ndarray, bits: int, fmt: str) -> np.ndarray:
    """(rows, m) weight values -> (rows, ceil(m / per)) int32 words of per = 32 / bits codes
    (quantize/packing.encode), value j at bit bits * (j % per) of word j // per."""
    from ..quantize.packing import encode
    per = 32 // bits
    rows, m = values.shape
    codes = np.zeros((rows, -(-m // per) * per), np.int64)
    codes[:, :m] = encode(values, fmt, bits).reshape(rows, m)
    shifts = bits * np.arange(per, dtype=np.int64)
    packed = (codes.reshape(rows, -1, per) << shifts).sum(-1)
    return np.ascontiguousarray(packed.astype(np.uint32).view(np.int32))


def _pack_lanes(words: np.ndarray, bits: int, fmt: str) -> np.ndarray:
    """(blocks, n) int32 words of four int8 lanes -> (blocks, ceil(n / per)) int32 words, per =
    32 / (4 * bits) words each: word i's lane l at bit 4 * bits * (i % per) + bits * l
    (ep_widen_sub and ep_sub_pair read them back)."""
    blocks, n = words.shape
    return _pack_codes(words.view(np.int8).reshape(blocks, 4 * n), bits, fmt)


def _depthwise_kernel(layer: QLayer, dsp: bool = False):
    """depthwise: per channel, an int16 zero-point-padded plane; tiles of DW_PX_BLOCK outputs.
    dsp (cores with SMLAD, kernel rows not dilated): two horizontal taps per ep_smlad, their
    inputs one (unaligned) word load from the plane, the weights packed in pairs (a zero weight
    after an odd row's last tap). A 1x1 window without padding (a per-channel scale: a
    BatchNorm before a ReLU and a conv) reads the input itself: its copy had cost a third of
    the layer (12.7 instructions a value on the M4)."""
    o, _, kh, kw = layer.weight.shape
    n = layer.x_shape[0]
    consts, requant = _requant_consts(layer)
    hs, ws, direct, (sh, sw) = _geometry(layer)
    dh, dw = layer.dilation
    oh_n, ow_n = layer.y_shape[2:]
    pairs = dsp and dw == 1 and kw > 1
    kq = -(-kw // 2) if pairs else kw  # weight words per kernel row
    if pairs:
        wp = np.zeros((o, kh, 2 * kq), np.int64)
        wp[..., :kw] = layer.weight.reshape(o, kh, kw)
        wd = ((wp[..., 0::2] & 0xFFFF) | (wp[..., 1::2] << 16)).astype(np.uint32).view(np.int32)
        wd = np.ascontiguousarray(wd.reshape(o, kh * kq))
    else:
        wd = layer.weight.reshape(o, kh * kw).astype(np.int32)
    b = layer.weight_bits
    if b < 8:  # flash keeps the values (int16 halves of pairs, or one per word) as b-bit codes
        vals = wd.view(np.int16).reshape(o, -1) if pairs else wd
        m = vals.shape[1]
        wd = _pack_codes(vals, b, layer.weight_format)
    L = _header(layer, wd.shape, "int32", o, "depthwise", consts[2].dtype.name)
    # Flat plane, one element of slack: an odd row's last pair reads one past the plane.
    if not direct:
        L.append(f'    xs = T.alloc_buffer(({hs * ws + 1},), "int16")')
    L += [f'    wl = T.alloc_buffer(({kh * kq},), "int32")',
          f'    acc = T.alloc_buffer(({DW_PX_BLOCK},), "int32")',
          f'    res = T.alloc_buffer(({DW_PX_BLOCK},), "{layer.out_dtype}")']
    L += _border_loops(layer, hs, ws, lambda i, j: f"xs[({i}) * {ws} + {j}]",
                       f'T.int16({layer.pad_value})', "    ")
    L.append(f"    for nb, c in T.grid({n}, {o}):")
    if b < 8:
        L.append(f'        T.evaluate(T.call_extern("int32", "ep_dw_codes", T.address_of(w[c, 0]), '
                 f"wl.data, {m}, {b}, {int(pairs)}, {int(layer.weight_format == 'pow2')}))")
    else:
        L += [f"        for k in T.unroll({kh * kq}):", "            wl[k] = w[c, k]"]
    if not direct:
        L += _fill_loops(layer, hs, ws, False, lambda i, j: f"xs[({i}) * {ws} + {j}]",
                         lambda i, j: f'T.Cast("int16", x[nb, c, {i}, {j}])', "        ")

    def tile(ind: str, owv: str, npx: int) -> list[str]:
        """npx neighbouring outputs of one row: each weight is loaded once for all of them."""
        lines = [f"{ind}acc[{p}] = bias[c]" for p in range(npx)]
        lines += [f"{ind}for ry in T.unroll({kh}):", f"{ind}    for rx in T.unroll({kq}):"]
        at = f"(oh * {sh} + ry * {dh}) * {ws} + ({owv} + {{p}}) * {sw} + rx * {2 if pairs else dw}"
        if pairs:
            lines += [f'{ind}        acc[{p}] = T.call_extern("int32", "ep_smlad", T.call_extern('
                      f'"int32", "ep_ld2", T.address_of(xs[{at.format(p=p)}])), '
                      f"wl[ry * {kq} + rx], acc[{p}])" for p in range(npx)]
        else:
            s0, s1 = layer.strides

            def xv(p: int) -> str:
                if direct:
                    return f"x[nb, c, oh * {s0}, ({owv} + {p}) * {s1}]"
                return f"xs[{at.format(p=p)}]"
            lines += [f'{ind}        acc[{p}] = acc[{p}] + T.Cast("int32", {xv(p)})'
                      f" * wl[ry * {kw} + rx]" for p in range(npx)]
        lines += [f"{ind}res[{p}] = {_requant_expr(f'acc[{p}]', 'c', requant, layer)}"
                  for p in range(npx)]
        return lines + [f"{ind}y[nb, c, oh, {owv} + {p}] = res[{p}]" for p in range(npx)]

    full, tail = divmod(ow_n, DW_PX_BLOCK)
    L.append(f"        for oh in range({oh_n}):")
    if full:
        L.append(f"            for owb in range({full}):")
        L += tile("                ", f"owb * {DW_PX_BLOCK}", DW_PX_BLOCK)
    if tail:
        L += tile("            ", str(full * DW_PX_BLOCK), tail)
    return "\n".join(L), [wd] + consts


def kernel_source(layer: QLayer, features=()) -> tuple[str, list[np.ndarray]]:
    """TVMScript of the layer's kernel and its constant arguments (after the input)."""
    if layer.kind == "depthwise":
        return _depthwise_kernel(layer, dsp="dsp" in tuple(features or ()))
    if _pair_lanes(layer, features):
        return _pair_lane_conv_kernel(layer)
    return _conv_kernel(layer, dsp="dsp" in tuple(features or ()))


def build_kernel(layer: QLayer, features=()):
    from . import simd
    if simd.wants_simd(layer, features):
        src, consts = simd.simd_kernel(layer, features)
    else:
        src, consts = kernel_source(layer, features)
    return _parse(src, f"{layer.kind} {layer.x_shape}->{layer.y_shape}"), consts
