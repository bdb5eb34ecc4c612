"""`edgeprune simulate BUILD_DIR`: run the firmware in QEMU and compare with the host model."""

import json
from pathlib import Path

import numpy as np

from ..errors import EdgepruneError, check_at_least
from ..qemu import TargetFailure


def register(sub) -> None:
    p = sub.add_parser("simulate", help="boot the compiled firmware in QEMU and check its outputs")
    p.add_argument("build", type=Path,
                   help="a folder written by `edgeprune compile` or `edgeprune deploy`")
    p.add_argument("--input", type=Path,
                   help=".npy input: the model's shape, or K of them stacked (several inputs: "
                        "an .npz of them by name, or input0, input1, ...)")
    p.add_argument("--save-outputs", type=Path,
                   help="write what the target computed to this .npy (a model with several "
                        "outputs: an .npz of output0, output1, ...)")
    p.add_argument("--samples", type=int, default=4, help="test inputs when --input is not given")
    p.add_argument("--timeout", type=float, default=300, help="wall-clock limit for QEMU (s)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def load_npy(path: Path):
    """A user's .npy input (an .npz: {name: array}, a model with several inputs), or an
    error that names the file."""
    if not path.exists():
        raise EdgepruneError(f"input file {path} does not exist")
    try:
        x = np.load(path, allow_pickle=False)
    except Exception as e:
        raise EdgepruneError(f"{path}: not a .npy array or .npz archive ({e})")
    if isinstance(x, np.lib.npyio.NpzFile):
        with x:
            return {k: x[k] for k in x.files}
    return x


def run(args) -> int:
    from ..simulate import simulate

    from ..compile import build_folder
    args.build = build_folder(args.build)   # a deploy output: its build/
    x = load_npy(args.input) if args.input is not None else None
    check_at_least((("--samples", args.samples, 1),))
    try:
        result, outputs = simulate(args.build, x, args.samples, args.timeout)
    except TargetFailure as e:
        if args.json:
            print(json.dumps({"outputs_match": False, "error": str(e)}))
        else:
            print(f"edgeprune simulate: target failure: {e}")
        return 3
    if args.save_outputs is not None:
        from ..compile import load_build
        from ..simulate import outputs_like_input
        input0 = load_build(args.build)["inputs"][0]
        in_shape = tuple(input0["shape"])
        first = x.get(input0["name"], x.get("input0")) if isinstance(x, dict) else x
        per_output = [outputs_like_input([o[k] for o in outputs], first, in_shape)
                      for k in range(len(outputs[0]))]
        if len(per_output) == 1:
            np.save(args.save_outputs, per_output[0])
        else:   # output0, output1, ... in the order of the C library's arguments
            with open(args.save_outputs, "wb") as f:
                np.savez(f, **{f"output{k}": y for k, y in enumerate(per_output)})
    if args.json:
        print(json.dumps(result))
    else:
        print(f"simulate: {result['target']}: {result['samples']} samples, "
              f"outputs {'match' if result['outputs_match'] else 'MISMATCH'} "
              f"(max abs err {result['max_abs_err']:.3g}"
              + (f", mismatches {result['mismatches']}" if result['mismatches'] is not None else "")
              + f"); {result['instructions']} instructions/inference; flash {result['flash_bytes']} B, "
              f"SRAM {result['sram_bytes']} B, arena {result['arena_bytes']} B "
              f"(lower bound {result['arena_lower_bound_bytes']} B), stack used {result['stack_used_bytes']} B")
    return 0 if result["outputs_match"] else 1
