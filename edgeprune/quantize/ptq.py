"""Post-training quantization: torch module -> folded float graph -> calibration -> QuantModel.

Pipeline:
1. `extract`: fx-trace the model, fold BatchNorm into the preceding conv/linear
   (`torch.fx.experimental.optimization.fuse`), and rewrite it as an `IRNet`: a flat list of
   `FNode`s (conv2d / dense / add / maxpool / avgpool / reshape / transpose ...) with ReLU /
   ReLU6 / clamp fused into the producing conv/dense/add.  The IRNet is a trainable nn.Module
   (QAT and ADMM train it) whose forward can fake-quantize exactly where the integer model
   rounds.
2. `calibrate`: run real data through the float IRNet, record each tensor's range (min/max or a
   percentile, since a few outliers can waste most of an 8-bit range).
3. `to_qmodel`: per-channel symmetric weights, asymmetric int8 (or symmetric int16) activations,
   int32 bias = round(b / (s_in * s_w)), requantization multipliers, activation as clamp range.
"""

from __future__ import annotations

import copy
import math
import operator
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ..errors import EdgepruneError
from ..layers import attention_bias, fold_constants, zero_insert
from ..slicing import (ShapeAndSizeProp, is_min_values, is_split, max_values_of,
                       returns_indices, slices_of)
from .qmodel import (DTYPE_RANGE, LOG_SOFTMAX_OUT, PAD_MODES, SAME_QPARAMS, Op, QuantModel,
                     TensorInfo, adaptive_windows, window_counts)
from .requant import INT32_MAX, LAYERNORM_FRAC_BITS, quantize_multiplier, quantize_multipliers, \
    shared_shift_multipliers
from .wquant import quantize_weights

INPUT = "input"


@dataclass
class FNode:
    """One float op of the folded graph.  `act` is None, ("relu",), ("relu6",) or ("clip", lo, hi)."""
    kind: str
    name: str
    inputs: list[str]
    output: str
    attrs: dict = field(default_factory=dict)
    act: tuple | None = None
    out_shape: tuple[int, ...] = ()


def _pair(v) -> list[int]:
    return [int(v), int(v)] if isinstance(v, int) else [int(t) for t in v]


# torch's one-argument math functions that are tables by their own name
_MATH = ("sqrt", "rsqrt", "reciprocal", "square", "sign", "log", "sin", "cos", "log1p",
         "expm1", "log2", "log10", "atan", "tan", "sinh", "cosh", "floor", "ceil", "round",
         "trunc")
# Elementwise functions an int8 tensor passes through as a 256-entry table (op "lut").
LUT_FUNCTIONS = {
    "sigmoid": lambda x, a: torch.sigmoid(x), "tanh": lambda x, a: torch.tanh(x),
    "hardswish": lambda x, a: F.hardswish(x), "hardsigmoid": lambda x, a: F.hardsigmoid(x),
    "silu": lambda x, a: F.silu(x), "mish": lambda x, a: F.mish(x),
    "gelu": lambda x, a: F.gelu(x, approximate=a or "none"),
    "elu": lambda x, a: F.elu(x, a), "leaky_relu": lambda x, a: F.leaky_relu(x, a),
    "relu": lambda x, a: F.relu(x), "relu6": lambda x, a: F.relu6(x),
    "clip": lambda x, a: torch.clamp(x, a[0], a[1]),
    "affine": lambda x, a: x * a[0] + a[1], "erf": lambda x, a: torch.erf(x),
    "selu": lambda x, a: F.selu(x), "celu": lambda x, a: F.celu(x, a),
    "softplus": lambda x, a: F.softplus(x, a[0], a[1]), "softsign": lambda x, a: F.softsign(x),
    "logsigmoid": lambda x, a: F.logsigmoid(x), "tanhshrink": lambda x, a: F.tanhshrink(x),
    "hardshrink": lambda x, a: F.hardshrink(x, a), "softshrink": lambda x, a: F.softshrink(x, a),
    "abs": lambda x, a: torch.abs(x), "exp": lambda x, a: torch.exp(x),
    "pow": lambda x, a: torch.pow(x, a), "rdiv": lambda x, a: a / x,
    "threshold": lambda x, a: F.threshold(x, a[0], a[1]),
    **{f: (lambda f: lambda x, a: getattr(torch, f)(x))(f) for f in _MATH},
    "region": lambda x, a: a(x),      # a: the fx function of _elementwise_regions
}
_SCALAR_OPS = {operator.add: "add", torch.add: "add", "add": "add", operator.sub: "sub",
               torch.sub: "sub", "sub": "sub", operator.mul: "mul", torch.mul: "mul",
               "mul": "mul", operator.truediv: "div", torch.div: "div", "div": "div"}


def _scalar_affine(target, node, static: dict) -> tuple[float, float] | None:
    """(a, b) when `node` computes a * x + b from one tensor x and a number (x + 3, 6 - x,
    x * 0.5, x / 6, -x, x / d ** 0.5 with d from a shape), else None."""
    def is_static(n):
        return n.name in static
    try:
        kind = _SCALAR_OPS.get(target)
    except TypeError:   # an unhashable module
        return None
    if target in (operator.neg, torch.neg, "neg") and len(node.args) == 1 and not node.kwargs:
        return (-1.0, 0.0) if not is_static(node.args[0]) else None
    if kind is None or len(node.args) != 2 or node.kwargs:
        return None
    x, c = node.args
    swapped = not isinstance(x, torch.fx.Node) or is_static(x)
    if swapped:
        x, c = c, x
    if isinstance(c, torch.fx.Node) and is_static(c):
        c = static[c.name]
    if not isinstance(x, torch.fx.Node) or is_static(x) or not isinstance(c, (int, float)) \
            or isinstance(c, bool):
        return None
    c = float(c)
    if kind == "add":
        return 1.0, c
    if kind == "sub":
        return (-1.0, c) if swapped else (1.0, -c)
    if kind == "mul":
        return c, 0.0
    return (1.0 / c, 0.0) if not swapped and c != 0 else None   # c / x is not affine


def _number_function(target, node, static: dict) -> tuple[str, float, object] | None:
    """(function, number, tensor) for x ** c and c / x (a table like any function)."""
    if len(node.args) != 2 or node.kwargs:
        return None
    a, b = (static[v.name] if isinstance(v, torch.fx.Node) and v.name in static else v
            for v in node.args)
    tensor = (lambda v: isinstance(v, torch.fx.Node))
    number = (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool))
    if target in (operator.pow, torch.pow, "pow") and tensor(a) and number(b):
        return "pow", float(b), a
    if target in (operator.truediv, torch.div, "div") and number(a) and tensor(b):
        return "rdiv", float(a), b
    return None


def _tensor_and_constant(target, node, constants: dict):
    """(kind, x, const, swapped) for an add/sub/mul/div of one tensor x and one constant tensor
    (`swapped`: the constant is the first operand), else None."""
    try:
        kind = _SCALAR_OPS.get(target)
    except TypeError:   # an unhashable module
        return None
    if kind is None or len(node.args) != 2 or node.kwargs:
        return None
    x, c = node.args
    swapped = isinstance(x, torch.fx.Node) and x.name in constants
    if swapped:
        x, c = c, x
    if not (isinstance(x, torch.fx.Node) and isinstance(c, torch.fx.Node)
            and c.name in constants and x.name not in constants):
        return None
    return kind, x, constants[c.name].detach().double(), swapped


def _channel_affine(target, node, constants: dict, shape) -> tuple | None:
    """(x, a, b) when `node` computes a_c * x + b_c from a tensor x and a constant that varies
    along the channel axis alone ((x - mean) / std inside a model, a learnt per-channel bias
    or scale), else None."""
    found = _tensor_and_constant(target, node, constants)
    if found is None or len(shape) < 2:
        return None
    kind, x, const, swapped = found
    lead = (1,) * (len(shape) - const.dim())
    if const.dim() > len(shape) or any(n != 1 for i, n in enumerate(lead + tuple(const.shape))
                                       if i != 1) or const.numel() not in (1, shape[1]):
        return None
    v = const.reshape(-1).expand(shape[1]).clone()
    if kind == "add":
        return x, torch.ones_like(v), v
    if kind == "sub":
        return (x, -torch.ones_like(v), v) if swapped else (x, torch.ones_like(v), -v)
    if kind == "mul":
        return x, v, torch.zeros_like(v)
    if swapped or bool((v == 0).any()):   # c / x is not affine
        return None
    return x, 1 / v, torch.zeros_like(v)


def _output_affine(target, node, constants: dict, static: dict, shape, by_out: dict,
                   users: dict, src) -> tuple[FNode, str, torch.Tensor] | None:
    """(producer, "scale" or "offset", v) when `node` multiplies (divides) or offsets the
    outputs of a conv2d, dense or layernorm op that nothing else reads by a constant v per
    output channel (ConvNeXt's layer scale gamma * Linear(x), a hand-written LayerNorm's
    affine) or by a number (y * 0.5, y + 1), so that v folds into its weights and bias; else
    None."""
    found = _tensor_and_constant(target, node, constants) or _scaled_or_offset(target, node,
                                                                               static)
    if found is None or found[3] and found[0] in ("div", "sub"):   # c / x, c - x
        return None
    kind, x, const, _ = found
    producer = by_out.get(src(x))
    if producer is None or producer.kind not in ("conv2d", "dense", "layernorm") \
            or producer.act is not None or users[producer.output] != 1 \
            or tuple(shape) != tuple(producer.out_shape):
        return None
    axis = 1 if producer.kind == "conv2d" else len(shape) - 1
    lead = (1,) * (len(shape) - const.dim())
    if const.dim() > len(shape) or any(n != 1 for i, n in enumerate(lead + tuple(const.shape))
                                       if i != axis):
        return None
    v = const.reshape(-1).expand(shape[axis]).clone()
    if kind == "div":
        if bool((v == 0).any()):
            return None
        v = 1 / v
    if kind == "sub":
        v = -v
    return producer, "scale" if kind in ("mul", "div") else "offset", v


def _scaled_or_offset(target, node, static: dict):
    """("mul", x, a, False) or ("add", x, b, False) when `node` is x times a number or x
    plus one (x / 6, x - 1 too), as _tensor_and_constant gives them; else None."""
    affine = _scalar_affine(target, node, static)
    if affine is None or (affine[0] != 1 and affine[1] != 0):       # c - x: both
        return None
    x = next(a for a in node.args if isinstance(a, torch.fx.Node) and a.name not in static)
    a, b = affine
    return ("mul", x, torch.tensor(a, dtype=torch.float64), False) if b == 0 else \
        ("add", x, torch.tensor(b, dtype=torch.float64), False)


def _normalization(target, node, arg, constants: dict, shape) -> tuple | None:
    """(dims, eps, gamma, beta, center) of a LayerNorm or an RMSNorm (module or function; its
    statistics over the trailing `dims`), else None."""
    def tensors(first: int, count: int):
        given = (list(node.args) + [None] * (first + count))[first:first + count]
        given = [node.kwargs.get(k, v) for k, v in zip(("weight", "bias")[:count], given)]
        return [constants.get(a.name) if isinstance(a, torch.fx.Node) else None for a in given]

    finfo = torch.finfo(torch.float32).eps      # RMSNorm's eps=None
    if isinstance(target, nn.LayerNorm):
        return (tuple(target.normalized_shape), target.eps, target.weight, target.bias, True)
    if isinstance(target, nn.RMSNorm):
        return (tuple(target.normalized_shape), target.eps or finfo, target.weight, None, False)
    if target is F.layer_norm:
        return (tuple(arg(node, 1, "normalized_shape")), arg(node, 4, "eps", 1e-5),
                *tensors(2, 2), True)
    if target is F.rms_norm:
        return (tuple(arg(node, 1, "normalized_shape")), arg(node, 3, "eps", None) or finfo,
                *tensors(2, 1), None, False)
    return None


# An additive attention mask this low (or -inf) removes its key: exp underflows to 0 in
# float32 next to any score, as the -1e4 / -1e9 / finfo.min of hand-written masks intend.
MASKED_SCORE = -1e4


def _attention_mask(target, node, constants: dict) -> tuple | None:
    """(scores, blocked) when `node` removes keys from the softmax after it with a constant
    boolean mask: scores.masked_fill(M, -inf), torch.where(M, scores, -inf) (or the other
    way round), or scores + M with M's entries 0 or -inf (a causal mask,
    nn.Transformer.generate_square_subsequent_mask). `blocked` is a bool tensor that
    broadcasts to the scores; None for any other node."""
    def const(a):
        return constants[a.name].detach() if isinstance(a, fx.Node) and a.name in constants \
            else None

    def tensor(a):
        return isinstance(a, fx.Node) and a.name not in constants

    def removes(v):   # a fill value that takes a key out of the softmax
        c = const(v)
        if c is not None and c.numel() == 1:
            v = float(c)
        return isinstance(v, (int, float)) and not isinstance(v, bool) and v <= MASKED_SCORE

    name = target if isinstance(target, str) else getattr(target, "__name__", None)
    args = list(node.args) + [None] * 3
    if name == "masked_fill" and not isinstance(target, nn.Module):
        x = args[0]
        m, v = node.kwargs.get("mask", args[1]), node.kwargs.get("value", args[2])
        if tensor(x) and const(m) is not None and removes(v):
            return x, const(m).bool()
        return None
    if target is torch.where and len(node.args) == 3:
        c, a, b = node.args
        if const(c) is not None and tensor(a) and removes(b):
            return a, ~const(c).bool()
        if const(c) is not None and tensor(b) and removes(a):
            return b, const(c).bool()
        return None
    found = _tensor_and_constant(target, node, constants)
    if found is None or found[0] != "add":
        return None
    _, x, m, _ = found
    blocked = m <= MASKED_SCORE
    if not blocked.any():
        return None        # a bias (a positional one): an addconst
    if not ((m == 0) | blocked).all():
        raise EdgepruneError(f"node '{node.name}': an additive attention mask with finite "
                             "non-zero entries (a bias) as well as removed keys; only masks "
                             f"of 0 and -inf (or <= {MASKED_SCORE:g}) are supported")
    return x, blocked


_SOFTMAX = {nn.Softmax: "softmax", torch.softmax: "softmax", F.softmax: "softmax",
            "softmax": "softmax", nn.LogSoftmax: "log_softmax",
            torch.log_softmax: "log_softmax", F.log_softmax: "log_softmax",
            "log_softmax": "log_softmax"}


def _softmax_kind(target) -> str | None:
    try:
        return _SOFTMAX.get(type(target) if isinstance(target, nn.Module) else target)
    except TypeError:   # an unhashable target
        return None


def _is_softmax(node, gm) -> bool:
    target = gm.get_submodule(node.target) if node.op == "call_module" else node.target
    return node.op in ("call_module", "call_function", "call_method") and \
        _softmax_kind(target) is not None


def _softmax_keep(blocked: torch.Tensor, shape, axis: int, kind: str, where: str):
    """The positions a masked softmax keeps, as a bool tensor of the scores' rank whose axes
    are 1 where the mask does not vary (a causal mask: (1, 1, T, S) for (N, H, T, S))."""
    if kind != "softmax":
        raise EdgepruneError(f"{where}: a {kind} of masked scores; only softmax takes a mask")
    try:
        keep = ~torch.broadcast_to(blocked, shape)
    except RuntimeError:
        raise EdgepruneError(f"{where}: an attention mask of shape {list(blocked.shape)} does "
                             f"not broadcast to the scores {list(shape)}") from None
    if not keep.any(dim=axis).all():
        raise EdgepruneError(f"{where}: the attention mask removes every key of some row "
                             "(its softmax is not a number)")
    for ax in range(len(shape)):
        first = keep.narrow(ax, 0, 1)
        if bool((keep == first).all()):
            keep = first
    return keep.contiguous()


def _constant_offset(target, node, constants: dict, shape) -> tuple | None:
    """(x, sign, P) when `node` computes sign * x + P with a constant P of any shape that
    broadcasts to one sample (x + pos_embedding, x - P, P - x), else None."""
    found = _tensor_and_constant(target, node, constants)
    if found is None or found[0] not in ("add", "sub"):
        return None
    kind, x, const, swapped = found
    try:
        p = torch.broadcast_to(const, shape)[0].clone()
    except RuntimeError:
        return None
    if const.dim() == len(shape) and const.shape[0] != 1:
        return None      # varies along the batch
    if kind == "add":
        return x, 1, p
    return (x, -1, p) if swapped else (x, 1, -p)


def lut_apply(attrs: dict, x: torch.Tensor) -> torch.Tensor:
    """The float function of a "lut" node (attrs: function, param)."""
    return LUT_FUNCTIONS[attrs["function"]](x, attrs.get("param"))


def _lut_of(mod_or_fn, node, arg) -> tuple[str, object] | None:
    """(function, param) for an elementwise module/function a "lut" node can compute."""
    simple = {nn.Sigmoid: "sigmoid", nn.Tanh: "tanh", nn.Hardswish: "hardswish",
              nn.Hardsigmoid: "hardsigmoid", nn.SiLU: "silu", nn.Mish: "mish"}
    for cls, name in simple.items():
        if type(mod_or_fn) is cls:
            return name, None
    if isinstance(mod_or_fn, nn.GELU):
        return "gelu", mod_or_fn.approximate
    if isinstance(mod_or_fn, nn.ELU):
        return "elu", float(mod_or_fn.alpha)
    if isinstance(mod_or_fn, nn.LeakyReLU):
        return "leaky_relu", float(mod_or_fn.negative_slope)
    if isinstance(mod_or_fn, nn.PReLU) and mod_or_fn.num_parameters == 1:
        return "leaky_relu", float(mod_or_fn.weight.detach().reshape(()))
    more = {nn.SELU: ("selu", None), nn.Softsign: ("softsign", None),
            nn.LogSigmoid: ("logsigmoid", None), nn.Tanhshrink: ("tanhshrink", None)}
    if type(mod_or_fn) in more:
        return more[type(mod_or_fn)]
    if isinstance(mod_or_fn, nn.CELU):
        return "celu", float(mod_or_fn.alpha)
    if isinstance(mod_or_fn, nn.Softplus):
        return "softplus", [float(mod_or_fn.beta), float(mod_or_fn.threshold)]
    if isinstance(mod_or_fn, (nn.Hardshrink, nn.Softshrink)):
        return type(mod_or_fn).__name__.lower(), float(mod_or_fn.lambd)
    fns = {torch.sigmoid: "sigmoid", F.sigmoid: "sigmoid", "sigmoid": "sigmoid",
           torch.tanh: "tanh", F.tanh: "tanh", "tanh": "tanh", F.hardswish: "hardswish",
           F.hardsigmoid: "hardsigmoid", F.silu: "silu", F.mish: "mish", torch.erf: "erf",
           "erf": "erf", F.selu: "selu", torch.selu: "selu", F.softsign: "softsign",
           F.logsigmoid: "logsigmoid", F.tanhshrink: "tanhshrink", torch.abs: "abs",
           "abs": "abs", torch.exp: "exp", "exp": "exp",
           **{getattr(torch, f): f for f in _MATH}, **{f: f for f in _MATH}}
    if mod_or_fn in fns:
        return fns[mod_or_fn], None
    if mod_or_fn is F.gelu:
        return "gelu", arg(node, 1, "approximate", "none")
    if mod_or_fn is F.elu:
        return "elu", float(arg(node, 1, "alpha", 1.0))
    if mod_or_fn is F.leaky_relu:
        return "leaky_relu", float(arg(node, 1, "negative_slope", 0.01))
    if mod_or_fn is F.celu:
        return "celu", float(arg(node, 1, "alpha", 1.0))
    if mod_or_fn is F.softplus:
        return "softplus", [float(arg(node, 1, "beta", 1.0)),
                            float(arg(node, 2, "threshold", 20.0))]
    if mod_or_fn in (F.hardshrink, F.softshrink):
        return mod_or_fn.__name__, float(arg(node, 1, "lambd", 0.5))
    if isinstance(mod_or_fn, nn.Threshold):
        return "threshold", [float(mod_or_fn.threshold), float(mod_or_fn.value)]
    if mod_or_fn is F.threshold:
        return "threshold", [float(arg(node, 1, "threshold")), float(arg(node, 2, "value"))]
    return None


def _act_range(act: tuple | None) -> tuple[float, float]:
    if act is None:
        return -np.inf, np.inf
    if act[0] == "relu":
        return 0.0, np.inf
    if act[0] == "relu6":
        return 0.0, 6.0
    return float(act[1]), float(act[2])


def fake_quant(x: torch.Tensor, scale: float, zp: int, qmin: int, qmax: int) -> torch.Tensor:
    """Quantize-dequantize with a straight-through gradient inside the clamp range."""
    lo, hi = (qmin - zp) * scale, (qmax - zp) * scale
    xc = torch.clamp(x, lo, hi)
    q = torch.floor(xc / scale + 0.5)
    return xc + ((q * scale) - xc).detach()


def fake_quant_weight(w: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """Per-output-channel symmetric max-abs fake quantization (STE) for QAT."""
    qmax = 2 ** (bits - 1) - 1
    a = w.detach().abs().flatten(1).amax(1).clamp_min(1e-12) / qmax
    a = a.view((-1,) + (1,) * (w.dim() - 1))
    q = torch.clamp(torch.round(w / a), -qmax, qmax) * a
    return w + (q - w).detach()


class IRNet(nn.Module):
    """The folded float graph as a module: `nodes` in order, conv/dense weights as parameters.

    `qconfig` (set by QAT) turns on fake quantization: {"act": {tensor: (scale, zp, qmin, qmax)},
    "weight_bits": {node: bits}}.
    """

    def __init__(self, nodes: list[FNode], input_shape: tuple[int, ...],
                 weights: dict[str, torch.Tensor], biases: dict[str, torch.Tensor],
                 outputs: list[str] | None = None):
        super().__init__()
        self.nodes = nodes
        self.outputs = list(outputs or [nodes[-1].output])   # several: forward returns a tuple
        self.input_shape = tuple(input_shape)
        # a module run by several nodes (a recurrent layer's steps) keeps one parameter, so
        # that QAT trains one matrix and the C library stores it once
        shared: dict[tuple, nn.Parameter] = {}

        def param(v: torch.Tensor) -> nn.Parameter:
            key = (v.data_ptr(), tuple(v.shape), tuple(v.stride()))
            if key not in shared:
                shared[key] = nn.Parameter(v.detach().clone().float())
            return shared[key]
        self.weight = nn.ParameterDict({k: param(v) for k, v in weights.items()})
        self.bias = nn.ParameterDict({k: param(v) for k, v in biases.items()})
        self.qconfig: dict | None = None
        self.weight_override: dict[str, torch.Tensor] = {}

    @property
    def output(self) -> str:
        return self.outputs[0]

    def weight_nodes(self) -> list[FNode]:
        return [n for n in self.nodes if n.kind in ("conv2d", "dense")]

    def _w(self, name: str) -> torch.Tensor:
        if name in self.weight_override:
            return self.weight_override[name]
        w = self.weight[name]
        if self.qconfig is not None and name in self.qconfig.get("weight_bits", {}):
            w = fake_quant_weight(w, self.qconfig["weight_bits"][name])
        return w

    def _fq(self, name: str, x: torch.Tensor) -> torch.Tensor:
        if self.qconfig is None or name not in self.qconfig.get("act", {}):
            return x
        return fake_quant(x, *self.qconfig["act"][name])

    def forward(self, x: torch.Tensor, record: dict | None = None) -> torch.Tensor:
        env = {INPUT: self._fq(INPUT, x)}
        if record is not None:
            record[INPUT] = env[INPUT]
        for n in self.nodes:
            a = n.attrs
            xs = [env[i] for i in n.inputs]
            if n.kind == "conv2d":
                pt, pl, pb, pr = a["padding"]
                h = xs[0]
                if any(a["padding"]):
                    h = F.pad(h, (pl, pr, pt, pb))
                y = F.conv2d(h, self._w(n.name), self.bias[n.name], a["strides"], 0,
                             a["dilation"], a["groups"])
            elif n.kind == "dense":
                y = F.linear(xs[0], self._w(n.name), self.bias[n.name])
            elif n.kind == "add":
                y = xs[0] - xs[1] if a.get("subtract") else xs[0] + xs[1]
            elif n.kind == "mul":
                y = xs[0] * xs[1] * a.get("scale", 1.0)
            elif n.kind == "matmul":
                y = torch.matmul(xs[0], xs[1]) * a.get("scale", 1.0)
            elif n.kind == "concat":
                y = torch.cat(xs, a.get("axis", 1))
            elif n.kind in ("maximum", "minimum"):
                y = getattr(torch, n.kind)(xs[0], xs[1])
            elif n.kind == "lut":
                y = lut_apply(a, xs[0])
            elif n.kind == "prelu":
                y = F.prelu(xs[0], torch.tensor(a["slopes"], dtype=xs[0].dtype))
            elif n.kind == "addconst":
                y = a["sign"] * xs[0] + a["const"].to(xs[0].dtype)
            elif n.kind == "layernorm":   # gamma and beta: one per channel, or one for all
                t, c = xs[0].dtype, xs[0].shape[-1]
                gamma = torch.tensor(a["gamma"], dtype=t).expand(c)
                beta = torch.tensor(a["beta"], dtype=t).expand(c)
                y = F.layer_norm(xs[0], (c,), gamma, beta, a["eps"]) if a.get("center", True) \
                    else F.rms_norm(xs[0], (c,), gamma, a["eps"]) + beta
            elif n.kind == "softmax":
                keep = a.get("keep")
                y = torch.softmax(xs[0] if keep is None else
                                  xs[0].masked_fill(~keep, float("-inf")), a["axis"])
            elif n.kind == "log_softmax":
                y = torch.log_softmax(xs[0], a["axis"])
            elif n.kind in ("maxpool", "avgpool") and "output_size" in a:
                pool = F.adaptive_max_pool2d if n.kind == "maxpool" else F.adaptive_avg_pool2d
                y = pool(xs[0], a["output_size"])
            elif n.kind == "maxpool":
                pt, pl, pb, pr = a["padding"]
                h = F.pad(xs[0], (pl, pr, pt, pb), value=-np.inf) if any(a["padding"]) else xs[0]
                y = F.max_pool2d(h, a["kernel"], a["strides"], 0, a["dilation"])
            elif n.kind == "avgpool":
                pt, pl, pb, pr = a["padding"]
                h = F.pad(xs[0], (pl, pr, pt, pb)) if any(a["padding"]) else xs[0]
                y = F.avg_pool2d(h, a["kernel"], a["strides"], 0)
                if "divisor" in a:    # a window sum over another divisor than its taps
                    y = y * (a["kernel"][0] * a["kernel"][1] / a["divisor"])
                if not a.get("count_include_pad", True):
                    k = a["kernel"][0] * a["kernel"][1]
                    counts = window_counts(*xs[0].shape[2:], a)
                    y = y * torch.as_tensor(k / counts, dtype=y.dtype)
            elif n.kind == "reshape":
                y = xs[0].reshape((xs[0].shape[0],) + tuple(a["shape"][1:]))
            elif n.kind == "transpose":
                y = xs[0].permute(a["perm"])
            elif n.kind == "slice":
                index = [slice(None)] * a["axis"] + [slice(a["start"], a["stop"], a["step"])]
                y = xs[0][tuple(index)]
            elif n.kind == "pad":   # along one axis: zeros, or reflect/replicate/circular
                y = pad_axis(xs[0], a["axis"], a["before"], a["after"], a.get("mode", "constant"))
            elif n.kind == "dilate":
                y = zero_insert(xs[0], *a["strides"])
            elif n.kind == "upsample" and a["mode"] == "nearest" and "rows" in a:
                y = xs[0][:, :, a["rows"]][:, :, :, a["cols"]]
            elif n.kind == "upsample" and a["mode"] == "nearest":
                y = xs[0].repeat_interleave(a["factors"][0], 2).repeat_interleave(
                    a["factors"][1], 3)
            elif n.kind == "upsample":
                y = F.interpolate(xs[0], size=tuple(n.out_shape[2:]), mode="bilinear",
                                  align_corners=a["align_corners"])
            else:
                raise EdgepruneError(f"IRNet: unknown node kind {n.kind}")
            if n.act is not None:
                lo, hi = _act_range(n.act)
                y = torch.clamp(y, lo if np.isfinite(lo) else None, hi if np.isfinite(hi) else None)
            y = self._fq(n.output, y)
            env[n.output] = y
            if record is not None:
                record[n.output] = y
        return env[self.output] if len(self.outputs) == 1 else tuple(env[o] for o in self.outputs)


def pad_axis(x: torch.Tensor, axis: int, before: int, after: int, mode: str) -> torch.Tensor:
    """x padded along one axis (torch pads reflect/replicate/circular only on 3-5-D tensors
    along their last axes: the axis is moved last and the tensor viewed as 3-D)."""
    if mode == "constant":
        return F.pad(x, [0, 0] * (x.dim() - 1 - axis) + [before, after])
    moved = x.movedim(axis, -1)
    flat = moved.reshape(1, -1, moved.shape[-1])
    y = F.pad(flat, [before, after], mode=mode)
    return y.reshape(*moved.shape[:-1], y.shape[-1]).movedim(-1, axis)


# --- extraction ---------------------------------------------------------------------------
_PAD_MODULES = {nn.ZeroPad1d: "constant", nn.ZeroPad2d: "constant", nn.ConstantPad1d: "constant",
                nn.ConstantPad2d: "constant", nn.ReflectionPad1d: "reflect",
                nn.ReflectionPad2d: "reflect", nn.ReplicationPad1d: "replicate",
                nn.ReplicationPad2d: "replicate", nn.CircularPad1d: "circular",
                nn.CircularPad2d: "circular"}
_ACT_MODULES = (nn.ReLU, nn.ReLU6, nn.Hardtanh)
_PASS_MODULES = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout)
_PASS_FUNCTIONS = (F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout,
                   "contiguous", "clone")


def _activation_of(mod_or_fn, node) -> tuple | None:
    if isinstance(mod_or_fn, nn.ReLU6):
        return ("relu6",)
    if isinstance(mod_or_fn, nn.Hardtanh):
        return ("clip", float(mod_or_fn.min_val), float(mod_or_fn.max_val))
    if isinstance(mod_or_fn, nn.ReLU):
        return ("relu",)
    if mod_or_fn in (F.relu, torch.relu, "relu", "relu_"):
        return ("relu",)
    if mod_or_fn is F.relu6:
        return ("relu6",)
    if mod_or_fn in (F.hardtanh,):
        lo = node.kwargs.get("min_val", node.args[1] if len(node.args) > 1 else -1.0)
        hi = node.kwargs.get("max_val", node.args[2] if len(node.args) > 2 else 1.0)
        return ("clip", float(lo), float(hi))
    if mod_or_fn in (torch.clamp, torch.clip, "clamp", "clip"):
        lo = node.kwargs.get("min", node.args[1] if len(node.args) > 1 else None)
        hi = node.kwargs.get("max", node.args[2] if len(node.args) > 2 else None)
        return ("clip", -np.inf if lo is None else float(lo), np.inf if hi is None else float(hi))
    return None


# Elementwise ops beyond the tables and activations: what a hand-written activation is made of
# (torch.where(x > 0, x, a * x), x * F.relu6(x + 3) / 6, x * torch.sigmoid(1.702 * x))
_MASK_OPS = {operator.gt, operator.lt, operator.ge, operator.le, operator.eq, operator.ne,
             torch.gt, torch.lt, torch.ge, torch.le, torch.eq, torch.ne, operator.and_,
             operator.or_, operator.invert, torch.logical_and, torch.logical_or,
             torch.logical_not, torch.where, "gt", "lt", "ge", "le", "eq", "ne",
             "logical_and", "logical_or", "logical_not", "to", "type_as", "bool", "float"}
_ARITHMETIC = {*_SCALAR_OPS, operator.neg, torch.neg, "neg", operator.pow, torch.pow, "pow",
               torch.maximum, torch.minimum, "maximum", "minimum"}


def _elementwise_regions(gm: fx.GraphModule, static: dict, arg) -> tuple[dict, set]:
    """Computations of one tensor value by value (a hand-written activation) that need more
    than one op here (a mask and torch.where, a product of two functions of x, a chain of
    steps with arithmetic on numbers among them: F.relu6(x + 3) / 6, (x - m) / s): each as
    one table of its source, so one pass over the tensor and one rounding. A chain that starts
    with a clamp (a ReLU) starts after it: the clamp stays with the op before it, whose
    output keeps its range; so do numbers a layer's output is scaled or offset by, which fold
    into its weights. Returns ({node: (source, function)}, {names of nodes they
    absorb})."""
    def target_of(n):
        return gm.get_submodule(n.target) if n.op == "call_module" else n.target

    def elementwise(n) -> bool:
        if n.op not in ("call_function", "call_method", "call_module"):
            return False
        t = target_of(n)
        try:
            if t in _MASK_OPS or t in _ARITHMETIC:
                return True
        except TypeError:      # an unhashable module
            pass
        return _activation_of(t, n) is not None or _lut_of(t, n, arg) is not None

    source, tensors_of, masked = {}, {}, {}
    # a chain's link: the node it starts from, its ops from there, whether one is arithmetic
    start, length, arithmetic, folds = {}, {}, {}, set()
    for n in gm.graph.nodes:
        if n.name in static or not elementwise(n):
            continue
        ins = [a for a in n.all_input_nodes if a.name not in static]
        if any(a.op == "get_attr" for a in ins):
            continue                      # a constant tensor varies along an axis
        roots = {source.get(a.name, a) for a in ins}
        shape = getattr(n.meta.get("tensor_meta"), "shape", None)
        if len(roots) != 1 or shape is None:
            continue
        root = roots.pop()
        if tuple(getattr(root.meta.get("tensor_meta"), "shape", ())) != tuple(shape):
            continue                      # broadcasts
        source[n.name] = root
        t = target_of(n)
        two = len([a for a in ins if a.name in source or a is root]) >= 2
        try:
            mask = t in _MASK_OPS and t not in ("to", "float", "type_as")
        except TypeError:
            mask = False
        masked[n.name] = mask or two or any(masked.get(a.name, False) for a in ins)
        tensors_of[n.name] = ins
        if not masked[n.name]:            # one input: a link of a chain
            (a,) = ins
            numbers = _scalar_affine(t, n, static) is not None
            if _scaled_or_offset(t, n, static) is not None and len(a.users) == 1 and (
                    a.name in folds or a.name not in source and a.op == "call_module" and
                    isinstance(target_of(a), (nn.Conv2d, nn.Linear, nn.LayerNorm))):
                # y * 0.5, y + 1 on a layer's output: fold into its weights, not a table
                start[n.name], length[n.name], arithmetic[n.name] = n, 0, False
                folds.add(n.name)
            elif _activation_of(t, n) is not None and (a.name in folds or a.name not in start):
                start[n.name], length[n.name], arithmetic[n.name] = n, 0, False   # a clamp
            elif a.name in start:
                start[n.name], length[n.name] = start[a.name], length[a.name] + 1
                arithmetic[n.name] = arithmetic[a.name] or numbers
            else:
                start[n.name], length[n.name], arithmetic[n.name] = root, 1, numbers
    fused = {}
    for n in gm.graph.nodes:
        if masked.get(n.name):
            inside = all(u.name in source and source[u.name] is source[n.name]
                         for u in n.users)
            if not inside or not n.users:
                fused[n.name] = source[n.name]
        elif length.get(n.name, 0) >= 2 and arithmetic[n.name]:
            inside = all(start.get(u.name) is start[n.name] or
                         u.name in source and masked.get(u.name) for u in n.users)
            if not inside or not n.users:
                fused[n.name] = start[n.name]
    starts = {r.name for r in fused.values()}
    absorbed: set[str] = set()
    for n in reversed(list(gm.graph.nodes)):   # users first
        if n.name in source and n.name not in fused and n.name not in starts and n.users \
                and all(u.name in absorbed or u.name in fused for u in n.users):
            absorbed.add(n.name)
    functions, nodes = {}, {n.name: n for n in gm.graph.nodes}
    for name, root in fused.items():
        graph, env = fx.Graph(), {}
        env[root.name] = graph.placeholder("x")

        def take(n):
            if n.name in env:
                return env[n.name]
            if n.name in static:
                return static[n.name]
            for a in tensors_of[n.name]:
                take(a)
            env[n.name] = graph.node_copy(n, take)
            return env[n.name]
        graph.output(take(nodes[name]))
        functions[name] = (root, fx.GraphModule(gm, graph))
    return functions, absorbed


def _unsupported(where: str, why: str = "") -> EdgepruneError:
    return EdgepruneError(
        f"{where}: not supported by the quantizer{' (' + why + ')' if why else ''} (supported: "
        "Conv2d, Linear, BatchNorm2d, ReLU/ReLU6/Hardtanh/clamp, PReLU, sigmoid, tanh, "
        "hardswish, hardsigmoid, SiLU, GELU, ELU, Mish, LeakyReLU, erf, SELU, CELU, softplus, "
        "softsign, logsigmoid, tanhshrink, hard/softshrink, abs, exp, math functions of one "
        "tensor, any elementwise computation of one tensor (torch.where of a mask of it), "
        "softmax, log_softmax, LayerNorm, RMSNorm, GroupNorm, InstanceNorm, F.normalize, "
        "add, sub, mul, matmul, max/min of two tensors, cat, stack, slices and splits, "
        "MaxPool2d, AvgPool2d, adaptive pools, mean, sum, amax, amin, flatten/view, "
        "nearest and bilinear Upsample/interpolate, pixel and channel shuffles, "
        "permute/transpose, per-channel constant scales and offsets)")


def _fetch_attr(gm, target: str) -> torch.Tensor:
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _call_key(value):
    """A hashable form of a node's args (lists, dicts and slices included)."""
    if isinstance(value, (list, tuple)):
        return tuple(_call_key(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, _call_key(v)) for k, v in value.items()))
    if isinstance(value, slice):
        return ("slice", _call_key(value.start), _call_key(value.stop), _call_key(value.step))
    hash(value)
    return value


# ops whose requantization can take an activation's clamp (a ReLU after them fuses into them)
CLAMPING_KINDS = ("conv2d", "dense", "add", "mul", "matmul", "concat", "maximum", "minimum")


def _clamp_over_concat(concat, by_out: dict, users: dict) -> list | None:
    """The producers of a concatenation's pieces when each can take an activation (a clamp) in
    its own requantization: convs, dense layers, adds, products and maxima without one that
    nothing else reads. The concatenation then needs no kernel (each producer writes its
    piece in place, lower.py), where with the clamp it requantized every value (an Inception
    block's ReLU after its BatchNorm, which folds into the branches)."""
    if concat is None or concat.kind != "concat" or concat.act is not None \
            or len(set(concat.inputs)) != len(concat.inputs):
        return None
    pieces = [by_out.get(i) for i in concat.inputs]
    if all(p is not None and p.act is None and users[p.output] == 1
           and p.kind in CLAMPING_KINDS and p.kind != "concat"
           for p in pieces):
        return pieces
    return None


def fold_norms_into_concat_pieces(gm: fx.GraphModule) -> None:
    """A BatchNorm after a concatenation of channels whose every piece is a conv's output that
    nothing else reads (an Inception block's branches) folds into those convs, each scaling
    and shifting its own channels, as fuse() folds a BatchNorm into the conv before it; left
    alone, it runs as a 1x1 depthwise conv, a requantization per value (12.7 instructions a
    value on the M7)."""
    modules = dict(gm.named_modules())
    calls = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    for node in list(gm.graph.nodes):
        bn = modules.get(node.target) if node.op == "call_module" else None
        if not isinstance(bn, nn.BatchNorm2d) or bn.running_var is None or len(node.args) != 1:
            continue
        cat = node.args[0]
        if not (isinstance(cat, fx.Node) and cat.op == "call_function"
                and cat.target in (torch.cat, torch.concat) and len(cat.users) == 1):
            continue
        dim = cat.args[1] if len(cat.args) > 1 else cat.kwargs.get("dim", 0)
        pieces = cat.args[0]
        convs = [modules.get(p.target) if isinstance(p, fx.Node) and p.op == "call_module"
                 and len(p.users) == 1 and calls.count(p.target) == 1 else None
                 for p in pieces]   # a conv called elsewhere too keeps its weights
        if dim not in (1, -3) or len(set(pieces)) != len(pieces) \
                or not all(isinstance(c, nn.Conv2d) for c in convs) \
                or sum(c.out_channels for c in convs) != bn.num_features:
            continue
        scale = torch.rsqrt(bn.running_var + bn.eps)
        if bn.weight is not None:
            scale = scale * bn.weight.detach()
        shift = (bn.bias.detach() if bn.bias is not None else 0) - bn.running_mean * scale
        start = 0
        with torch.no_grad():
            for conv in convs:
                k = slice(start, start + conv.out_channels)
                conv.weight.mul_(scale[k].reshape(-1, 1, 1, 1))
                if conv.bias is None:
                    conv.bias = nn.Parameter(torch.zeros(conv.out_channels))
                conv.bias.copy_(conv.bias * scale[k] + shift[k])
                start += conv.out_channels
        node.replace_all_uses_with(cat)
        gm.graph.erase_node(node)


def merge_repeated_calls(gm: fx.GraphModule) -> None:
    """A call repeated on the same inputs (torch.where(c(x) > 0, c(x), 0.1 * c(x))) is computed
    once, so that what reads it sees one tensor (as onnxsim does for an ONNX file). In-place,
    random and dropout calls stay, and so do values written into (two torch.zeros filled in)."""
    def name_of(target) -> str:
        return getattr(target, "__name__", str(target)).lower()

    views = {operator.getitem, "view", "view_as", "reshape", "narrow", "select", "transpose",
             "permute", "unsqueeze", "squeeze", "flatten", "expand", "expand_as", "t"}

    def written(n) -> bool:    # an in-place call on it or on a view of it
        return any(u.op in ("call_function", "call_method") and
                   (u.target is operator.setitem or name_of(u.target).endswith("_") or
                    (u.target in views and written(u))) for u in n.users)
    seen: dict = {}
    for n in list(gm.graph.nodes):
        if n.op not in ("call_module", "call_function", "call_method") or written(n):
            continue
        name = name_of(type(gm.get_submodule(n.target)) if n.op == "call_module" else n.target)
        if name.endswith("_") or "rand" in name or "dropout" in name or "bernoulli" in name:
            continue
        try:
            key = (n.op, n.target, _call_key(n.args), _call_key(n.kwargs))
        except TypeError:        # an unhashable argument (a tensor): left as it is
            continue
        if key in seen:
            n.replace_all_uses_with(seen[key])
            gm.graph.erase_node(n)
        else:
            seen[key] = n


def extract(model: nn.Module, input_shape: tuple[int, ...]) -> IRNet:
    """Fold BN and turn `model` into an IRNet (raises naming the first unsupported node)."""
    from torch.fx.experimental.optimization import fuse
    from torch.utils._pytree import tree_leaves

    model = fold_constants(copy.deepcopy(model).eval())   # a mask built from buffers: a buffer
    for m in model.modules():   # torch's conv-BN fusion reads a scale and a shift
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.weight is None:
            m.weight, m.bias = nn.Parameter(torch.ones(m.num_features)), \
                nn.Parameter(torch.zeros(m.num_features))
            m.affine = True
    try:
        gm = fuse(model)
    except Exception as e:
        raise EdgepruneError(f"cannot trace the model with torch.fx ({type(e).__name__}: {e}); "
                             "quantize supports traceable conv/linear/pool/add networks") from None
    gm.graph.eliminate_dead_code()   # `y, _ = torch.min(x, 1)`: the indices nobody reads
    merge_repeated_calls(gm)
    fold_norms_into_concat_pieces(gm)
    gm.recompile()
    static: dict[str, object] = {}  # nodes computing no tensor (x.size(0), x.shape[2:]): values
    constants: dict[str, torch.Tensor] = {}   # get_attr nodes: buffers and parameters
    pads: dict[str, tuple[list[int], float]] = {}   # F.pad nodes: [t, l, b, r], value
    masks: dict[str, torch.Tensor] = {}   # attention masks: node -> the keys it removes

    def unpadded_shape(node) -> tuple[int, ...]:
        a = node.args[0]
        return shape_of(a.args[0] if a.name in pads else a)

    def padding_of(node, own: list[int], pool: str | None = None) -> list[int]:
        """`own` padding plus that of an F.pad the op reads (zero for convs and average
        pools, -inf for max pools: what the integer op pads with)."""
        a = node.args[0]
        if not isinstance(a, fx.Node) or a.name not in pads:
            return own
        extra, value = pads[a.name]
        want = float("-inf") if pool == "max" else 0.0
        if value != want:
            raise EdgepruneError(f"node '{a.name}': padding with {value} before "
                                 f"'{node.name}' (only {want} folds into it)")
        return [o + e for o, e in zip(own, extra)]

    class _Prop(ShapeAndSizeProp):     # the sizes a slice reads (y[..., :n]) known too
        def run_node(self, n):
            v = super().run_node(n)
            if n.op != "output" and not any(isinstance(t, torch.Tensor) for t in tree_leaves(v)):
                static[n.name] = v
            return v
    with torch.no_grad():
        _Prop(gm).propagate(torch.zeros(input_shape))

    nodes: list[FNode] = []
    by_out: dict[str, FNode] = {}
    alias: dict[str, str] = {}
    weights, biases = {}, {}

    def src(a) -> str:
        if not isinstance(a, fx.Node):
            raise EdgepruneError(f"unsupported non-tensor operand {a!r}")
        if a.name in constants:
            users = ", ".join(f"'{u.name}'" for u in a.users)
            raise EdgepruneError(f"constant tensor '{a.target}' of shape "
                                 f"{tuple(constants[a.name].shape)} is an operand of {users}; "
                                 "the quantizer takes constants only as a per-channel (or "
                                 "single) scale or offset of one tensor")
        return alias.get(a.name, a.name)

    def shape_of(node) -> tuple[int, ...]:
        return tuple(node.meta["tensor_meta"].shape)

    def computed_shape(node) -> tuple[int, ...]:
        """The shape of the tensor the IR computes for `node` (an expand is not one)."""
        name = src(node)
        return tuple(by_out[name].out_shape) if name in by_out else \
            tuple(input_shape) if name == INPUT else shape_of(node)

    def arg(node, i: int, name: str, default=None):
        """Positional argument i or keyword `name` of a call, shape arithmetic evaluated."""
        v = node.kwargs.get(name, node.args[i] if len(node.args) > i else default)

        def value(n):
            if n.name not in static:
                raise EdgepruneError(f"node '{node.name}': argument '{name}' is a tensor, "
                                     "where a constant is expected")
            return static[n.name]
        return fx.node.map_arg(v, value)

    def add_node(fnode: FNode):
        nodes.append(fnode)
        by_out[fnode.output] = fnode

    def add_constant_rows(node, parts, axis: int, shape, where: str) -> None:
        """cat([token, x], axis) with constant pieces (a class token): x padded with zero
        points along the axis, then the pieces added as a constant (op addconst)."""
        tensors = [i for i, t in enumerate(parts) if t.name not in constants]
        if len(tensors) != 1 or axis == 0:
            raise EdgepruneError(f"{where}: a concatenation of constants with "
                                 f"{len(tensors)} tensors along axis {axis}; only constant "
                                 "pieces around one tensor, after the batch axis")
        rows = []
        for t in parts:
            if t.name in constants:
                c = constants[t.name].detach().double()
                rows.append(c.reshape(c.shape[-(len(shape) - 1):]) if c.dim() >= len(shape)
                            else c)
            else:
                one = list(shape_of(t)[1:])
                rows.append(torch.zeros(one, dtype=torch.float64))
        try:
            const = torch.cat([r.expand(*[-1 if k == axis - 1 else n for k, n in
                                          enumerate(shape[1:])]) for r in rows], axis - 1)
        except RuntimeError as e:
            raise EdgepruneError(f"{where}: constant pieces do not line up: {e}") from None
        t = parts[tensors[0]]
        before = sum(int(r.shape[axis - 1]) for r in rows[:tensors[0]])
        after = sum(int(r.shape[axis - 1]) for r in rows[tensors[0] + 1:])
        pad = node.name + "_pad"
        add_node(FNode("pad", pad, [src(t)], pad, {"axis": axis, "before": before,
                                                    "after": after}, out_shape=shape))
        add_node(FNode("addconst", node.name, [pad], node.name, {"sign": 1, "const": const},
                       out_shape=shape))

    def add_pads(node, x: str, given: list[int], mode: str, ishape, where: str,
                 last: str | None = None) -> str:
        """F.pad's (left, right, top, bottom, ...) widths, last axis first, as one "pad" op per
        padded axis; the last is named `last` (default: the node). Returns its output."""
        if mode not in PAD_MODES or any(w < 0 for w in given) or len(given) % 2 \
                or len(given) // 2 > len(ishape) - 1:
            raise EdgepruneError(f"{where}: padding {tuple(given)} in mode '{mode}' (only "
                                 "non-negative widths after the batch axis, in modes "
                                 f"{', '.join(PAD_MODES)})")
        axes = [(len(ishape) - 1 - i, given[2 * i], given[2 * i + 1])
                for i in range(len(given) // 2) if given[2 * i] or given[2 * i + 1]]
        out = list(ishape)
        for k, (axis, before, after) in enumerate(axes):
            out[axis] += before + after
            name = (last or node.name) if k == len(axes) - 1 else f"{node.name}_pad{axis}"
            add_node(FNode("pad", name, [x], name, {"axis": axis, "before": before,
                                                    "after": after, "mode": mode},
                           out_shape=tuple(out)))
            x = name
        if not axes:
            alias[last or node.name] = x
        return x

    regions, absorbed = _elementwise_regions(gm, static, arg)
    # shape arithmetic on a tensor is not a use of its values (fusing an activation is fine),
    # nor is an op a region's table absorbs
    users = {n.name: len([u for u in n.users if u.name not in static and u.name not in absorbed])
             for n in gm.graph.nodes}
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            if alias:
                raise EdgepruneError("models with several inputs are not supported")
            alias[node.name] = INPUT
            continue
        if node.op == "output":
            outs = node.args[0] if isinstance(node.args[0], (tuple, list)) else [node.args[0]]
            finals = [src(o) for o in outs]
            break
        if node.name in static or node.name in absorbed:   # static shapes; in a table
            continue
        if node.op == "get_attr":   # a constant tensor: read by the op that uses it
            constants[node.name] = _fetch_attr(gm, node.target)
            continue
        if node.op == "call_method" and node.target == "expand" and \
                getattr(node.args[0], "name", None) in constants:
            constants[node.name] = constants[node.args[0].name]   # over the batch: one sample
            continue
        if node.op == "call_method" and node.target in ("expand", "expand_as"):
            # g.expand_as(y) for y * g: the product broadcasts g itself
            if not all(u.target in (operator.mul, torch.mul, "mul") for u in node.users):
                raise EdgepruneError(f"node '{node.name}' ({node.target}): a tensor expanded "
                                     "for anything but a product (which broadcasts it)")
            alias[node.name] = src(node.args[0])
            continue
        if is_split(node) or returns_indices(node):   # a tuple: its getitems are the ops
            continue
        target = gm.get_submodule(node.target) if node.op == "call_module" else node.target
        where = f"node '{node.name}' ({node.op} {getattr(target, '__name__', type(target).__name__)})"
        if not hasattr(node.meta.get("tensor_meta"), "shape"):
            raise _unsupported(where, "it returns several tensors")
        shape = shape_of(node)

        if node.name in regions:    # a hand-written activation: one table of its source
            root, function = regions[node.name]
            add_node(FNode("lut", node.name, [src(root)], node.name,
                           {"function": "region", "param": function}, out_shape=shape))
            continue
        if target is F.pad or isinstance(target, tuple(_PAD_MODULES)):
            if isinstance(target, nn.Module):
                given = list(_pair(target.padding) * 2 if isinstance(target.padding, int)
                             else target.padding)
                mode = _PAD_MODULES[type(target)]
                value = getattr(target, "value", 0.0)
            else:
                given = list(arg(node, 1, "pad"))
                mode, value = arg(node, 2, "mode", "constant"), arg(node, 3, "value", None)
            value = float(value or 0.0)
            user = next(iter(node.users)) if len(node.users) == 1 else None
            user = user and (gm.get_submodule(user.target) if user.op == "call_module"
                             else user.target)
            if (mode == "constant" and len(given) <= 4 and len(shape) == 4
                    and (isinstance(user, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d))
                         or user in (F.max_pool2d, F.avg_pool2d))):
                # TensorFlow's SAME padding: folded into the conv/pool after it
                p = given + [0] * 4
                pads[node.name] = ([p[2], p[0], p[3], p[1]], value)  # t, l, b, r
                alias[node.name] = src(node.args[0])
                continue
            if mode == "constant" and value != 0:
                raise EdgepruneError(f"{where}: padding with {value} that no conv or pool "
                                     "reads (only zeros, or reflect/replicate/circular)")
            add_pads(node, src(node.args[0]), given, mode, shape_of(node.args[0]), where)
            continue

        if target is attention_bias:
            raise EdgepruneError(f"{where}: an attention mask computed from the input; only "
                                 "constant masks (a buffer, or built from constants) are "
                                 "supported")
        masked = _attention_mask(target, node, constants)
        if masked is not None:   # keys removed before a softmax: the softmax skips them
            if any(not _is_softmax(u, gm) for u in node.users):
                raise EdgepruneError(f"{where}: removes entries with a mask (-inf) for "
                                     "something other than a softmax, which alone can skip them")
            alias[node.name] = src(masked[0])
            masks[node.name] = masked[1]
            continue
        # pass-through ops
        if isinstance(target, _PASS_MODULES) or target in _PASS_FUNCTIONS:
            alias[node.name] = src(node.args[0])
            continue
        act = _activation_of(target, node)
        if act is not None:
            prev = src(node.args[0])
            producer = by_out.get(prev)
            pieces = _clamp_over_concat(producer, by_out, users) if users.get(prev) == 1 else None
            if pieces:   # a clamp is elementwise: in each piece's producer, the concat a view
                for p in pieces:
                    p.act = act
                alias[node.name] = prev
                users[node.name] = users[prev]
                continue
            if (producer is not None and producer.act is None
                    and producer.kind in CLAMPING_KINDS
                    and users[prev] == 1):
                producer.act = act      # fused: a clamp in the producer's requantization
                alias[node.name] = prev
                users[node.name] = users[prev]
                continue
            # elsewhere (after a pool, on a tensor used twice) it is a table like any function
            param = [act[1], act[2]] if act[0] == "clip" else None
            add_node(FNode("lut", node.name, [prev], node.name,
                           {"function": act[0], "param": param}, out_shape=shape))
            continue
        kind = _softmax_kind(target)
        if kind:
            dim = target.dim if isinstance(target, nn.Module) else arg(node, 1, "dim")
            if dim is None:
                raise EdgepruneError(f"{where}: {kind} needs an explicit dim")
            attrs = {"axis": int(dim) % len(shape)}
            blocked = masks.get(getattr(node.args[0], "name", None))
            if blocked is not None:
                attrs["keep"] = _softmax_keep(blocked, shape, attrs["axis"], kind, where)
            add_node(FNode(kind, node.name, [src(node.args[0])], node.name, attrs,
                           out_shape=shape))
            continue
        lut = _lut_of(target, node, arg)
        if lut is not None:
            add_node(FNode("lut", node.name, [src(node.args[0])], node.name,
                           {"function": lut[0], "param": lut[1]}, out_shape=shape))
            continue
        norm = _normalization(target, node, arg, constants, shape)
        if norm is not None:     # LayerNorm, RMSNorm, F.normalize
            dims, eps, gamma, beta, center = norm
            if not dims or dims != tuple(shape[len(shape) - len(dims):]) \
                    or len(dims) >= len(shape):
                raise EdgepruneError(f"{where}: a normalization over {list(dims)} of "
                                     f"{list(shape)}; only one over trailing axes after the "
                                     "batch is supported")
            # over several axes ([C, H, W]): over the last axis of the rows they flatten to
            c, x = int(np.prod(dims)), src(node.args[0])
            rows = (*shape[:len(shape) - len(dims)], c)
            if len(dims) > 1:
                add_node(FNode("reshape", node.name + "_rows", [x], node.name + "_rows",
                               {"shape": list(rows)}, out_shape=rows))
                x = node.name + "_rows"
            normed = node.name if len(dims) == 1 else node.name + "_norm"
            add_node(FNode("layernorm", normed, [x], normed, {
                "eps": float(eps), "center": center,
                "gamma": (torch.ones(c) if gamma is None else gamma.detach()).double()
                .reshape(-1).tolist(),
                "beta": (torch.zeros(c) if beta is None else beta.detach()).double()
                .reshape(-1).tolist()}, out_shape=rows))
            if len(dims) > 1:
                add_node(FNode("reshape", node.name, [normed], node.name,
                               {"shape": list(shape)}, out_shape=shape))
            continue
        if target is F.normalize:   # x / max(|x|, eps) along dim: an RMSNorm scaled by 1/sqrt(C)
            dim = int(arg(node, 2, "dim", 1)) % len(shape)
            if float(arg(node, 1, "p", 2.0)) != 2.0 or dim == 0:
                raise EdgepruneError(f"{where}: F.normalize with p={arg(node, 1, 'p', 2.0)} "
                                     f"along axis {dim}; only p=2 after the batch axis")
            c, eps = shape[dim], float(arg(node, 3, "eps", 1e-12))
            perm = [k for k in range(len(shape)) if k != dim] + [dim]   # dim moved last
            moved = tuple(shape[k] for k in perm)
            x = src(node.args[0])
            if dim != len(shape) - 1:
                add_node(FNode("transpose", node.name + "_last", [x], node.name + "_last",
                               {"perm": perm}, out_shape=moved))
                x = node.name + "_last"
            normed = node.name if dim == len(shape) - 1 else node.name + "_norm"
            add_node(FNode("layernorm", normed, [x], normed, {
                "eps": eps * eps / c, "center": False, "gamma": [c ** -0.5], "beta": [0.0]},
                out_shape=moved))
            if dim != len(shape) - 1:
                add_node(FNode("transpose", node.name, [normed], node.name,
                               {"perm": [perm.index(k) for k in range(len(shape))]},
                               out_shape=shape))
            continue
        if isinstance(target, (nn.GroupNorm, nn.InstanceNorm1d, nn.InstanceNorm2d)):
            # the statistics of each group (each channel for InstanceNorm) over its positions:
            # a LayerNorm over the last axis of (N, G, C / G * H * W), then the per-channel
            # affine as a 1x1 depthwise conv
            if isinstance(target, nn.GroupNorm):
                groups, affine = target.num_groups, target.affine
            else:
                if target.track_running_stats:
                    raise EdgepruneError(f"{where}: an InstanceNorm with running statistics "
                                         "is not supported")
                groups, affine = shape[1], target.affine
            n, c = shape[0], shape[1]
            per_group = int(np.prod(shape[1:])) // groups
            x = src(node.args[0])
            grouped = (n, groups, per_group)
            add_node(FNode("reshape", node.name + "_groups", [x], node.name + "_groups",
                           {"shape": list(grouped)}, out_shape=grouped))
            normed = node.name + ("_norm" if affine else "_normed")
            add_node(FNode("layernorm", normed, [node.name + "_groups"], normed,
                           {"eps": float(target.eps), "gamma": [1.0], "beta": [0.0]},
                           out_shape=grouped))
            map4 = (n, c, 1, int(np.prod(shape[2:]))) if len(shape) != 4 else tuple(shape)
            back = node.name if not affine and map4 == tuple(shape) else node.name + "_map"
            add_node(FNode("reshape", back, [normed], back, {"shape": list(map4)},
                           out_shape=map4))
            if affine:
                name = node.name if map4 == tuple(shape) else node.name + "_affine"
                weights[name] = target.weight.detach().reshape(c, 1, 1, 1)
                biases[name] = target.bias.detach()
                add_node(FNode("conv2d", name, [back], name, {
                    "strides": [1, 1], "padding": [0, 0, 0, 0], "dilation": [1, 1],
                    "groups": c}, out_shape=map4))
                back = name
            if back != node.name:
                add_node(FNode("reshape", node.name, [back], node.name, {"shape": list(shape)},
                               out_shape=shape))
            continue
        shuffle = {nn.PixelShuffle: "shuffle", F.pixel_shuffle: "shuffle",
                   nn.PixelUnshuffle: "unshuffle", F.pixel_unshuffle: "unshuffle"}.get(
            type(target) if isinstance(target, nn.Module) else target)
        if shuffle:   # data movement: (N, C, r, r, H, W) <-> (N, C, H, r, W, r)
            factor = "upscale_factor" if shuffle == "shuffle" else "downscale_factor"
            r = getattr(target, factor) if isinstance(target, nn.Module) else \
                int(arg(node, 1, factor))
            n, c, h, w = shape if shuffle == "shuffle" else shape_of(node.args[0])
            blocks, spread = (n, c, r, r, h // r, w // r), (n, c, h // r, r, w // r, r)
            steps = [("reshape", {"shape": list(blocks)}, blocks),
                     ("transpose", {"perm": [0, 1, 4, 2, 5, 3]}, spread),
                     ("reshape", {"shape": list(shape)}, tuple(shape))]
            if shuffle == "unshuffle":
                steps = [("reshape", {"shape": list(spread)}, spread),
                         ("transpose", {"perm": [0, 1, 3, 5, 2, 4]}, blocks),
                         ("reshape", {"shape": list(shape)}, tuple(shape))]
            x = src(node.args[0])
            for k, (kind, attrs, out) in enumerate(steps):
                name = node.name if k == 2 else f"{node.name}_{kind}{k}"
                add_node(FNode(kind, name, [x], name, attrs, out_shape=out))
                x = name
            continue
        if isinstance(target, nn.ChannelShuffle) or target in (F.channel_shuffle,
                                                               torch.channel_shuffle):
            # (N, G, C / G, ...) with its two group axes swapped
            g = target.groups if isinstance(target, nn.Module) else int(arg(node, 1, "groups"))
            grouped = (shape[0], g, shape[1] // g, *shape[2:])
            swapped = (shape[0], shape[1] // g, g, *shape[2:])
            x = src(node.args[0])
            for k, (kind, attrs, out) in enumerate([
                    ("reshape", {"shape": list(grouped)}, grouped),
                    ("transpose", {"perm": [0, 2, 1, *range(3, len(grouped))]}, swapped),
                    ("reshape", {"shape": list(shape)}, tuple(shape))]):
                name = node.name if k == 2 else f"{node.name}_{kind}{k}"
                add_node(FNode(kind, name, [x], name, attrs, out_shape=out))
                x = name
            continue
        if isinstance(target, nn.PReLU):   # a slope per channel (one slope is a "lut")
            add_node(FNode("prelu", node.name, [src(node.args[0])], node.name,
                           {"slopes": target.weight.detach().double().tolist()},
                           out_shape=shape))
            continue
        if isinstance(target, nn.Conv2d):
            if isinstance(target.padding, str):
                ih, iw = shape_of(node.args[0])[2:]
                pads = []
                for k, d, s, i in zip(target.kernel_size, target.dilation, target.stride, (ih, iw)):
                    total = max(0, d * (k - 1)) if target.padding == "same" else 0
                    pads.append((total // 2, total - total // 2))
                padding = [pads[0][0], pads[1][0], pads[0][1], pads[1][1]]
            else:
                ph, pw = _pair(target.padding)
                padding = [ph, pw, ph, pw]
            x = src(node.args[0])
            if target.padding_mode != "zeros":   # reflect, replicate, circular: pad ops first
                t, l, b, r = padding
                x = add_pads(node, x, [l, r, t, b], target.padding_mode,
                             shape_of(node.args[0]), where, node.name + "_pad")
                padding = [0, 0, 0, 0]
            attrs = {"strides": _pair(target.stride), "padding": padding_of(node, padding),
                     "dilation": _pair(target.dilation), "groups": int(target.groups)}
            weights[node.name] = target.weight.detach()
            biases[node.name] = (target.bias.detach() if target.bias is not None
                                 else torch.zeros(target.out_channels))
            add_node(FNode("conv2d", node.name, [x], node.name, attrs, out_shape=shape))
            continue
        if isinstance(target, nn.BatchNorm2d):
            # a BatchNorm fuse() could not fold into a conv (on the input, after an add or a
            # pool, as in pre-activation blocks) is a per-channel affine map: a 1x1 depthwise conv
            if target.running_var is None:
                raise EdgepruneError(f"{where}: BatchNorm without running statistics "
                                     "(track_running_stats=False) cannot be quantized")
            c = target.num_features
            inv = torch.rsqrt(target.running_var + target.eps)
            if target.weight is not None:
                inv = inv * target.weight.detach()
            shift = target.bias.detach() if target.bias is not None else torch.zeros(c)
            weights[node.name] = inv.reshape(c, 1, 1, 1)
            biases[node.name] = shift - target.running_mean * inv
            attrs = {"strides": [1, 1], "padding": [0, 0, 0, 0], "dilation": [1, 1], "groups": c}
            add_node(FNode("conv2d", node.name, [src(node.args[0])], node.name, attrs,
                           out_shape=shape))
            continue
        if isinstance(target, nn.Linear):
            weights[node.name] = target.weight.detach()
            biases[node.name] = (target.bias.detach() if target.bias is not None
                                 else torch.zeros(target.out_features))
            add_node(FNode("dense", node.name, [src(node.args[0])], node.name, out_shape=shape))
            continue
        folded = _output_affine(target, node, constants, static, shape, by_out, users, src)
        if folded is not None:   # a learnt scale or offset of an op's outputs: in its weights
            producer, how, v = folded
            name = producer.output
            if producer.kind == "layernorm":
                a = producer.attrs
                c = len(v)
                gamma, beta = (torch.tensor(a[k], dtype=torch.float64).expand(c)
                               for k in ("gamma", "beta"))
                a["gamma"], a["beta"] = ((gamma * v, beta * v) if how == "scale" else
                                         (gamma, beta + v))
                a["gamma"], a["beta"] = a["gamma"].tolist(), a["beta"].tolist()
            elif how == "scale":
                weights[name] = weights[name] * v.to(weights[name].dtype).reshape(
                    -1, *[1] * (weights[name].dim() - 1))
                biases[name] = biases[name] * v.to(biases[name].dtype)
            else:
                biases[name] = biases[name] + v.to(biases[name].dtype)
            alias[node.name] = name
            users[name] = users[node.name]   # its value now: a later fold or act needs 1
            continue
        affine = _channel_affine(target, node, constants, shape)
        if affine is not None:      # per-channel a * x + b: a 1x1 depthwise conv, like a BN
            x, a, b = affine
            c, flat = shape[1], len(shape) == 2
            name = node.name + "_nchw" if flat else node.name
            weights[name], biases[name] = a.float().reshape(c, 1, 1, 1), b.float()
            attrs = {"strides": [1, 1], "padding": [0, 0, 0, 0], "dilation": [1, 1], "groups": c}
            if flat:                # (N, C) features: as (N, C, 1, 1) and back
                add_node(FNode("reshape", name + "_in", [src(x)], name + "_in",
                               {"shape": [shape[0], c, 1, 1]}, out_shape=(shape[0], c, 1, 1)))
            add_node(FNode("conv2d", name, [name + "_in" if flat else src(x)], name, attrs,
                           out_shape=(shape[0], c, 1, 1) if flat else shape))
            if flat:
                add_node(FNode("reshape", node.name, [name], node.name,
                               {"shape": list(shape)}, out_shape=shape))
            elif len(shape) != 4:
                raise EdgepruneError(f"{where}: a per-channel constant on a {len(shape)}-D "
                                     "tensor; only NCHW maps and (N, C) features are supported")
            continue
        offset = _constant_offset(target, node, constants, shape)
        if offset is not None:      # x + P: a positional embedding, a learnt bias map
            x, a, p = offset
            add_node(FNode("addconst", node.name, [src(x)], node.name,
                           {"sign": a, "const": p}, out_shape=shape))
            continue
        power = _number_function(target, node, static)
        if power is not None:       # x ** 2, 1 / x
            add_node(FNode("lut", node.name, [src(power[2])], node.name,
                           {"function": power[0], "param": power[1]}, out_shape=shape))
            continue
        affine = _scalar_affine(target, node, static)
        if affine is not None:      # x + 3, x * 0.5, 6 - x, x / 6: a table like an activation
            tensor = next(t for t in node.args[:2] if isinstance(t, fx.Node))
            product = by_out.get(src(tensor))
            if affine[0] > 0 and affine[1] == 0 and product is not None \
                    and product.kind in ("matmul", "mul") and product.act is None \
                    and users[product.output] == 1:
                # attention's (q k^T) * d ** -0.5: the factor joins the product's requantization
                # multiplier (a table after it had cost as much as the softmax's first pass)
                product.attrs["scale"] = product.attrs.get("scale", 1.0) * affine[0]
                alias[node.name] = product.output
                users[node.name] = users[product.output]
                continue
            add_node(FNode("lut", node.name, [src(tensor)], node.name,
                           {"function": "affine", "param": list(affine)}, out_shape=shape))
            continue
        if target in (operator.add, torch.add, "add", operator.sub, torch.sub, "sub"):
            a, b = node.args[0], node.args[1]
            subtract = target in (operator.sub, torch.sub, "sub")
            if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)) or node.kwargs.get("alpha"):
                raise EdgepruneError(f"{where}: only tensor {'-' if subtract else '+'} tensor "
                                     f"{'differences' if subtract else 'adds'} are supported")
            # a - b is the add a * 1 + b * (-1): the same op with the second multiplier negated
            add_node(FNode("add", node.name, [src(a), src(b)], node.name,
                           {"subtract": True} if subtract else {}, out_shape=shape))
            continue
        if target in (operator.matmul, torch.matmul, torch.bmm, "matmul", "bmm"):
            a, b = node.args[0], node.args[1]
            if not all(isinstance(t, fx.Node) and t.name not in static and t.name not in
                       constants for t in (a, b)):
                raise EdgepruneError(f"{where}: only a product of two activations is supported "
                                     "here (a constant matrix is a Linear)")
            if len(shape_of(a)) < 3 or shape_of(a)[:-2] != shape_of(b)[:-2]:
                raise EdgepruneError(f"{where}: matrices {shape_of(a)} @ {shape_of(b)}; only "
                                     "batches of the same leading shape (N, ..., T, D) are "
                                     "supported")
            add_node(FNode("matmul", node.name, [src(a), src(b)], node.name, out_shape=shape))
            continue
        extremum = {torch.maximum: "maximum", "maximum": "maximum", torch.minimum: "minimum",
                    "minimum": "minimum"}.get(target)
        if extremum or target in (torch.max, torch.min) and len(node.args) == 2 \
                and isinstance(node.args[1], fx.Node):   # torch.max(a, b): Max-Feature-Map
            a, b = node.args[0], node.args[1]
            if not all(isinstance(t, fx.Node) and t.name not in static for t in (a, b)) or \
                    tuple(shape_of(a)) != tuple(shape_of(b)):
                raise EdgepruneError(f"{where}: only an elementwise max/min of two tensors of "
                                     "one shape is supported")
            kind = extremum or ("maximum" if target is torch.max else "minimum")
            add_node(FNode(kind, node.name, [src(a), src(b)], node.name, out_shape=shape))
            continue
        if target in (operator.mul, torch.mul, "mul"):
            a, b = (list(node.args) + [node.kwargs.get("other")])[:2]
            if not all(isinstance(t, fx.Node) and t.name not in static for t in (a, b)):
                raise EdgepruneError(f"{where}: only tensor * tensor products are supported")
            if computed_shape(a) != tuple(shape):      # the full-size operand first
                a, b = b, a
            if computed_shape(a) != tuple(shape):
                raise EdgepruneError(f"{where}: neither operand has the product's shape "
                                     f"{tuple(shape)}")
            add_node(FNode("mul", node.name, [src(a), src(b)], node.name, out_shape=shape))
            continue
        if target is torch.stack:        # each piece with the new axis, then a concat
            parts, dim = node.args[0], arg(node, 1, "dim", 0) % len(shape)
            if dim == 0:
                raise EdgepruneError(f"{where}: stacking along the batch axis is not supported")
            one = tuple(shape[:dim]) + (1,) + tuple(shape[dim + 1:])
            pieces = [f"{node.name}_piece{k}" for k in range(len(parts))]
            for piece, t in zip(pieces, parts):
                add_node(FNode("reshape", piece, [src(t)], piece, {"shape": list(one)},
                               out_shape=one))
            add_node(FNode("concat", node.name, pieces, node.name,
                           {"axis": dim} if dim != 1 else {}, out_shape=shape))
            continue
        if target in (torch.cat, torch.concat):
            parts = node.kwargs.get("tensors", node.args[0] if node.args else None)
            dim = arg(node, 1, "dim", 0)
            if (not isinstance(parts, (list, tuple)) or not parts
                    or not all(isinstance(t, fx.Node) for t in parts)):
                raise EdgepruneError(f"{where}: only a concatenation of tensors is supported")
            if any(t.name in constants for t in parts):
                add_constant_rows(node, parts, dim % len(shape), shape, where)
                continue
            if dim % len(shape) == 0:
                raise EdgepruneError(f"{where}: concatenation along the batch axis is not "
                                     "supported")
            add_node(FNode("concat", node.name, [src(t) for t in parts], node.name,
                           {"axis": dim % len(shape)} if dim % len(shape) != 1 else {},
                           out_shape=shape))
            continue
        if target is zero_insert:   # a transposed conv's stride (edgeprune.layers)
            add_node(FNode("dilate", node.name, [src(node.args[0])], node.name,
                           {"strides": [int(arg(node, 1, "sh")), int(arg(node, 2, "sw"))]},
                           out_shape=shape))
            continue
        if isinstance(target, nn.Upsample) or target is F.interpolate:
            if isinstance(target, nn.Upsample):
                how = (target.mode, target.scale_factor, target.align_corners, False)
            else:
                how = (arg(node, 3, "mode", "nearest"), arg(node, 2, "scale_factor"),
                       arg(node, 4, "align_corners"), arg(node, 6, "antialias", False))
            attrs = resize_attrs(where, shape_of(node.args[0]), shape, *how)
            if attrs["mode"] == "nearest" and "factors" not in attrs:
                # the rows and columns torch reads: its own call on index ramps (its float
                # rounding of the scale decides them)
                h, w = shape_of(node.args[0])[2:]
                rest = fx.node.map_arg((node.args[1:], node.kwargs), lambda n: static[n.name])
                with torch.no_grad():
                    for axis, ramp in (("rows", torch.arange(h).view(1, 1, h, 1)),
                                       ("cols", torch.arange(w).view(1, 1, 1, w))):
                        out = target(ramp.expand(1, 1, h, w).float(), *rest[0], **rest[1])
                        attrs[axis] = [int(v) for v in (out[0, 0, :, 0] if axis == "rows"
                                                        else out[0, 0, 0, :])]
            add_node(FNode("upsample", node.name, [src(node.args[0])], node.name, attrs,
                           out_shape=shape))
            continue
        if isinstance(target, nn.MaxPool2d) or target is F.max_pool2d:
            if isinstance(target, nn.MaxPool2d):
                k, s, p, d, ceil = (target.kernel_size, target.stride, target.padding,
                                    target.dilation, target.ceil_mode)
            else:
                k = arg(node, 1, "kernel_size")
                s = arg(node, 2, "stride") or k
                p = arg(node, 3, "padding", 0)
                d = arg(node, 4, "dilation", 1)
                ceil = arg(node, 5, "ceil_mode", False)
            p = _pair(p)
            attrs = {"kernel": _pair(k), "strides": _pair(s if s is not None else k),
                     "padding": padding_of(node, [p[0], p[1], p[0], p[1]], "max"),
                     "dilation": _pair(d)}
            if ceil:   # the last window may hang off the end: pad the end with -inf to reach it
                _reach_last_window(unpadded_shape(node), shape, attrs)
            _check_pool_shape(where, unpadded_shape(node), shape, attrs, ceil)
            add_node(FNode("maxpool", node.name, [src(node.args[0])], node.name, attrs,
                           out_shape=shape))
            continue
        if isinstance(target, nn.AvgPool2d) or target is F.avg_pool2d:
            if isinstance(target, nn.AvgPool2d):
                k, s, p, ceil, include_pad, divisor = (
                    target.kernel_size, target.stride, target.padding, target.ceil_mode,
                    target.count_include_pad, target.divisor_override)
            else:
                k, s, p = arg(node, 1, "kernel_size"), arg(node, 2, "stride"), \
                    arg(node, 3, "padding", 0)
                ceil, include_pad = arg(node, 4, "ceil_mode", False), \
                    arg(node, 5, "count_include_pad", True)
                divisor = arg(node, 6, "divisor_override")
            p = _pair(p)
            attrs = {"kernel": _pair(k), "strides": _pair(s or k),
                     "padding": padding_of(node, [p[0], p[1], p[0], p[1]]), "dilation": [1, 1]}
            if divisor:   # divisor_override: every window's sum over it, padding or not
                attrs["divisor"], include_pad = int(divisor), True
            if any(p) and not include_pad:
                if attrs["padding"] != [p[0], p[1], p[0], p[1]]:
                    raise EdgepruneError(f"{where}: an explicit pad before a pool that does not "
                                         "count its own padding")
                attrs["count_include_pad"] = False
            if ceil and _reach_last_window(unpadded_shape(node), shape, attrs) and not divisor:
                # torch divides a window that hangs off the end by its taps inside the padded
                # image: padding that counts would count there but not beyond it
                if any(p) and include_pad:
                    raise EdgepruneError(f"{where}: ceil_mode with counted padding is not "
                                         "supported")
                attrs["count_include_pad"] = False
            _check_pool_shape(where, unpadded_shape(node), shape, attrs, ceil)
            add_node(FNode("avgpool", node.name, [src(node.args[0])], node.name, attrs,
                           out_shape=shape))
            continue
        adaptive = {nn.AdaptiveAvgPool2d: "avgpool", F.adaptive_avg_pool2d: "avgpool",
                    nn.AdaptiveMaxPool2d: "maxpool", F.adaptive_max_pool2d: "maxpool"}
        kind = adaptive.get(type(target) if isinstance(target, nn.Module) else target)
        if kind:
            if isinstance(target, nn.AdaptiveMaxPool2d) and target.return_indices:
                raise EdgepruneError(f"{where}: pooling that returns indices is not supported")
            ih, iw = shape_of(node.args[0])[2:]
            oh, ow = shape[2:]
            attrs = {"kernel": [ih // oh, iw // ow], "strides": [ih // oh, iw // ow],
                     "padding": [0, 0, 0, 0], "dilation": [1, 1]}
            if ih % oh or iw % ow:    # windows of several sizes: pooled as torch spells them
                attrs = {"kernel": [max(e - s for s, e in adaptive_windows(n, o))
                                    for n, o in ((ih, oh), (iw, ow))],
                         "strides": [1, 1], "padding": [0, 0, 0, 0], "output_size": [oh, ow]}
            add_node(FNode(kind, node.name, [src(node.args[0])], node.name, attrs,
                           out_shape=shape))
            continue
        values = max_values_of(node)        # torch.max(x, dim)[0]: an amax
        if values or target in (torch.mean, "mean", torch.amax, "amax", torch.amin, "amin",
                                torch.sum, "sum"):
            what = ("min" if is_min_values(node) else "max") if values else {
                torch.amax: "max", "amax": "max", torch.amin: "min", "amin": "min",
                torch.sum: "sum", "sum": "sum"}.get(target, "mean")
            source, dims = values or (node.args[0], arg(node, 1, "dim"))
            if dims is None or dims == ():
                raise EdgepruneError(f"{where}: a {what} over every axis is not supported")
            ishape = shape_of(source)
            nd = len(ishape)
            dims = sorted({d % nd for d in ((dims,) if isinstance(dims, int) else dims)})
            if dims == [3] and nd == 4 and ishape[2] == 1:
                dims = [2, 3]   # over time of a lifted 1-D signal: its height is 1
            if 0 in dims or nd < 2:
                raise EdgepruneError(f"{where}: a {what} over the batch axis is not supported")
            # a pool over (N, kept, 1, reduced): NCHW's H, W as they are; other axes (the T of
            # an (N, T, C) sequence) moved last first
            kept = [d for d in range(1, nd) if d not in dims]
            x, final = src(source), node.name
            if what == "min":   # -max(-x): the max pool between two negating tables
                add_node(FNode("lut", node.name + "_neg", [x], node.name + "_neg",
                               {"function": "affine", "param": [-1.0, 0.0]}, out_shape=ishape))
                x, final = node.name + "_neg", node.name + "_negmax"
            if kept + dims != list(range(1, nd)):
                perm = [0] + kept + dims
                add_node(FNode("transpose", node.name + "_t", [x], node.name + "_t",
                               {"perm": perm}, out_shape=tuple(ishape[d] for d in perm)))
                x = node.name + "_t"
            n, kc = ishape[0], int(np.prod([ishape[d] for d in kept]))
            window = [ishape[2], ishape[3]] if dims == [2, 3] and nd == 4 else \
                [1, int(np.prod([ishape[d] for d in dims]))]
            if dims != [2, 3] or nd != 4:
                add_node(FNode("reshape", node.name + "_4d", [x], node.name + "_4d",
                               {"shape": [n, kc, *window]}, out_shape=(n, kc, *window)))
                x = node.name + "_4d"
            attrs = {"kernel": window, "strides": window, "padding": [0, 0, 0, 0],
                     "dilation": [1, 1]}
            pooled = (n, kc, 1, 1)
            pname = final if tuple(shape) == pooled else node.name + "_pool"
            if what == "sum":     # the window's sum: the pool's requantization without 1/k
                attrs["divisor"] = 1
            add_node(FNode("maxpool" if what in ("max", "min") else "avgpool", pname,
                           [x], pname, attrs, out_shape=pooled))
            if pname != final:
                add_node(FNode("reshape", final, [pname], final,
                               {"shape": list(shape)}, out_shape=shape))
            if final != node.name:
                add_node(FNode("lut", node.name, [final], node.name,
                               {"function": "affine", "param": [-1.0, 0.0]}, out_shape=shape))
            continue
        pieces = slices_of(node)
        if pieces:     # x[:, 8:], x.narrow(1, 0, 8), x.chunk(2, 1)[0], x[:, -1], a crop
            x, kept = src(pieces[0].source), list(shape_of(pieces[0].source))
            drops = any(p.drops_axis for p in pieces)
            for k, piece in enumerate(pieces):      # one slice op per cut axis
                kept[piece.axis] = len(range(piece.start, piece.stop, piece.step))
                name = node.name if k == len(pieces) - 1 and not drops else \
                    f"{node.name}_keep{piece.axis}"
                add_node(FNode("slice", name, [x], name,
                               {"axis": piece.axis, "start": piece.start, "stop": piece.stop,
                                "step": piece.step}, out_shape=tuple(kept)))
                x = name
            if drops:
                add_node(FNode("reshape", node.name, [x], node.name,
                               {"shape": list(shape)}, out_shape=shape))
            continue
        adds_axes = target is operator.getitem and all(   # x[:, :, None, None]
            i is None or i == slice(None) for i in (node.args[1] if isinstance(
                node.args[1], tuple) else (node.args[1],)))
        if (isinstance(target, (nn.Flatten, nn.Unflatten)) or adds_axes
                or target in (torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze,
                              "flatten", "view", "reshape", "squeeze", "unsqueeze")):
            add_node(FNode("reshape", node.name, [src(node.args[0])], node.name,
                           {"shape": list(shape)}, out_shape=shape))
            continue
        if target in (torch.permute, "permute", torch.transpose, "transpose"):
            if target in (torch.transpose, "transpose"):   # two axes swapped (channel shuffle)
                perm = list(range(len(shape)))
                i, j = (int(arg(node, k, d)) % len(shape) for k, d in ((1, "dim0"), (2, "dim1")))
                perm[i], perm[j] = perm[j], perm[i]
            else:
                rest = node.args[1:] or (node.kwargs.get("dims"),)
                perm = rest[0] if len(rest) == 1 and isinstance(rest[0], (tuple, list)) else rest
                perm = [int(d) % len(shape) for d in perm]
            if perm[0] != 0:
                raise EdgepruneError(f"{where}: permute {perm} moves the batch axis")
            add_node(FNode("transpose", node.name, [src(node.args[0])], node.name,
                           {"perm": perm}, out_shape=shape))
            continue
        raise _unsupported(where)
    else:
        raise EdgepruneError("traced graph has no output")
    if not nodes:
        raise EdgepruneError("the model has no ops to quantize")
    if len(finals) == 1 and finals[0] != nodes[-1].output:
        raise EdgepruneError(f"the model output '{finals[0]}' is not the last op's output")
    for k, f in enumerate(finals):
        if f not in by_out or f in finals[:k]:
            raise EdgepruneError(f"model output {k} ('{f}') is "
                                 f"{'the input' if f == INPUT else 'an earlier output'} "
                                 "itself, not an op's result")
    return IRNet(nodes, input_shape, weights, biases, finals)


def resize_attrs(where: str, ishape, oshape, mode: str, scale_factor, align_corners,
                 antialias: bool) -> dict:
    """The `upsample` op's attrs for torch's resizing of an NCHW tensor from ishape to oshape:
    nearest by whole factors (every value repeated), or bilinear to any size.  A bilinear
    scale_factor must give the output size exactly: torch then samples at the same
    coordinates as with that size."""
    if len(ishape) != 4 or len(oshape) != 4:
        raise EdgepruneError(f"{where}: resizing {list(ishape)} to {list(oshape)}: only NCHW "
                             "tensors (or 1-D signals) are supported")
    if mode in ("nearest", "nearest-exact"):   # both repeat values at whole factors
        if any(o % i for i, o in zip(ishape[2:], oshape[2:])):
            return {"mode": "nearest"}    # to any size: the caller finds the rows and columns
        return {"mode": "nearest", "factors": [oshape[2] // ishape[2], oshape[3] // ishape[3]]}
    if mode != "bilinear":
        raise EdgepruneError(f"{where}: resizing mode '{mode}' is not supported; only "
                             "'nearest' by whole factors and 'bilinear'")
    if antialias:
        raise EdgepruneError(f"{where}: bilinear resizing with antialias is not supported")
    factors = [scale_factor] * 2 if isinstance(scale_factor, (int, float)) else scale_factor
    if factors is not None and not align_corners and any(
            abs(i * float(f) - o) > 1e-9 for i, o, f in zip(ishape[2:], oshape[2:], factors)):
        raise EdgepruneError(f"{where}: bilinear scale factors {list(factors)} do not give the "
                             f"output size {list(oshape[2:])} of input {list(ishape[2:])} "
                             "exactly; give the size instead")
    return {"mode": "bilinear", "align_corners": bool(align_corners),
            "size": [int(oshape[2]), int(oshape[3])]}


def _reach_last_window(ishape, oshape, attrs) -> bool:
    """Grow the end padding of a ceil_mode pool's attrs until floor-mode windows give the
    output size torch gave (its last window may start inside the image and end past it).
    Returns whether any padding was added."""
    grown = False
    for axis in (0, 1):
        size, out = ishape[2 + axis], oshape[2 + axis]
        k, s, d = attrs["kernel"][axis], attrs["strides"][axis], attrs["dilation"][axis]
        need = (out - 1) * s + (k - 1) * d + 1 - size - attrs["padding"][axis]
        if need > attrs["padding"][2 + axis]:
            attrs["padding"][2 + axis], grown = need, True
    return grown


def _check_pool_shape(where, ishape, oshape, attrs, ceil):
    from .qmodel import conv_out_hw
    if tuple(conv_out_hw(ishape[2], ishape[3], attrs["kernel"], attrs["strides"],
                         attrs["padding"], attrs["dilation"])) != tuple(oshape[2:]):
        raise EdgepruneError(f"{where}: pooling with ceil_mode={ceil} gives {tuple(oshape)} from "
                             f"{tuple(ishape)}; only floor-mode windows are supported")


# --- calibration ------------------------------------------------------------------------
def calibrate(net: IRNet, x: np.ndarray, method: str = "minmax", percentile: float = 99.99,
              batch_size: int = 100, max_keep: int = 200_000, seed: int = 0
              ) -> dict[str, tuple[float, float]]:
    """Float range (lo, hi) of the input and every node output over the calibration images.

    "minmax" takes the extremes; "percentile" takes the (100-p, p) percentiles of a random
    subsample of each tensor's values (clips rare outliers, which matters for 8-bit and less).
    """
    if method not in ("minmax", "percentile"):
        raise EdgepruneError(f"calibration method '{method}' unknown (minmax, percentile)")
    if len(x) == 0:
        raise EdgepruneError("calibration needs at least one sample")
    rng = np.random.default_rng(seed)
    lo: dict[str, float] = {}
    hi: dict[str, float] = {}
    keep: dict[str, list[np.ndarray]] = {}
    saved, net.qconfig = net.qconfig, None
    net.eval()
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            rec: dict[str, torch.Tensor] = {}
            net(torch.from_numpy(np.ascontiguousarray(x[i:i + batch_size], np.float32)), rec)
            for k, v in rec.items():
                v = v.numpy().ravel()
                lo[k] = min(lo.get(k, np.inf), float(v.min()))
                hi[k] = max(hi.get(k, -np.inf), float(v.max()))
                if method == "percentile":
                    take = min(v.size, max(1, max_keep * batch_size // max(1, len(x))))
                    keep.setdefault(k, []).append(rng.choice(v, take, replace=False))
    net.qconfig = saved
    if method == "minmax":
        return _concat_shared(net, _tied(net, {k: (lo[k], hi[k]) for k in lo}))
    out = {}
    for k, parts in keep.items():
        v = np.concatenate(parts)
        out[k] = (float(np.percentile(v, 100 - percentile)), float(np.percentile(v, percentile)))
        if k == INPUT:
            out[k] = (lo[k], hi[k])   # inputs are bounded data: never clip them
    return _concat_shared(net, _tied(net, out))


def _concat_shared(net: IRNet, ranges: dict[str, tuple[float, float]]
                   ) -> dict[str, tuple[float, float]]:
    """`ranges` with a concatenation's pieces and output in one range, the union of theirs,
    where the C library can write the pieces into their places in its output, with no concat
    kernel and no copy (`lower._concats_as_views`): each piece's op then writes in the
    concatenation's scale. TFLite's int8 spec asks the same. A piece with a narrower range
    than the others gets coarser steps, so only where the pieces lie one after another in the
    output (every axis before the concatenated one is 1: channels at batch 1), none is the
    model's input or appears twice, and the output is not the model's."""
    def in_place(n: FNode) -> bool:
        shape = n.out_shape
        axis = n.attrs.get("axis", 1) % len(shape) if shape else 0
        return (bool(shape) and math.prod(shape[:axis]) == 1 and n.output not in net.outputs
                and INPUT not in n.inputs and len(set(n.inputs)) == len(n.inputs))
    parent: dict[str, str] = {}
    for n in net.nodes:
        if (n.kind == "concat" and in_place(n)
                and all(t in ranges for t in [*n.inputs, n.output])):
            for t in n.inputs:
                a, b = _root(parent, t), _root(parent, n.output)
                if a != b:
                    parent[a] = b
    return _group_ranges(ranges, parent)


def _tied(net: IRNet, ranges: dict[str, tuple[float, float]]) -> dict[str, tuple[float, float]]:
    """`ranges` with the tensors that play one role at every call of a shared layer (a
    recurrent layer's steps, siamese branches) given one range, the union of theirs: their
    ops then have the same integer constants, and the C library runs one kernel for all steps
    instead of one per step. The roles: the inputs and the outputs of the calls of one set of
    weights; the outputs of ops of one kind and attributes whose inputs play one role; and a
    state carried from step to step (an LSTM's cell), the one input in which two such ops
    differ when all they read else plays a shared role."""
    parent: dict[str, str] = {}

    def find(t: str) -> str:
        return _root(parent, t)

    def union(a: str, b: str) -> bool:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[rb] = ra
        return ra != rb
    calls: dict[tuple, FNode] = {}
    for n in net.weight_nodes():
        key = (id(net.weight[n.name]), id(net.bias[n.name]) if n.name in net.bias else None)
        if key in calls:
            union(calls[key].inputs[0], n.inputs[0])
            union(calls[key].output, n.output)
        else:
            calls[key] = n
    if not parent:
        return ranges
    kinds = {}
    for n in net.nodes:
        try:
            kinds[n.output] = (n.kind, repr(sorted(n.attrs.items())), n.act, tuple(n.out_shape))
        except TypeError:
            continue
    changed = True
    while changed:
        changed, seen, alike = False, {}, {}
        for n in net.nodes:           # same op on inputs of the same roles: the same role
            if n.output not in kinds:
                continue
            key = (kinds[n.output], tuple(find(i) for i in n.inputs))
            if key in seen:
                changed = union(seen[key], n.output) or changed
            else:
                seen[key] = n.output
            alike.setdefault((kinds[n.output], len(n.inputs)), []).append(n)
        sizes: dict[str, int] = {}
        for t in list(parent):
            sizes[find(t)] = sizes.get(find(t), 0) + 1
        for group in alike.values():  # a state carried from step to step (an LSTM's cell):
            first = group[0]          # the same op, all else in shared roles, but one input
            for n in group[1:]:
                differ = [k for k, (a, b) in enumerate(zip(first.inputs, n.inputs))
                          if find(a) != find(b)]
                if len(differ) == 1 and all(sizes.get(find(a), 1) > 1 for k, a in
                                            enumerate(n.inputs) if k != differ[0]):
                    changed = union(first.inputs[differ[0]], n.inputs[differ[0]]) or changed
    return _group_ranges(ranges, parent)


def _root(parent: dict[str, str], t: str) -> str:
    """The group of tensor `t` in a union-find forest (`parent`: tensor -> one of its group)."""
    while parent.get(t, t) != t:
        t = parent[t]
    return t


def _group_ranges(ranges: dict[str, tuple[float, float]], parent: dict[str, str]
                  ) -> dict[str, tuple[float, float]]:
    """`ranges` with every group of `parent` given one range, the union of its members'."""
    members: dict[str, list[str]] = {}
    for t in ranges:
        members.setdefault(_root(parent, t), []).append(t)
    grouped = dict(ranges)
    for group in members.values():
        lo, hi = min(ranges[t][0] for t in group), max(ranges[t][1] for t in group)
        for t in group:
            grouped[t] = (lo, hi)
    return grouped


def act_qparams(lo: float, hi: float, dtype: str = "int8") -> tuple[float, int]:
    """(scale, zero point): asymmetric for int8 (range widened to include 0), symmetric int16."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    qmin, qmax = DTYPE_RANGE[dtype]
    if dtype == "int16":
        m = max(abs(lo), abs(hi))
        return (m / qmax if m > 0 else 1.0), 0
    if hi - lo <= 0:
        return 1.0, 0
    scale = (hi - lo) / (qmax - qmin)
    zp = int(np.clip(np.round(qmin - lo / scale), qmin, qmax))
    return float(scale), zp


def qconfig_for(net: IRNet, ranges: dict[str, tuple[float, float]],
                act_dtypes: dict[str, str] | None = None, weight_bits: int | None = 8) -> dict:
    """Fake-quant settings (for QAT) that mirror `to_qmodel`'s choices."""
    act_dtypes = act_dtypes or {}
    act = {}
    params = {INPUT: act_qparams(*ranges[INPUT], act_dtypes.get(INPUT, "int8"))}
    dt = {INPUT: act_dtypes.get(INPUT, "int8")}
    for n in net.nodes:
        if n.kind in SAME_QPARAMS:
            params[n.output], dt[n.output] = params[n.inputs[0]], dt[n.inputs[0]]
        elif n.kind == "softmax":
            params[n.output], dt[n.output] = (1 / 256, -128), "int8"
        elif n.kind == "log_softmax":
            params[n.output], dt[n.output] = LOG_SOFTMAX_OUT, "int8"
        else:
            dt[n.output] = act_dtypes.get(n.output, "int8")
            params[n.output] = act_qparams(*ranges[n.output], dt[n.output])
    for k, (s, zp) in params.items():
        qmin, qmax = DTYPE_RANGE[dt[k]]
        act[k] = (s, zp, qmin, qmax)
    wb = {} if weight_bits is None else {n.name: weight_bits for n in net.weight_nodes()}
    return {"act": act, "weight_bits": wb}


# --- export -----------------------------------------------------------------------------
def to_qmodel(net: IRNet, ranges: dict[str, tuple[float, float]],
              weight_cfg: dict[str, tuple[str, int]] | None = None,
              act_dtypes: dict[str, str] | None = None,
              quantized_weights: dict[str, tuple[np.ndarray, np.ndarray]] | None = None,
              meta: dict | None = None) -> QuantModel:
    """Integer model from the float graph and calibrated ranges.

    weight_cfg: node -> (format, bits), default ("int", 8).  act_dtypes: tensor -> "int8" |
    "int16" (default int8).  quantized_weights: node -> (Q int8, scale (O,)) already chosen
    (ADMM), used instead of quantizing the float weights.
    """
    weight_cfg = weight_cfg or {}
    act_dtypes = act_dtypes or {}
    quantized_weights = quantized_weights or {}
    tensors: dict[str, TensorInfo] = {}
    s, zp = act_qparams(*ranges[INPUT], act_dtypes.get(INPUT, "int8"))
    tensors[INPUT] = TensorInfo(INPUT, list(net.input_shape), act_dtypes.get(INPUT, "int8"), s, zp)
    ops: list[Op] = []
    params: dict[str, np.ndarray] = {}
    for n in net.nodes:
        tin = tensors[n.inputs[0]]
        if n.kind in SAME_QPARAMS:
            out = TensorInfo(n.output, list(n.out_shape), tin.dtype, tin.scale, tin.zero_point)
        elif n.kind == "softmax":   # probabilities: a fixed [0, 1) grid of 256 steps
            out = TensorInfo(n.output, list(n.out_shape), "int8", 1 / 256, -128)
        elif n.kind == "log_softmax":   # log-probabilities: a fixed grid of 1/16 down to -15.94
            out = TensorInfo(n.output, list(n.out_shape), "int8", *LOG_SOFTMAX_OUT)
        else:
            if n.output not in ranges:
                raise EdgepruneError(f"no calibration range for '{n.output}'")
            dt = act_dtypes.get(n.output, "int8")
            s, zp = act_qparams(*ranges[n.output], dt)
            out = TensorInfo(n.output, list(n.out_shape), dt, s, zp)
        tensors[n.output] = out
        attrs = dict(n.attrs)
        if n.kind in ("conv2d", "dense", "add", "mul", "matmul", "concat", "maximum", "minimum",
                      "avgpool"):
            flo, fhi = _act_range(n.act)
            lo = out.qmin if not np.isfinite(flo) else max(out.qmin, out.zero_point +
                                                           int(np.floor(flo / out.scale + 0.5)))
            hi = out.qmax if not np.isfinite(fhi) else min(out.qmax, out.zero_point +
                                                           int(np.floor(fhi / out.scale + 0.5)))
            attrs["clamp"] = [int(lo), int(max(lo, hi))]
            attrs["activation"] = None if n.act is None else n.act[0]
        if n.kind in ("conv2d", "dense"):
            fmt, bits = weight_cfg.get(n.name, ("int", 8))
            w = net.weight[n.name].detach().double().numpy()
            b = net.bias[n.name].detach().double().numpy()
            if n.name in quantized_weights:
                q, a = quantized_weights[n.name]
            else:
                q, a = quantize_weights(w, fmt, bits)
            a = np.asarray(a, np.float64)
            eff = tin.scale * a
            bias = _saturate_bias(np.round(b / eff), np.asarray(q), tin, n.name)
            m, sh = quantize_multipliers(eff / out.scale)
            attrs.update({"weight_bits": int(bits), "weight_format": fmt})
            params.update({f"{n.name}.weight": np.asarray(q, np.int8),
                           f"{n.name}.weight_scale": a.astype(np.float32),
                           f"{n.name}.bias": bias, f"{n.name}.multiplier": m,
                           f"{n.name}.shift": sh})
        elif n.kind == "add":
            ta, tb = tensors[n.inputs[0]], tensors[n.inputs[1]]
            ms, st = shared_shift_multipliers([ta.scale / out.scale, tb.scale / out.scale])
            if n.attrs.get("subtract"):
                ms[1] = -ms[1]
            attrs.update({"multipliers": ms, "shift_total": int(st)})
        elif n.kind in ("mul", "matmul"):
            m, sh = quantize_multiplier(tin.scale * tensors[n.inputs[1]].scale
                                        * attrs.pop("scale", 1.0) / out.scale)
            attrs.update({"multiplier": int(m), "shift": int(sh)})
        elif n.kind == "lut":
            if tin.dtype != "int8":
                raise EdgepruneError(f"op '{n.name}' ({n.attrs['function']}): a table needs an "
                                     f"int8 input, '{tin.name}' is {tin.dtype}")
            q = torch.arange(tin.qmin, tin.qmax + 1, dtype=torch.float64)
            with torch.no_grad():
                real = lut_apply(n.attrs, (q - tin.zero_point) * tin.scale).numpy()
            real = np.nan_to_num(real)    # sqrt, log of grid values below the data's range
            with np.errstate(over="ignore"):   # a pole past the data's range: clipped
                table = np.clip(np.floor(real / out.scale + 0.5) + out.zero_point, out.qmin,
                                out.qmax)
            params[f"{n.name}.table"] = table.astype(out.dtype)
            if attrs["function"] == "region":   # the code, for reading (the table is the op)
                attrs["param"] = attrs["param"].code.strip()
        elif n.kind in ("softmax", "log_softmax"):
            if tin.dtype != "int8":
                raise EdgepruneError(f"op '{n.name}' ({n.kind}): needs an int8 input, "
                                     f"'{tin.name}' is {tin.dtype}")
            d = np.arange(-255, 1, dtype=np.float64)
            params[f"{n.name}.table"] = np.round(65536 * np.exp(tin.scale * d)).astype(np.int32)
            if "keep" in attrs:   # a masked softmax: the keys it keeps (1) and removes (0)
                params[f"{n.name}.keep"] = attrs.pop("keep").numpy().astype(np.int8)
            if n.kind == "log_softmax":
                f = (np.arange(256) + 0.5) / 256
                params[f"{n.name}.log2_table"] = np.round(65536 * np.log2(1 + f)).astype(np.int32)
                attrs.update({"multiplier": int(round(tin.scale / out.scale * 2 ** 28)),
                              "ln2": int(round(np.log(2) / out.scale * 2 ** 12))})
        elif n.kind == "prelu":
            # y = x for x >= 0, slope_c * x below: a requantization for each side (the slope's
            # sign in the multiplier)
            m, sh = quantize_multiplier(tin.scale / out.scale)
            slopes = np.asarray(attrs.pop("slopes"), np.float64)
            ms, shs = quantize_multipliers(np.abs(slopes) * tin.scale / out.scale)
            attrs.update({"multiplier": int(m), "shift": int(sh),
                          "clamp": [out.qmin, out.qmax]})
            params.update({f"{n.name}.multiplier": (np.sign(slopes) * ms).astype(np.int32),
                           f"{n.name}.shift": shs})
        elif n.kind == "addconst":
            # sign * x requantized, then the constant added in output steps
            m, sh = quantize_multiplier(tin.scale / out.scale)
            const = attrs.pop("const").numpy()
            attrs.update({"multiplier": int(attrs.pop("sign")) * int(m), "shift": int(sh),
                          "clamp": [out.qmin, out.qmax]})
            params[f"{n.name}.bias"] = np.round(const / out.scale).clip(
                -2 ** 31, 2 ** 31 - 1).astype(np.int32)
        elif n.kind == "layernorm":
            # reference.run_op: n = (x - mean) / std in fixed point with LAYERNORM_FRAC_BITS,
            # then gamma_c * n requantized per channel and beta_c added in output steps
            c = tin.shape[-1]
            if c ** 3 * (tin.qmax - tin.qmin) ** 2 >= 2 ** 62:    # sum(e ** 2) in int64
                raise EdgepruneError(f"op '{n.name}': a {tin.dtype} normalization over {c} "
                                     "values can overflow its 64-bit sums; use int8 for "
                                     f"'{tin.name}'")
            gamma = np.asarray(attrs.pop("gamma"), np.float64)
            beta = np.asarray(attrs.pop("beta"), np.float64)
            ms, shs = quantize_multipliers(np.abs(gamma) / (out.scale * 2 ** LAYERNORM_FRAC_BITS))
            eps_steps = attrs.pop("eps") * c * c / tin.scale ** 2
            attrs.update({"eps_steps": int(min(round(eps_steps), 2 ** 40)),
                          "clamp": [out.qmin, out.qmax]})
            params.update({f"{n.name}.multiplier": (np.sign(gamma) * ms).astype(np.int32),
                           f"{n.name}.shift": shs,
                           f"{n.name}.bias": np.round(beta / out.scale).astype(np.int32)})
        elif n.kind in ("concat", "maximum", "minimum"):
            pairs = [quantize_multiplier(tensors[i].scale / out.scale) for i in n.inputs]
            attrs.update({"multipliers": [int(m) for m, _ in pairs],
                          "shifts": [int(sh) for _, sh in pairs]})
        elif n.kind == "avgpool" and attrs.get("count_include_pad", True) and \
                "output_size" not in attrs:
            k = attrs.pop("divisor", attrs["kernel"][0] * attrs["kernel"][1])
            m, sh = quantize_multiplier(tin.scale / (out.scale * k))
            attrs.update({"multiplier": int(m), "shift": int(sh)})
        elif n.kind == "avgpool":     # a divisor per output position
            counts = window_counts(*tin.shape[2:], attrs)
            # one shift for every position: the kernel keeps it a literal and stores an int32
            # M per position (to_relax._requant_by_position)
            ms, s = shared_shift_multipliers(list(tin.scale / (out.scale * counts.ravel())))
            params.update({f"{n.name}.multiplier": np.reshape(ms, counts.shape).astype(np.int64),
                           f"{n.name}.shift": np.full(counts.shape, 31 - s, np.int64)})
        ops.append(Op(n.kind, n.name, list(n.inputs), n.output, attrs))
    qm = QuantModel(INPUT, net.output, tensors, ops, params, dict(meta or {}),
                    net.outputs[1:])
    qm.meta.setdefault("float_ranges", {k: [float(v[0]), float(v[1])] for k, v in ranges.items()})
    from .qmodel import validate
    validate(qm)
    return qm


def _saturate_bias(bias: np.ndarray, q: np.ndarray, tin: TensorInfo, name: str) -> np.ndarray:
    """int32 bias limited so that bias + the worst-case product sum still fits int32.

    Only degenerate layers hit this (a bias millions of times larger than the products, e.g.
    an untrained head after a near-constant feature map); the clipped part is then far below
    one output step, since the output scale is set by that huge bias.
    """
    xmax = max(tin.qmax - tin.zero_point, tin.zero_point - tin.qmin)
    room = INT32_MAX - xmax * np.abs(q.astype(np.int64).reshape(q.shape[0], -1)).sum(1)
    if np.any(room < 0):
        raise EdgepruneError(f"op '{name}': weights alone can overflow the int32 accumulator")
    return np.clip(bias, -room, room).astype(np.int32)


def quantize_ptq(model: nn.Module, input_shape: tuple[int, ...], calib_x: np.ndarray,
                 calib_method: str = "minmax", percentile: float = 99.99,
                 weight_cfg: dict[str, tuple[str, int]] | None = None,
                 act_dtypes: dict[str, str] | None = None) -> QuantModel:
    """The whole PTQ flow in one call (extract, calibrate, export)."""
    net = extract(model, input_shape)
    ranges = calibrate(net, calib_x, calib_method, percentile)
    return to_qmodel(net, ranges, weight_cfg, act_dtypes,
                     meta={"method": "ptq", "calibration": calib_method,
                           "calibration_samples": int(len(calib_x))})
