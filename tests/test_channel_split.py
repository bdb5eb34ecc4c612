"""Channel splits (ShuffleNet v2's chunk and shuffle, GhostNet's cat-then-slice, split, narrow,
x[:, a:b]) through pruning, ONNX (Slice, Split) and int8 on a target."""

import numpy as np
import pytest
import torch
import torch.nn as nn

from checks import bit_exact, conv_widths, pruned_equivalently
from edgeprune.errors import EdgepruneError
from edgeprune.onnx_to_torch import onnx_to_torch
from edgeprune.quantize import ptq, reference

torch.set_num_threads(1)


def cbr(i, o, k=1, s=1, g=1, act=True):
    layers = [nn.Conv2d(i, o, k, s, k // 2, groups=g, bias=False), nn.BatchNorm2d(o)]
    return nn.Sequential(*layers, *([nn.ReLU()] if act else []))


def shuffle(x, groups=2):
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class ShuffleUnit(nn.Module):
    """ShuffleNet v2: half the channels pass, the other half go through 1x1 - dw 3x3 - 1x1."""

    def __init__(self, c):
        super().__init__()
        self.branch = nn.Sequential(cbr(c // 2, c), cbr(c, c, 3, g=c, act=False), cbr(c, c // 2))

    def forward(self, x):
        a, b = x.chunk(2, dim=1)
        return shuffle(torch.cat([a, self.branch(b)], 1))


class Ghost(nn.Module):
    """GhostNet: a primary conv, cheap depthwise 'ghosts' of it, and the first `out` of both."""

    def __init__(self, i, out):
        super().__init__()
        self.out = out
        self.primary = cbr(i, (out + 1) // 2)
        self.cheap = cbr((out + 1) // 2, (out + 1) // 2, 3, g=(out + 1) // 2)

    def forward(self, x):
        y = self.primary(x)
        return torch.cat([y, self.cheap(y)], 1)[:, :self.out]


class SplitNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = cbr(1, 16, 3, 2)
        self.unit = ShuffleUnit(16)
        self.ghost = Ghost(16, 11)
        self.a, self.b = cbr(4, 8, 3), cbr(7, 8, 3)
        self.fc = nn.Linear(17, 10)

    def forward(self, x):
        x = self.ghost(self.unit(self.stem(x)))
        p, q = torch.split(x, [4, 7], dim=1)
        y = self.a(p) + self.b(q)
        z = torch.cat([y, x.narrow(1, 2, 9)[:, ::2], x[:, -5:-1]], 1)   # 8 + 5 + 4 channels
        return self.fc(z[:, :, 1:].mean((2, 3)))                   # and a slice of the rows


def _randomize_bn(model):
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data = torch.rand(m.num_features, generator=g) + 0.5
            m.bias.data = torch.randn(m.num_features, generator=g) * 0.3
            m.running_var = torch.rand(m.num_features, generator=g) + 0.5


def test_channel_splits_prune_export_and_run_bit_exact(tmp_path):
    torch.manual_seed(0)
    model = SplitNet().eval()
    _randomize_bn(model)
    shape, x = (1, 1, 16, 16), torch.randn(8, 1, 16, 16)

    pruned, _ = pruned_equivalently(model, shape, x, criterion="l1", ratios=0.5)
    # the shuffle branch's convs and the convs after the split are cut, and both halves of
    # the stem: the shuffle ties channel j of the half that passes to the branch's channel j
    # (4 of those 8 pairs stay, 4 of the other half's 8); the ghost's channels (a strided
    # slice reads them) are kept
    widths = {n: m.out_channels for n, m in pruned.named_modules() if isinstance(m, nn.Conv2d)}
    assert widths["unit.branch.0.0"] == 8 and widths["a.0"] == 4 and widths["b.0"] == 4
    assert widths["stem.0"] == 8 and widths["unit.branch.2.0"] == 4
    assert widths["ghost.primary.0"] == 6

    torch.onnx.export(pruned, (torch.zeros(shape),), str(tmp_path / "m.onnx"), dynamo=False)
    back, _ = onnx_to_torch(tmp_path / "m.onnx")
    with torch.no_grad():
        torch.testing.assert_close(back(x), pruned(x), atol=1e-5, rtol=1e-4)

    qm = ptq.quantize_ptq(back, shape, torch.randn(64, 1, 16, 16).numpy())
    assert sum(o.kind == "slice" for o in qm.ops) == 9   # chunk, ghost, split, narrow, 4 more
    bit_exact(qm, x[:4].numpy(), "cortex-m7", tmp_path, like=pruned, tol=0.1)


def test_slices_the_pipeline_does_not_take_are_named():
    class BatchAxis(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(1, 4, 3)

        def forward(self, x):
            return self.c(x)[1:, :2, 1:].mean((2, 3))

    with pytest.raises(EdgepruneError, match="node 'getitem'.*slicing the batch axis"):
        ptq.quantize_ptq(BatchAxis().eval(), (2, 1, 8, 8), np.zeros((4, 1, 8, 8), np.float32))


class Split1d(nn.Module):
    def __init__(self):
        super().__init__()
        self.c, self.d = nn.Conv1d(1, 8, 3, padding=1), nn.Conv1d(4, 6, 3, padding=1)
        self.e = nn.Conv1d(10, 6, 3, padding=1)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        a, b = torch.relu(self.c(x)).chunk(2, 1)
        y = torch.cat([a[..., 2:], torch.relu(self.d(b))[:, :, 2:]], 1)
        return self.fc(torch.relu(self.e(y)).mean(2))


def test_splits_of_a_1d_signal_lift_prune_and_quantize():
    from edgeprune.lift1d import lift_1d

    torch.manual_seed(0)
    model = Split1d().eval()
    lifted, shape = lift_1d(model, (1, 1, 32))
    x = torch.randn(8, 1, 32)
    with torch.no_grad():
        torch.testing.assert_close(lifted(x[:, :, None]), model(x))
    pruned, _ = pruned_equivalently(lifted, shape, x[:, :, None], ratios=0.5)
    assert conv_widths(pruned) == [4, 3, 3]     # each half of c prunes: the chunk moves
    qm = ptq.quantize_ptq(pruned, shape, torch.randn(64, *shape[1:]).numpy())
    # the chunk's halves as narrows of the channels kept (a keeps 1 of its 4, b 3), then the
    # crops of the time axis
    assert [(o.attrs["axis"], o.attrs["start"]) for o in qm.ops if o.kind == "slice"] == [
        (1, 0), (1, 1), (3, 2), (3, 2)]
    xq = x[:1, :, None].numpy()
    y = reference.dequantize_output(qm, reference.run(qm, reference.quantize_input(qm, xq)))
    assert np.abs(y - pruned(x[:1, :, None]).detach().numpy()).max() < 0.1 * np.abs(y).max()


class ShuffleV2(nn.Module):
    """ShuffleNet v2: a unit that halves the maps (two branches) and one that passes half
    its channels, each followed by a channel shuffle: torchvision's view, transpose,
    contiguous and view, or nn.ChannelShuffle."""

    def __init__(self, module_shuffle: bool):
        super().__init__()
        self.stem = cbr(1, 8, 3, 2)
        self.left = nn.Sequential(cbr(8, 8, 3, 2, g=8, act=False), cbr(8, 8))
        self.right = nn.Sequential(cbr(8, 8), cbr(8, 8, 3, 2, g=8, act=False), cbr(8, 8))
        self.branch = nn.Sequential(cbr(8, 8), cbr(8, 8, 3, g=8, act=False), cbr(8, 8))
        self.shuffle = nn.ChannelShuffle(2) if module_shuffle else None
        self.fc = nn.Linear(16, 10)

    def mix(self, x):
        if self.shuffle is not None:
            return self.shuffle(x)
        n, c, h, w = x.shape
        return torch.transpose(x.view(n, 2, c // 2, h, w), 1, 2).contiguous().view(n, c, h, w)

    def forward(self, x):
        x = self.stem(x)
        x = self.mix(torch.cat([self.left(x), self.right(x)], 1))
        a, b = x.chunk(2, dim=1)
        x = self.mix(torch.cat([a, self.branch(b)], 1))
        return self.fc(x.mean((2, 3)))


@pytest.mark.parametrize("module_shuffle", [False, True])
def test_channel_shuffles_prune_their_channels_in_pairs(module_shuffle, tmp_path):
    """A shuffle moves channel j of each group together: those are one unit, so what it
    regroups prunes (each branch, the half the chunk passes) and the pruned maps still
    shuffle as two groups; before, every conv that fed a shuffle kept its channels."""
    import onnx

    from checks import saved_and_loaded
    from edgeprune.frontend import export_torch

    torch.manual_seed(0)
    model = ShuffleV2(module_shuffle).eval()
    _randomize_bn(model)
    shape, x = (1, 1, 16, 16), torch.randn(8, 1, 16, 16)
    loaded, _ = saved_and_loaded(model, shape, x, tmp_path)
    pruned, _ = pruned_equivalently(loaded, shape, x, criterion="l1", ratios=0.5)
    # stem, left (dw, 1x1), right (1x1, dw, 1x1), branch (1x1, dw, 1x1): the first
    # shuffle's 8 pairs keep 4; 2 of them lie in the half that passes, tied to 2 of the last
    # 1x1's channels each
    assert conv_widths(pruned) == [4, 4, 4, 4, 4, 4, 4, 4, 4]

    onnx.save(export_torch(pruned, shape), str(tmp_path / "m.onnx"))   # as deploy writes it
    back, _ = onnx_to_torch(tmp_path / "m.onnx")
    again, _ = pruned_equivalently(back, shape, x, criterion="l1", ratios=0.5)
    assert sum(conv_widths(again)) < sum(conv_widths(pruned))   # the ONNX form prunes too
    qm = ptq.quantize_ptq(back, shape, torch.randn(64, *shape[1:]).numpy())
    bit_exact(qm, x[:3].numpy(), "cortex-m4", tmp_path, like=pruned, tol=0.1)


class ContiguousShuffle(nn.Module):
    """torchvision's ShuffleNet v2 shuffle: transpose, `.contiguous()`, then `.view`."""

    def __init__(self):
        super().__init__()
        self.stem, self.branch = cbr(1, 8, 3, 2), cbr(4, 4, 3)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        a, b = self.stem(x).chunk(2, dim=1)
        y = torch.cat([a, self.branch(b)], 1)
        n, c, h, w = y.shape
        y = torch.transpose(y.view(n, 2, c // 2, h, w), 1, 2).contiguous()
        return self.fc(y.view(n, -1, h, w).mean((2, 3)))


def test_a_view_after_a_dropped_contiguous_reads_back_as_a_reshape(tmp_path):
    """The loader drops `.contiguous()` (no stage needs it); the `.view` after it would then
    meet a transposed layout ("view size is not compatible", every ShuffleNet v2 from
    torchvision's code failed to load), so it becomes `.reshape`."""
    from edgeprune.load import load_torch

    torch.manual_seed(0)
    model = ContiguousShuffle().eval()
    _randomize_bn(model)
    torch.save(model, tmp_path / "m.pt")
    loaded, shape = load_torch(tmp_path / "m.pt", (1, 1, 16, 16))
    x = torch.randn(4, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
    assert not any(n.target in ("contiguous", "view") for n in loaded.graph.nodes)
    pruned, _ = pruned_equivalently(loaded, shape, x, criterion="l1", ratios=0.5)
    qm = ptq.quantize_ptq(pruned, shape, torch.randn(64, 1, 16, 16).numpy())
    bit_exact(qm, x.numpy(), "cortex-m4", tmp_path, like=pruned, tol=0.1)


class Picks(nn.Module):
    """Channels picked by constant indices: a list, a buffer of integers, index_select (also
    a repeated index and a pick along the width)."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(1, 12, 3, padding=1), nn.Conv2d(4, 8, 3, 2, 1)
        self.c3, self.fc = nn.Conv2d(13, 6, 3), nn.Linear(6, 3)
        self.register_buffer("idx", torch.tensor([0, 3, 4, 11]))

    def forward(self, x):
        h = torch.relu(self.c1(x))
        a = torch.relu(self.c2(h[:, self.idx]))                     # (N, 8, 8, 8)
        b = h[:, [5, 6, 7, 1, 1]][..., ::2, ::2]                    # (N, 5, 8, 8)
        y = torch.cat([a, b.index_select(3, torch.tensor([0, 1, 2, 5, 6, 7, 3, 4]))], 1)
        return self.fc(torch.relu(self.c3(y)).mean((2, 3)))


def test_channels_picked_by_constant_indices_prune_export_and_run_bit_exact(tmp_path):
    """x[:, [5, 6, 7, 1]] and its kin load as the slices of the indices' runs,
    concatenated; so does the ONNX Gather they export to. Both prune and run bit-exact."""
    from edgeprune.load import load_torch, save_torch

    torch.manual_seed(0)
    model, shape, x = Picks().eval(), (1, 1, 16, 16), torch.randn(4, 1, 16, 16)
    save_torch(model, shape, tmp_path / "m.pt")
    loaded = load_torch(str(tmp_path / "m.pt"))[0]
    assert "idx" not in loaded.code and "index_select" not in loaded.code
    assert loaded.code.count("torch.narrow") == 3 + 3 + 3       # the runs of each pick
    torch.onnx.export(model, (torch.zeros(shape),), str(tmp_path / "m.onnx"), dynamo=False)
    back, _ = onnx_to_torch(tmp_path / "m.onnx")
    for m in (loaded, back):
        with torch.no_grad():
            torch.testing.assert_close(m(x), model(x))
        pruned, _ = pruned_equivalently(m, shape, x, ratios=0.5)
        assert conv_widths(pruned)[1:] == [4, 3], conv_widths(pruned)
    qm = ptq.quantize_ptq(pruned, shape, torch.randn(64, 1, 16, 16).numpy())
    bit_exact(qm, x.numpy(), "cortex-m4", tmp_path, like=pruned, tol=0.1)
