"""Layers edgeprune rewrites into the forms every stage already knows.

A transposed convolution (nn.ConvTranspose2d, ONNX ConvTranspose: the upsampling layer of conv
autoencoders and decoders) is the convolution it equals: zeros inserted between the input's
pixels (its stride), padded by k - 1 - p on each side (plus output_padding at the end), then a
stride-1 Conv2d with the kernel flipped and its in/out axes swapped. After the rewrite the
pruner cuts a real Conv2d, fine-tuning trains it, and the int8 stages run it in their conv
kernels; only the zero insertion is new (the int8 `dilate` op, which inserts the zero point).
"""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from .errors import EdgepruneError


def zero_insert(x: torch.Tensor, sh: int, sw: int) -> torch.Tensor:
    """(N, C, H, W) -> (N, C, (H - 1) * sh + 1, (W - 1) * sw + 1): sh - 1 rows and sw - 1
    columns of zeros between neighbouring pixels. Written as the transposed convolution it
    is (1x1 kernels of ones, one per channel), so that it exports to one ONNX node that
    edgeprune reads back as this function."""
    c = int(x.shape[1])   # static: the ONNX exporter needs the kernel's shape
    return F.conv_transpose2d(x, torch.ones(c, 1, 1, 1, dtype=x.dtype), stride=(sh, sw),
                              groups=c)


fx.wrap("zero_insert")   # one node in traced graphs (the pruner and quantizer know it)


class ConvTransposeAsConv(nn.Module):
    """A 2-D transposed convolution (groups 1, dilation 1) as zero insertion, padding and a
    stride-1 Conv2d (`conv`) with the same function."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, stride, pads,
                 output_padding=(0, 0)):
        """weight: the transposed convolution's (in, out, kh, kw); pads: its (top, left,
        bottom, right) input padding, each at most the kernel size - 1."""
        super().__init__()
        c_in, c_out, kh, kw = weight.shape
        t, l, b, r = (int(p) for p in pads)
        oph, opw = (int(p) for p in output_padding)
        if max(t, b) > kh - 1 or max(l, r) > kw - 1:
            raise EdgepruneError(f"a transposed convolution with padding {[t, l, b, r]} larger "
                                 f"than its kernel {[kh, kw]} - 1 is not supported")
        self.stride = (int(stride[0]), int(stride[1]))
        self.pads = (kw - 1 - l, kw - 1 - r + opw, kh - 1 - t, kh - 1 - b + oph)
        self.conv = nn.Conv2d(c_in, c_out, (kh, kw), bias=bias is not None)
        with torch.no_grad():
            self.conv.weight.copy_(weight.transpose(0, 1).flip(2, 3))
            if bias is not None:
                self.conv.bias.copy_(bias)

    @classmethod
    def from_module(cls, m: nn.ConvTranspose2d, where: str) -> ConvTransposeAsConv:
        if m.groups != 1 or tuple(m.dilation) != (1, 1) or m.padding_mode != "zeros":
            raise EdgepruneError(f"{where}: ConvTranspose2d with groups {m.groups}, dilation "
                                 f"{tuple(m.dilation)}, padding mode '{m.padding_mode}' is not "
                                 "supported (groups 1, dilation 1, zero padding)")
        ph, pw = m.padding
        try:
            return cls(m.weight.detach(), None if m.bias is None else m.bias.detach(), m.stride,
                       (ph, pw, ph, pw), m.output_padding)
        except EdgepruneError as e:
            raise EdgepruneError(f"{where}: {e}") from None

    def forward(self, x):
        if self.stride != (1, 1):
            x = zero_insert(x, *self.stride)
        return self.conv(F.pad(x, self.pads))


def lower_transposed_convs(model: nn.Module) -> nn.Module:
    """`model` with every nn.ConvTranspose2d replaced (in place) by its ConvTransposeAsConv;
    a 1-D one is refused by name."""
    for name, m in list(model.named_modules()):
        if isinstance(m, nn.ConvTranspose1d):
            raise EdgepruneError(f"layer '{name}': ConvTranspose1d is not supported")
        if isinstance(m, nn.ConvTranspose2d):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child,
                    ConvTransposeAsConv.from_module(m, f"layer '{name}'"))
    return model
