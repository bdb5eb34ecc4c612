"""Hardware-in-the-loop feedback study: ResNet-8 on Fashion-MNIST, Cortex-M7 in QEMU, latency
budget = 30 % of the unpruned model's measured latency (int8, as deployed). Three ways to meet it,
each followed by the same fine-tuning (same epochs on the same training samples, distilled from
the unpruned model as the search's own fine-tunes are):

(a) uniform: one ratio for every layer (best criterion of bench/results/prune_criteria.json at
    75 %, else l1), the smallest ratio whose *measured* latency meets the budget (bisection);
(b) global: global ranking of that criterion's scores (per-layer floor), the smallest fraction
    whose measured latency meets the budget (bisection);
(c) feedback: edgeprune.feedback.search (NetAdapt-style on measured per-kernel counts), then the
    same fine-tuning. Its candidates' short fine-tunes come on top and are reported.

Each seed (FULL: 0, 1, 2; the seed of every fine-tuning, the trained model is seed 0) writes
bench/results/feedback/seed<N>.json, and bench/results/feedback.json summarises them:
{uniform, global, feedback} each with accuracy (float, percent, on the test samples, mean over
the seeds), quantized_accuracy (its PTQ model as deployed: int8, or the
search's word lengths), latency_instructions (measured), budget_instructions, met; plus settings.
The search ranks its candidates by their PTQ model's holdout loss and may lower word lengths
where measured to help (with a latency budget it does not: sub-byte kernels are no faster).

    python -m bench.run feedback [--quick]
    python -m bench.feedback --train-samples 8000 --epochs 0.5      # a reduced run
    python -m bench.feedback --seeds 1 --result /tmp/s1.json        # one seed (run several at once)
    python -m bench.feedback a/seed0.json b/seed1.json ...          # only summarise seeds
    python -m bench.feedback --control bench/results/feedback/seed*.json   # equal training
    python -m bench.feedback --sweep 12 bench/results/feedback/seed0.json  # random allocations
    python -m bench.feedback --blocks bench/results/feedback/seed0.json    # depth, not width
    python -m bench.feedback --seeds 1 --tap-strides 2,3 --result /tmp/t.json  # + patterns
    python -m bench.feedback --model unet.onnx --data d.npz --target cortex-m55 --seeds 0 \
        --result /tmp/unet/feedback.json                  # the same study on a user's model
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from bench.run import write_result

RESULT = Path(__file__).parent / "results" / "feedback.json"
CRITERIA_RESULT = Path(__file__).parent / "results" / "prune_criteria.json"
BUDGET_FRACTION = 0.30
FULL = {"train_epochs": 10, "finetune_epochs": 1.0, "train_samples": None, "eval_samples": 10000,
        "short_samples": 2000, "val_samples": 2000, "bisect_steps": 6, "workers": 2,
        "step_iterations": 12, "step_schedule": "linear", "rank": "loss", "distill": 0.9,
        "metric": "latency_ms", "fraction": BUDGET_FRACTION, "seed": 0, "seeds": 3}
QUICK = {"train_epochs": 1, "finetune_epochs": 0.5, "train_samples": 6000, "eval_samples": 2000,
         "short_samples": 1000, "val_samples": 1000, "bisect_steps": 4, "workers": 2,
         "step_iterations": 6, "step_schedule": "linear", "rank": "loss", "distill": 0.9,
         "metric": "latency_ms", "fraction": BUDGET_FRACTION, "seed": 0, "seeds": 1}


def best_criterion() -> str:
    """The criterion with the best mean accuracy at 75 % in the criteria study, else l1."""
    try:
        crit = json.loads(CRITERIA_RESULT.read_text())["criteria"]
        at = {n: v["75%"]["acc_after"]["mean"] for n, v in crit.items() if "75%" in v}
        return max(at, key=at.get) if at else "l1"
    except (OSError, ValueError, KeyError):
        return "l1"


def bisect_measured(make, measure, limit: float, steps: int, hi: float = 0.95,
                    key: str = "instructions"):
    """The smallest x in [0, hi] whose model `make(x)` measures costs[key] <= limit (the cost
    falls as x grows). Returns (x, costs, [(x, costs[key])])."""
    tried = []
    costs_hi = measure(make(hi))
    tried.append((hi, costs_hi[key]))
    if costs_hi[key] > limit:
        return hi, costs_hi, tried
    lo, best = 0.0, (hi, costs_hi)
    for _ in range(steps):
        mid = round((lo + best[0]) / 2, 4)
        c = measure(make(mid))
        tried.append((mid, c[key]))
        if c[key] <= limit:
            best = (mid, c)
        else:
            lo = mid
    return best[0], best[1], tried


def main(quick: bool = False, seeds: list[int] | None = None, **overrides) -> dict:
    """Every seed of the config (FULL: 3) in turn, each into bench/results/feedback/seed<N>.json,
    then their summary into RESULT."""
    cfg = QUICK if quick else FULL
    per_seed = []
    for s in seeds if seeds is not None else range(cfg["seeds"]):
        path = RESULT.parent / "feedback" / f"seed{s}.json"
        per_seed.append(run_seed(quick, path, **{**overrides, "seed": s}))
    result = _keep_other_runs(combine(per_seed))
    write_result(RESULT, result)
    return {k: result[k] for k in ("seeds", "uniform", "global", "feedback", "goal")}


def _keep_other_runs(result: dict) -> dict:
    """`result` with the studies recorded beside the acceptance entry in RESULT."""
    if RESULT.exists():
        result["other_runs"] = json.loads(RESULT.read_text()).get("other_runs", {})
    return result


def combine(per_seed: list[dict]) -> dict:
    """One entry per method over the seeds: accuracy = mean (percent), latency_instructions =
    the largest measured, met = met in every seed; each seed's own numbers under "runs"."""
    first = per_seed[0]
    out = {k: first[k] for k in ("model", "data", "target", "criterion", "float_accuracy",
                                 "unpruned", "budget")}
    out["config"] = {k: v for k, v in first["config"].items() if k != "seed"}
    out["seeds"] = [r["config"]["seed"] for r in per_seed]
    for name in ("uniform", "global", "feedback"):
        runs = [r[name] for r in per_seed]
        acc = [e["accuracy"] for e in runs]
        qacc = [e["quantized_accuracy"] for e in runs]
        out[name] = {"accuracy": round(statistics.fmean(acc), 3),
                     "accuracy_std": round(statistics.pstdev(acc), 3),
                     "quantized_accuracy": round(statistics.fmean(qacc), 3),
                     "latency_instructions": max(e["latency_instructions"] for e in runs),
                     "budget_instructions": runs[0]["budget_instructions"],
                     "met": all(e["met"] for e in runs),
                     "runs": [{"seed": s, **{k: e[k] for k in
                                             ("accuracy", "quantized_accuracy",
                                              "latency_instructions", "met")}}
                              for s, e in zip(out["seeds"], runs)]}
    diffs = [r["feedback"]["accuracy"] - r["uniform"]["accuracy"] for r in per_seed]
    out["feedback_minus_uniform_pt"] = round(statistics.fmean(diffs), 3)
    out["feedback_minus_uniform_pt_per_seed"] = [round(d, 3) for d in diffs]
    out["feedback_minus_uniform_quantized_pt"] = round(
        out["feedback"]["quantized_accuracy"] - out["uniform"]["quantized_accuracy"], 3)
    out["goal"] = ("(c) meets the budget with >= 1 pt more accuracy than (a), mean over seeds: "
                   + str(out["feedback"]["met"] and out["feedback_minus_uniform_pt"] >= 1.0))
    out["wall_seconds"] = round(sum(r["wall_seconds"] for r in per_seed), 1)
    return out


def run_seed(quick: bool, path: Path, **overrides) -> dict:
    """One seed of the study (fine-tuning seed; the trained model is seed 0), written to `path`
    as it goes; the search's own files go to the folder beside it named after it."""
    import torch

    from edgeprune import data as datasets
    from edgeprune.deploy import trained_zoo_model
    from edgeprune.feedback import search
    from edgeprune.feedback.measure import toolchain_fingerprint
    from edgeprune.feedback.search import default_cache_dir
    from edgeprune.feedback.worker import JobData, Runner, finetune, quantized_accuracy
    from edgeprune.load import is_zoo_name, load_torch
    from edgeprune.prune import prune
    from edgeprune.targets import load_target
    from edgeprune.train import evaluate

    torch.set_num_threads(1)
    cfg = {**(QUICK if quick else FULL), **{k: v for k, v in overrides.items() if v is not None}}
    t_start = time.perf_counter()
    spec = cfg.get("model") or "resnet8"
    data = datasets.load(cfg.get("data") or "fashion-mnist")
    target = load_target(cfg.get("target") or "cortex-m7")
    if is_zoo_name(spec):
        model, shape = trained_zoo_model(spec, data, None, cfg["train_epochs"], 0, print)
    else:   # a user's trained model, as deploy takes it
        model, shape = load_torch(spec)
        data = datasets.fit_data(shape, data, spec)
    example = torch.from_numpy(data.x_train[:1])
    n_train = len(data.x_train) - cfg["val_samples"]
    if cfg["train_samples"]:
        n_train = min(n_train, cfg["train_samples"])
    train_set = datasets.Dataset(data.name, data.x_train[:n_train], data.y_train[:n_train],
                                 data.x_test, data.y_test)
    x_test, y_test = data.x_test[:cfg["eval_samples"]], data.y_test[:cfg["eval_samples"]]
    calib = data.x_train[:64]
    batches = [(torch.from_numpy(data.x_train[i:i + 128]), torch.from_numpy(data.y_train[i:i + 128]))
               for i in range(0, 512, 128)]
    criterion = cfg.get("criterion") or best_criterion()

    # measurements in a worker process (TVM and torch training must not share a process),
    # cached like the search's own
    runner = Runner(JobData(data.x_train[:8], data.y_train[:8], data.x_test[:8], data.y_test[:8],
                            calib), default_cache_dir() / target.name / "bench", 1)
    fingerprint = toolchain_fingerprint(target)

    def measure(m, bits=None):
        c = runner.measure([m], shape, target, fingerprint, bits=[bits])[0]
        print(f"bench feedback: measured {c['instructions']:,} instructions", flush=True)
        return c

    base = measure(model)
    metric, fraction = cfg["metric"], cfg["fraction"]
    budget_instr = int(fraction * base["instructions"])
    budget_ms = fraction * base["latency_ms"]
    # what the budget limits: latency as counted instructions, memory as measured kB
    key = "instructions" if metric == "latency_ms" else metric
    limit = budget_instr if metric == "latency_ms" else fraction * base[metric]
    print(f"bench feedback: unpruned {base['instructions']:,} instructions "
          f"({base['latency_ms']:.3f} ms), {metric} {base[metric]:.4g}; budget {key} "
          f"{limit:,.6g}; criterion {criterion}", flush=True)
    acc_float = evaluate(model, x_test, y_test)

    def finish(pruned, name, extra, bits=None):
        t0 = time.perf_counter()
        finetune(pruned, train_set, cfg["finetune_epochs"], 0.01, cfg["seed"],  # oneDNN off
                 model, cfg["distill"])
        costs = measure(pruned, bits)
        entry = {"accuracy": round(evaluate(pruned, x_test, y_test), 3),
                 # what runs on the target: PTQ (int8, or the search's word lengths)
                 "quantized_accuracy": round(quantized_accuracy(pruned, shape, calib, x_test,
                                                                y_test, bits), 3),
                 "latency_instructions": costs["instructions"],
                 "budget_instructions": budget_instr if metric == "latency_ms" else None,
                 "met": costs[key] <= limit,
                 "latency_ms": round(costs["latency_ms"], 4),
                 "energy_uj": round(costs["energy_uj"], 2), "flash_kb": round(costs["flash_kb"], 2),
                 "sram_kb": round(costs["sram_kb"], 2),
                 "finetune_seconds": round(time.perf_counter() - t0, 1), **extra}
        print(f"bench feedback: {name}: {entry['accuracy']:.2f} % at {key} {costs[key]:,.6g} "
              f"(met: {entry['met']})", flush=True)
        return entry

    result = {"model": spec, "data": data.name, "target": target.name,
              "quick": quick, "config": cfg, "criterion": criterion,
              "float_accuracy": round(acc_float, 3),
              "unpruned": {"latency_instructions": base["instructions"],
                           "latency_ms": round(base["latency_ms"], 4),
                           "flash_kb": round(base["flash_kb"], 2),
                           "sram_kb": round(base["sram_kb"], 2)},
              "budget": ({"fraction": fraction, "latency_instructions": budget_instr,
                          "latency_ms": round(budget_ms, 4)} if metric == "latency_ms" else
                         {"fraction": fraction, metric: round(limit, 3)})}

    # (a) uniform ratio, measured bisection
    def uniform_model(r):
        return prune(model, example, criterion=criterion, ratios=r, data=batches,
                     meta_batch=batches[-1], round_to=target.channel_multiple)[0]
    r, _, tried = bisect_measured(uniform_model, measure, limit, cfg["bisect_steps"], key=key)
    result["uniform"] = finish(uniform_model(r), "uniform",
                               {"ratio": r, "bisection": tried})
    write_result(path, result)

    # (b) global ranking, measured bisection over the fraction removed
    def global_model(f):
        return prune(model, example, criterion=criterion, ratios=f, allocation="global",
                     data=batches, meta_batch=batches[-1], round_to=target.channel_multiple)[0]
    f, _, tried = bisect_measured(global_model, measure, limit, cfg["bisect_steps"], key=key)
    result["global"] = finish(global_model(f), "global", {"fraction": f, "bisection": tried})
    write_result(path, result)

    # (c) the feedback loop: search, then the same fine-tuning (inside search: finetune_epochs)
    t0 = time.perf_counter()
    fb = search(model, example, data, target,
                {metric: budget_ms if metric == "latency_ms" else limit}, criterion=criterion,
                seed=cfg["seed"],
                finetune_epochs=0.0, train_samples=n_train,
                val_samples=cfg["val_samples"], short_finetune_samples=cfg["short_samples"],
                eval_samples=cfg["eval_samples"], workers=cfg["workers"],
                step_iterations=cfg["step_iterations"],
                step_schedule=cfg["step_schedule"], rank=cfg["rank"],
                distill=cfg["distill"], tap_strides=tuple(cfg.get("tap_strides") or ()),
                work_dir=path.with_suffix(""), progress=False)
    search_s = time.perf_counter() - t0
    accepted = [p for p in fb.trajectory if p.get("group") not in (None, "final")]
    result["feedback"] = finish(fb.model, "feedback", {
        "ratios": fb.ratios, "widths": fb.widths, "iterations": len(accepted),
        "bits": {n: b for n, b in fb.bits.items() if b != 8},
        "search_ranking": f"holdout {cfg['rank']} of each candidate's PTQ model",
        "search_seconds": round(search_s, 1),
        "search_short_finetune_samples_per_candidate": cfg["short_samples"],
        "search_candidates": sum(len(p.get("candidates", [])) for p in accepted),
        "trajectory": [{k: p[k] for k in ("iteration", "group", "accuracy", "latency_ms")}
                       for p in fb.trajectory],
        "files": fb.files}, bits=fb.bits)
    result["feedback_minus_uniform_pt"] = round(result["feedback"]["accuracy"]
                                                - result["uniform"]["accuracy"], 3)
    result["feedback_minus_uniform_quantized_pt"] = round(
        result["feedback"]["quantized_accuracy"] - result["uniform"]["quantized_accuracy"], 3)
    result["goal"] = ("(c) meets the budget with >= 1 pt more accuracy than (a): "
                      + str(result["feedback"]["met"] and result["feedback_minus_uniform_pt"] >= 1.0))
    result["wall_seconds"] = round(time.perf_counter() - t_start, 1)
    runner.close()
    write_result(path, result)
    return result


def equal_training_control(seed_results: list[dict]) -> dict:
    """Does the search's own training, not its allocation, carry the feedback result? Per seed:
    the uniform cut gets the training the feedback model's accepted path got (one short
    distilled fine-tune per accepted iteration, on that iteration's samples), then the same
    final fine-tune as every method."""
    import torch

    from edgeprune import data as datasets
    from edgeprune.deploy import trained_zoo_model
    from edgeprune.feedback.worker import finetune
    from edgeprune.prune import prune
    from edgeprune.train import evaluate

    torch.set_num_threads(1)
    runs = []
    for r in seed_results:
        cfg, seed = r["config"], r["config"]["seed"]
        data = datasets.fashion_mnist()
        model, _ = trained_zoo_model("resnet8", data, None, cfg["train_epochs"], 0, print)
        n_train = len(data.x_train) - cfg["val_samples"]
        train_set = datasets.Dataset(data.name, data.x_train[:n_train], data.y_train[:n_train],
                                     data.x_test, data.y_test)
        batches = [(torch.from_numpy(data.x_train[i:i + 128]),
                    torch.from_numpy(data.y_train[i:i + 128])) for i in range(0, 512, 128)]
        cut = prune(model, torch.from_numpy(data.x_train[:1]), criterion=r["criterion"],
                    ratios=r["uniform"]["ratio"], data=batches, meta_batch=batches[-1])[0]
        iterations = r["feedback"]["iterations"]
        for it in range(1, iterations + 1):   # the search's samples: seed + 1000 * iteration
            finetune(cut, train_set, cfg["short_samples"] / n_train, 0.01, seed + 1000 * it,
                     model, cfg["distill"])
        before = evaluate(cut, data.x_test, data.y_test)
        finetune(cut, train_set, cfg["finetune_epochs"], 0.01, seed, model, cfg["distill"])
        acc = evaluate(cut, data.x_test[:cfg["eval_samples"]], data.y_test[:cfg["eval_samples"]])
        runs.append({"seed": seed, "iterations": iterations, "accuracy": round(acc, 3),
                     "before_final_finetune": round(before, 3),
                     "feedback_minus_control_pt": round(r["feedback"]["accuracy"] - acc, 3)})
        print(f"bench feedback: control seed {seed}: {acc:.2f} % (feedback "
              f"{r['feedback']['accuracy']:.2f} %)", flush=True)
    return {"note": equal_training_control.__doc__.split("\n\n")[0].replace("\n    ", " "),
            "accuracy": round(statistics.fmean(x["accuracy"] for x in runs), 3),
            "runs": runs}


class _Study:
    """What the studies run on one seed's result (its trained model, data, budget and settings):
    `measure` (cached, in a worker process) and `finish` (the final fine-tune every method gets,
    then the test accuracy). Close it when done."""

    def __init__(self, seed_result: dict):
        import torch

        from edgeprune import data as datasets
        from edgeprune.deploy import trained_zoo_model
        from edgeprune.feedback.measure import toolchain_fingerprint
        from edgeprune.feedback.search import default_cache_dir
        from edgeprune.feedback.worker import JobData, Runner
        from edgeprune.targets import load_target

        torch.set_num_threads(1)
        self.result, self.cfg = seed_result, seed_result["config"]
        self.seed, cfg = self.cfg["seed"], self.cfg
        self.data = data = datasets.fashion_mnist()
        self.target = load_target(seed_result["target"])
        self.model, self.shape = trained_zoo_model(seed_result["model"], data, None,
                                                   cfg["train_epochs"], 0, print)
        self.example = torch.from_numpy(data.x_train[:1])
        n_train = len(data.x_train) - cfg["val_samples"]
        self.train_set = datasets.Dataset(data.name, data.x_train[:n_train],
                                          data.y_train[:n_train], data.x_test, data.y_test)
        self.batches = [(torch.from_numpy(data.x_train[i:i + 128]),
                         torch.from_numpy(data.y_train[i:i + 128])) for i in range(0, 512, 128)]
        self.runner = Runner(JobData(data.x_train[:8], data.y_train[:8], data.x_test[:8],
                                     data.y_test[:8], data.x_train[:64]),
                             default_cache_dir() / self.target.name / "bench", 1)
        self.fingerprint = toolchain_fingerprint(self.target)
        self.limit = seed_result["budget"]["latency_instructions"]

    def prune(self, model, ratios):
        from edgeprune.prune import prune
        return prune(model, self.example, criterion=self.result["criterion"], ratios=ratios,
                     data=self.batches, meta_batch=self.batches[-1])[0]

    def measure(self, m) -> dict:
        return self.runner.measure([m], self.shape, self.target, self.fingerprint,
                                   bits=[None])[0]

    def finish(self, cut) -> float:
        from edgeprune.feedback.worker import finetune
        from edgeprune.train import evaluate
        cfg = self.cfg
        finetune(cut, self.train_set, cfg["finetune_epochs"], 0.01, self.seed, self.model,
                 cfg["distill"])
        return evaluate(cut, self.data.x_test[:cfg["eval_samples"]],
                        self.data.y_test[:cfg["eval_samples"]])

    def close(self):
        self.runner.close()


def allocation_sweep(seed_result: dict, count: int) -> dict:
    """How much can any per-group allocation gain over uniform at this budget? `count` random
    allocations (each group's share of the cut drawn from [0.3, 1.7], one seeded draw per
    allocation), each scaled by measured bisection to the seed's budget like the uniform cut,
    then given the same final fine-tune as every method. An estimate of the spread the search
    chooses from, not of its result."""
    import random

    study = _Study(seed_result)
    r, seed, limit = seed_result, study.seed, study.limit
    groups = sorted(r["feedback"]["widths"])

    runs = []
    for i in range(count):
        rng = random.Random(f"allocation {i}")
        share = {g: rng.uniform(0.3, 1.7) for g in groups}

        def make(x):  # x: the uniform-equivalent ratio, each group's ratio x * its share
            return study.prune(study.model, {g: min(0.95, x * share[g]) for g in groups})
        x, costs, _ = bisect_measured(make, study.measure, limit, study.cfg["bisect_steps"],
                                      hi=0.95 / min(share.values()))
        cut = make(x)
        acc = study.finish(cut)
        widths = {n: m.out_channels for n, m in cut.named_modules() if n in share}
        runs.append({"widths": widths, "accuracy": round(acc, 3),
                     "latency_instructions": costs["instructions"],
                     "met": costs["instructions"] <= limit})
        print(f"bench feedback: allocation {i} {list(widths.values())}: {acc:.2f} % at "
              f"{costs['instructions']:,} instructions", flush=True)
    study.close()
    accs = [x["accuracy"] for x in runs]
    return {"note": allocation_sweep.__doc__.split("\n\n")[0].replace("\n    ", " "),
            "seed": seed, "uniform": r["uniform"]["accuracy"],
            "feedback": r["feedback"]["accuracy"], "best": max(accs),
            "median": round(statistics.median(accs), 3), "worst": min(accs),
            "best_minus_uniform_pt": round(max(accs) - r["uniform"]["accuracy"], 3),
            "above_uniform": sum(a > r["uniform"]["accuracy"] for a in accs), "runs": runs}


def _branch_removed(block):
    """A ResNet basic block whose residual branch is pruned away whole: relu(shortcut(x) + the
    branch's constant BN shift), the shift folded into the shortcut's BN; with an identity
    shortcut the block is x itself (x is post-ReLU already; the shift is dropped)."""
    import torch
    import torch.nn as nn

    class Shortcut(nn.Module):
        def __init__(self, blk):
            super().__init__()
            self.shortcut = blk.shortcut
            bn = blk.bn2
            shift = bn.bias - bn.running_mean * bn.weight / torch.sqrt(bn.running_var + bn.eps)
            if len(self.shortcut):
                self.shortcut[1].bias.data += shift.detach()

        def forward(self, x):
            return torch.relu(self.shortcut(x)) if len(self.shortcut) else x
    return Shortcut(block)


def block_removal(seed_result: dict) -> dict:
    """Depth instead of width: each residual block of ResNet-8 in turn has its branch removed
    whole, the rest is cut uniformly (same criterion) to the seed's budget by measured
    bisection, then the same final fine-tune as every method."""
    import copy

    study = _Study(seed_result)
    limit = study.limit

    runs = []
    for block in ("layer1", "layer2", "layer3"):
        base = copy.deepcopy(study.model)
        setattr(base, block, _branch_removed(getattr(base, block)))

        def make(x, base=base):
            return study.prune(base, x)
        x, costs, _ = bisect_measured(make, study.measure, limit, study.cfg["bisect_steps"])
        acc = study.finish(make(x))
        runs.append({"removed": block, "ratio_of_the_rest": x, "accuracy": round(acc, 3),
                     "latency_instructions": costs["instructions"],
                     "met": costs["instructions"] <= limit})
        print(f"bench feedback: {block} removed, the rest cut by {x}: {acc:.2f} % at "
              f"{costs['instructions']:,} instructions", flush=True)
    study.close()
    return {"note": block_removal.__doc__.split("\n\n")[0].replace("\n    ", " "),
            "seed": study.seed, "uniform": seed_result["uniform"]["accuracy"], "runs": runs}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("combine", nargs="*", type=Path, metavar="SEED_JSON",
                    help="only summarise these per-seed results into the result file")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--train-epochs", type=float, help="of the float model (cached per epochs)")
    ap.add_argument("--train-samples", type=int)
    ap.add_argument("--epochs", type=float, dest="finetune_epochs")
    ap.add_argument("--short-samples", type=int)
    ap.add_argument("--eval-samples", type=int)
    ap.add_argument("--val-samples", type=int)
    ap.add_argument("--workers", type=int)
    ap.add_argument("--criterion")
    ap.add_argument("--step-iterations", type=int)
    ap.add_argument("--step-schedule", choices=("linear", "geometric"))
    ap.add_argument("--rank", choices=("loss", "accuracy"), help="what ranks the candidates")
    ap.add_argument("--distill", type=float,
                    help="distillation weight from the unpruned model in every fine-tune: "
                         "the search's short ones and each method's final one (0: labels)")
    ap.add_argument("--tap-strides", type=lambda v: [int(x) for x in v.split(",")],
                    help="let the search give a conv 1 in s window taps, e.g. 2,3 (default: "
                         "off; other_runs.tap_patterns)")
    ap.add_argument("--metric", choices=("latency_ms", "flash_kb", "sram_kb"),
                    help="what the budget limits (default latency_ms, the acceptance study)")
    ap.add_argument("--fraction", type=float,
                    help="the budget as a fraction of the unpruned model's measured cost")
    ap.add_argument("--seeds", type=lambda v: [int(x) for x in v.split(",")],
                    help="fine-tuning seeds, e.g. 0,1,2 (the trained model is seed 0)")
    ap.add_argument("--control", action="store_true",
                    help="with SEED_JSON files: only run the equal-training control of them, "
                         "into the result file's other_runs")
    ap.add_argument("--sweep", type=int, metavar="N",
                    help="with one SEED_JSON: only run N random allocations at its budget, "
                         "into the result file's other_runs")
    ap.add_argument("--blocks", action="store_true",
                    help="with one SEED_JSON: only remove each residual block in turn (the rest "
                         "cut uniformly to its budget), into the result file's other_runs")
    ap.add_argument("--model", help="a zoo name (trained here) or a trained .pt/.onnx model "
                                    "(default resnet8)")
    ap.add_argument("--data", help="a dataset name or .npz (default fashion-mnist)")
    ap.add_argument("--target", help="default cortex-m7")
    ap.add_argument("--result", type=Path, help="write the summary here instead of bench/results/")
    a = vars(ap.parse_args())
    if a.get("result"):
        RESULT = a["result"]
    a.pop("result")
    files = a.pop("combine")
    if files and a["control"]:
        summary = json.loads(RESULT.read_text())
        summary.setdefault("other_runs", {})["uniform_with_the_search_training"] = \
            equal_training_control([json.loads(f.read_text()) for f in files])
        write_result(RESULT, summary)
    elif files and a["sweep"]:
        sweep = allocation_sweep(json.loads(files[0].read_text()), a["sweep"])
        summary = json.loads(RESULT.read_text())  # read after the run: others may have written
        sweeps = summary.setdefault("other_runs", {}).setdefault("allocation_sweep", {})
        sweeps[files[0].stem] = sweep
        write_result(RESULT, summary)
    elif files and a["blocks"]:
        blocks = block_removal(json.loads(files[0].read_text()))
        summary = json.loads(RESULT.read_text())
        summary.setdefault("other_runs", {}).setdefault("block_removal", {})[files[0].stem] = \
            blocks
        write_result(RESULT, summary)
    elif files:
        write_result(RESULT, _keep_other_runs(combine([json.loads(f.read_text())
                                                        for f in files])))
    else:
        a.pop("control"), a.pop("sweep"), a.pop("blocks")
        main(a.pop("quick"), a.pop("seeds"), **a)
