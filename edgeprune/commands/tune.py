"""`edgeprune tune QMODEL --target T`: measure the kernels' tile candidates on the target and
keep the fastest per layer shape (used by every later compile for that target)."""

import json

from ..errors import EdgepruneError


def register(sub) -> None:
    p = sub.add_parser("tune", help="measure kernel tile candidates on the target, cache the best")
    p.add_argument("model", help="a quantized model folder (from `edgeprune quantize`)")
    p.add_argument("--target", required=True, help="target name (see `edgeprune targets`)")
    p.add_argument("--port", default="qemu",
                   help="where to measure: qemu (default), socket://HOST:PORT or a serial device")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..kernels.tune import tune
    from ..compile import is_quantized_dir

    if not is_quantized_dir(args.model):
        raise EdgepruneError(f"{args.model}: not a quantized model folder; the tuner measures the "
                             f"int8 kernels (run `edgeprune quantize` first)")
    result = tune(args.model, args.target, args.port,
                  log=(lambda *a: None) if args.json else print)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{'layer':<72} {'default':>10} {'tuned':>10} tile")
    for key, row in result["layers"].items():
        print(f"{key:<72} {row['default']:>10,} {row['best']:>10,} {row['best_tile']}")
    d, t = result["total_default"], result["total_tuned"]
    print(f"{'conv/dense kernels total':<72} {d:>10,} {t:>10,} ({(t - d) / d * 100:+.1f} %)")
    print(f"cache: {result['cache']}")
    return 0
