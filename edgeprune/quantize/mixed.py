"""Per-layer word lengths from a sensitivity measure, within what the target does well.

Sensitivity of a choice = how far the integer model's outputs move when only that choice is
applied to the all-int8 model: ``||y_choice - y_int8||^2 / ||y_int8||^2`` over the dequantized
outputs of the golden model (so it measures exactly what will run on the chip, and it is
smooth, unlike accuracy on a few hundred samples).

`choose` then works in two greedy passes, each checked by accuracy on held-out samples:
1. activations: while the int8 model loses more than `max_drop` points against float, the
   tensor whose int16 version brings the outputs closest to the float network's becomes int16
   (only if the target lists 16-bit activations and the int32 accumulators cannot overflow);
2. weights: candidate moves (layer -> fewer bits) are tried in order of sensitivity per flash
   byte saved; a move is kept if accuracy stays within `max_drop` points of the model before
   pass 2.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..errors import EdgepruneError
from . import reference
from .ptq import INPUT, IRNet, to_qmodel
from .qmodel import SAME_QPARAMS, QuantModel


@dataclass
class Candidate:
    layer: str
    fmt: str
    bits: int
    sensitivity: float
    bytes_saved: int


def weight_options(target_bits: list[int], fmt: str = "int") -> list[tuple[str, int]]:
    """Sub-8-bit (format, bits) a target supports, fewest bits last.

    fmt "pow2" replaces 4-bit uniform levels by 4-bit power-of-two codes; 2 bits are always
    ternary-valued ({-1, 0, 1} is both the 2-bit uniform and the ternary level set)."""
    opts = []
    for b in sorted({int(b) for b in target_bits if int(b) < 8}, reverse=True):
        if fmt == "pow2" and b == 4:
            opts.append(("pow2", 4))
        elif b >= 2:
            opts.append(("int", b))
    return opts


def _outputs(qm: QuantModel, x: np.ndarray) -> np.ndarray:
    return reference.predict(qm, x).reshape(len(x), -1).astype(np.float64)


def float_outputs(net: IRNet, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
    import torch
    saved, net.qconfig = net.qconfig, None
    net.eval()
    with torch.no_grad():
        out = [net(torch.from_numpy(np.ascontiguousarray(x[i:i + batch_size], np.float32)))
               .reshape(min(batch_size, len(x) - i), -1).double().numpy()
               for i in range(0, len(x), batch_size)]
    net.qconfig = saved
    return np.concatenate(out)


def _distortion(y: np.ndarray, ref: np.ndarray) -> float:
    return float(((y - ref) ** 2).sum() / max((ref ** 2).sum(), 1e-30))


def _accuracy_of(y: np.ndarray, labels: np.ndarray) -> float:
    from ..task import score
    return score(y, labels)


def _try_export(net, ranges, weight_cfg, act_dtypes, quantized_weights=None
                ) -> QuantModel | None:
    """The QuantModel, or None when a choice cannot be represented (int32 overflow)."""
    try:
        return to_qmodel(net, ranges, weight_cfg, act_dtypes, quantized_weights)
    except EdgepruneError:
        return None


def choose(net: IRNet, ranges: dict, x: np.ndarray, y: np.ndarray, float_acc: float,
           weight_bits: list[int], activation_bits: list[int], fmt: str = "int",
           max_drop: float = 1.0, keep_first_last: bool = True, max_int16: int = 4,
           log: Callable[[str], None] = lambda m: None
           ) -> tuple[dict[str, tuple[str, int]], dict[str, str], dict]:
    """(weight_cfg, act_dtypes, record) for `to_qmodel`; record holds every measured number."""
    if len(x) == 0:
        raise EdgepruneError("mixed precision needs evaluation samples")
    weight_cfg = {n.name: ("int", 8) for n in net.weight_nodes()}
    act_dtypes: dict[str, str] = {}
    base = to_qmodel(net, ranges, weight_cfg, act_dtypes)
    y8 = _outputs(base, x)
    acc8 = _accuracy_of(y8, y)
    record = {"int8_accuracy": acc8, "max_drop": max_drop, "activations": [], "weights": []}

    # 1. activations that need 16 bits
    if 16 in activation_bits:
        tensors = [INPUT] + [n.output for n in net.nodes if n.kind not in SAME_QPARAMS]
        yf = float_outputs(net, x)
        acc = acc8
        cur_y = y8
        while float_acc - acc > max_drop and len(act_dtypes) < max_int16:
            best = None
            for t in tensors:
                if t in act_dtypes:
                    continue
                qm = _try_export(net, ranges, weight_cfg, {**act_dtypes, t: "int16"})
                if qm is None:
                    continue
                yt = _outputs(qm, x)
                gain = _distortion(cur_y, yf) - _distortion(yt, yf)
                if best is None or gain > best[0]:
                    best = (gain, t, yt)
            if best is None:
                break
            _, t, cur_y = best
            act_dtypes[t] = "int16"
            new_acc = _accuracy_of(cur_y, y)
            record["activations"].append({"tensor": t, "accuracy": new_acc})
            log(f"activation {t}: int16 (accuracy {acc:.2f} -> {new_acc:.2f} %)")
            acc = new_acc
        base = to_qmodel(net, ranges, weight_cfg, act_dtypes)
        y8 = _outputs(base, x)
        acc8 = _accuracy_of(y8, y)
    record["accuracy_before_weights"] = acc8

    # 2. weights: sensitivity of each (layer, fewer bits), alone
    names = [n.name for n in net.weight_nodes()]
    frozen = {names[0], names[-1]} if keep_first_last and len(names) > 2 else set()
    options = weight_options(weight_bits, fmt)
    cands: list[Candidate] = []
    for name in names:
        if name in frozen:
            continue
        n_w = int(net.weight[name].numel())
        for f, b in options:
            qm = _try_export(net, ranges, {**weight_cfg, name: (f, b)}, act_dtypes)
            if qm is None:
                continue
            s = _distortion(_outputs(qm, x), y8)
            cands.append(Candidate(name, f, b, s, n_w - (n_w * b + 7) // 8))
    cands.sort(key=lambda c: c.sensitivity / max(c.bytes_saved, 1))
    floor = acc8 - max_drop
    acc = acc8
    for c in cands:
        cur_f, cur_b = weight_cfg[c.layer]
        if c.bits >= cur_b:
            continue
        trial = {**weight_cfg, c.layer: (c.fmt, c.bits)}
        qm = _try_export(net, ranges, trial, act_dtypes)
        kept = False
        if qm is not None:
            a = _accuracy_of(_outputs(qm, x), y)
            if a >= floor:
                weight_cfg, acc, kept = trial, a, True
        record["weights"].append({"layer": c.layer, "format": c.fmt, "bits": c.bits,
                                  "sensitivity": c.sensitivity, "bytes_saved": c.bytes_saved,
                                  "kept": kept, "accuracy": acc})
        if kept:
            log(f"layer {c.layer}: {c.fmt}{c.bits} (sensitivity {c.sensitivity:.3g}, "
                f"accuracy {acc:.2f} %)")
    record["final_accuracy"] = acc
    return weight_cfg, act_dtypes, record
