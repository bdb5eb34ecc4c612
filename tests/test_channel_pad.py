"""Constant channels padded around a tensor's: CIFAR ResNet's "option A" shortcut (the maps
subsampled, zero channels around them, added to the next stage's) prunes the residual streams
through it, from torch and from ONNX."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from checks import bit_exact, conv_widths, pruned_equivalently, read_back
from edgeprune.quantize import ptq

torch.set_num_threads(1)


class BlockA(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.c1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.b1 = nn.BatchNorm2d(cout)
        self.c2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.b2 = nn.BatchNorm2d(cout)
        self.pad = (cout - cin) // 2 if stride != 1 or cin != cout else None

    def forward(self, x):
        y = self.b2(self.c2(F.relu(self.b1(self.c1(x)))))
        if self.pad is not None:
            x = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad), "constant", 0)
        return F.relu(y + x)


class ResNetA(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.blocks = nn.Sequential(BlockA(8, 8, 1), BlockA(8, 16, 2), BlockA(16, 32, 2))
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = self.blocks(F.relu(self.bn(self.stem(x))))
        return self.fc(F.avg_pool2d(x, x.size(3)).view(x.size(0), -1))


def _pads(model) -> list[tuple[int, ...]]:
    return [tuple(n.args[1]) for n in model.graph.nodes if n.target is F.pad]


@pytest.mark.parametrize("from_onnx", [False, True])
def test_option_a_shortcuts_prune_the_residual_streams_and_run_bit_exact(from_onnx, tmp_path):
    torch.manual_seed(0)
    model = ResNetA().eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    shape, x = (1, 3, 16, 16), torch.randn(8, 3, 16, 16)
    if from_onnx:
        model = read_back(model, shape, x, tmp_path, exporters=(False,))
    pruned, record = pruned_equivalently(model, shape, x, ratios=0.5)
    widths = conv_widths(pruned)
    # the three streams are one group of 32 units (each stage's channels hold the last
    # stage's in the middle), half of it kept; the blocks' inner convs halve
    stream = [widths[i] for i in (0, 2, 4, 6)]      # stem, then each block's second conv
    assert widths[1::2] == [4, 8, 16], widths
    assert stream[0] == stream[1] and 0 < stream[1] < 8 and stream[3] == 16, widths
    # each pad adds the next stage's kept channels that the last stage's did not bring
    (a1, b1), (a2, b2) = [p[-2:] for p in _pads(pruned)]
    assert a1 + b1 == stream[2] - stream[1] and a2 + b2 == stream[3] - stream[2]
    qm = ptq.quantize_ptq(pruned, shape, torch.randn(64, 3, 16, 16).numpy())
    bit_exact(qm, x[:4].numpy(), "cortex-m4", tmp_path / "m4", like=pruned, tol=0.1)


def test_padded_channels_no_layer_meets_are_kept():
    """Zeros padded around the input's channels and read by a conv: nothing ties them to a
    layer's channels, so there is nothing to prune them with; the conv's outputs prune."""
    class Padded(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1 = nn.Conv2d(5, 8, 3)
            self.c2 = nn.Conv2d(8, 4, 3)

        def forward(self, x):
            return self.c2(F.relu(self.c1(F.pad(x, (0, 0, 0, 0, 1, 1)))))

    torch.manual_seed(0)
    pruned, _ = pruned_equivalently(Padded().eval(), (1, 3, 8, 8), torch.randn(2, 3, 8, 8))
    assert conv_widths(pruned) == [4, 4] and pruned.c1.in_channels == 5
    assert _pads(pruned) == [(0, 0, 0, 0, 1, 1)]
