"""NetAdapt-style search driven by measurements on the target, over widths, word lengths and
intra-kernel patterns.

1. Measure the unpruned model, each group alone at a grid of widths, each weight layer alone
   at each word length the target offers and each conv alone keeping 1 in s window taps (the
   cost table, costs.py), and every group at its minimum width (at 8 bits, and at the fewest
   bits and taps when that misses a budget: if both miss it, no search can meet it: say so).
2. While a budget is missed: take the most violated budget; each group proposes the largest width,
   each weight layer the most bits, and each conv without a pattern the densest one, whose
   predicted cost (anchored to the last measurement) drops by one step; a width or pattern
   proposal is pruned (the criterion; the taps keeping the most weight) and briefly fine-tuned, a
   word-length proposal only re-quantized (in parallel); the one whose quantized model (PTQ at
   its word lengths, as deployed) is most accurate on a holdout split is accepted and measured
   again on the target. Word lengths are chosen only where measurement says they cut the violated
   cost: sub-byte kernels are no faster than int8 (the codes are widened to the same int16
   pairs), so in practice they cut flash, not latency. The int8 kernels skip window taps that
   are zero in every filter, so a pattern cuts a conv's MACs while it keeps its channels.
   Then, with every budget met, the slack the steps left is given back: each group proposes
   the widest width predicted to stay within the budgets, grown from the unpruned model's
   channels without changing what the model computes (grow.py); the grown candidate whose
   short fine-tune ends with the lowest holdout loss is kept if it beats the current model
   given the same fine-tune and measures within the budgets.
3. Long fine-tune of the accepted model and a final measurement: the numbers reported are measured.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.fx as fx
import torch.nn as nn

from ..errors import EdgepruneError
from ..prune.allocate import nearest_multiple, unit_multiple
from ..task import metric_name
from .costs import INSTRUCTION_METRICS, Predictor, grid_widths, min_width
from .grow import GrowError, grow
from .measure import (METRICS, candidate_fingerprint, from_bytes, model_hash, to_bytes,
                      toolchain_fingerprint)
from .worker import JobData, Runner, candidate_job, finetune, job_key, quantized_accuracy

STAGE = "feedback"
# costs that are a peak over the memory plan, not a sum over layers (see _propose's joint)
PEAK_METRICS = ("sram_kb",)


@dataclass
class FeedbackResult:
    model: nn.Module                  # the pruned, fine-tuned model
    record: dict                      # pruning record relative to the input model (deploy's pruning.json)
    ratios: dict[str, float]          # per producer layer: fraction of channels removed
    bits: dict[str, int]              # per conv/linear layer: weight word length (8, 4, 2)
    widths: dict[str, int]            # per group: channels kept
    measured: dict                    # final costs, measured on the target
    budget: dict[str, float]
    met: bool
    message: str
    trajectory: list[dict] = field(default_factory=list)
    accuracy: float | None = None     # test accuracy of the final quantized model (at `bits`)
    float_accuracy: float | None = None  # test accuracy of the final float model
    taps: dict[str, int] = field(default_factory=dict)  # conv -> intra-kernel stride (> 1 only)
    files: dict[str, str] = field(default_factory=dict)  # name -> path from work_dir's parent
    cache: dict = field(default_factory=dict)    # where results are cached; jobs run vs reused

    def summary(self) -> dict:
        return {"met": self.met, "message": self.message, "budget": self.budget,
                "ratios": self.ratios, "bits": self.bits, "widths": self.widths,
                "tap_strides": self.taps,
                "measured": {k: v for k, v in self.measured.items() if k in METRICS + ("instructions",)},
                "accuracy": self.accuracy, "float_accuracy": self.float_accuracy,
                "trajectory": self.trajectory, "files": self.files,
                "cache": self.cache}


def check_budget(budget: dict[str, float]) -> dict[str, float]:
    if not budget:
        raise EdgepruneError("the feedback search needs a budget, e.g. latency_ms=5", stage=STAGE)
    out = {}
    for k, v in budget.items():
        if k not in METRICS:
            raise EdgepruneError(f"unknown budget '{k}'; known: {', '.join(METRICS)}", stage=STAGE)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
            raise EdgepruneError(f"budget {k}={v!r} must be a positive number", stage=STAGE)
        out[k] = float(v)
    return out


def violations(costs: dict, budget: dict) -> list[str]:
    return [f"{k}: measured {costs[k]:.4g} > budget {v:.4g}" for k, v in budget.items()
            if costs[k] > v]


def excess(costs: dict, budget: dict) -> float:
    """How far from meeting the budget: the largest measured/budget ratio (<= 1: met)."""
    return max(costs[k] / v for k, v in budget.items())


def default_cache_dir() -> Path:
    root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return root / "edgeprune" / "feedback"


class _Bar:
    """A rich progress bar for the search, or nothing where another live display is running."""

    def __init__(self, enabled: bool):
        self.p = None
        if enabled:
            from rich.console import Console
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
            # stderr: stdout may carry JSON (`deploy --json`, `feedback --json`)
            p = Progress(TextColumn("{task.description:<28}"), BarColumn(),
                         TextColumn("{task.completed:g}/{task.total:g}"), TimeElapsedColumn(),
                         console=Console(stderr=True), transient=True)
            try:
                p.start()
                self.p = p
            except Exception:  # deploy's own progress display is live: ours stays silent
                pass
        self.task = None

    def start(self, text: str, total: float) -> None:
        if self.p is not None:
            self.task = self.p.add_task(text, total=total)

    def advance(self, n: float = 1) -> None:
        if self.p is not None and self.task is not None:
            self.p.advance(self.task, n)

    def stop(self) -> None:
        if self.p is not None:
            self.p.stop()


def _useful_distillation(model: nn.Module, data, val_samples: int, distill: float,
                         log) -> float:
    """`distill`, or 0 when the unpruned model (the teacher) has learnt nothing: on the
    holdout it scores within a quarter of the way from the best constant prediction to 100
    (an untrained model handed to deploy: distilling from it held a row transformer at 29.7 %
    against 76 % on labels)."""
    from .. import task
    from ..train import evaluate
    x, y = data.x_train[-val_samples:], data.y_train[-val_samples:]
    teacher, floor = evaluate(copy.deepcopy(model), x, y), task.constant_score(y)
    if teacher >= floor + 0.25 * (100.0 - floor):
        return distill
    log(f"feedback: the unpruned model scores {teacher:.1f} % on the holdout (a constant "
        f"prediction: {floor:.1f} %): fine-tuning on labels, without distilling from it")
    return 0.0


def search(model: nn.Module, example_input: torch.Tensor, data, target, budget: dict[str, float],
           criterion: str = "l1", *, seed: int = 0, work_dir: Path | None = None, log=print,
           workers: int | None = None, cache_dir: Path | None = None, step_iterations: int = 12,
           max_iterations: int = 40, grid: tuple[float, ...] = (0.75, 0.5, 0.25),
           min_keep: float = 0.1, short_finetune_samples: int = 2000,
           finetune_epochs: float = 1.0, train_samples: int | None = None,
           val_samples: int = 1000, eval_samples: int = 2000, calib_samples: int = 64,
           lr: float = 0.01, margin: float = 0.01, progress: bool = True,
           word_lengths: tuple[int, ...] | None = None, port: str = "qemu",
           step_schedule: str = "linear", rank: str = "loss", distill: float = 0.9,
           tap_strides: tuple[int, ...] = (), channel_multiple: int | None = None,
           grow_back: bool = True) -> FeedbackResult:
    """The most accurate pruned `model` whose measured costs on `target` meet every `budget`.

    budget: {latency_ms, energy_uj, flash_kb, sram_kb: limit}. data: an edgeprune Dataset; the
    last `val_samples` training samples are the holdout the search ranks candidates on (a zoo
    model never trains on them: deploy.zoo_holdout; a user's model should not either), the first
    `train_samples` (all others by default) fine-tune; the test split gives the final accuracy.
    step_iterations: the measured excess of each budget is cut in about this many steps.
    Small steps keep many groups able to make each one (at 6 on ResNet-8 the last steps had 2
    candidates and cut a layer to 2 channels).
    step_schedule: "linear" cuts the same amount each step; "geometric" the same share of what
    is left (NetAdapt's decaying schedule: big steps while the model is robust, small ones near
    the budget, where each cut costs more accuracy).
    margin: the loop aims this fraction below each budget, since the final fine-tune moves the
    measured counts (requantization constants and data-dependent kernel paths change): ResNet-8
    at 30 % of its latency measured 0.29 % more after it, over a 0.2 % margin (bench seed 2).
    Results (measurements, candidates) are cached under cache_dir/<target>/<model hash>, so an
    interrupted search resumes. If a budget cannot be met, the result has met=False, the closest
    point reached, and a message naming the budget and the numbers.
    word_lengths: weight bits a layer may take (default: the target's [quant] weight_bits;
    (8,) searches widths only).
    rank: what picks the candidate, on its PTQ model (at its word lengths) on the holdout split:
    "loss" (cross-entropy, the default) or "accuracy". The loss is far less noisy: on 2000
    holdout samples accuracy moves in steps of 0.05 pt with a sampling spread of ~0.6 pt, about
    the gap between the candidates of one iteration.
    Each iteration's short fine-tunes draw fresh training samples (its own shuffle; the
    candidates of one iteration share theirs): the accepted path sees
    step_iterations * short_finetune_samples distinct samples, not the same few again.
    distill: weight alpha of distillation from the unpruned model in the short and the final
    fine-tunes (0: labels only). On ResNet-8 at 30 % latency the accepted path ended at 89.3 %
    holdout with it, 88.2 % without; one epoch of it after a uniform cut gave 91.06 % against
    90.70 % on labels (bench/results/feedback.json).
    tap_strides: intra-kernel patterns a conv with a window larger than 1x1 may take, e.g.
    (2, 3): keep 1 in s taps of its window (prune/patterns.py), which the int8 kernels then
    skip; measured per layer like a word length and proposed beside widths. Off by default: on
    ResNet-8 at 30 % latency the search took two patterns early and ended 0.34 pt below its
    result without them (bench/results/feedback.json, other_runs.tap_patterns).
    port: where candidates are measured; only "qemu" (a board would need each candidate's
    firmware flashed, which edgeprune does not do).
    channel_multiple: a pruned group keeps a multiple of this many channels (default: the
    target's [quant] channel_multiple): a channel that makes a width odd costs the M7 2.5x the
    instructions of one that makes it even (bench/results/widths.json), a staircase the
    table, which interpolates between a few widths, does not see.
    grow_back: once every budget is met, grow groups back into the slack left under them
    (step 2b of the module's docstring; off: the search stops at the first width that fits).
    """
    from ..prune import DepGraph
    from ..targets import load_target
    from ..train import evaluate

    budget = check_budget(budget)
    target = load_target(target) if isinstance(target, str) else target
    if port != "qemu":
        raise EdgepruneError(
            f"the feedback search measures every candidate (tens of firmwares) and can only run "
            f"them in QEMU: a board on {port} would have to be flashed with each one, which "
            f"edgeprune does not do. Search with --port qemu, then profile the deployed firmware "
            f"on the board (`edgeprune profile BUILD --port {port}` after flashing it)",
            stage=STAGE)
    if step_schedule not in ("linear", "geometric"):
        raise EdgepruneError(f"step schedule '{step_schedule}': use linear or geometric",
                             stage=STAGE)
    if rank not in ("loss", "accuracy"):
        raise EdgepruneError(f"rank '{rank}': use loss or accuracy", stage=STAGE)
    if not 0 <= distill <= 1:
        raise EdgepruneError(f"distillation weight {distill} is outside [0, 1]", stage=STAGE)
    options = _bit_options(word_lengths, target)
    bad = [t for t in tap_strides if int(t) != t or t < 2]
    if bad:
        raise EdgepruneError(f"tap strides {bad}: a conv keeps 1 in s window taps, s an "
                             "integer >= 2", stage=STAGE)
    if data.x_train is None or len(data.x_train) < 20:
        raise EdgepruneError(f"dataset {data.name} has no training split of at least 20 "
                             "samples to fine-tune candidates on and rank them", stage=STAGE)
    from ..deploy import zoo_holdout
    if zoo_holdout(len(data.x_train)) < val_samples:
        # a small split (a few hundred ECG beats) gives up the tenth a zoo model's training
        # leaves out, so that the holdout is unseen and most samples still fine-tune
        val_samples = zoo_holdout(len(data.x_train))
        log(f"feedback: candidates ranked on the last {val_samples} of "
            f"{len(data.x_train)} training samples")
    torch.set_num_threads(1)
    if distill > 0:
        distill = _useful_distillation(model, data, val_samples, distill, log)
    shape = tuple(example_input.shape)
    n_train = len(data.x_train) - val_samples
    if train_samples:
        n_train = min(n_train, train_samples)
    base = fx.symbolic_trace(copy.deepcopy(model).eval()) if not isinstance(model, fx.GraphModule) \
        else copy.deepcopy(model).eval()
    jd = JobData(data.x_train[:n_train], data.y_train[:n_train], data.x_train[-val_samples:],
                 data.y_train[-val_samples:], data.x_train[:max(calib_samples, shape[0])],
                 data.name, to_bytes(base) if distill > 0 else None, distill)
    graph = DepGraph(base, example_input)
    groups = {g.name: g for g in graph.groups}
    if not groups:
        raise EdgepruneError("the model has no prunable channel groups", stage=STAGE)
    full = {n: g.units for n, g in groups.items()}
    multiple = channel_multiple or target.channel_multiple
    # per group, the step of its widths: units that keep a multiple of `multiple` channels
    step_of = {n: unit_multiple(g, multiple) for n, g in groups.items()}
    lowest = {n: min_width(u, min_keep, step_of[n]) for n, u in full.items()}
    # weight layers (word lengths) and the groups that set their in/out channels (weight counts)
    wlayers = [n for n, m in base.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    members: dict[str, list[str]] = {n: [] for n in wlayers}
    for n, g in groups.items():
        for mem in g.members:
            if mem.role in ("out", "in") and mem.layer in members and n not in members[mem.layer]:
                members[mem.layer].append(n)
    eight = {n: 8 for n in wlayers}
    layer_options = {n: list(options) for n in wlayers}
    # convs that may keep every s-th window tap (1: all taps)
    dense_taps = {n: 1 for n, m in base.named_modules()
                  if isinstance(m, nn.Conv2d) and m.groups == 1
                  and m.weight.shape[2] * m.weight.shape[3] > 1}
    tap_options = {n: sorted(set(tap_strides)) for n in dense_taps}
    base_hash = model_hash(base)
    fingerprint = toolchain_fingerprint(target)
    cache = Path(cache_dir or default_cache_dir()) / target.name / base_hash
    cache.mkdir(parents=True, exist_ok=True)
    settings = {"criterion": criterion, "seed": seed, "short": short_finetune_samples, "lr": lr,
                "n_train": n_train, "val": val_samples, "calib": calib_samples,
                "data": data.name, "rank": f"ptq-{rank}", "distill": distill,
                "code": candidate_fingerprint()}
    workers = workers or min(2, os.cpu_count() or 1)
    bar = _Bar(progress)
    runner = Runner(jd, cache, workers)
    log(f"feedback: {len(groups)} channel groups, budget "
        + ", ".join(f"{k}={v:g}" for k, v in budget.items())
        + f", criterion {criterion}, {workers} worker(s), cache {cache}")

    def measure(models: list[nn.Module], what: str, bits: list[dict] | None = None,
                probe: bool = False) -> list[dict]:
        """Measured costs; a probe (cost table, corner) may return {"error"} for word lengths a
        kernel cannot take, anything else must measure."""
        bar.start(what, len(models))
        out = runner.measure(models, shape, target, fingerprint, done=bar.advance, bits=bits)
        for c in out:
            if "error" in c and not probe:
                raise EdgepruneError(f"measuring on {target.name} failed: {c['error']}",
                                     stage=STAGE)
        return out

    def qacc(m: nn.Module, bits: dict[str, int], x, y) -> float:
        return quantized_accuracy(m, shape, jd.calib, x, y, bits)

    def at_widths(widths: dict[str, int], taps: dict[str, int] | None = None) -> nn.Module:
        """The base model cut to `widths` (by L1: cost does not depend on which channels), with
        the intra-kernel patterns `taps`."""
        from ..prune import patterns, prune
        ratios = {n: (full[n] - k) / full[n] for n, k in widths.items() if k < full[n]}
        cut = prune(base, example_input, "l1", ratios={"*": 0.0, **ratios}, graph=graph)[0]
        patterns.stride_layers(cut, {n: t for n, t in (taps or {}).items() if t > 1})
        return cut

    try:
        # 1. the unpruned and the smallest model; the cost table only if a search is needed
        base_costs, min_costs = measure([base, at_widths(lowest)], "unpruned and smallest (QEMU)")
        log(f"feedback: unpruned {_fmt(base_costs)}; smallest (every group at its minimum) "
            f"{_fmt(min_costs)}")
        # the chip's own flash and SRAM are budgets too, where the unpruned model exceeds them
        for metric, size in (("flash_kb", target.flash_bytes), ("sram_kb", target.sram_bytes)):
            chip = size / 1024
            if base_costs[metric] > chip and budget.get(metric, float("inf")) > chip:
                budget[metric] = chip
                log(f"feedback: the unpruned model needs {base_costs[metric]:.1f} kB of "
                    f"{metric[:-3]}, {target.name} has {chip:.0f} kB: {metric}={chip:g} joins "
                    "the budget")
        fewest = {n: min(layer_options[n] or [8]) for n in wlayers}
        sparsest = {n: max(tap_options[n] or [1]) for n in dense_taps}
        corners = [(min_costs, eight, dense_taps)]
        if (options or sparsest != dense_taps) and violations(min_costs, budget):
            # fewer bits and taps may reach what widths alone cannot: measure, not assume
            low_costs = measure([at_widths(lowest, sparsest)],
                                "smallest at fewest bits and taps (QEMU)", bits=[fewest],
                                probe=True)[0]
            if "error" in low_costs:
                log(f"feedback: the smallest model at the fewest bits and taps cannot be built "
                    f"({low_costs['error']}); judging from 8 bits and every tap only")
            else:
                corners.append((low_costs, fewest, sparsest))
                log(f"feedback: smallest at the fewest bits and taps {_fmt(low_costs)}")
        tables: dict[str, dict[int, dict]] = {n: {full[n]: base_costs} for n in groups}
        bit_tables: dict[str, dict[int, dict]] = {n: {} for n in wlayers}
        tap_tables: dict[str, dict[int, dict]] = {n: {} for n in dense_taps}
        model_err = None
        # a budget no corner meets: no assignment of widths, word lengths and taps can meet it
        impossible = [k for k in budget if all(c[k] > budget[k] for c, _, _ in corners)]
        if violations(base_costs, budget) and not impossible:
            table_points = [(n, k) for n in groups
                            for k in grid_widths(full[n], grid, min_keep, step_of[n])
                            if k < full[n]]
            bit_points = [(n, b) for n in wlayers for b in layer_options[n]]
            tap_points = [(n, t) for n in dense_taps for t in tap_options[n]]
            measured = measure([at_widths({n: k}) for n, k in table_points]
                               + [base] * len(bit_points)
                               + [at_widths({}, {n: t}) for n, t in tap_points],
                               "cost table (QEMU)",
                               bits=[None] * len(table_points)
                               + [{n: b} for n, b in bit_points] + [None] * len(tap_points),
                               probe=True)
            for (n, k), c in zip(table_points, measured):
                tables[n][k] = c
            for (n, t), c in zip(tap_points, measured[len(table_points) + len(bit_points):]):
                tap_tables[n][t] = c
            for (n, b), c in zip(bit_points, measured[len(table_points):]):
                if "error" in c:   # this layer's kernel cannot take b bits
                    log(f"feedback: {n} at {b} bits cannot be built; not searched ({c['error']})")
                    layer_options[n].remove(b)
                else:
                    bit_tables[n][b] = c
            predictor = Predictor(base_costs, tables, full, bit_tables, members, tap_tables)
            model_err = (predictor.predict(lowest)["instructions"]
                         / max(1, min_costs["instructions"]) - 1)
            log(f"feedback: cost table of {len(table_points)} width and {len(bit_points)} "
                f"word-length and {len(tap_points)} tap-pattern measurements; the model of "
                f"it predicts the smallest model within "
                f"{model_err:+.1%}")
        predictor = Predictor(base_costs, tables, full, bit_tables, members, tap_tables)
        table_json = {"base": _slim(base_costs), "minimum": _slim(min_costs),
                      "minimum_widths": lowest, "model_error_at_minimum": model_err,
                      "groups": {n: {str(k): _slim(c) for k, c in sorted(t.items())}
                                 for n, t in tables.items()},
                      "word_lengths": {n: {str(b): _slim(c) for b, c in sorted(t.items())}
                                       for n, t in bit_tables.items() if t},
                      "tap_patterns": {n: {str(s): _slim(c) for s, c in sorted(t.items())}
                                       for n, t in tap_tables.items() if t}}
        if len(corners) > 1:
            table_json["minimum_fewest_bits"] = _slim(corners[1][0])

        # accuracy of the starting point's int8 PTQ on the holdout split (ranks candidates)
        cur_model, cur_widths, cur_bits, cur_costs = base, dict(full), dict(eight), base_costs
        cur_taps = dict(dense_taps)
        cur_acc = qacc(cur_model, cur_bits, jd.x_val, jd.y_val)
        trajectory = [_point(0, None, cur_widths, cur_acc, cur_costs, None, bits=cur_bits)]
        composed = _identity_record(graph)

        if impossible:
            # No assignment reaches the budget: report the closest corner.
            costs, bits, taps = min(corners, key=lambda cb: excess(cb[0], budget))
            what = ("every layer at its minimum width" if bits == eight and taps == dense_taps
                    else "every layer at its minimum width, the fewest bits and window taps")
            message = ("budget cannot be met on " + target.name + ": even the smallest model "
                       f"({what}) measures " + "; ".join(violations(costs, budget)))
            log(f"feedback: {message}")
            patterned = _changed(dense_taps, taps)
            blob, acc, rec = runner.map("candidate", candidate_job, [(
                job_key(base_hash, "minimum", lowest, bits, settings,
                        *([patterned] if patterned else [])),
                (to_bytes(base), example_input, _removal(groups, full, lowest), criterion, seed,
                 short_finetune_samples, lr, bits, patterned))])[0]
            cur_model, cur_widths, cur_bits, cur_costs = from_bytes(blob), dict(lowest), bits, costs
            cur_taps = taps
            composed = _compose(composed, rec)
            trajectory.append(_point(1, "minimum", cur_widths, acc, cur_costs, None, bits=bits,
                                     taps=taps))
        else:
            aim = {k: v * (1 - margin) for k, v in budget.items()}
            step = {m: (base_costs[m] - aim[m]) / step_iterations for m in budget
                    if base_costs[m] > aim[m]}
            shrink = {m: (aim[m] / base_costs[m]) ** (1 / step_iterations) for m in step}
            it = 0
            bar.start("search (budgets met)", len(budget))
            bar.advance(len(budget) - len(violations(cur_costs, aim)))
            while violations(cur_costs, aim) and it < max_iterations:
                it += 1
                metric = max(budget, key=lambda k: cur_costs[k] / aim[k])
                gap = cur_costs[metric] - aim[metric]
                if step_schedule == "geometric" and metric in shrink:
                    goal = max(aim[metric], cur_costs[metric] * shrink[metric])
                else:
                    goal = cur_costs[metric] - min(step.get(metric) or gap, gap)
                # other budgets may not be pushed over (a sub-byte kernel is not faster)
                limits = {k: max(aim[k], cur_costs[k]) for k in budget if k != metric}
                proposals = _propose(predictor, cur_costs, cur_widths, cur_bits, cur_taps, lowest,
                                     layer_options, tap_options, metric, goal, limits,
                                     joint=metric in PEAK_METRICS, step_of=step_of)
                if not proposals:
                    break
                parent = to_bytes(cur_model)
                parent_hash = model_hash(cur_model)
                it_seed = seed + 1000 * it   # fresh fine-tuning samples each iteration
                jobs = []
                for p in proposals:
                    if p.kind in ("width", "joint"):
                        jobs.append((job_key(parent_hash, p.name, p.widths.get(p.name, p.widths),
                                             cur_bits, settings, it_seed),
                                     (parent, example_input, _removal(groups, cur_widths,
                                                                      p.widths),
                                      criterion, it_seed, short_finetune_samples, lr, cur_bits)))
                    elif p.kind == "taps":  # a window pattern, then the same short fine-tune
                        jobs.append((job_key(parent_hash, "taps", p.taps, cur_bits, settings,
                                             it_seed),
                                     (parent, example_input, {}, criterion, it_seed,
                                      short_finetune_samples, lr, cur_bits,
                                      _changed(cur_taps, p.taps))))
                    else:  # word length: the same float model, quantized differently
                        jobs.append((job_key(parent_hash, "bits", p.bits, settings),
                                     (parent, example_input, {}, criterion, seed, 0, lr,
                                      p.bits)))
                bar.start(f"iteration {it}: {len(jobs)} candidates", len(jobs))
                results = runner.map("candidate", candidate_job, jobs, done=bar.advance)
                best = max(range(len(results)), key=lambda i: (
                    -results[i][2]["holdout_loss"] if rank == "loss" else results[i][1],
                    -proposals[i].pred[metric]))
                chosen = proposals[best]
                blob, acc, rec = results[best]
                new_model = from_bytes(blob)
                new_costs = measure([new_model], f"iteration {it}: measure",
                                    bits=[chosen.bits])[0]
                if chosen.kind == "width" and metric in INSTRUCTION_METRICS:
                    g, k = chosen.name, chosen.widths[chosen.name]

                    def reaches(c):   # the step's goal, the other budgets not pushed over
                        return c[metric] <= goal and all(c[m] <= v for m, v in limits.items())
                    settled = _walk_measured(
                        k, reaches(new_costs), cur_widths[g], lowest[g], step_of[g],
                        lambda k2: reaches(measure([at_widths({**chosen.widths, g: k2},
                                                              cur_taps)],
                                                   f"iteration {it}: {g} at {k2} (QEMU)",
                                                   bits=[chosen.bits])[0]))
                    if settled != k:
                        log(f"feedback: iteration {it}: {g} at {k} channels measures "
                            f"{new_costs[metric]:.4g} {metric} for a goal of {goal:.4g}; "
                            f"{settled} is the widest that reaches it within the other budgets, as "
                            "measured")
                        w = {**chosen.widths, g: settled}
                        blob, acc, rec = runner.map("candidate", candidate_job, [(
                            job_key(parent_hash, g, settled, cur_bits, settings, it_seed),
                            (parent, example_input, _removal(groups, cur_widths, w), criterion,
                             it_seed, short_finetune_samples, lr, cur_bits))])[0]
                        chosen = Proposal("width", g, w, cur_bits, cur_taps,
                                          predictor.anchored(cur_costs, cur_widths, w, cur_bits,
                                                             measured_taps=cur_taps))
                        new_model = from_bytes(blob)
                        new_costs = measure([new_model], f"iteration {it}: measure",
                                            bits=[chosen.bits])[0]
                before = len(violations(cur_costs, aim))
                cur_model, cur_widths, cur_bits, cur_costs = (new_model, chosen.widths,
                                                              chosen.bits, new_costs)
                cur_taps = chosen.taps
                composed = _compose(composed, rec)
                bar.advance(before - len(violations(cur_costs, aim)))
                trajectory.append(_point(it, chosen.label, cur_widths, acc, cur_costs,
                                         chosen.pred, results, [p.label for p in proposals],
                                         bits=cur_bits, taps=cur_taps))
                change = (f"{chosen.name} -> {chosen.widths[chosen.name]} channels"
                          if chosen.kind == "width" else
                          f"{chosen.name} -> 1 in {chosen.taps[chosen.name]} window taps"
                          if chosen.kind == "taps" else
                          f"every group together -> {chosen.widths}"
                          if chosen.kind == "joint" else
                          f"{chosen.name} -> {chosen.bits[chosen.name]}-bit weights")
                log(f"feedback: iteration {it}: cut {metric}, {len(proposals)} candidates, chose "
                    f"{change}, holdout (quantized) {acc:.2f} %, loss "
                    f"{rec.get('holdout_loss', float('nan')):.4f}, measured "
                    f"{_fmt(cur_costs)} (predicted {metric} {chosen.pred[metric]:.4g})")

            # 2b. Grow back into the slack the steps left under the aim (a step's cut can free
            # more than asked: a kernel's tile, or the last step's overshoot): each group
            # proposes the widest width predicted to stay within every aim, grown from the
            # unpruned model without changing what the model computes (grow.py); the grown
            # candidates and the current model get the same short fine-tune, and the grown one
            # with the lowest holdout loss is kept if it beats the current one and measures
            # within the aim.
            # (not with window patterns: the returned channels' filters would have every tap)
            widest = dict(full)   # lowered where a growth measured over the aim
            patterned = any(t > 1 for t in cur_taps.values())
            while (grow_back and not patterned and not violations(cur_costs, aim)
                   and it < max_iterations):
                offers = _growths(predictor, cur_costs, cur_widths, cur_bits, cur_taps, widest,
                                  full, aim, step_of)
                if not offers:
                    break
                try:
                    grown = [grow(graph, cur_model, composed, g, k) for g, k in offers]
                except GrowError as e:   # a graph grow() cannot map back: keep what fits
                    log(f"feedback: not growing groups back: {e}")
                    break
                it += 1
                it_seed = seed + 1000 * it
                models = [cur_model] + [m for m, _ in grown]
                jobs = [(job_key(model_hash(m), "grow", cur_bits, settings, it_seed),
                         (to_bytes(m), example_input, {}, criterion, it_seed,
                          short_finetune_samples, lr, cur_bits)) for m in models]
                bar.start(f"iteration {it}: {len(offers)} growths and the current model",
                          len(jobs))
                results = runner.map("candidate", candidate_job, jobs, done=bar.advance)
                loss = [r[2]["holdout_loss"] if rank == "loss" else -r[1] for r in results]
                best = min(range(1, len(results)), key=lambda i: loss[i])
                g, k = offers[best - 1]
                if loss[best] >= loss[0]:
                    log(f"feedback: iteration {it}: no growth helps (best {g} -> {k} channels, "
                        f"holdout loss {results[best][2]['holdout_loss']:.4f} against "
                        f"{results[0][2]['holdout_loss']:.4f} for the current widths)")
                    break
                blob, acc, _ = results[best]
                new_model = from_bytes(blob)
                new_costs = measure([new_model], f"iteration {it}: measure", bits=[cur_bits])[0]
                if violations(new_costs, aim):
                    widest[g] = k - 1
                    log(f"feedback: iteration {it}: {g} grown to {k} channels measures "
                        f"{_fmt(new_costs)}, over the aim; it grows to at most {widest[g]}")
                    continue
                cur_model, cur_costs, composed = new_model, new_costs, grown[best - 1][1]
                cur_widths = {**cur_widths, g: k}
                trajectory.append(_point(it, f"{g} grown", cur_widths, acc, cur_costs,
                                         None, results[1:], [f"{g2}+" for g2, _ in offers],
                                         bits=cur_bits, taps=cur_taps))
                log(f"feedback: iteration {it}: grew {g} to {k} channels ({len(offers)} "
                    f"candidates), holdout (quantized) {acc:.2f} %, measured {_fmt(cur_costs)}")

        # 3. long fine-tune and the final measurement
        if finetune_epochs > 0:
            log(f"feedback: fine-tuning the chosen model for {finetune_epochs:g} epoch(s)")
            finetune(cur_model, jd.dataset(), finetune_epochs, lr, seed,
                     base if distill > 0 else None, distill)
        final_costs = measure([cur_model], "final measurement", bits=[cur_bits])[0]
        x_test, y_test = data.x_test[:eval_samples], data.y_test[:eval_samples]
        # the accuracies of what runs on the target: PTQ at the chosen word lengths
        test_acc = qacc(cur_model, cur_bits, x_test, y_test)
        float_acc = evaluate(cur_model, x_test, y_test)
        holdout = qacc(cur_model, cur_bits, jd.x_val, jd.y_val)
        trajectory.append(_point(len(trajectory), "final", cur_widths, holdout, final_costs, None,
                                 bits=cur_bits, taps=cur_taps))
        trajectory[-1]["test_accuracy"] = test_acc
        trajectory[-1]["float_test_accuracy"] = float_acc

        bad = violations(final_costs, budget)
        met = not bad
        if met:
            low = {n: b for n, b in cur_bits.items() if b != 8}
            message = (f"every budget met as measured on {target.name}: {_fmt(final_costs)}; "
                       f"test {metric_name(y_test)} {test_acc:.2f} % quantized "
                       f"({float_acc:.2f} % float)"
                       + ("; weights below 8 bits: " + ", ".join(f"{n} {b}"
                                                                   for n, b in low.items())
                          if low else ""))
        elif not impossible:
            closest = min(trajectory, key=lambda p: excess(p["measured"], budget))
            message = (f"budget not met on {target.name}: " + "; ".join(bad) + ". The search "
                       f"stopped (no group can shrink further, no layer lose bits, or "
                       f"{max_iterations} iterations); "
                       f"closest point: iteration {closest['iteration']} with "
                       f"{_fmt(closest['measured'])}")
        else:
            # re-measured after fine-tuning: data-dependent kernel paths (saturation, pooling)
            # move the count a few percent with the weights
            message += (f"; closest point (the smallest model, fine-tuned and re-measured): "
                        f"{_fmt(final_costs)}")
        log(f"feedback: {message}")
    finally:
        bar.stop()
        runner.close()

    ratios = {layer: round(1 - cur_widths[n] / full[n], 6) for n, g in groups.items()
              for layer in g.layers}
    bits = {n: int(cur_bits.get(n, 8)) for n in wlayers}
    taps = {n: t for n, t in cur_taps.items() if t > 1}
    record = {"criterion": criterion, "allocation": "feedback", "layers": composed,
              "per_layer": ratios, "widths": cur_widths, "bits": bits, "tap_strides": taps,
              "round_to": multiple,
              "budget": budget, "met": met}
    result = FeedbackResult(cur_model, record, ratios, bits, cur_widths, final_costs, budget, met,
                            message, trajectory, test_acc, float_acc, taps,
                            cache={"dir": str(cache), "runs": runner.runs, "hits": runner.hits})
    if work_dir is not None:
        result.files = write_outputs(result, Path(work_dir), target.name, criterion, table_json)
    log(f"feedback: measurements {runner.runs} run, {runner.hits} from cache")
    return result


@dataclass
class Proposal:
    kind: str                 # "width" | "joint" (every group) | "bits" | "taps"
    name: str                 # the group (width), "joint", or the layer (bits, taps)
    widths: dict[str, int]
    bits: dict[str, int]
    taps: dict[str, int]      # conv -> intra-kernel stride (1: every tap)
    pred: dict[str, float]

    @property
    def label(self) -> str:
        if self.kind == "taps":
            return f"{self.name}/{self.taps[self.name]}"
        return self.name if self.kind in ("width", "joint") else \
            f"{self.name}@{self.bits[self.name]}b"


def _propose(predictor: Predictor, cur_costs: dict, cur_widths: dict[str, int],
             cur_bits: dict[str, int], cur_taps: dict[str, int], lowest: dict[str, int],
             options: dict[str, list[int]], tap_options: dict[str, list[int]],
             metric: str, goal: float, limits: dict[str, float],
             joint: bool = False, step_of: dict[str, int] | None = None) -> list[Proposal]:
    """Per group, the largest width, per weight layer the most bits, and per conv without a
    pattern the densest intra-kernel pattern (every s-th window tap), whose predicted `metric`
    reaches `goal` (NetAdapt's "smallest change that cuts the cost by a step"); knobs that
    cannot reach it alone propose their extreme only when none can, and only if it cuts
    `metric`. A proposal predicted to push another budget over its `limits` is dropped.
    joint: also every group shrunk by the same share (the first share predicted to reach the
    goal, else the smallest): for a peak like SRAM, set by two live tensors of different
    groups at once, the table (one group at a time) misses what shrinking both does; without
    it, once no single group could make the step, the search stopped short of an SRAM budget
    that uniform pruning meets (ResNet-8 at 60 %: 51.2 kB for 40.5).
    step_of: per group, the multiple its widths keep (1 where missing)."""
    step_of = step_of or {}
    reach, partial = [], []

    def pred(w, b, t):
        return predictor.anchored(cur_costs, cur_widths, w, cur_bits, b, cur_taps, t)

    def ok(p):
        return all(p[k] <= v for k, v in limits.items())

    def knob(kind: str, name: str, steps: list[tuple[dict, dict]]) -> None:
        """`steps`: the knob's (widths, bits, taps) settings, smallest change first. A step that
        reaches the goal but pushes another budget over gives way to a larger one (kernels cost
        a staircase: one channel less can take more flash, several less take less)."""
        for w, b, t in steps:
            p = pred(w, b, t)
            if p[metric] <= goal and ok(p):
                reach.append(Proposal(kind, name, w, b, t, p))
                return
        # none reaches the goal within the other budgets: the extreme (the last `w, b, t, p`),
        # if it helps
        if p[metric] < cur_costs[metric] and ok(p):
            partial.append(Proposal(kind, name, w, b, t, p))

    for g, k in cur_widths.items():
        if k > lowest[g]:
            m = step_of.get(g, 1)
            knob("width", g, [({**cur_widths, g: k2}, cur_bits, cur_taps)
                              for k2 in range(k - 1, lowest[g] - 1, -1) if k2 % m == 0])
    for layer, opts in options.items():
        lower = sorted((b for b in opts if b < cur_bits[layer]), reverse=True)
        if lower:
            knob("bits", layer, [(cur_widths, {**cur_bits, layer: b}, cur_taps) for b in lower])
    for layer, strides in tap_options.items():
        if strides and cur_taps[layer] == 1:   # one pattern per layer: patterns do not compose
            knob("taps", layer, [(cur_widths, cur_bits, {**cur_taps, layer: t})
                                 for t in strides])
    together = []
    if joint:
        steps = _shrink_together(cur_widths, lowest, step_of)
        if steps:   # the first share predicted to reach the goal, else the smallest
            preds = [pred(w, cur_bits, cur_taps) for w in steps]
            i = next((i for i, p in enumerate(preds) if p[metric] <= goal), 0)
            if ok(preds[i]):
                together.append(Proposal("joint", "joint", steps[i], cur_bits, cur_taps,
                                         preds[i]))
    return (reach or partial) + together


def _growths(predictor: Predictor, cur_costs: dict, cur_widths: dict[str, int],
             cur_bits: dict[str, int], cur_taps: dict[str, int], widest: dict[str, int],
             full: dict[str, int], aim: dict[str, float],
             step_of: dict[str, int]) -> list[tuple[str, int]]:
    """Per group, the widest width up to `widest` (a multiple of its step, or its `full`
    width) predicted to keep every cost within `aim`: [(group, width)]."""
    out = []
    for g, k in cur_widths.items():
        m = step_of.get(g, 1)
        for k2 in sorted((w for w in range(k + 1, widest[g] + 1) if w % m == 0 or w == full[g]),
                         reverse=True):
            p = predictor.anchored(cur_costs, cur_widths, {**cur_widths, g: k2}, cur_bits,
                                   cur_bits, cur_taps, cur_taps)
            if all(p[b] <= v for b, v in aim.items()):
                out.append((g, k2))
                break
    return out


def _walk_measured(k: int, reaches: bool, current: int, lowest: int, step: int,
                   measured_reaches) -> int:
    """The widest width of one group, below `current` and not below `lowest`, whose measured cost
    reaches the step's goal, walked from the predicted width `k` (`reaches`: whether k does, as
    measured); `measured_reaches(k2)` measures another width. When even `lowest` misses, it is
    the answer (the largest cut). The table interpolates a few widths, but the kernels cost a
    staircase in the channel count (SMLAD takes input channels in pairs, a tile 4 output
    channels): ResNet-8's 28x28 convs measure 504k instructions at 8 channels, 707k at 9 and
    769k at 10, so a predicted width can miss its goal, or undershoot it, by a channel.
    `step`: the walk keeps widths a multiple of it (lowest is one)."""
    if reaches:
        while k + step < current and measured_reaches(k + step):
            k += step
        return k
    while k - step >= lowest:
        k -= step
        if measured_reaches(k):
            break
    return k


def _shrink_together(widths: dict[str, int], lowest: dict[str, int],
                     step_of: dict[str, int]) -> list[dict[str, int]]:
    """Every group shrunk by 5 %, 10 %, ... of its width (at least one step of its multiple,
    never below its lowest), smallest change first, without repeats."""
    out: list[dict[str, int]] = []
    for i in range(1, 20):
        w = {}
        for g, k in widths.items():
            m = step_of.get(g, 1)
            w[g] = max(lowest[g], min((k - 1) // m * m, nearest_multiple(k * (1 - i / 20), m)))
        if w != widths and (not out or w != out[-1]):
            out.append(w)
    return out


def _bit_options(word_lengths, target) -> list[int]:
    """Sub-8 weight word lengths the search may give a layer: the target's, or those asked."""
    offered = sorted({int(b) for b in target.quant["weight_bits"]})
    asked = offered if word_lengths is None else sorted({int(b) for b in word_lengths})
    for b in asked:
        if b not in (2, 4, 8) or b not in offered:
            raise EdgepruneError(f"word length {b}: target {target.name} offers weight bits "
                                 f"{offered} ({target.path}); the quantizer takes 8, 4 or 2",
                                 stage=STAGE)
    return [b for b in asked if b < 8]


def _changed(cur: dict[str, int], new: dict[str, int]) -> dict[str, int]:
    """The layers whose setting `new` changes from `cur`."""
    return {n: v for n, v in new.items() if cur.get(n) != v}


def _removal(groups, cur: dict[str, int], new: dict[str, int]) -> dict[str, float]:
    """Per-layer ratios that take the current model (widths `cur`) to `new`: prune()'s input."""
    return {groups[g].layers[0]: (cur[g] - new[g]) / cur[g] for g in new if new[g] < cur[g]}


def _identity_record(graph) -> dict:
    out = {}
    for name, layer in graph.layers.items():
        mod, e = layer.module, {"type": type(layer.module).__name__, "kind": layer.kind}
        if layer.kind in ("conv", "gconv", "groupwise", "linear"):
            n_out = mod.out_channels if hasattr(mod, "out_channels") else mod.out_features
            n_in = mod.in_channels if hasattr(mod, "in_channels") else mod.in_features
            e.update(out_before=n_out, out_kept=list(range(n_out)),
                     in_before=n_in, in_kept=list(range(n_in)))
        elif layer.kind in ("bn", "dwconv", "gn", "prelu", "ln"):   # a weight per channel
            n = len(layer.in_layout.ids)
            e.update(channels_before=n, kept=list(range(n)))
        out[name] = e
    return out


def _compose(prev: dict, step: dict) -> dict:
    """Kept indices of the input model after one more pruning step (indices into the previous)."""
    out = copy.deepcopy(prev)
    for name, e in step["layers"].items():
        if name not in out:
            continue
        for key in ("out_kept", "in_kept", "kept"):
            if key in e and key in out[name]:
                out[name][key] = [out[name][key][i] for i in e[key]]
    return out


def _slim(c: dict) -> dict:
    return {k: c[k] for k in ("instructions",) + METRICS + ("kernels",)}


def _fmt(c: dict) -> str:
    return (f"{c['latency_ms']:.3f} ms ({c['instructions']:,} instr), {c['energy_uj']:.1f} uJ, "
            f"flash {c['flash_kb']:.1f} kB, SRAM {c['sram_kb']:.1f} kB")


def _point(it, group, widths, acc, costs, predicted, candidates=None, groups=None,
           bits=None, taps=None) -> dict:
    p = {"iteration": it, "group": group, "widths": dict(widths),
         "bits": {n: b for n, b in (bits or {}).items() if b != 8},
         "tap_strides": {n: t for n, t in (taps or {}).items() if t > 1}, "accuracy": acc,
         "measured": {k: costs[k] for k in ("instructions",) + METRICS},
         **{k: costs[k] for k in METRICS}}
    if predicted is not None:
        p["predicted"] = {k: predicted[k] for k in ("instructions",) + METRICS}
    if candidates is not None:   # candidate_job results
        p["candidates"] = [{"group": g, "accuracy": a, "loss": rec.get("holdout_loss")}
                           for g, (_, a, rec) in zip(groups, candidates)]
    return p


def write_outputs(result: FeedbackResult, out: Path, target: str, criterion: str,
                  table: dict) -> dict[str, str]:
    """ratios.json (for `prune --per-layer` / `deploy --per-layer`), trajectory.json,
    cost_table.json and pareto.png, each written to a temp name and renamed."""
    from .plot import pareto_png

    out.mkdir(parents=True, exist_ok=True)
    files = {
        "ratios.json": json.dumps({"ratios": result.ratios, "bits": result.bits,
                                   "tap_strides": result.taps,
                                   "widths": result.widths, "target": target,
                                   "criterion": criterion, "budget": result.budget,
                                   "met": result.met, "measured": _slim_measured(result.measured),
                                   "message": result.message}, indent=1),
        "trajectory.json": json.dumps(result.trajectory, indent=1),
        "cost_table.json": json.dumps(table, indent=1),
    }
    written = {}
    for name, text in files.items():
        tmp = out / f".{name}.tmp"
        tmp.write_text(text)
        tmp.replace(out / name)
        written[name] = f"{out.name}/{name}"
    tmp = out / ".pareto.png.tmp"
    tmp.write_bytes(pareto_png(result.trajectory, result.budget.get("latency_ms")))
    tmp.replace(out / "pareto.png")
    written["pareto.png"] = f"{out.name}/pareto.png"
    return written


def _slim_measured(c: dict) -> dict:
    return {k: c[k] for k in ("instructions",) + METRICS}
