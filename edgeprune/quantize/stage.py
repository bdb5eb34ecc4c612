"""The quantize stage from Python: a float torch model + data + target -> QuantModel + report.

Methods:
* "ptq": calibrate and export;
* "qat": PTQ calibration, then straight-through fine-tuning of the weights, then export;
* "auto" (default): PTQ, and QAT only when PTQ loses more than `max_drop` points against
  float; the better of the two is kept; ADMM for weights below 8 bits or in pow2/ternary;
* "admm": low-bit weights trained by ADMM (Leng et al. 2018) in `fmt` ("int", "pow2",
  "ternary") at `bits`, first and last layers kept at 8 bits unless `mixed` chooses.

Word lengths come from the target's ``[quant]`` table: weight and activation widths outside it
are refused; `mixed` picks per-layer widths among them by sensitivity (`mixed.py`).
`quantize_to_folder` adds what the CLI needs: load the model, write atomically.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..data import fit_data
from ..errors import EdgepruneError, check_at_least
from . import reference
from .qmodel import QuantModel

METHODS = ("auto", "ptq", "qat", "admm")
FORMATS = ("int", "pow2", "ternary")
REPORT_FILE = "quantize.json"


@dataclass
class QuantizeConfig:
    method: str = "auto"
    fmt: str = "int"                   # weight format for admm / mixed: int | pow2 | ternary
    bits: int = 8                      # weight bits for ptq/qat/admm (mixed: chosen per layer)
    mixed: bool = False
    layer_bits: dict[str, int] | None = None  # per layer (module name): weight bits, e.g. the
                                       # feedback search's ratios.json "bits"; others stay 8
    max_drop: float = 0.5              # accuracy points: auto's QAT trigger, mixed's budget
    calib_samples: int = 512
    calib_method: str = "minmax"
    eval_samples: int = 1000           # test samples for the reported accuracy
    tune_samples: int = 500            # test samples after those, for mixed's choices
    epochs: float = 1.0                # QAT / ADMM training epochs
    lr: float | None = None            # None: method default (QAT 0.005, ADMM 0.01)
    max_train_samples: int | None = None
    seed: int = 0

    def __post_init__(self):
        # "auto" is the user not choosing: for low-bit or pow2/ternary weights on every layer,
        # ADMM is the one method that trains them (QAT keeps 8-bit weights)
        if self.method == "auto" and (self.fmt != "int" or self.bits < 8) and not self.mixed:
            self.method = "admm"


def slot_bits(fmt: str, bits: int) -> int:
    """Flash bits per weight of a (format, bits) choice (pow2 codes are 4 bits wide)."""
    return {"pow2": 4, "ternary": 2}.get(fmt, bits)


def check_config(cfg: QuantizeConfig, target) -> None:
    """Refuse settings the target's word lengths or the quantizer cannot honour."""
    wb = [int(b) for b in target.quant["weight_bits"]]
    ab = [int(b) for b in target.quant["activation_bits"]]
    if cfg.method not in METHODS:
        raise EdgepruneError(f"--method '{cfg.method}' unknown (one of {', '.join(METHODS)})")
    if cfg.fmt not in FORMATS:
        raise EdgepruneError(f"--format '{cfg.fmt}' unknown (one of {', '.join(FORMATS)})")
    if 8 not in ab:
        raise EdgepruneError(f"target {target.name}: [quant] activation_bits {ab} lacks 8; "
                             "the quantizer's activations are 8-bit (16 where mixed needs it)")
    if cfg.fmt == "ternary" and cfg.bits != 2:
        raise EdgepruneError(f"--format ternary takes --bits 2, got {cfg.bits}")
    if cfg.fmt == "pow2" and cfg.bits != 4:
        raise EdgepruneError(f"--format pow2 uses 4-bit codes (0, +-2**0..+-2**6): give --bits 4, "
                             f"got {cfg.bits}")
    if cfg.bits not in (2, 4, 8):
        raise EdgepruneError(f"--bits {cfg.bits}: weights are 8, 4 or 2 bits wide")
    need = slot_bits(cfg.fmt, cfg.bits)
    if need not in wb:
        raise EdgepruneError(f"target {target.name}: {need}-bit weights are not among its "
                             f"[quant] weight_bits {wb} ({target.path})")
    if cfg.fmt != "int" and cfg.method in ("ptq", "qat") and not cfg.mixed:   # auto: admm
        raise EdgepruneError(f"--format {cfg.fmt} needs --method admm (PTQ/QAT weights are "
                             "uniform integers)")
    if cfg.bits < 8 and cfg.method == "qat" and not cfg.mixed:
        raise EdgepruneError(f"--bits {cfg.bits} with --method {cfg.method}: QAT fine-tunes 8-bit "
                             "weights; use --method admm (or ptq) for low-bit weights")
    if cfg.layer_bits:
        for layer, b in cfg.layer_bits.items():
            if isinstance(b, bool) or not isinstance(b, int) or b not in (2, 4, 8) or b not in wb:
                raise EdgepruneError(f"per-layer bits: layer '{layer}' has {b!r}; target "
                                     f"{target.name} takes weight bits {wb} ({target.path})")
        if cfg.mixed:
            raise EdgepruneError("per-layer bits and --mixed both choose word lengths; give one")
        if cfg.method == "qat" and any(b < 8 for b in cfg.layer_bits.values()):
            raise EdgepruneError("per-layer bits below 8 with --method qat: QAT fine-tunes 8-bit "
                                 "weights; use ptq, auto or admm")
    if cfg.mixed and cfg.method == "qat":
        raise EdgepruneError("--mixed with --method qat: QAT keeps 8-bit weights; use ptq, auto "
                             "or admm")
    check_at_least((("--calib-samples", cfg.calib_samples, 1),
                    ("--eval-samples", cfg.eval_samples, 1),
                    ("--tune-samples", cfg.tune_samples, 1)))
    # word lengths chosen per layer (--mixed, the feedback search's) may all come out 8
    if cfg.method == "admm" and cfg.bits == 8 and cfg.fmt == "int" and not cfg.mixed \
            and not cfg.layer_bits:
        raise EdgepruneError("--method admm needs low-bit weights: give --bits 4/2, "
                             "--format pow2/ternary, or --mixed")
    if cfg.epochs <= 0 and cfg.method in ("qat", "admm"):
        raise EdgepruneError(f"--epochs must be positive for {cfg.method}, got {cfg.epochs}")
    if cfg.max_drop < 0:
        raise EdgepruneError(f"--max-drop must be >= 0, got {cfg.max_drop}")


def layer_weight_cfg(model, layer_bits: dict[str, int],
                     nodes: set[str] | None = None) -> dict[str, tuple[str, int]]:
    """{module name: bits} -> the quantizer's {IR node: ("int", bits)}. The IR names a layer as
    torch.fx's trace does ('layer1.conv1' -> 'layer1_conv1', Sequential's '1' -> '_1'); a name
    that is not a conv/linear layer of `model` is refused (never silently left at 8 bits)."""
    import torch.fx as fx
    import torch.nn as nn

    weights = {n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    try:
        traced = fx.symbolic_trace(model)
    except Exception as e:
        raise EdgepruneError(f"per-layer bits: cannot trace the model with torch.fx ({e})")
    node_of = {str(n.target): n.name for n in traced.graph.nodes if n.op == "call_module"}
    out = {}
    for layer, b in layer_bits.items():
        if layer not in weights or layer not in node_of or \
                (nodes is not None and node_of[layer] not in nodes):
            raise EdgepruneError(f"per-layer bits: no conv/linear layer '{layer}' in the model "
                                 f"(layers: {', '.join(sorted(weights))})")
        if int(b) != 8:
            out[node_of[layer]] = ("int", int(b))
    return out


def float_accuracy(model, x: np.ndarray, y: np.ndarray) -> float:
    from ..train import evaluate
    return evaluate(model, x, y)


def quantize(model, shape: tuple[int, ...], data, target, cfg: QuantizeConfig,
             log: Callable[[str], None] = print,
             progress: Callable[[float, float], None] | None = None
             ) -> tuple[QuantModel, dict]:
    """Quantize a float torch model for `target`; returns (QuantModel, report dict)."""
    import torch

    from .admm import admm_train, default_layer_formats
    from .ptq import calibrate, extract, to_qmodel
    from ..task import check_outputs, metric_name
    from .qat import qat_finetune

    check_config(cfg, target)
    data = fit_data(shape, data, "the model", train_to="calibrate on")
    torch.set_num_threads(1)
    torch.manual_seed(cfg.seed)
    t0 = time.perf_counter()
    calib = data.x_train[:cfg.calib_samples]
    # Accuracy on the first `eval_samples` test samples; mixed precision makes its choices on
    # the test samples after those, so the reported accuracy is not the one it tuned for.
    n = cfg.eval_samples
    x_eval, y_eval = data.x_test[:n], data.y_test[:n]
    x_tune, y_tune = data.x_test[n:n + cfg.tune_samples], data.y_test[n:n + cfg.tune_samples]
    net = extract(model, shape)
    # A model with several outputs (heads): accuracy scores one output against the labels,
    # so none is reported, and the methods that train or choose on it are refused.
    heads = len(net.outputs)
    if heads > 1 and (cfg.method not in ("auto", "ptq") or cfg.mixed):
        raise EdgepruneError(f"the model has {heads} outputs; "
                             f"{'--mixed' if cfg.mixed else '--method ' + cfg.method} trains "
                             "or chooses on the accuracy of one output: use --method ptq")
    acc_float = None
    if heads == 1:
        check_outputs(tuple(net.nodes[-1].out_shape), data)
        acc_float = float_accuracy(model, x_eval, y_eval)
        log(f"float model: {acc_float:.2f} % on {len(x_eval)} {data.name} test samples")
    ranges = calibrate(net, calib, cfg.calib_method, seed=cfg.seed)
    weight_cfg: dict[str, tuple[str, int]] = {}
    act_dtypes: dict[str, str] = {}
    mixed_record = None
    if cfg.mixed:
        from .mixed import choose
        fmt = cfg.fmt if cfg.method == "admm" else "int"
        if len(x_tune) == 0:   # a small test split, all of it scored: the training split's
            # last samples (those calibration reads last, if at all) stand in
            x_tune, y_tune = data.x_train[-cfg.tune_samples:], data.y_train[-cfg.tune_samples:]
            log(f"mixed precision: {data.name} has no test samples after the first {n}; it "
                f"tunes on the last {len(x_tune)} training samples")
        weight_cfg, act_dtypes, mixed_record = choose(
            net, ranges, x_tune, y_tune, float_accuracy(model, x_tune, y_tune),
            target.quant["weight_bits"],
            target.quant["activation_bits"], fmt, cfg.max_drop, log=log)
    elif cfg.layer_bits:
        weight_cfg = layer_weight_cfg(model, cfg.layer_bits,
                                      {n.name for n in net.weight_nodes()})
    elif cfg.bits < 8 or cfg.fmt != "int":
        weight_cfg = default_layer_formats(net, cfg.fmt, cfg.bits)

    method = cfg.method
    report_methods: dict[str, float] = {}
    if method in ("ptq", "auto") and heads > 1:
        qm, method = to_qmodel(net, ranges, weight_cfg, act_dtypes), "ptq"
    elif method in ("ptq", "auto"):
        qm = to_qmodel(net, ranges, weight_cfg, act_dtypes)
        acc = reference.accuracy(qm, x_eval, y_eval)
        report_methods["ptq"] = acc
        log(f"PTQ: {acc:.2f} % (integer reference)")
        method = "ptq"
        if cfg.method == "auto" and acc_float - acc > cfg.max_drop and \
                all(b == 8 for _, b in weight_cfg.values()):
            log(f"PTQ loses {acc_float - acc:.2f} points (> {cfg.max_drop}): QAT fine-tuning")
            qat_net = extract(model, shape)
            qat_finetune(qat_net, data, ranges, cfg.epochs, cfg.lr or 0.005, act_dtypes, 8,
                         cfg.max_train_samples, cfg.seed, progress)
            qm_qat = to_qmodel(qat_net, ranges, weight_cfg, act_dtypes)
            acc_qat = reference.accuracy(qm_qat, x_eval, y_eval)
            report_methods["qat"] = acc_qat
            log(f"QAT: {acc_qat:.2f} %")
            if acc_qat > acc:
                qm, method = qm_qat, "qat"
    elif method == "qat":
        qat_finetune(net, data, ranges, cfg.epochs, cfg.lr or 0.005, act_dtypes, 8,
                     cfg.max_train_samples, cfg.seed, progress)
        qm = to_qmodel(net, ranges, weight_cfg, act_dtypes)
    else:  # admm
        log(f"ADMM: {sum(1 for v in weight_cfg.values() if v != ('int', 8))} constrained layers, "
            f"{cfg.epochs:g} epoch(s)")
        qw = admm_train(net, data, weight_cfg, ranges, cfg.epochs, cfg.lr or 0.01,
                        max_samples=cfg.max_train_samples, seed=cfg.seed, progress=progress)
        ranges = calibrate(net, calib, cfg.calib_method, seed=cfg.seed)
        qm = to_qmodel(net, ranges, weight_cfg, act_dtypes, quantized_weights=qw)

    acc_q = None if heads > 1 else report_methods[method] if method in report_methods else \
        reference.accuracy(qm, x_eval, y_eval)
    qm.meta.update({"method": method, "calibration": cfg.calib_method,
                    "calibration_samples": int(len(calib))})
    int8_bytes = sum(int(qm.param(o, "weight").size) for o in qm.stored_weight_ops())
    report = {
        "method": method, "requested_method": cfg.method, "target": target.name,
        "data": data.name, "input_shape": list(shape), "outputs": heads,
        "accuracy": None if heads > 1 else {
            "float": acc_float, "quantized": acc_q, "samples": int(len(x_eval)),
            "metric": metric_name(y_eval), "by_method": report_methods,
            "source": "numpy integer reference"},
        "weight_bytes": qm.total_weight_bytes(), "weight_bytes_int8": int8_bytes,
        "layers": qm.layer_table(),
        "activations": {t: qm.tensors[t].dtype for t in qm.tensors},
        "target_word_lengths": {"weight_bits": target.quant["weight_bits"],
                                "activation_bits": target.quant["activation_bits"]},
        "mixed": mixed_record, "config": asdict(cfg),
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    score = f"{heads} outputs, no accuracy" if heads > 1 else \
        f"{acc_q:.2f} % vs float {acc_float:.2f} %"
    log(f"quantized ({method}): {score}; weights {report['weight_bytes']} B (int8 would be "
        f"{int8_bytes} B)")
    return qm, report


def quantize_to_folder(spec: str, out: Path, target_name: str = "cortex-m7",
                       data_name: str = "fashion-mnist", cfg: QuantizeConfig | None = None,
                       input_shape: tuple[int, ...] | None = None,
                       train_epochs: float | None = None, force: bool = False,
                       log: Callable[[str], None] = print, progress=None) -> dict:
    """Load `spec` (a .pt/.onnx path, a prune output folder or a zoo name, zoo models trained on
    `data_name` and cached), quantize it, write qmodel.json + weights.npz + quantize.json to `out` atomically."""
    from .. import data as datasets
    from ..compile import atomic_out_dir
    from ..load import is_zoo_name, load_torch
    from ..targets import load_target

    cfg = cfg or QuantizeConfig()
    target = load_target(target_name)
    check_config(cfg, target)
    data = datasets.load(data_name)
    if Path(spec).is_dir() and (Path(spec) / "model.pt").exists():
        spec = str(Path(spec) / "model.pt")       # an `edgeprune prune` output folder
    if is_zoo_name(spec):
        from ..deploy import trained_zoo_model
        model, shape = trained_zoo_model(spec, data, input_shape, train_epochs, cfg.seed, log,
                                         progress)
    else:
        model, shape = load_torch(spec, input_shape, data.num_classes,
                                  data_shape=data.input_shape, several_outputs=True)
    data = fit_data(shape, data, spec, train_to="calibrate on")
    with atomic_out_dir(out, force) as tmp:
        qm, report = quantize(model, shape, data, target, cfg, log, progress)
        report["model"] = spec
        qm.save(tmp)
        (tmp / REPORT_FILE).write_text(json.dumps(report, indent=1))
        return report
