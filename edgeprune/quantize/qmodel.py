"""`QuantModel`: an integer network as an ordered list of ops over named NCHW tensors.

This is the contract between the quantizer (ptq/qat/admm/mixed), the numpy golden model
(`reference.py`) and the TVM lowering (`to_relax.py`).  Everything integer lives here: int8/int4/
int2 weight values, int32 biases, per-channel (M, shift) multipliers, clamp ranges.  Floats
(scales) are kept only to quantize the input, dequantize the output and for reports.

Tensors (`TensorInfo`): name, shape (NCHW or N,K), dtype "int8" | "int16", scale, zero_point.
int16 tensors are symmetric (zero_point 0).  The real value is ``scale * (q - zero_point)``.

Ops (`Op`: kind, name, inputs, output, attrs; arrays in `QuantModel.params["<op>.<key>"]`):

* ``conv2d``  attrs: strides [sh, sw], padding [top, left, bottom, right], dilation [dh, dw],
  groups, clamp [lo, hi], weight_bits (8/4/2), weight_format "int" | "pow2" | "ternary",
  activation (informational: "relu", "relu6", "clip" or null).
  params: weight int8 (O, I/groups, KH, KW) holding the integer codes' *values*, weight_scale
  float32 (O,), bias int32 (O,), multiplier int64 (O,), shift int64 (O,).
  acc[o] = bias[o] + sum (x - zp_in) * w over the window, padding contributes 0 (= pads x with
  zp_in); y = requantize(acc, M[o], shift[o], zp_out, lo, hi).
* ``dense``   input (N, K), or (N, ..., K) row by row; params as conv2d with weight (O, K); same
  arithmetic.
* ``add``     two inputs (one may broadcast to the other: x - x.mean(-1, keepdim=True)); attrs:
  multipliers [Ma, Mb] and shift_total s (one shared shift), clamp.
  y = clamp(zp_out + ((Ma*(a-zp_a) + Mb*(b-zp_b) + 2**(s-1)) >> s), lo, hi) in int64:
  both inputs are rescaled to the output scale with a single rounding (ties up).
* ``mul``     two inputs, the second broadcast against the first (e.g. (N, C, 1, 1) channel
  weights of a squeeze-and-excitation block); attrs: multiplier, shift, clamp.
  y = requantize((a - zp_a) * (b - zp_b), M, shift, zp_out, lo, hi) in int64.
* ``concat``  inputs joined along attr axis (default 1, the channels; any after the batch:
  a crop's or a circular pad's spatial pieces); attrs: multipliers [M_i], shifts [s_i]
  (one per input), clamp.  Each input is requantized to the output's scale:
  y = requantize(x_i - zp_i, M_i, s_i, zp_out, lo, hi), as avgpool does (exact copy when the
  input already has the output's scale and zero point).
* ``maximum``, ``minimum``  two inputs of one shape, each requantized to the output's scale as
  for ``concat`` (attrs multipliers, shifts, clamp), then the larger (smaller) of the two.
* ``lut``     an elementwise function (attrs: function, param; e.g. sigmoid, hardswish,
  leaky_relu 0.1) on an int8 input as a table: params table (256,) of the output dtype,
  y = table[x - qmin_in].
* ``softmax`` attrs: axis.  Input int8; output int8 with scale 1/256, zero point -128.
  d = x - max(x) along the axis (in [-255, 0]); e = table[d + 255] (params table (256,) int32:
  round(2**16 * exp(scale_in * d))); y = clamp((256 * e + sum(e) // 2) // sum(e) - 128).
  A masked softmax (attention with a causal or padding mask) has params keep (int8, the
  input's rank, each axis the input's or 1; 1 = kept): max and sum run over the kept entries
  only, and a removed entry has e = 0 (y = -128, probability 0).
* ``log_softmax`` attrs: axis, multiplier (A = round(s_in / s_out * 2**28)), ln2
  (B = round(ln 2 / s_out * 2**12)).  Input int8; output int8 with scale 1/16, zero point 127
  (log-probabilities in [-15.94, 0]).  d = x - max(x) along the axis; e = table[d + 255] as for
  softmax; S = sum(e) (< 2**31); with m = floor(log2 S) and the 8 bits below its top bit
  f = ((S << (30 - m)) >> 22) - 256, lg = 65536 * (m - 16) + log2_table[f] (log2(S / 2**16) in
  Q16; params log2_table (256,) int32: round(65536 * log2(1 + (f + 0.5) / 256)));
  y = clamp(127 + floor((A * d - B * lg + 2**27) / 2**28), -128, 127).
* ``maxpool`` attrs: kernel, strides, padding (pads with the dtype minimum), dilation.
  Output scale/zero point equal the input's.
* ``avgpool`` attrs: kernel, strides, padding (count_include_pad: padding counts as zp_in, i.e.
  contributes 0), multiplier, shift, clamp.  acc = sum over window of (x - zp_in);
  y = requantize(acc, M, shift, zp_out, lo, hi) with M*2**(shift-31) ~= s_in / (s_out * D),
  D = KH*KW (1 for a sum over the window, x.sum((2, 3)); torch's divisor_override).
  Global average pooling is kernel = full spatial size.  With attr output_size [OH, OW]
  (adaptive pooling whose windows are not one size and stride), window (i, j) covers rows
  [floor(i H / OH), ceil((i+1) H / OH)) and the same for columns (qmodel.adaptive_windows);
  the divisor is per output position as below; maxpool takes output_size the same way.
  With count_include_pad false (padding does not count: TensorFlow's SAME average pooling)
  the divisor is each window's count of real taps: params multiplier and shift (OH, OW) per
  output position instead of the attrs (the quantizer gives every position the same shift).
* ``upsample`` attrs: mode "nearest" (factors [FH, FW]: each value repeated; or, to any size,
  rows [OH] and cols [OW]: the input row and column each output reads) or "bilinear"
  (size [OH, OW], align_corners): per axis, output o reads inputs i0, i1 with integer weights
  (2**f - w1, w1) of requant.linear_taps (f = 11 for int8, 7 for int16);
  y = (sum over the 2 x 2 taps of wy * wx * x + 2**(2f-1)) >> 2f.  Same scale/zero point.
* ``dilate`` attrs: strides: s - 1 zero points between pixels (a transposed conv's stride).
  Same scale/zero point.
* ``reshape`` attrs: shape (the output shape).  Same scale/zero point (flatten is a reshape).
* ``transpose`` attrs: perm (axis 0, the batch, stays first).  Same scale/zero point (a Keras
  model's NHWC input turned NCHW, or NCHW features turned NHWC before its Flatten).
* ``prelu`` (a slope per channel): x >= zero point: requantized by attrs multiplier, shift;
  below it by params multiplier (C,) (negative for a negative slope) and shift (C,).
* ``layernorm`` over the last axis (C): n = requant.layernorm_normalized (attrs eps_steps,
  center: false for RMSNorm, default true),
  y = zp + ((n * multiplier_c + 2**(s-1)) >> s) + bias_c, s = 31 - shift_c (params (C,) each).
* ``addconst`` x plus a constant of one sample's shape (a positional embedding): y = zp +
  ((x - zx) * multiplier (signed) + 2**(s-1) >> s) + bias (params, output steps), s = 31 - shift.
* ``matmul`` two activations (N, ..., T, D) @ (N, ..., D, U) (attention's scores and their
  weighted sum): sum over D of (a - za)(b - zb), requantized like ``mul`` (attrs multiplier,
  shift).
* ``pad`` attrs: axis (>= 1), before, after, mode (PAD_MODES; default "constant": zero points,
  where a class token's constant lands before a following ``addconst``, or nn.ZeroPad2d;
  "reflect", "replicate", "circular": values copied as numpy's reflect, edge, wrap).  Same
  scale/zero point.
* ``slice`` attrs: axis (>= 1), start, stop, step: x[..., start:stop:step, ...] along that axis
  (a channel split: x[:, 8:], chunk, split, ONNX Slice/Split).  Same scale/zero point.

Weight bits: weight_bits 8 = values in [-127, 127]; 4 = [-7, 7] (two per byte in flash);
2 = [-1, 1]; weight_format "pow2" = values in {0, +-1, +-2, +-4, ..., +-2**(2**(bits-1)-2)}
(a 4-bit sign+exponent code: {0, +-2**0..+-2**6}); "ternary" = {-1, 0, 1} (2 bits).

On disk: ``qmodel.json`` (everything but arrays) + ``weights.npz`` (params).
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..errors import EdgepruneError

FORMAT_VERSION = 1
DTYPE_RANGE = {"int8": (-128, 127), "int16": (-32768, 32767)}
OP_KINDS = ("conv2d", "dense", "add", "addconst", "mul", "matmul", "concat", "maximum",
            "minimum", "lut", "prelu",
            "layernorm", "softmax", "log_softmax", "maxpool", "avgpool", "reshape", "transpose",
            "slice", "pad", "upsample", "dilate")
LOG_SOFTMAX_OUT = (1 / 16, 127)   # scale, zero point: log-probabilities down to -15.94
# ops that only move or pick int8 values: their output keeps the input's scale and zero point
PAD_MODES = ("constant", "reflect", "replicate", "circular")
SAME_QPARAMS = ("maxpool", "reshape", "transpose", "slice", "pad", "upsample", "dilate")
WEIGHT_FORMATS = ("int", "pow2", "ternary")


@dataclass
class TensorInfo:
    name: str
    shape: list[int]
    dtype: str = "int8"
    scale: float = 1.0
    zero_point: int = 0

    @property
    def qmin(self) -> int:
        return DTYPE_RANGE[self.dtype][0]

    @property
    def qmax(self) -> int:
        return DTYPE_RANGE[self.dtype][1]


@dataclass
class Op:
    kind: str
    name: str
    inputs: list[str]
    output: str
    attrs: dict = field(default_factory=dict)


@dataclass
class QuantModel:
    input: str
    output: str
    tensors: dict[str, TensorInfo]
    ops: list[Op]
    params: dict[str, np.ndarray] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)
    more_outputs: list[str] = field(default_factory=list)   # several outputs: the rest, in order

    @property
    def outputs(self) -> list[str]:
        return [self.output, *self.more_outputs]

    # --- access -------------------------------------------------------------------------
    def param(self, op: Op | str, key: str) -> np.ndarray:
        name = op.name if isinstance(op, Op) else op
        try:
            return self.params[f"{name}.{key}"]
        except KeyError:
            raise EdgepruneError(f"op '{name}' has no parameter '{key}'") from None

    def op(self, name: str) -> Op:
        for o in self.ops:
            if o.name == name:
                return o
        raise EdgepruneError(f"no op named '{name}'")

    @property
    def input_info(self) -> TensorInfo:
        return self.tensors[self.input]

    @property
    def output_info(self) -> TensorInfo:
        return self.tensors[self.output]

    def weight_ops(self) -> list[Op]:
        return [o for o in self.ops if o.kind in ("conv2d", "dense")]

    def weight_bytes(self, op: Op) -> int:
        """Flash bytes of this op's weights when packed at its bit width (bias/M/shift aside)."""
        n = int(self.param(op, "weight").size)
        return (n * int(op.attrs.get("weight_bits", 8)) + 7) // 8

    def param_bytes(self, op: Op) -> int:
        """Flash bytes of bias (int32) + multiplier (int32) + shift (int8) per output channel."""
        c = int(self.param(op, "bias").size)
        return c * (4 + 4 + 1)

    def layer_table(self) -> list[dict]:
        """Per weight layer: bits, format, weight count and packed weight bytes (for reports)."""
        rows = []
        for o in self.weight_ops():
            rows.append({"layer": o.name, "kind": o.kind,
                         "weight_bits": int(o.attrs.get("weight_bits", 8)),
                         "weight_format": o.attrs.get("weight_format", "int"),
                         "activation_dtype": self.tensors[o.output].dtype,
                         "weights": int(self.param(o, "weight").size),
                         "weight_bytes": self.weight_bytes(o),
                         "bias_bytes": self.param_bytes(o)})
        return rows

    def stored_weight_ops(self) -> list[Op]:
        """The weight ops whose matrices the C library stores: one of each set of equal ones
        (a recurrent layer's Linear at every step)."""
        seen: dict[tuple, Op] = {}
        for o in self.weight_ops():
            w = self.param(o, "weight")
            seen.setdefault((w.shape, int(o.attrs.get("weight_bits", 8)), w.tobytes()), o)
        return list(seen.values())

    def total_weight_bytes(self) -> int:
        return sum(self.weight_bytes(o) for o in self.stored_weight_ops())

    # --- persistence --------------------------------------------------------------------
    def to_json(self) -> dict:
        return {"format": "edgeprune-qmodel", "version": FORMAT_VERSION,
                "input": self.input, "output": self.output, "more_outputs": self.more_outputs,
                "tensors": [asdict(t) for t in self.tensors.values()],
                "ops": [asdict(o) for o in self.ops], "meta": self.meta}

    def save(self, directory: str | Path) -> Path:
        """Write ``qmodel.json`` and ``weights.npz`` into `directory` (created if needed)."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        validate(self)
        (d / "qmodel.json").write_text(json.dumps(_jsonable(self.to_json()), indent=1))
        np.savez(d / "weights.npz", **self.params)
        return d


def _jsonable(obj):
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return obj


def load(directory: str | Path) -> QuantModel:
    """Read a QuantModel folder; errors name the file and what is wrong with it."""
    d = Path(directory)
    jpath, wpath = d / "qmodel.json", d / "weights.npz"
    if not d.is_dir():
        raise EdgepruneError(f"{d}: not a quantized model folder (expected qmodel.json + "
                             "weights.npz, as written by `edgeprune quantize`)")
    for p in (jpath, wpath):
        if not p.exists():
            raise EdgepruneError(f"{p} is missing (a quantized model folder holds qmodel.json "
                                 "and weights.npz; re-run `edgeprune quantize`)")
    try:
        doc = json.loads(jpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EdgepruneError(f"{jpath}: corrupt JSON ({e})") from None
    if not isinstance(doc, dict) or doc.get("format") != "edgeprune-qmodel":
        raise EdgepruneError(f"{jpath}: not an edgeprune qmodel file (no format tag)")
    if doc.get("version") != FORMAT_VERSION:
        raise EdgepruneError(f"{jpath}: qmodel version {doc.get('version')} not supported "
                             f"(this edgeprune reads version {FORMAT_VERSION})")
    try:
        with np.load(wpath, allow_pickle=False) as z:
            params = {k: z[k] for k in z.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise EdgepruneError(f"{wpath}: corrupt weights archive ({type(e).__name__}: {e})") \
            from None
    try:
        tensors = {t["name"]: TensorInfo(**t) for t in doc["tensors"]}
        ops = [Op(**o) for o in doc["ops"]]
        qm = QuantModel(doc["input"], doc["output"], tensors, ops, params, doc.get("meta", {}),
                        list(doc.get("more_outputs", [])))
    except (KeyError, TypeError) as e:
        raise EdgepruneError(f"{jpath}: malformed qmodel ({type(e).__name__}: {e})") from None
    try:
        validate(qm)
    except EdgepruneError as e:
        raise EdgepruneError(f"{d}: {e}") from None
    return qm


# --- shape inference & validation -------------------------------------------------------
def conv_out_hw(h: int, w: int, kernel, strides, padding, dilation) -> tuple[int, int]:
    kh, kw = kernel
    oh = (h + padding[0] + padding[2] - dilation[0] * (kh - 1) - 1) // strides[0] + 1
    ow = (w + padding[1] + padding[3] - dilation[1] * (kw - 1) - 1) // strides[1] + 1
    return oh, ow


def infer_shape(qm: QuantModel, op: Op) -> list[int]:
    """The output shape `op` produces from its input tensors (raises on inconsistencies)."""
    ins = [qm.tensors[i].shape for i in op.inputs]
    a = op.attrs
    if op.kind == "conv2d":
        n, c, h, w = ins[0]
        wt = qm.param(op, "weight")
        o, cg, kh, kw = wt.shape
        g = int(a["groups"])
        if c != cg * g or o % g:
            raise EdgepruneError(f"conv2d '{op.name}': input has {c} channels, weight "
                                 f"{list(wt.shape)} with groups={g} does not fit")
        oh, ow = conv_out_hw(h, w, (kh, kw), a["strides"], a["padding"], a["dilation"])
        return [n, o, oh, ow]
    if op.kind == "dense":   # over the last axis: (N, K) or (N, ..., K)
        *lead, k = ins[0]
        wt = qm.param(op, "weight")
        if wt.shape[1] != k or not lead:
            raise EdgepruneError(f"dense '{op.name}': input {ins[0]} has {k} features, weight "
                                 f"is {list(wt.shape)}")
        return [*lead, int(wt.shape[0])]
    if op.kind == "add":    # x - x.mean(-1, keepdim=True): one operand may broadcast
        try:
            shape = list(np.broadcast_shapes(tuple(ins[0]), tuple(ins[1])))
        except ValueError:
            shape = None
        if shape not in (list(ins[0]), list(ins[1])):
            raise EdgepruneError(f"add '{op.name}': input shapes {ins[0]} and {ins[1]} do not "
                                 "broadcast to one of them")
        return shape
    if op.kind in ("maximum", "minimum"):
        if ins[0] != ins[1]:
            raise EdgepruneError(f"{op.kind} '{op.name}': input shapes {ins[0]} and {ins[1]} "
                                 "differ (broadcasting is not supported)")
        if op.kind != "add" and not len(a["multipliers"]) == len(a["shifts"]) == 2:
            raise EdgepruneError(f"{op.kind} '{op.name}': needs 2 multipliers and shifts")
        return list(ins[0])
    if op.kind == "mul":
        try:
            shape = list(np.broadcast_shapes(tuple(ins[0]), tuple(ins[1])))
        except ValueError:
            shape = None
        if shape != list(ins[0]):
            raise EdgepruneError(f"mul '{op.name}': {ins[1]} does not broadcast to {ins[0]}")
        return shape
    if op.kind == "addconst":
        if list(qm.param(op, "bias").shape) != list(ins[0][1:]):
            raise EdgepruneError(f"addconst '{op.name}': bias {list(qm.param(op, 'bias').shape)} "
                                 f"is not one sample of the input {ins[0]}")
        return list(ins[0])
    if op.kind == "matmul":
        (*lead, t, d), (*lead_b, d_b, u) = ins[0], ins[1]
        if lead != lead_b or d != d_b or not lead:
            raise EdgepruneError(f"matmul '{op.name}': {ins[0]} @ {ins[1]} do not multiply")
        return [*lead, t, u]
    if op.kind == "concat":
        axis = int(a.get("axis", 1))
        rest = {tuple(sh[:axis] + sh[axis + 1:]) for sh in ins}
        if len(rest) != 1 or not all(1 <= axis < len(sh) for sh in ins):
            raise EdgepruneError(f"concat '{op.name}': input shapes {ins} differ outside "
                                 f"axis {axis}")
        if not len(a["multipliers"]) == len(a["shifts"]) == len(ins):
            raise EdgepruneError(f"concat '{op.name}': {len(ins)} inputs but "
                                 f"{len(a['multipliers'])} multipliers, {len(a['shifts'])} shifts")
        return [*ins[0][:axis], sum(sh[axis] for sh in ins), *ins[0][axis + 1:]]
    if op.kind in ("prelu", "layernorm"):    # per channel: axis 1, or the last for layernorm
        axis = -1 if op.kind == "layernorm" else 1
        keys = ("multiplier", "shift") + (("bias",) if op.kind == "layernorm" else ())
        for key in keys:     # a layernorm's may be one value for every channel
            ok = [[ins[0][axis]]] + ([[1]] if op.kind == "layernorm" else [])
            if len(ins[0]) < 2 or list(qm.param(op, key).shape) not in ok:
                raise EdgepruneError(f"{op.kind} '{op.name}': {key} must hold one value per "
                                     f"channel of the input {ins[0]}")
        return list(ins[0])
    if op.kind == "lut":
        table = qm.param(op, "table")
        if qm.tensors[op.inputs[0]].dtype != "int8" or table.shape != (256,):
            raise EdgepruneError(f"lut '{op.name}': needs an int8 input and 256 table entries "
                                 f"(input {qm.tensors[op.inputs[0]].dtype}, table "
                                 f"{list(table.shape)})")
        return list(ins[0])
    if op.kind == "softmax":
        table = qm.param(op, "table")
        out = qm.tensors[op.output]
        if (qm.tensors[op.inputs[0]].dtype != "int8" or table.shape != (256,)
                or (out.dtype, out.scale, out.zero_point) != ("int8", 1 / 256, -128)):
            raise EdgepruneError(f"softmax '{op.name}': needs an int8 input, 256 table entries "
                                 "and an int8 output of scale 1/256, zero point -128")
        if not -len(ins[0]) <= int(a["axis"]) < len(ins[0]) or ins[0][int(a["axis"])] > 32767:
            raise EdgepruneError(f"softmax '{op.name}': axis {a['axis']} of {ins[0]} (at most "
                                 "32767 values per row)")
        keep = qm.params.get(f"{op.name}.keep")
        if keep is not None and (keep.ndim != len(ins[0]) or any(
                k not in (1, n) for k, n in zip(keep.shape, ins[0]))
                or not keep.any(axis=int(a["axis"])).all()):
            raise EdgepruneError(f"softmax '{op.name}': a mask of shape {list(keep.shape)} for "
                                 f"{ins[0]} (each axis the input's or 1, a key kept in every row)")
        return list(ins[0])
    if op.kind == "log_softmax":
        out = qm.tensors[op.output]
        if (qm.tensors[op.inputs[0]].dtype != "int8" or qm.param(op, "table").shape != (256,)
                or qm.param(op, "log2_table").shape != (256,)
                or (out.dtype, out.scale, out.zero_point) != ("int8", *LOG_SOFTMAX_OUT)):
            raise EdgepruneError(f"log_softmax '{op.name}': needs an int8 input, 256-entry "
                                 "exp and log2 tables and an int8 output of scale 1/16, zero "
                                 "point 127")
        if not -len(ins[0]) <= int(a["axis"]) < len(ins[0]) or ins[0][int(a["axis"])] > 32767:
            raise EdgepruneError(f"log_softmax '{op.name}': axis {a['axis']} of {ins[0]} (at "
                                 "most 32767 values per row)")
        return list(ins[0])
    if op.kind in ("maxpool", "avgpool") and "output_size" in a:
        return [*ins[0][:2], *(int(d) for d in a["output_size"])]
    if op.kind in ("maxpool", "avgpool"):
        n, c, h, w = ins[0]
        oh, ow = conv_out_hw(h, w, a["kernel"], a["strides"], a["padding"],
                             a.get("dilation", [1, 1]))
        return [n, c, oh, ow]
    if op.kind == "reshape":
        shape = [int(s) for s in a["shape"]]
        if int(np.prod(shape)) != int(np.prod(ins[0])):
            raise EdgepruneError(f"reshape '{op.name}': {ins[0]} -> {shape} changes the size")
        return shape
    if op.kind == "transpose":
        perm = [int(d) for d in a["perm"]]
        if sorted(perm) != list(range(len(ins[0]))) or perm[0] != 0:
            raise EdgepruneError(f"transpose '{op.name}': perm {perm} is not a permutation of "
                                 f"{len(ins[0])} axes that keeps the batch axis first")
        return [ins[0][d] for d in perm]
    if op.kind == "pad":
        axis, before, after = (int(a[k]) for k in ("axis", "before", "after"))
        if not 1 <= axis < len(ins[0]) or before < 0 or after < 0 or \
                a.get("mode", "constant") not in PAD_MODES:
            raise EdgepruneError(f"pad '{op.name}': {before}, {after} along axis {axis} of "
                                 f"{ins[0]} in mode {a.get('mode', 'constant')!r}")
        return [*ins[0][:axis], ins[0][axis] + before + after, *ins[0][axis + 1:]]
    if op.kind == "slice":
        axis, start, stop, step = (int(a[k]) for k in ("axis", "start", "stop", "step"))
        if not (1 <= axis < len(ins[0]) and 0 <= start < stop <= ins[0][axis] and step >= 1):
            raise EdgepruneError(f"slice '{op.name}': [{start}:{stop}:{step}] along axis {axis} "
                                 f"does not fit the input {ins[0]}")
        return [*ins[0][:axis], len(range(start, stop, step)), *ins[0][axis + 1:]]
    if op.kind == "upsample" and a.get("mode", "nearest") == "bilinear":
        return [*ins[0][:2], *(int(d) for d in a["size"])]
    if op.kind == "upsample" and "rows" in a:   # nearest to any size: the rows/columns read
        n, c, h, w = ins[0]
        if not all(0 <= int(i) < size for key, size in (("rows", h), ("cols", w))
                   for i in a[key]):
            raise EdgepruneError(f"upsample '{op.name}': rows/cols outside {ins[0]}")
        return [n, c, len(a["rows"]), len(a["cols"])]
    if op.kind == "upsample":   # nearest neighbour by whole factors: each value repeated
        n, c, h, w = ins[0]
        sh, sw = (int(f) for f in a["factors"])
        return [n, c, h * sh, w * sw]
    if op.kind == "dilate":     # zero points between pixels: a transposed conv's stride
        n, c, h, w = ins[0]
        sh, sw = (int(s) for s in a["strides"])
        return [n, c, (h - 1) * sh + 1, (w - 1) * sw + 1]
    raise EdgepruneError(f"op '{op.name}': unknown kind '{op.kind}' (known: {OP_KINDS})")


def adaptive_windows(size: int, out: int) -> list[tuple[int, int]]:
    """torch's adaptive pooling windows along one axis: [floor(i n / o), ceil((i+1) n / o))."""
    return [(i * size // out, -(-(i + 1) * size // out)) for i in range(out)]


def window_counts(h: int, w: int, attrs: dict) -> np.ndarray:
    """(OH, OW): how many taps of each pooling window lie inside the unpadded H x W image."""
    if "output_size" in attrs:
        oh, ow = attrs["output_size"]
        return np.outer([e - s for s, e in adaptive_windows(h, oh)],
                        [e - s for s, e in adaptive_windows(w, ow)]).astype(np.int64)
    t, l, b, r = attrs["padding"]
    kh, kw = attrs["kernel"]
    sh, sw = attrs["strides"]
    oh, ow = conv_out_hw(h, w, (kh, kw), (sh, sw), (t, l, b, r), attrs.get("dilation", [1, 1]))
    rows = [min(i * sh - t + kh, h) - max(i * sh - t, 0) for i in range(oh)]
    cols = [min(j * sw - l + kw, w) - max(j * sw - l, 0) for j in range(ow)]
    return np.outer(rows, cols).astype(np.int64)


def weight_value_range(op: Op) -> tuple[int, int]:
    bits = int(op.attrs.get("weight_bits", 8))
    fmt = op.attrs.get("weight_format", "int")
    if fmt == "ternary":
        return -1, 1
    if fmt == "pow2":
        m = 2 ** (2 ** (bits - 1) - 2)
        return -m, m
    q = 2 ** (bits - 1) - 1
    return -q, q


def accumulator_bound(qm: QuantModel, op: Op) -> int:
    """Worst-case |acc| over all inputs for a conv/dense op (must stay below 2**31)."""
    t = qm.tensors[op.inputs[0]]
    xmax = max(t.qmax - t.zero_point, t.zero_point - t.qmin)
    w = qm.param(op, "weight").astype(np.int64).reshape(qm.param(op, "weight").shape[0], -1)
    b = np.abs(qm.param(op, "bias").astype(np.int64))
    return int((np.abs(w).sum(1) * xmax + b).max(initial=0))


def validate(qm: QuantModel) -> None:
    """Check names, order, shapes, dtypes and integer ranges; errors name the op and numbers."""
    if qm.input not in qm.tensors:
        raise EdgepruneError(f"input tensor '{qm.input}' is not declared")
    defined = {qm.input}
    for t in qm.tensors.values():
        if t.dtype not in DTYPE_RANGE:
            raise EdgepruneError(f"tensor '{t.name}': dtype {t.dtype} (supported: int8, int16)")
        if not t.qmin <= t.zero_point <= t.qmax:
            raise EdgepruneError(f"tensor '{t.name}': zero point {t.zero_point} outside {t.dtype}")
        if not (t.scale > 0 and np.isfinite(t.scale)):
            raise EdgepruneError(f"tensor '{t.name}': scale {t.scale} must be positive")
    for op in qm.ops:
        for i in op.inputs:
            if i not in defined:
                raise EdgepruneError(f"op '{op.name}' reads '{i}' before it is computed")
        if op.output in defined:
            raise EdgepruneError(f"op '{op.name}' writes '{op.output}' a second time")
        if op.output not in qm.tensors:
            raise EdgepruneError(f"op '{op.name}': output tensor '{op.output}' not declared")
        shape = infer_shape(qm, op)
        out = qm.tensors[op.output]
        if list(out.shape) != shape:
            raise EdgepruneError(f"op '{op.name}': output '{op.output}' declared {out.shape}, "
                                 f"computes {shape}")
        if "clamp" in op.attrs:
            lo, hi = op.attrs["clamp"]
            if not out.qmin <= lo <= hi <= out.qmax:
                raise EdgepruneError(f"op '{op.name}': clamp [{lo}, {hi}] outside {out.dtype}")
        if op.kind == "lut":
            t = qm.param(op, "table")
            if t.size and (int(t.min()) < out.qmin or int(t.max()) > out.qmax):
                raise EdgepruneError(f"lut '{op.name}': table values outside {out.dtype}")
        if op.kind == "avgpool" and (not op.attrs.get("count_include_pad", True)
                                     or "output_size" in op.attrs):
            for key in ("multiplier", "shift"):
                if list(qm.param(op, key).shape) != list(out.shape[2:]):
                    raise EdgepruneError(f"avgpool '{op.name}': {key} must hold one value per "
                                         f"output position {out.shape[2:]}")
        if op.kind in SAME_QPARAMS:
            src = qm.tensors[op.inputs[0]]
            if (src.scale, src.zero_point, src.dtype) != (out.scale, out.zero_point, out.dtype):
                raise EdgepruneError(f"{op.kind} '{op.name}': output must keep the input's "
                                     "scale, zero point and dtype")
        if op.kind in ("conv2d", "dense"):
            wt = qm.param(op, "weight")
            fmt = op.attrs.get("weight_format", "int")
            if fmt not in WEIGHT_FORMATS:
                raise EdgepruneError(f"op '{op.name}': weight_format '{fmt}' unknown")
            lo, hi = weight_value_range(op)
            if wt.size and (int(wt.min()) < lo or int(wt.max()) > hi):
                raise EdgepruneError(f"op '{op.name}': weights in [{int(wt.min())}, "
                                     f"{int(wt.max())}] exceed the {op.attrs.get('weight_bits')}"
                                     f"-bit {fmt} range [{lo}, {hi}]")
            if fmt == "pow2":
                a = np.abs(wt[wt != 0].astype(np.int64))
                if a.size and np.any(a & (a - 1)):
                    raise EdgepruneError(f"op '{op.name}': pow2 weights must be 0 or +-2**k")
            bound = accumulator_bound(qm, op)
            if bound >= 2 ** 31:
                raise EdgepruneError(f"op '{op.name}': worst-case accumulator {bound} overflows "
                                     "int32 (use 8-bit activations or smaller weights here)")
        defined.add(op.output)
    for out in qm.outputs:
        if out not in defined:
            raise EdgepruneError(f"output tensor '{out}' is never computed")
