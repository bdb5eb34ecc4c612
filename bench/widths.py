"""What a pruned width costs on each target: the evidence for the targets' channel_multiple.

ResNet-8 (untrained weights: the counts do not depend on what it learnt) with every channel
group cut to half its width plus d channels (16 -> 8 + d, 32 -> 16 + d, 64 -> 32 + d), d from
-2 to 4, quantized to int8 (PTQ on 64 Fashion-MNIST images) and measured as the feedback search
measures a candidate (edgeprune.feedback.measure: the profiler over QEMU, exact retired
instructions, flash and SRAM from the ELF). Odd d makes every group's width odd.

Writes bench/results/widths.json: {target: {d: {"widths", "instructions", "flash_kb"}},
"added_channel_cost": {target: {"odd": mean instructions of a step to an odd width, "even":
of a step to an even one}}}.
Run: python -m bench.run widths  (about 3 minutes; --quick: the M7 only).
"""

from pathlib import Path

from bench.run import write_result

RESULTS = Path(__file__).parent / "results" / "widths.json"
OFFSETS = range(-2, 5)


def main(quick: bool = False) -> dict:
    import numpy as np
    import torch

    from edgeprune import data
    from edgeprune.feedback.measure import measure_model
    from edgeprune.models import build
    from edgeprune.prune import DepGraph, prune
    from edgeprune.targets import target_names

    torch.set_num_threads(1)
    x = data.fashion_mnist().x_test[:64].reshape(64, 1, 28, 28).astype(np.float32)
    model, shape = build("resnet8", (1, 1, 28, 28))
    model.eval()
    example = torch.from_numpy(x[:1])
    full = {g.name: g.units for g in DepGraph(model, example).groups}
    targets = ["cortex-m7"] if quick else target_names()
    result: dict = {"model": "resnet8", "groups": full, "offsets": list(OFFSETS)}
    steps: dict = {}
    for name in targets:
        rows = {}
        for d in OFFSETS:
            widths = {g: w // 2 + d for g, w in full.items()}
            cut, _ = prune(model, example, "l1", ratios={g: 1 - widths[g] / full[g] for g in full})
            c = measure_model(cut, shape, name, x)
            rows[d] = {"widths": widths, "instructions": c["instructions"],
                       "flash_kb": round(c["flash_kb"], 2)}
            print(name, d, rows[d]["instructions"], rows[d]["flash_kb"], flush=True)
        result[name] = rows
        # the cost of one more channel per group, stepping to an odd or to an even width
        ds = list(OFFSETS)
        # (every full width is even, so a width's parity is d's)
        odd = [rows[b]["instructions"] - rows[a]["instructions"] for a, b in zip(ds, ds[1:])
               if b % 2]
        even = [rows[b]["instructions"] - rows[a]["instructions"] for a, b in zip(ds, ds[1:])
                if b % 2 == 0]
        steps[name] = {"odd": round(float(np.mean(odd))), "even": round(float(np.mean(even)))}
        result["added_channel_cost"] = steps
        write_result(RESULTS, result)
    return result
