"""Finer structured sparsity inside the convolutions that channel pruning keeps (Anwar et al.,
"Structured pruning of deep convolutional neural networks", 2017):

* **kernel-wise**: whole k×k kernels (one input channel of one filter) are removed; every filter
  of a layer keeps the same number of kernels, so the code generator can loop over a fixed-length
  list of input channels per output channel;
* **intra-kernel strided**: inside every kernel of a layer only the positions p (row-major over
  k×k) with p % stride == offset are kept; one (stride, offset) per layer, the offset chosen to
  keep the most weight magnitude, so the generator can skip a regular pattern of taps.

The model stays a dense Conv2d with zeros where the pattern removes weights (masks are enforced
during fine-tuning with torch.nn.utils.prune and made permanent by `finalize`); the pattern itself
goes into the pruning record for the code generator.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.utils.prune as torch_prune

from ..errors import EdgepruneError


def check(kernel_ratio: float, intra_stride: int) -> None:
    if not 0.0 <= kernel_ratio < 1.0:
        raise EdgepruneError(f"kernel ratio {kernel_ratio} is outside [0, 1) (it is the fraction "
                             "of kernels removed per filter)", stage="prune")
    if int(intra_stride) != intra_stride or intra_stride < 1:
        raise EdgepruneError(f"intra-kernel stride {intra_stride} must be an integer >= 1",
                             stage="prune")


def _kernel_mask(w: torch.Tensor, ratio: float) -> tuple[torch.Tensor, list[list[int]]]:
    """[O, I] mask removing the floor(ratio * I) lowest-L1 kernels of every filter."""
    o, i = w.shape[:2]
    drop = int(ratio * i + 1e-9)
    norms = w.abs().sum((2, 3))
    mask = torch.ones(o, i)
    kept = []
    for f in range(o):
        order = torch.argsort(norms[f], stable=True)
        mask[f, order[:drop]] = 0
        kept.append(sorted(int(j) for j in order[drop:]))
    return mask, kept


def _strided_mask(w: torch.Tensor, stride: int) -> tuple[torch.Tensor, int, list[int]]:
    """[kh, kw] mask keeping positions p % stride == offset, the offset with most |w| kept."""
    kh, kw = w.shape[2:]
    mass = w.abs().sum((0, 1)).flatten()
    pos = torch.arange(kh * kw)
    offset = max(range(min(stride, kh * kw)), key=lambda o: float(mass[pos % stride == o].sum()))
    keep = pos % stride == offset
    return keep.float().view(kh, kw), offset, [int(p) for p in pos[keep]]


def apply(model: nn.Module, kernel_ratio: float = 0.0, intra_stride: int = 1) -> dict:
    """Zero kernel-wise / intra-kernel strided patterns in every dense Conv2d of `model` (masks
    stay attached until `finalize`) and return {layer: pattern} for the record."""
    check(kernel_ratio, intra_stride)
    if kernel_ratio == 0.0 and intra_stride == 1:
        return {}
    out = {}
    for name, m in model.named_modules():
        if not isinstance(m, nn.Conv2d) or m.groups != 1:
            continue  # depthwise/grouped kernels are already one input channel per filter
        w = m.weight.detach()
        mask = torch.ones_like(w)
        entry = {}
        if kernel_ratio > 0 and w.shape[1] > 1:
            kmask, kept = _kernel_mask(w, kernel_ratio)
            mask *= kmask[:, :, None, None]
            entry["kernel"] = {"kernels_per_filter": len(kept[0]), "in_channels": w.shape[1],
                               "kept_inputs": kept}
        if intra_stride > 1 and w.shape[2] * w.shape[3] > 1:
            smask, offset, kept_pos = _strided_mask(w * mask, intra_stride)
            mask *= smask
            entry["intra_kernel"] = {"stride": intra_stride, "offset": offset,
                                     "kernel_size": list(w.shape[2:]), "kept_positions": kept_pos}
        if entry:
            entry["zero_fraction"] = round(1.0 - float(mask.mean()), 6)
            torch_prune.custom_from_mask(m, "weight", mask)
            out[name] = entry
    return out


def stride_layers(model: nn.Module, strides: dict[str, int]) -> dict:
    """Zero, for good, every window tap but every s-th (the offset keeping the most |w|) in each
    named Conv2d {layer: s} of `model`; returns {layer: pattern} like `apply`. The feedback
    search sets this per layer where measurement says it pays (training then keeps the zeros:
    held_taps)."""
    modules = dict(model.named_modules())
    out = {}
    for name, s in strides.items():
        m = modules.get(name)
        if not (isinstance(m, nn.Conv2d) and m.groups == 1 and m.weight[0, 0].numel() > 1):
            raise EdgepruneError(f"layer {name}: an intra-kernel pattern needs a dense Conv2d "
                                 "with a window larger than 1x1", stage="prune")
        check(0.0, s)
        with torch.no_grad():
            smask, offset, kept_pos = _strided_mask(m.weight, s)
            m.weight.mul_(smask.to(m.weight.dtype))
        out[name] = {"intra_kernel": {"stride": s, "offset": offset,
                                      "kernel_size": list(m.weight.shape[2:]),
                                      "kept_positions": kept_pos}}
    return out


def held_taps(model: nn.Module):
    """A function that zeroes again, in every conv weight of `model` (a 4-D parameter: a Conv2d's,
    or a folded graph's as QAT trains it), the window taps that are zero in every filter now (an
    intra-kernel pattern), or None when there are none. Training calls it after each step, so
    fine-tuning keeps a pattern that the code generator turns into skipped MACs
    (kernels/int8.py) without masks attached to the model. Masked weights (`*_orig`, with
    torch.nn.utils.prune) are left to their masks."""
    held = []
    for name, w in model.named_parameters():
        if w.dim() == 4 and w.shape[2] * w.shape[3] > 1 and not name.endswith("_orig"):
            used = w.detach().ne(0).any(dim=1).any(dim=0)
            if used.any() and not used.all():   # an all-zero conv (zero init) must learn
                held.append((w, used.to(w.dtype)))
    if not held:
        return None

    def zero():
        with torch.no_grad():
            for w, keep in held:
                w.mul_(keep)
    return zero


def finalize(model: nn.Module) -> nn.Module:
    """Make attached pattern masks permanent (plain weights with zeros)."""
    for m in model.modules():
        if torch_prune.is_pruned(m) and hasattr(m, "weight_mask"):
            torch_prune.remove(m, "weight")
    return model
