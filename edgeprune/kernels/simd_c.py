"""C of the Helium (MVE) int8 kernels, prepended to the kernels' file when one is used (simd.py).

The functions are `static inline always_inline` with every shape argument a literal at the
call site, so GCC specializes each call to its layer (constant loop bounds
and offsets). Under __ARM_FEATURE_MVE they use <arm_mve.h>; elsewhere a plain C version with the
same arguments and the same results keeps the library compilable (and correct, slowly) for
every target, e.g. after `edgeprune retarget`.

On AArch64 with NEON (Cortex-A targets, EP_NEON) the same functions run NEON code in the hot
parts: a conv step is per (pixel, channel) pair SMULL + SMLAL2 (two products in int16, when
no weight is -128: `mode | 4`) or SMULL x 2 + SADALP x 2, into int32x4 accumulators summed at
the end of the tile (VMULH's high words by SMULL + UZP2); the NHWC fill transposes 8x8 bytes;
depthwise has its own NEON functions (ep_simd_neon_dwc: 16 channels in lanes; ep_simd_neon_dw:
planar rows of 8; simd.neon_depthwise_kernel chooses).

Requantization per output channel, with total shift s and rounding constant rnd:
  clamp(zp + ((acc * M + rnd) >> s), lo, hi).
`mode` 1 (the generator checked: every s >= 32 and rnd's low word is 0): the high word of
acc * M (VMULH), plus rnd >> 32, then >> (s - 32); floor divisions compose, so this is exact.
`mode` 2 (conv only): the same with zp << (s - 32) already added to the rnd >> 32 term.
`mode` 0: 64 bits per output (ep_simd_rq1).
"""

SIMD_PRELUDE = r"""
/* ---- edgeprune Helium (MVE) int8 kernels ---- */
#include <string.h>
#define EP_AI static inline __attribute__((always_inline))
#if defined(__ARM_FEATURE_MVE) && (__ARM_FEATURE_MVE & 1)
#include <arm_mve.h>
#define EP_MVE 1
#elif defined(__ARM_NEON) && defined(__aarch64__)
#include <arm_neon.h>
#define EP_NEON 1  /* Cortex-A: the same layouts, NEON in the hot loops (see the docstring) */
#endif
#ifdef EP_NEON
#define EP_ROWS_UNROLL _Pragma("GCC unroll 4")
#else
#define EP_ROWS_UNROLL _Pragma("GCC unroll 1")
#endif

/* NCHW input plane(s) -> zero-point-padded NHWC scratch xs[Hs][Ws][C]: xs(i + pt, j + pl, c) =
   x[c][i * fh][j * fw] for i < hi_n, j < wi_n; every other cell is `pad`. */
EP_AI void ep_simd_nhwc(const int8_t *x, int8_t *xs, int32_t C, int32_t H, int32_t W, int32_t hi_n, int32_t wi_n,
                       int32_t Hs, int32_t Ws, int32_t pt, int32_t pl, int32_t pad, int32_t fh, int32_t fw) {
#ifdef EP_MVE
  {  /* the padding value everywhere first (16 bytes a store; memset goes byte/word-wise) */
    int8x16_t pv = vdupq_n_s8((int8_t)pad);
    int32_t nfill = Hs * Ws * C;
    int8_t *d = xs;
    for (int32_t k = 0; k < nfill; k += 16, d += 16) vstrbq_p_s8(d, pv, vctp8q(nfill - k));
  }
  /* 8 pixels of one channel per step: a (gather) load widened to 16 bits, a scatter store of
     their low bytes C apart. */
  uint16x8_t so = vmulq_n_u16(vidupq_n_u16(0, 1), (uint16_t)C);
  uint16x8_t go = vmulq_n_u16(vidupq_n_u16(0, 1), (uint16_t)fw);
  for (int c = 0; c < C; c++)
    for (int i = 0; i < hi_n; i++) {
      const int8_t *src = x + ((size_t)c * H + (size_t)i * fh) * W;
      int8_t *dst = xs + ((size_t)(i + pt) * Ws + pl) * C + c;
      for (int j = 0; j < wi_n; j += 8) {
        mve_pred16_t p = vctp16q(wi_n - j);
        int16x8_t v = fw == 1 ? vldrbq_z_s16(src + j, p)
                              : vldrbq_gather_offset_z_s16(src + j * fw, go, p);
        vstrbq_scatter_offset_p_s16(dst + j * C, so, v, p);
      }
    }
#else
  memset(xs, pad, (size_t)Hs * Ws * C);
  int c0 = 0;
#ifdef EP_NEON
  /* 8 channels x 8 pixels per step: 8 row loads (every fw-th byte: fw 1 or 2), an 8x8 byte
     transpose (3 levels of TRN), 8 stores of 8 channels each; the rest below, byte by byte */
  if (C == 1 && fw == 1)  /* one plane (depthwise): row copies */
    for (int i = 0; i < hi_n; i++, c0 = 1)
      memcpy(xs + (size_t)(i + pt) * Ws + pl, x + (size_t)i * fh * W, (size_t)wi_n);
  if (fw <= 2)
    for (; c0 + 8 <= C; c0 += 8)
      for (int i = 0; i < hi_n; i++) {
        const int8_t *src = x + ((size_t)c0 * H + (size_t)i * fh) * W;
        int8_t *dst = xs + ((size_t)(i + pt) * Ws + pl) * C + c0;
        size_t cs = (size_t)H * W;
        int j = 0;
        for (; j + 8 <= wi_n && j * fw + 8 * fw <= W; j += 8) {  /* reads stay in the row */
          int8x8_t r[8];
          for (int k = 0; k < 8; k++)
            r[k] = fw == 1 ? vld1_s8(src + k * cs + j) : vld2_s8(src + k * cs + 2 * j).val[0];
          int8x8x2_t t01 = vtrn_s8(r[0], r[1]), t23 = vtrn_s8(r[2], r[3]);
          int8x8x2_t t45 = vtrn_s8(r[4], r[5]), t67 = vtrn_s8(r[6], r[7]);
          int16x4x2_t u0 = vtrn_s16(vreinterpret_s16_s8(t01.val[0]), vreinterpret_s16_s8(t23.val[0]));
          int16x4x2_t u1 = vtrn_s16(vreinterpret_s16_s8(t01.val[1]), vreinterpret_s16_s8(t23.val[1]));
          int16x4x2_t u4 = vtrn_s16(vreinterpret_s16_s8(t45.val[0]), vreinterpret_s16_s8(t67.val[0]));
          int16x4x2_t u5 = vtrn_s16(vreinterpret_s16_s8(t45.val[1]), vreinterpret_s16_s8(t67.val[1]));
          /* u0: pixels 0, 4 | 2, 6 of channels 0-3; u1: 1, 5 | 3, 7; u4, u5: channels 4-7 */
          int32x2x2_t p04 = vtrn_s32(vreinterpret_s32_s16(u0.val[0]), vreinterpret_s32_s16(u4.val[0]));
          int32x2x2_t p26 = vtrn_s32(vreinterpret_s32_s16(u0.val[1]), vreinterpret_s32_s16(u4.val[1]));
          int32x2x2_t p15 = vtrn_s32(vreinterpret_s32_s16(u1.val[0]), vreinterpret_s32_s16(u5.val[0]));
          int32x2x2_t p37 = vtrn_s32(vreinterpret_s32_s16(u1.val[1]), vreinterpret_s32_s16(u5.val[1]));
          int8_t *d = dst + (size_t)j * C;
          vst1_s8(d, vreinterpret_s8_s32(p04.val[0]));
          vst1_s8(d + C, vreinterpret_s8_s32(p15.val[0]));
          vst1_s8(d + 2 * C, vreinterpret_s8_s32(p26.val[0]));
          vst1_s8(d + 3 * C, vreinterpret_s8_s32(p37.val[0]));
          vst1_s8(d + 4 * C, vreinterpret_s8_s32(p04.val[1]));
          vst1_s8(d + 5 * C, vreinterpret_s8_s32(p15.val[1]));
          vst1_s8(d + 6 * C, vreinterpret_s8_s32(p26.val[1]));
          vst1_s8(d + 7 * C, vreinterpret_s8_s32(p37.val[1]));
        }
        for (; j < wi_n; j++)
          for (int k = 0; k < 8; k++) dst[(size_t)j * C + k] = src[k * cs + (size_t)j * fw];
      }
#endif
  for (int c = c0; c < C; c++)
    for (int i = 0; i < hi_n; i++)
      for (int j = 0; j < wi_n; j++)
        xs[((size_t)(i + pt) * Ws + j + pl) * C + c] = x[((size_t)c * H + (size_t)i * fh) * W + (size_t)j * fw];
#endif
}

/* Channel c's rounding constant. The array is int32: in modes 1 and 2 (its low word 0) its
   high word per channel (4 bytes of flash, not 8), in mode 0 the int64 values' halves. */
EP_AI int64_t ep_rnd(const void *rnd, int c, int32_t mode) {
  int64_t v;
  if (mode) return (int64_t)((const int32_t *)rnd)[c] * 4294967296LL;
  memcpy(&v, (const int32_t *)rnd + 2 * c, 8);
  return v;
}

EP_AI int32_t ep_simd_rq1(int32_t acc, int32_t m, int64_t rnd, int32_t s, int32_t zp, int32_t lo,
                         int32_t hi) {
  int64_t v = (((int64_t)acc * m + rnd) >> s) + zp;
  return (int32_t)(v < lo ? lo : v > hi ? hi : v);
}

#ifdef EP_MVE
/* Four accumulators (lanes) of one output channel -> requantized, clamped int32 lanes. */
EP_AI int32x4_t ep_simd_rq(int32x4_t acc, int32_t m, int64_t rnd, int32_t s, int32_t zp,
                          int32_t lo, int32_t hi, int32_t mode) {
  int32x4_t h;
  if (mode == 1) {
    int32x4_t mv = vdupq_n_s32(m);
    h = vmulhq_s32(acc, mv);
    h = vshlq_r_s32(vaddq_n_s32(h, (int32_t)(rnd >> 32)), 32 - s);
    h = vaddq_n_s32(h, zp);
  } else {
    int32_t a[4];
    vst1q_s32(a, acc);
    for (int k = 0; k < 4; k++) a[k] = ep_simd_rq1(a[k], m, rnd, s, zp, lo, hi);
    return vld1q_s32(a);
  }
  return vminq_s32(vmaxq_s32(h, vdupq_n_s32(lo)), vdupq_n_s32(hi));
}

/* Store lanes < npx of v as int8 or int16 at y[0], y[1], ... */
EP_AI void ep_simd_store(void *y, int32x4_t v, int32_t npx, int32_t out16) {
  mve_pred16_t p = vctp32q(npx);
  if (out16) vstrhq_p_s32((int16_t *)y, v, p); else vstrbq_p_s32((int8_t *)y, v, p);
}
#endif

#ifdef EP_MVE
/* 16 bytes at p, or only the first `left` (< 16) of them, the rest 0. */
#define EP_LD(p, left) ((left) >= 16 ? vldrbq_s8(p) : vldrbq_z_s8((p), vctp8q(left)))
/* One 16-byte step of a conv tile (ep_simd_conv_t): G = 2: two pixels' inputs x two channels'
   weights; G = 4: one pixel x four channels. In asm with post-incremented pointers: GCC 12 left
   alone spills the accumulators (VMLADAVA needs even registers: "Te") or keeps one address
   register per load. EP_STEP: the same in C, for a partial last step (predicated loads). */
#define EP_STEP_ASM(PA, PB, WP)                                                        \
  do {                                                                                 \
    if (G == 2)                                                                        \
      __asm__("vldrb.8 q0, [%[pa]], #16\n\tvldrb.8 q1, [%[pb]], #16\n\t"               \
              "vldrb.8 q2, [%[wp]], #16\n\tvldrb.8 q3, [%[wp]], #16\n\t"               \
              "vmladava.s8 %[a0], q0, q2\n\tvmladava.s8 %[a1], q0, q3\n\t"             \
              "vmladava.s8 %[a2], q1, q2\n\tvmladava.s8 %[a3], q1, q3"                  \
              : [a0] "+Te"(a0), [a1] "+Te"(a1), [a2] "+Te"(a2), [a3] "+Te"(a3),       \
                [pa] "+r"(PA), [pb] "+r"(PB), [wp] "+r"(WP)                            \
              : "m"(*(const int8_t(*)[16])(PA)), "m"(*(const int8_t(*)[16])(PB)),      \
                "m"(*(const int8_t(*)[32])(WP))                                        \
              : "q0", "q1", "q2", "q3");                                               \
    else                                                                               \
      __asm__("vldrb.8 q0, [%[pa]], #16\n\tvldrb.8 q1, [%[wp]], #16\n\t"               \
              "vldrb.8 q2, [%[wp]], #16\n\tvmladava.s8 %[a0], q0, q1\n\t"              \
              "vldrb.8 q3, [%[wp]], #16\n\tvmladava.s8 %[a1], q0, q2\n\t"              \
              "vldrb.8 q1, [%[wp]], #16\n\tvmladava.s8 %[a2], q0, q3\n\t"              \
              "vmladava.s8 %[a3], q0, q1"                                              \
              : [a0] "+Te"(a0), [a1] "+Te"(a1), [a2] "+Te"(a2), [a3] "+Te"(a3),       \
                [pa] "+r"(PA), [wp] "+r"(WP)                                           \
              : "m"(*(const int8_t(*)[16])(PA)), "m"(*(const int8_t(*)[64])(WP))       \
              : "q0", "q1", "q2", "q3");                                               \
  } while (0)
#define EP_STEP(LX0, LX1)                                                   \
  do {                                                                      \
    int8x16_t v0_ = (LX0);                                                  \
    if (G == 2) {                                                           \
      int8x16_t v1_ = (LX1), w0_ = vldrbq_s8(wp), w1_ = vldrbq_s8(wp + 16); \
      a0 = vmladavaq_s8(a0, v0_, w0_);                                      \
      a1 = vmladavaq_s8(a1, v0_, w1_);                                      \
      a2 = vmladavaq_s8(a2, v1_, w0_);                                      \
      a3 = vmladavaq_s8(a3, v1_, w1_);                                      \
    } else {                                                                \
      a0 = vmladavaq_s8(a0, v0_, vldrbq_s8(wp));                            \
      a1 = vmladavaq_s8(a1, v0_, vldrbq_s8(wp + 16));                       \
      a2 = vmladavaq_s8(a2, v0_, vldrbq_s8(wp + 32));                       \
      a3 = vmladavaq_s8(a3, v0_, vldrbq_s8(wp + 48));                       \
    }                                                                       \
  } while (0)
#elif defined(EP_NEON)
/* NEON: one 16-byte step of a conv tile into int32x4 accumulators v0..v3 (lanes summed at the
   end of the tile): per (pixel, channel) pair two SMULLs (8 int16 products each, low and high
   halves) and two SADALPs (pairwise into int32). With `w127` (no weight is -128: a product is
   at most 128 * 127, two fit in int16) SMULL + SMLAL2 + one SADALP instead; two products of
   (-128) * (-128) would overflow it. */
#define EP_NMAC(V, X, W)                                                                         \
  V = w127 ? vpadalq_s16(V, vmlal_high_s8(vmull_s8(vget_low_s8(X), vget_low_s8(W)), X, W))     \
           : vpadalq_s16(vpadalq_s16(V, vmull_s8(vget_low_s8(X), vget_low_s8(W))), vmull_high_s8(X, W))
#define EP_NSTEP(LX0, LX1)                                                   \
  do {                                                                       \
    int8x16_t v0_ = (LX0);                                                   \
    if (G == 2) {                                                            \
      int8x16_t v1_ = (LX1), w0_ = vld1q_s8(wp), w1_ = vld1q_s8(wp + 16);    \
      EP_NMAC(v0, v0_, w0_);                                                 \
      EP_NMAC(v1, v0_, w1_);                                                 \
      EP_NMAC(v2, v1_, w0_);                                                 \
      EP_NMAC(v3, v1_, w1_);                                                 \
    } else {                                                                 \
      EP_NMAC(v0, v0_, vld1q_s8(wp));                                        \
      EP_NMAC(v1, v0_, vld1q_s8(wp + 16));                                   \
      EP_NMAC(v2, v0_, vld1q_s8(wp + 32));                                   \
      EP_NMAC(v3, v0_, vld1q_s8(wp + 48));                                   \
    }                                                                        \
  } while (0)
#endif

/* conv (groups = 1) / dense on an NHWC int8 image. The reduction of one output is nsy x nsx
   runs of `seg` contiguous bytes, at offsets a * offy + b * offx from the pixel's corner (a
   kernel row of kw x C bytes when the kernel is not dilated horizontally, a tap of C bytes
   otherwise). A tile is 4 outputs: G = 2 output channels x 2 pixels (consecutive in NCHW
   order), or G = 4 channels x 1 pixel. Weights are int8, per group of G channels in the order
   the tile reads them: [run][16-byte step][channel][16], zero-padded past `seg` (and past O).
   Each step costs 4 / G input loads, G weight loads and 4 VMLADAVA (16 MACs each). With
   `patch` set, the tile's windows are first gathered into patch[pixel][segp] (one run of
   kh x kw x C bytes, fewer vectors when C is small; the MAC loop then reads all segp bytes,
   those past the window unwritten, their weights 0). qp[group][3][4]: the requantization
   multiplier, rnd >> 32 and -(s - 32) per lane (lane = pixel * G + channel). */
EP_AI void ep_simd_conv_t(const int8_t *xs, int8_t *patch, const int8_t *w, const int32_t *bias,
                         const int32_t *mult, const void *rnd, const int32_t *shift,
                         const int32_t *qp, const int32_t *taps, void *y, int32_t C,
                         int32_t Ws, int32_t OH, int32_t OW, int32_t O, int32_t sh, int32_t sw,
                         int32_t nsy, int32_t nsx,
                         int32_t offy, int32_t offx, int32_t seg, int32_t pseg, int32_t pnsy,
                         int32_t pnsx, int32_t poffy, int32_t poffx, int32_t mode, int32_t zp,
                         int32_t lo, int32_t hi, int32_t out16, int32_t G) {
  int w127 = mode >> 2;  /* mode | 4: no weight is -128 (for EP_NMAC) */
  int segp = (seg + 15) & ~15;
  int P = 4 / G, ohw = OH * OW, esz = out16 ? 2 : 1;
  mode &= 3;
  int ng = (O + G - 1) / G, last = O - (ng - 1) * G;  /* channels in the last group */
#ifdef EP_MVE
  uint32_t so[4];
  for (int l = 0; l < 4; l++) so[l] = (uint32_t)(((l % G) * ohw + l / G) * esz);
  uint32x4_t soff = vld1q_u32(so);  /* lane -> byte offset of its output */
#else
  (void)qp, (void)mode, (void)last, (void)esz, (void)w127;
#endif
  int oh = 0, ow = 0;
  for (int i = 0; i < ohw; i += P) {
    const int8_t *x0 = xs + ((size_t)oh * sh * Ws + (size_t)ow * sw) * C, *x1 = x0;
    int two = P == 2 && i + 1 < ohw;  /* else lanes 2, 3 repeat pixel i (not stored) */
    if (++ow == OW) ow = 0, oh++;
    if (two) {
      x1 = xs + ((size_t)oh * sh * Ws + (size_t)ow * sw) * C;
      if (++ow == OW) ow = 0, oh++;
    }
    if (patch) {  /* gather the windows: pnsy x pnsx pieces of pseg bytes each, or (pnsx < 0)
                     pnsy pieces at the offsets taps[] (the taps an intra-kernel pattern keeps) */
      for (int p = 0; p < P; p++) {
        int8_t *d = patch + p * segp;
        for (int a = 0; a < pnsy; a++)
          for (int b = 0; b < (pnsx < 0 ? 1 : pnsx); b++, d += pseg) {
            const int8_t *src = (p ? x1 : x0) + (pnsx < 0 ? taps[a] : a * poffy + b * poffx);
#ifdef EP_MVE
            for (int k = 0; k < pseg; k += 16) {
              mve_pred16_t pr = vctp8q(pseg - k);
              vstrbq_p_s8(d + k, vldrbq_z_s8(src + k, pr), pr);
            }
#else
            memcpy(d, src, (size_t)pseg);
#endif
          }
      }
      x0 = patch;
      x1 = P == 2 ? patch + segp : patch;
    }
    const int8_t *wp = w;
#ifdef EP_MVE
    char *yo = (char *)y + (size_t)i * esz;
#endif
#pragma GCC unroll 1
    for (int g = 0; g < ng; g++) {
      int o = g * G;
      int32_t a0 = bias[o], a1 = bias[o + 1];
      int32_t a2 = G == 2 ? a0 : bias[o + 2], a3 = G == 2 ? a1 : bias[o + 3];
#ifdef EP_NEON
      int32x4_t v0 = vdupq_n_s32(0), v1 = v0, v2 = v0, v3 = v0;
#endif
      EP_ROWS_UNROLL  /* (Helium: 1, for code size; NEON: the rows' loop costs register moves) */
      for (int a = 0; a < nsy; a++)
#pragma GCC unroll 1
        for (int b = 0; b < nsx; b++) {
          const int8_t *xa = x0 + a * offy + b * offx, *xb = x1 + a * offy + b * offx;
#ifdef EP_MVE
          /* whole 16-byte steps (unrolled: the loop overhead would cost as much as a step),
             then a partial one */
          const int8_t *pa = xa, *pb = xb;
#pragma GCC unroll 4
          for (int k = 0; k < (seg & ~15); k += 16) EP_STEP_ASM(pa, pb, wp);
          if (seg & 15) {
            mve_pred16_t pr = vctp8q(seg & 15);
            int k = seg & ~15;
            EP_STEP(vldrbq_z_s8(xa + k, pr), vldrbq_z_s8(xb + k, pr));
            wp += 16 * G;
          }
#elif defined(EP_NEON)
          const int8_t *pa = xa, *pb = xb;
#pragma GCC unroll 4
          for (int k = 0; k < (seg & ~15); k += 16, pa += 16, pb += 16, wp += 16 * G)
            EP_NSTEP(vld1q_s8(pa), vld1q_s8(pb));
          if (seg & 15) {  /* a partial last step: its bytes copied into zeroed vectors (the
                              run may end at the end of the input, `direct`) */
            int8_t ta[16] = {0}, tb[16] = {0};
            memcpy(ta, pa, (size_t)(seg & 15));
            memcpy(tb, pb, (size_t)(seg & 15));
            EP_NSTEP(vld1q_s8(ta), vld1q_s8(tb));
            wp += 16 * G;
          }
#else
          for (int k = 0; k < seg; k += 16, wp += 16 * G)
            for (int j = k; j < k + 16 && j < seg; j++) {
              const int8_t *wj = wp + (j - k);
              if (G == 2) {
                a0 += xa[j] * wj[0], a1 += xa[j] * wj[16];
                a2 += xb[j] * wj[0], a3 += xb[j] * wj[16];
              } else {
                a0 += xa[j] * wj[0], a1 += xa[j] * wj[16];
                a2 += xa[j] * wj[32], a3 += xa[j] * wj[48];
              }
            }
#endif
        }
#ifdef EP_MVE
      int32x4_t acc;  /* two VMOVs of two core registers each (GCC: one per lane) */
      __asm__("vmov %q0[2], %q0[0], %1, %3\n\tvmov %q0[3], %q0[1], %2, %4"
              : "=&w"(acc) : "r"(a0), "r"(a1), "r"(a2), "r"(a3));
      int32x4_t h;
      if (mode) {
        const int32_t *q = qp + g * 12;
        h = vmulhq_s32(acc, vld1q_s32(q));
        h = vshlq_s32(vaddq_s32(h, vld1q_s32(q + 4)), vld1q_s32(q + 8));
        if (mode == 1) h = vaddq_n_s32(h, zp);  /* mode 2: zp is in qp's rnd term already */
        h = vminq_s32(vmaxq_s32(h, vdupq_n_s32(lo)), vdupq_n_s32(hi));
      } else {
        int32_t r[4];
        vst1q_s32(r, acc);
        for (int l = 0; l < 4; l++) {
          int c = o + l % G;
          r[l] = ep_simd_rq1(r[l], mult[c], ep_rnd(rnd, c, mode), shift[c], zp, lo, hi);
        }
        h = vld1q_s32(r);
      }
      if ((two || P == 1) && (g < ng - 1 || last == G)) {  /* all 4 lanes are outputs */
        if (out16) vstrhq_scatter_offset_s32((int16_t *)(yo + (size_t)o * ohw * esz), soff, h);
        else vstrbq_scatter_offset_s32((int8_t *)(yo + (size_t)o * ohw * esz), soff, h);
        continue;
      }
      /* a partial tile (the last pixel of an odd count, or a last group short of G channels):
         lane by lane below. The predicated scatter store this used to be also wrote the
         masked lanes (2 output channels, odd pixel count: seen in QEMU, GCC 12), i.e. the
         next channel's first output. */
      int32_t r[4];
      vst1q_s32(r, h);
#else
      int32_t r[4] = {a0, a1, a2, a3};
#ifdef EP_NEON
      /* lanes l = the tile's 4 sums (pixel l / G, channel l % G), then requantized as on Helium */
      int32x4_t acc = vpaddq_s32(vpaddq_s32(v0, v1), vpaddq_s32(v2, v3)), hv;
      if (G == 2) {  /* biases (o, o + 1, o, o + 1): one 64-bit load, duplicated */
        int64_t b2;
        memcpy(&b2, bias + o, 8);
        acc = vaddq_s32(acc, vreinterpretq_s32_s64(vdupq_n_s64(b2)));
      } else {
        acc = vaddq_s32(acc, vld1q_s32(bias + o));
      }
      if (mode) {  /* VMULH: the high words of the 64-bit products */
        const int32_t *q = qp + g * 12;
        int32x4_t mq = vld1q_s32(q);
        hv = vuzp2q_s32(vreinterpretq_s32_s64(vmull_s32(vget_low_s32(acc), vget_low_s32(mq))),
                        vreinterpretq_s32_s64(vmull_high_s32(acc, mq)));
        hv = vshlq_s32(vaddq_s32(hv, vld1q_s32(q + 4)), vld1q_s32(q + 8));
        if (mode == 1) hv = vaddq_s32(hv, vdupq_n_s32(zp));
        hv = vminq_s32(vmaxq_s32(hv, vdupq_n_s32(lo)), vdupq_n_s32(hi));
      } else {
        vst1q_s32(r, acc);
        for (int l = 0; l < 4; l++) {
          int c = o + l % G;
          r[l] = ep_simd_rq1(r[l], mult[c], ep_rnd(rnd, c, mode), shift[c], zp, lo, hi);
        }
        hv = vld1q_s32(r);
      }
      if (!out16 && (G == 4 || two) && o + G <= O) {  /* all 4 lanes: byte stores by lane */
        int8x16_t b = vreinterpretq_s8_s32(hv);
        int8_t *yb = (int8_t *)y + (size_t)o * ohw + i;  /* lane l: channel o + l % G, pixel i + l / G */
        vst1q_lane_s8(yb, b, 0);
        vst1q_lane_s8(yb + ohw, b, 4);
        vst1q_lane_s8(yb + (G == 2 ? 1 : 2 * ohw), b, 8);
        vst1q_lane_s8(yb + (G == 2 ? ohw + 1 : 3 * ohw), b, 12);
        continue;
      }
      vst1q_s32(r, hv);
#endif
#endif
      for (int l = 0; l < 4; l++) {
        int c = o + l % G, p = l / G;
        if (c >= O || (p && !two)) continue;
#if defined(EP_NEON) || defined(EP_MVE)
        int32_t v = r[l];
#else
        int32_t v = ep_simd_rq1(r[l], mult[c], ep_rnd(rnd, c, mode), shift[c], zp, lo, hi);
#endif
        size_t at = (size_t)c * ohw + (size_t)i + (size_t)p;
        if (out16) ((int16_t *)y)[at] = (int16_t)v; else ((int8_t *)y)[at] = (int8_t)v;
      }
    }
  }
}

/* One image at a time: the NHWC scratch (unless the input already is one, `direct`: dense, or
   a 1x1 image), then the tiles. */
EP_AI void ep_simd_conv(const int8_t *x, int8_t *xs, const int8_t *w, const int32_t *bias,
                       const int32_t *mult, const void *rnd, const int32_t *shift,
                       const int32_t *qp, const int32_t *taps, void *y,
                       int32_t n, int32_t C, int32_t H, int32_t W, int32_t hi_n, int32_t wi_n,
                       int32_t Hs, int32_t Ws, int32_t pt, int32_t pl, int32_t pad, int32_t fh,
                       int32_t fw, int32_t direct, int32_t patch_off, int32_t OH, int32_t OW,
                       int32_t O, int32_t sh, int32_t sw, int32_t nsy, int32_t nsx, int32_t offy,
                       int32_t offx, int32_t seg, int32_t pseg, int32_t pnsy, int32_t pnsx,
                       int32_t poffy, int32_t poffx, int32_t mode, int32_t zp, int32_t lo,
                       int32_t hi, int32_t out16, int32_t G) {
  for (int nb = 0; nb < n; nb++) {
    const int8_t *img = x + (size_t)nb * C * H * W;
    if (!direct) {
      ep_simd_nhwc(img, xs, C, H, W, hi_n, wi_n, Hs, Ws, pt, pl, pad, fh, fw);
      img = xs;
    }
    ep_simd_conv_t(img, patch_off >= 0 ? xs + patch_off : 0, w, bias, mult, rnd, shift, qp, taps,
                  (char *)y + (size_t)nb * O * OH * OW * (out16 ? 2 : 1), C, Ws, OH, OW, O, sh,
                  sw, nsy, nsx, offy, offx, seg, pseg, pnsy, pnsx, poffy, poffx, mode, zp, lo, hi,
                  out16, G);
  }
}

/* depthwise on one zero-point-padded int8 plane per channel: a tile is 8 outputs, two vectors
   of 4, per tap one load per vector and a VMLA by the weight held in a core register. Rows of a
   multiple of 8 outputs (stride 1): contiguous loads. Else the tile is 8 consecutive outputs in
   NCHW order, across rows (narrow images waste no lanes), gathered with the offsets po[] (per
   output its window's corner in the plane, the last output repeated past the end). */
EP_AI void ep_simd_dw(const int8_t *x, int8_t *xs, const int8_t *w, const int32_t *bias,
                     const int32_t *mult, const void *rnd, const int32_t *shift,
                     const int32_t *po, void *y, int32_t n, int32_t C, int32_t H, int32_t W,
                     int32_t hi_n, int32_t wi_n, int32_t Hs, int32_t Ws, int32_t pt, int32_t pl,
                     int32_t pad, int32_t fh, int32_t fw, int32_t OH, int32_t OW, int32_t kh,
                     int32_t kw, int32_t sh, int32_t sw, int32_t dh, int32_t dw, int32_t mode,
                     int32_t zp, int32_t lo, int32_t hi, int32_t out16) {
  int esz = out16 ? 2 : 1, ohw = OH * OW;
#ifndef EP_MVE
  (void)mode, (void)po;
#endif
  for (int nb = 0; nb < n; nb++)
    for (int c = 0; c < C; c++) {
      const int8_t *xc = x + ((size_t)nb * C + c) * H * W;
      ep_simd_nhwc(xc, xs, 1, H, W, hi_n, wi_n, Hs, Ws, pt, pl, pad, fh, fw);
      const int8_t *wc = w + (size_t)c * kh * kw;
      int32_t m = mult[c], s = shift[c], b0 = bias[c];
      int64_t r = ep_rnd(rnd, c, mode);
      char *yc = (char *)y + ((size_t)nb * C + c) * ohw * esz;
#ifdef EP_MVE
      if (OW % 8 == 0 && sw == 1) {  /* whole rows of 8: contiguous loads, no offset table */
        for (int oh = 0; oh < OH; oh++)
          for (int ow0 = 0; ow0 < OW; ow0 += 8) {
            const int8_t *row = xs + (size_t)oh * sh * Ws + ow0;
            int32x4_t a0 = vdupq_n_s32(b0), a1 = a0;
            for (int ry = 0; ry < kh; ry++)
              for (int rx = 0; rx < kw; rx++) {
                const int8_t *s0 = row + ry * dh * Ws + rx * dw;
                int32_t wk = wc[ry * kw + rx];
                /* asm: GCC 12 keeps one address register per load and spills; a widening
                   VLDRB needs a low base register ("l") */
                __asm__("vldrb.s32 q0, [%[p]]\n\tvldrb.s32 q1, [%[p], #4]\n\t"
                        "vmla.s32 %q[a0], q0, %[w]\n\tvmla.s32 %q[a1], q1, %[w]"
                        : [a0] "+w"(a0), [a1] "+w"(a1)
                        : [p] "l"(s0), [w] "r"(wk), "m"(*(const int8_t(*)[8])s0)
                        : "q0", "q1");
              }
            char *yo = yc + ((size_t)oh * OW + ow0) * esz;
            ep_simd_store(yo, ep_simd_rq(a0, m, r, s, zp, lo, hi, mode), 4, out16);
            ep_simd_store(yo + 4 * esz, ep_simd_rq(a1, m, r, s, zp, lo, hi, mode), 4, out16);
          }
        continue;
      }
      for (int i = 0; i < ohw; i += 8) {
        uint32x4_t o0 = vld1q_u32((const uint32_t *)po + i);
        uint32x4_t o1 = vld1q_u32((const uint32_t *)po + i + 4);
        int32x4_t a0 = vdupq_n_s32(b0), a1 = a0;
        for (int ry = 0; ry < kh; ry++)
          for (int rx = 0; rx < kw; rx++) {
            const int8_t *s0 = xs + ry * dh * Ws + rx * dw;
            int32_t wk = wc[ry * kw + rx];
            /* the same in asm, with gathers ("memory": they read anywhere in the plane) */
            __asm__("vldrb.s32 q0, [%[p], %q[o0]]\n\tvldrb.s32 q1, [%[p], %q[o1]]\n\t"
                    "vmla.s32 %q[a0], q0, %[w]\n\tvmla.s32 %q[a1], q1, %[w]"
                    : [a0] "+w"(a0), [a1] "+w"(a1)
                    : [p] "l"(s0), [w] "r"(wk), [o0] "w"(o0), [o1] "w"(o1)
                    : "q0", "q1", "memory");
          }
        int left = ohw - i;
        ep_simd_store(yc + (size_t)i * esz, ep_simd_rq(a0, m, r, s, zp, lo, hi, mode),
                     left < 4 ? left : 4, out16);
        if (left > 4)
          ep_simd_store(yc + (size_t)(i + 4) * esz, ep_simd_rq(a1, m, r, s, zp, lo, hi, mode),
                       left - 4, out16);
      }
#else
      for (int oh = 0; oh < OH; oh++)
        for (int ow = 0; ow < OW; ow++) {
          const int8_t *corner = xs + (size_t)oh * sh * Ws + (size_t)ow * sw;
          int32_t acc = b0;
          for (int ry = 0; ry < kh; ry++)
            for (int rx = 0; rx < kw; rx++)
              acc += corner[ry * dh * Ws + rx * dw] * wc[ry * kw + rx];
          int32_t v = ep_simd_rq1(acc, m, r, s, zp, lo, hi);
          if (out16) ((int16_t *)yc)[oh * OW + ow] = (int16_t)v;
          else ((int8_t *)yc)[oh * OW + ow] = (int8_t)v;
        }
#endif
    }
}

/* Requantized residual add, exact in 32 bits for int8 inputs: with M = Mh * 2^16 + Ml and
   rnd = Rh * 2^16 + Rl, a*Ma + b*Mb + rnd = (Sh + Rh) * 2^16 + (Sl + Rl), Sh = a*Mah + b*Mbh,
   Sl = a*Mal + b*Mbl (each < 2^25); so (.. >> sh) = (Sh + Rh + ((Sl + Rl) >> 16)) >> (sh - 16). */
EP_AI void ep_simd_add(const int8_t *a, const int8_t *b, void *y, int32_t n, int32_t mah,
                      int32_t mal, int32_t mbh, int32_t mbl, int32_t rh, int32_t rl, int32_t t,
                      int32_t zp, int32_t lo, int32_t hi, int32_t out16) {
#ifdef EP_MVE
  for (int32_t i = 0; i < n; i += 4) {
    /* whole vectors unpredicated (GCC re-derives the pointers from a predicated loop) */
    mve_pred16_t p = n - i >= 4 ? 0xFFFF : vctp32q(n - i);
    int32x4_t va = n - i >= 4 ? vldrbq_s32(a + i) : vldrbq_z_s32(a + i, p);
    int32x4_t vb = n - i >= 4 ? vldrbq_s32(b + i) : vldrbq_z_s32(b + i, p);
    int32x4_t sh = vmlaq_n_s32(vmulq_n_s32(va, mah), vb, mbh);
    int32x4_t sl = vaddq_n_s32(vmlaq_n_s32(vmulq_n_s32(va, mal), vb, mbl), rl);
    int32x4_t v = vaddq_s32(vaddq_n_s32(sh, rh), vshrq_n_s32(sl, 16));
    v = vaddq_n_s32(vshlq_r_s32(v, -t), zp);
    v = vminq_s32(vmaxq_s32(v, vdupq_n_s32(lo)), vdupq_n_s32(hi));
    if (out16) vstrhq_p_s32((int16_t *)y + i, v, p); else vstrbq_p_s32((int8_t *)y + i, v, p);
  }
#else
  for (int32_t i = 0; i < n; i++) {
    int32_t v = ((a[i] * mah + b[i] * mbh + rh + ((a[i] * mal + b[i] * mbl + rl) >> 16)) >> t) + zp;
    v = v < lo ? lo : v > hi ? hi : v;
    if (out16) ((int16_t *)y)[i] = (int16_t)v; else ((int8_t *)y)[i] = (int8_t)v;
  }
#endif
}

/* Entry points, typed as TVM declares its externs (int32_t is `long` on arm-none-eabi). */
#define EP_MVE_CONV_ARGS int32_t n, int32_t C, int32_t H, int32_t W, int32_t hi_n, int32_t wi_n, \
  int32_t Hs, int32_t Ws, int32_t pt, int32_t pl, int32_t pad, int32_t fh, int32_t fw, \
  int32_t direct, int32_t patch_off, int32_t OH, int32_t OW, int32_t O, int32_t sh, int32_t sw, \
  int32_t nsy, int32_t nsx, int32_t offy, int32_t offx, int32_t seg, int32_t pseg, int32_t pnsy, \
  int32_t pnsx, int32_t poffy, int32_t poffx, int32_t mode, int32_t zp, int32_t lo, int32_t hi, int32_t G
#define EP_MVE_CONV_PASS n, C, H, W, hi_n, wi_n, Hs, Ws, pt, pl, pad, fh, fw, direct, patch_off, \
  OH, OW, O, sh, sw, nsy, nsx, offy, offx, seg, pseg, pnsy, pnsx, poffy, poffx, mode, zp, lo, hi
#define EP_MVE_DW_ARGS int32_t n, int32_t C, int32_t H, int32_t W, int32_t hi_n, int32_t wi_n, \
  int32_t Hs, int32_t Ws, int32_t pt, int32_t pl, int32_t pad, int32_t fh, int32_t fw, int32_t OH, \
  int32_t OW, int32_t kh, int32_t kw, int32_t sh, int32_t sw, int32_t dh, int32_t dw, int32_t mode, \
  int32_t zp, int32_t lo, int32_t hi
#define EP_MVE_DW_PASS n, C, H, W, hi_n, wi_n, Hs, Ws, pt, pl, pad, fh, fw, OH, OW, kh, kw, sh, sw, \
  dh, dw, mode, zp, lo, hi
#define EP_MVE_PTRS int8_t *x, int8_t *xs, int8_t *w, int32_t *bias, int32_t *mult, int32_t *rnd, \
  int32_t *shift
EP_AI int32_t ep_simd_conv8(EP_MVE_PTRS, int32_t *qp, int32_t *taps, int8_t *y,
                            EP_MVE_CONV_ARGS) {
  ep_simd_conv(x, xs, w, bias, mult, rnd, shift, qp, taps, y, EP_MVE_CONV_PASS, 0, G);
  return 0;
}
EP_AI int32_t ep_simd_conv16(EP_MVE_PTRS, int32_t *qp, int32_t *taps, int16_t *y,
                             EP_MVE_CONV_ARGS) {
  ep_simd_conv(x, xs, w, bias, mult, rnd, shift, qp, taps, y, EP_MVE_CONV_PASS, 1, G);
  return 0;
}
EP_AI int32_t ep_simd_dw8(EP_MVE_PTRS, int32_t *po, int8_t *y, EP_MVE_DW_ARGS) {
  ep_simd_dw(x, xs, w, bias, mult, rnd, shift, po, y, EP_MVE_DW_PASS, 0);
  return 0;
}
EP_AI int32_t ep_simd_dw16(EP_MVE_PTRS, int32_t *po, int16_t *y, EP_MVE_DW_ARGS) {
  ep_simd_dw(x, xs, w, bias, mult, rnd, shift, po, y, EP_MVE_DW_PASS, 1);
  return 0;
}
EP_AI int32_t ep_simd_add8(int8_t *a, int8_t *b, int8_t *y, int32_t n, int32_t mah, int32_t mal,
                          int32_t mbh, int32_t mbl, int32_t rh, int32_t rl, int32_t t, int32_t zp,
                          int32_t lo, int32_t hi) {
  ep_simd_add(a, b, y, n, mah, mal, mbh, mbl, rh, rl, t, zp, lo, hi, 0);
  return 0;
}
EP_AI int32_t ep_simd_add16(int8_t *a, int8_t *b, int16_t *y, int32_t n, int32_t mah, int32_t mal,
                           int32_t mbh, int32_t mbl, int32_t rh, int32_t rl, int32_t t, int32_t zp,
                           int32_t lo, int32_t hi) {
  ep_simd_add(a, b, y, n, mah, mal, mbh, mbl, rh, rl, t, zp, lo, hi, 1);
  return 0;
}

/* depthwise for NEON (Cortex-A; simd.neon_depthwise_kernel): one zero-point-padded int8 plane
   per channel, as ep_simd_dw; a tile is 8 outputs of a row, per tap one 8-lane load (stride 1;
   stride 2: VLD2's even bytes; else lane by lane), SXTL and two SMLALs by the weight. The tile
   may read up to 8 * sw bytes past its row: the scratch has that much slack past the plane. */
EP_AI void ep_simd_neon_dw(const int8_t *x, int8_t *xs, const int8_t *w, const int32_t *bias,
                          const int32_t *mult, const void *rnd, const int32_t *shift, void *y,
                          int32_t n, int32_t C, int32_t H, int32_t W, int32_t hi_n, int32_t wi_n,
                          int32_t Hs, int32_t Ws, int32_t pt, int32_t pl, int32_t pad, int32_t fh,
                          int32_t fw, int32_t OH, int32_t OW, int32_t kh, int32_t kw, int32_t sh,
                          int32_t sw, int32_t dh, int32_t dw, int32_t mode, int32_t zp, int32_t lo,
                          int32_t hi, int32_t out16) {
  int esz = out16 ? 2 : 1;
#ifndef EP_NEON
  (void)mode;
#endif
  for (int nb = 0; nb < n; nb++)
    for (int c = 0; c < C; c++) {
      ep_simd_nhwc(x + ((size_t)nb * C + c) * H * W, xs, 1, H, W, hi_n, wi_n, Hs, Ws, pt, pl, pad,
                  fh, fw);
      const int8_t *wc = w + (size_t)c * kh * kw;
      int32_t m = mult[c], s = shift[c], b0 = bias[c];
      int64_t r = ep_rnd(rnd, c, mode);
      char *yc = (char *)y + ((size_t)nb * C + c) * OH * OW * esz;
      for (int oh = 0; oh < OH; oh++)
        for (int ow0 = 0; ow0 < OW; ow0 += 8) {
          const int8_t *row = xs + (size_t)oh * sh * Ws + (size_t)ow0 * sw;
          char *yo = yc + ((size_t)oh * OW + ow0) * esz;
          int left = OW - ow0;
#ifdef EP_NEON
          int32x4_t a0 = vdupq_n_s32(b0), a1 = a0;
          for (int ry = 0; ry < kh; ry++)
            for (int rx = 0; rx < kw; rx++) {
              const int8_t *s0 = row + ry * dh * Ws + rx * dw;
              int8x8_t v;
              if (sw == 1) v = vld1_s8(s0);
              else if (sw == 2) v = vld2_s8(s0).val[0];
              else {
                int8_t t[8];
                for (int p = 0; p < 8; p++) t[p] = s0[p * sw];
                v = vld1_s8(t);
              }
              int16x8_t v16 = vmovl_s8(v);
              int16_t wk = wc[ry * kw + rx];
              a0 = vmlal_n_s16(a0, vget_low_s16(v16), wk);
              a1 = vmlal_high_n_s16(a1, v16, wk);
            }
          int32x4_t q[2] = {a0, a1};
          for (int k = 0; k < 2; k++) {
            if (mode == 1) {  /* as ep_simd_rq: the high words of acc * m, + rnd >> 32, >> s - 32 */
              int32x4_t mv = vdupq_n_s32(m), h;
              h = vuzp2q_s32(vreinterpretq_s32_s64(vmull_s32(vget_low_s32(q[k]), vget_low_s32(mv))),
                             vreinterpretq_s32_s64(vmull_high_s32(q[k], mv)));
              h = vshlq_s32(vaddq_s32(h, vdupq_n_s32((int32_t)(r >> 32))), vdupq_n_s32(32 - s));
              h = vaddq_s32(h, vdupq_n_s32(zp));
              q[k] = vminq_s32(vmaxq_s32(h, vdupq_n_s32(lo)), vdupq_n_s32(hi));
            } else {
              int32_t t[4];
              vst1q_s32(t, q[k]);
              for (int l = 0; l < 4; l++) t[l] = ep_simd_rq1(t[l], m, r, s, zp, lo, hi);
              q[k] = vld1q_s32(t);
            }
          }
          int16x8_t h16 = vcombine_s16(vmovn_s32(q[0]), vmovn_s32(q[1]));  /* in [lo, hi] */
          if (left >= 8) {
            if (out16) vst1q_s16((int16_t *)yo, h16); else vst1_s8((int8_t *)yo, vmovn_s16(h16));
          } else if (!out16) {  /* left < 8 bytes: 4-, 2-, 1-byte lane stores */
            int8x8_t b8 = vmovn_s16(h16);
            int8_t *yb = (int8_t *)yo;
            if (left & 4) {
              vst1_lane_s32((int32_t *)yb, vreinterpret_s32_s8(b8), 0);
              b8 = vext_s8(b8, b8, 4), yb += 4;
            }
            if (left & 2) {
              vst1_lane_s16((int16_t *)yb, vreinterpret_s16_s8(b8), 0);
              b8 = vext_s8(b8, b8, 2), yb += 2;
            }
            if (left & 1) vst1_lane_s8(yb, b8, 0);
          } else {
            int16_t t[8];
            vst1q_s16(t, h16);
            for (int p = 0; p < left; p++) ((int16_t *)yo)[p] = t[p];
          }
#else
          for (int p = 0; p < 8 && p < left; p++) {
            int32_t acc = b0;
            for (int ry = 0; ry < kh; ry++)
              for (int rx = 0; rx < kw; rx++)
                acc += row[ry * dh * Ws + p * sw + rx * dw] * wc[ry * kw + rx];
            int32_t v = ep_simd_rq1(acc, m, r, s, zp, lo, hi);
            if (out16) ((int16_t *)yo)[p] = (int16_t)v; else ((int8_t *)yo)[p] = (int8_t)v;
          }
#endif
        }
    }
}
/* depthwise for NEON with channels in lanes (simd.neon_depthwise_kernel picks it for C % 16 == 0,
   the vector requantization, int8 out, no -128 weight): the whole image in the NHWC scratch
   (ep_simd_nhwc), then per block of 16 channels and per output pixel one 16-byte load per tap;
   two taps' products summed in int16 (SMULL + SMLAL, |x * w| <= 128 * 127), widened into four
   int32x4 by SADDW; requantized as ep_simd_rq (mode 1) and stored by lane (NCHW output).
   Weights w[C / 16][kh * kw][16]. The image is read whole before any output is written (the
   plan's in-place aliasing stays safe). */
EP_AI void ep_simd_neon_dwc(const int8_t *x, int8_t *xs, const int8_t *w, const int32_t *bias,
                           const int32_t *mult, const void *rnd, const int32_t *shift,
                           int8_t *y, int32_t n, int32_t C, int32_t H, int32_t W, int32_t hi_n,
                           int32_t wi_n, int32_t Hs, int32_t Ws, int32_t pt, int32_t pl,
                           int32_t pad, int32_t fh, int32_t fw, int32_t OH, int32_t OW,
                           int32_t kh, int32_t kw, int32_t sh, int32_t sw, int32_t dh,
                           int32_t dw, int32_t zp, int32_t lo, int32_t hi) {
  int ohw = OH * OW, nt = kh * kw;
  for (int nb = 0; nb < n; nb++) {
    ep_simd_nhwc(x + (size_t)nb * C * H * W, xs, C, H, W, hi_n, wi_n, Hs, Ws, pt, pl, pad, fh, fw);
    int8_t *yn = y + (size_t)nb * C * ohw;
    for (int cb = 0; cb < C; cb += 16) {
      const int8_t *wb = w + (size_t)cb * nt;
#ifdef EP_NEON
      int32x4_t m[4], ra[4], sv[4], bv[4];
      for (int k = 0; k < 4; k++) {
        int c = cb + 4 * k;
        m[k] = vld1q_s32(mult + c);
        bv[k] = vld1q_s32(bias + c);
        sv[k] = vsubq_s32(vdupq_n_s32(32), vld1q_s32(shift + c));
        ra[k] = vld1q_s32((const int32_t *)rnd + c);
      }
#endif
      for (int oh = 0; oh < OH; oh++)
        for (int ow = 0; ow < OW; ow++) {
          const int8_t *px = xs + ((size_t)oh * sh * Ws + (size_t)ow * sw) * C + cb;
          int8_t *yo = yn + (size_t)cb * ohw + (size_t)oh * OW + ow;
#define EP_TAP(t) (px + ((size_t)((t) / kw) * dh * Ws + (size_t)((t) % kw) * dw) * C)
#ifdef EP_NEON
          int32x4_t a0 = bv[0], a1 = bv[1], a2 = bv[2], a3 = bv[3];
          for (int t = 0; t < nt; t += 2) {
            int8x16_t x0 = vld1q_s8(EP_TAP(t)), w0 = vld1q_s8(wb + t * 16);
            int16x8_t l16 = vmull_s8(vget_low_s8(x0), vget_low_s8(w0)), h16 = vmull_high_s8(x0, w0);
            if (t + 1 < nt) {
              int8x16_t x1 = vld1q_s8(EP_TAP(t + 1)), w1 = vld1q_s8(wb + (t + 1) * 16);
              l16 = vmlal_s8(l16, vget_low_s8(x1), vget_low_s8(w1));
              h16 = vmlal_high_s8(h16, x1, w1);
            }
            a0 = vaddw_s16(a0, vget_low_s16(l16));
            a1 = vaddw_high_s16(a1, l16);
            a2 = vaddw_s16(a2, vget_low_s16(h16));
            a3 = vaddw_high_s16(a3, h16);
          }
          int32x4_t q[4] = {a0, a1, a2, a3};
          for (int k = 0; k < 4; k++) {
            int32x4_t h = vuzp2q_s32(vreinterpretq_s32_s64(vmull_s32(vget_low_s32(q[k]), vget_low_s32(m[k]))),
                                     vreinterpretq_s32_s64(vmull_high_s32(q[k], m[k])));
            h = vaddq_s32(vshlq_s32(vaddq_s32(h, ra[k]), sv[k]), vdupq_n_s32(zp));
            q[k] = vminq_s32(vmaxq_s32(h, vdupq_n_s32(lo)), vdupq_n_s32(hi));
          }
          int8x16_t o8 = vcombine_s8(vmovn_s16(vcombine_s16(vmovn_s32(q[0]), vmovn_s32(q[1]))),
                                     vmovn_s16(vcombine_s16(vmovn_s32(q[2]), vmovn_s32(q[3]))));
#define EP_ST(l) vst1q_lane_s8(yo + (size_t)(l) * ohw, o8, l)
          EP_ST(0); EP_ST(1); EP_ST(2); EP_ST(3); EP_ST(4); EP_ST(5); EP_ST(6); EP_ST(7);
          EP_ST(8); EP_ST(9); EP_ST(10); EP_ST(11); EP_ST(12); EP_ST(13); EP_ST(14); EP_ST(15);
#undef EP_ST
#else
          for (int l = 0; l < 16; l++) {
            int32_t acc = bias[cb + l];
            for (int t = 0; t < nt; t++) acc += EP_TAP(t)[l] * wb[t * 16 + l];
            yo[(size_t)l * ohw] = (int8_t)ep_simd_rq1(acc, mult[cb + l], ep_rnd(rnd, cb + l, 1),
                                                     shift[cb + l], zp, lo, hi);
          }
#endif
#undef EP_TAP
        }
    }
  }
}
EP_AI int32_t ep_simd_neon_dwc8(int8_t *x, int8_t *xs, int8_t *w, int32_t *bias, int32_t *mult,
                               int32_t *rnd, int32_t *shift, int8_t *y, int32_t n, int32_t C,
                               int32_t H, int32_t W, int32_t hi_n, int32_t wi_n, int32_t Hs,
                               int32_t Ws, int32_t pt, int32_t pl, int32_t pad, int32_t fh,
                               int32_t fw, int32_t OH, int32_t OW, int32_t kh, int32_t kw,
                               int32_t sh, int32_t sw, int32_t dh, int32_t dw, int32_t zp,
                               int32_t lo, int32_t hi) {
  ep_simd_neon_dwc(x, xs, w, bias, mult, rnd, shift, y, n, C, H, W, hi_n, wi_n, Hs, Ws, pt, pl,
                  pad, fh, fw, OH, OW, kh, kw, sh, sw, dh, dw, zp, lo, hi);
  return 0;
}
#define EP_NEON_DW(OUT16)                                                                      \
  ep_simd_neon_dw(x, xs, w, bias, mult, rnd, shift, y, n, C, H, W, hi_n, wi_n, Hs, Ws, pt, pl,  \
                 pad, fh, fw, OH, OW, kh, kw, sh, sw, dh, dw, mode, zp, lo, hi, OUT16)
#define EP_NEON_DW_ARGS int32_t n, int32_t C, int32_t H, int32_t W, int32_t hi_n, int32_t wi_n, \
  int32_t Hs, int32_t Ws, int32_t pt, int32_t pl, int32_t pad, int32_t fh, int32_t fw, int32_t OH, \
  int32_t OW, int32_t kh, int32_t kw, int32_t sh, int32_t sw, int32_t dh, int32_t dw, int32_t mode, \
  int32_t zp, int32_t lo, int32_t hi
EP_AI int32_t ep_simd_neon_dw8(int8_t *x, int8_t *xs, int8_t *w, int32_t *bias, int32_t *mult,
                              int32_t *rnd, int32_t *shift, int8_t *y, EP_NEON_DW_ARGS) {
  EP_NEON_DW(0);
  return 0;
}
EP_AI int32_t ep_simd_neon_dw16(int8_t *x, int8_t *xs, int8_t *w, int32_t *bias, int32_t *mult,
                               int32_t *rnd, int32_t *shift, int16_t *y, EP_NEON_DW_ARGS) {
  EP_NEON_DW(1);
  return 0;
}
/* dst[j] = max(a[j], b[j]) for j < n, 16 int8 lanes a step (max pooling's passes,
   int8.maxpool_kernel); dst is a or overlaps neither a nor b. */
EP_AI int32_t ep_simd_max2(int8_t *dst, int8_t *a, int8_t *b, int32_t n) {
  int32_t j = 0;
#ifdef EP_MVE
  for (; j < n; j += 16) {
    mve_pred16_t p = vctp8q(n - j);
    vstrbq_p_s8(dst + j, vmaxq_x_s8(vldrbq_z_s8(a + j, p), vldrbq_z_s8(b + j, p), p), p);
  }
#else
#ifdef EP_NEON
  /* the last vector overlaps the one before it: max is idempotent, and dst is a or apart */
  if (n >= 16) {
    for (; j + 16 <= n; j += 16) vst1q_s8(dst + j, vmaxq_s8(vld1q_s8(a + j), vld1q_s8(b + j)));
    if (j < n) j = n - 16, vst1q_s8(dst + j, vmaxq_s8(vld1q_s8(a + j), vld1q_s8(b + j)));
    return 0;
  }
  if (n >= 8) {
    vst1_s8(dst, vmax_s8(vld1_s8(a), vld1_s8(b)));
    j = n - 8, vst1_s8(dst + j, vmax_s8(vld1_s8(a + j), vld1_s8(b + j)));
    return 0;
  }
#endif
  for (; j < n; j++) dst[j] = a[j] > b[j] ? a[j] : b[j];
#endif
  return 0;
}
"""
