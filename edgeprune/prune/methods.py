"""Pruning schedules around `prune()`: when to score, how often to cut, how to recover.

Every method takes the same arguments and returns (smaller model, record); `run()` dispatches
by name. The fine-tuning budget is `epochs` for every method, so they compare fairly: methods
that train before cutting (soft, lasso, gates, slimming) spend part of it before the cut.

    oneshot      prune once, fine-tune (the baseline schedule)
    iterative    `steps` prune/fine-tune rounds with a growing ratio
    lr-rewind    prune once, retrain with the original training schedule's learning rate
                 instead of a small fine-tuning rate (Renda et al. 2020)
    fade         choose the channels once, fade them out while training, then cut and fine-tune
    soft         soft filter pruning (He et al. 2018): zero the lowest filters after every
                 epoch but keep training them (they may regrow); cut physically at the end
    lasso        group LASSO on each channel group with a proximal step, so groups reach exactly
                 zero; cut the smallest groups, fine-tune
    gates        L0 channel gates with the hard-concrete estimator (Louizos et al. 2018) trained
                 with the weights; cut by learned gate, fine-tune without gates
    slimming     network slimming: L1 on BatchNorm scales, then cut by |gamma|, fine-tune
    lth          lottery-ticket rewinding: choose channels on the trained model, then retrain the
                 smaller architecture from early-training weights (`rewind_state`)
    ccp-ac       CCP with auxiliary classifiers (one linear head per channel group, trained on
                 frozen features) adding their loss to the gradients each layer is scored with

Recovery after every cut (`Recovery`): the BatchNorm running statistics are re-estimated on a
few training batches (the kept channels' inputs lost their removed neighbours, so the stored
statistics are stale), and fine-tuning may distil from the unpruned model (Hinton et al.:
soft targets at temperature T, weight alpha, plus (1 - alpha) cross-entropy).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data import Dataset
from ..errors import EdgepruneError
from .. import task
from ..train import train, train_or_retry
from . import patterns
from .context import UnitGate
from .criteria import Fixed
from .graph import DepGraph, surgery

FINETUNE_LR = 0.01   # fine-tuning after a cut
TRAIN_LR = 0.05      # the from-scratch schedule's peak rate (lr-rewind, lth)
BN_BATCHES = 20      # training batches of 128 for BatchNorm re-estimation after a cut


@dataclass
class Recovery:
    """What happens between a cut and the end of fine-tuning (see the module docstring).
    bn_batches=0 keeps the stored BatchNorm statistics; teacher=None fine-tunes on labels only."""
    bn_batches: int = BN_BATCHES
    teacher: nn.Module | None = None
    alpha: float = 0.9
    temperature: float = 4.0

    def __post_init__(self):
        if self.bn_batches < 0:
            raise EdgepruneError(f"BatchNorm re-estimation batches {self.bn_batches} must be "
                                 ">= 0", stage="prune")
        if not 0.0 <= self.alpha <= 1.0:
            raise EdgepruneError(f"distillation weight alpha {self.alpha} is outside [0, 1]",
                                 stage="prune")
        if self.temperature <= 0:
            raise EdgepruneError(f"distillation temperature {self.temperature} must be > 0",
                                 stage="prune")


def has_batchnorm(model: nn.Module) -> bool:
    """Whether a cut is recovered by re-estimating BatchNorm statistics (else the channels'
    statistics are corrected in the convs: correct_channel_statistics)."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def recalibrate_bn(model: nn.Module, data: Dataset | None, batches: int = BN_BATCHES,
                   batch_size: int = 128, seed: int = 0) -> nn.Module:
    """Replace every BatchNorm's running mean/variance by their average over `batches` random
    training batches (the rest of the model in eval mode, no gradients, weights untouched)."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
           and m.track_running_stats]
    if not bns or batches <= 0 or data is None or data.x_train is None:
        return model
    was = model.training
    momenta = [m.momentum for m in bns]
    model.eval()
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches, not an EMA
        m.train()
    rng = np.random.default_rng(seed + 2000)
    n = min(len(data.x_train), batches * batch_size)
    idx = rng.choice(len(data.x_train), n, replace=False)
    try:
        with torch.no_grad():
            for i in range(0, n, batch_size):
                model(torch.from_numpy(data.x_train[np.sort(idx[i:i + batch_size])]))
    finally:
        for m, mom in zip(bns, momenta):
            m.momentum = mom
        model.train(was)
    return model


def correct_channel_statistics(pruned: nn.Module, before: nn.Module, layers: dict,
                               data: Dataset | None, samples: int = 256,
                               seed: int = 0) -> list[str]:
    """What BatchNorm re-estimation does, for a model without BatchNorm (an ONNX exporter
    folded it into the convs): every conv/linear but the last gets, per output channel, the
    affine map that gives its outputs on `samples` training samples the mean and standard
    deviation that channel had in `before` (the model the cut was made on; `layers`: the
    cut's record, whose out_kept number the channels), folded into its weight and bias. One
    pass, front to back, so each layer is corrected on already corrected inputs. Without it a
    cut MobileNet-V3 from ONNX stayed at chance through fine-tuning (8.7 %; 53.1 % with it,
    as from the .pt with BatchNorm). A module called more than once in a forward (shared
    weights) is left alone. Returns the corrected layers."""
    kinds = (nn.Conv1d, nn.Conv2d, nn.Linear)
    mods, old = dict(pruned.named_modules()), dict(before.named_modules())
    names = [n for n, rec in layers.items() if "out_kept" in rec
             and isinstance(mods.get(n), kinds) and isinstance(old.get(n), kinds)
             and mods[n].weight.shape[0] == len(rec["out_kept"])]
    if not names or data is None or data.x_train is None:
        return []
    rng = np.random.default_rng(seed + 3000)
    idx = np.sort(rng.choice(len(data.x_train), min(samples, len(data.x_train)), replace=False))
    x = torch.from_numpy(data.x_train[idx])

    def moments(m, out):   # per channel: axis 1 of a conv's output, the last of a linear's
        dims = [d for d in range(out.dim()) if d != (out.dim() - 1 if isinstance(
            m, nn.Linear) else 1)]
        return out.mean(dims), out.std(dims, unbiased=False)

    def run(model, hook, which):
        handles = [which[n].register_forward_hook(
            lambda m, a, out, n=n: hook(n, m, a, out)) for n in names]
        was = model.training
        try:
            with torch.no_grad():
                model.eval()(x)
        finally:
            for h in handles:
                h.remove()
            model.train(was)

    wanted, order = {}, []
    run(before, lambda n, m, a, out: wanted.__setitem__(n, moments(m, out)), old)
    run(pruned, lambda n, m, a, out: order.append(n), mods)
    # the output layer's values are the answer; a shared module has no one set of statistics
    skip = {order[-1]} | {n for n in order if order.count(n) > 1} if order else set()

    def correct(n, m, a, out):
        if n in skip or n not in wanted:
            return out
        kept = torch.as_tensor(layers[n]["out_kept"])
        mu0, sd0 = (v[kept] for v in wanted[n])
        mu1, sd1 = moments(m, out)
        scale = torch.where(sd1 > 1e-8, sd0 / sd1.clamp_min(1e-8), torch.ones_like(sd1))
        bias = m.bias if m.bias is not None else torch.zeros_like(mu1)
        new_bias = (bias - mu1) * scale + mu0
        m.weight.mul_(scale.reshape((-1,) + (1,) * (m.weight.dim() - 1)))
        if m.bias is None:
            m.bias = nn.Parameter(new_bias)
        else:
            m.bias.copy_(new_bias)
        return m.forward(*a)   # the corrected output, for the layers after it
    run(pruned, correct, mods)
    return [n for n in order if n not in skip and n in wanted]


def distill_loss(teacher: nn.Module, alpha: float = 0.9, temperature: float = 4.0):
    """train()'s `loss`: alpha * T^2 * KL(teacher || student at temperature T) + (1 - alpha) * CE
    (a binary classifier's one logit: its sigmoid's cross-entropy); on regression targets
    alpha * MSE(student, teacher) + (1 - alpha) * MSE(student, target)."""
    teacher.eval()
    t2 = temperature * temperature

    def loss(out, x, y):
        # the teacher only runs forward, where oneDNN is safe (train() turns it off for the
        # backward of pruned widths) and ~2x faster
        was = torch.backends.mkldnn.enabled
        torch.backends.mkldnn.enabled = True
        try:
            with torch.no_grad():
                t_out = teacher(x)
        finally:
            torch.backends.mkldnn.enabled = was
        if task.is_regression(y):
            kd = task.loss(out, t_out.reshape(y.shape))
        elif out[0].numel() == 1:   # a binary classifier's one logit: the teacher's soft 0/1
            soft = torch.sigmoid(task.binary_logits(t_out) / temperature)
            kd = F.binary_cross_entropy_with_logits(task.binary_logits(out) / temperature,
                                                    soft) * t2
        else:
            kd = F.kl_div(F.log_softmax(out / temperature, 1),
                          F.log_softmax(t_out / temperature, 1), reduction="batchmean",
                          log_target=True) * t2
        return alpha * kd + (1 - alpha) * task.loss(out, y) if alpha < 1 else kd
    return loss


def scoring_batches(data: Dataset | None, batches: int = 4, batch_size: int = 128, seed: int = 0
                    ) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], tuple | None]:
    """A few random training batches for data-driven criteria, and a disjoint held-out batch
    (meta-attribute of MFP, misclassification rate of the particle filter). Never test data."""
    if data is None or data.x_train is None:
        return [], None
    n = len(data.x_train)
    if n < 2:
        return [(torch.from_numpy(data.x_train), torch.from_numpy(data.y_train))], None
    # a small training set (ECG200 has 100 samples) gives smaller and fewer batches
    batch_size = max(1, min(batch_size, n // (batches + 1)))
    batches = max(1, min(batches, n // batch_size - 1))
    rng = np.random.default_rng(seed + 1000)
    idx = rng.choice(n, (batches + 1) * batch_size, replace=False)
    out = []
    for b in range(batches + 1):
        j = np.sort(idx[b * batch_size:(b + 1) * batch_size])
        out.append((torch.from_numpy(data.x_train[j]), torch.from_numpy(data.y_train[j])))
    return out[:-1], out[-1]


def _finetune(model: nn.Module, data: Dataset | None, epochs: float, lr: float, seed: int,
              max_samples: int | None, recovery: Recovery | None = None, **kw) -> nn.Module:
    """Fine-tune a cut model; with `recovery`, distil from its teacher when it has one."""
    if epochs <= 0:
        return model.eval()
    if data is None or data.x_train is None:
        raise EdgepruneError("fine-tuning needs training data: pass --data", stage="prune")
    if recovery is not None and recovery.teacher is not None:
        kw["loss"] = distill_loss(recovery.teacher, recovery.alpha, recovery.temperature)
    if "after_step" in kw or "extra_loss" in kw:   # masks and penalties may raise the loss
        return train(model, data, epochs=epochs, lr=lr, seed=seed, max_samples=max_samples, **kw)
    train_or_retry(model, data, lr, epochs=epochs, seed=seed, max_samples=max_samples, **kw)
    return model.eval()


def _after_cut(record: dict, model: nn.Module, data, recovery: Recovery | None, seed: int,
               evaluate, before: nn.Module | None = None, layers: dict | None = None
               ) -> nn.Module:
    """Re-estimate BatchNorm statistics of a freshly cut model, or where it has no BatchNorm,
    correct its channels' statistics to those of `before` (the model the cut was made on;
    `layers`: that cut's record, default record["layers"]); record the accuracy before
    (acc_after_cut) and after (acc_before_finetune, what fine-tuning starts from)."""
    if recovery is not None and recovery.bn_batches > 0 and data is not None \
            and data.x_train is not None:
        _evaluate_into(record, "acc_after_cut", model, evaluate)
        if has_batchnorm(model):
            recalibrate_bn(model, data, recovery.bn_batches, seed=seed)
            record["bn_recalibrated_batches"] = recovery.bn_batches
        elif before is not None:
            layers = record.get("layers", {}) if layers is None else layers
            corrected = correct_channel_statistics(model, before, layers, data, seed=seed)
            record["statistics_corrected_layers"] = len(corrected)
    _evaluate_into(record, "acc_before_finetune", model, evaluate)
    return model


def _prune(model, example, data, spec: dict, seed: int, **kw):
    from . import prune
    batches, meta = scoring_batches(data, seed=seed)
    return prune(model, example, data=batches, meta_batch=meta, seed=seed, **spec, **kw)


def _evaluate_into(record: dict, key: str, model: nn.Module, evaluate) -> None:
    if evaluate is not None:
        record[key] = evaluate(model)


# ------------------------------------------------------------------------ schedules

def oneshot(model, example, data, spec, *, epochs=1.0, seed=0, max_samples=None, evaluate=None,
            lr=FINETUNE_LR, recovery=None, progress=None, **_):
    pruned, record = _prune(model, example, data, spec, seed)
    pruned = _after_cut(record, pruned, data, recovery, seed, evaluate, model)
    pruned = _finetune(pruned, data, epochs, lr, seed, max_samples, recovery, progress=progress)
    return pruned, record


def lr_rewind(model, example, data, spec, **kw):
    kw["lr"] = TRAIN_LR
    return oneshot(model, example, data, spec, **kw)


def _step_fraction(total: float, i: int, n: int) -> float:
    """Fraction to remove at step i (1-based) of n, relative to what step i-1 left, so that
    after n steps `total` of the original is gone."""
    before, after = 1 - total * (i - 1) / n, 1 - total * i / n
    return 1 - after / before


def _compose(prev: dict | None, rec: dict) -> dict:
    """Express a later step's kept indices in the original model's numbering."""
    if prev is None:
        return rec
    for name, layer in rec["layers"].items():
        old = prev["layers"].get(name)
        if old is None:
            continue
        for kept, before, okept in (("out_kept", "out_before", "out_kept"),
                                    ("in_kept", "in_before", "in_kept"),
                                    ("kept", "channels_before", "kept")):
            if kept in layer and okept in old:
                layer[kept] = [old[okept][i] for i in layer[kept]]
                layer[before] = old[before]
    rec["macs_before"], rec["params_before"] = prev["macs_before"], prev["params_before"]
    return rec


def iterative(model, example, data, spec, *, epochs=1.0, seed=0, max_samples=None,
              evaluate=None, steps=3, lr=FINETUNE_LR, recovery=None, **_):
    record, steps_log = None, []
    exact = _final_counts(model, example, spec)
    for i in range(1, steps + 1):
        s = dict(spec)
        if i < steps:  # kernel patterns belong to the final architecture only
            s.pop("kernel_ratio", None)
            s.pop("intra_stride", None)
            s.pop("layer_strides", None)
        if exact is not None:
            # per-group ratios for this step, so that rounding never drifts from the final count
            units_now = {g["name"]: len(g["kept"]) for g in record["groups"]} if record else {}
            s["ratios"] = {name: 1 - (units - round(removed * i / steps))
                           / units_now.get(name, units)
                           for name, (units, removed) in exact.items()}
        elif isinstance(s.get("ratios"), dict):
            s["ratios"] = {k: _step_fraction(v, i, steps) for k, v in s["ratios"].items()}
        for key in ("flops_target", "params_target"):
            if s.get(key) is not None:
                s[key] = _step_fraction(s[key], i, steps)
        if s.get("flops_target") is None and s.get("params_target") is None \
                and not isinstance(s.get("ratios"), dict):
            s["ratios"] = _step_fraction(float(s["ratios"]), i, steps)
        before = model
        model, rec = _prune(model, example, data, s, seed + i)
        steps_log.append({k: rec[k] for k in ("macs_after", "params_after", "searched_ratio")})
        step_layers = copy.deepcopy(rec["layers"])   # this cut's numbering (_compose renumbers)
        record = _compose(record, rec)
        if i == steps:
            model = _after_cut(record, model, data, recovery, seed, evaluate, before, step_layers)
        else:
            model = _after_cut({}, model, data, recovery, seed + i, None, before, step_layers)
        model = _finetune(model, data, epochs / steps, lr, seed + i, max_samples, recovery)
    record["steps"] = steps_log
    return model, record


def _final_counts(model, example, spec) -> dict[str, tuple[int, int]] | None:
    """{group name: (units, units removed at the end)} for a uniform or per-layer ratio without
    a MACs/params target; None where the counts depend on scores (global) or a search."""
    from . import allocate
    if spec.get("allocation", "uniform") != "uniform" or spec.get("flops_target") is not None \
            or spec.get("params_target") is not None:
        return None
    graph = DepGraph(model, example)
    r = spec.get("ratios", 0.5)
    counts = allocate.per_layer(graph, r) if isinstance(r, dict) else allocate.uniform(graph, r)
    counts = allocate.rounded(graph, counts, spec.get("round_to", 1))
    return {g.name: (g.units, counts[g.index]) for g in graph.groups}


def _zero_units(graph: DepGraph, model: nn.Module, removed: dict[int, list[int]]) -> None:
    """Make the given units output exactly zero: producer rows, BN scale/shift, depthwise
    rows. Their weights stay trainable, so they may regrow (soft pruning)."""
    with torch.no_grad():
        for g in graph.groups:
            units = removed.get(g.index, [])
            if not units:
                continue
            for m in g.members:
                if m.role == "in":
                    continue
                mod = model.get_submodule(m.layer)
                pos = torch.as_tensor([p for u in units for p in m.positions[u]], dtype=torch.long)
                if len(pos) == 0:
                    continue
                mod.weight[pos] = 0
                if getattr(mod, "bias", None) is not None:
                    mod.bias[pos] = 0


def _plan(model, example, data, spec, seed, criterion=None):
    """Kept/removed units per group for the current weights, without cutting."""
    _, rec = _prune(model, example, data, dict(spec, **({"criterion": criterion}
                                                        if criterion else {})), seed)
    removed = {gi: sorted(set(range(g["channels_before"])) - set(g["kept"]))
               for gi, g in enumerate(rec["groups"])}
    return rec, removed


def soft(model, example, data, spec, *, epochs=1.0, seed=0, max_samples=None, evaluate=None,
         lr=FINETUNE_LR, recovery=None, **_):
    model = copy.deepcopy(model)
    graph = DepGraph(model, example)
    n_train = min(len(data.x_train), max_samples or len(data.x_train))
    per_epoch = max(1, n_train // 64)
    step = [0]

    def after_step(m):
        step[0] += 1
        if step[0] % per_epoch == 0:
            _, removed = _plan(model, example, data, spec, seed)
            _zero_units(graph, model, removed)
    _, removed = _plan(model, example, data, spec, seed)
    _zero_units(graph, model, removed)
    model = _finetune(model, data, epochs, lr, seed, max_samples, after_step=after_step)
    rec, removed = _plan(model, example, data, spec, seed)
    _zero_units(graph, model, removed)
    final = {gi: torch.as_tensor(g["scores"]) for gi, g in enumerate(rec["groups"])}
    for gi, units in removed.items():
        final[gi][units] = -torch.inf  # exactly the zeroed units go
    pruned, record = _prune(model, example, data, dict(spec, criterion=Fixed(final)), seed)
    record["criterion"] = rec["criterion"]
    pruned = _after_cut(record, pruned, data, recovery, seed, evaluate, model)
    record["note"] = "soft pruning: the budget is spent before the cut; no fine-tuning after"
    return pruned, record


def fade(model, example, data, spec, *, epochs=1.0, seed=0, max_samples=None, evaluate=None,
         lr=FINETUNE_LR, recovery=None, fade_fraction=0.5, **_):
    """Gradual removal: choose the channels on the trained model, scale them down linearly to
    zero where they are read over the first 80 % of the first `fade_fraction` of the budget
    while training (the rest of the network adapts as they go), cut (exact: they read as zero
    by then), fine-tune the rest of the budget."""
    model = copy.deepcopy(model)
    graph = DepGraph(model, example)
    rec, removed = _plan(model, example, data, spec, seed)
    n_train = min(len(data.x_train), max_samples or len(data.x_train))
    fade_steps = max(1, int(0.8 * round(epochs * fade_fraction * math.ceil(n_train / 64))))
    step = [0]

    def set_gates(_m=None):
        factor = max(0.0, 1.0 - step[0] / fade_steps)
        for gi, units in removed.items():
            v = torch.ones(graph.groups[gi].units)
            v[units] = factor
            gate.set(gi, v)

    def after_step(m):
        step[0] += 1
        set_gates()
    with UnitGate(graph, model) as gate:
        set_gates()
        _finetune(model, data, epochs * fade_fraction, lr, seed, max_samples, recovery,
                  after_step=after_step)
    final = {gi: torch.ones(graph.groups[gi].units) for gi in removed}
    for gi, units in removed.items():
        final[gi][units] = 0.0  # exactly the faded units go
    pruned, record = _prune(model, example, data, dict(spec, criterion=Fixed(final)), seed)
    record["criterion"] = rec["criterion"]
    record["note"] = f"channels faded out over {fade_steps} steps before the cut"
    pruned = _after_cut(record, pruned, data, recovery, seed, evaluate, model)
    pruned = _finetune(pruned, data, epochs * (1 - fade_fraction), lr, seed + 1, max_samples,
                       recovery)
    return pruned, record


def _group_params(graph: DepGraph, model: nn.Module):
    """Per group: (list of (param, position index per unit)) over producers and BatchNorms."""
    out = {}
    for g in graph.groups:
        items = []
        for m in g.members:
            if m.role == "in":
                continue
            mod = model.get_submodule(m.layer)
            for p in (mod.weight, getattr(mod, "bias", None)):
                if p is not None:
                    items.append((p, [torch.as_tensor(pos, dtype=torch.long)
                                      for pos in m.positions]))
        out[g.index] = items
    return out


def _unit_norms(graph: DepGraph, model: nn.Module) -> dict[int, torch.Tensor]:
    norms = {}
    for gi, items in _group_params(graph, model).items():
        sq = torch.zeros(graph.groups[gi].units)
        for p, pos in items:
            flat = p.detach().reshape(p.shape[0], -1)
            sq += torch.stack([flat[i].pow(2).sum() for i in pos])
        norms[gi] = sq.sqrt()
    return norms


def lasso(model, example, data, spec, *, epochs=1.0, seed=0, max_samples=None, evaluate=None,
          lr=FINETUNE_LR, lam=0.05, recovery=None, **_):
    """Proximal group LASSO: after each SGD step shrink every unit's parameter group by
    lr*lam in norm (to exactly zero when smaller); half the budget, then cut by group norm."""
    model = copy.deepcopy(model)
    graph = DepGraph(model, example)
    groups = _group_params(graph, model)
    shrink = lr * lam

    def after_step(m):
        with torch.no_grad():
            for gi, items in groups.items():
                sq = torch.zeros(graph.groups[gi].units)
                for p, pos in items:
                    flat = p.reshape(p.shape[0], -1)
                    sq += torch.stack([flat[i].pow(2).sum() for i in pos])
                factor = torch.clamp(1 - shrink / (sq.sqrt() + 1e-12), min=0)
                for p, pos in items:
                    for u, i in enumerate(pos):
                        if len(i):
                            p[i] *= factor[u]
    model = _finetune(model, data, epochs / 2, lr, seed, max_samples, after_step=after_step)
    norms = _unit_norms(graph, model)
    zero = sum(int((n == 0).sum()) for n in norms.values())
    pruned, record = _prune(model, example, data, dict(spec, criterion=Fixed(norms)), seed)
    record["criterion"] = "group-lasso-norm"
    record["note"] = f"group LASSO lam={lam}: {zero} channel groups reached exactly zero"
    pruned = _after_cut(record, pruned, data, recovery, seed, evaluate, model)
    pruned = _finetune(pruned, data, epochs / 2, lr, seed, max_samples, recovery)
    return pruned, record


class _Gated(nn.Module):
    """The model with one hard-concrete gate per unit, applied where the units are read."""
    beta, gamma, zeta = 2 / 3, -0.1, 1.1

    def __init__(self, model: nn.Module, graph: DepGraph):
        super().__init__()
        self.model = model
        self.log_alpha = nn.ParameterList([nn.Parameter(torch.full((g.units,), 3.0))
                                           for g in graph.groups])
        self.gate = UnitGate(graph, model).__enter__()

    def gates(self) -> list[torch.Tensor]:
        out = []
        for la in self.log_alpha:
            if self.training:
                u = torch.rand_like(la).clamp(1e-6, 1 - 1e-6)
                s = torch.sigmoid((u.log() - (1 - u).log() + la) / self.beta)
            else:
                s = torch.sigmoid(la)
            out.append((s * (self.zeta - self.gamma) + self.gamma).clamp(0, 1))
        return out

    def expected_l0(self) -> torch.Tensor:
        c = self.beta * math.log(-self.gamma / self.zeta)
        return sum(torch.sigmoid(la - c).sum() for la in self.log_alpha)

    def forward(self, x):
        for gi, z in enumerate(self.gates()):
            self.gate.set(gi, z)
        return self.model(x)

    def close(self):
        self.gate.__exit__(None, None, None)


def gates(model, example, data, spec, *, epochs=1.0, seed=0, max_samples=None, evaluate=None,
          lr=FINETUNE_LR, lam=1.0, recovery=None, **_):
    """Train hard-concrete gates with the weights (half the budget, L0 penalty lam per channel
    fraction), then cut by log alpha and fine-tune the rest without gates."""
    model = copy.deepcopy(model)
    graph = DepGraph(model, example)
    gated = _Gated(model, graph)
    total = sum(g.units for g in graph.groups)
    try:
        _finetune(gated, data, epochs / 2, lr, seed, max_samples,
                  extra_loss=lambda m: lam * m.expected_l0() / total)
    finally:
        gated.close()
    scores = {gi: la.detach().clone() for gi, la in enumerate(gated.log_alpha)}
    # kept gates are ~1 after training; what they scaled is left to the fine-tuning
    pruned, record = _prune(model, example, data, dict(spec, criterion=Fixed(scores)), seed)
    record["criterion"] = "hard-concrete-gate"
    closed = sum(int((torch.sigmoid(s) < 0.5).sum()) for s in scores.values())
    record["note"] = f"L0 gates lam={lam}: {closed} of {total} gates closed"
    pruned = _after_cut(record, pruned, data, recovery, seed, evaluate, model)
    pruned = _finetune(pruned, data, epochs / 2, lr, seed, max_samples, recovery)
    return pruned, record


def slimming(model, example, data, spec, *, epochs=1.0, seed=0, max_samples=None,
             evaluate=None, lr=FINETUNE_LR, lam=1e-4, recovery=None, **_):
    """Network slimming: L1 on BatchNorm scales for half the budget, cut, fine-tune."""
    model = copy.deepcopy(model)
    bns = [m for m in model.modules() if isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d))]
    model = _finetune(model, data, epochs / 2, lr, seed, max_samples,
                      extra_loss=lambda m: lam * sum(b.weight.abs().sum() for b in bns))
    crit = spec.get("criterion", "bn-scale")
    pruned, record = _prune(model, example, data, dict(spec, criterion=crit), seed)
    pruned = _after_cut(record, pruned, data, recovery, seed, evaluate, model)
    pruned = _finetune(pruned, data, epochs / 2, lr, seed, max_samples, recovery)
    return pruned, record


def lth(model, example, data, spec, *, epochs=1.0, seed=0, max_samples=None, evaluate=None,
        rewind_state: dict | None = None, recovery=None, **_):
    if rewind_state is None:
        raise EdgepruneError("method 'lth' needs weights from early in training to rewind to "
                             "(--rewind-from FILE: a state_dict or model saved after a few "
                             "hundred steps)", stage="prune")
    _, record = _prune(model, example, data, spec, seed)
    early = copy.deepcopy(model)
    try:
        early.load_state_dict(rewind_state)
    except Exception as e:
        raise EdgepruneError(f"--rewind-from weights do not fit the model: {e}",
                             stage="prune") from None
    graph = DepGraph(early, example)
    keep = {gi: g["kept"] for gi, g in enumerate(record["groups"])}
    pruned, _ = surgery(graph, keep)
    pruned = _after_cut(record, pruned, data, recovery, seed, evaluate, early)
    record["note"] = "lottery-ticket rewinding: channels chosen on the trained model, weights " \
                     "rewound to the early checkpoint, retrained at the training learning rate"
    pruned = _finetune(pruned, data, epochs, TRAIN_LR, seed, max_samples, recovery)
    return pruned, record


def _aux_heads(model, example, graph: DepGraph, data: Dataset, seed: int,
               steps: int = 300) -> dict[int, tuple[str, nn.Module]]:
    """One linear classifier per group on the activation the group's first reader sees,
    trained on frozen features."""
    torch.manual_seed(seed)
    readers = {}
    for g in graph.groups:
        ins = g.by_role("in")
        if ins:
            readers[g.index] = ins[0].layer
    shapes = {}
    hooks = [model.get_submodule(layer).register_forward_pre_hook(
        lambda m, a, gi=gi: shapes.__setitem__(gi, a[0].shape)) for gi, layer in readers.items()]
    with torch.no_grad():
        model.eval()(example)
    for h in hooks:
        h.remove()
    # one output per class, or per regression target value
    classes = (int(np.prod(data.y_train.shape[1:])) if task.is_regression(data.y_train)
               else int(data.y_train.max()) + 1)
    heads = {gi: nn.Sequential(*([nn.AdaptiveAvgPool2d(1)] if len(shapes[gi]) == 4 else []),
                               nn.Flatten(), nn.Linear(shapes[gi][1], classes))
             for gi in readers}
    params = [p for h in heads.values() for p in h.parameters()]
    opt = torch.optim.Adam(params, lr=1e-2)
    feats = {}
    hooks = [model.get_submodule(layer).register_forward_pre_hook(
        lambda m, a, gi=gi: feats.__setitem__(gi, a[0].detach())) for gi, layer in readers.items()]
    rng = np.random.default_rng(seed)
    try:
        for _ in range(steps):
            j = rng.choice(len(data.x_train), 64, replace=False)
            x, y = torch.from_numpy(data.x_train[j]), torch.from_numpy(data.y_train[j])
            with torch.no_grad():
                model(x)
            loss = sum(task.loss(heads[gi](feats[gi]), y) for gi in heads)
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        for h in hooks:
            h.remove()
    for h in heads.values():
        h.eval()
    return {gi: (readers[gi], heads[gi]) for gi in heads}


def ccp_ac(model, example, data, spec, *, epochs=1.0, seed=0, max_samples=None, evaluate=None,
           lr=FINETUNE_LR, aux_steps=300, recovery=None, **_):
    if data is None or data.x_train is None:
        raise EdgepruneError("method 'ccp-ac' needs --data", stage="prune")
    graph = DepGraph(model, example)
    heads = _aux_heads(model, example, graph, data, seed, aux_steps)
    spec = dict(spec, criterion="ccp")
    pruned, record = _prune(model, example, data, spec, seed, aux_heads=heads, graph=graph)
    record["criterion"] = "ccp-ac"
    pruned = _after_cut(record, pruned, data, recovery, seed, evaluate, model)
    pruned = _finetune(pruned, data, epochs, lr, seed, max_samples, recovery)
    return pruned, record


METHODS: dict[str, Callable] = {
    "oneshot": oneshot, "iterative": iterative, "lr-rewind": lr_rewind, "soft": soft,
    "lasso": lasso, "gates": gates, "slimming": slimming, "lth": lth, "ccp-ac": ccp_ac,
    "fade": fade,
}
DATA_FREE_OK = {"oneshot"}


def run(method: str, model: nn.Module, example_input: torch.Tensor, data: Dataset | None,
        spec: dict, *, epochs: float = 0.0, seed: int = 0, max_samples: int | None = None,
        evaluate: Callable[[nn.Module], float] | None = None, bn_batches: int = BN_BATCHES,
        distill: float = 0.0, temperature: float = 4.0, **kw) -> tuple[nn.Module, dict]:
    """Prune with `method`. `spec` holds prune()'s criterion/ratios/allocation/targets.

    bn_batches: training batches to re-estimate BatchNorm statistics after each cut (0: off).
    distill: weight alpha of distillation from the unpruned model while fine-tuning (0: off).
    `lr` (in kw) overrides the method's fine-tuning learning rate."""
    if method not in METHODS:
        raise EdgepruneError(f"unknown method '{method}'; known: {', '.join(METHODS)}",
                             stage="prune")
    if method not in DATA_FREE_OK and (data is None or data.x_train is None):
        raise EdgepruneError(f"method '{method}' trains, so it needs --data", stage="prune")
    if epochs > 0 and (data is None or data.x_train is None):
        raise EdgepruneError("fine-tuning needs --data", stage="prune")
    if kw.get("lr") is None:
        kw.pop("lr", None)
    teacher = None
    if distill > 0:
        teacher = copy.deepcopy(model).eval()  # frozen: some methods train `model` in place
        for p in teacher.parameters():
            p.requires_grad_(False)
    recovery = Recovery(bn_batches, teacher, distill, temperature)
    torch.manual_seed(seed)
    model, record = METHODS[method](model, example_input, data, spec, epochs=epochs, seed=seed,
                                    max_samples=max_samples, evaluate=evaluate,
                                    recovery=recovery, **kw)
    patterns.finalize(model)
    record.update({"method": method, "finetune_epochs": epochs, "seed": seed,
                   "recovery": {"bn_batches": bn_batches, "distill_alpha": distill,
                                "temperature": temperature if distill > 0 else None,
                                "lr": kw.get("lr")}})
    return model.eval(), record
