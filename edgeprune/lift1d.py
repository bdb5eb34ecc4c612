"""Run a 1-D model (Conv1d on (N, C, L) signals) as the 2-D model it equals: (N, C, 1, L).

Every later stage (pruning, quantization, the int8 kernels, the golden model) works on 2-D
convolutions; a Conv1d is a Conv2d with a 1 x k kernel, and an (N, C, L) tensor has the same
bytes as (N, C, 1, L), so the firmware's input and output buffers do not change. Each node
that carries a 3-D tensor is rewritten to its 2-D form (the unit height is always axis 2: a
Keras model's (N, L, C) input becomes (N, L, 1, C), its permutes permute around the height);
an op that cannot be (a transpose of two axes, a 1-D op we do not know) is named in an error
rather than guessed.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from .errors import EdgepruneError
from .layers import (AttentionAsOps, ConvTransposeAsConv, EncoderAsOps, EncoderLayerAsOps,
                     FrameLayersWhole, RecurrentAsOps)
from .prune.graph import (BINARY_FUNCTIONS, BINARY_METHODS, PASSTHROUGH_FUNCTIONS,
                          PASSTHROUGH_METHODS, PASSTHROUGH_MODULES, SPATIAL_FUNCTIONS,
                          SPATIAL_MODULES)
from .slicing import ShapeAndSizeProp, is_min_values, is_split, max_values_of, returns_indices

STAGE = "load"

# ops that act element by element (or broadcast), the same at any rank: those the pruning
# graph passes channels through, less the 2-D spatial ones
_ELEMENTWISE_MODULES = tuple(m for m in PASSTHROUGH_MODULES if m not in SPATIAL_MODULES) + (
    nn.LayerNorm,)   # over the last axis, L in both forms
_ELEMENTWISE_FUNCTIONS = (PASSTHROUGH_FUNCTIONS - SPATIAL_FUNCTIONS - {F.dropout2d, F.dropout3d}
                          | BINARY_FUNCTIONS | {torch.where})
_ELEMENTWISE_METHODS = PASSTHROUGH_METHODS | BINARY_METHODS
_DIM_OPS = {"mean", "sum", "amax", "amin", "softmax", "log_softmax"}   # (x, dim=...) along an axis


# layers (already lowered) that run on frames, not on the signal: each stays one call here,
# its (N, T, F) inputs made so again and its ops left as they are
_FRAME_LAYERS = (RecurrentAsOps, AttentionAsOps, EncoderLayerAsOps, EncoderAsOps)


def is_1d(model: nn.Module) -> bool:
    """Whether `model` has a 1-D layer: a conv, or a pool (also after a 2-D model's mean over
    the height)."""
    return any(isinstance(m, (nn.Conv1d, nn.ConvTranspose1d, nn.MaxPool1d, nn.AvgPool1d,
                              nn.AdaptiveAvgPool1d, nn.AdaptiveMaxPool1d))
               for m in model.modules())


def lift_1d(model: nn.Module, shape: tuple[int, ...]) -> tuple[fx.GraphModule, tuple[int, ...]]:
    """(the 2-D GraphModule, its input shape) of a 1-D model: an (N, C, L) input becomes
    (N, C, 1, L); an (N, L) one, made a signal inside the model, stays."""
    try:
        gm = fx.GraphModule(model, FrameLayersWhole().trace(model))
    except Exception as e:
        raise EdgepruneError(f"the 1-D model does not trace with torch.fx ({type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else ''})", stage=STAGE) from None
    _max_values_as_amax(gm)
    ShapeAndSizeProp(gm).propagate(torch.zeros(shape))
    modules = dict(gm.named_modules())
    # which nodes read a signal, decided before the rewrite adds nodes without shapes
    reads_signal = {n: any(_rank(a) == 3 for a in n.all_input_nodes) for n in gm.graph.nodes}

    for node in list(gm.graph.nodes):
        if node.op == "get_attr" and _rank(node) == 3:   # a constant (1, C, 1), (1, T, F)
            _lift_constant(gm, node)
            continue
        if node.op in ("placeholder", "output", "get_attr"):
            continue
        where = f"node '{node.name}' ({_describe(node, modules)})"
        if _is(node, operator.getitem, None) and isinstance(node.args[0], fx.Node) \
                and is_split(node.args[0]):
            continue   # a piece of a split: the split's axis is lifted
        if node.op == "call_module" and isinstance(modules[node.target], _FRAME_LAYERS):
            with gm.graph.inserting_before(node):   # frames (N, T, 1, F) -> (N, T, F)
                node.args = tuple(_frames(gm, a) for a in node.args)
            if _rank(node) == 3:       # an encoder's output frames, lifted like any (N, T, H)
                _add_height_after(gm, node)
            continue
        if _is(node, operator.getitem, None) and node.args[0].op == "call_module" and \
                isinstance(modules[node.args[0].target], _FRAME_LAYERS):
            if node.args[1] == 0:      # a recurrent layer's or an attention's output frames
                _add_height_after(gm, node)
            continue
        if not reads_signal[node]:
            # a signal made from a vector, (N, L) -> (N, 1, L), or from maps by a reduction
            # over their height or width, (N, C, H, W) -> (N, C, W), or by their channels and
            # height merged, x.flatten(1, 2) -> (N, C * H, W)
            if _rank(node) == 3:
                if not (_is(node, torch.reshape, "view") or _is(node, torch.reshape, "reshape")
                        or _is(node, torch.flatten, "flatten")
                        or _is(node, torch.unsqueeze, "unsqueeze")
                        or _is(node, torch.squeeze, "squeeze")
                        or getattr(node.target, "__name__", node.target) in
                        _DIM_OPS - {"softmax", "log_softmax"}):
                    raise _refuse(where, "makes a 3-D tensor")
                _add_height_after(gm, node)
            elif _is(node, getattr, None) and node.args[1] == "shape" and \
                    _rank(node.args[0]) == 3:
                _map_shape_reads(node, where)
            continue
        if node.op == "call_module":
            mod = modules[node.target]
            if isinstance(mod, nn.Flatten):
                if not (mod.start_dim in (1, -2) and mod.end_dim == -1):
                    raise _refuse(where, "flattens other than from the channel axis")
            elif not isinstance(mod, _ELEMENTWISE_MODULES):
                _set_module(gm, node.target, _module_2d(mod, where))
        elif node.op == "call_function" and node.target in _ELEMENTWISE_FUNCTIONS:
            pass
        elif node.target is F.pad and len(_arg(node, 1, "pad", ())) == 2:
            pass   # pads the last axis (L) alone, at any rank
        elif node.target is F.pad and len(_arg(node, 1, "pad", ())) == 4 and _rank(node) == 3:
            l0, l1, c0, c1 = _arg(node, 1, "pad", ())   # and the channels: height 1 unpadded
            node.args = (node.args[0], (l0, l1, 0, 0, c0, c1), *node.args[2:])
            node.kwargs = {k: v for k, v in node.kwargs.items() if k != "pad"}
        elif node.op == "call_method" and node.target in _ELEMENTWISE_METHODS:
            pass
        elif _is(node, torch.flatten, "flatten"):
            if not (_arg(node, 1, "start_dim", 0) in (1, -2) and _arg(node, 2, "end_dim", -1) == -1):
                raise _refuse(where, "flattens other than from the channel axis")
        elif _is(node, torch.permute, "permute"):
            _permute_dims(node, where)
        elif _is(node, torch.squeeze, "squeeze") and _rank(node) == 2:
            # (N, 1, F) or (N, C, 1) to (N, F): the lifted (N, 1, 1, F) or (N, C, 1, 1) alike
            node.op, node.target, node.args, node.kwargs = \
                "call_function", torch.flatten, (node.args[0], 1), {}
        elif _is(node, torch.transpose, "transpose") and \
                {_arg(node, 1, "dim0", 0) % 3, _arg(node, 2, "dim1", 0) % 3} == {1, 2}:
            # (N, C, L) -> (N, L, C), frames: (N, C, 1, L) -> (N, L, 1, C) as permutes do
            node.target, node.op = torch.permute, "call_function"
            node.args, node.kwargs = (node.args[0], (0, 3, 2, 1)), {}
        elif node.target in _POOL_FUNCTIONS_1D:
            _pool_function_2d(node, where)
        elif node.target is F.interpolate and _arg(node, 3, "mode", "nearest") in _RESIZE_2D:
            size, factor = _arg(node, 1, "size", None), _arg(node, 2, "scale_factor", None)
            mode = _RESIZE_2D[_arg(node, 3, "mode", "nearest")]
            kept = {k: _arg(node, i, k, None) for i, k in ((4, "align_corners"), (6, "antialias"))}
            node.args = (node.args[0],)
            length = _first(size)   # a constant, or computed from a shape in the graph
            node.kwargs = ({"size": (1, length if isinstance(length, fx.Node) else int(length))}
                           if size is not None else
                           {"scale_factor": (1.0, float(_first(factor)))}) | {
                "mode": mode, **{k: v for k, v in kept.items() if v is not None}}
        elif _is(node, torch.cat, None):
            _set_dim(node, 1, "dim", 0, where)
        elif is_split(node):
            _set_dim(node, 2, "dim", 0, where)
        elif _is(node, torch.narrow, "narrow"):
            _set_dim(node, 1, "dim", None, where)
        elif _is(node, operator.getitem, None) and isinstance(node.args[1], (slice, tuple)):
            node.args = (node.args[0], _index_2d(node.args[1], where))
        elif _is(node, None, "size") and _arg(node, 1, "dim", None) is not None:
            _set_dim(node, 1, "dim", None, where)
        elif _is(node, getattr, None) and node.args[1] == "shape":
            _map_shape_reads(node, where)
        elif _adds_the_height(node):   # (N, C, L) -> (N, C, 1, L): already the lifted form
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
        elif (_is(node, torch.unsqueeze, "unsqueeze") or _is(node, torch.reshape, "view")
              or _is(node, torch.reshape, "reshape")) and (_rank(node) or 0) > 3:
            # a higher tensor made of a signal (an ONNX attention's per-sample (N, 1, T, E) or
            # (N, T, H, d)): made of its 3-D form
            with gm.graph.inserting_before(node):
                node.args = (_frames(gm, node.args[0]), *node.args[1:])
        elif _is(node, torch.reshape, "view") or _is(node, torch.reshape, "reshape"):
            if _rank(node) == 3:   # (N, C, L) -> (N, C', L'): the same bytes, then height 1
                _add_height_after(gm, node)
            elif _rank(node) != 2:
                raise _refuse(where, "reshapes a signal to other than (N, C, L) or (N, features)")
        elif _is(node, torch.squeeze, "squeeze") and _arg(node, 1, "dim", None) in (2, -1):
            # (N, C, 1) -> (N, C): squeeze the unit height too
            node.args, node.kwargs = (node.args[0], (2, 3)), {}
        elif node.op in ("call_function", "call_method") and \
                getattr(node.target, "__name__", node.target) in _DIM_OPS:
            _reduce_dims(node, where)
        else:
            raise _refuse(where, "has no 2-D form edgeprune knows")
    gm.graph.lint()
    gm.recompile()
    if len(shape) == 3:
        n, c, length = shape
        shape = (n, c, 1, length)
    return gm.eval(), tuple(shape)


# functional 1-D pools: their 2-D function and argument names (after the input), in order
_POOL_FUNCTIONS_1D = {
    F.max_pool1d: (F.max_pool2d, ("kernel_size", "stride", "padding", "dilation", "ceil_mode")),
    F.avg_pool1d: (F.avg_pool2d, ("kernel_size", "stride", "padding", "ceil_mode",
                                  "count_include_pad")),
    F.adaptive_avg_pool1d: (F.adaptive_avg_pool2d, ("output_size",)),
    F.adaptive_max_pool1d: (F.adaptive_max_pool2d, ("output_size",)),
}


def _max_values_as_amax(gm: fx.GraphModule) -> None:
    """`x.max(dim).values` (or `[0]`, or min's) as `x.amax(dim)`: one tensor, an axis the
    lift maps like any reduction's. A max whose indices are read stays, and is refused."""
    for pair in [n for n in gm.graph.nodes if returns_indices(n)]:
        if not pair.users or not all(max_values_of(u) for u in pair.users):
            continue
        x, dim = max_values_of(next(iter(pair.users)))
        keepdim = bool(pair.kwargs.get("keepdim", pair.args[2] if len(pair.args) > 2 else False))
        amax = torch.amin if is_min_values(next(iter(pair.users))) else torch.amax
        with gm.graph.inserting_before(pair):
            reduced = gm.graph.call_function(amax, (x, dim, keepdim))
        for user in list(pair.users):
            user.replace_all_uses_with(reduced)
            gm.graph.erase_node(user)
        gm.graph.erase_node(pair)
    gm.recompile()


def _pool_function_2d(node: fx.Node, where: str) -> None:
    """F.max_pool1d(x, 3, 2) -> F.max_pool2d(x, (1, 3), (1, 2), (0, 0), ...): the window along
    L only (a padding of 0 and a dilation of 1 over the unit height)."""
    fn, names = _POOL_FUNCTIONS_1D[node.target]
    if _arg(node, len(names) + 1, "return_indices", False):
        raise _refuse(where, "returns indices")
    kw = {}
    for i, name in enumerate(names, start=1):
        v = _arg(node, i, name, None)
        if v is None:
            continue
        if name in ("kernel_size", "stride", "dilation", "output_size"):
            v = (1, _one(v))
        elif name == "padding":
            v = (0, _one(v))
        kw[name] = v
    node.target, node.args, node.kwargs = fn, (node.args[0],), kw


def _lift_constant(gm: fx.GraphModule, node: fx.Node) -> None:
    """A 3-D constant that broadcasts against signals, as its 2-D form (N, C, 1, L): a new
    attribute (trainable if it was), read in the old one's place."""
    value = getattr(gm.get_submodule(node.target.rpartition(".")[0]),
                    node.target.rpartition(".")[2])
    lifted = value.detach().unsqueeze(2).clone()
    name = node.target.replace(".", "_") + "_2d"
    setattr(gm, name, nn.Parameter(lifted, value.requires_grad)
            if isinstance(value, nn.Parameter) else lifted)
    node.target = name


def _frames(gm: fx.GraphModule, arg):
    """A frame layer's argument as (N, T, F) again: a lifted one squeezed, the frames another
    such layer made (lifted just now) as they came from it."""
    if isinstance(arg, fx.Node) and arg.target is torch.unsqueeze and arg.args[1] == 2 and \
            "tensor_meta" not in arg.meta:
        return arg.args[0]
    if isinstance(arg, fx.Node) and _rank(arg) == 3:
        return gm.graph.call_function(torch.squeeze, (arg, 2))
    return arg


def _add_height_after(gm: fx.GraphModule, node: fx.Node) -> None:
    with gm.graph.inserting_after(node):
        lifted = gm.graph.call_function(torch.unsqueeze, (node, 2))
    node.replace_all_uses_with(lifted, delete_user_cb=lambda u: u is not lifted)


def _map_shape_reads(node: fx.Node, where: str) -> None:
    """x.shape[i] of a signal: the axis i of its 2-D form."""
    for user in list(node.users):   # (rewriting a user's args edits node.users)
        if not (user.op == "call_function" and user.target is operator.getitem
                and isinstance(user.args[1], int)):
            raise _refuse(where, "uses the whole shape of a signal")
        user.args = (user.args[0], _dim_2d(user.args[1]))


def _reduce_dims(node: fx.Node, where: str) -> None:
    """mean/sum/amax/softmax over axes of (N, C, L): over the same axes of the 2-D form,
    which also drops the unit height unless keepdim."""
    d = _arg(node, 1, "dim", None)
    if d is None:
        if getattr(node.target, "__name__", node.target) in ("softmax", "log_softmax"):
            raise _refuse(where, "has no axis")
        return   # a reduction of everything
    dims = [int(x) for x in d] if isinstance(d, (tuple, list)) else [d]
    if not all(isinstance(x, int) for x in dims):
        raise _refuse(where, "takes its axis from the graph")
    dims = [x + 3 if x < 0 else x for x in dims]
    keep = bool(_arg(node, 2, "keepdim", False))
    softmax = getattr(node.target, "__name__", node.target) in ("softmax", "log_softmax")
    new = [3 if x == 2 else x for x in dims]
    if not softmax and not keep:   # the result has no signal axis: the unit height goes too
        new = sorted({*new, 2})
    new = new[0] if len(new) == 1 and not isinstance(d, (tuple, list)) else tuple(new)
    if len(node.args) > 1:
        node.args = (node.args[0], new, *node.args[2:])
    else:
        node.kwargs = {**node.kwargs, "dim": new}


def _permute_dims(node: fx.Node, where: str) -> None:
    """A permute of the three axes of a signal as the same permute of its 2-D form, the unit
    height staying axis 2 ((N, L, C) -> (N, C, L) is (N, L, 1, C) -> (N, C, 1, L))."""
    rest = node.args[1:] or (node.kwargs.get("dims"),)
    perm = rest[0] if len(rest) == 1 and isinstance(rest[0], (tuple, list)) else rest
    if len(perm) != 3 or not all(isinstance(d, int) for d in perm):
        raise _refuse(where, "permutes other than the three axes of a signal")
    p = [_dim_2d(int(d)) for d in perm]
    node.args, node.kwargs = (node.args[0], (p[0], p[1], 2, p[2])), {}


def _module_2d(mod: nn.Module, where: str) -> nn.Module:
    if isinstance(mod, nn.Conv1d):
        pad = mod.padding if isinstance(mod.padding, str) else (0, mod.padding[0])
        out = nn.Conv2d(mod.in_channels, mod.out_channels, (1, mod.kernel_size[0]),
                        (1, mod.stride[0]), pad, (1, mod.dilation[0]), mod.groups,
                        mod.bias is not None, mod.padding_mode)
        out.weight.data.copy_(mod.weight.data.unsqueeze(2))
        if mod.bias is not None:
            out.bias.data.copy_(mod.bias.data)
        return out
    if isinstance(mod, nn.ConvTranspose1d):
        return ConvTransposeAsConv.from_module(mod, where)
    if isinstance(mod, nn.BatchNorm1d):
        out = nn.BatchNorm2d(mod.num_features, mod.eps, mod.momentum, mod.affine,
                             mod.track_running_stats)
        out.load_state_dict(mod.state_dict())
        return out
    if isinstance(mod, nn.MaxPool1d):
        if mod.return_indices:
            raise _refuse(where, "returns indices")
        return nn.MaxPool2d((1, _one(mod.kernel_size)), (1, _one(mod.stride)),
                            (0, _one(mod.padding)), (1, _one(mod.dilation)),
                            ceil_mode=mod.ceil_mode)
    if isinstance(mod, nn.AvgPool1d):
        return nn.AvgPool2d((1, _one(mod.kernel_size)), (1, _one(mod.stride)),
                            (0, _one(mod.padding)), mod.ceil_mode, mod.count_include_pad)
    if isinstance(mod, nn.AdaptiveAvgPool1d):
        return nn.AdaptiveAvgPool2d((1, _one(mod.output_size)))
    if isinstance(mod, nn.AdaptiveMaxPool1d):
        return nn.AdaptiveMaxPool2d((1, _one(mod.output_size)))
    if isinstance(mod, nn.Upsample) and mod.mode in _RESIZE_2D:   # along L only
        how = {"mode": _RESIZE_2D[mod.mode], "align_corners": mod.align_corners}
        if mod.size is not None:
            return nn.Upsample(size=(1, _one(mod.size)), **how)
        return nn.Upsample(scale_factor=(1.0, float(_first(mod.scale_factor))), **how)
    pads = {nn.ZeroPad1d: nn.ZeroPad2d, nn.ReflectionPad1d: nn.ReflectionPad2d,
            nn.ReplicationPad1d: nn.ReplicationPad2d, nn.CircularPad1d: nn.CircularPad2d}
    if type(mod) in pads:                # along L only
        return pads[type(mod)]((*mod.padding, 0, 0))
    if isinstance(mod, nn.ConstantPad1d):
        return nn.ConstantPad2d((*mod.padding, 0, 0), mod.value)
    if isinstance(mod, nn.PReLU) and mod.num_parameters == 1:
        return mod
    if isinstance(mod, nn.Softmax):
        dim = mod.dim if mod.dim is not None else 1
        return nn.Softmax(_dim_2d(dim))
    if isinstance(mod, nn.Linear):   # on the last axis: the same at rank 4
        return mod
    raise _refuse(where, "has no 2-D form edgeprune knows")


def _rank(node: fx.Node) -> int | None:
    meta = node.meta.get("tensor_meta")
    return len(meta.shape) if hasattr(meta, "shape") else None


def _adds_the_height(node: fx.Node) -> bool:
    """A reshape or unsqueeze of an (N, C, L) signal to (N, C, 1, L) (what torch's ONNX
    exporter writes before a 2-D op on a signal, e.g. a global 1-D pool's ReduceMean)."""
    if not (_is(node, torch.reshape, "view") or _is(node, torch.reshape, "reshape")
            or _is(node, torch.unsqueeze, "unsqueeze")) or _rank(node.args[0]) != 3:
        return False
    n, c, length = node.args[0].meta["tensor_meta"].shape
    return tuple(node.meta["tensor_meta"].shape) == (n, c, 1, length)


def _is(node: fx.Node, fn, method: str | None) -> bool:
    return (node.op == "call_function" and fn is not None and node.target is fn) or \
        (node.op == "call_method" and method is not None and node.target == method)


def _arg(node: fx.Node, pos: int, key: str, default):
    return node.args[pos] if len(node.args) > pos else node.kwargs.get(key, default)


def _index_2d(index, where: str) -> tuple:
    """x[:, a:b], x[..., 2:] of (N, C, L) as the same slice of (N, C, 1, L); with one
    position (o[:, -1] of frames) the unit height goes too: the result is not a signal."""
    index = index if isinstance(index, tuple) else (index,)
    if Ellipsis in index:
        k = index.index(Ellipsis)
        index = index[:k] + (slice(None),) * (3 - len(index) + 1) + index[k + 1:]
    whole = all(isinstance(i, slice) or isinstance(i, int) and not isinstance(i, bool)
                for i in index)
    if len(index) > 3 or not whole:
        raise _refuse(where, "indexes a signal other than by slices or positions of its axes")
    index = index + (slice(None),) * (3 - len(index))
    height = 0 if any(isinstance(i, int) for i in index) else slice(None)
    return index[:2] + (height,) + index[2:]


def _dim_2d(d: int) -> int:
    """An axis of (N, C, L) as an axis of (N, C, 1, L)."""
    d = d + 3 if d < 0 else d
    return 3 if d == 2 else d


def _set_dim(node: fx.Node, pos: int, key: str, default, where: str) -> None:
    d = _arg(node, pos, key, default)
    if d is None:
        return
    if isinstance(d, (tuple, list)):
        new = type(d)(_dim_2d(int(x)) for x in d)
    elif isinstance(d, int):
        new = _dim_2d(d)
    else:
        raise _refuse(where, "takes its axis from the graph")
    if len(node.args) > pos:
        node.args = (*node.args[:pos], new, *node.args[pos + 1:])
    else:
        node.kwargs = {**node.kwargs, key: new}


def _set_module(gm: fx.GraphModule, target: str, mod: nn.Module) -> None:
    parent, _, name = target.rpartition(".")
    setattr(gm.get_submodule(parent) if parent else gm, name, mod)


# 1-D resizing modes and their 2-D forms on a (N, C, 1, L) map: linear interpolation along L
# alone is bilinear with one row (its coordinate along H is always 0).
_RESIZE_2D = {"nearest": "nearest", "nearest-exact": "nearest-exact", "linear": "bilinear"}


def _first(v):
    return v[0] if isinstance(v, (tuple, list)) else v


def _one(v):
    """A 1-D layer's size: a number, or a node computing it from a shape (x.shape[-1])."""
    v = _first(v)
    return v if isinstance(v, fx.Node) else int(v)


def _describe(node: fx.Node, modules: dict) -> str:
    if node.op == "call_module":
        return type(modules[node.target]).__name__
    return getattr(node.target, "__name__", str(node.target))


def _refuse(where: str, why: str) -> EdgepruneError:
    return EdgepruneError(f"1-D model: {where} {why}; edgeprune runs a Conv1d model as a 2-D one "
                          "with height 1 and cannot rewrite this op", stage=STAGE)
