"""Which part of which tensor an fx node reads when it slices axes.

Models cut tensors along an axis in several spellings: `x[:, 8:]`, `x.narrow(1, 0, 8)`,
`x.chunk(2, 1)[0]`, `torch.split(x, [4, 12], 1)[1]` (ShuffleNet's and GhostNet's channel
splits), `x[:, :, 2:-2, 2:-2]` (a U-Net's crop), and our ONNX import writes `Slice` and
`Split` as the first. The quantizer and the pruning graph both need the same answer, one `Slice`
per cut axis, from the traced shapes (ShapeProp).
"""

from __future__ import annotations

import contextlib
import io
import operator
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch.fx.passes.shape_prop import ShapeProp

from .errors import EdgepruneError

# calls that return a tuple of pieces along one axis; an operator.getitem picks a piece
SPLIT_FUNCTIONS = {torch.chunk, torch.split, torch.tensor_split}
SPLIT_METHODS = {"chunk", "split", "tensor_split"}


@dataclass(frozen=True)
class Slice:
    source: fx.Node
    axis: int      # >= 1: the batch axis stays whole
    start: int
    stop: int
    step: int = 1
    drops_axis: bool = False   # x[:, 0]: one position, without its axis


class ShapeAndSizeProp(ShapeProp):
    """ShapeProp that also keeps each size the model reads from a tensor (`n = x.shape[-1]`)
    as node.meta["value"]: the slices written with it (`y[..., :n]`) are then known. Quiet:
    ShapeProp prints the traceback of a node that fails, which its callers name or try
    another way."""
    def run_node(self, n):
        with contextlib.redirect_stderr(io.StringIO()):
            value = super().run_node(n)
        if isinstance(value, int) and not isinstance(value, bool):
            n.meta["value"] = value
        return value


def _known(index):
    """`index` with the sizes read from tensors in it (`y[..., :n]`) replaced by their traced
    values; None where one is not known."""
    unknown = []

    def value(v):
        if isinstance(v, fx.Node):
            if "value" not in v.meta:
                unknown.append(v)
            return v.meta.get("value")
        return v

    def one(i):
        return slice(value(i.start), value(i.stop), value(i.step)) if isinstance(i, slice) \
            else value(i)
    known = tuple(one(i) for i in index) if isinstance(index, tuple) else one(index)
    return None if unknown else known


def _shape(node: fx.Node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape) if hasattr(meta, "shape") else None


def _arg(node: fx.Node, i: int, name: str, default=None):
    return node.kwargs.get(name, node.args[i] if len(node.args) > i else default)


def is_split(node: fx.Node) -> bool:
    """A call that returns pieces of one tensor (chunk, split, tensor_split)."""
    return (node.op == "call_function" and node.target in SPLIT_FUNCTIONS) or \
        (node.op == "call_method" and node.target in SPLIT_METHODS)


def returns_indices(node: fx.Node) -> bool:
    """torch.max(x, dim) / x.max(dim) (or min): a (values, indices) pair, read by
    max_values_of."""
    dim = _arg(node, 1, "dim")
    return ((node.op == "call_function" and node.target in (torch.max, torch.min))
            or (node.op == "call_method" and node.target in ("max", "min"))) \
        and isinstance(dim, int) and not isinstance(dim, bool)


def max_values_of(node: fx.Node) -> tuple[fx.Node, int] | None:
    """(x, dim) when `node` takes the values of torch.max(x, dim) (or torch.min, see
    is_min_values): `[0]` or `.values`."""
    if node.op != "call_function" or not node.args or not isinstance(node.args[0], fx.Node) \
            or not returns_indices(node.args[0]):
        return None
    if (node.target is operator.getitem and node.args[1] == 0) or \
            (node.target is getattr and node.args[1] == "values"):
        pair = node.args[0]
        return pair.args[0], int(_arg(pair, 1, "dim"))
    return None


def is_min_values(node: fx.Node) -> bool:
    """`node` takes the values of torch.min(x, dim) (max_values_of finds x and dim)."""
    return max_values_of(node) is not None and node.args[0].target in (torch.min, "min")


def slices_of(node: fx.Node) -> list[Slice] | None:
    """The slices `node` computes, one per cut axis in axis order (each of the same source:
    they compose), None if it is no slice; raises naming the node for a slice this pipeline
    does not take (of the batch axis)."""
    where = f"node '{node.name}'"
    if node.op == "call_method" and node.target == "narrow" or \
            node.op == "call_function" and node.target is torch.narrow:
        x, dim = node.args[0], int(_arg(node, 1, "dim"))
        start, length = int(_arg(node, 2, "start")), int(_arg(node, 3, "length"))
        nd = len(_shape(x))
        return [_checked(where, x, dim % nd, start % _shape(x)[dim % nd], length, 1)]
    if not (node.op == "call_function" and node.target is operator.getitem
            and isinstance(node.args[0], fx.Node)):
        return None
    x, index = node.args
    if is_split(x):      # piece i of a chunk/split: where it starts, from the traced shapes
        pieces, source = x.meta.get("tensor_meta"), x.args[0]
        dim = int(_arg(x, 2, "dim", 0)) % len(_shape(source))   # chunk, split, tensor_split
        index %= len(pieces)
        start = sum(p.shape[dim] for p in pieces[:index])
        return [_checked(where, source, dim, start, pieces[index].shape[dim], 1)]
    shape, index = _shape(x), _known(index)
    if shape is None or index is None or not isinstance(index, (slice, tuple)):
        return None
    index = index if isinstance(index, tuple) else (index,)
    if Ellipsis in index:
        k = index.index(Ellipsis)
        index = index[:k] + (slice(None),) * (len(shape) - len(index) + 1) + index[k + 1:]
    ints = [axis for axis, i in enumerate(index) if isinstance(i, int) and
            not isinstance(i, bool)]
    if ints and all(isinstance(i, slice) for k, i in enumerate(index) if k not in ints):
        for axis in ints:   # x[:, 0], o[:, -1]: slices of one that drop their axes
            i = index[axis] % shape[axis]
            index = index[:axis] + (slice(i, i + 1),) + index[axis + 1:]
    if not all(isinstance(i, slice) for i in index):
        return None      # x[:, :, None] and friends: not a slice (the callers know them)
    cuts = [(axis, i) for axis, i in enumerate(index) if i != slice(None)]
    if not cuts:
        return None      # x[:, :]: the whole tensor
    out = []
    for axis, s in cuts:
        start, stop, step = s.indices(shape[axis])
        piece = _checked(where, x, axis, start, len(range(start, stop, step)), step)
        out.append(Slice(x, axis, piece.start, piece.stop, piece.step,
                         drops_axis=axis in ints))
    return out


def _checked(where, x, axis, start, length, step) -> Slice:
    if axis == 0:
        raise EdgepruneError(f"{where}: slicing the batch axis is not supported")
    if length <= 0:
        raise EdgepruneError(f"{where}: the slice of {tuple(_shape(x))} along axis {axis} "
                             "is empty")
    return Slice(x, axis, start, start + (length - 1) * step + 1, step)
