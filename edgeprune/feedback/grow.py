"""Growing one channel group of a pruned model back towards the unpruned model.

The search's steps overshoot their aim (one channel less can free a kernel's whole tile), and
the slack left under a budget is accuracy given away. `grow` gives a group of the pruned model
back some of the channels the unpruned model had, without changing what the model computes:
the returned channels carry the unpruned model's weights and statistics, and the layers that
read them get zero input columns for them (function-preserving widening, as Net2Net's), so the
short fine-tune that follows starts from the pruned model and only gains capacity. (A
LayerNorm over the channels is the exception: its statistics take in the returned channels.)
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

from ..errors import EdgepruneError
from ..prune.graph import DepGraph, surgery


class GrowError(EdgepruneError):
    def __init__(self, message: str):
        super().__init__(message, stage="feedback")


def kept_units(graph: DepGraph, layers: dict) -> dict[int, list[int]]:
    """Per group of `graph` (the unpruned model's), the units a pruned model kept; `layers` is
    its record of kept positions in the unpruned model (search._compose)."""
    out = {}
    for g in graph.groups:
        producers = g.by_role("out")
        if not producers or "out_kept" not in layers.get(producers[0].layer, {}):
            raise GrowError(f"group '{g.name}' has no producer layer in the pruning record")
        kept = set(layers[producers[0].layer]["out_kept"])
        out[g.index] = [u for u, pos in enumerate(producers[0].positions) if pos[0] in kept]
    return out


def grow(graph: DepGraph, current: nn.Module, layers: dict, group: str,
         width: int) -> tuple[nn.Module, dict]:
    """`current` (a pruned model of graph's model, record `layers`) with group `group` widened
    to `width` units: those it kept plus the largest-L1 ones it lost. Returns the grown model
    and its record (the same form as `layers`)."""
    g = next((x for x in graph.groups if x.name == group), None)
    if g is None:
        raise GrowError(f"no channel group '{group}' in the model")
    units = kept_units(graph, layers)
    have = units[g.index]
    if not len(have) < width <= g.units:
        raise GrowError(f"group '{group}' keeps {len(have)} of {g.units} units: it cannot grow "
                        f"to {width}")
    lost = sorted(set(range(g.units)) - set(have), key=lambda u: (-_l1(graph, g, u), u))
    wide_keep = {**units, g.index: sorted(have + lost[:width - len(have)])}
    wide, masks = surgery(graph, wide_keep)
    at_current, at_wide = _base_positions(graph, units), _base_positions(graph, wide_keep)
    state, now = wide.state_dict(), current.state_dict()
    for name, t in state.items():
        if not t.is_floating_point():
            continue
        if name not in now or now[name].numel() != at_current[name].numel():
            raise GrowError(f"the pruned model's '{name}' does not match its pruning record")
        where = {int(p): i for i, p in enumerate(at_wide[name])}
        rows = torch.tensor([where[int(p)] for p in at_current[name]], dtype=torch.long)
        t.view(-1)[rows] = now[name].reshape(-1).to(t.dtype)
    # the returned units' outgoing weights: zero, so the grown model computes what current does
    new = set(wide_keep[g.index]) - set(have)
    for m in g.by_role("in"):
        cols = {p: i for i, p in enumerate(masks[m.layer]["in"])}
        zero = [cols[p] for u in sorted(new) for p in m.positions[u]]
        state[f"{m.layer}.weight"][:, zero] = 0
    wide.load_state_dict(state)
    record = copy.deepcopy(layers)
    for name, e in record.items():
        if "out_kept" in e:
            e["out_kept"] = list(masks[name]["out"])
        if "in_kept" in e:
            e["in_kept"] = list(masks[name]["in"])
        if "kept" in e:
            e["kept"] = list(masks[name]["in"])
    return wide.train(current.training), record


def _l1(graph: DepGraph, g, unit: int) -> float:
    """Unit's L1 norm over its producers' weight rows in the unpruned model."""
    total = 0.0
    for m in g.by_role("out"):
        w = graph.gm.get_submodule(m.layer).weight.detach()
        total += float(w[m.positions[unit]].abs().sum())
    return total


def _base_positions(graph: DepGraph, keep: dict[int, list[int]]) -> dict[str, torch.Tensor]:
    """Per floating-point tensor of the model that `keep` cuts, the flat position in the
    unpruned model's tensor of each of its elements: the cut applied to a copy whose tensors
    hold their own element indices."""
    indexed = copy.copy(graph)
    indexed.gm = copy.deepcopy(graph.gm).double()
    with torch.no_grad():
        for t in indexed.gm.state_dict(keep_vars=True).values():
            if t.is_floating_point():
                if t.numel() > 2 ** 24:   # the cut writes some tensors back as float32
                    raise GrowError(f"a tensor of {t.numel()} elements is too large to grow")
                t.copy_(torch.arange(t.numel(), dtype=t.dtype).view_as(t))
    cut, _ = surgery(indexed, keep)
    return {n: t.reshape(-1).round().long() for n, t in cut.state_dict().items()
            if t.is_floating_point()}
