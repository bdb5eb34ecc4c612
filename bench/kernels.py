"""Issue 9's int8 reference layer set, compiled by edgeprune, counted in QEMU.

Each layer is a one-layer QuantModel (random int8 weights, per-channel requantization, input
zero point -128 as after a ReLU), compiled with `compile_model` for every target of TARGETS
that exists (Cortex-M, and Cortex-A in qemu-aarch64, no CMSIS-NN reference) and run with
`simulate`: retired instructions per layer (all kernels the layer became),
kernel code bytes, arena bytes, and a bit-exact check against the numpy integer reference.

Also the whole zoo networks ResNet-8 and DS-CNN (PTQ int8), with edgeprune's kernels and with
TVM's default lowering for comparison.

Writes bench/results/kernels.json keyed by target (`python -m bench.kernels --targets
cortex-m55` re-measures one target and keeps the others' entries):
  {"cortex-m7": {"layers": {"L1": instructions, ...}, "total_instructions": N,
                 "code_bytes": N, "arena_bytes": N, "bit_exact": true, ...,
                 "networks": {"resnet8": {"instructions": N, "tvm_default_instructions": N,
                                          "bit_exact": true, ...}, ...}}, ...}
"""

import json
import tempfile
from pathlib import Path

import numpy as np

from bench.run import write_result

RESULTS = Path(__file__).parent / "results" / "kernels.json"
TARGETS = ["cortex-m7", "cortex-m4", "cortex-m55", "cortex-a53", "cortex-a72", "riscv32"]
# (Cortex-A: qemu-aarch64 user mode, the NEON branches of kernels/simd_c; no CMSIS-NN reference)

# name: (kind, in_ch, out_ch, kernel, in_hw, stride, groups)
LAYERS = {
    "L1": ("conv2d", 3, 16, 3, 32, 1, 1),
    "L2": ("conv2d", 16, 16, 3, 32, 1, 1),
    "L3": ("conv2d", 16, 32, 3, 32, 2, 1),
    "L4": ("conv2d", 32, 32, 3, 16, 1, 1),
    "L5": ("conv2d", 16, 32, 1, 32, 2, 1),
    "L6": ("conv2d", 32, 64, 3, 16, 2, 1),
    "L7": ("conv2d", 64, 64, 3, 8, 1, 1),
    "L8": ("conv2d", 64, 64, 3, 8, 1, 64),
    "L9": ("conv2d", 64, 64, 1, 8, 1, 1),
    "L10": ("dense", 64, 10, 1, 1, 1, 1),
}

# CMSIS-NN 7.0 on the same set (issue 9), for the ratio column.
CMSIS_NN = {
    "cortex-m7": {"L1": 2057185, "L2": 5441278, "L3": 2490558, "L4": 4513730, "L5": 557127,
                  "L6": 2173639, "L7": 4140650, "L8": 303770, "L9": 544219, "L10": 1943,
                  "total": 22224099},
    "cortex-m4": {"total": 22452879},
    "cortex-m55": {"total": 3594437},
}


def layer_qmodel(kind: str, cin: int, cout: int, k: int, hw: int, stride: int, groups: int,
                 seed: int = 0, zp_in: int = -128, zp_out: int = -5):
    """A one-layer QuantModel with random int8 weights and a per-channel requantization chosen
    so the outputs spread over the int8 range (not all clipped)."""
    from edgeprune.quantize.qmodel import Op, QuantModel, TensorInfo
    from edgeprune.quantize.requant import quantize_multipliers

    rng = np.random.default_rng(seed)
    if kind == "dense":
        in_shape, out_shape = [1, cin], [1, cout]
        w = rng.integers(-127, 128, (cout, cin), dtype=np.int8)
        attrs = {}
        fan_in = cin
    else:
        pad = (k - 1) // 2
        oh = (hw + 2 * pad - k) // stride + 1
        in_shape, out_shape = [1, cin, hw, hw], [1, cout, oh, oh]
        w = rng.integers(-127, 128, (cout, cin // groups, k, k), dtype=np.int8)
        attrs = {"strides": [stride, stride], "padding": [pad] * 4, "dilation": [1, 1],
                 "groups": groups}
        fan_in = cin // groups * k * k
    # |x - zp| is ~U(0, 255) for zp = -128: acc std ~ sqrt(fan_in) * 147 * 73.
    acc_std = np.sqrt(fan_in) * 147.0 * 73.0
    scales = rng.uniform(0.5, 2.0, cout) * 40.0 / acc_std
    m, sh = quantize_multipliers(scales)
    bias = rng.integers(-2000, 2000, cout).astype(np.int32)
    attrs.update({"clamp": [-128, 127], "weight_bits": 8, "weight_format": "int",
                  "activation": None})
    tensors = {"x": TensorInfo("x", in_shape, "int8", 0.05, zp_in),
               "y": TensorInfo("y", out_shape, "int8", 0.05, zp_out)}
    op = Op(kind, "layer", ["x"], "y", attrs)
    params = {"layer.weight": w, "layer.weight_scale": np.ones(cout, np.float32),
              "layer.bias": bias, "layer.multiplier": m, "layer.shift": sh}
    return QuantModel("x", "y", tensors, [op], params)


def macs(kind, cin, cout, k, hw, stride, groups) -> int:
    if kind == "dense":
        return cin * cout
    oh = (hw + 2 * ((k - 1) // 2) - k) // stride + 1
    return cout * oh * oh * (cin // groups) * k * k


RUNTIME_SYMBOLS = ("model_run", "ep_workspace_set", "TVMBackendAllocWorkspace",
                   "TVMBackendFreeWorkspace")


def runtime_code_bytes(elf: Path) -> int:
    """Code of the generated driver and the workspace shim (what runs besides the kernels)."""
    from elftools.elf.elffile import ELFFile

    with open(elf, "rb") as f:
        symtab = ELFFile(f).get_section_by_name(".symtab")
        return sum(s["st_size"] for s in symtab.iter_symbols() if s.name in RUNTIME_SYMBOLS)


def run_target(target: str, layers: dict, work: Path, samples: int = 2) -> dict:
    from edgeprune.compile import compile_model
    from edgeprune.simulate import simulate

    per_layer, code, arena, exact, mismatches, kernels, runtime = {}, 0, 0, True, 0, {}, 0
    for name, spec in layers.items():
        qdir = layer_qmodel(*spec).save(work / f"{name}-q")
        out = work / f"{name}-{target}"
        build = compile_model(str(qdir), target, out, force=True, log=lambda *a: None)
        res, _ = simulate(out, samples=samples, seed=1)
        per_layer[name] = sum(l["instructions"] for l in res["layers"])
        kernels[name] = [l["name"] for l in res["layers"]]
        code += build["memory"]["kernels_bytes"]
        runtime = max(runtime, runtime_code_bytes(out / build["firmware"]))
        arena = max(arena, build["arena_bytes"])
        mismatches += res["mismatches"]
        exact &= bool(res["outputs_match"])
        print(f"  {target} {name}: {per_layer[name]:,} instructions "
              f"({per_layer[name] / macs(*spec):.2f}/MAC), mismatches {res['mismatches']}", flush=True)
    total = sum(per_layer.values())
    ref = CMSIS_NN.get(target, {})
    result = {"layers": per_layer, "total_instructions": total, "code_bytes": code,
              "runtime_code_bytes": runtime,
              "arena_bytes": arena, "bit_exact": exact, "mismatches": mismatches,
              "instructions_per_mac": {n: round(per_layer[n] / macs(*layers[n]), 3) for n in layers},
              "kernels": kernels, "macs": sum(macs(*s) for s in layers.values()),
              "counter": "QEMU TCG plugin, retired instructions, first inference"}
    if "total" in ref and len(layers) == len(LAYERS):
        result["vs_cmsis_nn"] = round(total / ref["total"], 3)
    per = {n: round(per_layer[n] / ref[n], 3) for n in layers if n in ref}
    if per:  # the goal: no layer above CMSIS-NN
        result["vs_cmsis_nn_layers"] = per
        result["layers_above_cmsis_nn"] = [n for n, r in per.items() if r > 1]
    return result


NETWORKS = ["resnet8", "dscnn"]


def network_qmodel(name: str, seed: int = 0):
    """A zoo network, PTQ-quantized to int8 on seeded uniform inputs (instruction counts do not
    depend on the weights' values; bit-exactness is checked all the same)."""
    from edgeprune import models
    from edgeprune.quantize import ptq

    model, shape = models.build(name, seed=seed)
    calib = np.random.default_rng(seed).random((64, *shape[1:]), dtype=np.float32)
    return ptq.quantize_ptq(model, shape, calib)


def run_network(target: str, name: str, work: Path, specialized: bool = True) -> dict:
    """Whole-network instructions; specialized=False measures TVM's default lowering instead."""
    import edgeprune.kernels as kernels
    from edgeprune.compile import compile_model
    from edgeprune.simulate import simulate

    qdir = network_qmodel(name).save(work / f"{name}-q")
    out = work / f"{name}-{target}-{int(specialized)}"
    original = kernels.specialize_int8
    if not specialized:
        kernels.specialize_int8 = lambda mod, **kw: mod
    try:
        build = compile_model(str(qdir), target, out, force=True, log=lambda *a: None)
    finally:
        kernels.specialize_int8 = original
    res, _ = simulate(out, samples=2, seed=1)
    print(f"  {target} {name}{'' if specialized else ' (TVM default)'}: "
          f"{res['instructions']:,} instructions, mismatches {res['mismatches']}", flush=True)
    return {"instructions": res["instructions"], "bit_exact": bool(res["outputs_match"]),
            "code_bytes": build["memory"]["kernels_bytes"], "arena_bytes": build["arena_bytes"]}


def main(quick: bool = False, targets: list[str] | None = None) -> dict:
    """`targets`: measure only these; their entries replace those in the existing JSON."""
    from edgeprune.errors import EdgepruneError
    from edgeprune.targets import target_names

    known = set(target_names())
    subset = targets is not None
    targets = [t for t in (targets or TARGETS) if t in known]
    if quick:
        targets = targets[:1]
    results = json.loads(RESULTS.read_text()) if subset and RESULTS.exists() else {}
    with tempfile.TemporaryDirectory(prefix="ep-kernels-") as tmp:
        for t in targets:
            results[t] = run_target(t, LAYERS, Path(tmp))
            nets = {}
            for name in NETWORKS[:1] if quick else NETWORKS:
                nets[name] = run_network(t, name, Path(tmp))
                try:
                    nets[name]["tvm_default_instructions"] = \
                        run_network(t, name, Path(tmp), specialized=False)["instructions"]
                except EdgepruneError as e:  # e.g. TVM's default scratch exceeds the SRAM
                    nets[name]["tvm_default_instructions"] = None
                    nets[name]["tvm_default_error"] = str(e).split(": ", 1)[-1]
                    print(f"  {t} {name} (TVM default): {e}", flush=True)
            results[t]["networks"] = nets
    if not quick:
        write_result(RESULTS, results)
    return results


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="issue 9's kernel benchmark (see the docstring)")
    ap.add_argument("--targets", help="comma-separated subset of " + ",".join(TARGETS)
                    + "; their results replace those in bench/results/kernels.json")
    args = ap.parse_args()
    print(json.dumps(main(targets=args.targets.split(",") if args.targets else None), indent=1))
