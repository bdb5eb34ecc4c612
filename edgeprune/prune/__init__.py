"""Structured pruning: physically smaller models, any criterion, any ratio allocation.

    pruned, record = edgeprune.prune.prune(model, torch.randn(1, 1, 28, 28),
                                           criterion="l1", ratios=0.5)

`pruned` is a new torch.fx GraphModule with fewer channels (the input model is untouched);
`record` says, per layer, how many channels there were, which indices were kept and the
criterion's scores, plus MACs/params before and after. See graph.py for how coupled channels
(residual adds, concat, depthwise convs, flatten -> Linear) are found.
"""

from __future__ import annotations

import time

import torch
import torch.nn as nn

from .. import flops
from ..errors import EdgepruneError
from . import allocate, criteria, patterns
from .context import Context, masked_reference
from .graph import DepGraph, GraphError, NothingToPrune, surgery

__all__ = ["prune", "DepGraph", "GraphError", "NothingToPrune", "masked_reference", "criteria",
           "CRITERIA"]

CRITERIA = list(criteria.CRITERIA)
ALLOCATIONS = ("uniform", "global")


def _first_units_keep(graph: DepGraph, counts: dict[int, int]) -> dict[int, list[int]]:
    return {g.index: list(range(counts.get(g.index, 0), g.units)) for g in graph.groups}


def _removed_fraction(graph: DepGraph, counts: dict[int, int], shape, base: tuple[int, int],
                      which: int) -> float:
    if any(counts.get(g.index, 0) >= g.units for g in graph.groups):
        return 1.0
    model, _ = surgery(graph, _first_units_keep(graph, counts))
    return 1.0 - flops.count(model, shape)[which] / max(1, base[which])


def prune(model: nn.Module, example_input: torch.Tensor, criterion="l1",
          ratios: float | dict[str, float] = 0.5, *, allocation: str = "uniform",
          flops_target: float | None = None, params_target: float | None = None,
          data: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
          meta_batch: tuple[torch.Tensor, torch.Tensor] | None = None, seed: int = 0,
          loss: str = "ce", min_keep: float = 0.1, aux_heads=None,
          kernel_ratio: float = 0.0, intra_stride: int = 1,
          layer_strides: dict[str, int] | None = None, round_to: int = 1,
          graph: DepGraph | None = None) -> tuple[nn.Module, dict]:
    """Remove channels from `model` and return (smaller model, record).

    criterion: a name in CRITERIA or an object with `scores(group, ctx)`.
    ratios: fraction of channels removed per group (float, in [0, 1)), or {layer: ratio} with
        optional "*" default (explicit per-layer allocation; the feedback loop writes these).
        With a MACs/params target, per-layer ratios are scaled together until it is met.
    allocation: "uniform" (same ratio per group) or "global" (rank all channels together,
        keep at least `min_keep` of each group).
    flops_target / params_target: fraction of MACs / parameters to remove instead of a ratio;
        the ratio (uniform or global) is searched to meet it.
    data: (x, y) batches for data-driven criteria; meta_batch: held-out batch (MFP, particle).
    kernel_ratio / intra_stride: kernel-wise and intra-kernel strided patterns (patterns.py) in
        the kept convs; their masks stay attached for fine-tuning until patterns.finalize().
    layer_strides: {conv: s}, keep 1 in s window taps of these convs only (the feedback loop's
        choice, `tap_strides` in its ratios.json); zeroed for good, training keeps them zero.
    round_to: the channels kept in each pruned group are rounded to a multiple of this (the
        nearest, halves up; a target's [quant] channel_multiple): the kernels take channels in
        blocks, and other widths cost more per channel (bench/results/widths.json).
    """
    t0 = time.perf_counter()
    crit = criteria.get(criterion) if isinstance(criterion, str) else criterion
    crit_name = criterion if isinstance(criterion, str) else type(criterion).__name__
    if allocation not in ALLOCATIONS:
        raise EdgepruneError(f"unknown allocation '{allocation}'; known: {', '.join(ALLOCATIONS)}",
                             stage="prune")
    if flops_target is not None and params_target is not None:
        raise EdgepruneError("give a MACs target or a params target, not both", stage="prune")
    target = flops_target if flops_target is not None else params_target
    which = 0 if flops_target is not None else 1
    if isinstance(ratios, dict) and allocation == "global":
        raise EdgepruneError("explicit per-layer ratios and global allocation exclude each other",
                             stage="prune")
    if not isinstance(ratios, dict) and target is None:
        allocate.check_ratio(ratios)
    patterns.check(kernel_ratio, intra_stride)
    if getattr(crit, "needs_data", False) and not data:
        raise EdgepruneError(f"criterion '{crit_name}' needs data: pass --data "
                             "(e.g. --data fashion-mnist)", stage="prune")

    graph = graph or DepGraph(model, example_input)
    if not graph.groups:
        raise NothingToPrune("the model has no prunable channels (every channel reaches the "
                             "input or the output, or a layer that keeps them all)")
    shape = tuple(example_input.shape)
    base = flops.count(graph.gm, shape)

    if isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1:
        raise EdgepruneError(f"round_to {round_to!r} must be a positive integer", stage="prune")

    def fit(counts):   # every allocation, searched ones included, is rounded the same way
        return allocate.rounded(graph, counts, round_to)

    search_ratio = None
    if isinstance(ratios, dict) and target is not None:
        # the per-layer ratios give the shape, the target the scale (see allocate.scaled)
        search_ratio = allocate.search(
            lambda t: _removed_fraction(graph, fit(allocate.per_layer(
                graph, allocate.scaled(ratios, t), strict=False)), shape, base, which), target)
        counts = fit(allocate.per_layer(graph, allocate.scaled(ratios, search_ratio)))
    elif isinstance(ratios, dict):
        counts = fit(allocate.per_layer(graph, ratios))
    elif target is not None:
        search_ratio = allocate.search(
            lambda r: _removed_fraction(graph, fit(allocate.uniform(graph, r)), shape, base,
                                        which), target)
        counts = fit(allocate.uniform(graph, search_ratio))
    else:
        counts = fit(allocate.uniform(graph, ratios))

    ctx = Context(graph, model, batches=list(data or []), meta_batch=meta_batch, budget=counts,
                  seed=seed, loss=loss, aux_heads=aux_heads)
    scores = {}
    for g in graph.groups:
        s = torch.as_tensor(crit.scores(g, ctx), dtype=torch.float32).flatten()
        if s.numel() != g.units:
            raise EdgepruneError(f"criterion {crit_name} gave {s.numel()} scores for "
                                 f"{g.units} channels of '{g.name}'", stage="prune")
        scores[g.index] = _per_producer(g, torch.nan_to_num(s, nan=0.0))

    if allocation == "global":
        if target is not None:
            search_ratio = allocate.search(
                lambda f: _removed_fraction(graph, fit(allocate.global_counts(
                    graph, scores, f, min_keep)), shape, base, which), target)
            counts = fit(allocate.global_counts(graph, scores, search_ratio, min_keep))
        else:
            counts = fit(allocate.global_counts(graph, scores, ratios, min_keep))

    keep = graph.with_every_piece(allocate.keep_lowest_removed(graph, scores, counts), scores)
    pruned, masks = surgery(graph, keep)
    after = flops.count(pruned, shape)
    record = _record(graph, crit_name, allocation, scores, keep, masks, ctx.notes)
    record["patterns"] = patterns.apply(pruned, kernel_ratio, intra_stride)
    record["patterns"].update(patterns.stride_layers(pruned, layer_strides or {}))
    record.update({
        "ratio": None if isinstance(ratios, dict) or target is not None else float(ratios),
        "per_layer": dict(ratios) if isinstance(ratios, dict) else None,
        "flops_target": flops_target, "params_target": params_target,
        "searched_ratio": search_ratio, "round_to": round_to, "input_shape": list(shape),
        "macs_before": base[0], "macs_after": after[0],
        "params_before": base[1], "params_after": after[1],
        "seconds": round(time.perf_counter() - t0, 3),
    })
    return pruned, record


def _record(graph: DepGraph, crit_name: str, allocation: str, scores, keep, masks,
            notes) -> dict:
    groups = []
    unit_score_at: dict[str, list[float | None]] = {}
    for g in graph.groups:
        s = scores[g.index]
        groups.append({
            "name": g.name, "layers": g.layers, "channels_before": g.units,
            "kept": keep[g.index], "scores": [round(float(v), 8) for v in s],
            "note": notes.get(g.name),
        })
        for m in g.by_role("out"):
            per = unit_score_at.setdefault(m.layer, [None] * len(graph.layers[m.layer].out_layout.ids))
            for u, pos in enumerate(m.positions):
                for p in pos:
                    per[p] = round(float(s[u]), 8)
    layers = {}
    for name, layer in graph.layers.items():
        rec = masks[name]
        mod = layer.module
        entry = {"type": type(mod).__name__, "kind": layer.kind,
                 "groups": getattr(mod, "groups", 1)}
        if "out" in rec:
            entry.update(out_before=rec["out_before"], out_kept=rec["out"])
            entry["scores"] = unit_score_at.get(name)
        if "in" in rec:
            entry.update(in_before=rec["in_before"], in_kept=rec["in"])
        if layer.kind in ("bn", "gn", "dwconv", "prelu", "ln"):
            entry.update(channels_before=rec["in_before"], kept=rec["in"])
        layers[name] = entry
    return {"criterion": crit_name, "allocation": allocation, "groups": groups, "layers": layers}


def _per_producer(group, scores: torch.Tensor) -> torch.Tensor:
    """Each unit's score per layer that makes it. A group's units mostly live in as many
    layers each (a constant factor, which changes no ranking); where a channel shuffle ties
    some of them to more layers than the rest (ShuffleNet's passed half to its branch), a
    sum would rank those first and leave the others to be cut."""
    counts = torch.tensor([float(sum(made)) for made in group.makers()])
    return scores / counts.clamp(min=1)
