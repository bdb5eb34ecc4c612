"""`edgeprune quantize MODEL --target T --data D --out DIR`: integer model for `compile`.

MODEL is a .pt/.onnx path (e.g. a pruned model from `edgeprune prune`) or a zoo name (trained on
--data first and cached, like `deploy`).  DIR receives qmodel.json + weights.npz (what `compile`
accepts) and quantize.json (per layer bits and weight bytes, accuracy float vs quantized).
"""

import json
from pathlib import Path

from ..data import HELP as DATA_HELP
from ..errors import EdgepruneError, read_json_option
from ..load import MODEL_FILES
from .stage import FORMATS, METHODS, QuantizeConfig


def register(sub) -> None:
    p = sub.add_parser("quantize", help="integer-only fixed-point model (PTQ/QAT/ADMM, mixed "
                       "precision) for `edgeprune compile`", description=__doc__)
    p.add_argument("model", help=f"{MODEL_FILES}, an `edgeprune prune` output folder, "
                   "or a zoo name")
    p.add_argument("--target", default="cortex-m7", help="word lengths come from its [quant] table")
    p.add_argument("--data", default="fashion-mnist", help=DATA_HELP)
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out")
    p.add_argument("--input-shape", help="static input shape where the model stores none")
    p.add_argument("--method", default="auto", choices=METHODS,
                   help="ptq; qat (straight-through fine-tuning); auto = PTQ, then QAT if PTQ "
                   "loses more than --max-drop points (admm for --bits 4/2, pow2, ternary); "
                   "admm = low-bit weights trained by ADMM")
    p.add_argument("--format", dest="fmt", default="int", choices=FORMATS,
                   help="weight levels: int (uniform), pow2 ({0, +-2**k} * a, shifts in C; "
                   "4-bit codes), ternary ({-1, 0, 1} * a)")
    p.add_argument("--bits", type=int, default=None,
                   help="weight bits (8, 4, 2; default 8, 4 for pow2, 2 for ternary)")
    p.add_argument("--mixed", action="store_true",
                   help="per-layer weight/activation widths among the target's word lengths, "
                   "chosen by sensitivity within --max-drop")
    p.add_argument("--layer-bits", type=Path, default=None,
                   help="per-layer weight bits: inline JSON {layer: bits}, a JSON file of "
                        "them, or a feedback ratios.json (its \"bits\")")
    p.add_argument("--max-drop", type=float, default=0.5,
                   help="accuracy points: QAT trigger for auto, loss budget for --mixed")
    p.add_argument("--calib-samples", type=int, default=512)
    p.add_argument("--calib-method", default="minmax", choices=("minmax", "percentile"))
    p.add_argument("--eval-samples", type=int, default=1000, help="test samples for accuracy")
    p.add_argument("--tune-samples", type=int, default=500,
                   help="--mixed decides on this many test samples after the --eval-samples")
    p.add_argument("--epochs", type=float, default=1.0, help="QAT / ADMM training epochs")
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--train-samples", type=int, default=None,
                   help="limit QAT/ADMM training to the first N training samples")
    p.add_argument("--train-epochs", type=float, default=None,
                   help="training of zoo models before quantizing (cached; default as deploy's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..load import parse_shape
    from .stage import quantize_to_folder

    bits = args.bits if args.bits is not None else {"pow2": 4, "ternary": 2}.get(args.fmt, 8)
    cfg = QuantizeConfig(method=args.method, fmt=args.fmt, bits=bits, mixed=args.mixed,
                         max_drop=args.max_drop, calib_samples=args.calib_samples,
                         calib_method=args.calib_method, eval_samples=args.eval_samples,
                         tune_samples=args.tune_samples,
                         epochs=args.epochs, lr=args.lr, max_train_samples=args.train_samples,
                         seed=args.seed, layer_bits=_layer_bits(args.layer_bits))
    log = (lambda *a: None) if args.json else (lambda msg: print(f"quantize: {msg}", flush=True))
    report = quantize_to_folder(args.model, args.out, args.target, args.data, cfg,
                                parse_shape(args.input_shape), args.train_epochs, args.force, log)
    if args.json:
        print(json.dumps(report))
    else:
        for row in report["layers"]:
            fmt = "" if row["weight_format"] == "int" else f" {row['weight_format']}"
            print(f"  {row['layer']:<24} {row['weight_bits']}-bit{fmt:<8} "
                  f"act {row['activation_dtype']:<6} {row['weight_bytes']:>8} B")
        a = report["accuracy"]
        score = "no accuracy (several outputs)" if a is None else \
            f"{a['quantized']:.2f} % (float {a['float']:.2f} %, {a['samples']} samples)"
        print(f"quantize: {report['method']}: {score}; weights {report['weight_bytes']} B "
              f"-> {args.out}")
    return 0


def _layer_bits(path: Path | None) -> dict[str, int] | None:
    """--layer-bits: {layer: bits}, or the "bits" of a feedback ratios.json."""
    if path is None:
        return None
    spec = read_json_option(path, "--layer-bits")
    spec = spec.get("bits", spec) if isinstance(spec, dict) else spec
    if not isinstance(spec, dict) or not all(isinstance(b, int) for b in spec.values()):
        raise EdgepruneError(f"--layer-bits {path}: expected {{layer: bits}} with integer bits")
    return spec
