"""`edgeprune prune MODEL --criterion C --ratio R [--data D --finetune E] --out DIR`.

Writes DIR/model.onnx and DIR/model.pt (the physically smaller model) and DIR/pruning.json
(per layer: channels before, kept indices, criterion scores; MACs/params before and after).
"""

from __future__ import annotations

import json
from pathlib import Path

from ..data import HELP as DATA_HELP, fit_data
from ..errors import EdgepruneError, check_at_least, read_json_option
from ..load import MODEL_FILES

STAGE = "prune"


def register(sub) -> None:
    from . import ALLOCATIONS, CRITERIA, methods
    from .methods import METHODS

    p = sub.add_parser("prune", help="structured pruning: a physically smaller model",
                       description=__doc__)
    p.add_argument("model", help=f"{MODEL_FILES}, or a zoo name (built untrained)")
    p.add_argument("--criterion", default="l1", choices=CRITERIA,
                   help="channel importance; l1 l2 fpgm random need no --data")
    amount = p.add_mutually_exclusive_group()
    amount.add_argument("--ratio", type=float,
                        help="fraction of channels removed per layer, in [0, 1) (default 0.5)")
    amount.add_argument("--flops-target", type=float,
                        help="fraction of MACs to remove; the ratio is searched to meet it")
    amount.add_argument("--params-target", type=float,
                        help="fraction of parameters to remove; the ratio is searched")
    p.add_argument("--per-layer", type=Path,
                   help="JSON file or inline JSON {layer: ratio, '*': default} (or "
                        "{'ratios': {...}}, with 'tap_strides' {conv: s} kept too: the "
                        "feedback loop's ratios.json); "
                        "--ratio sets the default; with a target, the ratios are scaled until "
                        "it is met")
    p.add_argument("--allocation", default="uniform", choices=ALLOCATIONS,
                   help="uniform ratio, or global ranking with a per-layer minimum")
    p.add_argument("--method", default="oneshot", choices=list(METHODS),
                   help="schedule around the cut (methods.py); all but oneshot need --data")
    p.add_argument("--data", help="for data-driven criteria and fine-tuning: " + DATA_HELP)
    p.add_argument("--finetune", type=float, default=0.0, help="fine-tuning epochs (needs --data)")
    p.add_argument("--max-samples", type=int, help="fine-tune on the first N training samples")
    p.add_argument("--finetune-lr", type=float,
                   help="peak learning rate of fine-tuning (cosine); default: the method's")
    p.add_argument("--distill", type=float, nargs="?", const=0.9, default=0.0, metavar="ALPHA",
                   help="fine-tune with distillation from the unpruned model, weight ALPHA "
                        "(0.9 when given alone) of the soft-target loss")
    p.add_argument("--distill-temp", type=float, default=4.0, help="distillation temperature")
    p.add_argument("--bn-recal", type=int, default=methods.BN_BATCHES, metavar="BATCHES",
                   help="re-estimate BatchNorm statistics on this many training batches after "
                        "the cut (0: keep the stored ones); a model without BatchNorm (folded "
                        "by an ONNX exporter) instead gets each kept channel's mean and "
                        "deviation from before the cut")
    p.add_argument("--rewind-from", type=Path,
                   help="--method lth: weights from early in training (state_dict or model file)")
    p.add_argument("--kernel-ratio", type=float, default=0.0,
                   help="also remove this fraction of k×k kernels per filter (kernel-wise "
                        "pattern; the same input-channel pairs from each block of 4 filters, "
                        "which the int8 kernels skip)")
    p.add_argument("--intra-stride", type=int, default=1,
                   help="also keep only every Nth tap inside each kernel (intra-kernel strided)")
    p.add_argument("--round-to", type=int, default=1,
                   help="pruned layers keep a multiple of this many channels (the kernels take "
                        "channels in pairs: deploy uses the target's channel_multiple, 2)")
    p.add_argument("--eval-samples", type=int, default=2000,
                   help="test samples for the accuracies in pruning.json (with --data)")
    p.add_argument("--input-shape", help="static input shape where the model's is not stored")
    p.add_argument("--train-epochs", type=float, default=None,
                   help="a zoo model is first trained on --data for this long (cached; "
                        "default as deploy's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out")
    p.add_argument("--json", action="store_true", help="print pruning.json's summary as JSON")
    p.set_defaults(func=run)


def read_tap_strides(path: Path) -> dict[str, int]:
    """The feedback loop's per-conv intra-kernel strides in a --per-layer file ({} if none)."""
    obj = read_json_option(path, "--per-layer", STAGE)
    strides = obj.get("tap_strides", {}) if isinstance(obj, dict) else {}
    if not isinstance(strides, dict) or not all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in strides.values()):
        raise EdgepruneError(f"--per-layer {path}: tap_strides must be {{conv: integer >= 1}}, "
                             f"not {strides!r}", stage=STAGE)
    return strides


def read_per_layer(path: Path) -> dict[str, float]:
    obj = read_json_option(path, "--per-layer", STAGE)
    if isinstance(obj, dict) and isinstance(obj.get("ratios"), dict):
        obj = obj["ratios"]  # the feedback loop's file
    if not isinstance(obj, dict) or not obj:
        raise EdgepruneError(f"--per-layer {path}: expected a JSON object {{layer: ratio}}",
                             stage=STAGE)
    for k, v in obj.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise EdgepruneError(f"--per-layer {path}: ratio for layer '{k}' is {v!r}, "
                                 "not a number", stage=STAGE)
    return {str(k): float(v) for k, v in obj.items()}


def read_rewind_state(path: Path) -> dict:
    """A state_dict from a state_dict file, a saved module or a zoo checkpoint."""
    import torch.nn as nn

    from ..load import _torch_load
    if not path.exists():
        raise EdgepruneError(f"--rewind-from {path} does not exist", stage=STAGE)
    try:
        import torch
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        obj = _torch_load(path)
    if isinstance(obj, dict) and "state_dict" in obj:
        obj = obj["state_dict"]
    if isinstance(obj, nn.Module):
        obj = obj.state_dict()
    if not isinstance(obj, dict):
        raise EdgepruneError(f"--rewind-from {path}: holds a {type(obj).__name__}, not a "
                             "state_dict or a model", stage=STAGE)
    return obj


def run(args) -> int:
    import torch

    from .. import data as datasets
    from ..compile import atomic_out_dir, refuse_to_overwrite
    from ..frontend import to_onnx
    from ..load import is_zoo_name, load_torch, parse_shape, save_torch
    from ..task import metric_name
    from ..train import evaluate
    from . import allocate, methods

    # one thread, as deploy: beside another busy process a prune + fine-tune took 672 s on
    # torch's default threads against 64 s on one
    torch.set_num_threads(1)
    log = (lambda *a: None) if args.json else (lambda msg: print(f"prune: {msg}", flush=True))
    ratio = 0.5 if args.ratio is None else allocate.check_ratio(args.ratio)
    check_at_least((("--round-to", args.round_to, 1),), stage=STAGE)
    per_layer = read_per_layer(args.per_layer) if args.per_layer else None
    if per_layer is not None and args.ratio is not None:
        per_layer.setdefault("*", ratio)  # --ratio: the layers the file does not name
    if args.finetune < 0:
        raise EdgepruneError(f"--finetune {args.finetune} must be >= 0", stage=STAGE)
    if args.finetune > 0 and not args.data:
        raise EdgepruneError("--finetune needs training data: pass --data (e.g. fashion-mnist)",
                             stage=STAGE)
    out = args.out
    refuse_to_overwrite(out, args.force, STAGE)   # before any training, not only when writing

    dataset = datasets.load(args.data) if args.data else None
    if is_zoo_name(args.model) and dataset is not None:
        # A zoo name is an architecture: prune the trained network, as quantize and deploy do.
        from ..deploy import trained_zoo_model
        model, shape = trained_zoo_model(args.model, dataset, parse_shape(args.input_shape),
                                         args.train_epochs, args.seed, log)
    else:
        # several outputs only without data: criteria, fine-tuning and accuracy score one;
        # a file without a stored input shape takes the data's, as deploy does
        model, shape = load_torch(args.model, parse_shape(args.input_shape),
                                  data_shape=dataset.input_shape if dataset else None,
                                  several_outputs=dataset is None)
    data = fit_data(shape, dataset, args.model, STAGE) if dataset is not None else None
    if data is not None and data.x_train is None and (args.finetune > 0 or
                                                      args.method != "oneshot"):
        raise EdgepruneError(f"dataset {data.name} has no training split to fine-tune on",
                             stage=STAGE)
    torch.manual_seed(args.seed)
    example = (torch.from_numpy(data.x_test[:shape[0]]).reshape(shape) if data is not None
               else torch.randn(shape))
    spec = {"criterion": args.criterion, "allocation": args.allocation,
            "ratios": per_layer if per_layer is not None else ratio,
            "flops_target": args.flops_target, "params_target": args.params_target,
            "kernel_ratio": args.kernel_ratio, "intra_stride": args.intra_stride,
            "round_to": args.round_to,
            "layer_strides": read_tap_strides(args.per_layer) if args.per_layer else {}}
    score, metric = None, "accuracy"
    if data is not None:
        x_eval, y_eval = data.x_test[:args.eval_samples], data.y_test[:args.eval_samples]
        score = lambda m: round(evaluate(m, x_eval, y_eval), 3)  # noqa: E731
        metric = metric_name(y_eval)   # R² on regression targets

    acc_original = score(model) if score else None
    log(f"{args.model}: criterion {args.criterion}, method {args.method}"
        + (f", {metric} {acc_original:.2f} % on {len(x_eval)} test samples" if score else ""))
    extra = {"rewind_state": read_rewind_state(args.rewind_from)} if args.rewind_from else {}
    if args.distill and args.finetune <= 0:
        raise EdgepruneError("--distill acts while fine-tuning: give --finetune EPOCHS",
                             stage=STAGE)
    pruned, record = methods.run(args.method, model, example, data, spec, epochs=args.finetune,
                                 seed=args.seed, max_samples=args.max_samples, evaluate=score,
                                 bn_batches=args.bn_recal if data is not None else 0,
                                 distill=args.distill, temperature=args.distill_temp,
                                 lr=args.finetune_lr, **extra)
    if score:
        before = record.pop("acc_before_finetune", None)
        record["accuracy"] = {"original": acc_original,
                              "after_cut": record.pop("acc_after_cut", before),
                              "before_finetune": before,
                              "after": score(pruned) if args.finetune > 0 or before is None
                              else before, "samples": len(x_eval),
                              "dataset": data.name, "metric": metric}
    record["model"] = args.model

    with atomic_out_dir(out, args.force) as tmp:
        save_torch(pruned, shape, tmp / "model.pt")
        import onnx
        onnx.save(to_onnx(str(tmp / "model.pt"), shape), str(tmp / "model.onnx"))
        (tmp / "pruning.json").write_text(json.dumps(record, indent=1))

    summary = {k: record.get(k) for k in ("criterion", "method", "macs_before", "macs_after",
                                          "params_before", "params_after", "accuracy")}
    summary["out"] = str(out)
    if args.json:
        print(json.dumps(summary))
    else:
        macs = 1 - record["macs_after"] / max(1, record["macs_before"])
        params = 1 - record["params_after"] / max(1, record["params_before"])
        log(f"MACs {record['macs_before']:,} -> {record['macs_after']:,} (-{macs:.1%}), params "
            f"{record['params_before']:,} -> {record['params_after']:,} (-{params:.1%})")
        without_bn = [g for g in record["groups"] if (g["note"] or "").startswith("no BatchNorm")]
        if without_bn:
            log(f"bn-scale: {len(without_bn)} of {len(record['groups'])} channel groups have no "
                "BatchNorm, L1 scored them (torch's ONNX export of an eval-mode model folds "
                "BatchNorm into the convs; give the torch.save .pt file to keep it)")
        if score:
            a = record["accuracy"]
            how = ("corrected channel statistics" if "statistics_corrected_layers" in record
                   else "re-estimated BatchNorm statistics")
            recal = (f" -> {a['before_finetune']:.2f} % with {how}"
                     if a["after_cut"] != a["before_finetune"] else "")
            log(f"{metric} {a['original']:.2f} % -> {a['after_cut']:.2f} % after the cut{recal}"
                f" -> {a['after']:.2f} % after {args.finetune:g} epoch(s) of fine-tuning")
        log(f"wrote {out}/model.onnx, model.pt, pruning.json")
    return 0
