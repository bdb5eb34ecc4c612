"""An ONNX model as a torch.fx GraphModule with the same outputs, so ONNX input can be pruned,
fine-tuned and exported back.

Supported ops: Conv (1-D, 2-D), ConvTranspose (1-D, 2-D, any group and dilation: as the
convolution it equals, edgeprune.layers), BatchNormalization, Relu, Clip, Sigmoid, Tanh, HardSwish,
HardSigmoid, LeakyRelu, Elu, PRelu, Add, Sub, Mul (x * Sigmoid(x) becomes SiLU), Div, Erf, Gelu,
Softmax, LogSoftmax, ReduceMean, ReduceMax, ReduceMin, ReduceL2 (in F.normalize's form, with
Clip, Expand, Div), Concat, MaxPool, AveragePool, GlobalAveragePool, GlobalMaxPool, Flatten,
Reshape, Unsqueeze, Squeeze, Transpose (batch axis in place: what Keras
models exported with tf2onnx carry around their NHWC input and before Flatten; at a batch of 1
also one that moves the batch axis, as torch's attention does: such values are held per sample,
(N, *their shape at batch 1), until the batch is first again), Pad (constant, H
and W), Gemm, MatMul (constant right operand), plus Identity, Dropout and Constant; Selu, Celu,
Softplus, Softsign, Mish, Abs, Exp, Neg, Sqrt, Reciprocal, Sign, Log, Sin, Cos and Pow by a
number (table activations later); Max and Min with a constant number (clamps) or of tensors;
Resize (nearest by whole factors, or linear); GRU, LSTM and RNN between the Transposes torch
writes around a batch_first layer (as torch layers, later unrolled); supported_ops() lists
every op. The file is first
simplified by onnxsim at its static input shape (shape arithmetic folded into
constants; BatchNorm kept, pruning reads it). Layers with
weights become real nn.Conv2d / nn.BatchNorm2d (1d after a Gemm) / nn.Linear modules (so
pruning, MAC counting and training see them); everything else becomes a plain fx call. Each
node is also executed once on an example tensor while the graph is built, which resolves
Reshape's 0/-1 entries into the static shape the model runs at; a reshape that keeps the batch
axis leaves it free (-1), so the model trains and evaluates at any batch size.
"""

from __future__ import annotations

import math
import operator
import re
from pathlib import Path

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from .errors import EdgepruneError
from .layers import ConvTransposeAsConv, local_response_norm, zero_insert



def _err(msg: str) -> EdgepruneError:
    return EdgepruneError(msg, stage="onnx")


def _text(v) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _nearest_picks(n: int, size: int, ctm: str, rounding: str,
                   scale: float | None = None) -> np.ndarray | None:
    """The input pixel ONNX Resize (nearest) picks for each output pixel when it resizes an
    axis of n to `size` (by `scale` where the node gives scales, else size / n): the
    coordinate transformation, then the rounding, of the operator's definition. None for a
    rule it does not name."""
    out = np.arange(size, dtype=np.float64)
    scale = scale or size / n
    if ctm == "half_pixel" or (ctm == "pytorch_half_pixel" and size > 1):
        x = (out + 0.5) / scale - 0.5
    elif ctm == "pytorch_half_pixel":      # an output of one pixel reads the first
        x = np.zeros_like(out)
    elif ctm == "asymmetric":
        x = out / scale
    elif ctm == "tf_half_pixel_for_nn":
        x = (out + 0.5) / scale
    elif ctm == "align_corners":
        x = out * (n - 1) / max(size - 1, 1)
    else:
        return None
    pick = {"round_prefer_floor": np.ceil(x - 0.5), "round_prefer_ceil": np.floor(x + 0.5),
            "floor": np.floor(x), "ceil": np.ceil(x)}.get(rounding)
    return None if pick is None else np.clip(pick, 0, n - 1).astype(np.int64)


def _torch_nearest(sizes, out, picks: list[np.ndarray], scales=None) -> dict | None:
    """nn.Upsample's arguments (nearest, to a size or by a scale: the node's `scales` if it
    gives them) under which it picks the input pixels `picks` for each axis resized from
    `sizes` to `out`; None if none does."""
    index = torch.arange(math.prod(sizes), dtype=torch.float64).reshape(1, 1, *sizes)
    strides = [math.prod(sizes[i + 1:]) for i in range(len(sizes))]
    candidates = [{"size": tuple(out)},
                  {"scale_factor": tuple(o / n for n, o in zip(sizes, out))}]
    if scales is not None:
        candidates.insert(1, {"scale_factor": tuple(float(f) for f in scales)})
    for how in candidates:
        got = nn.Upsample(mode="nearest", **how)(index)[0, 0]
        if list(got.shape) != list(out):
            continue
        picked = []
        for axis, (n, stride) in enumerate(zip(sizes, strides)):
            line = got      # along `axis`, at pixel 0 of the others
            for other in reversed(range(len(sizes))):
                line = line if other == axis else line.select(other, 0)
            picked.append(line.numpy().astype(np.int64) // stride % n)
        if all(np.array_equal(a, b) for a, b in zip(picked, picks)):
            return {**how, "mode": "nearest"}
    return None


def runs(indices: list[int]) -> list[tuple[int, int]]:
    """(start, stop) of each run of consecutive indices, in order: [0, 1, 2, 5, 3] is
    [(0, 3), (5, 6), (3, 4)]."""
    out: list[list[int]] = []
    for i in indices:
        if out and out[-1][1] == i:
            out[-1][1] += 1
        else:
            out.append([i, i + 1])
    return [(a, b) for a, b in out]


def _strided(picks: np.ndarray) -> bool:
    """Whether the picks are every k-th pixel (k >= 1) from some start."""
    steps = np.diff(picks)
    return len(picks) == 1 or (steps[0] >= 1 and bool(np.all(steps == steps[0])))


def _attrs(node) -> dict:
    from onnx import helper
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _auto_pads(a: dict, size: tuple, kernel: tuple) -> list[int] | None:
    """Explicit [t, l, b, r] pads (or [l, r] in 1-D) for a Conv's or pool's auto_pad
    (TensorFlow's SAME), else None."""
    mode = _text(a.get("auto_pad", b"NOTSET"))
    if mode in ("NOTSET", ""):
        return None
    if mode == "VALID":
        return [0] * 2 * len(kernel)
    strides = a.get("strides", (1,) * len(kernel))
    dil = a.get("dilations", (1,) * len(kernel))
    begin, end = [], []
    for i, k, s, d in zip(size, kernel, strides, dil):
        total = max((-(-i // s) - 1) * s + (k - 1) * d + 1 - i, 0)
        small, big = total // 2, total - total // 2
        begin.append(small if mode == "SAME_UPPER" else big)
        end.append(big if mode == "SAME_UPPER" else small)
    return begin + end


def supported_ops() -> list[str]:
    """The ONNX op types the builder converts (its op_* methods)."""
    return sorted(name[3:] for name in dir(_Builder) if name.startswith("op_"))


def _l2_norm(x: torch.Tensor, dims: tuple[int, ...], keepdim: bool = False) -> torch.Tensor:
    """ONNX ReduceL2."""
    return torch.linalg.vector_norm(x, 2, dims, keepdim)


# ops that act on a per-sample value (edgeprune reads it as (N, *shape at batch 1)) as they
# act on any tensor once their axes count from the end
_PER_SAMPLE_OPS = {
    "Transpose", "Reshape", "Squeeze", "Unsqueeze", "Flatten", "Gather", "Slice", "Split",
    "Concat", "MatMul", "Gemm", "Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Where",
    "Equal", "Greater", "Less", "Not", "And", "Or", "Cast", "Identity", "Dropout", "Softmax",
    "LogSoftmax", "LayerNormalization", "ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin",
    "Relu", "Gelu", "Erf", "Sigmoid", "Tanh", "Sqrt", "Reciprocal", "Neg", "Exp", "Abs",
    "Clip", "LeakyRelu", "Elu", "HardSwish", "HardSigmoid"}


def _shape_at_batch_1(node, builder, shape: tuple) -> tuple:
    """The shape a Transpose, Reshape, Squeeze, Unsqueeze or Flatten gives a tensor of
    `shape` (what the ONNX file computes at batch 1)."""
    a, op = _attrs(node), node.op_type
    if op == "Transpose":
        perm = [int(d) for d in a.get("perm", [])] or list(range(len(shape) - 1, -1, -1))
        return tuple(shape[p] for p in perm)
    if op == "Reshape":
        target = [int(d) for d in builder._const(node.input[1], node, "shape").reshape(-1)]
        if not a.get("allowzero", 0):
            target = [shape[i] if d == 0 else d for i, d in enumerate(target)]
        return tuple(np.empty(shape).reshape(target).shape)
    if op == "Flatten":
        axis = int(a.get("axis", 1)) % (len(shape) + 1)
        return (int(np.prod(shape[:axis])), int(np.prod(shape[axis:])))
    axes = builder._axes(node, a)
    if op == "Unsqueeze":
        v = np.empty(shape)
        for d in sorted(d % (len(shape) + len(axes)) for d in axes):
            v = np.expand_dims(v, d)
        return v.shape
    dims = {d % len(shape) for d in axes} if axes else {d for d, n in enumerate(shape) if n == 1}
    return tuple(n for d, n in enumerate(shape) if d not in dims)


def _axes_from_end(node, rank: int, builder):
    """A copy of `node` whose axis attribute, axes attribute or axes input count from the end
    of its first input's `rank` axes: the same axes of a per-sample value (N, *shape)."""
    import onnx
    n = onnx.NodeProto()
    n.CopyFrom(node)
    for attr in n.attribute:
        if attr.name == "axis" and node.op_type != "Flatten":
            attr.i = attr.i - rank if attr.i >= 0 else attr.i
        elif attr.name == "axes":
            attr.ints[:] = [d - rank if d >= 0 else d for d in attr.ints]
    slot = {"Slice": 3, "Squeeze": 1, "Unsqueeze": 1, "ReduceMean": 1, "ReduceSum": 1,
            "ReduceMax": 1, "ReduceMin": 1}.get(node.op_type)
    if slot is not None and len(n.input) > slot and n.input[slot] in builder.consts:
        axes = np.asarray(builder.consts[n.input[slot]]).astype(np.int64)
        name = f"{n.input[slot]}__from_end"
        builder.consts[name] = np.where(axes >= 0, axes - rank, axes)
        n.input[slot] = name
    return n


class _Builder:
    def __init__(self, onnx_model, input_shape):
        from onnx import numpy_helper
        self.m = onnx_model
        self.g = onnx_model.graph
        self.consts: dict[str, np.ndarray] = {i.name: numpy_helper.to_array(i).copy()
                                              for i in self.g.initializer}  # writable
        self.root = nn.Module()
        self.graph = fx.Graph()
        self.env: dict[str, fx.Node] = {}
        self.val: dict[str, torch.Tensor] = {}
        self.names: set[str] = set()
        self.users: dict[str, int] = {}
        self.consumers: dict[str, list] = {}
        # values an exporter holds time-first around a recurrent layer ((T, N, F), its Y and
        # Y_h): the form's name and the batch-first fx value that stands for it
        self.seq: dict[str, tuple[str, tuple]] = {}
        # values whose batch axis an exporter moved from axis 0 (torch's attention runs time
        # first: (T, N, E), (T, N * H, d)), each held per sample: (N, *its shape at batch 1)
        self.per_sample: dict[str, tuple] = {}
        for n in self.g.node:
            for i in n.input:
                self.users[i] = self.users.get(i, 0) + 1
                self.consumers.setdefault(i, []).append(n)
        inputs = [i for i in self.g.input if i.name not in self.consts]
        if len(inputs) != 1:
            raise _err(f"the model has {len(inputs)} inputs "
                       f"({', '.join(i.name for i in inputs)}); prune, quantize and deploy "
                       "take models with one input (compile, simulate and profile take "
                       "several, in float)")
        inp = inputs[0]
        dims = []
        for k, d in enumerate(inp.type.tensor_type.shape.dim):
            dims.append(d.dim_value if d.HasField("dim_value") else (1 if k == 0 else None))
        if input_shape is not None:
            if dims and len(input_shape) != len(dims):
                raise _err(f"--input-shape {tuple(input_shape)} has rank {len(input_shape)}, "
                           f"the model's input '{inp.name}' has rank {len(dims)}")
            dims = list(input_shape)
        if not dims or any(d is None or d <= 0 for d in dims):
            raise _err(f"input '{inp.name}' has a dynamic shape; pass --input-shape, "
                       "e.g. --input-shape 1,1,28,28")
        self.shape = tuple(int(d) for d in dims)
        self.input_name = inp.name
        self.env[inp.name] = self.graph.placeholder("input")
        self.val[inp.name] = torch.randn(self.shape)

    # ---- helpers
    def _name(self, node, op: str) -> str:
        base = re.sub(r"\W", "_", node.name or op.lower()).strip("_") or op.lower()
        if base[0].isdigit():
            base = f"{op.lower()}_{base}"
        name, k = base, 1
        while name in self.names or hasattr(nn.Module(), name):
            name, k = f"{base}_{k}", k + 1
        self.names.add(name)
        return name

    def _const(self, name: str, node, what: str) -> np.ndarray:
        if name not in self.consts:
            raise _err(f"ONNX node '{node.name}' ({node.op_type}): {what} '{name}' must be a "
                       "constant initializer")
        return self.consts[name]

    def _in(self, name: str):
        """An fx argument for an ONNX value: a node, or a constant registered as a buffer."""
        if name in self.seq:
            raise _err(f"ONNX value '{name}' has its batch axis moved ({self.seq[name][0]}, "
                       "time first); only a GRU/LSTM/RNN and the Transpose, Squeeze, Reshape "
                       "and Gather that exporters write around it may read it")
        if name in self.per_sample and name not in self.env:
            x = self.per_sample[name]
            if x[1].shape[1] != 1:
                raise _err(f"ONNX value '{name}' has its batch axis moved (shape "
                           f"{list(x[1].shape[1:])} at batch 1); only data movement, "
                           "elementwise ops, products, softmax, norms and reductions may read "
                           "it before the batch is first again")
            self.env[name], self.val[name] = self._fn(torch.squeeze, [x[0], 1], [x[1], 1])
        if name in self.env:
            return self.env[name], self.val[name]
        c = self.consts[name]
        t = torch.as_tensor(np.array(c))
        if t.numel() == 1:
            return float(t.reshape(())), t.reshape(())
        t = t if t.dtype == torch.bool else t.float()   # a mask stays a mask (Where, Not)
        bname = self._name(type("n", (), {"name": f"const_{name}"})(), "const")
        self.root.register_buffer(bname, t)
        node = self.graph.get_attr(bname)
        return node, t

    def _module(self, node, op, mod: nn.Module, x):
        name = self._name(node, op)
        self.root.add_module(name, mod)
        n = self.graph.call_module(name, (x[0],))
        with torch.no_grad():
            v = mod.eval()(x[1])
        return n, v

    def _fn(self, fn, args, vals, kwargs=None):
        n = self.graph.call_function(fn, tuple(args), kwargs or {})
        with torch.no_grad():
            v = fn(*vals, **(kwargs or {}))
        return n, v

    def _compose(self, fn, *xs):
        """fn of ONNX values (fx node, value) written as the torch ops it runs: each becomes
        a node (fn runs once on fx proxies), and the value is computed alongside."""
        node = fn(*(fx.Proxy(n) for n, _ in xs)).node
        with torch.no_grad():
            return node, fn(*(v for _, v in xs))

    def _pad_if_asymmetric(self, node, x, pads, value=0.0):
        """ONNX pads [t, l, b, r] ([l, r] in 1-D); torch layers take symmetric padding only."""
        if pads and len(pads) == 2:
            l, r = pads
            if l == r:
                return x, (l,)
            return self._fn(F.pad, [x[0], (l, r)], [x[1], (l, r)], {"value": value}), (0,)
        if not pads or len(pads) != 4:
            return x, (0, 0)
        t, l, b, r = pads
        if t == b and l == r:
            return x, (t, l)
        return self._fn(F.pad, [x[0], (l, r, t, b)], [x[1], (l, r, t, b)],
                        {"value": value}), (0, 0)

    # ---- ops
    def build(self) -> fx.GraphModule:
        # what cannot be converted at all is named before any node's details are checked
        unknown = [n for n in self.g.node if not hasattr(self, f"op_{n.op_type}")]
        if unknown:
            ops = sorted({n.op_type for n in unknown})
            hint = (" (torch's default exporter writes a 1-D linear interpolation, or an "
                    "adaptive pool whose size does not divide its input, as GatherND: give "
                    "edgeprune the torch model itself, or for an interpolation export with "
                    "dynamo=False, which writes a Resize)" if "GatherND" in ops else "")
            raise _err(f"ONNX node '{unknown[0].name}' ({unknown[0].op_type}) is not supported "
                       f"(unsupported ops in the model: {', '.join(ops)}){hint}; supported ops: "
                       f"{', '.join(supported_ops())}")
        for node in self.g.node:
            op = node.op_type
            handler = getattr(self, f"op_{op}")
            try:
                if any(i in self.per_sample for i in node.input) and op in _PER_SAMPLE_OPS:
                    self._per_sample_op(node, handler)
                    continue
                out = handler(node, _attrs(node))
            except EdgepruneError:
                raise
            except Exception as e:
                raise _err(f"ONNX node '{node.name}' ({op}) could not be converted: "
                           f"{type(e).__name__}: {e}") from None
            if out is not None:
                self.env[node.output[0]], self.val[node.output[0]] = out
        outs = [self._in(o.name)[0] for o in self.g.output]
        self.graph.output(outs[0] if len(outs) == 1 else tuple(outs))
        gm = fx.GraphModule(self.root, self.graph)
        gm.graph.lint()
        return gm.eval()

    # ---- values whose batch axis moved: each sample's ops at batch 1, the batch axis in front
    def _enter_per_sample(self, node, x, shape_at_1: tuple) -> None:
        """An ordinary value (batch first) whose next op moves its batch axis: per sample,
        (N, 1, ...), then that op (a Transpose or Reshape) per sample."""
        if node.op_type == "Transpose":   # the other axes permuted, then the batch's unit axis
            perm = [int(d) for d in _attrs(node).get("perm", [])] or \
                list(range(x[1].dim() - 1, -1, -1))
            order = (0, *(p for p in perm if p != 0))
            if order != tuple(range(len(order))):
                x = self._fn(torch.permute, [x[0], order], [x[1], order])
            at = perm.index(0) + 1
            self._store_per_sample(node.output[0],
                                   self._fn(torch.unsqueeze, [x[0], at], [x[1], at]))
            return
        per = self._fn(torch.unsqueeze, [x[0], 1], [x[1], 1])
        self._store_per_sample(node.output[0], self._per_sample_shape_op(node, per, shape_at_1))

    def _per_sample_shape_op(self, node, x, shape_at_1: tuple):
        if node.op_type == "Transpose":
            perm = [int(d) for d in _attrs(node).get("perm", [])] or \
                list(range(len(shape_at_1) - 1, -1, -1))
            order = (0, *(p + 1 for p in perm))
            return self._fn(torch.permute, [x[0], order], [x[1], order])
        return self._fn(torch.reshape, [x[0], (-1, *shape_at_1)],
                        [x[1], (x[1].shape[0], *shape_at_1)])

    def _store_per_sample(self, name: str, x) -> None:
        """A per-sample result: ordinary again when its first axis (at batch 1) is a unit
        axis, which may be taken for the batch."""
        if x[1].dim() > 1 and x[1].shape[1] == 1:
            self.env[name], self.val[name] = self._fn(torch.squeeze, [x[0], 1], [x[1], 1])
        else:
            self.per_sample[name] = x

    def _per_sample_op(self, node, handler) -> None:
        """`node` on per-sample inputs: shape ops at batch 1 behind the batch axis; other ops
        by their own handler, with every axis counted from the end (the same axes on
        (N, *shape)) and ordinary inputs made per sample."""
        ins = [i for i in node.input if i and i not in self.consts]
        rank = {i: (self.per_sample[i][1].dim() - 1 if i in self.per_sample
                    else self._in(i)[1].dim()) for i in ins}
        xs = {i: self.per_sample[i] if i in self.per_sample else
              self._fn(torch.unsqueeze, [self._in(i)[0], 1], [self._in(i)[1], 1]) for i in ins}
        first = node.input[0]
        if node.op_type in ("Transpose", "Reshape", "Squeeze", "Unsqueeze", "Flatten") and \
                first in xs:
            sample = xs[first][1][0]     # the shape op on one sample, at batch 1
            at_1 = _shape_at_batch_1(node, self, tuple(sample.shape))
            self._store_per_sample(node.output[0],
                                   self._per_sample_shape_op(node, xs[first], at_1))
            return
        top = max(rank.values())
        for i in ins:   # broadcast as ONNX does: ranks aligned on the right, batch in front
            if rank[i] < top:
                v = xs[i]
                shape = (*(1,) * (top - rank[i]), *v[1].shape[1:])
                xs[i] = self._fn(torch.reshape, [v[0], (-1, *shape)],
                                 [v[1], (v[1].shape[0], *shape)])
        n = _axes_from_end(node, rank[first] if first in rank else top, self)
        saved = {i: (self.env.get(i), self.val.get(i)) for i in ins}
        for i in ins:
            self.env[i], self.val[i] = xs[i]
        try:
            out = handler(n, _attrs(n))
        finally:
            for i, (e, v) in saved.items():   # each input as it was before
                if e is None:
                    del self.env[i], self.val[i]
                else:
                    self.env[i], self.val[i] = e, v
        for k, o in enumerate(n.output):   # results the handler returned or wrote (Split)
            if o in self.env and o not in ins:
                self._store_per_sample(o, (self.env.pop(o), self.val.pop(o)))
            elif k == 0 and out is not None:
                self._store_per_sample(o, out)

    def op_Constant(self, node, a):
        from onnx import numpy_helper
        if "value" not in a:
            raise _err(f"ONNX node '{node.name}' (Constant): only 'value' constants are supported")
        self.consts[node.output[0]] = numpy_helper.to_array(a["value"])
        return None

    def op_Identity(self, node, a):
        if node.input[0] in self.consts:  # exporters alias shared initializers this way
            self.consts[node.output[0]] = self.consts[node.input[0]]
            return None
        return self._in(node.input[0])

    op_Dropout = op_Identity

    def op_Conv(self, node, a):
        w = self._const(node.input[1], node, "weight")
        if w.ndim not in (3, 4):
            raise _err(f"ONNX node '{node.name}' (Conv): only 1-D and 2-D convolutions are "
                       "supported")
        b = self._const(node.input[2], node, "bias") if len(node.input) > 2 and node.input[2] else None
        x = self._in(node.input[0])
        pads = _auto_pads(a, tuple(x[1].shape[2:]), tuple(w.shape[2:])) or a.get("pads")
        x, pad = self._pad_if_asymmetric(node, x, pads)
        groups, ones = int(a.get("group", 1)), (1,) * (w.ndim - 2)
        kind = nn.Conv2d if w.ndim == 4 else nn.Conv1d   # 1-D: edgeprune.lift1d makes it 2-D
        conv = kind(w.shape[1] * groups, w.shape[0], tuple(w.shape[2:]),
                    tuple(a.get("strides", ones)), pad, tuple(a.get("dilations", ones)),
                    groups=groups, bias=b is not None)
        conv.weight.data.copy_(torch.as_tensor(w))
        if b is not None:
            conv.bias.data.copy_(torch.as_tensor(b))
        return self._module(node, "Conv", conv, x)

    def op_ConvTranspose(self, node, a):
        """As the convolution it equals (edgeprune.layers.ConvTransposeAsConv), any group and
        dilation; pads explicit, from auto_pad, or from output_shape. A 1-D one becomes
        nn.ConvTranspose1d, lifted to that form with the rest of the 1-D model."""
        w = self._const(node.input[1], node, "weight")
        b = self._const(node.input[2], node, "bias") if len(node.input) > 2 and node.input[2] else None
        x = self._in(node.input[0])
        where = f"ONNX node '{node.name}' (ConvTranspose)"
        strides = [int(s) for s in a.get("strides", (1, 1))]
        if (w.ndim == 4 and w.shape[1:] == (1, 1, 1) and int(a.get("group", 1)) == w.shape[0]
                and np.all(w == 1) and b is None and not any(a.get("pads", ()))
                and not any(a.get("output_padding", ())) and "output_shape" not in a
                and len(strides) == 2):
            # 1x1 kernels of ones, one per channel: zeros between pixels (edgeprune.layers
            # exports its zero insertion this way)
            n, v = self._fn(zero_insert, [x[0], *strides], [x[1], *strides])
            n.meta["is_wrapped"] = True   # stays one node when the module is traced again
            return n, v
        group = int(a.get("group", 1))
        dilations = [int(d) for d in a.get("dilations", [1] * (w.ndim - 2))]
        if w.ndim not in (3, 4):
            raise _err(f"{where}: only 1-D and 2-D transposed convolutions are supported "
                       f"(weight {list(w.shape)})")
        out_pad = [int(p) for p in a.get("output_padding", [0] * (w.ndim - 2))]
        size, kernel = tuple(x[1].shape[2:]), tuple(w.shape[2:])
        mode = _text(a.get("auto_pad", b"NOTSET"))
        if "output_shape" in a or mode in ("SAME_UPPER", "SAME_LOWER"):
            want = ([int(o) for o in a["output_shape"]][-len(size):] if "output_shape" in a
                    else [i * s for i, s in zip(size, strides)])
            total = [s * (i - 1) + o + d * (k - 1) + 1 - n
                     for i, s, o, k, d, n in zip(size, strides, out_pad, kernel, dilations, want)]
            if min(total) < 0:
                raise _err(f"{where}: output shape {want} needs negative padding {total}")
            small = [t // 2 for t in total]
            big = [t - t // 2 for t in total]
            pads = small + big if mode != "SAME_LOWER" else big + small
        else:
            pads = ([int(p) for p in a.get("pads", [0] * 2 * len(size))] if mode != "VALID"
                    else [0] * 2 * len(size))
        if w.ndim == 3:   # as torch's module, which edgeprune.lift1d lifts with the model
            (begin, end), op = pads, out_pad[0]
            if begin < end or begin - end + op >= max(strides[0], dilations[0]):
                raise _err(f"{where}: 1-D pads {pads} with output_padding {op} are not "
                           "supported (equal pads, or more at the start than output_padding "
                           "can make up)")
            layer = nn.ConvTranspose1d(w.shape[0], w.shape[1] * group, kernel[0], strides[0],
                                       begin, begin - end + op, group, b is not None,
                                       dilations[0])
            with torch.no_grad():
                layer.weight.copy_(torch.as_tensor(w))
                if b is not None:
                    layer.bias.copy_(torch.as_tensor(b))
            return self._module(node, "ConvTranspose", layer, x)
        try:
            layer = ConvTransposeAsConv(torch.as_tensor(w), None if b is None else
                                        torch.as_tensor(b), strides, pads, out_pad, group,
                                        dilations)
        except EdgepruneError as e:
            raise _err(f"{where}: {e}") from None
        return self._module(node, "ConvTranspose", layer, x)

    def op_BatchNormalization(self, node, a):
        scale, bias, mean, var = (self._const(n, node, "parameter") for n in node.input[1:5])
        x = self._in(node.input[0])
        kind = nn.BatchNorm2d if x[1].dim() == 4 else nn.BatchNorm1d  # after a Gemm: (N, C)
        bn = kind(len(scale), eps=float(a.get("epsilon", 1e-5)),
                  momentum=1.0 - float(a.get("momentum", 0.9)))
        bn.weight.data.copy_(torch.as_tensor(scale))
        bn.bias.data.copy_(torch.as_tensor(bias))
        bn.running_mean.copy_(torch.as_tensor(mean))
        bn.running_var.copy_(torch.as_tensor(var))
        return self._module(node, "BatchNormalization", bn, x)

    def op_Relu(self, node, a):
        return self._module(node, "Relu", nn.ReLU(), self._in(node.input[0]))

    def op_Sigmoid(self, node, a):
        return self._module(node, "Sigmoid", nn.Sigmoid(), self._in(node.input[0]))

    def op_Tanh(self, node, a):
        return self._module(node, "Tanh", nn.Tanh(), self._in(node.input[0]))

    def op_HardSwish(self, node, a):
        return self._module(node, "HardSwish", nn.Hardswish(), self._in(node.input[0]))

    def op_HardSigmoid(self, node, a):
        alpha, beta = float(a.get("alpha", 0.2)), float(a.get("beta", 0.5))
        if abs(alpha - 1 / 6) > 1e-6 or abs(beta - 0.5) > 1e-6:
            raise _err(f"ONNX node '{node.name}' (HardSigmoid): only alpha=1/6, beta=0.5 "
                       f"(torch's hardsigmoid) is supported, got alpha={alpha}, beta={beta}")
        return self._module(node, "HardSigmoid", nn.Hardsigmoid(), self._in(node.input[0]))

    def op_LeakyRelu(self, node, a):
        return self._module(node, "LeakyRelu", nn.LeakyReLU(float(a.get("alpha", 0.01))),
                            self._in(node.input[0]))

    def op_Elu(self, node, a):
        return self._module(node, "Elu", nn.ELU(float(a.get("alpha", 1.0))),
                            self._in(node.input[0]))

    def op_Selu(self, node, a):
        alpha, gamma = float(a.get("alpha", 1.67326319217681884765625)), \
            float(a.get("gamma", 1.05070102214813232421875))
        if abs(alpha - 1.6732632) > 1e-5 or abs(gamma - 1.0507010) > 1e-5:
            raise _err(f"ONNX node '{node.name}' (Selu): only the standard alpha and gamma "
                       f"are supported (got {alpha}, {gamma})")
        return self._module(node, "Selu", nn.SELU(), self._in(node.input[0]))

    def op_Celu(self, node, a):
        return self._module(node, "Celu", nn.CELU(float(a.get("alpha", 1.0))),
                            self._in(node.input[0]))

    def op_LRN(self, node, a):
        x, size = self._in(node.input[0]), int(a["size"])
        args = (size, float(a.get("alpha", 1e-4)), float(a.get("beta", 0.75)),
                float(a.get("bias", 1.0)), (size - 1) // 2)   # ONNX's window
        n, v = self._fn(local_response_norm, [x[0], *args], [x[1], *args])
        n.meta["is_wrapped"] = True   # stays one node when the module is traced again
        return n, v

    def op_Softplus(self, node, a):
        return self._module(node, "Softplus", nn.Softplus(), self._in(node.input[0]))

    def op_Softsign(self, node, a):
        return self._module(node, "Softsign", nn.Softsign(), self._in(node.input[0]))

    def op_Mish(self, node, a):   # an ONNX op since opset 18 (torch's default exporter)
        return self._module(node, "Mish", nn.Mish(), self._in(node.input[0]))

    def op_Abs(self, node, a):
        return self._fn(torch.abs, [self._in(node.input[0])[0]], [self._in(node.input[0])[1]])

    def op_Exp(self, node, a):
        return self._fn(torch.exp, [self._in(node.input[0])[0]], [self._in(node.input[0])[1]])

    def _math(self, node, fn):
        x = self._in(node.input[0])
        return self._fn(fn, [x[0]], [x[1]])

    def op_Sqrt(self, node, a):
        return self._math(node, torch.sqrt)

    def op_Reciprocal(self, node, a):
        return self._math(node, torch.reciprocal)

    def op_Sign(self, node, a):
        return self._math(node, torch.sign)

    def op_Log(self, node, a):
        return self._math(node, torch.log)

    def op_Sin(self, node, a):
        return self._math(node, torch.sin)

    def op_Cos(self, node, a):
        return self._math(node, torch.cos)

    def op_Floor(self, node, a):
        return self._math(node, torch.floor)

    def op_Ceil(self, node, a):
        return self._math(node, torch.ceil)

    def op_Round(self, node, a):   # half to even, as torch.round
        return self._math(node, torch.round)

    def op_Atan(self, node, a):
        return self._math(node, torch.atan)

    def op_Tan(self, node, a):
        return self._math(node, torch.tan)

    def op_Sinh(self, node, a):
        return self._math(node, torch.sinh)

    def op_Cosh(self, node, a):
        return self._math(node, torch.cosh)

    def op_Pow(self, node, a):
        return self._binary_fn(node, operator.pow)

    def _binary_fn(self, node, fn):
        """fn(a, b) of the node's two inputs (tensors or constants)."""
        x, y = self._in(node.input[0]), self._in(node.input[1])
        return self._fn(fn, [x[0], y[0]], [x[1], y[1]])

    # comparisons, logic and Where: how exporters write Softplus's threshold, Hardshrink,
    # hand-written activations (the quantizer makes each such computation of one tensor a table)

    def op_Greater(self, node, a):
        return self._binary_fn(node, operator.gt)

    def op_Less(self, node, a):
        return self._binary_fn(node, operator.lt)

    def op_GreaterOrEqual(self, node, a):
        return self._binary_fn(node, operator.ge)

    def op_LessOrEqual(self, node, a):
        return self._binary_fn(node, operator.le)

    def op_Equal(self, node, a):
        return self._binary_fn(node, operator.eq)

    def op_And(self, node, a):
        return self._binary_fn(node, torch.logical_and)

    def op_Or(self, node, a):
        return self._binary_fn(node, torch.logical_or)

    def op_Not(self, node, a):
        return self._math(node, torch.logical_not)

    def op_ThresholdedRelu(self, node, a):
        alpha = float(a.get("alpha", 1.0))
        return self._compose(lambda x: torch.where(x > alpha, x, 0.0), self._in(node.input[0]))

    def op_Shrink(self, node, a):
        lambd, bias = float(a.get("lambd", 0.5)), float(a.get("bias", 0.0))
        return self._compose(lambda x: torch.where(x < -lambd, x + bias, torch.where(
            x > lambd, x - bias, 0.0)), self._in(node.input[0]))

    def op_Where(self, node, a):
        c, x, y = (self._in(i) for i in node.input)
        return self._fn(torch.where, [c[0], x[0], y[0]], [c[1], x[1], y[1]])

    def op_Cast(self, node, a):
        """A cast of a mask between bool and float; of a constant, done here."""
        from onnx import TensorProto, helper
        if node.input[0] in self.consts:
            self.consts[node.output[0]] = np.asarray(self.consts[node.input[0]]).astype(
                helper.tensor_dtype_to_np_dtype(a["to"]))
            return None
        x = self._in(node.input[0])
        to = {TensorProto.BOOL: torch.bool, TensorProto.FLOAT: torch.float32}.get(a.get("to"))
        if to is None:
            raise _err(f"ONNX node '{node.name}' (Cast): to type {a.get('to')}; only casts of "
                       "tensors to bool or float are supported")
        n = self.graph.call_method("to", (x[0], to))
        return n, x[1].to(to)

    def op_Neg(self, node, a):
        x = self._in(node.input[0])
        return self._fn(operator.mul, [x[0], -1.0], [x[1], -1.0])

    def op_PRelu(self, node, a):
        slope = np.asarray(self._const(node.input[1], node, "slope"), np.float32).reshape(-1)
        mod = nn.PReLU(slope.size)
        mod.weight.data.copy_(torch.as_tensor(slope))
        return self._module(node, "PRelu", mod, self._in(node.input[0]))

    def op_Softmax(self, node, a):
        return self._module(node, "Softmax", nn.Softmax(int(a.get("axis", -1))),
                            self._in(node.input[0]))

    def op_LogSoftmax(self, node, a):
        return self._module(node, "LogSoftmax", nn.LogSoftmax(int(a.get("axis", -1))),
                            self._in(node.input[0]))

    def op_Mul(self, node, a):
        # x * Sigmoid(x) is how exporters write SiLU (swish)
        for i, j in ((0, 1), (1, 0)):
            sig, x = self.env.get(node.input[i]), self.env.get(node.input[j])
            if (sig is not None and x is not None and sig.op == "call_module"
                    and isinstance(self.root.get_submodule(sig.target), nn.Sigmoid)
                    and sig.args[0] is x and self.users.get(node.input[i], 0) == 1):
                self.graph.erase_node(sig)
                delattr(self.root, sig.target)
                return self._module(node, "SiLU", nn.SiLU(), (x, self.val[node.input[j]]))
        return self._binary_fn(node, operator.mul)

    def op_Gelu(self, node, a):
        approximate = _text(a.get("approximate", b"none"))
        return self._module(node, "Gelu", nn.GELU(approximate), self._in(node.input[0]))

    def op_Erf(self, node, a):   # exporters spell GELU as x * 0.5 * (1 + erf(x / sqrt 2))
        x = self._in(node.input[0])
        return self._fn(torch.erf, [x[0]], [x[1]])

    def op_Sub(self, node, a):
        return self._binary_fn(node, operator.sub)

    def op_ReduceL2(self, node, a):    # read by the Div of F.normalize (op_Div)
        axes, x = self._axes(node, a), self._in(node.input[0])
        if axes is None:
            raise _err(f"ONNX node '{node.name}' (ReduceL2): a norm over every axis is not "
                       "supported")
        dims = tuple(sorted(int(d) % x[1].dim() for d in axes))
        return self._fn(_l2_norm, [x[0], dims], [x[1], dims],
                        {"keepdim": bool(a.get("keepdims", 1))})

    def op_Expand(self, node, a):
        """A broadcast to a constant shape (F.normalize's norm, before its Div)."""
        x = self._in(node.input[0])
        to = torch.broadcast_shapes(tuple(x[1].shape), tuple(
            int(d) for d in np.asarray(self._const(node.input[1], node, "shape")).reshape(-1)))
        # the batch axis as it comes (-1): the exporter wrote the static batch
        free = (-1, *to[1:]) if x[1].dim() == len(to) and x[1].shape[0] == to[0] else to
        n = self.graph.call_method("expand", (x[0], *free))
        return n, x[1].expand(*to)

    def _normalize(self, node):
        """x / expand(clamp(|x| along one axis, eps)): F.normalize as exporters write it."""
        x, den = self.env.get(node.input[0]), self.env.get(node.input[1])
        chain = [den]
        for want in ("expand", torch.clamp, _l2_norm):
            n = chain[-1]
            if n is None or n.target != want or len(n.users) != 1 and n is not den:
                return None
            if want == "expand":
                chain.append(n.args[0])
            elif want is torch.clamp:
                if n.kwargs.get("max") is not None or len(n.args) > 1:
                    return None
                chain.append(n.args[0])
        norm, eps = chain[-1], chain[-2].kwargs.get("min") or 0.0
        dims = norm.args[1] if len(norm.args) > 1 else None
        if norm.args[0] is not x or len(dims or ()) != 1 or \
                self.users.get(node.input[1], 0) != 1:
            return None
        for n in chain[:3]:
            self.graph.erase_node(n)
        return self._fn(F.normalize, [x], [self.val[node.input[0]]],
                        {"p": 2.0, "dim": int(dims[0]), "eps": float(eps)})

    def op_Div(self, node, a):
        normalized = self._normalize(node)
        if normalized is not None:
            return normalized
        # x / (|x| + 1) is how exporters write Softsign
        den, x = self.env.get(node.input[1]), self.env.get(node.input[0])
        if (den is not None and x is not None and den.target is operator.add
                and self.users.get(node.input[1], 0) == 1):
            parts = [p for p in den.args if isinstance(p, fx.Node)]
            one = [p for p in den.args if not isinstance(p, fx.Node)]
            if (len(parts) == 1 and one == [1.0] and parts[0].target is torch.abs
                    and parts[0].args[0] is x and len(parts[0].users) == 1):
                self.graph.erase_node(den)
                self.graph.erase_node(parts[0])
                return self._module(node, "Softsign", nn.Softsign(),
                                    (x, self.val[node.input[0]]))
        return self._binary_fn(node, operator.truediv)

    def op_ReduceMean(self, node, a):
        return self._reduce(node, a, torch.mean, "mean")

    def op_ReduceMax(self, node, a):
        return self._reduce(node, a, torch.amax, "max")

    def op_ReduceMin(self, node, a):
        return self._reduce(node, a, torch.amin, "min")

    def op_ReduceSum(self, node, a):
        return self._reduce(node, a, torch.sum, "sum")

    def op_ReduceSumSquare(self, node, a):
        x = self._in(node.input[0])
        return self._reduce(node, a, torch.sum, "sum of squares", self._compose(
            lambda v: v * v, x))

    def op_ReduceL1(self, node, a):
        return self._reduce(node, a, torch.sum, "sum", self._compose(
            torch.abs, self._in(node.input[0])))

    def _reduce(self, node, a, fn, what: str, x=None):
        """fn over the node's axes of its input (or of `x`, computed from it)."""
        axes = self._axes(node, a)
        x = x or self._in(node.input[0])
        if axes is None:
            raise _err(f"ONNX node '{node.name}' ({node.op_type}): a {what} over every axis is "
                       "not supported")
        rank = x[1].dim()
        dims = tuple(sorted(int(d) % rank for d in np.asarray(axes).reshape(-1)))
        keep = bool(a.get("keepdims", 1))
        if rank >= 3 and dims == tuple(range(1, rank - 1)):
            return self._reduce_channels_last(node, x, fn, keep)
        return self._fn(fn, [x[0], dims], [x[1], dims], {"keepdim": keep})

    def _reduce_channels_last(self, node, x, fn, keep: bool):
        """A reduction over every axis but the first and the last: a global pool of a
        channels-last tensor (Keras' GlobalAveragePooling2D/1D as tf2onnx may leave it). Done
        on the channels-first tensor, so the pruner and the int8 pools see the usual global
        pool; the transpose that made the tensor channels-last cancels when nothing else
        reads it."""
        rank = x[1].dim()
        to_last = (0, *range(2, rank), 1)
        to_first = (0, rank - 1, *range(1, rank - 1))
        src = x[0]
        if (src.op == "call_function" and src.target is torch.permute
                and tuple(src.args[1]) == to_last and self.users.get(node.input[0], 0) == 1
                and not src.users):
            first = (src.args[0], x[1].permute(*to_first))
            self.graph.erase_node(src)
        else:
            first = self._fn(torch.permute, [src, to_first], [x[1], to_first])
        dims = tuple(range(2, rank))
        out = self._fn(fn, [first[0], dims], [first[1], dims], {"keepdim": keep})
        if keep:   # back to the channels-last shape the graph expects (N, 1, ..., 1, C)
            out = self._fn(torch.permute, [out[0], to_last], [out[1], to_last])
        return out

    def op_Clip(self, node, a):
        lo, hi = a.get("min"), a.get("max")
        if len(node.input) > 1 and node.input[1]:
            lo = float(self._const(node.input[1], node, "min"))
        if len(node.input) > 2 and node.input[2]:
            hi = float(self._const(node.input[2], node, "max"))
        return self._clamp(node, self._in(node.input[0]), lo, hi)

    def _clamp(self, node, x, lo: float | None, hi: float | None):
        if lo == 0.0 and hi == 6.0:
            return self._module(node, "Clip", nn.ReLU6(), x)
        if lo == 0.0 and hi is None:
            return self._module(node, "Clip", nn.ReLU(), x)
        if lo is not None and hi is not None:
            return self._module(node, "Clip", nn.Hardtanh(lo, hi), x)
        return self._fn(torch.clamp, [x[0]], [x[1]], {"min": lo, "max": hi})

    def _bound(self, node, op: str):
        """Max or Min of a tensor and a constant number (how torch's default exporter writes
        clamp with one bound): a clamp; of two or more tensors: elementwise, pair by pair."""
        consts = [n for n in node.input if n in self.consts]
        if not consts and len(node.input) >= 2:
            fn = torch.maximum if op == "Max" else torch.minimum
            x = self._in(node.input[0])
            for other in node.input[1:]:
                y = self._in(other)
                x = self._fn(fn, [x[0], y[0]], [x[1], y[1]])
            return x
        if len(node.input) != 2 or len(consts) != 1 or np.asarray(self.consts[consts[0]]).size != 1:
            raise _err(f"ONNX node '{node.name}' ({op}): only the {op} of tensors, or of a "
                       "tensor and one constant number (a clamp), is supported")
        x = self._in(next(n for n in node.input if n not in self.consts))
        c = float(np.asarray(self.consts[consts[0]]).reshape(()))
        return self._clamp(node, x, c, None) if op == "Max" else self._clamp(node, x, None, c)

    def op_Max(self, node, a):
        return self._bound(node, "Max")

    def op_Min(self, node, a):
        return self._bound(node, "Min")

    def op_Add(self, node, a):
        # MatMul + constant vector = Linear with bias (what exporters emit for nn.Linear)
        for i, j in ((0, 1), (1, 0)):
            src, other = node.input[i], node.input[j]
            n = self.env.get(src)
            if (n is not None and n.op == "call_module" and other in self.consts
                    and self.users.get(src, 0) == 1):
                mod = self.root.get_submodule(n.target)
                c = np.asarray(self.consts[other])
                if isinstance(mod, nn.Linear) and mod.bias is None and c.size == mod.out_features:
                    mod.bias = nn.Parameter(torch.as_tensor(c.reshape(-1)).float())
                    with torch.no_grad():
                        v = mod(self.val[n.args[0].name])
                    return n, v
        return self._binary_fn(node, operator.add)

    def op_Concat(self, node, a):
        first = next((n for n in node.input if n in self.env), None)
        axis = int(a["axis"]) % self.val[first].dim() if first else int(a["axis"])
        if first and axis != 0 and any(n in self.consts for n in node.input):
            # a constant piece (a class token) exported for the static batch: over any batch
            xs = []
            for n in node.input:
                if n not in self.consts or np.asarray(self.consts[n]).ndim == 0:
                    xs.append(self._in(n))
                    continue
                # a parameter, which torch.fx traces (a buffer would be a plain tensor)
                v = torch.as_tensor(np.array(self.consts[n])).float()
                name = self._name(type("n", (), {"name": f"token_{n}"})(), "token")
                self.root.register_parameter(name, nn.Parameter(v))
                size = self.graph.call_method("size", (self.env[first], 0))
                xs.append((self.graph.call_method("expand", (self.graph.get_attr(name), size,
                                                             *(-1,) * (v.dim() - 1))), v))
            n = self.graph.call_function(torch.cat, ([x[0] for x in xs],), {"dim": axis})
            return n, torch.cat([x[1] for x in xs], dim=axis)
        xs = [self._in(n) for n in node.input]
        n = self.graph.call_function(torch.cat, ([x[0] for x in xs],), {"dim": int(a["axis"])})
        return n, torch.cat([x[1] for x in xs], dim=int(a["axis"]))

    def _slice(self, node, x, axis: int, start, stop, step: int = 1):
        """x[:, ..., start:stop:step] along one axis: the form edgeprune.slicing reads."""
        nd = x[1].dim()
        axis = int(axis) % nd
        if axis == 0:
            raise _err(f"ONNX node '{node.name}' ({node.op_type}): slicing the batch axis is "
                       "not supported")
        if step < 1:
            raise _err(f"ONNX node '{node.name}' ({node.op_type}): step {step}; only forward "
                       "steps are supported")
        big = 2 ** 62    # ONNX writes 'to the end' as INT64_MAX
        index = (slice(None),) * axis + (slice(max(min(int(start), big), -big),
                                               max(min(int(stop), big), -big), int(step)),)
        if len(range(*index[-1].indices(x[1].shape[axis]))) == 0:
            raise _err(f"ONNX node '{node.name}' ({node.op_type}): the slice "
                       f"[{start}:{stop}:{step}] of axis {axis} (size {x[1].shape[axis]}) is "
                       "empty")
        return self._fn(operator.getitem, [x[0], index], [x[1], index])

    def op_Slice(self, node, a):
        x = self._in(node.input[0])
        if "starts" in a:   # before opset 10 the bounds were attributes
            starts, ends = a["starts"], a["ends"]
            axes, steps = a.get("axes", range(len(starts))), [1] * len(starts)
        else:
            const = [self._const(n, node, what) if n else None for n, what in
                     zip(list(node.input[1:]) + [""] * 4, ("starts", "ends", "axes", "steps"))]
            starts, ends = const[0], const[1]
            axes = const[2] if const[2] is not None else range(len(starts))
            steps = const[3] if const[3] is not None else [1] * len(starts)
        for axis, start, stop, step in zip(axes, starts, ends, steps):  # one axis at a time
            x = self._slice(node, x, axis, start, stop, int(step))
        return x

    def op_Gather(self, node, a):
        """One position (a scalar index: the axis goes, as x[:, -1]) or a list of positions
        of an activation along an axis after the batch: its runs of consecutive positions
        (x[:, 2:5]) each a slice, concatenated."""
        form, h = self.seq.get(node.input[0], (None, None))
        if form == "DNH" and int(a.get("axis", 0)) == 0:    # Y_h[k]: one direction's state
            k = int(np.asarray(self._const(node.input[1], node, "indices")).reshape(()))
            return self._fn(operator.getitem, [h[0], k], [h[1], k])
        if form == "TNF" and int(a.get("axis", 0)) == 0:    # y[t] of a time-first layer's y
            idx = np.asarray(self._const(node.input[1], node, "indices")).astype(np.int64)
            if idx.ndim == 0:                               # held batch first: y[:, t]
                index = (slice(None), int(idx) % h[1].shape[1])
                return self._fn(operator.getitem, [h[0], index], [h[1], index])
        if node.input[0] in self.consts:
            raise _err(f"ONNX node '{node.name}' (Gather): gathering from a constant table "
                       "(an embedding) is not supported")
        x = self._in(node.input[0])
        idx = np.asarray(self._const(node.input[1], node, "indices")).astype(np.int64)
        axis = int(a.get("axis", 0)) % x[1].dim()
        size = x[1].shape[axis]
        flat = idx.reshape(-1) % size
        if idx.ndim > 1 or axis == 0 or flat.size == 0:
            raise _err(f"ONNX node '{node.name}' (Gather): indices {idx.tolist()} along axis "
                       f"{axis}; only one position or a list of positions after the batch "
                       "axis is supported")
        if idx.ndim == 0:
            index = (slice(None),) * axis + (int(flat[0]),)
            return self._fn(operator.getitem, [x[0], index], [x[1], index])
        pieces = [self._slice(node, x, axis, a, b) for a, b in runs(flat.tolist())]
        if len(pieces) == 1:
            return pieces[0]
        return self._fn(torch.cat, [[n for n, _ in pieces], axis], [[v for _, v in pieces], axis])

    def op_Split(self, node, a):
        """Pieces along an axis (ShuffleNet's channel split): one slice per output."""
        x = self._in(node.input[0])
        axis = int(a.get("axis", 0)) % x[1].dim()
        size, n = x[1].shape[axis], len(node.output)
        if len(node.input) > 1 and node.input[1]:
            sizes = [int(v) for v in self._const(node.input[1], node, "split")]
        elif "split" in a:
            sizes = [int(v) for v in a["split"]]
        else:   # equal pieces; with num_outputs (opset 18) the last may be smaller
            each = -(-size // n)
            sizes = [min(each, size - i * each) for i in range(n)]
        if len(sizes) != n or sum(sizes) != size:
            raise _err(f"ONNX node '{node.name}' (Split): pieces {sizes} do not split axis "
                       f"{axis} of size {size} into {n} outputs")
        start = 0
        for name, k in zip(node.output, sizes):
            self.env[name], self.val[name] = self._slice(node, x, axis, start, start + k)
            start += k
        return self.env[node.output[0]], self.val[node.output[0]]

    def _pool_args(self, node, a):
        """(kernel, strides, ceil_mode); auto_pad (TensorFlow's SAME) is made explicit pads."""
        k = tuple(a["kernel_shape"])
        if len(k) not in (1, 2):
            lrn = len(k) == 3 and k[1:] == (1, 1) and node.op_type == "AveragePool"
            raise _err(f"ONNX node '{node.name}' ({node.op_type}): only 1-D and 2-D pooling is "
                       "supported" + ("; torch's exporters write nn.LocalResponseNorm as this "
                                      "pool over the channels: give edgeprune the torch model "
                                      "itself, or an ONNX LRN node" if lrn else ""))
        size = tuple(self._in(node.input[0])[1].shape[2:])
        pads = _auto_pads(a, size, k)
        if pads is not None:
            a["pads"] = pads
        return k, tuple(a.get("strides", (1,) * len(k))), bool(a.get("ceil_mode", 0))

    def op_MaxPool(self, node, a):
        if len(node.output) > 1 and node.output[1]:
            raise _err(f"ONNX node '{node.name}' (MaxPool): the indices output is not supported")
        k, s, ceil = self._pool_args(node, a)
        x, pad = self._pad_if_asymmetric(node, self._in(node.input[0]), a.get("pads"),
                                         value=float("-inf"))
        kind = nn.MaxPool2d if len(k) == 2 else nn.MaxPool1d
        pool = kind(k, s, pad, tuple(a.get("dilations", (1,) * len(k))), ceil_mode=ceil)
        return self._module(node, "MaxPool", pool, x)

    def op_AveragePool(self, node, a):
        k, s, ceil = self._pool_args(node, a)
        include = bool(a.get("count_include_pad", 0))
        pads = a.get("pads")
        x = self._in(node.input[0])
        half = len(k)
        kind = nn.AvgPool2d if half == 2 else nn.AvgPool1d
        if pads and pads[:half] != pads[half:] and not include:
            # Uncounted padding only decides where the windows start: torch's symmetric begin
            # pads start them alike, and its ceil_mode reaches the last one (TensorFlow's SAME).
            size = x[1].shape[2:]
            rnd = np.ceil if ceil else np.floor
            want = tuple(int(rnd((n + b + e - kk) / st)) + 1
                         for n, b, e, kk, st in zip(size, pads[:half], pads[half:], k, s))
            begin = tuple(pads[:half])
            if all(2 * b <= kk for b, kk in zip(begin, k)):
                pool = kind(k, s, begin, ceil_mode=True, count_include_pad=False)
                with torch.no_grad():
                    if tuple(pool(x[1]).shape[2:]) == want:
                        return self._module(node, "AveragePool", pool, x)
            raise _err(f"ONNX node '{node.name}' (AveragePool): asymmetric pads {pads} without "
                       "count_include_pad are not supported here")
        if pads and pads[:half] != pads[half:]:
            x, pad = self._pad_if_asymmetric(node, x, pads)
        else:
            pad = tuple(pads[:half]) if pads else (0,) * half
        pool = kind(k, s, pad, ceil_mode=ceil, count_include_pad=include)
        return self._module(node, "AveragePool", pool, x)

    def op_GlobalAveragePool(self, node, a):
        x = self._in(node.input[0])
        pool = nn.AdaptiveAvgPool2d(1) if x[1].dim() == 4 else nn.AdaptiveAvgPool1d(1)
        return self._module(node, "GlobalAveragePool", pool, x)

    def op_GlobalMaxPool(self, node, a):
        x = self._in(node.input[0])
        pool = nn.AdaptiveMaxPool2d(1) if x[1].dim() == 4 else nn.AdaptiveMaxPool1d(1)
        return self._module(node, "GlobalMaxPool", pool, x)

    def op_Flatten(self, node, a):
        axis = int(a.get("axis", 1))
        x = self._in(node.input[0])
        shape = tuple(x[1].shape)
        axis = axis % len(shape) if len(shape) else 0
        if axis == 1:
            return self._fn(torch.flatten, [x[0], 1], [x[1], 1])
        target = (int(np.prod(shape[:axis], dtype=np.int64)), -1)
        return self._fn(torch.reshape, [x[0], target], [x[1], target])

    def op_Reshape(self, node, a):
        shape = [int(d) for d in self._const(node.input[1], node, "shape").reshape(-1)]
        form, x = self.seq.get(node.input[0], (None, None))
        if form == "TNDH" and len(shape) == 3:      # (T, N, D * H): the directions side by side
            self.seq[node.output[0]] = ("TNF", x)
            return None
        x = self._in(node.input[0])
        in_shape = tuple(x[1].shape)
        if not a.get("allowzero", 0):
            shape = [in_shape[i] if d == 0 else d for i, d in enumerate(shape)]
        shape = list(torch.empty(in_shape).reshape(shape).shape)  # resolve -1 statically
        if len(shape) == 2:   # rows of (N * T, K) around a Gemm: kept (N, T, K) if they return
            lead = next((in_shape[:k] for k in range(2, len(in_shape))
                         if int(np.prod(in_shape[:k])) == shape[0]), None)
            if lead is not None and self._rows_return(node.output[0], lead):
                shape = [*lead, shape[1]]
        if tuple(shape) == in_shape:
            return x
        if in_shape and in_shape[0] == 1 and shape[0] != 1:   # the batch merged or moved
            self._enter_per_sample(node, x, tuple(shape))
            return None
        return self._reshape_to(x, tuple(shape))

    # ops that treat each row of a (rows, K) matrix alone, the same on (N, T, K)
    _ROW_OPS = {"Gemm", "MatMul", "Relu", "Clip", "Sigmoid", "Tanh", "HardSwish", "HardSigmoid",
                "LeakyRelu", "Elu", "Selu", "Celu", "Softplus", "Softsign", "Mish", "Abs", "Exp",
                "Neg", "Identity", "Dropout", "Erf", "Gelu", "PRelu", "Add", "Sub", "Mul", "Div",
                "Sqrt", "Reciprocal", "Sign", "Log", "Sin", "Cos", "Pow", "Max", "Min"}

    def _rows_return(self, name: str, lead: tuple) -> bool:
        """Whether every path from the rows `name` (onnxsim's Reshape of (N, T, K) to
        (N * T, K) before a Gemm) runs through row-wise ops to a Reshape back to
        (N, T, ...): then the rows can stay (N, T, K)."""
        todo, seen = [name], set()
        while todo:
            t = todo.pop()
            if t in seen:
                continue
            seen.add(t)
            if t in (o.name for o in self.g.output):
                return False
            for n in self.consumers.get(t, []):
                if n.op_type == "Reshape" and n.input[0] == t and n.input[1] in self.consts:
                    back = [int(d) for d in np.asarray(self.consts[n.input[1]]).reshape(-1)]
                    if tuple(back[:len(lead)]) != tuple(lead):
                        return False
                    continue
                attrs = _attrs(n)
                last_axis = n.op_type in ("LayerNormalization", "Softmax", "LogSoftmax") and \
                    int(attrs.get("axis", -1)) in (-1, 1)
                if (n.op_type not in self._ROW_OPS and not last_axis) or \
                        (n.op_type == "Gemm" and n.input[0] != t):
                    return False
                others = [i for i in n.input if i != t and i]
                if n.op_type not in ("Gemm", "MatMul", "PRelu", "Clip",
                                     "LayerNormalization") and any(
                        i in self.consts and np.asarray(self.consts[i]).ndim > 1 for i in others):
                    return False     # a constant with a row axis
                todo.extend(n.output)
        return True

    def _axes(self, node, a):
        axes = a.get("axes")
        if axes is None and len(node.input) > 1 and node.input[1]:   # opset 13: an input
            axes = self._const(node.input[1], node, "axes")
        return None if axes is None else [int(d) for d in np.asarray(axes).reshape(-1)]

    def op_Unsqueeze(self, node, a):
        x = self._in(node.input[0])
        axes = self._axes(node, a) or []
        v = x[1]
        for d in sorted(d % (x[1].dim() + len(axes)) for d in axes):
            v = v.unsqueeze(d)
        return self._reshape_to(x, tuple(v.shape))

    def op_Squeeze(self, node, a):
        form, x = self.seq.get(node.input[0], (None, None))
        axes = self._axes(node, a)
        if form == "TDNH" and axes == [1]:     # Y of one direction: (T, N, H)
            self.seq[node.output[0]] = ("TNF", x)
            return None
        if form == "DNH" and axes == [0]:      # Y_h of one direction and layer: (N, H)
            return self._fn(operator.getitem, [x[0], 0], [x[1], 0])
        x = self._in(node.input[0])
        dims = [d % x[1].dim() for d in axes] if axes else \
            [d for d, n in enumerate(x[1].shape) if n == 1 and d > 0]
        return self._reshape_to(x, tuple(n for d, n in enumerate(x[1].shape) if d not in dims))

    def op_Resize(self, node, a):
        """Resizing of the spatial axes (H, W, or L of a 1-D signal) to a constant size:
        nearest where the ONNX coordinate rule picks the pixels nn.Upsample(mode="nearest")
        picks (input pixel o // s for output pixel o at whole factors, also fractional factors
        and sizes) or every k-th pixel, or linear with torch's coordinate rules (half_pixel,
        pytorch_half_pixel, align_corners); anything else (cubic, other pickings) is refused
        by name."""
        x = self._in(node.input[0])
        mode = _text(a.get("mode", b"nearest"))
        ctm = _text(a.get("coordinate_transformation_mode", b"half_pixel"))
        rounding = _text(a.get("nearest_mode", b"round_prefer_floor"))
        shape = tuple(x[1].shape)
        given = [n for n in node.input[2:4] if n and np.asarray(self.consts.get(n, [])).size]
        if len(shape) not in (3, 4) or len(given) != 1:
            raise _err(f"ONNX node '{node.name}' (Resize): only (N, C, H, W) or (N, C, L) "
                       "tensors resized by constant scales or sizes are supported")
        v = np.asarray(self._const(given[0], node, "scales or sizes"), np.float64).reshape(-1)
        scales = given[0] == node.input[2]
        # ONNX's output size is floor(size * scale) (float32 scales: 1/3 of 12 is 4)
        out = [int(math.floor(d * f + 1e-6)) for d, f in zip(shape, v)] if scales \
            else [int(s) for s in v]
        factors = [o // i for i, o in zip(shape[2:], out[2:])]
        if mode == "nearest":
            picks = [_nearest_picks(n, o, ctm, rounding, f if scales else None)
                     for n, o, f in zip(shape[2:], out[2:], v[2:])]
            ok = all(p is not None and np.array_equal(p, np.arange(o) // max(f, 1))
                     for p, o, f in zip(picks, out[2:], factors))
            if not ok and out[:2] == list(shape[:2]) and all(
                    p is not None and _strided(p) for p in picks):   # every step-th pixel
                for axis, p in enumerate(picks, 2):
                    step = int(p[1] - p[0]) if len(p) > 1 else 1
                    x = self._slice(node, x, axis, int(p[0]), int(p[-1]) + 1, step)
                return x
            how = {"scale_factor": tuple(float(f) for f in factors), "mode": "nearest"}
            if not ok and all(p is not None for p in picks):   # as torch picks, fractional
                how = _torch_nearest(shape[2:], out[2:], picks, v[2:] if scales else None)
                ok = how is not None
        else:
            # torch samples at (o + 0.5) * n / N - 0.5: ONNX's half_pixel where the scale is
            # N / n (pytorch_half_pixel differs only for outputs of size 1)
            half_pixel = (ctm in ("half_pixel", "pytorch_half_pixel")
                          and (not scales or all(abs(n * f - o) < 1e-9
                                                 for n, f, o in zip(shape, v, out)))
                          and (ctm == "half_pixel" or min(out[2:]) > 1))
            ok = (mode == "linear" and int(a.get("antialias", 0)) == 0
                  and (ctm == "align_corners" or half_pixel))
            how = {"size": tuple(out[2:]), "mode": "bilinear" if len(shape) == 4 else "linear",
                   "align_corners": ctm == "align_corners"}
        if not ok or out[:2] != list(shape[:2]):
            raise _err(f"ONNX node '{node.name}' (Resize): {mode} resize of {list(shape)} to "
                       f"{out} ({ctm}, {rounding}) is not supported; only nearest resizing "
                       "of the spatial axes that picks the pixels torch's nearest resizing "
                       "picks (asymmetric, floor: what torch exports) or every k-th, or linear "
                       "resizing with the half_pixel or align_corners coordinates")
        return self._module(node, "Resize", nn.Upsample(**how), x)

    def op_LayerNormalization(self, node, a):
        x = self._in(node.input[0])
        nd = x[1].dim()
        axis = int(a.get("axis", -1)) % nd
        if axis == 0:
            raise _err(f"ONNX node '{node.name}' (LayerNormalization): over every axis of a "
                       f"{nd}-D tensor, the batch too; only axes after the batch are supported")
        dims = tuple(x[1].shape[axis:])     # over axes axis.. (ONNX broadcasts scale, bias)
        ln = nn.LayerNorm(dims, eps=float(a.get("epsilon", 1e-5)))

        def param(name: str, i: int) -> torch.Tensor:
            v = np.asarray(self._const(node.input[i], node, name), np.float32)
            return torch.as_tensor(np.broadcast_to(v, dims).copy())
        ln.weight.data.copy_(param("scale", 1))
        if len(node.input) > 2 and node.input[2]:
            ln.bias.data.copy_(param("bias", 2))
        else:
            ln.bias.data.zero_()
        return self._module(node, "LayerNorm", ln, x)

    def op_InstanceNormalization(self, node, a):
        """Per (sample, channel) statistics over the positions; exporters also write
        GroupNorm this way, between reshapes to (N, groups, -1)."""
        x = self._in(node.input[0])
        if x[1].dim() not in (3, 4):
            raise _err(f"ONNX node '{node.name}' (InstanceNormalization): a {x[1].dim()}-D "
                       "input; only (N, C, L) and (N, C, H, W) are supported")
        c = x[1].shape[1]
        kind = nn.InstanceNorm1d if x[1].dim() == 3 else nn.InstanceNorm2d
        norm = kind(c, eps=float(a.get("epsilon", 1e-5)), affine=True)
        for param, name, what in ((norm.weight, node.input[1], "scale"),
                                  (norm.bias, node.input[2], "B")):
            param.data.copy_(torch.as_tensor(np.asarray(
                self._const(name, node, what), np.float32).reshape(c)))
        return self._module(node, "InstanceNorm", norm, x)

    def op_Upsample(self, node, a):
        """The Resize of opsets 7 to 9 (older exporters, tf2onnx): scales as an attribute or
        an input; its coordinates are asymmetric, so nearest by whole factors repeats values."""
        x = self._in(node.input[0])
        scales = a.get("scales")
        if scales is None:
            scales = self._const(node.input[1], node, "scales")
        v = [float(f) for f in np.asarray(scales).reshape(-1)]
        mode = _text(a.get("mode", b"nearest"))
        if mode != "nearest" or v[:2] != [1.0, 1.0] or len(v) not in (3, 4) \
                or any(f < 1 or f != int(f) for f in v[2:]):
            raise _err(f"ONNX node '{node.name}' (Upsample): {mode} by scales {v} is not "
                       "supported; only nearest upsampling of the spatial axes by whole factors")
        return self._module(node, "Upsample", nn.Upsample(scale_factor=tuple(v[2:]),
                                                         mode="nearest"), x)

    def op_Sum(self, node, a):
        """n-ary Add."""
        xs = [self._in(n) for n in node.input]
        out = xs[0]
        for y in xs[1:]:
            out = self._fn(operator.add, [out[0], y[0]], [out[1], y[1]])
        return out

    def op_Mean(self, node, a):
        """n-ary mean: the Sum's adds, then a product by 1 / n."""
        n = 1.0 / len(node.input)
        return self._compose(lambda s: s * n, self.op_Sum(node, a))

    def op_LpNormalization(self, node, a):
        p, axis = int(a.get("p", 2)), int(a.get("axis", -1))
        if p != 2:
            raise _err(f"ONNX node '{node.name}' (LpNormalization): p={p}; only p=2 (x over "
                       "its Euclidean norm) is supported")
        x = self._in(node.input[0])
        return self._fn(F.normalize, [x[0]], [x[1]], {"p": 2.0, "dim": axis})

    def op_GlobalLpPool(self, node, a):
        """The p-norm of each channel's plane (p = 1 or 2)."""
        p, x = int(a.get("p", 2)), self._in(node.input[0])
        dims = tuple(range(2, x[1].dim()))
        if p == 2:   # a square, a sum and a root: ops the stages know
            return self._compose(lambda v: (v * v).sum(dims, keepdim=True).sqrt(), x)
        if p == 1:
            return self._compose(lambda v: v.abs().sum(dims, keepdim=True), x)
        raise _err(f"ONNX node '{node.name}' (GlobalLpPool): p={p}; only p=1 and p=2 are "
                   "supported")

    def op_Transpose(self, node, a):
        perm = [int(d) for d in a.get("perm", [])]
        form, x = self.seq.get(node.input[0], (None, None))
        if form == "TNF" and len(perm) == 3 and perm[0] == 1:   # batch first again:
            to_torch = {0: 1, 1: 0, 2: 2}           # (T, N, F)'s axes in x, (N, T, F)
            order = [to_torch[p] for p in perm]
            return x if order == [0, 1, 2] else self._fn(torch.permute, [x[0], order],
                                                         [x[1], order])
        if form == "TDNH" and perm == [0, 2, 1, 3]:
            self.seq[node.output[0]] = ("TNDH", x)
            return None
        if form is None and len(perm) == 3 and perm[1] == 0 and all(
                c.op_type in ("GRU", "LSTM", "RNN") for c in self.consumers[node.output[0]]):
            # into a recurrent layer: time first; the same permute keeping the batch first
            # holds it ((N, C, L) -> (L, N, C) after a conv is (N, L, C))
            x, first = self._in(node.input[0]), (0, perm[0], perm[2])
            if first != (0, 1, 2):
                x = self._fn(torch.permute, [x[0], first], [x[1], first])
            self.seq[node.output[0]] = ("TNF", x)
            return None
        x = self._in(node.input[0])
        perm = perm or list(range(x[1].dim() - 1, -1, -1))
        if perm[0] != 0 and x[1].shape[0] == 1:   # torch's attention: time first
            self._enter_per_sample(node, x, tuple(x[1].shape[p] for p in perm))
            return None
        if perm[0] != 0:
            raise _err(f"ONNX node '{node.name}' (Transpose): perm {perm} moves the batch axis "
                       f"of a batch of {x[1].shape[0]}; only transposes that keep it first are "
                       "supported (at a batch of 1, any)")
        return self._fn(torch.permute, [x[0], tuple(perm)], [x[1], tuple(perm)])

    def op_DepthToSpace(self, node, a):
        """CRD is torch's pixel_shuffle; DCR (the default) takes the depth blocks first."""
        r, x = int(a["blocksize"]), self._in(node.input[0])
        if _text(a.get("mode", b"DCR")) == "CRD":
            return self._fn(F.pixel_shuffle, [x[0], r], [x[1], r])
        n, c, h, w = x[1].shape
        x = self._reshape_to(x, (n, r, r, c // (r * r), h, w))
        x = self._fn(torch.permute, [x[0], (0, 3, 4, 1, 5, 2)], [x[1], (0, 3, 4, 1, 5, 2)])
        return self._reshape_to(x, (n, c // (r * r), h * r, w * r))

    def op_SpaceToDepth(self, node, a):
        """Each r x r block into channels, block offset first (torch's pixel_unshuffle puts
        the channel first)."""
        r, x = int(a["blocksize"]), self._in(node.input[0])
        n, c, h, w = x[1].shape
        x = self._reshape_to(x, (n, c, h // r, r, w // r, r))
        x = self._fn(torch.permute, [x[0], (0, 3, 5, 1, 2, 4)], [x[1], (0, 3, 5, 1, 2, 4)])
        return self._reshape_to(x, (n, c * r * r, h // r, w // r))

    def _recurrent(self, node, a, kind: str):
        """GRU, LSTM, RNN on a time-first input that a Transpose made of a batch-first one
        (how torch exports batch_first layers): a torch layer with batch_first=True and the
        ONNX gate order rearranged; its Y and Y_h stay time-first forms (self.seq)."""
        where = f"ONNX node '{node.name}' ({node.op_type})"
        form, x = self.seq.get(node.input[0], (None, None))
        if form != "TNF":
            raise _err(f"{where}: only a layer whose input is a batch-first tensor transposed "
                       "to time first (torch's export of batch_first=True) is supported")
        direction = _text(a.get("direction", b"forward"))
        if direction not in ("forward", "bidirectional"):
            raise _err(f"{where}: direction '{direction}' is not supported")
        acts = [_text(s).lower() for s in a.get("activations", [])]
        default = {"GRU": ["sigmoid", "tanh"], "LSTM": ["sigmoid", "tanh", "tanh"],
                   "RNN": [acts[0] if acts and acts[0] == "relu" else "tanh"]}[kind]
        custom = acts and acts != default * (2 if direction == "bidirectional" else 1)
        if any(n for n in node.input[4:]) or a.get("clip") is not None or custom or \
                int(a.get("layout", 0)) or int(a.get("input_forget", 0)):
            raise _err(f"{where}: sequence lengths, initial states, peepholes, clip, layout 1, "
                       "input_forget and activations other than torch's are not supported")
        if kind == "GRU" and int(a.get("linear_before_reset", 0)) != 1:
            raise _err(f"{where}: linear_before_reset=0 is not torch's GRU; export from torch")
        w, r = (np.asarray(self._const(node.input[i], node, n), np.float32)
                for i, n in ((1, "W"), (2, "R")))
        d, h = w.shape[0], int(a["hidden_size"])
        b = (np.asarray(self._const(node.input[3], node, "B"), np.float32)
             if len(node.input) > 3 and node.input[3] else np.zeros((d, 2 * w.shape[1])))
        order = {"GRU": [1, 0, 2], "LSTM": [0, 2, 3, 1], "RNN": [0]}[kind]   # torch's gates

        def gates(m):
            return np.concatenate([m[g * h:(g + 1) * h] for g in order])
        kw = {"nonlinearity": default[0]} if kind == "RNN" else {}
        layer = {"GRU": nn.GRU, "LSTM": nn.LSTM, "RNN": nn.RNN}[kind](
            w.shape[2], h, batch_first=True, bidirectional=d == 2, **kw)
        for k in range(d):
            sfx = "_l0" + ("_reverse" if k else "")
            for name, v in (("weight_ih", gates(w[k])), ("weight_hh", gates(r[k])),
                            ("bias_ih", gates(b[k][:len(b[k]) // 2])),
                            ("bias_hh", gates(b[k][len(b[k]) // 2:]))):
                getattr(layer, name + sfx).data.copy_(torch.from_numpy(np.ascontiguousarray(v)))
        n, v = self._module(node, kind, layer, x)
        out = self._fn(operator.getitem, [n, 0], [v, 0])
        state = self._fn(operator.getitem, [n, 1], [v, 1])
        self.seq[node.output[0]] = ("TDNH", out)
        outs = [state] if kind != "LSTM" else [
            self._fn(operator.getitem, [state[0], i], [state[1], i]) for i in (0, 1)]
        for name, s in zip(node.output[1:], outs):
            if name:
                self.seq[name] = ("DNH", s)
        return None

    def op_GRU(self, node, a):
        return self._recurrent(node, a, "GRU")

    def op_LSTM(self, node, a):
        return self._recurrent(node, a, "LSTM")

    def op_RNN(self, node, a):
        return self._recurrent(node, a, "RNN")

    def _reshape_to(self, x, shape: tuple):
        """torch.reshape to a static shape; one that keeps the batch axis keeps it free
        (training runs other batch sizes than the model's)."""
        in_shape = tuple(x[1].shape)
        target = (-1, *shape[1:]) if shape and in_shape and shape[0] == in_shape[0] else shape
        return self._fn(torch.reshape, [x[0], tuple(target)], [x[1], tuple(shape)])

    def op_Pad(self, node, a):
        mode = _text(a.get("mode", b"constant"))
        pads = a.get("pads")
        if pads is None:
            pads = self._const(node.input[1], node, "pads")
        pads = [int(p) for p in np.asarray(pads).reshape(-1)]
        value = 0.0
        if len(node.input) > 2 and node.input[2]:
            value = float(np.asarray(self._const(node.input[2], node, "value")).reshape(()))
        x = self._in(node.input[0])
        rank = x[1].dim()
        modes = {"constant": "constant", "reflect": "reflect", "edge": "replicate",
                 "wrap": "circular"}
        channels = pads[1] or pads[rank + 1] if len(pads) == 2 * rank else 0
        if (mode not in modes or len(pads) != 2 * rank or rank not in (3, 4)
                or pads[0] or pads[rank] or (channels and mode != "constant")):
            raise _err(f"ONNX node '{node.name}' (Pad): only padding of the axes after the "
                       f"batch of an (N, C, L) or NCHW tensor, in modes {', '.join(modes)} "
                       f"(the channels: constant only), is supported (mode {mode}, pads {pads})")
        widths = []           # F.pad's order: the last axis first, (before, after) each
        for d in reversed(range(2 if not channels else 1, rank)):
            widths += [pads[d], pads[rank + d]]
        kw = {"value": value} if mode == "constant" else {"mode": modes[mode]}
        return self._fn(F.pad, [x[0], tuple(widths)], [x[1], tuple(widths)], kw)

    def op_Gemm(self, node, a):
        if a.get("transA", 0):
            raise _err(f"ONNX node '{node.name}' (Gemm): transA is not supported")
        b = np.asarray(self._const(node.input[1], node, "B"), dtype=np.float32)
        w = (b if a.get("transB", 0) else b.T) * float(a.get("alpha", 1.0))
        c = None
        if len(node.input) > 2 and node.input[2]:
            c = np.asarray(self._const(node.input[2], node, "C"), dtype=np.float32)
            c = np.broadcast_to(c.reshape(-1) if c.size == w.shape[0] else c,
                                (w.shape[0],)) * float(a.get("beta", 1.0))
        lin = nn.Linear(w.shape[1], w.shape[0], bias=c is not None)
        lin.weight.data.copy_(torch.as_tensor(np.ascontiguousarray(w)))
        if c is not None:
            lin.bias.data.copy_(torch.as_tensor(np.ascontiguousarray(c)))
        return self._module(node, "Gemm", lin, self._in(node.input[0]))

    def op_Einsum(self, node, a):
        """torch.einsum, which loading writes as permutes and one product (a constant operand
        of more than one value is a weight: a parameter, trained like a MatMul's)."""
        equation, ops = _text(a["equation"]), []
        for name in node.input:
            if name in self.consts and np.asarray(self.consts[name]).size > 1:
                t = torch.as_tensor(np.array(self.consts[name], np.float32))
                pname = self._name(type("n", (), {"name": f"weight_{name}"})(), "weight")
                self.root.register_parameter(pname, nn.Parameter(t))
                ops.append((self.graph.get_attr(pname), t))
            else:
                ops.append(self._in(name))
        return self._fn(torch.einsum, [equation, *(o[0] for o in ops)],
                        [equation, *(o[1] for o in ops)])

    def op_Tile(self, node, a):
        """torch.tile by constant repeats (loading writes it as concatenations)."""
        reps = tuple(int(r) for r in np.asarray(self._const(node.input[1], node, "repeats")))
        x = self._in(node.input[0])
        return self._fn(torch.tile, [x[0], reps], [x[1], reps])

    def op_MatMul(self, node, a):
        if node.input[1] not in self.consts:     # two activations (attention)
            return self._binary_fn(node, torch.matmul)
        b = np.asarray(self._const(node.input[1], node, "right operand"), dtype=np.float32)
        if b.ndim != 2:
            raise _err(f"ONNX node '{node.name}' (MatMul): only a 2-D constant right operand "
                       "is supported")
        lin = nn.Linear(b.shape[0], b.shape[1], bias=False)
        lin.weight.data.copy_(torch.as_tensor(np.ascontiguousarray(b.T)))
        return self._module(node, "MatMul", lin, self._in(node.input[0]))


def onnx_to_torch(path: str | Path, input_shape: tuple[int, ...] | None = None,
                  data_shape: tuple[int, ...] | None = None, several_outputs: bool = False
                  ) -> tuple[nn.Module, tuple[int, ...]]:
    """(GraphModule in eval mode, static input shape) for the ONNX file at `path`. The shape:
    `input_shape`, else the file's (a free batch size taken as 1), else `data_shape` (one
    sample of the data it will run on) where the file leaves other axes free."""
    import onnx
    path = Path(path)
    try:
        model = onnx.load(str(path))
    except Exception as e:
        raise _err(f"{path}: not a readable ONNX file ({type(e).__name__}: {e})") from None
    from .frontend import check_one_output, graph_inputs, simplify, static_input_shapes
    if not several_outputs:    # a tuple of them otherwise
        check_one_output(model, str(path))
    inputs = graph_inputs(model)
    if input_shape is None and len(inputs) == 1:      # a free batch size: take 1
        dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
                for d in inputs[0].type.tensor_type.shape.dim]
        if dims and dims[0] is None and None not in dims[1:]:
            input_shape = (1, *dims[1:])
        elif None in dims[1:] and data_shape is not None:
            input_shape = tuple(data_shape)
    if len(inputs) == 1:
        model = simplify(model, static_input_shapes(model, input_shape, str(path)), str(path),
                         keep_bn=True)
    builder = _Builder(model, input_shape)
    gm = builder.build()
    return gm, builder.shape
