"""How many units each group loses: uniform ratio, explicit per-layer ratios, global ranking
with a per-group floor, or a ratio searched so the pruned model meets a MACs/params target.

Counts are ratio * units rounded to the nearest integer (halves up); a ratio that would remove
every channel of a layer (e.g. 0.6 of a 1-channel conv) is an error naming the layer rather than
a silently collapsed or silently unpruned layer.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ..errors import EdgepruneError
from .graph import DepGraph

STAGE = "prune"


def check_ratio(ratio: float, what: str = "--ratio") -> float:
    try:
        r = float(ratio)
    except (TypeError, ValueError):
        raise EdgepruneError(f"{what} {ratio!r} is not a number", stage=STAGE) from None
    if not 0.0 <= r < 1.0:
        raise EdgepruneError(f"{what} {r} is outside [0, 1) (it is the fraction removed)",
                             stage=STAGE)
    return r


def units_removed(ratio: float, units: int) -> int:
    return int(math.floor(ratio * units + 0.5 + 1e-9))


def uniform(graph: DepGraph, ratio: float) -> dict[int, int]:
    """Units to remove per group: the same fraction everywhere, leaving each group a unit (a
    GroupNorm of one group is one unit: half of it rounds to all of it)."""
    ratio = check_ratio(ratio)
    return {g.index: min(units_removed(ratio, g.units), g.units - 1) for g in graph.groups}


def rounded(graph: DepGraph, counts: dict[int, int], multiple: int) -> dict[int, int]:
    """`counts` (units removed per group) with the channels each pruned group keeps rounded to
    a multiple of `multiple` (the nearest, halves up; at least one multiple, at most all):
    the int8 kernels take input channels in pairs and output channels in blocks: on ResNet-8 a
    channel that makes a width odd costs 2.5x the instructions of one that makes it even on
    the M4, M7, M33 and RISC-V, 4.4x on the A72, and on the M55 and A53 an odd width costs as
    much as the next even one (bench/results/widths.json). A group whose unit is several
    channels (a depthwise multiplier, a GroupNorm group) rounds its units to what makes whole
    multiples."""
    if multiple <= 1:
        return counts
    out = dict(counts)
    for g in graph.groups:
        n = counts.get(g.index, 0)
        if n <= 0 or n >= g.units:   # unpruned stays whole; a collapse is the caller's error
            continue
        m = unit_multiple(g, multiple)
        out[g.index] = g.units - min(g.units, max(m, nearest_multiple(g.units - n, m)))
    return out


def unit_multiple(group, multiple: int) -> int:
    """The multiple of `group`'s units that keeps a multiple of `multiple` channels."""
    outs = group.by_role("out")
    per_unit = len(outs[0].positions[0]) if outs and outs[0].positions else 1
    return multiple // math.gcd(multiple, per_unit)


def nearest_multiple(x: float, m: int) -> int:
    """The multiple of `m` nearest to `x`, halves up."""
    return int(math.floor(x / m + 0.5)) * m


def per_layer(graph: DepGraph, ratios: dict[str, float], default: float = 0.0,
              strict: bool = True) -> dict[int, int]:
    """Units to remove per group from {layer name: ratio}. A key may name any producer layer of
    a group; coupled layers (e.g. both sides of a residual add) given different ratios get the
    smallest one, since they can only lose the same channels. `"*"` sets the default.
    `strict=False` (target searches) returns collapsing counts instead of raising."""
    default = check_ratio(ratios.get("*", default), "default ratio")
    chosen: dict[int, float] = {}
    for name, r in ratios.items():
        if name == "*":
            continue
        r = check_ratio(r, f"ratio for layer '{name}'")
        try:
            g = graph.group(name)
        except EdgepruneError:
            raise EdgepruneError(f"per-layer ratios name '{name}', which is not a prunable layer "
                                 f"(the classifier and input layers are never pruned); "
                                 f"prunable: {', '.join(graph.layer_names())}",
                                 stage=STAGE) from None
        chosen[g.index] = min(chosen.get(g.index, r), r)
    counts = {}
    for g in graph.groups:
        r = chosen.get(g.index, default)
        n = units_removed(r, g.units)
        if n >= g.units and strict:
            raise EdgepruneError(f"ratio {r} would remove every channel of layer '{g.name}'",
                                 stage=STAGE)
        counts[g.index] = n
    return counts


def scaled(ratios: dict[str, float], top: float) -> dict[str, float]:
    """Per-layer ratios scaled so the largest becomes `top` (their proportions kept): how
    explicit per-layer ratios combine with a MACs/params target."""
    largest = max((check_ratio(r, f"ratio for layer '{k}'") for k, r in ratios.items()),
                  default=0.0)
    if largest == 0.0:
        raise EdgepruneError("per-layer ratios are all 0, so no scaling of them meets a target",
                             stage=STAGE)
    return {k: min(r * top / largest, top) for k, r in ratios.items()}


def keep_lowest_removed(graph: DepGraph, scores: dict[int, torch.Tensor],
                        counts: dict[int, int]) -> dict[int, list[int]]:
    """Kept unit indices per group: remove the `counts[g]` lowest-scoring units."""
    keep = {}
    for g in graph.groups:
        n = counts.get(g.index, 0)
        if n >= g.units:
            raise EdgepruneError(f"pruning would remove every channel of layer '{g.name}'",
                                 stage=STAGE)
        order = torch.argsort(scores[g.index], stable=True)
        keep[g.index] = sorted(int(i) for i in order[n:])
    return keep


def global_counts(graph: DepGraph, scores: dict[int, torch.Tensor], fraction: float,
                  min_keep: float = 0.1) -> dict[int, int]:
    """Rank all units of all groups together (scores divided by their group's mean, so layers
    of different scale compare) and remove the lowest `fraction` of them, never leaving a group
    with fewer than max(1, ceil(min_keep * units)) units (no layer collapse)."""
    fraction = check_ratio(fraction)
    entries = []
    for g in graph.groups:
        s = scores[g.index].double()
        norm = s / (s.abs().mean() + 1e-30)
        entries += [(float(v), g.index) for v in norm]
    entries.sort(key=lambda e: e[0])
    total = int(math.floor(fraction * len(entries) + 1e-9))
    floor = {g.index: max(1, math.ceil(min_keep * g.units)) for g in graph.groups}
    left = {g.index: g.units for g in graph.groups}
    counts = {g.index: 0 for g in graph.groups}
    removed = 0
    for _, gi in entries:
        if removed >= total:
            break
        if left[gi] > floor[gi]:
            left[gi] -= 1
            counts[gi] += 1
            removed += 1
    return counts


def search(measure: Callable[[float], float], target: float, hi: float = 0.99,
           steps: int = 20) -> float:
    """The smallest ratio in [0, hi] whose `measure(ratio)` (fraction of MACs or params
    removed, non-decreasing in ratio) reaches `target`, by bisection."""
    if not 0.0 < target < 1.0:
        raise EdgepruneError(f"target {target} is outside (0, 1) (it is the fraction of MACs or "
                             "params removed)", stage=STAGE)
    if measure(hi) < target:
        raise EdgepruneError(f"cannot remove {target:.0%}: even ratio {hi} removes only "
                             f"{measure(hi):.1%} (frozen input/output layers set a floor)",
                             stage=STAGE)
    lo = 0.0
    for _ in range(steps):
        mid = (lo + hi) / 2
        if measure(mid) >= target:
            hi = mid
        else:
            lo = mid
    return hi
