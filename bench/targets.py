"""Issue 6: the int8 ResNet-8 (PTQ) on every target: instructions per inference, flash, SRAM.

The model is lowered once (cortex-m7 build) and the same C library is cross-compiled for every
target with `retarget_build`; each firmware runs in the target's QEMU on 2 samples, checked bit
for bit against the numpy golden model. Instructions are exact retired instructions from the
QEMU plugin (QEMU models no pipeline: not cycles); ms_at_clock = instructions / chip clock, a
1-instruction-per-cycle estimate. Cortex-A flash/SRAM are a static glibc Linux binary's
(text+data, data+bss), not comparable with the bare-metal MCUs' images.

Writes bench/results/targets.json: {target: {"instructions", "flash_bytes", "sram_bytes", ...}}.
Run: python -m bench.run targets  (about 2 minutes).
"""

import json
import tempfile
from pathlib import Path

from bench.run import write_result

RESULTS = Path(__file__).parent / "results" / "targets.json"
MODEL = "resnet8"


def main(quick: bool = False) -> dict:
    from bench.kernels import network_qmodel
    from edgeprune.compile import compile_model, load_build, retarget_build
    from edgeprune.simulate import simulate
    from edgeprune.targets import load_target, target_names

    targets = target_names()
    if quick:
        targets = ["cortex-m7", "riscv32", "cortex-a53"]
    results = {}
    with tempfile.TemporaryDirectory(prefix="ep-targets-") as tmp:
        work = Path(tmp)
        qdir = network_qmodel(MODEL).save(work / f"{MODEL}-q")
        ref = work / f"{MODEL}-cortex-m7"
        compile_model(str(qdir), "cortex-m7", ref, log=lambda *a: None)
        for name in targets:
            out = ref if name == "cortex-m7" else work / f"{MODEL}-{name}"
            if name != "cortex-m7":
                retarget_build(ref, name, out)
            res, _ = simulate(out, samples=2, seed=1)
            t = load_target(name)
            results[name] = {
                "part": t.chip["part"], "qemu": f"{t.qemu['binary']} {t.qemu['machine']}",
                "instructions": res["instructions"], "bit_exact": res["mismatches"] == 0,
                "ms_at_clock": round(1000.0 * res["instructions"] / t.chip["clock_hz"], 3),
                "flash_bytes": res["flash_bytes"], "sram_bytes": res["sram_bytes"],
                "weights_bytes": res["weights_bytes"], "arena_bytes": res["arena_bytes"],
                "kernels_bytes": load_build(out)["memory"]["kernels_bytes"],
                "stack_used_bytes": res["stack_used_bytes"],
            }
            print(f"  {name}: {res['instructions']:,} instructions, flash {res['flash_bytes']:,} B, "
                  f"SRAM {res['sram_bytes']:,} B, mismatches {res['mismatches']}", flush=True)
    if not quick:
        write_result(RESULTS, results)
    return results


if __name__ == "__main__":
    print(json.dumps(main(), indent=1))
