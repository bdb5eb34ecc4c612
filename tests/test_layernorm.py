"""LayerNorm over the last axis in integers (requant.layernorm_normalized: an exact integer
square root, then a requantization per channel): frames of a sequence, ConvNeXt's
channels-last LayerNorm of a conv map, and GroupNorm / InstanceNorm as LayerNorms of groups.
From torch and ONNX, pruned through them, bit-exact on targets without (M4, riscv32) and with a
double-precision FPU (M7)."""

import re

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from checks import bit_exact, conv_widths, pruned_equivalently
from edgeprune.load import load_torch
from edgeprune.onnx_to_torch import onnx_to_torch
from edgeprune.quantize import ptq
from edgeprune.quantize.requant import LAYERNORM_FRAC_BITS, layernorm_normalized

torch.set_num_threads(1)


class Frames(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.n = nn.Linear(10, 16), nn.LayerNorm(16)
        self.b, self.c = nn.Linear(16, 32), nn.Linear(32, 16)
        self.n2, self.fc = nn.LayerNorm(16, elementwise_affine=False), nn.Linear(16, 4)

    def forward(self, x):
        h = self.n(self.a(x))
        h = h + self.c(torch.relu(self.b(h)))     # the block's hidden width prunes
        return self.fc(self.n2(h).mean(1))


class ConvNeXtish(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.dw = nn.Conv2d(1, 12, 3, 2, 1), nn.Conv2d(12, 12, 5, 1, 2, groups=12)
        self.norm, self.up, self.down = nn.LayerNorm(12, eps=1e-6), nn.Linear(12, 24), \
            nn.Linear(24, 12)
        self.fc = nn.Linear(12, 4)

    def forward(self, x):
        x = self.stem(x)
        h = self.norm(self.dw(x).permute(0, 2, 3, 1))
        h = self.down(F.gelu(self.up(h))).permute(0, 3, 1, 2)
        return self.fc((x + h).mean((2, 3)))


class GroupNormed(nn.Module):
    """GroupNorm, affine and plain InstanceNorm: a LayerNorm over each group's positions."""

    def __init__(self):
        super().__init__()
        self.c, self.n = nn.Conv2d(1, 8, 3, padding=1), nn.GroupNorm(2, 8)
        self.d, self.i = nn.Conv2d(8, 12, 3, padding=1), nn.InstanceNorm2d(12, affine=True)
        self.e, self.i2 = nn.Conv2d(12, 8, 1), nn.InstanceNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        h = torch.relu(self.n(self.c(x)))
        h = torch.relu(self.i(self.d(h)))
        return self.fc(torch.relu(self.i2(self.e(h))).mean((2, 3)))


def _affine(model):
    for m in model.modules():
        if isinstance(m, nn.LayerNorm) and m.elementwise_affine or \
                isinstance(m, (nn.GroupNorm, nn.InstanceNorm2d)) and m.affine:
            m.weight.data = torch.randn(m.weight.shape) * 0.8    # both signs
            m.bias.data = torch.randn(m.bias.shape) * 0.3


def test_integer_normalization_is_exact_to_a_step():
    rng = np.random.default_rng(0)
    x = rng.integers(-128, 128, (50, 7, 24))
    n = layernorm_normalized(x, 3, 5)
    d = x - 3.0
    e = d * 24 - d.sum(-1, keepdims=True)
    want = e / np.sqrt((e * e).sum(-1, keepdims=True) / 24 + 5) * 2 ** LAYERNORM_FRAC_BITS
    assert np.abs(n - want).max() < 1 + 1e-3 * np.abs(want).max()


@pytest.mark.parametrize("cls, shape, target", [(Frames, (1, 20, 10), "cortex-m4"),
                                                (ConvNeXtish, (1, 1, 12, 12), "cortex-m7"),
                                                (GroupNormed, (1, 1, 12, 12), "riscv32")])
def test_normalization_prunes_and_runs_bit_exact(cls, shape, target, tmp_path):
    torch.manual_seed(0)
    model = cls().eval()
    _affine(model)
    x = torch.randn(8, *shape[1:])
    pruned, _ = pruned_equivalently(model, shape, x, ratios=0.5)
    width = {n: getattr(m, "out_features", getattr(m, "out_channels", None))
             for n, m in pruned.named_modules()}
    # a LayerNorm's channels prune with its weights (the residual stream of Frames, ConvNeXt's
    # block through its channels-last norm), a GroupNorm's by whole groups (one of its two
    # here), an InstanceNorm's weights with their channels
    want = {Frames: {"a": 8, "b": 16, "c": 8}, ConvNeXtish: {"stem": 6, "up": 12, "down": 6},
            GroupNormed: {"e": 4}}[cls]
    assert {layer: width[layer] for layer in want} == want
    if cls is GroupNormed:
        assert (width["c"], width["d"]) == (4, 6) and pruned.n.num_groups == 1

    torch.onnx.export(pruned, (torch.zeros(shape),), str(tmp_path / "m.onnx"), dynamo=False)
    back, _ = onnx_to_torch(tmp_path / "m.onnx")
    with torch.no_grad():
        torch.testing.assert_close(back(x), pruned(x), atol=1e-4, rtol=1e-4)
    calib = torch.randn(64, *shape[1:]).numpy()
    qm = ptq.quantize_ptq(back, shape, calib)
    assert [o.kind for o in qm.ops].count("layernorm") == {Frames: 2, ConvNeXtish: 1,
                                                           GroupNormed: 3}[cls]
    bit_exact(qm, calib[:4], target, tmp_path, like=pruned, tol=0.1)
    # each row's square root taken once, its deviations squared in 32 bits, widened: one
    # multiply-accumulate on a 32-bit core
    kernels = (tmp_path / "b" / "c_library" / "kernels.c").read_text()
    layernorms = kernels.count("int64_t ln_r0 = ")
    assert layernorms == {Frames: 2, ConvNeXtish: 1, GroupNormed: 3}[cls]
    assert kernels.count("sqrt(((double)") == layernorms
    assert kernels.count("((int64_t)ln_d) * ((int64_t)ln_d)") == layernorms
    if cls is GroupNormed:   # one shift of 31 or more: offset and clamp in 32 bits, not 64
        assert len(re.findall(r"layernorm\w*\[\w+\] = \(\(int8_t\)\(\(\w+\) > \(-128\)",
                              kernels)) == layernorms


def test_group_norm_from_onnx_prunes_by_whole_groups(tmp_path):
    """torch's exporters write a GroupNorm as a reshape to (N, G, -1), an InstanceNormalization
    and a reshape back, then its affine as a Mul and an Add by constants. Read back as the
    nn.GroupNorm it is (the affine in its weights), it prunes by whole groups as the torch
    model does, where the InstanceNorm of reshaped maps and the per-channel constants had kept
    every channel."""
    torch.manual_seed(0)
    model = GroupNormed().eval()
    _affine(model)
    x = torch.randn(8, 1, 12, 12)
    for dynamo in (False, True):
        torch.onnx.export(model, (torch.zeros(1, 1, 12, 12),), str(tmp_path / "m.onnx"),
                          dynamo=dynamo)
        back, shape = load_torch(str(tmp_path / "m.onnx"))
        assert [type(m) for m in back.modules()].count(nn.GroupNorm) == 1
        assert nn.InstanceNorm1d not in [type(m) for m in back.modules()]
        with torch.no_grad():
            torch.testing.assert_close(back(x), model(x), atol=1e-5, rtol=1e-4)
        pruned, _ = pruned_equivalently(back, shape, x, ratios=0.5)
        assert conv_widths(pruned) == [4, 6, 4]    # c: one group of two; d, e: by channels


class PreNormBlocks(nn.Module):
    """Pre-norm residual blocks on frames with a LayerNorm, an RMSNorm, a LayerNorm without
    bias and one over (N, C) features: the residual stream prunes through all of them."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Linear(6, 16)
        self.n1, self.n2 = nn.LayerNorm(16), nn.RMSNorm(16)
        self.f1, self.f2 = nn.Linear(16, 24), nn.Linear(24, 16)
        self.g1, self.g2 = nn.Linear(16, 24), nn.Linear(24, 16)
        self.n3, self.n4 = nn.LayerNorm(16, bias=False), nn.LayerNorm(16)
        self.fc = nn.Linear(16, 3)

    def forward(self, x):
        t = self.emb(x)
        t = t + self.f2(F.gelu(self.f1(self.n1(t))))
        t = t + self.g2(F.gelu(self.g1(self.n2(t))))
        return self.fc(self.n4(self.n3(t).mean(1)))


def test_a_layer_norm_prunes_its_channels_with_the_statistics_over_those_kept():
    torch.manual_seed(0)
    model = PreNormBlocks().eval()
    for m in model.modules():
        if isinstance(m, (nn.LayerNorm, nn.RMSNorm)):
            m.weight.data = torch.rand(16) + 0.5
            if getattr(m, "bias", None) is not None:
                m.bias.data = torch.randn(16)
    x = torch.randn(8, 5, 6)
    # checked against the model whose norms take their statistics over the channels kept
    pruned, record = pruned_equivalently(model, (1, 5, 6), x, ratios=0.5)
    norms = [m for m in pruned.modules() if isinstance(m, (nn.LayerNorm, nn.RMSNorm))]
    assert [m.normalized_shape for m in norms] == [(8,)] * 4
    assert (pruned.emb.out_features, pruned.f1.out_features, pruned.g2.out_features) == \
        (8, 12, 8)
    assert record["layers"]["n2"]["kind"] == "ln" and len(record["layers"]["n2"]["kept"]) == 8
    # not what the unpruned model computes with those channels zeroed: a norm's statistics
    # change, which the fine-tune after pruning takes up
    from edgeprune.prune import masked_reference
    with torch.no_grad(), masked_reference(model, {k: v for k, v in record["layers"].items()
                                                   if v["kind"] != "ln"}):
        assert not torch.allclose(model(x), pruned(x), atol=1e-3)
    calib = torch.randn(64, 5, 6).numpy()
    qm = ptq.quantize_ptq(pruned, (1, 5, 6), calib)
    assert [o.kind for o in qm.ops].count("layernorm") == 4


class NormOverMoreThanTheChannels(nn.Module):
    """A LayerNorm over a map's (C, H, W): its channels are kept."""

    def __init__(self):
        super().__init__()
        self.c, self.n = nn.Conv2d(1, 8, 3, padding=1), nn.LayerNorm((8, 6, 6))
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(self.n(self.c(x)).mean((2, 3)))


def test_a_norm_over_more_than_the_channels_keeps_them():
    from edgeprune.prune import DepGraph
    torch.manual_seed(0)
    assert DepGraph(NormOverMoreThanTheChannels().eval(), torch.randn(1, 1, 6, 6)).groups == []


class OwnLayerNorm(nn.Module):
    """ConvNeXt's own LayerNorm class: F.layer_norm with its parameters on channels-last
    tensors, written out over the channels of NCHW maps."""

    def __init__(self, c, channels_first=False):
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.rand(c) + 0.5), nn.Parameter(torch.randn(c))
        self.c, self.channels_first = c, channels_first

    def forward(self, x):
        if not self.channels_first:
            return F.layer_norm(x, (self.c,), self.weight, self.bias, 1e-6)
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + 1e-6)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class ConvNeXtOwnNorms(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.stem_norm = nn.Conv2d(1, 12, 2, 2), OwnLayerNorm(12, channels_first=True)
        self.dw, self.norm = nn.Conv2d(12, 12, 5, 1, 2, groups=12), OwnLayerNorm(12)
        self.up, self.down, self.fc = nn.Linear(12, 24), nn.Linear(24, 12), nn.Linear(12, 4)

    def forward(self, x):
        x = self.stem_norm(self.stem(x))
        h = self.norm(self.dw(x).permute(0, 2, 3, 1))
        h = self.down(F.gelu(self.up(h))).permute(0, 3, 1, 2)
        return self.fc((x + h).mean((2, 3)))


def test_layer_norms_written_as_functions_load_as_modules_and_prune(tmp_path):
    """Both of ConvNeXt's own LayerNorms load as nn.LayerNorm (the written-out one as a norm
    without weights, then its scale and offset per channel), so the residual stream prunes
    through them; before, they kept it whole."""
    torch.manual_seed(0)
    shape, x = (1, 1, 12, 12), torch.randn(8, 1, 12, 12)
    torch.save(ConvNeXtOwnNorms().eval(), tmp_path / "m.pt")
    loaded, _ = load_torch(str(tmp_path / "m.pt"), shape)
    assert sum(isinstance(m, nn.LayerNorm) for m in loaded.modules()) == 2
    pruned, _ = pruned_equivalently(loaded, shape, x, ratios=0.5)
    widths = {n: getattr(m, "out_features", getattr(m, "out_channels", None))
              for n, m in pruned.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    assert widths == {"stem": 6, "dw": 6, "up": 12, "down": 6, "fc": 4}
    calib = torch.randn(64, *shape[1:]).numpy()
    qm = ptq.quantize_ptq(pruned, shape, calib)
    assert [o.kind for o in qm.ops].count("layernorm") == 2
    bit_exact(qm, calib[:3], "cortex-m4", tmp_path, like=pruned, tol=0.1)
