"""Finer structured sparsity inside the convolutions that channel pruning keeps (Anwar et al.,
"Structured pruning of deep convolutional neural networks", 2017):

* **kernel-wise**: whole k×k kernels (one input channel of one filter) are removed, in tiles of
  the int8 conv kernel (kernels/int8.py): a block of KERNEL_TILE[0] neighbouring filters drops
  the same pairs of neighbouring input channels, which that kernel's MAC loop then skips (it
  multiplies one channel pair for a block of filters at a time, so a kernel removed from one
  filter alone saves nothing on the chip); every block keeps the same number of pairs;
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
import torch.nn.functional as F
import torch.nn.utils.prune as torch_prune

from ..errors import EdgepruneError


def check(kernel_ratio: float, intra_stride: int) -> None:
    if not 0.0 <= kernel_ratio < 1.0:
        raise EdgepruneError(f"kernel ratio {kernel_ratio} is outside [0, 1) (it is the fraction "
                             "of kernels removed per filter)", stage="prune")
    if int(intra_stride) != intra_stride or intra_stride < 1:
        raise EdgepruneError(f"intra-kernel stride {intra_stride} must be an integer >= 1",
                             stage="prune")


# (filters, input channels) removed together: the int8 conv kernel's block of output channels
# (int8.OC_BLOCK) and its SMLAD pair of input channels
KERNEL_TILE = (4, 2)


def _kernel_mask(w: torch.Tensor, ratio: float) -> tuple[torch.Tensor, list[list[int]]]:
    """[O, I] mask removing, in each block of KERNEL_TILE[0] filters, the floor(ratio * P)
    channel pairs (of P) with the least L1 over the block."""
    o, i = w.shape[:2]
    fb, cb = KERNEL_TILE
    pairs = -(-i // cb)
    drop = int(ratio * pairs + 1e-9)
    norms = F.pad(w.abs().sum((2, 3)), (0, pairs * cb - i))          # [O, pairs * cb]
    mask = torch.ones(o, pairs * cb)
    for f0 in range(0, o, fb):
        mass = norms[f0:f0 + fb].reshape(-1, pairs, cb).sum((0, 2))
        for p in torch.argsort(mass, stable=True)[:drop].tolist():
            mask[f0:f0 + fb, p * cb:(p + 1) * cb] = 0
    mask = mask[:, :i]
    kept = [[int(j) for j in torch.nonzero(mask[f]).flatten()] for f in range(o)]
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
            entry["kernel"] = {"kernels_per_filter": min(map(len, kept)),
                               "in_channels": w.shape[1], "tile": list(KERNEL_TILE),
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
    held_patterns)."""
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


def _used_tiles(w: torch.Tensor) -> torch.Tensor:
    """[O, I, 1, 1] mask of w's kernels in KERNEL_TILEs with some non-zero weight."""
    o, i = w.shape[:2]
    fb, cb = KERNEL_TILE
    nz = F.pad(w.detach().ne(0).any(dim=3).any(dim=2), (0, -i % cb, 0, -o % fb))
    tiles = nz.reshape(-(-o // fb), fb, -(-i // cb), cb).any(dim=3).any(dim=1)
    return tiles.repeat_interleave(fb, 0).repeat_interleave(cb, 1)[:o, :i, None, None]


def held_patterns(model: nn.Module):
    """A function that zeroes again, in every conv weight of `model` (a 4-D parameter: a Conv2d's,
    or a folded graph's as QAT trains it), the window taps that are zero in every filter now (an
    intra-kernel pattern) and the kernel tiles that are all zero (kernel-wise), or None when
    there are none. Training calls it after each step, so fine-tuning keeps the patterns that
    the code generator turns into skipped MACs (kernels/int8.py) without masks attached to the
    model. Masked weights (`*_orig`, with torch.nn.utils.prune) are left to their masks."""
    held = []
    for name, w in model.named_parameters():
        if w.dim() != 4 or name.endswith("_orig"):
            continue
        keep = torch.ones((1, 1) + tuple(w.shape[2:]), dtype=torch.bool)
        if w.shape[2] * w.shape[3] > 1:
            keep = w.detach().ne(0).any(dim=1).any(dim=0)[None, None]
        keep = keep & _used_tiles(w)
        if keep.any() and not keep.all():   # an all-zero conv (zero init) must learn
            held.append((w, keep.to(w.dtype)))
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
