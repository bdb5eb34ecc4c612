"""Channel dependency analysis on a torch.fx trace: which channels must be pruned together.

Why channel ids and not layers: a residual add ties channel j of one branch to channel j of the
other, a concat places two layers' channels side by side, a depthwise conv passes channel j
through untouched and flatten turns channel j into H*W consecutive features (or, after a
permute to channels-last as Keras models exported to ONNX do, into every C-th). Tracking every
tensor's channel dimension as a list of *channel ids* (one id per channel a Conv2d/Linear
produces) and merging ids that an elementwise op combines handles all of these with one rule.

* a **unit** is a set of merged channel ids: it is removed as a whole (e.g. stem channel 3 and
  the channel 3 of every residual branch added to it; a depthwise conv's input channel and the
  outputs its multiplier makes of it);
* a **group** is the set of units that share producer layers (the units of one conv, or of all
  convs tied by residual adds); criteria score the units of a group, allocation decides how many
  of them to keep;
* units that reach the graph output or come from the graph input, or pass through a layer whose
  channels cannot change (a grouped conv that other ties would leave with uneven groups,
  constant operands), are frozen.

The graph is built once per model; `surgery` then removes units physically (new, smaller
Conv2d/BatchNorm2d/Linear modules), never by masking.
"""

from __future__ import annotations

import bisect
import copy
import operator
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ..errors import EdgepruneError
from ..layers import zero_insert
from ..slicing import (ShapeAndSizeProp, Slice, is_split, max_values_of, returns_indices,
                       slices_of)

STAGE = "prune"

# Modules that act on each channel separately: channel layout passes through unchanged.
PASSTHROUGH_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.Sigmoid, nn.Tanh, nn.Hardtanh, nn.Hardswish,
    nn.Hardsigmoid, nn.SiLU, nn.GELU, nn.ELU, nn.Mish, nn.Identity, nn.Dropout, nn.Dropout2d,
    nn.SELU, nn.CELU, nn.Softplus, nn.Softsign, nn.LogSigmoid, nn.Tanhshrink, nn.Hardshrink,
    nn.Softshrink, nn.Dropout1d, nn.AlphaDropout, nn.MaxPool2d, nn.AvgPool2d,
    nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.ZeroPad2d, nn.ConstantPad2d, nn.Upsample,
    nn.ReflectionPad2d, nn.ReplicationPad2d, nn.CircularPad2d, nn.Threshold,
)
# ... of those, the ones that work on the H, W axes of NCHW (not on channels-last tensors)
SPATIAL_MODULES = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d,
                   nn.ZeroPad2d, nn.ConstantPad2d, nn.Upsample, nn.ReflectionPad2d,
                   nn.ReplicationPad2d, nn.CircularPad2d)
SPATIAL_FUNCTIONS = {F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d,
                     F.interpolate, zero_insert}
PASSTHROUGH_FUNCTIONS = {
    F.relu, F.relu6, F.leaky_relu, F.hardtanh, F.hardswish, F.hardsigmoid, F.silu, F.gelu,
    F.elu, F.sigmoid, F.tanh, F.dropout, F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d,
    F.adaptive_max_pool2d, torch.relu, torch.sigmoid, torch.tanh, torch.clamp, torch.clip,
    torch.erf, F.selu, torch.selu, F.celu, F.softplus, F.softsign, F.logsigmoid, F.tanhshrink,
    F.hardshrink, F.softshrink, torch.abs, torch.exp, operator.neg, torch.neg, F.interpolate,
    zero_insert, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, torch.sqrt,
    torch.rsqrt, torch.reciprocal, torch.square, torch.sign, torch.log,
    torch.sin, torch.cos, F.mish, F.threshold, torch.log1p, torch.expm1, torch.log2,
    torch.log10, torch.atan, torch.tan, torch.sinh, torch.cosh, torch.logical_not,
    operator.invert, torch.floor, torch.ceil, torch.round, torch.trunc, torch.clone,
}
PASSTHROUGH_METHODS = {"relu", "relu_", "sigmoid", "tanh", "clamp", "clip", "contiguous",
                       "clamp_", "float", "detach", "abs", "exp", "erf", "neg", "sqrt",
                       "rsqrt", "reciprocal", "square", "sign", "log", "sin", "cos", "to",
                       "type_as", "bool", "logical_not", "log1p", "expm1", "floor", "ceil",
                       "round", "trunc", "clone"}
# elementwise comparisons and logic (the masks of a hand-written activation's torch.where)
COMPARE_FUNCTIONS = {operator.gt, operator.lt, operator.ge, operator.le, operator.eq,
                     operator.ne, torch.gt, torch.lt, torch.ge, torch.le, torch.eq, torch.ne,
                     operator.and_, operator.or_, torch.logical_and, torch.logical_or}
BINARY_FUNCTIONS = {operator.add, operator.iadd, operator.sub, operator.mul, operator.truediv,
                    torch.add, torch.sub, torch.mul, torch.div, torch.maximum, torch.minimum,
                    operator.pow, torch.pow, *COMPARE_FUNCTIONS}
BINARY_METHODS = {"add", "add_", "sub", "mul", "mul_", "div", "maximum", "minimum", "pow",
                  "gt", "lt", "ge", "le", "eq", "ne", "logical_and", "logical_or"}
CAT_FUNCTIONS = {torch.cat, torch.concat}
FLATTEN_FUNCTIONS = {torch.flatten}
RESHAPE_FUNCTIONS = {torch.reshape}
# what attention's keys may pass between their transpose and q @ k^T
SCALE_TARGETS = {operator.mul, operator.truediv, torch.mul, torch.div, "mul", "div"}
UNIT_AXIS_TARGETS = {torch.reshape, torch.squeeze, torch.unsqueeze, "view", "reshape", "squeeze",
                     "unsqueeze"}
# over spatial axes: channels pass
MEAN_FUNCTIONS = {torch.mean, torch.amax, torch.amin, torch.sum}
SOFTMAX_FUNCTIONS = {torch.softmax, F.softmax, torch.log_softmax, F.log_softmax}


class GraphError(EdgepruneError):
    def __init__(self, message: str):
        super().__init__(message, stage=STAGE)


class NothingToPrune(GraphError):
    """Every channel reaches the input or the output (or a layer that keeps them all)."""


@dataclass(frozen=True)
class Layout:
    """The channel ids along a tensor's channel dimension; `repeat` > 1 after flatten
    (each channel became `repeat` features). `channels_last`: the channels are the last axis
    (after a permute), so flatten interleaves them: feature s * C + i is channel i."""
    ids: tuple[int, ...]
    repeat: int = 1
    channels_last: bool = False

    def positions(self) -> list[tuple[int, int]]:
        """(feature position, channel id) for every feature of the channel dimension, in
        ascending position."""
        if self.channels_last:
            n = len(self.ids)
            return [(r * n + i, cid) for r in range(self.repeat) for i, cid in enumerate(self.ids)]
        return [(i * self.repeat + r, cid) for i, cid in enumerate(self.ids)
                for r in range(self.repeat)]

    @property
    def unflattened_last(self) -> bool:
        """Channels on the last axis of a tensor that still has its spatial axes."""
        return self.channels_last and self.repeat == 1


CONST = "const"  # marker layout for get_attr constants


@dataclass(frozen=True)
class Transposed:
    """A channels-last tensor with its channels moved to the second-to-last axis (attention's
    keys, k.transpose(-2, -1)): only a product that contracts those channels (q @ k^T) may read
    it."""
    layout: Layout


@dataclass(frozen=True)
class Inner:
    """Channels moved by a permute to an inner axis `axis`, every reader of which merges them
    with the axes after it (a CRNN's conv maps (N, C, F, T) made frames (N, T, C * F)): channel
    c becomes features c * S .. c * S + S - 1 of the last axis."""
    layout: Layout
    axis: int


@dataclass(frozen=True)
class Grouped:
    """Maps' channels split into groups, (N, C, ...) -> (N, G, C / G, ...), as a channel
    shuffle writes it, channel j of every group one unit; `swapped`: the two group axes
    transposed. Only that transpose and the reshape back (_shuffles) read it."""
    layout: Layout      # the channels before the split, in order
    groups: int
    swapped: bool = False


@dataclass
class Layer:
    """A module that pruning may resize, with the channel layout it reads and writes."""
    name: str
    kind: str  # "conv" | "gconv" | "groupwise" | "dwconv" | "frozen" | "bn" | "gn" | "prelu" | "ln"
    #            | "linear"
    module: nn.Module
    node: str
    in_layout: Layout | None
    out_layout: Layout | None


@dataclass
class Member:
    """One place a group's units live: `positions[u]` are the indices of unit u along
    `dim` of module `layer` ("out": weight rows of a conv/linear, "bn"/"dw": per-channel
    params, "in": input columns of a dense conv/linear)."""
    layer: str
    role: str
    positions: list[list[int]]


@dataclass
class Group:
    index: int
    name: str
    units: int
    members: list[Member] = field(default_factory=list)

    def by_role(self, role: str) -> list[Member]:
        return [m for m in self.members if m.role == role]

    @property
    def layers(self) -> list[str]:
        """Producer layers (the convs/linears whose filters the group's units are)."""
        return [m.layer for m in self.members if m.role == "out"]

    def makers(self) -> list[tuple[bool, ...]]:
        """Per unit, which producer layers make it (in by_role("out") order): the same ones
        for every unit, except where branches are concatenated or a shuffle ties them."""
        members = self.by_role("out")
        return [tuple(bool(m.positions[u]) for m in members) for u in range(self.units)]


class DepGraph:
    """Dependency groups of a model at a static input shape. Build once, query many times."""

    def __init__(self, model: nn.Module, example_input: torch.Tensor):
        self.model = model
        self.example_input = example_input
        try:
            self.gm = fx.symbolic_trace(model)
        except Exception as e:
            raise GraphError(f"the model does not trace with torch.fx ({type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else ''}); data-dependent "
                             "control flow in forward() cannot be pruned structurally") from None
        try:
            with torch.no_grad():
                was = model.training
                self.gm.eval()
                ShapeAndSizeProp(self.gm).propagate(example_input)
                model.train(was)
        except Exception as e:
            raise GraphError(f"the traced model fails on an input of shape "
                             f"{tuple(example_input.shape)}: {type(e).__name__}: {e}") from None
        try:
            self._analyse(fine=True)
        except GraphError:
            # the finer reading left channels prunable that the walk cannot follow further
            # (a (N, C) -> (N, 1, C) that a conv reads as a map): those channels are kept, as
            # the coarse reading keeps them
            self._analyse(fine=False)
        self._build_groups()

    def _analyse(self, fine: bool) -> None:
        """Walk the graph from scratch, tying channels into units. `fine`: per-channel
        constants are cut with their channels (else they keep them), and (N, C) -> (N, 1, C)
        is a frame of a sequence (else a map of one channel)."""
        self._fine = fine
        self._sizes: list[int] = []        # channels per space
        self._space_frozen: list[bool] = []
        self._space_layer: list[str | None] = []
        self._parent: list[int] = []
        self._frozen_ids: set[int] = set()
        self._space_start: list[int] = []
        self.layers: dict[str, Layer] = {}
        self.layouts: dict[str, object] = {}
        self.flatten_nodes: list[str] = []
        # reshapes of the axes after the channels ((N, C) -> (N, C, 1, 1), (N, C, H, W) ->
        # (N, C, H * W)): node -> (channel layout, the new trailing axes)
        self.expand_nodes: dict[str, tuple[Layout, tuple[int, ...]]] = {}
        # contiguous pieces of the channels (x[:, 4:], a chunk's or split's piece, narrow):
        # node -> (the sliced tensor's layout, the piece), rewritten to the channels kept
        self.channel_slices: dict[str, tuple[Layout, Slice]] = {}
        # constant channels padded around a tensor's (CIFAR ResNet's "option A" shortcut):
        # node -> (the channels before, those after), the pad rewritten to the ones kept
        self.channel_pads: dict[str, tuple[Layout, Layout]] = {}
        # attention's heads split ((N, T, C) -> (N, T, h, d)) or merged back: node -> (the
        # last axis' channels, the shape, heads merged into the last axis (1: split)),
        # rewritten to the channels kept
        self.head_reshapes: dict[str, tuple[Layout, tuple[int, ...], int]] = {}
        # a channel shuffle's reshapes: node -> (one group's channels, the shape, the groups,
        # whether it splits them), rewritten to the channels kept
        self.group_reshapes: dict[str, tuple[Layout, tuple[int, ...], int, bool]] = {}
        # reshapes to the shape they are given (x.reshape(n, t, c)): the input as it is
        self.same_shape_reshapes: list[str] = []
        # reshapes of channels on the last axis ((N, T, 1, E) <-> (N, T, E)): node -> (the
        # channels' layout, the shape), rewritten to the channels kept
        self.last_axis_reshapes: dict[str, tuple[Layout, tuple[int, ...]]] = {}
        # reshapes of attention's transposed keys (..., C, L): the channels second to last
        self.key_reshapes: dict[str, tuple[Layout, tuple[int, ...]]] = {}
        # constants with a value per channel (a layer scale, a bias added, a positional
        # embedding): get_attr target -> (the channels' layout, the constant's channel axis)
        self.channel_consts: dict[str, tuple[Layout, int]] = {}
        self._const_reads: dict[str, list[tuple[str, Layout, int]]] = {}   # by elementwise ops
        # units of Linears over positions (the last axis of (N, C, ..., L)): node -> units,
        # and (reader, node) pairs that carry or contract them
        self.position_units: dict[str, Layout] = {}
        self._units_read: set[tuple[str, str]] = set()
        self._walk()
        self._settle_position_units()
        self._settle_constants()

    # ---- union-find over channel ids
    def _new_space(self, size: int, layer: str | None, frozen: bool) -> Layout:
        start = len(self._parent)
        self._parent.extend(range(start, start + size))
        self._sizes.append(size)
        self._space_frozen.append(frozen)
        self._space_layer.append(layer)
        self._space_start.append(start)
        ids = tuple(range(start, start + size))
        if frozen:
            self._frozen_ids.update(ids)
        return Layout(ids)

    def _find(self, a: int) -> int:
        while self._parent[a] != a:
            self._parent[a] = self._parent[self._parent[a]]
            a = self._parent[a]
        return a

    def _union(self, a: int, b: int) -> None:
        ra, rb = self._find(a), self._find(b)
        if ra != rb:
            self._parent[max(ra, rb)] = min(ra, rb)

    def _freeze(self, layout) -> None:
        if isinstance(layout, Layout):
            self._frozen_ids.update(layout.ids)

    # ---- the walk
    @staticmethod
    def _shape(node) -> tuple[int, ...] | None:
        meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
        if meta is None or not hasattr(meta, "shape"):
            return None
        return tuple(meta.shape)

    def _layout_of(self, arg):
        if isinstance(arg, fx.Node):
            return self.layouts.get(arg.name)
        return None

    def _fail(self, node: fx.Node, what: str):
        where = f"layer '{node.target}'" if node.op == "call_module" else f"node '{node.name}'"
        raise GraphError(f"cannot prune through {where}: {what}")

    def _walk(self) -> None:
        for node in self.gm.graph.nodes:
            shape = self._shape(node)
            if node.op == "placeholder":
                self.layouts[node.name] = (self._new_space(shape[1], None, True)
                                           if shape and len(shape) >= 2 else None)
            elif node.op == "get_attr":
                self.layouts[node.name] = CONST
            elif node.op == "call_module":
                self.layouts[node.name] = self._module(node, shape)
            elif node.op in ("call_function", "call_method"):
                self.layouts[node.name] = self._function(node, shape)
            elif node.op == "output":
                fx.node.map_arg(node.args, lambda n: self._freeze(self.layouts.get(n.name)))
            if node.op in ("call_module", "call_function", "call_method"):
                self._pass_position_units(node)

    def _input_layout(self, node: fx.Node, ndim: int | None = None,
                      channels_last_ok: bool = False) -> Layout:
        lay = self._layout_of(node.args[0]) if node.args else None
        if not isinstance(lay, Layout):
            self._fail(node, "its input has no channel dimension the analysis understands")
        if lay.unflattened_last and not channels_last_ok:
            self._fail(node, "its input has the channels on the last axis (after a permute); "
                       "only elementwise ops, flatten or a permute back to NCHW may follow")
        in_shape = self._shape(node.args[0])
        if ndim is not None and (in_shape is None or len(in_shape) != ndim):
            self._fail(node, f"expects a {ndim}-D input, got shape {in_shape}")
        return lay

    def _module(self, node: fx.Node, shape):
        mod = self.gm.get_submodule(node.target)
        name = node.target
        if name in self.layers and isinstance(mod, (nn.Conv2d, nn.Linear, nn.BatchNorm2d,
                                                     nn.BatchNorm1d, nn.PReLU)):
            return self._shared(node, mod, shape)
        if isinstance(mod, nn.Conv2d):
            lay = self._input_layout(node, 4, channels_last_ok=True)
            if lay.repeat != 1:
                self._fail(node, "conv input is flattened")
            if lay.channels_last:
                # a conv along the channels (ECA's 1-D conv over them): they are kept, and so
                # is what it writes (the channels' positions, wherever they are permuted)
                self._freeze(lay)
                lay = self._new_space(mod.in_channels, None, True)
                out = self._new_space(mod.out_channels, None, True)
                self.layers[name] = Layer(name, "frozen", mod, node.name, lay, out)
                return out
            if mod.groups == 1:
                out = self._new_space(mod.out_channels, name, False)
                self.layers[name] = Layer(name, "conv", mod, node.name, lay, out)
            elif mod.groups == mod.in_channels == mod.out_channels:
                self.layers[name] = Layer(name, "dwconv", mod, node.name, lay, lay)
                out = lay
            elif mod.in_channels > mod.groups and mod.out_channels > mod.groups:
                # grouped conv: channel j of every group is one unit, so that pruning removes
                # the same number of channels from each group and it stays a grouped conv
                out = self._new_space(mod.out_channels, name, False)
                for layout in (lay, out):
                    per = len(layout.ids) // mod.groups
                    for j in range(per):
                        for k in range(1, mod.groups):
                            self._union(layout.ids[j], layout.ids[k * per + j])
                self.layers[name] = Layer(name, "gconv", mod, node.name, lay, out)
            else:
                # one input or one output per group (a depthwise multiplier, as Keras'
                # depth_multiplier): a unit is a whole group, its inputs with its outputs, so
                # that pruning removes groups. Each group's outputs are a space of their own:
                # branches concatenated before it stay groups apart, as for a depthwise conv
                ci, co = mod.in_channels // mod.groups, mod.out_channels // mod.groups
                out_ids = []
                for k in range(mod.groups):
                    made = self._new_space(co, None, False).ids
                    for cid in lay.ids[k * ci + 1:(k + 1) * ci] + made:
                        self._union(lay.ids[k * ci], cid)
                    out_ids += made
                out = Layout(tuple(out_ids))
                self.layers[name] = Layer(name, "groupwise", mod, node.name, lay, out)
            return out
        if isinstance(mod, (nn.BatchNorm2d, nn.BatchNorm1d)):
            lay = self._input_layout(node, 4 if isinstance(mod, nn.BatchNorm2d) else 2)
            if lay.repeat != 1:
                self._fail(node, "BatchNorm1d on flattened conv features is not supported")
            self.layers[name] = Layer(name, "bn", mod, node.name, lay, lay)
            return lay
        if isinstance(mod, nn.Linear) and len(self._shape(node.args[0]) or ()) > 2:
            return self._linear_last_axis(node, mod, name)
        if isinstance(mod, nn.Linear):
            lay = self._input_layout(node, 2)
            if len(lay.ids) * lay.repeat != mod.in_features:
                self._fail(node, f"input has {len(lay.ids) * lay.repeat} features, "
                           f"layer expects {mod.in_features}")
            out = self._new_space(mod.out_features, name, False)
            self.layers[name] = Layer(name, "linear", mod, node.name, lay, out)
            return out
        if isinstance(mod, nn.Flatten):
            return self._flatten(node, mod.start_dim, mod.end_dim)
        if isinstance(mod, nn.Unflatten):
            return self._reshape(node, shape)
        if isinstance(mod, nn.PixelShuffle):
            return self._depth_to_space(node, mod.upscale_factor)
        if isinstance(mod, nn.PixelUnshuffle):
            return self._space_to_depth(node, mod.downscale_factor)
        if isinstance(mod, nn.ChannelShuffle):
            return self._channel_shuffle(node, mod.groups, shape)
        if isinstance(mod, (nn.Softmax, nn.LogSoftmax)):
            return self._softmax(node, mod.dim, shape)
        if isinstance(mod, (nn.LayerNorm, nn.RMSNorm)):
            return self._layer_norm(node, len(mod.normalized_shape), name, mod)
        if isinstance(mod, nn.GroupNorm):
            return self._group_norm(node, mod, name)
        if isinstance(mod, (nn.InstanceNorm1d, nn.InstanceNorm2d)):   # each channel alone
            lay = self._input_layout(node)
            if mod.affine:       # a weight per channel: pruned like a BatchNorm's
                if lay.repeat != 1:
                    self._fail(node, "InstanceNorm on flattened conv features")
                self.layers[name] = Layer(name, "bn", mod, node.name, lay, lay)
            return lay
        if isinstance(mod, nn.PReLU) and mod.num_parameters > 1:   # a slope per channel
            lay = self._input_layout(node)
            if lay.repeat != 1:
                self._fail(node, "PReLU on flattened conv features is not supported")
            self.layers[name] = Layer(name, "prelu", mod, node.name, lay, lay)
            return lay
        if isinstance(mod, PASSTHROUGH_MODULES):
            return self._input_layout(node,
                                      channels_last_ok=not isinstance(mod, SPATIAL_MODULES))
        self._fail(node, f"unsupported module type {type(mod).__name__} (supported: Conv2d, "
                   "BatchNorm2d, Linear, BatchNorm1d after it, pooling, elementwise activations, "
                   "Flatten)")

    def _matmul(self, node: fx.Node, shape) -> Layout:
        """A product of two activations. Attention's scores q @ k^T contract the channels of
        the queries with the keys': channel j of both is one unit; their weighted sum a @ v
        contracts the key positions, and carries the values' channels, as a product of
        channels-first (N, C, L) maps with weights of their positions carries theirs. Any other
        product keeps the channels of both operands; its result's last axis is a new, kept
        space."""
        a, b = (self._layout_of(x) for x in node.args[:2])
        # the keys with their channels on the second-to-last axis: k^T of (N, h, L, d), or
        # a (N, L, C) transposed to (N, C, L) (which reads as channels first)
        keys = b.layout if isinstance(b, Transposed) else b if (
            isinstance(b, Layout) and not b.channels_last and b.repeat == 1 and
            len(self._shape(node.args[1])) == 3) else None
        if self._fine and isinstance(a, Layout) and a.unflattened_last and \
                keys is not None and len(a.ids) == len(keys.ids):
            for i, j in zip(a.ids, keys.ids):
                self._union(i, j)
            return Layout(self._new_space(shape[-1], None, True).ids, 1, True)
        if self._fine and isinstance(a, Layout) and set(a.ids) <= self._frozen_ids and \
                isinstance(b, Layout) and b.unflattened_last and len(shape) >= 3 and \
                tuple(shape[:-1]) == tuple(self._shape(node.args[0])[:-1]):
            return b
        if self._fine and isinstance(a, Layout) and not a.channels_last and a.repeat == 1 and \
                len(shape) == 3 and len(self._shape(node.args[0])) == 3 and \
                shape[1] == len(a.ids) and (b is CONST or isinstance(b, Layout)):
            # each channel's positions weighed ((N, C, L) @ (N, L, K): GCNet's global context,
            # a constant matrix): the channels pass, what weighs them is kept
            self._freeze(b)
            return a
        for lay in (a, b):
            if isinstance(lay, Transposed):
                lay = lay.layout
            if not isinstance(lay, Layout):
                self._fail(node, "multiplies a tensor without a tracked channel dimension")
            self._freeze(lay)
        return Layout(self._new_space(shape[-1], None, True).ids, 1, len(shape) > 2)

    def _depth_to_space(self, node: fx.Node, r: int) -> Layout:
        """A pixel shuffle: output channel c is input channels c * r * r .. (c + 1) * r * r - 1
        spread over space, so those r * r are one unit, and a pruned output channel is a
        block of its producer's (a super-resolution head prunes)."""
        lay = self._input_layout(node, 4)
        if lay.repeat != 1 or lay.channels_last:
            return self._kept(lay, self._shape(node))
        block = r * r
        for c in range(len(lay.ids) // block):
            for cid in lay.ids[c * block + 1:(c + 1) * block]:
                self._union(lay.ids[c * block], cid)
        return Layout(lay.ids[::block])

    def _space_to_depth(self, node: fx.Node, r: int) -> Layout:
        """A pixel unshuffle: input channel c becomes output channels c * r * r ..
        (c + 1) * r * r - 1 (its pixels' phases), all of them its unit, so the consumer's input
        columns prune in blocks of r * r."""
        lay = self._input_layout(node, 4)
        if lay.repeat != 1 or lay.channels_last:
            return self._kept(lay, self._shape(node))
        return Layout(tuple(cid for cid in lay.ids for _ in range(r * r)))

    def _group_norm(self, node: fx.Node, mod: nn.GroupNorm, name: str) -> Layout:
        """Statistics over groups of channels: each group's channels are one unit, so a group
        prunes whole (the others' statistics stay) and the norm keeps fewer groups."""
        lay = self._input_layout(node)
        if lay.repeat != 1:
            self._freeze(lay)
            return lay
        per = len(lay.ids) // mod.num_groups
        for g in range(mod.num_groups):
            for cid in lay.ids[g * per + 1:(g + 1) * per]:
                self._union(lay.ids[g * per], cid)
        self.layers[name] = Layer(name, "gn", mod, node.name, lay, lay)
        return lay

    def _layer_norm(self, node: fx.Node, n_axes: int, name: str | None = None,
                    mod: nn.Module | None = None) -> Layout:
        """A LayerNorm over the last `n_axes` axes. Over the channels alone (a transformer's
        residual stream, (N, T, C) or (N, C)), a module's channels prune with their weights:
        the pruned norm's statistics are over the channels kept (not what the unpruned model
        computes with those channels zeroed; fine-tuning follows). Over the channels and
        other axes, or as a function with weights of its own, they are kept; over other axes
        only (L of (N, C, L), H and W of maps) they pass."""
        lay = self._input_layout(node, channels_last_ok=True)
        nd = len(self._shape(node.args[0]))
        over_channels = lay.channels_last or n_axes >= nd - 1
        if self._fine and mod is not None and n_axes == 1 and lay.repeat == 1 and \
                (lay.unflattened_last or nd == 2):
            self.layers[name] = Layer(name, "ln", mod, node.name, lay, lay)
        elif over_channels or lay.repeat != 1:
            self._freeze(lay)
        return lay

    def _shared(self, node: fx.Node, mod: nn.Module, shape) -> Layout:
        """A module with weights called again (a recurrent layer's Linears at every step,
        siamese branches): what it reads at every call is one set of units (one set of
        weights prunes for all), and every call writes the first one's channels. Calls that
        read differently laid out inputs keep it whole."""
        first = self.layers[node.target]
        lay = self._layout_of(node.args[0])
        if isinstance(lay, Layout) and isinstance(first.in_layout, Layout) and \
                len(lay.ids) == len(first.in_layout.ids) and \
                (lay.repeat, lay.channels_last) == (first.in_layout.repeat,
                                                    first.in_layout.channels_last):
            for i, j in zip(first.in_layout.ids, lay.ids):
                self._union(i, j)
            return lay if first.in_layout is first.out_layout else first.out_layout
        for lay in (first.in_layout, first.out_layout, self._layout_of(node.args[0])):
            if isinstance(lay, Layout):
                self._freeze(lay)
        lay = self._layout_of(node.args[0])
        if first.in_layout is first.out_layout and isinstance(lay, Layout):
            return lay                        # per channel: BatchNorm, PReLU, depthwise
        size = shape[-1] if first.out_layout.channels_last else shape[1]
        return Layout(self._new_space(size, None, True).ids, 1, first.out_layout.channels_last)

    def _linear_last_axis(self, node: fx.Node, mod: nn.Linear, name: str) -> Layout:
        """A Linear on (N, ..., C): over the last axis, the channels of a channels-last tensor
        (frames of a sequence); its output keeps them last."""
        lay = self._input_layout(node, channels_last_ok=True)
        if not lay.channels_last and lay.repeat == 1 and self._made_by_a_layer(lay) and \
                not set(lay.ids) <= self._frozen_ids:
            return self._linear_over_positions(node, mod, name, lay)
        if not lay.unflattened_last:
            if not set(lay.ids) <= self._frozen_ids:
                self._fail(node, "a Linear over the last axis of a tensor whose channels are on "
                           "axis 1")
            lay = Layout(self._new_space(mod.in_features, None, True).ids, 1, True)  # the input's
        if len(lay.ids) != mod.in_features:
            self._fail(node, f"input has {len(lay.ids)} features, layer expects "
                       f"{mod.in_features}")
        out = Layout(self._new_space(mod.out_features, name, False).ids, 1, True)
        self.layers[name] = Layer(name, "linear", mod, node.name, lay, out)
        return out

    def _made_by_a_layer(self, lay: Layout) -> bool:
        """Whether some of `lay`'s channels are a layer's outputs (not the input's rows, as
        (N, 1, H, W) squeezed to H frames gives: a Linear over them is one over features)."""
        return any(self._space_layer[bisect.bisect_right(self._space_start, cid) - 1]
                   is not None for cid in lay.ids)

    def _linear_over_positions(self, node: fx.Node, mod: nn.Linear, name: str,
                               lay: Layout) -> Layout:
        """A Linear over the last axis of (N, C, ..., L) whose channels are on axis 1 (an
        MLP-Mixer's token mixing, a Linear over time): it maps each channel's positions alike,
        so the channels pass. Its own units are positions; they prune with the next such
        Linear's inputs when only elementwise ops come between (_settle_position_units)."""
        src = node.args[0].name
        units = self.position_units.get(src)
        if units is not None and len(units.ids) == mod.in_features:
            self._units_read.add((node.name, src))
        else:
            units = Layout(self._new_space(mod.in_features, None, True).ids, 1, True)
        out = Layout(self._new_space(mod.out_features, name, False).ids, 1, True)
        self.layers[name] = Layer(name, "linear", mod, node.name, units, out)
        self.position_units[node.name] = out
        return lay

    def _pass_position_units(self, node: fx.Node) -> None:
        """An elementwise op (the GELU between a token-mixing MLP's Linears, or the ops an
        exporter writes it as) of tensors with the same units, and numbers, keeps them where
        they are."""
        inputs = node.all_input_nodes
        units = {self.position_units.get(n.name) for n in inputs}
        if not inputs or len(units) != 1 or None in units:
            return
        t = node.target
        if node.op == "call_module":
            mod = self.gm.get_submodule(t)
            passes = isinstance(mod, PASSTHROUGH_MODULES) and not isinstance(mod, SPATIAL_MODULES)
        elif node.op == "call_function":
            passes = t in PASSTHROUGH_FUNCTIONS - SPATIAL_FUNCTIONS or t in BINARY_FUNCTIONS
        else:
            passes = t in PASSTHROUGH_METHODS or t in BINARY_METHODS
        if passes:
            self.position_units[node.name] = units.pop()
            self._units_read.update((node.name, n.name) for n in inputs)

    def _settle_position_units(self) -> None:
        """A position Linear's units that anything but elementwise ops and the next such
        Linear reads (a transpose back, an add, the output) are kept."""
        for node in self.gm.graph.nodes:
            units = self.position_units.get(node.name)
            if units is not None and any((u.name, node.name) not in self._units_read
                                         for u in node.users):
                self._freeze(units)

    def _flatten(self, node: fx.Node, start: int, end: int = -1):
        lay = self._input_layout(node, channels_last_ok=True)
        in_shape = self._shape(node.args[0])
        if start >= 2 and not lay.channels_last:      # x.flatten(2): the positions merge
            return lay
        if start == 1 and end % len(in_shape) == 2 and len(in_shape) == 4 and \
                not lay.channels_last and lay.repeat == 1:
            # maps' channels and height merged, (N, C * H, W) (a 2-D front end's rows as a
            # signal for a Conv1d): channel c is channels c * H .. c * H + H - 1
            if not self._fine:
                return self._kept(lay, self._shape(node))
            return self._merge_inner(node, Inner(lay, 1), (len(lay.ids) * in_shape[2],),
                                     channels_last=False)
        if start != 1 or end not in (-1, len(in_shape) - 1):
            self._fail(node, "only flatten(x, 1) (all dims after the batch) is supported")
        spatial = int(np.prod(in_shape[1:-1] if lay.channels_last else in_shape[2:],
                              dtype=np.int64))
        # with one position (a global pool kept as N,1,1,C) the order is the channels' own
        return Layout(lay.ids, lay.repeat * spatial, lay.channels_last and spatial > 1)

    def _permute(self, node: fx.Node, shape):
        """A permute that keeps the batch axis: channels move to dim 1 or to the last axis
        (NHWC, before a flatten). Frozen channels (the input's) may go anywhere: the new
        channel axis is a new frozen space."""
        lay = self._input_layout(node, channels_last_ok=True)
        nd = len(shape)
        perm = _perm(node, nd)
        if perm[0] != 0:
            self._fail(node, f"permute {perm} moves the batch axis")
        if lay.repeat != 1:
            self._fail(node, "permute of flattened features")
        if set(lay.ids) <= self._frozen_ids:
            return self._new_space(shape[1], None, True)
        to = perm.index(nd - 1 if lay.channels_last else 1)
        if to == 1:
            return Layout(lay.ids)
        if to == nd - 1:
            return Layout(lay.ids, 1, True)
        if self._fine and lay.channels_last and nd >= 3 and to == nd - 2 and \
                self._only_keys(node):
            # keys for q @ k^T: k.transpose(-2, -1), or the heads' split and the transpose in
            # one permute (0, 2, 3, 1) as ONNX exporters write it
            return Transposed(lay)
        if self._fine and 1 < to < nd - 1 and all(self._merges_from(u, to)
                                                   for u in node.users):
            return Inner(lay, to)
        return self._kept(lay, shape)   # the channel axis moves inside the tensor

    def _merges_from(self, node: fx.Node, axis: int) -> bool:
        """`node` merges axes `axis`.. of its input, its only tensor: x.flatten(axis) or a
        reshape to x.shape[:axis] + (-1,) (its sizes may be read from tensors)."""
        if node.op not in ("call_function", "call_method") or not node.args or \
                [a for a in node.all_input_nodes if "value" not in a.meta] != [node.args[0]]:
            return False
        shape, in_shape = self._shape(node), self._shape(node.args[0])
        return node.target in {torch.flatten, "flatten"} | UNIT_AXIS_TARGETS and \
            shape is not None and in_shape is not None and len(shape) == axis + 1 and \
            tuple(shape[:axis]) == tuple(in_shape[:axis])

    def _merge_inner(self, node: fx.Node, inner: Inner, shape,
                     channels_last: bool = True) -> Layout:
        """The features of `inner`'s channels merged with the axes after them (of size
        shape[-1]), on the last axis (or the channel axis): a new space whose features
        c * S .. c * S + S - 1 are channel c's."""
        ids = inner.layout.ids
        per = int(shape[-1]) // len(ids)
        features = self._new_space(len(ids) * per, None, False).ids
        for c, cid in enumerate(ids):
            for k in range(per):
                self._union(cid, features[c * per + k])
        out = Layout(features, 1, channels_last)
        if channels_last and node.target in (torch.reshape, "view", "reshape"):
            self.last_axis_reshapes[node.name] = (out, tuple(shape))
        return out

    def _only_keys(self, node: fx.Node) -> bool:
        """`node` reaches only the right operands of products, through a scale by a number
        and reshapes that add or drop unit axes (as exporters write q @ k^T)."""
        def passes(u: fx.Node) -> bool:
            if u.op not in ("call_function", "call_method") or not u.args or \
                    u.args[0] is not node:
                return False
            if u.target in SCALE_TARGETS:
                return len(u.args) == 2 and isinstance(u.args[1], (int, float))
            if u.target not in UNIT_AXIS_TARGETS:
                return False
            shape, in_shape = self._shape(u), self._shape(node)
            return shape is not None and in_shape is not None and len(shape) >= 2 and \
                tuple(shape[-2:]) == tuple(in_shape[-2:]) and \
                _non_unit(shape) == _non_unit(in_shape)
        return bool(node.users) and all(
            (self._is_matmul(u) and u.args[1] is node and u.args[0] is not node) or
            (passes(u) and self._only_keys(u)) for u in node.users)

    @staticmethod
    def _is_matmul(node: fx.Node) -> bool:
        return (node.op == "call_function" and node.target in (operator.matmul, torch.matmul)) \
            or (node.op == "call_method" and node.target == "matmul")

    def _softmax(self, node: fx.Node, dim, shape):
        """Elementwise along other axes; along the channels every channel counts in the sum,
        so they are kept."""
        lay = self._input_layout(node, channels_last_ok=True)
        channel_axis = len(shape) - 1 if shape is not None and lay.channels_last else 1
        if dim is None or shape is None or dim % len(shape) == channel_axis:
            self._freeze(lay)
        return lay

    def _function(self, node: fx.Node, shape):
        t = node.target
        is_fn = node.op == "call_function"
        keys = self._layout_of(node.args[0]) if node.args else None
        if isinstance(keys, Inner):          # _merges_from admitted only merges
            return self._merge_inner(node, keys, shape)
        if isinstance(keys, Grouped):        # _shuffles admitted the swap, copies, the merge
            if t in (torch.permute, torch.transpose, "permute", "transpose"):
                return Grouped(keys.layout, keys.groups, not keys.swapped)
            if _is_copy(node):
                return keys
            return self._ungrouped(node, keys, shape)
        if isinstance(keys, Transposed) and not self._is_matmul(node):
            # a scale or a reshape of unit axes between the keys' transpose and q @ k^T
            # (_only_keys admitted no other op)
            if t in (torch.reshape, "view", "reshape"):
                self.key_reshapes[node.name] = (keys.layout, tuple(shape))
            return keys
        if (is_fn and t in PASSTHROUGH_FUNCTIONS) or (not is_fn and t in PASSTHROUGH_METHODS):
            if shape is None:
                return None
            return self._input_layout(node, channels_last_ok=t not in SPATIAL_FUNCTIONS)
        if (is_fn and t in (torch.permute, torch.transpose)) or \
                (not is_fn and t in ("permute", "transpose")):
            return self._permute(node, shape)
        if (is_fn and t in BINARY_FUNCTIONS) or (not is_fn and t in BINARY_METHODS) or \
                (is_fn and t in (torch.max, torch.min) and len(node.args) == 2
                 and isinstance(node.args[1], fx.Node)):     # torch.max(a, b): elementwise
            return self._binary(node, shape)
        if is_fn and t is torch.where and len(node.args) == 3:   # cond, a, b: elementwise
            c, a, b = node.args
            lays = [self._binary(node, shape, pair) for pair in ((c, a), (c, b), (a, b))]
            return next((lay for lay in lays if isinstance(lay, Layout)), None)
        if (is_fn and t is torch.masked_fill) or (not is_fn and t == "masked_fill"):
            mask = node.args[1] if len(node.args) > 1 else node.kwargs.get("mask")
            return self._binary(node, shape, (node.args[0], mask))   # x, mask: elementwise
        if (is_fn and t in SOFTMAX_FUNCTIONS) or (not is_fn and t in ("softmax", "log_softmax")):
            dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
            return self._softmax(node, dim, shape)
        if is_fn and t in CAT_FUNCTIONS:
            return self._cat(node, shape)
        if (is_fn and t in FLATTEN_FUNCTIONS) or (not is_fn and t == "flatten"):
            start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
            end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
            if start == 0:
                self._fail(node, "flatten including the batch dimension")
            return self._flatten(node, start, end)
        if (is_fn and t in RESHAPE_FUNCTIONS) or (not is_fn and t in ("view", "reshape")):
            return self._reshape(node, shape)
        if (is_fn and t in MEAN_FUNCTIONS) or (not is_fn and t in ("mean", "amax", "amin", "sum")):
            return self._mean(node, shape)
        if (not is_fn and t in ("size", "dim")) or (is_fn and t in (getattr, len)):
            return None
        if is_fn and t is F.pad:
            pad = node.args[1] if len(node.args) > 1 else node.kwargs.get("pad")
            if len(pad) <= 4:                                  # H and W only
                return self._input_layout(node)
            if shape is not None and len(pad) == 2 * (len(shape) - 1):
                return self._channel_pad(node, shape, pad[-2], pad[-1])
            self._fail(node, f"padding {tuple(pad)} reaches the batch axis")
        if (not is_fn and t == "unsqueeze") or (is_fn and t is torch.unsqueeze):
            dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
            lay = self._layout_of(node.args[0])
            if shape is not None and dim % len(shape) >= 2 and \
                    not (isinstance(lay, Layout) and lay.channels_last):   # new trailing axes
                return self._input_layout(node)
            return self._reshape(node, shape)
        if (not is_fn and t == "squeeze") or (is_fn and t is torch.squeeze):
            return self._reshape(node, shape)
        if (is_fn and t in (operator.matmul, torch.matmul, torch.bmm)) or \
                (not is_fn and t in ("matmul", "bmm")):
            return self._matmul(node, shape)
        if not is_fn and t == "expand" and self._layout_of(node.args[0]) is CONST:
            return CONST          # a constant over the batch (a class token)
        if not is_fn and t in ("expand", "expand_as"):     # broadcast for a product
            lay = self._input_layout(node)
            if self._shape(node.args[0])[1] == shape[1]:
                return lay
            return self._kept(lay, shape)                  # the channel axis grows
        if is_fn and t is torch.stack:     # a new axis: the pieces' channels are kept
            for x in node.args[0]:
                self._freeze(self._layout_of(x))
            return self._new_space(shape[1], None, True)
        if is_fn and t is F.pixel_shuffle:
            factor = node.args[1] if len(node.args) > 1 else node.kwargs["upscale_factor"]
            return self._depth_to_space(node, int(factor))
        if is_fn and t is F.pixel_unshuffle:
            factor = node.args[1] if len(node.args) > 1 else node.kwargs["downscale_factor"]
            return self._space_to_depth(node, int(factor))
        if is_fn and t in (F.channel_shuffle, torch.channel_shuffle):
            groups = node.args[1] if len(node.args) > 1 else node.kwargs["groups"]
            return self._channel_shuffle(node, int(groups), shape)
        if is_fn and t in (F.layer_norm, F.rms_norm):
            shape_arg = node.args[1] if len(node.args) > 1 else node.kwargs["normalized_shape"]
            return self._layer_norm(node, len(shape_arg))
        if is_fn and t is F.normalize:
            # along the channels, a pruned channel is a zero in |x|: the kept ones' values
            # are the masked model's (unlike a mean's statistics, which count the zeros)
            lay = self._input_layout(node, channels_last_ok=True)
            if lay.repeat != 1:
                self._freeze(lay)
            return lay
        if is_split(node) or returns_indices(node):
            return None      # a tuple: each getitem of it is a slice, or a max (below)
        values = max_values_of(node)
        if values:
            return self._mean(node, shape, *values)
        pieces = slices_of(node)
        if pieces:
            return self._slice(node, pieces)
        if (is_fn and t is operator.getitem and isinstance(node.args[0], fx.Node)
                and _adds_trailing_axes(node.args[1])):
            return self._input_layout(node)             # x[:, :, None, None]
        if is_fn and t is operator.getitem and not isinstance(node.args[0], fx.Node):
            return None
        if is_fn and t is operator.getitem and self._shape(node.args[0]) is None:
            return None  # indexing a shape tuple
        if shape is None and not any(isinstance(self._layout_of(a), Layout)
                                     for a in node.all_input_nodes):
            return None      # arithmetic on shapes (c // 2 of x.shape)
        name = getattr(t, "__name__", str(t))
        self._fail(node, f"unsupported operation {name}")

    def _slice(self, node: fx.Node, pieces: list[Slice]):
        """Part of a tensor. Along other axes the channels pass. A contiguous piece of the
        channels alone (a channel split) takes its channels, and surgery moves its bounds to
        the channels kept; any other cut of the channels keeps the sliced tensor's."""
        source = pieces[0].source
        lay = self._layout_of(source)
        if not isinstance(lay, Layout):
            self._fail(node, "slices a tensor without a tracked channel dimension")
        nd = len(self._shape(source))
        channel_axis = nd - 1 if lay.channels_last else 1
        cut = [p for p in pieces if p.axis == channel_axis]
        drops = any(p.drops_axis for p in pieces)
        if lay.repeat == 1 and not cut:
            if drops and lay.channels_last and nd == 3:
                return Layout(lay.ids)      # (N, T, C)[:, -1]: the channels of (N, C)
            return lay
        if lay.repeat == 1 and pieces == cut and cut[0].step == 1 and not drops:
            self.channel_slices[node.name] = (lay, cut[0])
            return Layout(lay.ids[cut[0].start:cut[0].stop], 1, lay.channels_last)
        self._freeze(lay)
        if drops:
            return self._new_space(self._shape(node)[1], None, True) \
                if len(self._shape(node)) >= 2 else None
        if lay.repeat == 1:
            return Layout(lay.ids[cut[0].start:cut[0].stop:cut[0].step], 1, lay.channels_last)
        return self._new_space(self._shape(node)[1], None, True)   # of flattened features

    def _binary(self, node: fx.Node, shape, operands=None):
        """An elementwise op of two operands (default: the node's): their channels are one."""
        a, b = operands or ((node.args + (None,))[:2] if len(node.args) >= 2 else
                            (node.args[0], node.kwargs.get("other")))
        la, lb = self._layout_of(a), self._layout_of(b)
        if shape is None or len(shape) < 2:
            return None
        tensors = [(x, l) for x, l in ((a, la), (b, lb)) if isinstance(l, Layout)]
        if not tensors:
            return None
        consts = [x for x, l in ((a, la), (b, lb)) if l is CONST]
        if len(tensors) == 1:
            for c in consts:
                self._per_channel_const(node, c, *tensors[0])
            return tensors[0][1]
        (xa, la), (xb, lb) = tensors
        sa, sb = self._shape(xa), self._shape(xb)
        if la.unflattened_last and lb.unflattened_last and len(sa) == len(sb) and \
                tuple(sa[:-1]) == tuple(sb[:-1]) and min(sa[-1], sb[-1]) == 1 < \
                max(sa[-1], sb[-1]):
            # one value per position times every channel (attention pooling's weights)
            one, other = (la, lb) if sa[-1] == 1 else (lb, la)
            self._freeze(one)
            return other
        if la.channels_last != lb.channels_last or (la.unflattened_last and sa != sb):
            # Channels on different axes (a token-mixing MLP's output, transposed back onto
            # the residual stream): one side's channels meet the other's positions, so
            # neither may change.
            self._freeze(la)
            self._freeze(lb)
            if tuple(shape) == tuple(sa):
                return la
            return lb if tuple(shape) == tuple(sb) else self._new_space(shape[1], None, True)
        if len(la.ids) == len(lb.ids) and la.repeat == lb.repeat:
            for i, j in zip(la.ids, lb.ids):
                self._union(i, j)
            return la
        if sa[1] == 1:
            self._freeze(la)
            return lb
        if sb[1] == 1:
            self._freeze(lb)
            return la
        self._fail(node, f"operands with channel shapes {sa} and {sb} do not line up")

    def _per_channel_const(self, node: fx.Node, const: fx.Node, x: fx.Node,
                           lay: Layout) -> None:
        """Constant `const` meets tensor `x` elementwise at `node`. One value for every channel
        constrains nothing; a value per channel of a parameter or buffer prunes with the
        channels (surgery slices it); any other constant keeps them."""
        cs, xs = self._shape(const), self._shape(x)
        if xs is None:
            self._freeze(lay)
            return
        if cs is None and const.op == "get_attr":
            cs = tuple(_fetch_attr(self.gm, const.target).shape)
        channel_axis = len(xs) - 1 if lay.channels_last else 1
        k = None if cs is None else channel_axis - (len(xs) - len(cs))   # the constant's axis
        if k is not None and (k < 0 or cs[k] == 1):
            return                                   # the same for every channel
        if k is None or const.op != "get_attr" or lay.repeat != 1 or \
                tuple(self._shape(node) or ()) != tuple(xs) or cs[k] != len(lay.ids):
            self._freeze(lay)
            return
        self._const_reads.setdefault(const.target, []).append((node.name, lay, k))
        if not self._fine:
            self._freeze(lay)

    def _settle_constants(self) -> None:
        """Per-channel constants, once every reader is known. A constant read more than once
        ties its readers' channels. A pruned layer's own bias read on its own (an unrolled
        recurrent layer's first step adds its hidden Linear's bias) ties them to the layer's
        outputs: surgery cuts it with the layer. A constant that anything besides elementwise
        ops reads (a concatenation, a reshape) cannot be cut: its readers' channels are kept.
        The rest are cut by surgery along their channel axis."""
        for node in self.gm.graph.nodes:
            reads = self._const_reads.get(node.target) if node.op == "get_attr" else None
            if not reads:
                continue
            lays = [lay for _, lay, _ in reads]
            owner, _, attr = node.target.rpartition(".")
            layer = self.layers.get(owner)
            if layer is not None:
                lays.append(layer.out_layout)
            sizes = {(len(lay.ids), lay.repeat, lay.channels_last) for lay in lays
                     if isinstance(lay, Layout)}
            readers = {name for name, _, _ in reads}
            if len(sizes) != 1 or len({k for _, _, k in reads}) != 1 or \
                    (layer is not None and attr != "bias") or \
                    any(u.name not in readers for u in node.users):
                for lay in lays:
                    self._freeze(lay)
                continue
            for lay in lays[1:]:
                for i, j in zip(lays[0].ids, lay.ids):
                    self._union(i, j)
            if layer is None and self._fine:
                self.channel_consts[node.target] = (lays[0], reads[0][2])

    def _channel_pad(self, node: fx.Node, shape, before: int, after: int) -> Layout:
        """Constant channels around the input's (CIFAR ResNet's "option A" shortcut: zeros
        around the subsampled maps, added to the next stage's): each a unit of its own that
        prunes with what it is added to (kept where nothing ties it to a layer's channels),
        the input's channels passing through."""
        lay = self._input_layout(node)
        mode = node.args[2] if len(node.args) > 2 else node.kwargs.get("mode", "constant")
        if mode != "constant" or lay.repeat != 1 or lay.channels_last or min(before, after) < 0:
            self._freeze(lay)          # copied edges or cropped channels: kept
            return self._new_space(shape[1], None, True)
        sides = (self._new_space(before, None, False), self._new_space(after, None, False))
        self.channel_pads[node.name] = sides
        return Layout(sides[0].ids + lay.ids + sides[1].ids)

    def _cat(self, node: fx.Node, shape):
        tensors = node.args[0]
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        nd = len(shape)
        dim = dim % nd
        lays = [self._layout_of(x) for x in tensors]
        if any(l is CONST for l in lays):     # constant pieces (a class token)
            kept = [l for l in lays if isinstance(l, Layout)]
            if dim == 1 and kept and all(l.repeat == 1 and not l.channels_last for l in kept):
                # constant channels (CoordConv's coordinates): kept, the tensors' prune
                return Layout(tuple(i for x, l in zip(tensors, lays) for i in (
                    self._new_space(self._shape(x)[1], None, True).ids if l is CONST
                    else l.ids)))
            if len(kept) != 1 or dim == (nd - 1 if kept[0].channels_last else 1):
                for l in kept:
                    self._freeze(l)
                self._fail(node, "concatenates constants with channels last or flattened, "
                           "or along the frames of more than one tensor")
            for x, l in zip(tensors, lays):
                if l is CONST and not self._constant_piece(node, x, kept[0], shape):
                    self._freeze(kept[0])
            return kept[0]
        if not all(isinstance(l, Layout) for l in lays):
            self._fail(node, "concatenates a tensor without a tracked channel dimension")
        if dim != 0 and all(set(l.ids) <= self._frozen_ids for l in lays) and \
                (dim != 1 or any(l.channels_last for l in lays)):
            return self._new_space(shape[1], None, True)   # kept channels, any axis
        if self._fine and all(l.unflattened_last for l in lays):
            if dim == nd - 1:      # the channels of frames (a bidirectional layer's two halves)
                return Layout(tuple(i for l in lays for i in l.ids), 1, True)
            return self._lined_up(node, lays)  # frames after frames: the channels line up
        if any(l.channels_last for l in lays):
            self._fail(node, "concatenates tensors with the channels on the last axis")
        if dim == 1:
            if len({l.repeat for l in lays}) != 1:
                # flattened maps of several sizes (a spatial pyramid's pools): their channels
                # are kept, the features are a new space
                for l in lays:
                    self._freeze(l)
                return self._new_space(shape[1], None, True)
            return Layout(tuple(i for l in lays for i in l.ids), lays[0].repeat)
        if dim == 0 or nd == 4:  # batch or spatial concat: channels line up one to one
            return self._lined_up(node, lays)
        self._fail(node, f"concatenation along dim {dim}")

    def _constant_piece(self, node: fx.Node, piece: fx.Node, lay: Layout, shape) -> bool:
        """Whether constant `piece` of concatenation `node` along the frames of `lay` (a class
        token, or the token expanded over the batch) is a parameter with a value per channel:
        then it prunes with them (surgery cuts it)."""
        source = piece.args[0] if piece.op == "call_method" and piece.target == "expand" \
            else piece
        if not self._fine or source.op != "get_attr" or not lay.unflattened_last:
            return False
        cs = tuple(_fetch_attr(self.gm, source.target).shape)
        if len(cs) != len(shape) or cs[-1] != len(lay.ids):
            return False
        reader = piece.name if source is not piece else node.name
        self._const_reads.setdefault(source.target, []).append((reader, lay, len(cs) - 1))
        return True

    def _lined_up(self, node: fx.Node, lays: list[Layout]) -> Layout:
        """Pieces concatenated along an axis other than the channels: channel i of every piece
        is one."""
        for l in lays[1:]:
            if len(l.ids) != len(lays[0].ids):
                self._fail(node, "concatenated tensors differ in channels")
            for i, j in zip(lays[0].ids, l.ids):
                self._union(i, j)
        return lays[0]

    def _reshape(self, node: fx.Node, shape):
        in_shape = self._shape(node.args[0])
        if in_shape is None:
            self._fail(node, "reshape of an unknown shape")
        if tuple(shape) == tuple(in_shape):
            self.same_shape_reshapes.append(node.name)
            return self._input_layout(node, channels_last_ok=True)
        lay = self._layout_of(node.args[0])
        if isinstance(lay, Layout) and lay.repeat == 1 and not lay.channels_last and \
                len(shape) == len(in_shape) + 1 >= 4 and tuple(shape[:1]) == in_shape[:1] and \
                shape[1] * shape[2] == in_shape[1] and tuple(shape[3:]) == in_shape[2:] and \
                self._shuffles(node):
            return self._grouped(lay, int(shape[1]), node.name, tuple(shape))
        if len(shape) == 1 and shape[0] == in_shape[0] and isinstance(lay, Layout):
            self._freeze(lay)        # one value per sample ((N, 1) -> (N,)): its channel kept
            return None
        if len(in_shape) >= 3 and len(shape) == 2 and shape[0] == in_shape[0]:
            self.flatten_nodes.append(node.name)
            return self._flatten(node, 1, -1)
        lay = self._layout_of(node.args[0])
        if self._fine and len(in_shape) == 4 and tuple(shape) == (
                in_shape[0], in_shape[1] * in_shape[2], in_shape[3]) and \
                isinstance(lay, Layout) and not lay.channels_last and lay.repeat == 1:
            out = self._flatten(node, 1, 2)      # x.flatten(1, 2) as ONNX writes it
            self.expand_nodes[node.name] = (out, tuple(shape[2:]))
            return out
        if isinstance(lay, Layout) and lay.unflattened_last and len(shape) >= 2 and \
                [d for d in shape[1:-1] if d != 1] == [d for d in in_shape[1:-1] if d != 1] \
                and shape[-1] == in_shape[-1] and shape[0] == in_shape[0]:
            # unit axes in or out before the channels on the last axis (a 1-D model's frames
            # (N, T, 1, E) <-> (N, T, E)): they stay last
            self.last_axis_reshapes[node.name] = (lay, tuple(shape))
            return Layout(lay.ids, 1, len(shape) > 2)
        if (len(in_shape) >= 2 and len(shape) >= 2 and tuple(shape[:2]) == tuple(in_shape[:2])
                and isinstance(lay, Layout) and not lay.channels_last):
            # channel weights made broadcastable (SE blocks), or the positions merged
            # (x.view(n, c, -1)): the channels stay on axis 1
            if lay.repeat != 1:
                self._fail(node, "reshape of flattened conv features back to channels")
            self.expand_nodes[node.name] = (lay, tuple(shape[2:]))
            return lay
        if self._fine and isinstance(lay, Layout) and lay.unflattened_last and \
                shape[0] == in_shape[0]:
            if _non_unit(shape[1:-2]) == _non_unit(in_shape[1:-1]) and \
                    shape[-2] * shape[-1] == in_shape[-1]:
                # (..., C) -> (..., h, d), unit axes aside: attention's heads (or its queries,
                # keys and values from one projection). Channel j of every head is one unit
                # (each head keeps as many), carried on the last axis
                h, d = shape[-2], shape[-1]
                for j in range(d):
                    for i in range(1, h):
                        self._union(lay.ids[j], lay.ids[i * d + j])
                out = Layout(lay.ids[:d], 1, True)
                self.head_reshapes[node.name] = (out, tuple(shape), 1)
                return out
            if _non_unit(shape[1:-1]) == _non_unit(in_shape[1:-2]) and \
                    shape[-1] == in_shape[-2] * in_shape[-1]:
                # (..., h, d) -> (..., h * d): the heads merged, unit j at every head
                h = in_shape[-2]
                self.head_reshapes[node.name] = (lay, tuple(shape), h)
                return Layout(lay.ids * h, 1, True)
        if shape[0] != in_shape[0] or len(shape) < 2:
            self._fail(node, f"reshape {in_shape} -> {tuple(shape)} changes the batch axis")
        if self._fine and len(in_shape) == 2 and tuple(shape) == (in_shape[0], 1, in_shape[1]) \
                and isinstance(lay, Layout) and lay.repeat == 1 and not lay.channels_last:
            return Layout(lay.ids, 1, True)     # h.unsqueeze(1): a sequence's frame, to be
            #                                     concatenated with the others over time
        if (len(in_shape) == 2 and len(shape) >= 3 and isinstance(lay, Layout)
                and lay.repeat == 1 and not lay.channels_last):
            # features unflattened to maps (a decoder's Linear -> (N, C, H, W)): channel c is
            # features c*S .. c*S+S-1, one unit of the layer before
            s = int(np.prod(shape[2:]))
            for c in range(shape[1]):
                for k in range(1, s):
                    self._union(lay.ids[c * s], lay.ids[c * s + k])
            out = Layout(tuple(lay.ids[c * s] for c in range(shape[1])))
            self.expand_nodes[node.name] = (out, tuple(shape[2:]))
            return out
        return self._kept(self._input_layout(node, channels_last_ok=True), shape)

    def _grouped(self, lay: Layout, groups: int, split: str | None = None,
                 shape=None) -> Grouped:
        """`lay`'s channels as `groups` groups, channel j of every group one unit (a shuffle
        moves them together); `split`: the reshape that splits them, rewritten by surgery."""
        d = len(lay.ids) // groups
        for j in range(d):
            for i in range(1, groups):
                self._union(lay.ids[j], lay.ids[i * d + j])
        if split is not None:
            self.group_reshapes[split] = (Layout(lay.ids[:d]), shape, groups, True)
        return Grouped(lay, groups)

    def _ungrouped(self, node: fx.Node, grouped: Grouped, shape) -> Layout:
        """The groups merged back into (N, C, ...): after the swap, channel j * G + i is
        channel i * C / G + j."""
        ids, g = grouped.layout.ids, grouped.groups
        self.group_reshapes[node.name] = (Layout(ids[:len(ids) // g]), tuple(shape), g, False)
        return Layout(_shuffled(ids, g)) if grouped.swapped else grouped.layout

    def _channel_shuffle(self, node: fx.Node, groups: int, shape) -> Layout:
        """nn.ChannelShuffle / F.channel_shuffle: the same permutation, its units whole, so
        the pruned channels still shuffle as G groups."""
        lay = self._input_layout(node, 4)
        if lay.repeat != 1 or lay.channels_last:
            return self._kept(lay, shape)
        self._grouped(lay, groups)
        return Layout(_shuffled(lay.ids, groups))

    def _shuffles(self, node: fx.Node) -> bool:
        """`node` splits the channels into groups for a channel shuffle: what reads it (past
        contiguous()) swaps the two group axes and nothing else, and what reads that merges
        them back into the input's shape."""
        def readers(n: fx.Node) -> list[fx.Node]:
            out = []
            for u in n.users:
                out += readers(u) if _is_copy(u) else [u]
            return out

        swaps = readers(node)
        nd = len(self._shape(node))
        if len(swaps) != 1 or swaps[0].target not in (torch.permute, torch.transpose,
                                                      "permute", "transpose") or \
                _perm(swaps[0], nd) != [0, 2, 1, *range(3, nd)]:
            return False
        merges = readers(swaps[0])
        in_shape = self._shape(node.args[0])
        return bool(merges) and all(
            m.target in (torch.reshape, "view", "reshape", torch.flatten, "flatten")
            and m.args[0] in (swaps[0], *[u for u in swaps[0].users if _is_copy(u)])
            and self._shape(m) == in_shape for m in merges)

    def _kept(self, lay: Layout, shape) -> Layout:
        """A reshape or permute that regroups the channels (a channel shuffle's
        (N, C, H, W) -> (N, G, C/G, H, W)): pruning would change the shapes it is written
        for, so its input channels are kept and its output is a new space of kept channels."""
        self._freeze(lay)
        return self._new_space(shape[1], None, True)

    def _mean(self, node: fx.Node, shape, source: fx.Node | None = None, dims=None):
        """A mean, max or sum over `dims` of `source` (default: the node's own arguments)."""
        source = source or node.args[0]
        in_shape = self._shape(source)
        if dims is None:
            dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        dims = (dims,) if isinstance(dims, int) else tuple(dims or ())
        dims = {d % len(in_shape) for d in dims}
        lay = self._layout_of(source)
        if not isinstance(lay, Layout):
            self._fail(node, "its input has no channel dimension the analysis understands")
        if set(lay.ids) <= self._frozen_ids and 0 not in dims and len(shape) >= 2:
            return self._kept(lay, shape)     # kept channels, wherever they are now
        channel_axis = len(in_shape) - 1 if lay.channels_last else 1
        if dims and 0 not in dims and channel_axis not in dims:
            if len(shape) == 2:
                return Layout(lay.ids, 1) if lay.repeat == 1 else self._fail(node, "mean of "
                                                                            "flattened tensor")
            if lay.unflattened_last and len(shape) < len(in_shape):   # no keepdim
                return lay if len(shape) > 2 else Layout(lay.ids)   # the channels stay last
            if lay.channels_last:
                self._fail(node, "a mean that keeps the axes of a channels-last tensor")
            return lay
        if dims and 0 not in dims and len(shape) >= 2:
            # over the channels (CBAM's spatial attention: mean and max of all channels): a
            # pruned channel would change every value, so they are kept
            return self._kept(lay, shape)
        self._fail(node, "a mean or max over the batch axis, or over every axis")

    # ---- groups
    def _build_groups(self) -> None:
        self._freeze_uneven_grouped_convs()
        roots_frozen = {self._find(i) for i in self._frozen_ids}
        # unit = union-find root; the spaces (producer layers) it touches
        n_spaces = len(self._sizes)
        space_of = np.zeros(len(self._parent), dtype=np.int64)
        for s, start in enumerate(self._space_start):
            space_of[start:start + self._sizes[s]] = s
        unit_spaces: dict[int, set[int]] = {}
        for cid in range(len(self._parent)):
            r = self._find(cid)
            unit_spaces.setdefault(r, set()).add(int(space_of[cid]))
        # padded constant channels that no layer's channels are tied to stay
        for lay in (side for sides in self.channel_pads.values() for side in sides):
            roots_frozen.update(r for r in map(self._find, lay.ids)
                                if not any(self._space_layer[s] for s in unit_spaces[r]))
        # spaces tied by units form a group
        sp_parent = list(range(n_spaces))

        def sfind(a):
            while sp_parent[a] != a:
                sp_parent[a] = sp_parent[sp_parent[a]]
                a = sp_parent[a]
            return a
        for spaces in unit_spaces.values():
            spaces = sorted(spaces)
            for s in spaces[1:]:
                ra, rb = sfind(spaces[0]), sfind(s)
                if ra != rb:
                    sp_parent[max(ra, rb)] = min(ra, rb)
        group_units: dict[int, list[int]] = {}
        for r, spaces in sorted(unit_spaces.items()):
            group_units.setdefault(sfind(next(iter(spaces))), []).append(r)
        self.frozen_roots = roots_frozen
        self.groups: list[Group] = []
        self.unit_of_root: dict[int, tuple[int, int]] = {}  # root -> (group index, unit index)
        for gkey in sorted(group_units):
            roots = [r for r in group_units[gkey] if r not in roots_frozen]
            if not roots:
                continue
            producers = [self._space_layer[s] for s in range(n_spaces)
                         if sfind(s) == gkey and self._space_layer[s]]
            g = Group(len(self.groups), producers[0] if producers else f"group{gkey}", len(roots))
            for u, r in enumerate(roots):
                self.unit_of_root[r] = (g.index, u)
            self.groups.append(g)
        for layer in self.layers.values():
            self._add_members(layer)

    def _freeze_uneven_grouped_convs(self) -> None:
        """A grouped conv whose units do not each hold one channel of every group (other ties
        merged channels across its groups unevenly) keeps its channels: removing a unit must
        leave every group the same size."""
        for layer in self.layers.values():
            if layer.kind != "gconv":
                continue
            g = layer.module.groups
            for layout in (layer.in_layout, layer.out_layout):
                per = len(layout.ids) // g
                count: dict[int, list[int]] = {}
                for pos, cid in enumerate(layout.ids):
                    count.setdefault(self._find(cid), [0] * g)[pos // per] += 1
                if any(len(set(c)) != 1 for c in count.values()):
                    self._freeze(layer.in_layout)
                    self._freeze(layer.out_layout)
                    break

    def _positions(self, layout: Layout, expand: bool) -> dict[int, dict[int, list[int]]]:
        """group -> unit -> positions of that unit in `layout`."""
        out: dict[int, dict[int, list[int]]] = {}
        items = layout.positions() if expand else list(enumerate(layout.ids))
        for pos, cid in items:
            gu = self.unit_of_root.get(self._find(cid))
            if gu is not None:
                out.setdefault(gu[0], {}).setdefault(gu[1], []).append(pos)
        return out

    def _add_members(self, layer: Layer) -> None:
        roles = []
        if layer.kind in ("conv", "gconv", "linear"):
            roles += [("out", layer.out_layout, False), ("in", layer.in_layout, True)]
        elif layer.kind == "groupwise":   # its inputs are its units' own, not columns
            roles += [("out", layer.out_layout, False)]
        elif layer.kind in ("bn", "gn", "dwconv", "prelu", "ln"):
            role = {"bn": "bn", "gn": "gn", "dwconv": "dw", "prelu": "prelu", "ln": "ln"}[
                layer.kind]
            roles += [(role, layer.in_layout, False)]
        for role, lay, expand in roles:
            for gi, units in self._positions(lay, expand).items():
                g = self.groups[gi]
                g.members.append(Member(layer.name, role,
                                        [units.get(u, []) for u in range(g.units)]))

    # ---- queries
    def group(self, name: str) -> Group:
        for g in self.groups:
            if g.name == name or name in g.layers:
                return g
        raise GraphError(f"no prunable layer '{name}'; prunable: {', '.join(self.layer_names())}")

    def layer_names(self) -> list[str]:
        return [n for g in self.groups for n in g.layers]

    def with_every_piece(self, keep: dict[int, list[int] | np.ndarray],
                         scores: dict[int, torch.Tensor] | None = None) -> dict:
        """`keep` with one more unit (the best scored; else the first) in each channel piece
        or layer's outputs it would empty: a channel split keeps a channel on every side, a
        layer whose outputs share a group with other layers' (branches concatenated, then
        added to another conv's maps) one output."""
        keep = {g: sorted(int(u) for u in us) for g, us in keep.items()}
        pieces = [lay.ids[piece.start:piece.stop] for lay, piece in self.channel_slices.values()]
        pieces += [layer.out_layout.ids for layer in self.layers.values()
                   if layer.out_layout is not None and layer.out_layout.ids and
                   layer.kind in ("conv", "gconv", "groupwise", "linear")]
        for ids in pieces:
            if any(self.alive(cid, keep) for cid in ids):
                continue
            units = sorted({self.unit_of_root[self._find(cid)] for cid in ids})
            best = max(units, key=lambda gu: float(scores[gu[0]][gu[1]])) if scores else units[0]
            keep[best[0]] = sorted(set(keep[best[0]]) | {best[1]})
        return keep

    def alive(self, cid: int, keep: dict[int, list[int] | np.ndarray]) -> bool:
        """Whether channel id `cid` survives when `keep` (group -> kept units) is applied."""
        gu = self.unit_of_root.get(self._find(cid))
        return gu is None or gu[0] not in keep or gu[1] in keep[gu[0]]

    def keep_mask(self, keep: dict[int, list[int] | np.ndarray]) -> dict[str, dict[str, list[int]]]:
        """Per layer, the positions kept along "out" and "in" given kept units per group."""
        kept_units = {gi: set(int(u) for u in us) for gi, us in keep.items()}

        def alive(cid: int) -> bool:
            return self.alive(cid, kept_units)
        out = {}
        for name, layer in self.layers.items():
            rec = {}
            if layer.in_layout is not None:
                rec["in"] = [p for p, cid in layer.in_layout.positions() if alive(cid)]
                rec["in_before"] = len(layer.in_layout.ids) * layer.in_layout.repeat
            if layer.out_layout is not None and layer.kind in ("conv", "gconv", "groupwise",
                                                                 "linear", "frozen"):
                rec["out"] = [i for i, cid in enumerate(layer.out_layout.ids) if alive(cid)]
                rec["out_before"] = len(layer.out_layout.ids)
            out[name] = rec
        return out


def _is_copy(node: fx.Node) -> bool:
    """A call that copies a tensor as it is (a channel shuffle's transpose(...).contiguous())."""
    return (node.op == "call_method" and node.target in ("contiguous", "clone")) or \
        (node.op == "call_function" and node.target is torch.clone)


def _perm(node: fx.Node, nd: int) -> list[int]:
    """The axes a permute or transpose of an `nd`-D tensor puts in order."""
    if node.target in (torch.transpose, "transpose"):   # two axes swapped
        perm = list(range(nd))
        i, j = (int(d) % nd for d in (node.args[1:3] or (node.kwargs.get("dim0"),
                                                           node.kwargs.get("dim1"))))
        perm[i], perm[j] = perm[j], perm[i]
        return perm
    rest = node.args[1:] or (node.kwargs.get("dims"),)
    perm = rest[0] if len(rest) == 1 and isinstance(rest[0], (tuple, list)) else rest
    return [int(d) % nd for d in perm]


def _shuffled(ids: tuple, groups: int) -> tuple:
    """`ids` after a channel shuffle: channel j * G + i is channel i * C / G + j."""
    d = len(ids) // groups
    return tuple(ids[i * d + j] for j in range(d) for i in range(groups))


def _adds_trailing_axes(index) -> bool:
    """An index like [:, :, None, None]: every axis kept whole, new axes only after them."""
    if not isinstance(index, tuple):
        return False
    full = [isinstance(i, slice) and i == slice(None) for i in index]
    first_none = index.index(None) if None in index else len(index)
    return first_none >= 2 and all(full[:first_none]) and \
        all(i is None for i in index[first_none:])


def _fetch_attr(gm: fx.GraphModule, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj if isinstance(obj, torch.Tensor) else torch.as_tensor(obj)


# ---------------------------------------------------------------- surgery

def _idx(positions: list[int]) -> torch.Tensor:
    return torch.as_tensor(positions, dtype=torch.long)


def _new_conv(m: nn.Conv2d, keep_out: list[int], keep_in: list[int], depthwise: bool) -> nn.Conv2d:
    if depthwise:
        c = len(keep_in)
        new = nn.Conv2d(c, c, m.kernel_size, m.stride, m.padding, m.dilation, groups=c,
                        bias=m.bias is not None, padding_mode=m.padding_mode)
        w = m.weight.data[_idx(keep_in)]
        b = m.bias.data[_idx(keep_in)] if m.bias is not None else None
    else:
        new = nn.Conv2d(len(keep_in), len(keep_out), m.kernel_size, m.stride, m.padding,
                        m.dilation, groups=1, bias=m.bias is not None,
                        padding_mode=m.padding_mode)
        w = m.weight.data[_idx(keep_out)][:, _idx(keep_in)]
        b = m.bias.data[_idx(keep_out)] if m.bias is not None else None
    new.weight.data.copy_(w)
    if b is not None:
        new.bias.data.copy_(b)
    return new.to(m.weight.dtype)


def _new_grouped_conv(m: nn.Conv2d, keep_out: list[int], keep_in: list[int]) -> nn.Conv2d:
    """The grouped conv on the kept channels: every group keeps as many inputs and outputs
    (the graph ties channel j of each group into one unit); each output row takes the kept
    inputs of its own group."""
    g = m.groups
    ci, co = m.in_channels // g, m.out_channels // g
    local = [[p - k * ci for p in keep_in if k * ci <= p < (k + 1) * ci] for k in range(g)]
    if len({len(x) for x in local}) != 1 or len(keep_out) % g:
        raise GraphError(f"grouped conv would be left with uneven groups ({[len(x) for x in local]}"
                         f" inputs, {len(keep_out)} outputs over {g} groups)")
    new = nn.Conv2d(len(keep_in), len(keep_out), m.kernel_size, m.stride, m.padding, m.dilation,
                    groups=g, bias=m.bias is not None, padding_mode=m.padding_mode)
    w = torch.stack([m.weight.data[o][_idx(local[o // co])] for o in keep_out])
    new.weight.data.copy_(w)
    if m.bias is not None:
        new.bias.data.copy_(m.bias.data[_idx(keep_out)])
    return new.to(m.weight.dtype)


def _new_groupwise_conv(m: nn.Conv2d, keep_out: list[int], keep_in: list[int]) -> nn.Conv2d:
    """The conv on the groups kept whole (the graph made each group one unit)."""
    ci, co = m.in_channels // m.groups, m.out_channels // m.groups
    groups = len(keep_out) // co
    if len(keep_out) % co or len(keep_in) != groups * ci:
        raise GraphError(f"grouped conv would be left with part of a group ({len(keep_in)} "
                         f"inputs, {len(keep_out)} outputs; {ci} and {co} per group)")
    new = nn.Conv2d(len(keep_in), len(keep_out), m.kernel_size, m.stride, m.padding, m.dilation,
                    groups=groups, bias=m.bias is not None, padding_mode=m.padding_mode)
    new.weight.data.copy_(m.weight.data[_idx(keep_out)])
    if m.bias is not None:
        new.bias.data.copy_(m.bias.data[_idx(keep_out)])
    return new.to(m.weight.dtype)


def _new_bn(m: nn.BatchNorm2d | nn.BatchNorm1d, keep: list[int]) -> nn.Module:
    new = type(m)(len(keep), m.eps, m.momentum, m.affine, m.track_running_stats)
    i = _idx(keep)
    if m.affine:
        new.weight.data.copy_(m.weight.data[i])
        new.bias.data.copy_(m.bias.data[i])
    if m.track_running_stats:
        new.running_mean.copy_(m.running_mean[i])
        new.running_var.copy_(m.running_var[i])
        new.num_batches_tracked.copy_(m.num_batches_tracked)
    return new


def _new_group_norm(m: nn.GroupNorm, keep: list[int]) -> nn.GroupNorm:
    """`m` over the channels `keep`: whole groups (DepGraph made each group one unit)."""
    per = m.num_channels // m.num_groups
    new = nn.GroupNorm(len(keep) // per, len(keep), m.eps, m.affine)
    if m.affine:
        new.weight.data.copy_(m.weight.data[_idx(keep)])
        new.bias.data.copy_(m.bias.data[_idx(keep)])
    return new


def _new_layer_norm(m: nn.LayerNorm | nn.RMSNorm, keep: list[int]) -> nn.Module:
    """`m` over the channels `keep` (its statistics over them alone)."""
    i = _idx(keep)
    if isinstance(m, nn.RMSNorm):
        new = nn.RMSNorm(len(keep), m.eps, m.elementwise_affine)
    else:
        new = nn.LayerNorm(len(keep), m.eps, m.elementwise_affine, bias=m.bias is not None)
    if m.weight is not None:
        new.weight.data.copy_(m.weight.data[i])
    if getattr(m, "bias", None) is not None:
        new.bias.data.copy_(m.bias.data[i])
    return new.to(m.weight.dtype if m.weight is not None else torch.float32)


def _new_linear(m: nn.Linear, keep_out: list[int], keep_in: list[int]) -> nn.Linear:
    new = nn.Linear(len(keep_in), len(keep_out), bias=m.bias is not None)
    new.weight.data.copy_(m.weight.data[_idx(keep_out)][:, _idx(keep_in)])
    if m.bias is not None:
        new.bias.data.copy_(m.bias.data[_idx(keep_out)])
    return new.to(m.weight.dtype)


def surgery(graph: DepGraph, keep: dict[int, list[int]]) -> tuple[fx.GraphModule, dict]:
    """A new GraphModule with the units not in `keep` (group index -> kept unit indices)
    physically removed, and per-layer kept positions. The input model is left unchanged."""
    keep = graph.with_every_piece(keep)
    for gi, units in keep.items():
        if len(units) == 0:
            g = graph.groups[gi]
            raise GraphError(f"pruning would remove every channel of layer '{g.name}'")
    masks = graph.keep_mask(keep)
    gm = copy.deepcopy(graph.gm)
    for name, layer in graph.layers.items():
        rec = masks[name]
        m = gm.get_submodule(name)
        if layer.kind == "conv":
            new = _new_conv(m, rec["out"], rec["in"], False)
        elif layer.kind == "gconv":
            new = _new_grouped_conv(m, rec["out"], rec["in"])
        elif layer.kind == "groupwise":
            new = _new_groupwise_conv(m, rec["out"], rec["in"])
        elif layer.kind == "dwconv":
            new = _new_conv(m, rec["in"], rec["in"], True)
        elif layer.kind == "bn":
            new = _new_bn(m, rec["in"])
        elif layer.kind == "gn":
            new = _new_group_norm(m, rec["in"])
        elif layer.kind == "ln":
            new = _new_layer_norm(m, rec["in"])
        elif layer.kind == "prelu":
            new = nn.PReLU(len(rec["in"]))
            new.weight.data.copy_(m.weight.data[_idx(rec["in"])])
        elif layer.kind == "linear":
            new = _new_linear(m, rec["out"], rec["in"])
        else:
            continue
        new.train(m.training)
        _set(gm, name, new)
    # view/reshape with baked-in feature counts become flatten(x, 1), or a reshape to the
    # channels kept
    for node in gm.graph.nodes:
        if node.name in graph.flatten_nodes:
            node.op, node.target = "call_function", torch.flatten
            node.args, node.kwargs = (node.args[0], 1), {}
        elif node.name in graph.expand_nodes:
            layout, tail = graph.expand_nodes[node.name]
            kept = sum(graph.alive(cid, keep) for cid in layout.ids)
            node.op, node.target = "call_function", torch.reshape
            node.args, node.kwargs = (node.args[0], (-1, kept, *tail)), {}
        elif node.name in graph.channel_slices:   # the piece of the channels kept
            layout, piece = graph.channel_slices[node.name]
            alive = [graph.alive(cid, keep) for cid in layout.ids]
            source = next(n for n in gm.graph.nodes if n.name == piece.source.name)
            node.op, node.target = "call_function", torch.narrow
            node.args = (source, piece.axis, sum(alive[:piece.start]),
                         sum(alive[piece.start:piece.stop]))
            node.kwargs = {}
        elif node.name in graph.last_axis_reshapes:
            layout, shape = graph.last_axis_reshapes[node.name]
            kept = sum(graph.alive(cid, keep) for cid in layout.ids)
            node.op, node.target = "call_function", torch.reshape
            node.args, node.kwargs = (node.args[0], (-1, *shape[1:-1], kept)), {}
        elif node.name in graph.key_reshapes:
            layout, shape = graph.key_reshapes[node.name]
            kept = sum(graph.alive(cid, keep) for cid in layout.ids)
            node.op, node.target = "call_function", torch.reshape
            node.args, node.kwargs = (node.args[0], (-1, *shape[1:-2], kept, shape[-1])), {}
        elif node.name in graph.head_reshapes:
            layout, shape, heads = graph.head_reshapes[node.name]
            kept = sum(graph.alive(cid, keep) for cid in layout.ids)
            node.op, node.target = "call_function", torch.reshape
            node.args, node.kwargs = (node.args[0], (-1, *shape[1:-1], kept * heads)), {}
        elif node.name in graph.group_reshapes:
            units, shape, groups, split = graph.group_reshapes[node.name]
            kept = sum(graph.alive(cid, keep) for cid in units.ids)
            node.op, node.target = "call_function", torch.reshape
            node.args = (node.args[0], (-1, groups, kept, *shape[3:]) if split else
                         (-1, groups * kept, *shape[2:]))
            node.kwargs = {}
        elif node.name in graph.channel_pads:
            before, after = (sum(graph.alive(cid, keep) for cid in side.ids)
                             for side in graph.channel_pads[node.name])
            pad = node.args[1] if len(node.args) > 1 else node.kwargs["pad"]
            node.args = (node.args[0], (*pad[:-2], before, after), *node.args[2:])
            node.kwargs = {k: v for k, v in node.kwargs.items() if k != "pad"}
        elif node.name in graph.same_shape_reshapes:
            node.replace_all_uses_with(node.args[0])
    _fold_sizes(gm, graph)
    for target, (layout, axis) in graph.channel_consts.items():
        kept = [i for i, cid in enumerate(layout.ids) if graph.alive(cid, keep)]
        _set_tensor(gm, target, _fetch_attr(gm, target).index_select(axis, _idx(kept)))
    gm.graph.eliminate_dead_code()      # a split whose pieces are narrows now
    gm.recompile()
    gm.train(graph.model.training)
    return gm, masks


def _non_unit(dims) -> list[int]:
    return [int(d) for d in dims if d != 1]


def _fold_sizes(gm: fx.GraphModule, graph: DepGraph) -> None:
    """Sizes read from tensors (`n, t, c = x.shape`, `x.size(-1)`) become the unpruned model's
    numbers, but the batch's: what the model derives from them (a head's width `c // h`, a
    reshape of another tensor, a scale `d ** -0.5`) stays what it was when some tensor it was
    read from lost channels."""
    original = {n.name: graph._shape(n) for n in graph.gm.graph.nodes}

    def static(source: fx.Node, axis) -> int | None:
        shape = original.get(source.name)
        if not isinstance(axis, int) or shape is None or not -len(shape) <= axis < len(shape):
            return None
        axis %= len(shape)
        return None if axis == 0 else int(shape[axis])
    for node in list(gm.graph.nodes):
        value = None
        if node.op == "call_method" and node.target == "size" and len(node.args) > 1:
            value = static(node.args[0], node.args[1])
        elif node.op == "call_function" and node.target is operator.getitem and \
                isinstance(node.args[0], fx.Node) and len(node.args) == 2:
            shaped = node.args[0]
            if (shaped.op == "call_function" and shaped.target is getattr
                    and shaped.args[1:] == ("shape",)) or \
                    (shaped.op == "call_method" and shaped.target == "size"
                     and len(shaped.args) == 1):
                value = static(shaped.args[0], node.args[1])
        if value is not None:
            node.replace_all_uses_with(value)


def _set_tensor(root: nn.Module, name: str, value: torch.Tensor) -> None:
    """Replace the parameter, buffer or plain tensor attribute `name` of `root` by `value`."""
    parent, _, attr = name.rpartition(".")
    owner = root.get_submodule(parent) if parent else root
    if attr in owner._parameters:
        old = owner._parameters[attr]
        owner._parameters[attr] = nn.Parameter(value.detach().clone(), old.requires_grad)
    elif attr in owner._buffers:
        owner._buffers[attr] = value.detach().clone()
    else:
        setattr(owner, attr, value.detach().clone())


def _set(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, attr, new)
