"""`edgeprune compile MODEL --target T --out DIR`."""

import json
from pathlib import Path

from ..load import MODEL_FILES, parse_shape


def register(sub) -> None:
    p = sub.add_parser("compile", help="lower a model with TVM into a C library and firmware")
    p.add_argument("model", help=f"{MODEL_FILES}, a quantize output folder (or a deploy one: "
                   "its integer model), or a zoo name")
    p.add_argument("--target", default="cortex-m7",
                   help="a target name or alias (edgeprune targets)")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--input-shape", help="static input shape where the model's is dynamic, e.g. 1,1,28,28")
    p.add_argument("--prefix", default="model", help="C symbol prefix of the generated API")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..compile import compile_model

    log = (lambda *a: None) if args.json else (lambda msg: print(f"compile: {msg}"))
    build = compile_model(args.model, args.target, args.out, parse_shape(args.input_shape),
                          args.prefix, args.force, log)
    if args.json:
        print(json.dumps(build))
    else:
        m = build["memory"]
        print(f"compile: {len(build['layers'])} kernels; flash {m['flash_bytes']} B "
              f"(weights {m['weights_bytes']} B), SRAM {m['sram_bytes']} B, arena "
              f"{build['arena_bytes']} B (lower bound {build['arena_lower_bound_bytes']} B) -> {args.out}")
    return 0
