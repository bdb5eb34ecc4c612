"""The hand-scheduled int8 kernels (edgeprune/kernels) run bit-exact in QEMU on odd shapes.

Two small integer networks are built op by op with random int8 weights and per-channel
requantization, compiled for the Cortex-M7 and compared with the numpy golden model.
"""

import numpy as np
import pytest

from edgeprune.compile import compile_model
from edgeprune.quantize.qmodel import Op, QuantModel, TensorInfo, conv_out_hw
from edgeprune.quantize.requant import quantize_multipliers, shared_shift_multipliers
from edgeprune.simulate import simulate


class Net:
    """Builds a QuantModel layer by layer (NCHW), random weights, outputs spread over int8."""

    def __init__(self, shape, zp, seed):
        self.rng = np.random.default_rng(seed)
        self.tensors = {"x": TensorInfo("x", list(shape), "int8", 0.1, zp)}
        self.ops, self.params, self.last = [], {}, "x"

    def _add(self, kind, out_shape, attrs, weight=None, scale_range=(0.5, 2.0), zp_out=-3,
             real_scales=None, out_dtype="int8", weight_bits=8, weight_format="int"):
        name = f"op{len(self.ops)}"
        out = f"t{len(self.ops)}"
        wide = out_dtype == "int16"  # symmetric, outputs spread over the int16 range
        self.tensors[out] = TensorInfo(out, list(out_shape), out_dtype, 0.1, 0 if wide else zp_out)
        if weight is not None:
            o = weight.shape[0]
            fan_in = weight[0].size
            acc_std = np.sqrt(fan_in) * 100.0 * 73.0
            scales = self.rng.uniform(*scale_range, o) * (10000.0 if wide else 40.0) / acc_std
            bias_max = 3000
            if real_scales is not None:  # absolute requantization scales, small accumulators
                scales, bias_max = self.rng.uniform(*real_scales, o), 20
            m, sh = quantize_multipliers(scales)
            self.params.update({f"{name}.weight": weight, f"{name}.weight_scale": np.ones(o, np.float32),
                                f"{name}.bias": self.rng.integers(-bias_max, bias_max, o).astype(np.int32),
                                f"{name}.multiplier": m, f"{name}.shift": sh})
            attrs = {**attrs, "clamp": [-32768, 32767] if wide else [-128, 127],
                     "weight_bits": weight_bits, "weight_format": weight_format,
                     "activation": None}
        self.ops.append(Op(kind, name, [self.last], out, attrs))
        self.last = out
        return self

    def _weights(self, shape, wmax=127, weight_bits=8, weight_format="int"):
        if weight_format == "pow2":  # 0 or +-2**k, k <= 6 (4-bit codes)
            pow2 = [0] + [s * 2 ** k for k in range(7) for s in (1, -1)]
            return self.rng.choice(pow2, shape).astype(np.int8)
        wmax = min(wmax, 2 ** (weight_bits - 1) - 1)
        return self.rng.integers(-wmax, wmax + 1, shape, dtype=np.int8)

    def conv(self, out_ch, kernel, stride=(1, 1), padding=(0, 0, 0, 0), dilation=(1, 1), groups=1,
             wmax=127, weight_bits=8, weight_format="int", **kw):
        n, c, h, w = self.tensors[self.last].shape
        oh, ow = conv_out_hw(h, w, kernel, stride, padding, dilation)
        wt = self._weights((out_ch, c // groups, *kernel), wmax, weight_bits, weight_format)
        attrs = {"strides": list(stride), "padding": list(padding), "dilation": list(dilation),
                 "groups": groups}
        return self._add("conv2d", (n, out_ch, oh, ow), attrs, wt, weight_bits=weight_bits,
                         weight_format=weight_format, **kw)

    def add(self, other, zp_out=2, relu=False):
        """Requantized residual add of the last tensor and `other` (output scale 0.17)."""
        ta, tb = self.tensors[self.last], self.tensors[other]
        ms, st = shared_shift_multipliers([ta.scale / 0.17, tb.scale / 0.17])
        name, out = f"op{len(self.ops)}", f"t{len(self.ops)}"
        self.tensors[out] = TensorInfo(out, list(ta.shape), "int8", 0.17, zp_out)
        attrs = {"multipliers": ms, "shift_total": int(st), "clamp": [zp_out if relu else -128, 127]}
        self.ops.append(Op("add", name, [self.last, other], out, attrs))
        self.last = out
        return self

    def maxpool(self, kernel, stride, padding=(0, 0, 0, 0), dilation=(1, 1)):
        t = self.tensors[self.last]
        n, c, h, w = t.shape
        oh, ow = conv_out_hw(h, w, kernel, stride, padding, dilation)
        name, out = f"op{len(self.ops)}", f"t{len(self.ops)}"
        self.tensors[out] = TensorInfo(out, [n, c, oh, ow], t.dtype, t.scale, t.zero_point)
        self.ops.append(Op("maxpool", name, [self.last], out, {
            "kernel": list(kernel), "strides": list(stride), "padding": list(padding),
            "dilation": list(dilation)}))
        self.last = out
        return self

    def flatten(self):
        t = self.tensors[self.last]
        shape = [t.shape[0], int(np.prod(t.shape[1:]))]
        name, out = f"op{len(self.ops)}", f"t{len(self.ops)}"
        self.tensors[out] = TensorInfo(out, shape, "int8", t.scale, t.zero_point)
        self.ops.append(Op("reshape", name, [self.last], out, {"shape": shape}))
        self.last = out
        return self

    def dense(self, out_features, weight_bits=8, weight_format="int", **kw):
        n, k = self.tensors[self.last].shape
        wt = self._weights((out_features, k), 127, weight_bits, weight_format)
        return self._add("dense", (n, out_features), {}, wt, weight_bits=weight_bits,
                         weight_format=weight_format, **kw)

    def build(self):
        return QuantModel("x", self.last, self.tensors, self.ops, self.params)


def _run(qm, tmp_path, name, target="cortex-m7"):
    qdir = qm.save(tmp_path / f"{name}-q")
    out = tmp_path / name
    build = compile_model(str(qdir), target, out, log=lambda *a: None)
    rng = np.random.default_rng(7)
    shape = qm.input_info.shape
    x = rng.integers(-128, 128, (4, *shape)).astype(np.int8)
    x[0] = -128          # all padding-like values
    x[1] = 127           # extremes: largest accumulators
    result, _ = simulate(out, inputs=x)
    return build, result


def test_odd_shapes_bit_exact(tmp_path):
    """Batch 2, zero point -128 (explicit zero-point padding folded into the kernels), 3->5
    channels, stride 2, non-square, asymmetric padding with dilation, a 1x1 stride-2 conv, a
    depthwise multiplier (channels repeated, then a depthwise kernel), a strided 1x1 depthwise
    conv (read from the input itself), and a dense layer with a partial output-channel block."""
    qm = (Net((2, 3, 9, 7), zp=-128, seed=1)
          .conv(5, (3, 3), stride=(2, 2), padding=(1, 1, 1, 1))
          .conv(5, (3, 3), padding=(1, 0, 1, 2), dilation=(1, 2), groups=5)
          .conv(10, (1, 1), groups=5)             # channel multiplier 2: repeat, depthwise
          .conv(10, (1, 1), stride=(2, 1), groups=10)
          .conv(11, (1, 1), stride=(2, 2))
          .flatten().dense(10).build())
    build, result = _run(qm, tmp_path, "odd")
    kernels = [l["name"] for l in build["layers"]]
    assert sum(k.startswith("ep_int8_conv") for k in kernels) == 2, kernels
    assert sum(k.startswith("ep_int8_depthwise") for k in kernels) == 3, kernels
    assert sum(k.startswith("ep_int8_dense") for k in kernels) == 1, kernels
    assert not any(k == "pad" or k.startswith("pad") for k in kernels), kernels
    assert result["mismatches"] == 0 and result["outputs_match"]


@pytest.mark.parametrize("target", ["cortex-m55", "cortex-a72"])
def test_two_channels_odd_pixel_count_bit_exact(tmp_path, target):
    """A tile of 2 channels x 2 pixels whose second pixel does not exist (5 outputs per
    channel): only the real lanes are stored (Helium stored all four, overwriting the next
    channel's first output)."""
    qm = Net((1, 4, 1, 5), zp=-128, seed=3).conv(2, (1, 1)).conv(4, (1, 1)).build()
    _, result = _run(qm, tmp_path, "odd-pixels", target)
    assert result["mismatches"] == 0 and result["outputs_match"]


@pytest.mark.parametrize("target", ["cortex-m7", "cortex-m55"])
def test_grouped_conv_runs_as_one_fast_kernel_per_group(tmp_path, target):
    """A grouped conv (3 groups of 4 -> 2 channels, zero point -128, padding, stride 2) is
    sliced into ordinary convs the int8 kernels take, and stays bit-exact."""
    qm = (Net((2, 12, 9, 11), zp=-128, seed=3)
          .conv(6, (3, 3), stride=(2, 2), padding=(1, 0, 1, 1), groups=3)
          .flatten().dense(4).build())
    build, result = _run(qm, tmp_path, "grouped", target)
    kernels = [l["name"] for l in build["layers"]]
    assert sum(k.startswith("ep_int8_conv") for k in kernels) == 3, kernels
    assert not any("conv2d" in k for k in kernels), kernels          # no TVM conv left
    assert result["mismatches"] == 0 and result["outputs_match"]


def test_zero_point_zero_and_wide_scales_bit_exact(tmp_path):
    """Zero point 0 (the conv's own padding), scales up to 0.9 (total shift 31: the 64-bit
    requantization path), more than one full 8-channel block, non-square stride (2, 1), an int16
    output (16-bit saturation) feeding an int16-input dense layer, a residual add with ReLU."""
    qm = (Net((1, 4, 6, 10), zp=0, seed=2)
          .conv(17, (3, 3), stride=(2, 1), padding=(1, 1, 1, 1))
          .conv(17, (3, 3), padding=(1, 1, 1, 1), groups=17, zp_out=0, wmax=1,
                real_scales=(0.2, 0.9))
          .add("t0", relu=True)
          .conv(3, (1, 1), wmax=1, real_scales=(0.1, 0.6))
          .flatten().dense(9, out_dtype="int16").dense(5, real_scales=(1e-5, 4e-5)).build())
    shifts = np.concatenate([qm.params[f"{o.name}.shift"] for o in qm.weight_ops()])
    assert (31 - shifts).min() < 32 < (31 - shifts).max()  # both requantization forms occur
    build, result = _run(qm, tmp_path, "zp0")
    kernels = [l["name"] for l in build["layers"]]
    assert all(k.startswith("ep_int8_") for k in kernels if "reshape" not in k), kernels
    assert sum(k.startswith("ep_int8_add") for k in kernels) == 1, kernels
    assert result["mismatches"] == 0 and result["outputs_match"]


def test_single_channel_input_pairs_taps_bit_exact(tmp_path):
    """One input channel (a grey image, a spectrogram): SMLAD pairs neighbouring taps of a row
    instead of channels; with dilation, strides (1, 2) and (2, 2), a 10x4 window, zero point 3."""
    qm = (Net((1, 1, 13, 10), zp=3, seed=5)
          .conv(1, (3, 3), stride=(1, 2), padding=(1, 2, 1, 2), dilation=(1, 2))
          .conv(9, (10, 4), stride=(2, 2), padding=(5, 1, 4, 2)).build())
    build, result = _run(qm, tmp_path, "taps")
    assert [l["name"][:12] for l in build["layers"]] == ["ep_int8_conv"] * 2, build["layers"]
    assert result["mismatches"] == 0 and result["outputs_match"]


def _host_c(tmp_path, name: str, body: str, simd: bool = False) -> np.ndarray:
    """C_PRELUDE (and with `simd` simd_c's) plus `body` (a main printing numbers), built with
    the host's gcc (the helpers' portable C) and run: the numbers it prints, a row per line."""
    import subprocess

    from edgeprune.kernels import C_PRELUDE
    from edgeprune.kernels.simd_c import SIMD_PRELUDE

    prog, exe = tmp_path / f"{name}.c", tmp_path / name
    prog.write_text(C_PRELUDE + (SIMD_PRELUDE if simd else "") + "#include <stdio.h>\n" + body)
    subprocess.run(["gcc", "-O2", "-Wall", "-Werror", str(prog), "-o", str(exe)], check=True)
    return np.loadtxt(subprocess.run([str(exe)], capture_output=True, text=True,
                                     check=True).stdout.splitlines(), dtype=np.int64)


def test_c_helpers_portable_fallback_match_reference(tmp_path):
    """Cores without the DSP extension (and any host) run the portable C of the kernels' helpers:
    two 16-bit MACs, both requantization forms and the clamp agree with numpy on random and
    extreme operands."""
    from edgeprune.quantize.requant import requantize

    rng = np.random.default_rng(3)
    n = 500
    halves = rng.integers(-32768, 32768, (n, 4))
    halves[:4] = [[-32768, -32768, -32768, -32768], [32767, 32767, 32767, 32767],
                  [-128, 127, -127, 127], [0, -1, -1, 0]]
    acc = rng.integers(-2 ** 30, 2 ** 30, n)
    m = rng.integers(2 ** 30, 2 ** 31, n)
    s = rng.integers(1, 63, n)
    zp = rng.integers(-20, 20, n)
    lo = np.where(rng.random(n) < 0.5, -128, zp)
    hi = np.full(n, 127)

    def word(h0, h1):
        return ((h0 & 0xFFFF) | ((h1 & 0xFFFF) << 16)).astype(np.uint32).view(np.int32)
    a, b = word(halves[:, 0], halves[:, 1]), word(halves[:, 2], halves[:, 3])
    w8 = rng.integers(-128, 128, (n, 4))   # an int8 weight word: channel k's pair at k, k + 2
    w8[:2] = [[-128, 127, -128, 127], [127, -128, 127, -128]]
    wword = (w8.astype(np.uint8).astype(np.uint32) << np.arange(0, 32, 8, dtype=np.uint32)
             ).sum(1).astype(np.uint32).view(np.int32)
    rows = ",\n".join(f"{{{a[i]}, {b[i]}, {acc[i]}, {m[i]}, {s[i]}, {zp[i]}, {lo[i]}, {hi[i]}, "
                      f"{wword[i]}}}" for i in range(n))
    got = _host_c(tmp_path, "helpers",
                  f"static const long long t[{n}][9] = {{\n{rows}\n}};\n"
                  "int main(void) {\n"
                  f"  for (int i = 0; i < {n}; i++) {{\n"
                  "    int32_t acc = (int32_t)t[i][2], sh = (int32_t)t[i][4];\n"
                  "    int64_t rnd = (int64_t)1 << (sh - 1);\n"
                  "    int32_t x = (int32_t)t[i][0], w = (int32_t)t[i][8];\n"
                  "    printf(\"%ld %ld \", (long)ep_mac2_b(&x, &w, 0, acc),\n"
                  "           (long)ep_mac2_b(&x, &w, 1, acc));\n"
                  "    printf(\"%ld %ld %ld\\n\", (long)ep_smlad((int32_t)t[i][0], (int32_t)t[i][1], acc),\n"
                  "           (long)ep_requant(acc, (int32_t)t[i][3], rnd, sh, (int32_t)t[i][5],\n"
                  "                            (int32_t)t[i][6], (int32_t)t[i][7]),\n"
                  "           (long)(sh >= 32 ? ep_requant_hi(acc, (int32_t)t[i][3], rnd, sh - 32,\n"
                  "                  (int32_t)t[i][5], (int32_t)t[i][6], (int32_t)t[i][7]) : 0));\n"
                  "  }\n  return 0;\n}\n")
    mac = acc + halves[:, 0] * halves[:, 2] + halves[:, 1] * halves[:, 3]
    want_mac = ((mac + 2 ** 31) % 2 ** 32) - 2 ** 31  # SMLAD wraps like int32
    want_rq = np.array([requantize(acc[i], m[i], 31 - s[i], zp[i], lo[i], hi[i]) for i in range(n)])
    for k in (0, 1):   # without SMLAD: channel k's int8 weights against the int16 pair
        want = acc + halves[:, 0] * w8[:, k] + halves[:, 1] * w8[:, k + 2]
        assert np.array_equal(got[:, k], want)
    got = got[:, 2:]
    assert np.array_equal(got[:, 0], want_mac)
    assert np.array_equal(got[:, 1], want_rq)
    assert np.array_equal(got[s >= 32, 2], want_rq[s >= 32])


@pytest.mark.parametrize("target", ["cortex-m7", "riscv32", "cortex-m55", "cortex-a53"])
def test_max_pools_run_as_their_own_kernel_bit_exact(tmp_path, target):
    """Max pools of any window, stride, padding and dilation run kernels.maxpool_kernel: four
    int8 lanes a word where the core has SSUB8/SEL (the M7), sixteen a vector with Helium or
    NEON (M55, A53), scalar elsewhere and on int16; rows of odd widths leave tails (a
    predicated or overlapping last vector), and windows of the border rows reach the padding."""
    qm = (Net((1, 2, 13, 17), zp=5, seed=11)
          .conv(6, (3, 3), padding=(1, 1, 1, 1))
          .maxpool((3, 3), (1, 1), (1, 1, 1, 1))            # rows of 17: a tail after 16 or 4
          .maxpool((2, 2), (2, 2))                          # stride 2: two lanes a word
          .maxpool((3, 2), (1, 3), (1, 0, 1, 1), (2, 1))    # dilated rows, stride 3
          .conv(4, (1, 1), out_dtype="int16")
          .maxpool((1, 3), (1, 2), (0, 1, 0, 1))            # int16: scalar
          .conv(4, (1, 1))
          .maxpool((3, 3), (2, 2), (1, 1, 1, 1))            # stride 2 over an odd row
          .flatten().dense(3).build())
    build, result = _run(qm, tmp_path, "pools", target)
    kernels = [l["name"] for l in build["layers"]]
    assert sum(k.startswith("ep_int8_maxpool") for k in kernels) == 5, kernels
    assert result["mismatches"] == 0 and result["outputs_match"], result
    # a bottom border row whose last window reads the same row-buffer cells as the rows above
    # (rows the vector or word passes write: TIR's CSE had reused its loads there)
    qm = Net((1, 16, 6, 6), zp=5, seed=1).maxpool((3, 3), (2, 2), (0, 0, 1, 1)).build()
    _, result = _run(qm, tmp_path, "border", target)
    assert result["mismatches"] == 0 and result["outputs_match"], result


def test_pair_lane_convs_bit_exact_on_rv64(tmp_path):
    """On 64-bit cores without SIMD (riscv64) a conv multiplies two neighbouring pixels' inputs,
    as the 32-bit lanes of one int64, by each weight: rows with a pair tail and a single pixel,
    a tail block of one channel, batch 2, padded (a band of int8 rows) and unpadded (the input
    itself) convs, stride 2, dilation, int16 in and out, and a dense layer (the int16-pair
    kernel), bit-exact; extreme inputs give each lane sums of both signs."""
    qm = (Net((2, 3, 9, 11), zp=-128, seed=12)
          .conv(6, (3, 3), padding=(1, 1, 1, 1))                  # 11 = 2 x 4 + a pair + 1
          .conv(5, (3, 3), stride=(2, 2), padding=(1, 0, 1, 1))   # blocks of 4 and 1
          .conv(4, (2, 3), dilation=(2, 1), out_dtype="int16")    # unpadded: x itself
          .conv(7, (3, 3), padding=(2, 2, 2, 2), dilation=(2, 2))  # int16 input
          .flatten().dense(3).build())
    build, result = _run(qm, tmp_path, "pairs", "riscv64")
    kernels = [l["name"] for l in build["layers"]]
    assert sum(k.startswith("ep_int8_conv") for k in kernels) == 4, kernels
    source = (tmp_path / "pairs" / "c_library" / "kernels.c").read_text()
    assert "4294967297" in source   # sums that start as the bias in both lanes
    assert result["mismatches"] == 0 and result["outputs_match"], result


def test_max4_portable_fallback_is_the_bytewise_signed_max(tmp_path):
    """ep_max4 without SSUB8/SEL (any host) equals the signed max of each int8 lane."""
    rng = np.random.default_rng(5)
    lanes = rng.integers(-128, 128, (300, 2, 4))
    lanes[:2] = [[[-128, 127, 0, -1], [127, -128, -1, 0]], [[5, 5, -5, -5], [5, 6, -6, -5]]]
    words = (lanes.astype(np.uint8).astype(np.uint32) << np.arange(0, 32, 8, dtype=np.uint32)
             ).sum(-1).astype(np.uint32).view(np.int32)
    got = _host_c(tmp_path, "max4", f"static const long long t[{len(words)}][2] = {{"
                  + ", ".join(f"{{{a}, {b}}}" for a, b in words) + "};\n"
                  "int main(void) {\n"
                  f"  for (int i = 0; i < {len(words)}; i++)\n"
                  "    printf(\"%ld\\n\", (long)ep_max4((int32_t)t[i][0], (int32_t)t[i][1]));\n"
                  "  return 0;\n}\n")
    want = np.maximum(lanes[:, 0], lanes[:, 1])
    got_lanes = (got.astype(np.int32).view(np.uint32)[:, None] >> np.arange(0, 32, 8,
                 dtype=np.uint32)).astype(np.uint8).view(np.int8)
    assert np.array_equal(got_lanes, want)


@pytest.mark.parametrize("a_shape, b_shape, sh, out_dtype", [
    ((2, 5, 7), (2, 7, 9), 36, "int8"),       # a last band of one row, a last tile of one column
    ((3, 6), (6, 3), 20, "int16"),            # fewer columns than a tile
    ((1, 1, 4, 33), (1, 1, 33, 4), 31, "int8"),
    ((1, 3, 300), (1, 300, 5), 8, "int16"),   # sums whose shifted value needs a 64-bit clamp
])
def test_matmul_kernel_tiles_and_tails_match_numpy(a_shape, b_shape, sh, out_dtype):
    """The int8 product of two activations (attention's q k^T, a v), built for the host as it is
    for the targets, equals numpy's integer matmul requantized, on every tile and every tail
    (the on-target check is test_attention's)."""
    import tvm

    from edgeprune.kernels.int8 import matmul_kernel

    rng = np.random.default_rng(5)
    a = rng.integers(-128, 128, a_shape).astype(np.int8)
    b = rng.integers(-128, 128, b_shape).astype(np.int8)
    info = np.iinfo(out_dtype)
    m, zp_a, zp_b, zp = int(rng.integers(2 ** 29, 2 ** 31)), 3, -5, 7
    prim, m_arr = matmul_kernel(a_shape, b_shape, zp_a, zp_b, m, sh, zp, info.min, info.max,
                                out_dtype)
    mod = tvm.IRModule({"main": prim.with_attr("global_symbol", "main")})
    run = tvm.tirx.build(mod, target="llvm")["main"]
    y = np.zeros(a_shape[:-1] + b_shape[-1:], out_dtype)
    args = [tvm.runtime.tensor(v) for v in (a, b, m_arr, y)]
    run(*args)
    acc = np.matmul(a.astype(np.int64) - zp_a, b.astype(np.int64) - zp_b)
    want = np.clip(((acc * m + (1 << (sh - 1))) >> sh) + zp, info.min, info.max)
    np.testing.assert_array_equal(args[3].numpy(), want)


@pytest.mark.parametrize("shape, axis, sums", [
    ((3, 5, 7), 1, "int32"),      # rows along a middle axis (a softmax over channels)
    ((2, 300), 1, "int32"),       # more keys than the stack buffer: the table read again
    ((4, 9), -1, "int64"),        # 64-bit sums (rows of over 32k keys take them)
])
def test_softmax_kernel_matches_the_reference(shape, axis, sums):
    """The int8 softmax without a mask, built for the host as it is for the targets, equals the
    golden model's formula (reference.run_op) on rows along any axis."""
    import tvm

    from edgeprune.kernels.int8 import softmax_kernel
    from edgeprune.quantize.requant import SOFTMAX_RECIP_BITS, softmax_row_reciprocal

    rng = np.random.default_rng(6)
    x = rng.integers(-128, 128, shape).astype(np.int8)
    x.flat[:3] = [-128, 127, 0]
    table = np.round(65536 * np.exp((np.arange(256) - 255) / 16.0)).astype(np.int32)
    ax = axis % len(shape)
    prim = softmax_kernel(shape, ax, SOFTMAX_RECIP_BITS, sums)
    mod = tvm.IRModule({"main": prim.with_attr("global_symbol", "main")})
    run = tvm.tirx.build(mod, target="llvm")["main"]
    args = [tvm.runtime.tensor(v) for v in (x, table, np.zeros(shape, np.int8))]
    run(*args)
    xi = x.astype(np.int64)
    e = table.astype(np.int64)[xi - xi.max(axis=ax, keepdims=True) + 255]
    inv = softmax_row_reciprocal(e.sum(axis=ax, keepdims=True))
    want = np.clip(((e * inv + (1 << (SOFTMAX_RECIP_BITS - 1))) >> SOFTMAX_RECIP_BITS) - 128,
                   -128, 127)
    np.testing.assert_array_equal(args[2].numpy(), want)


def test_sxtb16_portable_fallback_widens_bytes_0_2_and_1_3(tmp_path):
    """Conv weights stay int8 in flash; off DSP cores the portable ep_sxtb16 / ep_sxtb16_ror8
    must widen bytes 0,2 and 1,3 of a word to two int16 halves exactly as SXTB16 does."""
    words = np.random.default_rng(4).integers(-2 ** 31, 2 ** 31, 300)
    words[:3] = [-2 ** 31, 2 ** 31 - 1, -1]
    got = _host_c(tmp_path, "sxtb16",
                  f"static const long long t[] = {{{', '.join(map(str, words))}}};\n"
                  "int main(void) {\n"
                  f"  for (int i = 0; i < {len(words)}; i++)\n"
                  "    printf(\"%lu %lu\\n\", (unsigned long)(uint32_t)ep_sxtb16((int32_t)t[i]),\n"
                  "           (unsigned long)(uint32_t)ep_sxtb16_ror8((int32_t)t[i]));\n"
                  "  return 0;\n}\n")
    b = words.astype(np.uint32).view(np.uint8).reshape(-1, 4).view(np.int8).astype(np.int64)
    for col, (lo, hi) in enumerate(((0, 2), (1, 3))):
        assert np.array_equal(got[:, col], (b[:, lo] & 0xFFFF) | ((b[:, hi] & 0xFFFF) << 16))


def _helium_models():
    """Two small networks for the Helium kernels, each ending in the layers it checks (an
    off-by-one in a middle layer can vanish in the layers after it)."""
    convs = (Net((2, 3, 9, 9), zp=-128, seed=11)
             .conv(16, (3, 3), stride=(2, 2), padding=(1, 1, 1, 1))
             .conv(5, (3, 3), padding=(1, 2, 1, 2), dilation=(1, 2))
             .conv(5, (3, 3), padding=(1, 1, 1, 1)).add("t1", relu=True).build())
    others = (Net((2, 6, 7, 16), zp=-3, seed=12)
              .conv(6, (3, 3), padding=(1, 1, 1, 1), groups=6)
              .conv(6, (3, 3), stride=(2, 2), padding=(1, 1, 1, 1), groups=6, zp_out=0, wmax=1,
                    real_scales=(0.2, 0.9))
              .conv(6, (3, 3), padding=(0, 1, 0, 2), groups=6)
              .conv(20, (1, 1), wmax=1, real_scales=(0.1, 0.6))
              .flatten().dense(7, out_dtype="int16").build())
    return {"convs": (convs, {"ep_simd_conv8(x": 3, "ep_simd_add8(a": 1}),
            "others": (others, {"ep_simd_dw8(x": 3, "ep_simd_conv8(x": 1, "ep_simd_conv16(x": 1})}


@pytest.mark.parametrize("name", ["convs", "others"])
def test_helium_kernels_bit_exact_on_cortex_m55(tmp_path, name):
    """Cortex-M55 ("mve-i") gets the Helium kernels (kernels/simd.py). "convs": batch 2, a
    3-channel first layer (windows gathered into a patch) with stride 2 and an odd pixel count
    (partial tiles), a horizontally dilated conv (one run per tap) with an odd channel count,
    a residual add with ReLU (odd element count). "others": depthwise on rows of 16 (contiguous
    loads) and rows of 4 and 9 outputs (tiles across rows, gathers), strides 1 and 2, the
    64-bit requantization (total shift 31) in a depthwise and a 1x1 conv, a dense layer with
    int16 outputs, not a multiple of 4 of them. Checked bit-exact against the integer reference
    in QEMU, and again after retargeting the library to the M7 (the kernels' portable C)."""
    _check_simd_model(*_helium_models()[name], tmp_path, name, "cortex-m55")


def test_helium_add_split_arithmetic_matches_64_bit(tmp_path):
    """The Helium residual add computes (a*Ma + b*Mb + rnd) >> s in 32-bit lanes by splitting
    M and rnd at bit 16 (simd_c.ep_simd_add); its portable C is the same formula: check it
    against 64-bit numpy on random and extreme int8 inputs, multipliers and shifts 16..46."""
    rng = np.random.default_rng(5)
    cases = []
    for _ in range(40):
        ma, mb = (int(v) for v in rng.integers(0, 2 ** 31, 2))
        sh = int(rng.integers(16, 47))
        rnd = (1 << (sh - 1)) + int(rng.integers(-2 ** 20, 2 ** 20))
        cases.append((ma, mb, sh, rnd, int(rng.integers(-20, 20))))
    cases += [(2 ** 31 - 1, 2 ** 31 - 1, 16, 2 ** 15, 0), (65535, 65536, 17, 2 ** 16 - 1, 3)]
    a = rng.integers(-128, 128, 64)
    b = rng.integers(-128, 128, 64)
    a[:4], b[:4] = [-128, 127, -128, 127], [-128, 127, 127, -128]
    calls = "\n".join(
        f"  ep_simd_add8(a, b, y, 64, {ma >> 16}, {ma & 0xFFFF}, {mb >> 16}, {mb & 0xFFFF}, "
        f"{rnd >> 16}, {rnd & 0xFFFF}, {sh - 16}, {zp}, -128, 127);\n"
        '  for (int i = 0; i < 64; i++) printf("%d ", y[i]);\n  printf("\\n");'
        for ma, mb, sh, rnd, zp in cases)
    got = _host_c(tmp_path, "add", f"static int8_t a[64] = {{{', '.join(map(str, a))}}};\n"
                  f"static int8_t b[64] = {{{', '.join(map(str, b))}}};\n"
                  "int main(void) {\n  int8_t y[64];\n" + calls + "\n  return 0;\n}\n",
                  simd=True)
    for row, (ma, mb, sh, rnd, zp) in zip(got, cases):
        want = np.clip(((a * ma + b * mb + rnd) >> sh) + zp, -128, 127)
        assert np.array_equal(row, want), (ma, mb, sh, rnd, zp)


def test_row_bands_with_a_short_last_band_bit_exact(tmp_path):
    """Tall, narrow images: the conv scratch holds bands of rows and the last band is shorter
    (3x3 stride 1 and stride 2 with padding, and a 1x1 stride-2 conv in sampled bands)."""
    from edgeprune.kernels.int8 import BAND_PIXELS, BAND_PIXELS_1X1

    # outputs 75x7, 38x4 and 19x2: bands of 19, 32 and 16 rows, each with a shorter last band
    assert (BAND_PIXELS, BAND_PIXELS_1X1) == (128, 32)
    qm = (Net((1, 3, 75, 7), zp=-128, seed=4)
          .conv(6, (3, 3), padding=(1, 1, 1, 1))
          .conv(5, (3, 3), stride=(2, 2), padding=(1, 0, 1, 2))
          .conv(4, (1, 1), stride=(2, 2))
          .flatten().dense(3).build())
    _, result = _run(qm, tmp_path, "bands")
    assert result["mismatches"] == 0 and result["outputs_match"]


def _neon_models():
    """The Helium test's networks, and "wide": inputs of 8+ channels and 8+ pixels a row, for
    the NHWC fill's 8x8 transposes (12 and 9 channels: a block and a remainder; 31 columns with
    stride 1 and 2: whole blocks, the stride-2 block that would read past the row, the rest),
    a 16-channel depthwise (channels in lanes, ep_simd_neon_dwc; stride (2, 1), over its dying
    input), and an 8-channel one with rows of 15 outputs (a planar tile of 8, then 7: 4-, 2- and
    1-byte stores)."""
    models = {n: (qm, {c.replace("ep_simd_dw", "ep_simd_neon_dw"): k for c, k in calls.items()})
              for n, (qm, calls) in _helium_models().items()}
    wide = (Net((1, 12, 5, 31), zp=-128, seed=13)
            .conv(9, (3, 3), padding=(1, 1, 1, 1))
            .conv(16, (1, 1), stride=(2, 2))
            .conv(16, (3, 3), padding=(1, 1, 1, 1))
            .conv(16, (3, 3), stride=(2, 1), padding=(1, 1, 1, 0), groups=16)
            .conv(8, (1, 1))
            .conv(8, (3, 3), padding=(1, 1, 1, 1), groups=8).build())
    models["wide"] = (wide, {"ep_simd_conv8(x": 4, "ep_simd_neon_dwc8(x": 1, "ep_simd_neon_dw8(x": 1})
    return models


@pytest.mark.parametrize("name", ["convs", "others", "wide"])
def test_neon_kernels_bit_exact_on_cortex_a53(tmp_path, name):
    """Cortex-A ("neon" in the features) runs the Helium kernels' NEON branches (kernels/simd_c,
    EP_NEON) and a NEON depthwise: the Helium test's networks (patch path, dilated taps, odd
    channels and pixels, batch 2, depthwise stride 1 and 2 with rows wider than a tile, the
    64-bit requantization, int16 dense, the residual add in ep_simd_add's 32-bit form) and "wide" (the NHWC fill's transposes) in
    qemu-aarch64, the inputs' extremes included. Then the same library retargeted to the M7
    (the portable C)."""
    _check_simd_model(*_neon_models()[name], tmp_path, name, "cortex-a53")


def _check_simd_model(qm, calls, tmp_path, name, target):
    """`qm` on `target`: its kernels.c calls the SIMD functions `calls` (name -> count), the run
    is bit-exact, and so is the library retargeted to the M7 (the portable C)."""
    from edgeprune.compile import retarget_build

    build, result = _run(qm, tmp_path, name, target=target)
    src = (tmp_path / name / "c_library" / "kernels.c").read_text()
    assert {c: src.count(f"  {c}") for c in calls} == calls, [l["name"] for l in build["layers"]]
    assert result["mismatches"] == 0 and result["outputs_match"]
    retarget_build(tmp_path / name, "cortex-m7", tmp_path / "m7")
    result, _ = simulate(tmp_path / "m7", samples=2)
    assert result["mismatches"] == 0 and result["outputs_match"]


def test_neon_conv_step_with_minus_128_weights_keeps_int32_sums(tmp_path):
    """The NEON conv step sums two int8 products in int16 only when no weight is -128 (mode | 4,
    set by simd.conv_kernel); (-128) * (-128) twice overflows int16. A dense step on -128 inputs
    and weights, run in qemu-aarch64: the int32 form (mode 0) is exact; the int16 form (mode 4)
    would give the wrapped sum, which is why the generator clears the bit."""
    import subprocess

    from edgeprune.kernels import C_PRELUDE
    from edgeprune.kernels.simd_c import SIMD_PRELUDE

    prog = tmp_path / "step.c"
    # dense: C = 32 -> O = 4 (G = 4), x = w = -128, bias 5, y = (acc * 1) >> 13
    prog.write_text(C_PRELUDE + SIMD_PRELUDE + r"""
#include <stdio.h>
static int8_t x[32], w[128];
static int32_t bias[4] = {5, 5, 5, 5}, mult[4] = {1, 1, 1, 1}, shift[4] = {13, 13, 13, 13};
static int32_t rnd[8];   /* mode 0: the int64 constants, as int32 halves (zero) */
int main(void) {
  int8_t y[4];
  memset(x, -128, sizeof x);
  memset(w, -128, sizeof w);
  for (int mode = 0; mode <= 4; mode += 4) {
    ep_simd_conv8(x, 0, w, bias, mult, rnd, shift, 0, 0, y, 1, 32, 1, 1, 1, 1, 1, 1, 0, 0, -128, 1,
                 1, 1, -1, 1, 1, 4, 1, 1, 1, 1, 0, 0, 32, 32, 1, 1, 0, 0, mode, 0, -128, 127, 4);
    printf("%d %d %d %d\n", y[0], y[1], y[2], y[3]);
  }
  return 0;
}
""")
    exe = tmp_path / "step"
    subprocess.run(["aarch64-linux-gnu-gcc", "-O2", "-static", "-Wall", "-Werror", str(prog),
                    "-o", str(exe)], check=True)
    out = subprocess.run(["qemu-aarch64", str(exe)], capture_output=True, text=True,
                         check=True).stdout.split()
    assert out[:4] == [str((5 + 32 * 16384) >> 13)] * 4  # 64: the int32 sums
    assert out[4:] == [str((5 - 16 * 32768) >> 13)] * 4   # -64: int16 pairs wrapped


@pytest.mark.parametrize("target", ["cortex-m7", "cortex-m55", "riscv32"])
def test_subbyte_convs_run_as_fast_kernels_with_packed_weights(tmp_path, target):
    """4- and 2-bit convs (odd channel counts, zero point -128, stride 2, an int16 output into a
    1x1 with power-of-two weights), a 2-bit depthwise conv and dense layers (one power-of-two)
    run in the fast kernels (conv codes widened
    per channel block, depthwise codes per channel, dense codes decoded inline), not in TVM's
    lowering of the packed TE kernels; bit-exact on the target; the weights stay packed."""
    qm = (Net((1, 5, 9, 8), zp=-128, seed=4)
          .conv(7, (3, 3), padding=(1, 1, 1, 1), weight_bits=4)
          .conv(7, (3, 3), padding=(1, 1, 1, 1), groups=7, weight_bits=2)
          .conv(6, (3, 3), stride=(2, 2), weight_bits=2, out_dtype="int16")
          .conv(9, (1, 1), weight_bits=4, weight_format="pow2")
          .flatten().dense(11, weight_bits=2).dense(5, weight_bits=4, weight_format="pow2")
          .build())
    build, result = _run(qm, tmp_path, "subbyte", target)
    kernels = [l["name"] for l in build["layers"]]
    assert sum(k.startswith("ep_int8_conv") for k in kernels) == 3, kernels
    assert sum(k.startswith("ep_int8_dense") for k in kernels) == 2, kernels
    assert sum(k.startswith("ep_int8_depthwise") for k in kernels) == 1, kernels
    assert not any("packed" in k for k in kernels), kernels
    assert result["mismatches"] == 0 and result["outputs_match"]

    from edgeprune.kernels import specialize_int8
    from edgeprune.quantize.to_relax import to_relax
    main = specialize_int8(to_relax(qm), features=("dsp",))["main"]   # SMLAD's 4 x 2 tiles
    calls = [b.value for blk in main.body.blocks for b in blk.bindings
             if "ep_int8_" in getattr(getattr(b.value, "args", [None])[0], "name_hint", "")]
    weights = [c.args[1].fields[1].value.numpy().nbytes for c in calls]
    # blocks of 4 output channels (dense: 8) x channel pairs x taps, padded: convs 8x6x9 at 4
    # bits, 8x8x9 at 2, 12x6 at 4; dense 16x108 at 2 bits, 8x12 at 4; depthwise: 9 taps at 2
    # bits in one word per channel
    assert weights == [216, 28, 144, 36, 432, 48], weights


def _zero_pairs(qm, op: str, pairs: dict, block: int = 4) -> None:
    """Zero input-channel pairs {filter block: [pair, ...]} of op's weights in every filter
    of the block: kernel-wise pruning in the SMLAD kernel's tiles."""
    w = qm.params[f"{op}.weight"]
    for b, ps in pairs.items():
        for p in ps:
            w[b * block:(b + 1) * block, 2 * p:2 * p + 2] = 0


@pytest.mark.parametrize("target", ["cortex-m7", "riscv32"])
def test_channel_pairs_pruned_in_a_block_of_filters_are_skipped_bit_exact(tmp_path, target):
    """Input-channel pairs whose weights are zero in every filter of an output-channel block
    (prune/patterns.py's kernel-wise tiles) are neither stored nor multiplied: each block
    loops over its own live pairs, blocks with fewer padded by a dead pair. A padded 3x3 on 6
    channels, an odd count (5: a last pair of one channel) into a partial block, a 4-bit conv,
    a conv that also skips taps, and a dense layer (blocks of 8); bit-exact, smaller weights
    and fewer instructions than the same layers dense."""
    def net(zero):
        qm = (Net((1, 6, 9, 8), zp=-5, seed=11)
              .conv(5, (3, 3), padding=(1, 1, 1, 1))
              .conv(7, (3, 3), stride=(2, 2), padding=(1, 1, 1, 1))
              .conv(8, (3, 3), padding=(1, 1, 1, 1), weight_bits=4)
              .conv(8, (3, 3))
              .flatten().dense(9).build())
        if zero:
            _zero_pairs(qm, "op0", {0: [1], 1: [0, 2]})
            _zero_pairs(qm, "op1", {0: [0, 2], 1: [1, 2]})        # pair 2: channel 4 alone
            _zero_pairs(qm, "op2", {0: [1, 3], 1: [0, 1]})
            _zero_pairs(qm, "op3", {0: [2], 1: [3]})
            _zero_taps(qm, "op3", [(0, 0), (2, 2)])
            _zero_pairs(qm, "op5", {0: list(range(0, 24, 2)), 1: list(range(1, 24, 2))},
                        block=8)
        return qm

    layers = _pruned_and_dense(net, tmp_path, target, ("ep_int8_conv", "ep_int8_dense"))
    assert len(layers) == 5 and all(pruned < dense for pruned, dense in layers), layers


def _pruned_and_dense(net, tmp_path, target, kinds=("ep_int8_conv",)) -> list[tuple[int, int]]:
    """Build net(True) (weights with zeros the kernels skip) and net(False) for `target`; check
    the first bit-exact with 4 conv kernels and fewer weight bytes; per layer of `kinds`, its
    instructions and the dense build's."""
    build, result = _run(net(True), tmp_path, "pruned", target)
    assert result["mismatches"] == 0 and result["outputs_match"]
    dense_build, dense_result = _run(net(False), tmp_path, "dense", target)
    kernels = [l["name"] for l in build["layers"]]
    assert sum(k.startswith("ep_int8_conv") for k in kernels) == 4, kernels
    assert build["weights_bytes"] < dense_build["weights_bytes"]
    return [(l["instructions"], d["instructions"]) for l, d in
            zip(result["layers"], dense_result["layers"]) if l["name"].startswith(kinds)]


def _zero_taps(qm, op: str, taps) -> None:
    """Zero window taps (row, column) of op's weights in every filter: an intra-kernel pattern."""
    w = qm.params[f"{op}.weight"]
    for i, j in taps:
        w[:, :, i, j] = 0


@pytest.mark.parametrize("target", ["cortex-m7", "riscv32", "riscv64", "cortex-m55",
                                    "cortex-a53"])
def test_taps_pruned_in_every_filter_are_skipped_bit_exact(tmp_path, target):
    """Window taps whose weights are zero in every filter (prune/patterns.py's intra-kernel
    strided pattern) are neither stored nor multiplied: corners and centre of a padded 3x3,
    one column of a dilated stride-2 5x3 with an odd channel count, a 4-bit 3x3 keeping its
    edges, a one-pixel-wide output; bit-exact, smaller weights and fewer instructions than the
    same layers dense. Helium and NEON (M55, A53) gather only the kept taps into their patch
    (the 4-bit conv takes the SMLAD kernel there too)."""
    def net(zero):
        qm = (Net((1, 6, 11, 9), zp=-7, seed=5)
              .conv(8, (3, 3), padding=(1, 1, 1, 1))
              .conv(5, (5, 3), stride=(2, 2), padding=(2, 1, 2, 1), dilation=(1, 2))
              .conv(6, (3, 3), padding=(1, 1, 1, 1), weight_bits=4)
              .conv(7, (3, 4))
              .flatten().dense(4).build())
        if zero:
            _zero_taps(qm, "op0", [(0, 1), (1, 0), (1, 2), (2, 1)])
            _zero_taps(qm, "op1", [(i, j) for i in range(5) for j in (0, 2)])
            _zero_taps(qm, "op2", [(0, 0), (0, 2), (1, 1), (2, 0), (2, 2)])
            _zero_taps(qm, "op3", [(i, j) for i in range(3) for j in range(4) if (i + j) % 2])
        return qm

    convs = _pruned_and_dense(net, tmp_path, target)
    assert all(pruned < dense for pruned, dense in convs), convs
