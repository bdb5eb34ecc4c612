"""MACs and parameter counts of a module at a static input shape.

Counted by running one forward pass with hooks, so it follows whatever the model really does
(grouped convs, strides, pruned widths). MACs are the multiply-accumulates of Conv and Linear
modules (functional matmuls are not seen); normalisation, activations and pooling are not
counted, as is usual in the pruning literature. Counts are for one sample whatever the batch.
"""

from __future__ import annotations

import torch
import torch.nn as nn


def _conv_macs(m: nn.Module, out: torch.Tensor) -> int:
    per_output = (m.in_channels // m.groups) * int(torch.tensor(m.kernel_size).prod())
    return int(out[0].numel()) * per_output


def layer_macs(model: nn.Module, input_shape: tuple[int, ...]) -> dict[str, int]:
    """MACs of every Conv/Linear layer (module name -> MACs for one sample)."""
    result: dict[str, int] = {}
    hooks = []

    def hook(name):
        def fn(m, inp, out):
            if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
                macs = _conv_macs(m, out)
            else:  # Linear: one MAC per weight per row of the input (batch divided out)
                rows = int(inp[0].numel() // inp[0].shape[0] // m.in_features)
                macs = rows * m.in_features * m.out_features
            result[name] = result.get(name, 0) + macs
        return fn
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
            hooks.append(m.register_forward_hook(hook(name)))
    was = model.training
    try:
        model.eval()
        p = next(iter(model.parameters()), None)
        x = torch.zeros(tuple(input_shape), dtype=p.dtype if p is not None else torch.float32)
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
        model.train(was)
    return result


def count(model: nn.Module, input_shape: tuple[int, ...]) -> tuple[int, int]:
    """(MACs for one sample, number of parameters)."""
    macs = sum(layer_macs(model, input_shape).values())
    params = sum(p.numel() for p in model.parameters())
    return int(macs), int(params)
