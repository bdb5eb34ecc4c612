"""`edgeprune deploy`: the whole pipeline in one call, each stage named in its errors.

load or train → prune (+ fine-tune), or the measured feedback search when a budget is given →
quantize (word lengths from the target) → compile with TVM → check in QEMU (bit-exact against the
golden model; accuracy on real test samples run on the target) → report.

Everything is written to a temporary folder next to `out` and renamed at the end, so a failed run
leaves nothing half-written and an existing `out` is replaced only with `force`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .errors import EdgepruneError

DEFAULT_MODEL = "resnet8"


@dataclass
class DeployConfig:
    out: Path
    target: str = "cortex-m7"
    model: str | None = None          # path (.pt/.onnx) or zoo name; None: DEFAULT_MODEL
    data: str = "fashion-mnist"
    input_shape: tuple[int, ...] | None = None
    train_epochs: float | None = None  # for zoo models (built untrained), cached per settings;
    #                                    None: train.default_epochs
    criterion: str = "l1"
    ratio: float = 0.5
    per_layer: dict[str, float] | None = None
    layer_bits: dict[str, int] | None = None  # per-layer weight bits (a feedback ratios.json)
    layer_strides: dict[str, int] | None = None  # conv -> 1 in s window taps (the same file)
    tap_strides: tuple[int, ...] = ()  # window patterns the budget search may give a conv
    round_to: int | None = None       # pruned widths' multiple; None: the target's
    budget: dict[str, float] = field(default_factory=dict)
    finetune_epochs: float | None = None  # None: train.default_epochs
    quant_method: str = "auto"        # ptq, qat, admm or auto (QAT when PTQ loses accuracy)
    mixed_precision: bool = False     # per-layer word lengths within the target's
    calib_samples: int = 512
    eval_samples: int = 2000          # host accuracy (float, pruned, quantized)
    target_samples: int = 100         # real test samples run on the target
    port: str = "qemu"                # where profile runs: qemu, socket://host:port, /dev/tty*
    seed: int = 0
    force: bool = False


def parse_budget(text: str | None) -> dict[str, float]:
    """'latency_ms=5,flash_kb=256' -> {'latency_ms': 5.0, 'flash_kb': 256.0}."""
    from .feedback.measure import METRICS as BUDGET_KEYS

    if not text:
        return {}
    budget = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        key = key.strip()
        if not sep or key not in BUDGET_KEYS:
            raise EdgepruneError(f"--budget item '{part}' is not KEY=VALUE with KEY in "
                                 f"{', '.join(BUDGET_KEYS)}", stage="deploy")
        try:
            budget[key] = float(value)
        except ValueError:
            raise EdgepruneError(f"--budget {key}={value!r}: not a number", stage="deploy")
        if budget[key] <= 0:
            raise EdgepruneError(f"--budget {key} must be positive, got {value}", stage="deploy")
    return budget


@contextlib.contextmanager
def stage(name: str, progress=None):
    """Run one pipeline stage: errors carry its name; progress shows it."""
    t0 = time.perf_counter()
    if progress is not None:
        progress.start(name)
    try:
        yield
    except EdgepruneError as e:
        if e.stage is None:
            e.stage = name
        raise
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as e:  # a bug or an unforeseen input: still say where it happened
        raise EdgepruneError(f"{type(e).__name__}: {e}", stage=name) from e
    finally:
        if progress is not None:
            progress.done(name, time.perf_counter() - t0)


def cache_dir() -> Path:
    root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return root / "edgeprune" / "models"


def zoo_holdout(n_train: int) -> int:
    """Training samples at the end of the split that a zoo model never trains on (5000 of
    Fashion-MNIST's 60k): the feedback search ranks candidates on its last samples, which must
    be unseen for the ranking to mean anything."""
    return min(5000, n_train // 10)


def trained_zoo_model(name: str, data, input_shape, epochs: float | None, seed: int, log,
                      on_step=None):
    """A zoo model trained on `data` except its holdout tail (`zoo_holdout`) for `epochs`
    (None: train.default_epochs), cached by (name, data, shape, epochs, seed, holdout)."""
    import torch

    from . import models
    from .data import fit_data
    from .train import default_epochs, train

    model, shape = models.build(name, input_shape or data.input_shape, data.num_classes, seed)
    data = fit_data(shape, data, name, train_to="train on")
    n_train = len(data.x_train)
    holdout = zoo_holdout(n_train)
    epochs = default_epochs(n_train - holdout) if epochs is None else epochs
    key = f"{name}-{data.name}-{'x'.join(map(str, shape))}-e{epochs:g}-s{seed}-h{holdout}.pt"
    path = cache_dir() / key
    if path.exists():
        log(f"using cached trained {name} ({path})")
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return model.eval(), shape
    log(f"training {name} on {data.name} for {epochs:g} epoch(s) (cached afterwards)")
    # The zoo's own widths are safe for oneDNN (see train), and this is the longest training.
    train(model, data, epochs=epochs, lr=0.05, seed=seed, progress=on_step, onednn=True,
          max_samples=n_train - holdout, from_scratch=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")   # runs may train the same model at once
    torch.save(model.state_dict(), tmp)
    tmp.replace(path)
    return model.eval(), shape


def _accuracy_of_outputs(outputs: list[np.ndarray], labels: np.ndarray, batch: int,
                         qmodel) -> float:
    """Top-1 accuracy (R² on regression targets) of the target's per-call integer outputs,
    each holding `batch` samples."""
    from .quantize.reference import dequantize_output
    from .task import score
    return score(np.concatenate([dequantize_output(qmodel, o).reshape(batch, -1)
                                 for o in outputs]), labels)


def run_deploy(cfg: DeployConfig, log=print, progress=None) -> dict:
    import torch

    from . import data as datasets
    from .compile import DEPLOY_BUILD, atomic_out_dir, check_fits, compile_model
    from .load import load_torch, save_torch
    from .targets import load_target
    from .task import check_outputs, metric_name
    from .data import fit_data
    from .train import evaluate

    torch.set_num_threads(1)
    t_start = time.perf_counter()
    on_step = progress.update if progress is not None else None
    with stage("deploy"):
        target = load_target(cfg.target)
        if cfg.quant_method == "admm" and not cfg.mixed_precision and not cfg.budget:
            raise EdgepruneError("--quant-method admm trains low-bit weights: add "
                                 "--mixed-precision (word lengths per layer), or a --budget "
                                 "whose search chooses them")
    with atomic_out_dir(cfg.out, cfg.force) as tmp:
        with stage("data", progress):
            data = datasets.load(cfg.data)

        with stage("load", progress):
            name = cfg.model or DEFAULT_MODEL
            from .load import is_zoo_name
            if is_zoo_name(name):
                model, shape = trained_zoo_model(name, data, cfg.input_shape, cfg.train_epochs,
                                                 cfg.seed, log, on_step)
            else:
                model, shape = load_torch(name, cfg.input_shape, data.num_classes,
                                          data_shape=data.input_shape)
            data = fit_data(shape, data, name, train_to="calibrate on")
            with torch.no_grad():
                check_outputs(tuple(model.eval()(torch.zeros(shape)).shape), data)
            x_eval, y_eval = data.x_test[:cfg.eval_samples], data.y_test[:cfg.eval_samples]
            acc_float = evaluate(model, x_eval, y_eval)
            log(f"float model: {acc_float:.2f} % on {len(x_eval)} {data.name} test samples")

        from .train import default_epochs
        finetune_epochs = cfg.finetune_epochs if cfg.finetune_epochs is not None \
            else default_epochs(len(data.x_train))
        example = torch.from_numpy(data.x_train[:1].reshape(shape) if shape[0] == 1
                                   else data.x_train[:shape[0]])
        feedback_result = None
        layer_bits = cfg.layer_bits
        round_to = cfg.round_to or target.channel_multiple
        if cfg.budget:
            with stage("feedback", progress):
                from .feedback import search
                feedback_result = search(model, example, data, target, cfg.budget,
                                         criterion=cfg.criterion, seed=cfg.seed,
                                         work_dir=tmp / "feedback", log=log,
                                         finetune_epochs=finetune_epochs,
                                         eval_samples=cfg.eval_samples,
                                         calib_samples=cfg.calib_samples, port=cfg.port,
                                         tap_strides=cfg.tap_strides,
                                         channel_multiple=round_to)
                pruned, record = feedback_result.model, feedback_result.record
                layer_bits = feedback_result.bits   # the word lengths the search measured
                if cfg.mixed_precision:
                    log("--mixed-precision not applied: the feedback search chose the word "
                        "lengths on measured costs")
        else:
            with stage("prune", progress):
                from .prune import NothingToPrune, methods
                spec = {"criterion": cfg.criterion, "layer_strides": cfg.layer_strides,
                        "ratios": cfg.per_layer if cfg.per_layer is not None else cfg.ratio,
                        "round_to": round_to}
                if finetune_epochs > 0:
                    log(f"pruning, then fine-tuning for {finetune_epochs:g} epoch(s)")
                try:   # as `prune` does: cut, BatchNorm statistics anew, fine-tune
                    pruned, record = methods.run("oneshot", model, example, data, spec,
                                                 epochs=finetune_epochs, seed=cfg.seed,
                                                 progress=on_step)
                except NothingToPrune as e:   # deployed as it is: quantized, compiled, run
                    log(f"not pruned: {e}")
                    pruned, record = model, {"criterion": cfg.criterion, "layers": {},
                                             "not_pruned": str(e)}
        acc_pruned = evaluate(pruned, x_eval, y_eval)
        log(f"pruned model: {acc_pruned:.2f} %")
        save_torch(pruned, shape, tmp / "model.pt")
        from .frontend import to_onnx
        import onnx
        onnx.save(to_onnx(str(tmp / "model.pt"), shape, origin=f"the pruned {name}"),
                  str(tmp / "model.onnx"))
        (tmp / "pruning.json").write_text(json.dumps(record, indent=1, default=_jsonable))

        with stage("quantize", progress):
            qmodel, quant_report = quantize_for_target(pruned, shape, data, target, cfg, log=log,
                                                       layer_bits=layer_bits)
            qmodel.save(tmp / "qmodel")
            acc_quant = quant_report["accuracy"]["quantized"]

        with stage("compile", progress):
            build = compile_model(str(tmp / "qmodel"), target.name, tmp / DEPLOY_BUILD, log=log)
            c_lib = tmp / DEPLOY_BUILD / "c_library"
            shutil.copytree(c_lib, tmp / "c_library")
            elf = tmp / DEPLOY_BUILD / build["firmware"]
            shutil.copy(elf, tmp / "firmware.elf")
            write_bin(target, elf, tmp / "firmware.bin")

        with stage("simulate", progress):
            from .simulate import simulate
            batch = shape[0]  # the firmware runs the model's static batch per call
            n = max(batch, min(cfg.target_samples, len(data.x_test)) // batch * batch)
            sim, outputs = simulate(tmp / DEPLOY_BUILD, data.x_test[:n], timeout=600)
            if not sim["outputs_match"]:
                raise EdgepruneError(f"the target's outputs differ from the golden model in "
                                     f"{sim['mismatches']} values over {n} samples", stage="simulate")
            acc_target = _accuracy_of_outputs([o[0] for o in outputs], data.y_test[:n], batch,
                                              qmodel)
            log(f"on target ({target.name}, QEMU): {acc_target:.2f} % on {n} samples, bit-exact")

        with stage("profile", progress):
            profile = measure(tmp / DEPLOY_BUILD, cfg.port)

        with stage("baseline", progress):
            # The unpruned model through the same quantizer and compiler: the "before" numbers.
            base_q, base_report = quantize_for_target(model, shape, data, target, cfg, "ptq",
                                                      log=lambda *_: None)
            base_q.save(tmp / "work" / "baseline_qmodel")
            baseline = {}
            try:   # measured even where it exceeds the chip (QEMU's board has room)
                base_build = compile_model(str(tmp / "work" / "baseline_qmodel"), target.name,
                                           tmp / "work" / "baseline_build", log=lambda *_: None,
                                           check_chip=False)
                baseline = measure(tmp / "work" / "baseline_build")
                baseline.pop("firmware", None)   # work/ is removed below: no path to it
                check_fits(target, base_build["memory"]["weights_bytes"],
                           base_build["arena_bytes"], "the unpruned model")
            except EdgepruneError as e:   # too big for the chip: what pruning is for
                why = str(e).replace(f"{tmp / 'work' / 'baseline_qmodel'}: ", "")
                log(f"the unpruned model does not fit {target.name}: {why}")
                baseline["error"] = why
            baseline["accuracy"] = base_report["accuracy"]["quantized"]

        met, violations = check_budget(cfg.budget, profile)
        report = {
            **profile,
            "model": name, "data": data.name, "input_shape": list(shape),
            "accuracy": {"float": acc_float, "pruned": acc_pruned, "quantized": acc_quant,
                         "on_target": acc_target, "samples": len(x_eval), "on_target_samples": n,
                         "metric": metric_name(data.y_test)},
            "pruning": {"criterion": cfg.criterion,
                        "ratio": None if (cfg.per_layer or cfg.budget) else cfg.ratio,
                        "per_layer": per_layer_summary(record)},
            "quantization": quant_report,
            "baseline": baseline,
            "budget": cfg.budget, "met": met, "violations": violations,
            "feedback": feedback_result.summary() if feedback_result is not None else None,
            "check": {"outputs_match": sim["outputs_match"], "mismatches": sim["mismatches"],
                      "samples": sim["samples"]},
            "config": {**{k: (str(v) if isinstance(v, Path) else v)
                          for k, v in asdict(cfg).items()},
                       "finetune_epochs": finetune_epochs},   # the default resolved
            "firmware": "firmware.elf",
            "wall_s": round(time.perf_counter() - t_start, 1),
        }
        (tmp / "report.json").write_text(json.dumps(report, indent=1, default=_jsonable))
        from .report import write_html
        write_html(report, tmp / "report.html")
        shutil.rmtree(tmp / "work", ignore_errors=True)
        return report


def quantize_for_target(model, shape, data, target, cfg: DeployConfig, method: str | None = None,
                        log=print, layer_bits: dict[str, int] | None = None):
    """Quantize with the target's word lengths (edgeprune.quantize.stage), per layer at
    `layer_bits` where given (others 8); (qmodel, report)."""
    from .quantize.stage import QuantizeConfig, quantize

    low = bool(layer_bits) and any(b < 8 for b in layer_bits.values())
    # QAT fine-tunes 8-bit weights: with chosen low-bit layers "auto" stays PTQ (as the search
    # measured and ranked them)
    qcfg = QuantizeConfig(method=method or ("ptq" if low and cfg.quant_method == "auto"
                                            else cfg.quant_method),
                          mixed=cfg.mixed_precision and not layer_bits, layer_bits=layer_bits,
                          calib_samples=cfg.calib_samples, eval_samples=cfg.eval_samples,
                          seed=cfg.seed)
    return quantize(model, shape, data, target, qcfg, log=log)


def measure(build_dir: Path, port: str = "qemu") -> dict:
    """Latency, energy, memory and per-layer costs from the profiler (QEMU or a board)."""
    from .profile import profile

    report = profile(build_dir, port=port)
    if not report["check"].get("outputs_match", True):
        raise EdgepruneError(f"the profiled outputs differ from the golden model: {report['check']}",
                             stage="profile")
    return report


def check_budget(budget: dict, profile: dict) -> tuple[bool, list[str]]:
    """Every budget against the profiled numbers, in the feedback search's terms."""
    from .feedback.measure import costs_from_profile
    from .feedback.search import violations

    bad = violations(costs_from_profile(profile), budget) if budget else []
    return not bad, bad


def per_layer_summary(record: dict) -> list[dict]:
    """Output channels before/after per pruned layer, from the pruning record."""
    return [{"layer": name, "channels_before": e["out_before"], "channels_after": len(e["out_kept"]),
             "ratio": round(1 - len(e["out_kept"]) / max(1, e["out_before"]), 4)}
            for name, e in record.get("layers", {}).items() if "out_before" in e]


def write_bin(target, elf: Path, out: Path) -> None:
    import subprocess
    objcopy = target.toolchain["cc"].replace("gcc", "objcopy")
    r = subprocess.run([objcopy, "-O", "binary", str(elf), str(out)], capture_output=True, text=True)
    if r.returncode != 0:
        raise EdgepruneError(f"{objcopy} could not write {out.name}: {r.stderr.strip()}")


def _jsonable(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    return repr(o)
