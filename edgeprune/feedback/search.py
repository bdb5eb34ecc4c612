"""NetAdapt-style search driven by measurements on the target.

1. Measure the unpruned model, each group alone at a grid of widths (the cost table, costs.py),
   and every group at its minimum width (if that misses a budget, no search can meet it: say so).
2. While a budget is missed: take the most violated budget; each group proposes the largest width
   whose predicted cost (anchored to the last measurement) drops by one step; each proposal is
   pruned with the criterion and briefly fine-tuned (in parallel); the most accurate on a holdout
   split is accepted and measured again on the target.
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
from .costs import Predictor, grid_widths, min_width
from .measure import METRICS, from_bytes, model_hash, to_bytes, toolchain_fingerprint
from .worker import JobData, Runner, candidate_job, finetune, job_key

STAGE = "feedback"


@dataclass
class FeedbackResult:
    model: nn.Module                  # the pruned, fine-tuned model
    record: dict                      # pruning record relative to the input model (deploy's pruning.json)
    ratios: dict[str, float]          # per producer layer: fraction of channels removed
    bits: dict[str, int]              # per layer: weight word length
    widths: dict[str, int]            # per group: channels kept
    measured: dict                    # final costs, measured on the target
    budget: dict[str, float]
    met: bool
    message: str
    trajectory: list[dict] = field(default_factory=list)
    accuracy: float | None = None     # test accuracy of the final float model
    files: dict[str, str] = field(default_factory=dict)  # name -> path from work_dir's parent
    cache: dict = field(default_factory=dict)    # where results are cached; jobs run vs reused

    def summary(self) -> dict:
        return {"met": self.met, "message": self.message, "budget": self.budget,
                "ratios": self.ratios, "bits": self.bits, "widths": self.widths,
                "measured": {k: v for k, v in self.measured.items() if k in METRICS + ("instructions",)},
                "accuracy": self.accuracy, "trajectory": self.trajectory, "files": self.files,
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


def search(model: nn.Module, example_input: torch.Tensor, data, target, budget: dict[str, float],
           criterion: str = "l1", *, seed: int = 0, work_dir: Path | None = None, log=print,
           workers: int | None = None, cache_dir: Path | None = None, step_iterations: int = 6,
           max_iterations: int = 40, grid: tuple[float, ...] = (0.75, 0.5, 0.25),
           min_keep: float = 0.1, short_finetune_samples: int = 2000,
           finetune_epochs: float = 1.0, train_samples: int | None = None,
           val_samples: int = 1000, eval_samples: int = 2000, calib_samples: int = 64,
           lr: float = 0.01, margin: float = 0.002, progress: bool = True) -> FeedbackResult:
    """The most accurate pruned `model` whose measured costs on `target` meet every `budget`.

    budget: {latency_ms, energy_uj, flash_kb, sram_kb: limit}. data: an edgeprune Dataset; the
    last `val_samples` training samples are the holdout the search ranks candidates on, the first
    `train_samples` (all others by default) fine-tune; the test split gives the final accuracy.
    step_iterations: the measured excess of each budget is cut in about this many steps.
    margin: the loop aims this fraction below each budget, since the final fine-tune moves the
    measured counts a little (by ~0.02 % observed: requantization constants change).
    Results (measurements, candidates) are cached under cache_dir/<target>/<model hash>, so an
    interrupted search resumes. If a budget cannot be met, the result has met=False, the closest
    point reached, and a message naming the budget and the numbers.
    """
    from ..prune import DepGraph
    from ..targets import load_target
    from ..train import evaluate

    budget = check_budget(budget)
    target = load_target(target) if isinstance(target, str) else target
    if data.x_train is None or len(data.x_train) <= val_samples:
        raise EdgepruneError(f"dataset {data.name} has no training split larger than the "
                             f"{val_samples} holdout samples the search ranks candidates on",
                             stage=STAGE)
    torch.set_num_threads(1)
    shape = tuple(example_input.shape)
    n_train = len(data.x_train) - val_samples
    if train_samples:
        n_train = min(n_train, train_samples)
    jd = JobData(data.x_train[:n_train], data.y_train[:n_train], data.x_train[-val_samples:],
                 data.y_train[-val_samples:], data.x_train[:max(calib_samples, shape[0])],
                 data.name)
    base = fx.symbolic_trace(copy.deepcopy(model).eval()) if not isinstance(model, fx.GraphModule) \
        else copy.deepcopy(model).eval()
    graph = DepGraph(base, example_input)
    groups = {g.name: g for g in graph.groups}
    if not groups:
        raise EdgepruneError("the model has no prunable channel groups", stage=STAGE)
    full = {n: g.units for n, g in groups.items()}
    lowest = {n: min_width(u, min_keep) for n, u in full.items()}
    base_hash = model_hash(base)
    fingerprint = toolchain_fingerprint(target)
    cache = Path(cache_dir or default_cache_dir()) / target.name / base_hash
    cache.mkdir(parents=True, exist_ok=True)
    settings = {"criterion": criterion, "seed": seed, "short": short_finetune_samples, "lr": lr,
                "n_train": n_train, "val": val_samples, "calib": calib_samples,
                "data": data.name}
    workers = workers or min(2, os.cpu_count() or 1)
    bar = _Bar(progress)
    runner = Runner(jd, cache, workers)
    log(f"feedback: {len(groups)} channel groups, budget "
        + ", ".join(f"{k}={v:g}" for k, v in budget.items())
        + f", criterion {criterion}, {workers} worker(s), cache {cache}")

    def measure(models: list[nn.Module], what: str) -> list[dict]:
        bar.start(what, len(models))
        return runner.measure(models, shape, target, fingerprint, done=bar.advance)

    def at_widths(widths: dict[str, int]) -> nn.Module:
        """The base model cut to `widths` (by L1: cost does not depend on which channels)."""
        from ..prune import prune
        ratios = {n: (full[n] - k) / full[n] for n, k in widths.items() if k < full[n]}
        return prune(base, example_input, "l1", ratios={"*": 0.0, **ratios}, graph=graph)[0]

    try:
        # 1. the unpruned and the smallest model; the cost table only if a search is needed
        base_costs, min_costs = measure([base, at_widths(lowest)], "unpruned and smallest (QEMU)")
        log(f"feedback: unpruned {_fmt(base_costs)}; smallest (every group at its minimum) "
            f"{_fmt(min_costs)}")
        tables: dict[str, dict[int, dict]] = {n: {full[n]: base_costs} for n in groups}
        model_err = None
        if violations(base_costs, budget) and not violations(min_costs, budget):
            table_points = [(n, k) for n in groups for k in grid_widths(full[n], grid, min_keep)
                            if k < full[n]]
            measured = measure([at_widths({n: k}) for n, k in table_points], "cost table (QEMU)")
            for (n, k), c in zip(table_points, measured):
                tables[n][k] = c
            predictor = Predictor(base_costs, tables, full)
            model_err = (predictor.predict(lowest)["instructions"]
                         / max(1, min_costs["instructions"]) - 1)
            log(f"feedback: cost table of {len(table_points)} measurements; the model of it "
                f"predicts the smallest model within {model_err:+.1%}")
        predictor = Predictor(base_costs, tables, full)
        table_json = {"base": _slim(base_costs), "minimum": _slim(min_costs),
                      "minimum_widths": lowest, "model_error_at_minimum": model_err,
                      "groups": {n: {str(k): _slim(c) for k, c in sorted(t.items())}
                                 for n, t in tables.items()}}

        # accuracy of the starting point on the holdout split (ranks candidates)
        cur_model, cur_widths, cur_costs = base, dict(full), base_costs
        cur_acc = evaluate(cur_model, jd.x_val, jd.y_val)
        trajectory = [_point(0, None, cur_widths, cur_acc, cur_costs, None)]
        composed = _identity_record(graph)

        impossible = violations(min_costs, budget)
        if impossible:
            # No width assignment reaches the budget: report the smallest model as the closest point.
            message = ("budget cannot be met on " + target.name + ": even the smallest model "
                       "(every layer at its minimum width) measures " + "; ".join(impossible))
            log(f"feedback: {message}")
            blob, acc, rec = runner.map("candidate", candidate_job, [(
                job_key(base_hash, "minimum", lowest, settings),
                (to_bytes(base), example_input, _removal(groups, full, lowest), criterion, seed,
                 short_finetune_samples, lr))])[0]
            cur_model, cur_widths, cur_costs = from_bytes(blob), dict(lowest), min_costs
            composed = _compose(composed, rec)
            trajectory.append(_point(1, "minimum", cur_widths, acc, cur_costs, None))
        else:
            aim = {k: v * (1 - margin) for k, v in budget.items()}
            step = {m: (base_costs[m] - aim[m]) / step_iterations for m in budget
                    if base_costs[m] > aim[m]}
            it = 0
            bar.start("search (budgets met)", len(budget))
            bar.advance(len(budget) - len(violations(cur_costs, aim)))
            while violations(cur_costs, aim) and it < max_iterations:
                it += 1
                metric = max(budget, key=lambda k: cur_costs[k] / aim[k])
                gap = cur_costs[metric] - aim[metric]
                goal = cur_costs[metric] - min(step.get(metric) or gap, gap)
                proposals = _propose(predictor, cur_costs, cur_widths, lowest, metric, goal)
                if not proposals:
                    break
                parent = to_bytes(cur_model)
                parent_hash = model_hash(cur_model)
                jobs = [(job_key(parent_hash, g, w[g], settings),
                         (parent, example_input, _removal(groups, cur_widths, w), criterion, seed,
                          short_finetune_samples, lr)) for g, w, _ in proposals]
                bar.start(f"iteration {it}: {len(jobs)} candidates", len(jobs))
                results = runner.map("candidate", candidate_job, jobs, done=bar.advance)
                best = max(range(len(results)), key=lambda i: (results[i][1],
                                                               -proposals[i][2][metric]))
                g, widths, predicted = proposals[best]
                blob, acc, rec = results[best]
                new_model = from_bytes(blob)
                new_costs = measure([new_model], f"iteration {it}: measure")[0]
                before = len(violations(cur_costs, aim))
                cur_model, cur_widths, cur_costs = new_model, widths, new_costs
                composed = _compose(composed, rec)
                bar.advance(before - len(violations(cur_costs, aim)))
                trajectory.append(_point(it, g, cur_widths, acc, cur_costs, predicted,
                                         [r[1] for r in results], [p[0] for p in proposals]))
                log(f"feedback: iteration {it}: cut {metric}, {len(proposals)} candidates, chose "
                    f"{g} -> {widths[g]} channels, holdout accuracy {acc:.2f} %, measured "
                    f"{_fmt(cur_costs)} (predicted {metric} {predicted[metric]:.4g})")

        # 3. long fine-tune and the final measurement
        if finetune_epochs > 0:
            log(f"feedback: fine-tuning the chosen model for {finetune_epochs:g} epoch(s)")
            finetune(cur_model, jd.dataset(), finetune_epochs, lr, seed)
        final_costs = measure([cur_model], "final measurement")[0]
        x_test, y_test = data.x_test[:eval_samples], data.y_test[:eval_samples]
        test_acc = evaluate(cur_model, x_test, y_test)
        holdout = evaluate(cur_model, jd.x_val, jd.y_val)
        trajectory.append(_point(len(trajectory), "final", cur_widths, holdout, final_costs, None))
        trajectory[-1]["test_accuracy"] = test_acc

        bad = violations(final_costs, budget)
        met = not bad
        if met:
            message = (f"every budget met as measured on {target.name}: {_fmt(final_costs)}; "
                       f"test accuracy {test_acc:.2f} %")
        elif not impossible:
            closest = min(trajectory, key=lambda p: excess(p["measured"], budget))
            message = (f"budget not met on {target.name}: " + "; ".join(bad) + ". The search "
                       f"stopped (no group can shrink further or {max_iterations} iterations); "
                       f"closest point: iteration {closest['iteration']} with "
                       f"{_fmt(closest['measured'])}")
        else:
            message += f"; closest point (smallest model): {_fmt(final_costs)}"
        log(f"feedback: {message}")
    finally:
        bar.stop()
        runner.close()

    ratios = {layer: round(1 - cur_widths[n] / full[n], 6) for n, g in groups.items()
              for layer in g.layers}
    bits = _bits(cur_model, target)
    record = {"criterion": criterion, "allocation": "feedback", "layers": composed,
              "per_layer": ratios, "widths": cur_widths, "budget": budget, "met": met}
    result = FeedbackResult(cur_model, record, ratios, bits, cur_widths, final_costs, budget, met,
                            message, trajectory, test_acc,
                            cache={"dir": str(cache), "runs": runner.runs, "hits": runner.hits})
    if work_dir is not None:
        result.files = write_outputs(result, Path(work_dir), target.name, criterion, table_json)
    log(f"feedback: measurements {runner.runs} run, {runner.hits} from cache")
    return result


def _propose(predictor: Predictor, cur_costs: dict, cur_widths: dict[str, int],
             lowest: dict[str, int], metric: str, goal: float):
    """Per group, the largest width whose predicted `metric` reaches `goal` (NetAdapt's
    "smallest pruning that cuts the cost by a step"); groups that cannot reach it alone propose
    their minimum only when no group can."""
    reach, partial = [], []
    for g, k in cur_widths.items():
        if k <= lowest[g]:
            continue
        chosen = None
        for k2 in range(k - 1, lowest[g] - 1, -1):
            w = {**cur_widths, g: k2}
            pred = predictor.anchored(cur_costs, cur_widths, w)
            if pred[metric] <= goal:
                chosen = (g, w, pred)
                break
        if chosen:
            reach.append(chosen)
        else:
            w = {**cur_widths, g: lowest[g]}
            pred = predictor.anchored(cur_costs, cur_widths, w)
            if pred[metric] < cur_costs[metric]:
                partial.append((g, w, pred))
    return reach or partial


def _removal(groups, cur: dict[str, int], new: dict[str, int]) -> dict[str, float]:
    """Per-layer ratios that take the current model (widths `cur`) to `new`: prune()'s input."""
    return {groups[g].layers[0]: (cur[g] - new[g]) / cur[g] for g in new if new[g] < cur[g]}


def _identity_record(graph) -> dict:
    out = {}
    for name, layer in graph.layers.items():
        mod, e = layer.module, {"type": type(layer.module).__name__, "kind": layer.kind}
        if layer.kind in ("conv", "linear"):
            n_out = mod.out_channels if hasattr(mod, "out_channels") else mod.out_features
            n_in = mod.in_channels if hasattr(mod, "in_channels") else mod.in_features
            e.update(out_before=n_out, out_kept=list(range(n_out)),
                     in_before=n_in, in_kept=list(range(n_in)))
        elif layer.kind in ("bn", "dwconv"):
            n = mod.num_features if hasattr(mod, "num_features") else mod.out_channels
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


def _bits(model: nn.Module, target) -> dict[str, int]:
    """Weight word length per conv/linear layer: deploy's int8 PTQ (the search does not vary it)."""
    return {n: 8 for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}


def _slim(c: dict) -> dict:
    return {k: c[k] for k in ("instructions",) + METRICS + ("kernels",)}


def _fmt(c: dict) -> str:
    return (f"{c['latency_ms']:.3f} ms ({c['instructions']:,} instr), {c['energy_uj']:.1f} uJ, "
            f"flash {c['flash_kb']:.1f} kB, SRAM {c['sram_kb']:.1f} kB")


def _point(it, group, widths, acc, costs, predicted, candidates=None, groups=None) -> dict:
    p = {"iteration": it, "group": group, "widths": dict(widths), "accuracy": acc,
         "measured": {k: costs[k] for k in ("instructions",) + METRICS},
         **{k: costs[k] for k in METRICS}}
    if predicted is not None:
        p["predicted"] = {k: predicted[k] for k in ("instructions",) + METRICS}
    if candidates is not None:
        p["candidates"] = [{"group": g, "accuracy": a} for g, a in zip(groups, candidates)]
    return p


def write_outputs(result: FeedbackResult, out: Path, target: str, criterion: str,
                  table: dict) -> dict[str, str]:
    """ratios.json (for `prune --per-layer` / `deploy --per-layer`), trajectory.json,
    cost_table.json and pareto.png, each written to a temp name and renamed."""
    from .plot import pareto_png

    out.mkdir(parents=True, exist_ok=True)
    files = {
        "ratios.json": json.dumps({"ratios": result.ratios, "bits": result.bits,
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
