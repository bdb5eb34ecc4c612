"""What a criterion may ask for: unit weight vectors, per-sample gradient×activation terms,
and the loss of the model with some units switched off.

Everything works on the *original* model through temporary hooks, so scoring never changes the
user's weights and never needs the pruned model:

* `UnitGate` multiplies the channels a group's units occupy at the **input of every layer that
  reads them** (dense conv / linear). Zero there is exactly what physical removal does (a
  LayerNorm's statistics aside: the pruned norm's are over the channels kept), so the
  same mechanism gives the equivalence tests' reference, the meta-criterion's trial masks and the
  differentiable L0 gates. A group no conv or Linear reads (attention's queries and keys, read
  by q @ k^T alone) is gated where its layers make it.
* `gate_terms` differentiates the loss with respect to per-sample gates of 1 at those consumer
  inputs: activation × gradient of the activation that removal zeroes (Molchanov's Taylor term).
* `taylor_terms` multiplies each producer's output channels by a ones tensor of shape (N, C) and
  takes the gradient with respect to it: that is, per sample, sum over positions of
  activation × gradient = g_i^T w_i for filter i (the weight-space terms of CCP's u and s).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import task
from .graph import DepGraph, Group


class UnitGate:
    """Scale a group's units by `values[u]` wherever a layer reads them (context manager). A
    group that no conv or Linear reads (attention's queries and keys, read by q @ k^T alone)
    is scaled where its layers make it."""

    def __init__(self, graph: DepGraph, model: nn.Module):
        self.graph, self.model = graph, model
        self.values: dict[int, torch.Tensor] = {}
        self._hooks = []
        # (layer, "in" | "out") -> [(group index, position index tensor, unit index tensor)]
        self._index: dict[tuple[str, str], list[tuple[int, torch.Tensor, torch.Tensor]]] = {}
        for g in graph.groups:
            role = "in" if g.by_role("in") else "out"
            for m in g.by_role(role):
                pos = [p for u in range(g.units) for p in m.positions[u]]
                unit = [u for u in range(g.units) for _ in m.positions[u]]
                self._index.setdefault((m.layer, role), []).append(
                    (g.index, torch.as_tensor(pos, dtype=torch.long),
                     torch.as_tensor(unit, dtype=torch.long)))

    def set(self, group_index: int, values: torch.Tensor | None) -> None:
        """values: [units] for every sample alike, or [N, units] per sample."""
        if values is None:
            self.values.pop(group_index, None)
        else:
            self.values[group_index] = values

    def _scaled(self, key: tuple[str, str], module: nn.Module, x: torch.Tensor):
        """`x` (the layer's input or output) with the active groups' units scaled, or None."""
        active = [(gi, p, u) for gi, p, u in self._index[key] if gi in self.values]
        if not active:
            return None
        per_sample = any(self.values[gi].dim() == 2 for gi, _, _ in active)
        mask = torch.ones((x.shape[0] if per_sample else 1, _features(module, x)),
                          dtype=x.dtype, device=x.device)
        for gi, p, u in active:
            v = self.values[gi].to(x.dtype)
            v = v[:, u] if v.dim() == 2 else v[u].expand(mask.shape[0], -1)
            mask = mask.index_copy(1, p, v)
        return x * _per_feature(module, mask, x)

    def __enter__(self):
        for (name, role) in self._index:
            module = self.model.get_submodule(name)
            if role == "in":
                def pre(module, args, key=(name, role)):
                    x = self._scaled(key, module, args[0])
                    return None if x is None else (x,) + tuple(args[1:])
                self._hooks.append(module.register_forward_pre_hook(pre))
            else:
                def post(module, args, out, key=(name, role)):
                    return self._scaled(key, module, out)
                self._hooks.append(module.register_forward_hook(post))
        return self

    def __exit__(self, *exc):
        for h in self._hooks:
            h.remove()
        self._hooks.clear()


def _features(module: nn.Module, x: torch.Tensor) -> int:
    """How many channels `x` has at `module`: a Linear's are its last axis (on (N, T, C)
    frames too), a conv's axis 1."""
    return x.shape[-1] if isinstance(module, nn.Linear) else x.shape[1]


def _per_feature(module: nn.Module, v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(N, channels) values `v` shaped to multiply `x` channel by channel."""
    if isinstance(module, nn.Linear):
        return v.view((v.shape[0],) + (1,) * (x.dim() - 2) + (v.shape[1],))
    return v.view(v.shape + (1,) * (x.dim() - 2))


def _norm_over(kept: torch.Tensor):
    """A forward hook: a LayerNorm's (RMSNorm's) output recomputed over the last axis'
    channels `kept` alone, zero in the others."""
    def hook(module, args, out):
        x, w, b = args[0][..., kept], module.weight, getattr(module, "bias", None)
        w, b = (None if w is None else w[kept]), (None if b is None else b[kept])
        if isinstance(module, nn.RMSNorm):
            y = F.rms_norm(x, (len(kept),), w, module.eps)
        else:
            y = F.layer_norm(x, (len(kept),), w, b, module.eps)
        return torch.zeros_like(out).index_copy(-1, kept, y)
    return hook


def _zero_outputs(rec: dict):
    """A forward hook: a conv's (axis 1) or Linear's (last axis) outputs not in
    rec["out_kept"] set to zero."""
    def hook(module, args, out):
        mask = torch.zeros(rec["out_before"], dtype=out.dtype)
        mask[torch.as_tensor(rec["out_kept"], dtype=torch.long)] = 1.0
        if isinstance(module, nn.Linear):
            return out * mask
        return out * mask.view(-1, *([1] * (out.dim() - 2)))
    return hook


def masked_reference(model: nn.Module, layers: dict[str, dict]) -> "_LayerMask":
    """Hooks that zero, at the input of every conv/linear, the input channels a pruning record
    says were removed (`layers[name]["in_kept"]` out of `in_before`), and its removed outputs
    where it makes them; a pruned LayerNorm's statistics over the channels kept. Used as the
    reference the pruned model must equal: it is built from the record alone, not from the
    dependency graph."""
    return _LayerMask(model, layers)


class _LayerMask:
    def __init__(self, model: nn.Module, layers: dict[str, dict]):
        self.model, self.layers, self._hooks = model, layers, []

    def __enter__(self):
        for name, rec in self.layers.items():
            if rec.get("kind") == "ln" and len(rec["kept"]) < rec["channels_before"]:
                # a pruned LayerNorm's statistics are over the channels it keeps
                self._hooks.append(self.model.get_submodule(name).register_forward_hook(
                    _norm_over(torch.as_tensor(rec["kept"], dtype=torch.long))))
            # dwconv: its input is its output
            if rec.get("kind") not in ("conv", "gconv", "groupwise", "linear"):
                continue
            if len(rec["out_kept"]) < rec["out_before"]:
                # its removed outputs zero where they are made too: what reads them besides
                # a conv or Linear (q @ k^T contracts the queries' channels with the keys')
                # sees them gone
                self._hooks.append(self.model.get_submodule(name).register_forward_hook(
                    _zero_outputs(rec)))
            if len(rec["in_kept"]) == rec["in_before"]:
                continue
            mask = torch.zeros(rec["in_before"])
            mask[torch.as_tensor(rec["in_kept"], dtype=torch.long)] = 1.0

            def pre(module, args, mask=mask):
                x = args[0]
                return (x * _per_feature(module, mask.to(x.dtype)[None], x),)
            self._hooks.append(self.model.get_submodule(name).register_forward_pre_hook(pre))
        return self

    def __exit__(self, *exc):
        for h in self._hooks:
            h.remove()


@dataclass
class Context:
    """Inputs a criterion may use. `batches` are (x, y) scoring batches, `meta_batch` a
    held-out batch for criteria that evaluate trial masks, `budget[g]` the number of units of
    group g that will be removed (criteria that solve for a pattern need it)."""
    graph: DepGraph
    model: nn.Module
    batches: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    meta_batch: tuple[torch.Tensor, torch.Tensor] | None = None
    budget: dict[int, int] = field(default_factory=dict)
    seed: int = 0
    loss: str = "ce"  # "ce" or "mse" (one-hot targets): which Hessian approximation CCP uses
    aux_heads: dict[int, tuple[str, nn.Module]] | None = None  # CCP-AC: group -> (layer, head)
    notes: dict[str, str] = field(default_factory=dict)
    _cache: dict = field(default_factory=dict)

    def require_data(self, criterion: str) -> None:
        if not self.batches:
            from ..errors import EdgepruneError
            raise EdgepruneError(f"criterion '{criterion}' needs data: pass --data "
                                 "(e.g. --data fashion-mnist)", stage="prune")

    # ---- weights
    def unit_vectors(self, group: Group, p: float = 2) -> torch.Tensor:
        """[units, D]: each unit's filter weights (and bias) over all its producer layers.
        Where units live in different layers (branches concatenated), each layer's rows are
        scaled to a mean p-norm of 1 over the units it holds (Torch-Pruning's "mean"
        normalizer): a 3x3 branch's channels would otherwise outrank a 1x1 branch's for
        their kernels' size alone, and the cheap branch would be cut first."""
        uneven = len(set(group.makers())) > 1
        parts = []
        for m in group.by_role("out"):
            mod = self.model.get_submodule(m.layer)
            w = mod.weight.detach().flatten(1)
            if getattr(mod, "bias", None) is not None:
                w = torch.cat([w, mod.bias.detach()[:, None]], 1)
            rows = torch.stack([w[at].sum(0) if at else torch.zeros(w.shape[1])
                                for at in m.positions])
            if uneven:
                held = [bool(at) for at in m.positions]
                rows = rows / (rows[held].norm(p=p, dim=1).mean() + 1e-12)
            parts.append(rows)
        return torch.cat(parts, 1)

    def bn_gammas(self, group: Group) -> torch.Tensor | None:
        ms = group.by_role("bn")
        if not ms:
            return None
        out = torch.zeros(group.units)
        for m in ms:
            g = self.model.get_submodule(m.layer).weight.detach().abs()
            out += torch.stack([g[p].sum() for p in m.positions])
        return out

    # ---- gradients × activations
    def _loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.loss == "mse" and not task.is_regression(y):
            return ((logits - F.one_hot(y, logits.shape[1]).to(logits.dtype)) ** 2).sum()
        return task.loss(logits, y, reduction="sum")

    def taylor_terms(self, group: Group) -> torch.Tensor:
        """[samples, units]: per sample, d loss / d (scale of unit u) = sum of
        activation × gradient over the unit's producer outputs (reduction: sum over samples,
        model in eval mode, so each row is that sample's own gradient)."""
        key = ("taylor", self.loss, self.aux_heads is not None)
        if key not in self._cache:
            self._cache[key] = self._collect(per_output=False)
        return self._cache[key][group.index]

    def gate_terms(self, group: Group) -> torch.Tensor:
        """[samples, units]: per sample, d loss / d (gate of unit u) at gate 1, the gate sitting
        at the input of every layer that reads the unit. That is sum over positions of
        activation × gradient of exactly the activation that removal zeroes (after BN and
        ReLU), so it is the first-order loss change of removing the unit (Molchanov)."""
        key = ("gate", self.loss)
        if key not in self._cache:
            self._cache[key] = self._collect_gates()
        return self._cache[key][group.index]

    def _collect_gates(self) -> dict[int, torch.Tensor]:
        result: dict[int, list[torch.Tensor]] = {g.index: [] for g in self.graph.groups}
        was = self.model.training
        self.model.eval()
        try:
            for x, y in self.batches:
                values = {g.index: torch.ones(x.shape[0], g.units, requires_grad=True)
                          for g in self.graph.groups}
                with self.gate() as gate:
                    for gi, v in values.items():
                        gate.set(gi, v)
                    loss = self._loss(self.model(x), y)
                grads = torch.autograd.grad(loss, list(values.values()), allow_unused=True)
                for gi, gr in zip(values, grads):
                    result[gi].append(torch.zeros(x.shape[0], self.graph.groups[gi].units)
                                      if gr is None else gr.detach())
        finally:
            self.model.train(was)
        return {gi: torch.cat(v, 0) for gi, v in result.items()}

    def jacobian_terms(self, group: Group) -> torch.Tensor:
        """[samples, outputs, units]: d logit_o / d (scale of unit u), for the Gauss-Newton
        Hessian of the MSE loss."""
        key = ("jac", self.aux_heads is not None)
        if key not in self._cache:
            self._cache[key] = self._collect(per_output=True)
        return self._cache[key][group.index]

    def _collect(self, per_output: bool) -> dict[int, torch.Tensor]:
        producers = {}  # layer -> list of (group, member)
        for g in self.graph.groups:
            for m in g.by_role("out"):
                producers.setdefault(m.layer, []).append((g, m))
        result: dict[int, list[torch.Tensor]] = {g.index: [] for g in self.graph.groups}
        was = self.model.training
        self.model.eval()
        try:
            for x, y in self.batches:
                scales: dict[str, torch.Tensor] = {}
                feats: dict[int, torch.Tensor] = {}
                hooks = []
                for name in producers:
                    def fwd(module, args, out, name=name):
                        s = torch.ones((out.shape[0], _features(module, out)), requires_grad=True)
                        scales[name] = s
                        return out * _per_feature(module, s, out)
                    hooks.append(self.model.get_submodule(name).register_forward_hook(fwd))
                if self.aux_heads:
                    for gi, (layer, _) in self.aux_heads.items():
                        def cap(module, args, gi=gi):
                            feats[gi] = args[0]
                        hooks.append(self.model.get_submodule(layer).register_forward_pre_hook(cap))
                try:
                    logits = self.model(x)
                finally:
                    for h in hooks:
                        h.remove()
                names = list(scales)
                for g in self.graph.groups:
                    mine = [(names.index(m.layer), m) for m in g.by_role("out")]
                    if per_output:
                        rows = []
                        for o in range(logits.shape[1]):
                            grads = torch.autograd.grad(logits[:, o].sum(), [scales[n] for n in names],
                                                        retain_graph=True, allow_unused=True)
                            rows.append(self._units(g, mine, grads, x.shape[0]))
                        result[g.index].append(torch.stack(rows, 1).detach())
                    else:
                        loss = self._loss(logits, y)
                        if self.aux_heads and g.index in self.aux_heads:
                            head = self.aux_heads[g.index][1]
                            loss = loss + self._loss(head(feats[g.index]), y)
                        grads = torch.autograd.grad(loss, [scales[n] for n in names],
                                                    retain_graph=True, allow_unused=True)
                        result[g.index].append(self._units(g, mine, grads, x.shape[0]).detach())
        finally:
            self.model.train(was)
        return {gi: torch.cat(v, 0) for gi, v in result.items()}

    @staticmethod
    def _units(g: Group, mine, grads, n: int) -> torch.Tensor:
        t = torch.zeros(n, g.units)
        for i, m in mine:
            if grads[i] is None:
                continue
            for u, pos in enumerate(m.positions):
                if pos:
                    t[:, u] += grads[i][:, pos].sum(1)
        return t

    # ---- trial masks
    def gate(self) -> UnitGate:
        return UnitGate(self.graph, self.model)

    def masked_eval(self, group: Group, keep: torch.Tensor) -> tuple[float, float]:
        """(loss per sample, misclassification rate) on the meta batch with the units of
        `group` where keep == 0 switched off."""
        x, y = self.meta_batch if self.meta_batch is not None else self.batches[-1]
        was = self.model.training
        self.model.eval()
        try:
            with torch.no_grad(), self.gate() as gate:
                gate.set(group.index, keep.float())
                logits = self.model(x)
        finally:
            self.model.train(was)
        loss = float(task.loss(logits, y))
        return loss, 1.0 - task.score(logits.numpy(), y.numpy()) / 100.0

    def rng(self, group: Group) -> np.random.Generator:
        return np.random.default_rng([self.seed, group.index])
