"""Dependency analysis and surgery: coupled channels stay consistent, removal is physical and
the pruned model equals the original with the same channels zeroed."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from checks import bit_exact, conv_widths, pruned_equivalently, saved_and_loaded
from edgeprune import models
from edgeprune.errors import EdgepruneError
from edgeprune.prune import DepGraph, masked_reference, prune
from edgeprune.quantize import ptq


class ResidualConcatNet(nn.Module):
    """Residual add, concat, depthwise conv, pooling and a spatial flatten -> Linear."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.a = nn.Conv2d(8, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 6, 1)
        self.c = nn.Conv2d(8, 4, 3, padding=1)
        self.dw = nn.Conv2d(10, 10, 3, padding=1, groups=10)
        self.bn_dw = nn.BatchNorm2d(10)
        self.pw = nn.Conv2d(10, 12, 1)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(12 * 4 * 4, 5)

    def forward(self, x):
        s = F.relu(self.bn(self.stem(x)))
        s = s + self.a(s)                                 # residual: stem and a share channels
        y = torch.cat([self.b(s), self.c(s)], 1)          # concat: 6 + 4 channels side by side
        y = F.relu(self.bn_dw(self.dw(y)))                # depthwise: channel j passes through
        y = self.pool(F.relu(self.pw(y)))
        return self.fc(y.view(y.size(0), -1))             # flatten: channel j -> 16 features


def _check_equivalent(model, pruned, record, x):
    model.eval(), pruned.eval()
    with torch.no_grad():
        with masked_reference(model, record["layers"]):
            ref = model(x)
        out = pruned(x)
    assert out.shape == ref.shape
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)


def _randomize_bn(model):
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data = torch.rand(m.num_features, generator=g) + 0.5
            m.bias.data = torch.randn(m.num_features, generator=g)
            m.running_mean = torch.randn(m.num_features, generator=g)
            m.running_var = torch.rand(m.num_features, generator=g) + 0.5


def test_groups_tie_residual_concat_depthwise_and_flatten():
    torch.manual_seed(0)
    graph = DepGraph(ResidualConcatNet().eval(), torch.randn(1, 1, 8, 8))
    by_layer = {layer: g for g in graph.groups for layer in g.layers}
    assert by_layer["stem"] is by_layer["a"]              # residual add ties them
    assert by_layer["b"] is not by_layer["c"]             # concat keeps them apart
    assert by_layer["b"].units == 6 and by_layer["c"].units == 4
    assert "fc" not in by_layer                           # the classifier feeds the output
    c_group = by_layer["c"]
    dw = [m for m in c_group.members if m.layer == "dw"][0]
    assert [p for u in dw.positions for p in u] == [6, 7, 8, 9]  # c's channels after b's
    pw = by_layer["pw"]
    fc_in = [m for m in pw.members if m.layer == "fc" and m.role == "in"][0]
    assert fc_in.positions[1] == list(range(16, 32))      # channel 1 -> 16 flattened features


def test_surgery_is_physical_and_equivalent():
    torch.manual_seed(0)
    model = ResidualConcatNet().eval()
    _randomize_bn(model)
    pruned, record = prune(model, torch.randn(1, 1, 8, 8), criterion="l1", ratios=0.5)
    m = dict(pruned.named_modules())
    assert m["stem"].out_channels == 4 and m["a"].in_channels == 4 and m["a"].out_channels == 4
    assert m["b"].out_channels == 3 and m["c"].out_channels == 2
    assert m["dw"].in_channels == m["dw"].out_channels == m["dw"].groups == 5
    assert m["bn_dw"].num_features == 5 and m["bn"].num_features == 4
    assert m["pw"].out_channels == 6 and m["fc"].in_features == 6 * 16 and m["fc"].out_features == 5
    assert record["macs_after"] < record["macs_before"]
    assert record["params_after"] < record["params_before"]
    _check_equivalent(model, pruned, record, torch.randn(3, 1, 8, 8))
    # the input model is untouched
    assert model.stem.out_channels == 8


class BranchesIntoMultiplier(nn.Module):
    """Two branches concatenated into a depthwise conv with a channel multiplier."""

    def __init__(self):
        super().__init__()
        self.stem, self.b1, self.b2 = nn.Conv2d(1, 8, 3), nn.Conv2d(8, 4, 1), nn.Conv2d(8, 4, 1)
        self.dw = nn.Conv2d(8, 16, 3, groups=8)
        self.fc = nn.Linear(16, 3)

    def forward(self, x):
        x = F.relu(self.stem(x))
        y = torch.cat([F.relu(self.b1(x)), F.relu(self.b2(x))], 1)
        return self.fc(F.relu(self.dw(y)).mean((2, 3)))


def test_branches_into_a_depthwise_multiplier_prune_as_groups_apart():
    torch.manual_seed(0)
    model, shape, x = BranchesIntoMultiplier().eval(), (1, 1, 10, 10), torch.randn(4, 1, 10, 10)
    by_layer = {layer: g for g in DepGraph(model, torch.randn(shape)).groups for layer in g.layers}
    assert by_layer["b1"] is not by_layer["b2"]           # as into a depthwise conv
    pruned, _ = pruned_equivalently(model, shape, x, ratios=0.5)
    assert conv_widths(pruned) == [4, 2, 2, 8]            # each branch half, dw 2 per input


class BranchesIntoResidual(nn.Module):
    """Two branches concatenated and added to a third conv's maps: the three rank their
    channels in one group, and one branch's (with the third's it meets) are the weakest."""

    def __init__(self):
        super().__init__()
        self.stem, self.b1, self.b2 = nn.Conv2d(1, 8, 3), nn.Conv2d(8, 4, 1), nn.Conv2d(8, 4, 1)
        self.c, self.fc = nn.Conv2d(8, 8, 1), nn.Linear(8, 3)
        with torch.no_grad():
            self.b1.weight.mul_(1e-3)
            self.c.weight[:4].mul_(1e-3)

    def forward(self, x):
        x = F.relu(self.stem(x))
        y = torch.cat([self.b1(x), self.b2(x)], 1) + self.c(x)
        return self.fc(F.relu(y).mean((2, 3)))


def test_a_layer_whose_channels_all_rank_lowest_in_a_shared_group_keeps_one():
    torch.manual_seed(0)
    shape, x = (1, 1, 10, 10), torch.randn(4, 1, 10, 10)
    pruned, _ = pruned_equivalently(BranchesIntoResidual().eval(), shape, x, ratios=0.5)
    assert conv_widths(pruned)[1:] == [1, 4, 5]     # b1 keeps its best channel, not none


class CoordConv(nn.Module):
    """Coordinate channels (a constant) concatenated to the input and to a conv's maps."""

    def __init__(self):
        super().__init__()
        ys, xs = torch.meshgrid(torch.linspace(-1, 1, 8), torch.linspace(-1, 1, 8),
                                indexing="ij")
        self.register_buffer("coords", torch.stack([ys, xs])[None])
        self.c1, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(10, 8, 3, 2, 1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        c = self.coords.expand(x.shape[0], -1, -1, -1)
        y = torch.relu(self.c1(torch.cat([x, c], 1)))
        return self.fc(torch.relu(self.c2(torch.cat([y, c], 1))).mean((2, 3)))


def test_constant_channels_concatenated_stay_and_the_rest_prune(tmp_path):
    """(torch.fx cannot trace the expand over the batch: it loads through ONNX.)"""
    torch.manual_seed(0)
    shape, x = (1, 1, 8, 8), torch.randn(4, 1, 8, 8)
    loaded, _ = saved_and_loaded(CoordConv().eval(), shape, x, tmp_path)
    pruned, _ = pruned_equivalently(loaded, shape, x, ratios=0.5)
    convs = [m for m in pruned.modules() if isinstance(m, nn.Conv2d)]
    assert [(m.in_channels, m.out_channels) for m in convs] == [(3, 4), (4 + 2, 4)]
    qm = ptq.quantize_ptq(pruned, shape, torch.randn(64, *shape[1:]).numpy())
    bit_exact(qm, x[:3].numpy(), "cortex-m4", tmp_path, like=pruned, tol=0.1)


class GroupedNet(nn.Module):
    """Grouped convs (ResNeXt/ShuffleNet style): one reads a concat that straddles its groups,
    one sits in a residual; a depthwise multiplier (one input per group) and a conv that sums
    each pair of channels (one output per group) lose whole groups."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(1, 8, 3, padding=1), nn.Conv2d(1, 4, 3, padding=1)
        self.g = nn.Conv2d(12, 16, 3, padding=1, groups=2)      # group 0 reads a0..a5
        self.bn = nn.BatchNorm2d(16)
        self.r = nn.Conv2d(16, 16, 1, groups=4)                 # residual around it
        self.c = nn.Conv2d(16, 8, 1)
        self.mult = nn.Conv2d(8, 16, 3, padding=1, groups=8)    # 2 outputs per input
        self.pairs = nn.Conv2d(16, 8, 1, groups=8)              # 2 inputs per output
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        y = torch.cat([F.relu(self.a(x)), F.relu(self.b(x))], 1)
        y = F.relu(self.bn(self.g(y)))
        y = self.c(y + self.r(y))
        y = self.pairs(F.relu(self.mult(y)))
        return self.fc(F.adaptive_avg_pool2d(F.relu(y), 1).flatten(1))


def _built(model_class):
    """A fresh model (eval mode, random BatchNorm statistics) and its layer -> group map."""
    torch.manual_seed(0)
    model = model_class().eval()
    _randomize_bn(model)
    graph = DepGraph(model, torch.randn(1, 1, 8, 8))
    return model, {layer: g for g in graph.groups for layer in g.layers}


def test_grouped_convs_prune_every_group_alike():
    model, by_layer = _built(GroupedNet)
    assert by_layer["a"] is by_layer["b"]          # the concat straddles g's two groups
    assert by_layer["a"].units == 6                # channel j of each group is one unit
    assert by_layer["g"] is by_layer["r"] and by_layer["g"].units == 4  # both tyings at once
    # c's channel i, mult's outputs 2i and 2i + 1 and pairs' output i are one unit
    assert by_layer["c"] is by_layer["mult"] is by_layer["pairs"] and by_layer["c"].units == 8
    pruned, record = prune(model, torch.randn(1, 1, 8, 8), criterion="l1", ratios=0.5)
    m = dict(pruned.named_modules())
    assert m["g"].groups == 2 and m["g"].in_channels == 6 and m["g"].out_channels == 8
    assert m["r"].groups == 4 and m["r"].in_channels == m["r"].out_channels == 8
    assert m["a"].out_channels + m["b"].out_channels == 6
    assert m["c"].in_channels == 8 and m["c"].out_channels == m["mult"].groups == 4
    assert m["mult"].out_channels == m["pairs"].in_channels == 8
    assert m["pairs"].groups == m["pairs"].out_channels == m["fc"].in_features == 4
    assert record["macs_after"] < 0.5 * record["macs_before"]
    _check_equivalent(model, pruned, record, torch.randn(3, 1, 8, 8))


def test_mlp_with_batchnorm1d_prunes_equivalently_also_from_onnx(tmp_path):
    """A plain MLP (features in, no image): Linear -> BatchNorm1d -> ReLU chains."""
    from edgeprune.onnx_to_torch import onnx_to_torch

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 16),
                          nn.ReLU6(), nn.Linear(16, 4)).eval()
    model[1].running_mean.uniform_(-1, 1), model[1].running_var.uniform_(0.5, 2)
    torch.onnx.export(model, (torch.zeros(1, 20),), str(tmp_path / "mlp.onnx"), dynamo=False)
    back, shape = onnx_to_torch(tmp_path / "mlp.onnx")
    x = torch.randn(5, 20)
    torch.testing.assert_close(back(x), model(x), atol=1e-5, rtol=1e-4)
    for m in (model, back):
        pruned, record = prune(m, torch.randn(shape), criterion="l1", ratios=0.5)
        widths = [mod.out_features for mod in pruned.modules() if isinstance(mod, nn.Linear)]
        assert widths == [16, 8, 4]
        assert [mod.num_features for mod in pruned.modules()
                if isinstance(mod, nn.BatchNorm1d)] == [16]
        _check_equivalent(m, pruned, record, x)


@pytest.mark.parametrize("name", ["resnet8", "dscnn", "mobilenet", "cnn"])
def test_zoo_models_prune_equivalently(name):
    model, shape = models.build(name)
    _randomize_bn(model)
    pruned, record = prune(model, torch.randn(shape), criterion="l2", ratios=0.5)
    _check_equivalent(model, pruned, record, torch.randn(2, *shape[1:]))
    assert record["macs_after"] < 0.4 * record["macs_before"]


def test_resnet_residual_stacks_share_channels():
    model, shape = models.build("resnet8")
    pruned, record = prune(model, torch.randn(shape), criterion="l1", ratios=0.5)
    layers = record["layers"]
    # the stem, layer1.conv2 (added to it) and layer2's shortcut input keep the same channels
    assert layers["conv1"]["out_kept"] == layers["layer1.conv2"]["out_kept"] \
        == layers["layer2.conv1"]["in_kept"] == layers["layer2.shortcut.0"]["in_kept"]
    assert layers["layer2.conv2"]["out_kept"] == layers["layer2.shortcut.0"]["out_kept"]
    assert pruned(torch.randn(2, *shape[1:])).shape == (2, 10)


def test_global_allocation_keeps_a_floor_per_layer():
    model, shape = models.build("resnet8")
    pruned, record = prune(model, torch.randn(shape), criterion="l1", ratios=0.7,
                           allocation="global", min_keep=0.25)
    for g in record["groups"]:
        assert len(g["kept"]) >= max(1, -(-g["channels_before"] // 4))
    assert sum(len(g["kept"]) for g in record["groups"]) <= \
        0.31 * sum(g["channels_before"] for g in record["groups"]) + len(record["groups"])


def test_flops_target_is_met():
    model, shape = models.build("resnet8")
    _, record = prune(model, torch.randn(shape), criterion="l1", ratios=0.0, flops_target=0.5)
    removed = 1 - record["macs_after"] / record["macs_before"]
    assert 0.5 <= removed < 0.56
    _, record = prune(model, torch.randn(shape), criterion="l1", ratios=0.0, params_target=0.3)
    assert 1 - record["params_after"] / record["params_before"] >= 0.3


def test_per_layer_ratios_and_their_errors():
    model, shape = models.build("resnet8")
    x = torch.randn(shape)
    pruned, record = prune(model, x, ratios={"layer1.conv1": 0.5, "layer3.conv1": 0.25})
    assert pruned.layer1.conv1.out_channels == 8 and pruned.layer3.conv1.out_channels == 48
    assert pruned.layer2.conv1.out_channels == 32
    with pytest.raises(EdgepruneError, match="'nope'.*prunable: .*layer1.conv1"):
        prune(model, x, ratios={"nope": 0.5})
    with pytest.raises(EdgepruneError, match="'fc', which is not a prunable layer"):
        prune(model, x, ratios={"fc": 0.5})
    with pytest.raises(EdgepruneError, match=r"layer1.conv1.*outside \[0, 1\)"):
        prune(model, x, ratios={"layer1.conv1": 1.0})
    # with a target, per-layer ratios keep their proportions and scale to meet it
    _, rec = prune(model, x, ratios={"*": 0.2, "layer3.conv1": 0.4}, flops_target=0.3)
    assert 1 - rec["macs_after"] / rec["macs_before"] >= 0.3
    kept = {g["name"]: len(g["kept"]) / g["channels_before"] for g in rec["groups"]}
    assert kept["layer3.conv1"] < kept["layer1.conv1"]


@pytest.mark.parametrize("ratio", [1.0, -0.1, 1.5])
def test_ratio_outside_range_is_refused(ratio):
    model, shape = models.build("cnn")
    with pytest.raises(EdgepruneError, match="outside"):
        prune(model, torch.randn(shape), ratios=ratio)


def test_ratio_removing_every_channel_names_the_layer():
    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.narrow = nn.Conv2d(1, 1, 3)
            self.head = nn.Conv2d(1, 2, 1)

        def forward(self, x):
            return self.head(self.narrow(x))
    with pytest.raises(EdgepruneError, match="every channel of layer 'narrow'"):
        prune(Tiny(), torch.randn(1, 1, 6, 6), ratios={"narrow": 0.99, "*": 0.0})


def test_unsupported_pattern_names_the_layer():
    class Transposed(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3)
            self.up = nn.ConvTranspose2d(4, 4, 2, stride=2)
            self.head = nn.Conv2d(4, 2, 1)

        def forward(self, x):
            return self.head(self.up(self.conv(x)))
    with pytest.raises(EdgepruneError, match="layer 'up'.*ConvTranspose2d"):
        prune(Transposed(), torch.randn(1, 1, 8, 8))


def test_untraceable_model_is_a_clear_error():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3)

        def forward(self, x):
            y = self.conv(x)
            return y if y.sum() > 0 else -y
    with pytest.raises(EdgepruneError, match="does not trace"):
        prune(Branchy(), torch.randn(1, 1, 8, 8))


def test_a_shared_layer_prunes_the_same_channels_at_every_call():
    """A conv run twice (one set of weights): what it reads at both calls is one set of
    units, and both calls write the same channels, so it prunes with what feeds it; a
    siamese pair of branches likewise."""
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.pre = nn.Conv2d(1, 6, 3, padding=1)
            self.stem = nn.Conv2d(6, 4, 3, padding=1)
            self.conv = nn.Conv2d(4, 4, 3, padding=1)
            self.head = nn.Conv2d(4, 2, 1)

        def forward(self, x):
            return self.head(self.conv(self.conv(self.stem(torch.relu(self.pre(x))))))

    class Siamese(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.bn, self.fc = nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8), nn.Linear(8, 2)

        def forward(self, x):
            left = torch.relu(self.bn(self.a(x[..., :8]))).mean((2, 3))
            right = torch.relu(self.bn(self.a(x[..., 8:]))).mean((2, 3))
            return self.fc((left - right).abs())
    torch.manual_seed(0)
    pruned, _ = pruned_equivalently(Shared().eval(), (1, 1, 8, 8), torch.randn(4, 1, 8, 8),
                                    ratios=0.5)
    assert conv_widths(pruned) == [3, 2, 2, 2]
    pruned, _ = pruned_equivalently(Siamese().eval(), (1, 1, 8, 16), torch.randn(4, 1, 8, 16),
                                    ratios=0.5)
    assert conv_widths(pruned) == [4] and pruned.fc.in_features == 4


def test_softmax_keeps_the_channels_it_normalises():
    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(1, 8, 3, padding=1), nn.Conv2d(8, 6, 3, padding=1)
            self.fc, self.sm = nn.Linear(6, 4), nn.Softmax(1)

        def forward(self, x):
            h = torch.relu(self.a(x))
            h = h * torch.softmax(h, -1)                     # over a row: channel j stays j
            h = torch.softmax(self.b(h), dim=1)              # over channels: b keeps all 6
            return self.sm(self.fc(h.mean((2, 3))))

    torch.manual_seed(0)
    model = Attention().eval()
    graph = DepGraph(model, torch.randn(1, 1, 8, 8))
    assert [g.layers for g in graph.groups] == [["a"]]
    pruned, record = prune(model, torch.randn(1, 1, 8, 8), criterion="l1", ratios=0.5)
    _check_equivalent(model, pruned, record, torch.randn(3, 1, 8, 8))


class SqueezeExcite(nn.Module):
    """Channel weights from the pooled features, broadcast back over the map (SE blocks),
    once with a baked-in channel count and once by indexing."""

    def __init__(self):
        super().__init__()
        self.c0, self.bn = nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.f1, self.f2 = nn.Linear(16, 4), nn.Linear(4, 16)
        self.c1 = nn.Conv2d(16, 8, 3, padding=1)
        self.g = nn.Linear(8, 8)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        y = torch.relu(self.bn(self.c0(x)))
        w = torch.sigmoid(self.f2(torch.relu(self.f1(y.mean((2, 3))))))
        y = self.c1(y * w.view(x.size(0), 16, 1, 1))
        y = y * torch.sigmoid(self.g(y.mean((2, 3))))[:, :, None, None]
        return self.fc(y.mean((2, 3)))


def test_squeeze_excite_ties_the_weights_to_their_channels():
    model, by_layer = _built(SqueezeExcite)
    assert by_layer["c0"] is by_layer["f2"] and by_layer["c1"] is by_layer["g"]
    pruned, record = prune(model, torch.randn(1, 1, 8, 8), criterion="l1", ratios=0.5)
    m = dict(pruned.named_modules())
    assert m["c0"].out_channels == m["f2"].out_features == m["f1"].in_features == 8
    _check_equivalent(model, pruned, record, torch.randn(3, 1, 8, 8))


def test_squeeze_excite_from_onnx_runs_any_batch_and_prunes(tmp_path):
    """Exported at batch 1 (Mul, ReduceMean, a Reshape to [1, 16, 1, 1]), the converted model
    still trains and evaluates on other batch sizes, and prunes like the original."""
    from edgeprune.onnx_to_torch import onnx_to_torch

    torch.manual_seed(0)
    model = SqueezeExcite().eval()
    _randomize_bn(model)
    torch.onnx.export(model, (torch.zeros(1, 1, 8, 8),), str(tmp_path / "se.onnx"), dynamo=False)
    back, shape = onnx_to_torch(tmp_path / "se.onnx")
    x = torch.randn(3, 1, 8, 8)
    torch.testing.assert_close(back(x), model(x), atol=1e-5, rtol=1e-4)
    pruned, record = prune(back, torch.randn(shape), criterion="l1", ratios=0.5)
    assert record["macs_after"] < 0.5 * record["macs_before"]
    _check_equivalent(back, pruned, record, x)


class ChannelsLast(nn.Module):
    """What a Keras model exported to ONNX looks like: an NHWC input made NCHW, and the last
    feature map made NHWC again before Flatten (so channel j becomes every C-th feature)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.b = nn.Conv2d(8, 6, 3, stride=2, padding=1)
        self.fc = nn.Linear(6 * 4 * 4, 5)

    def forward(self, x):
        x = F.relu(self.bn(self.a(x.permute(0, 3, 1, 2))))
        x = F.relu(self.b(x))
        return self.fc(x.permute(0, 2, 3, 1).reshape(x.shape[0], -1))


def test_channels_last_flatten_prunes_equivalently_also_from_onnx(tmp_path):
    from edgeprune.onnx_to_torch import onnx_to_torch

    torch.manual_seed(0)
    model = ChannelsLast().eval()
    _randomize_bn(model)
    torch.onnx.export(model, (torch.zeros(1, 8, 8, 3),), str(tmp_path / "nhwc.onnx"),
                      dynamo=False)
    back, shape = onnx_to_torch(tmp_path / "nhwc.onnx")
    assert shape == (1, 8, 8, 3)
    x = torch.randn(3, 8, 8, 3)
    torch.testing.assert_close(back(x), model(x), atol=1e-5, rtol=1e-4)
    for m in (model, back):
        pruned, record = prune(m, torch.randn(shape), criterion="l1", ratios=0.5)
        convs = [mod.out_channels for mod in pruned.modules() if isinstance(mod, nn.Conv2d)]
        assert convs == [4, 3]
        fc = [mod for mod in pruned.modules() if isinstance(mod, nn.Linear)][0]
        assert fc.in_features == 3 * 4 * 4
        _check_equivalent(m, pruned, record, x)


class ChannelsLastGlobalPool(nn.Module):
    """A Keras head as tf2onnx may leave it: the last feature map made NHWC, then a global
    pool over its spatial axes (axes 1, 2), with or without keepdims."""

    def __init__(self, pool: str, keep: bool):
        super().__init__()
        self.pool, self.keep = pool, keep
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 6, 3, stride=2, padding=1)
        self.fc = nn.Linear(6, 5)

    def forward(self, x):
        x = F.relu(self.b(F.relu(self.a(x.permute(0, 3, 1, 2))))).permute(0, 2, 3, 1)
        reduce = torch.mean if self.pool == "mean" else torch.amax
        return self.fc(reduce(x, (1, 2), keepdim=self.keep).reshape(x.shape[0], -1))


@pytest.mark.parametrize("pool,keep", [("mean", False), ("mean", True), ("max", False)])
def test_onnx_global_pool_of_a_channels_last_map_prunes_equivalently(tmp_path, pool, keep):
    from edgeprune.onnx_to_torch import onnx_to_torch

    torch.manual_seed(0)
    model = ChannelsLastGlobalPool(pool, keep).eval()
    torch.onnx.export(model, (torch.zeros(1, 8, 8, 3),), str(tmp_path / "gap.onnx"),
                      dynamo=False)
    back, shape = onnx_to_torch(tmp_path / "gap.onnx")
    x = torch.randn(3, 8, 8, 3)
    torch.testing.assert_close(back(x), model(x), atol=1e-5, rtol=1e-4)
    # the pool runs on the channels-first map: the transpose to NHWC cancels (kept: it moves
    # the pooled 1x1 map back to the shape the graph expects)
    permutes = [n for n in back.graph.nodes if n.target is torch.permute]
    assert len(permutes) == (2 if keep else 1)
    pruned, record = prune(back, torch.randn(shape), criterion="l1", ratios=0.5)
    assert conv_widths(pruned) == [4, 3]
    _check_equivalent(back, pruned, record, x)


@pytest.mark.parametrize("mode", ["nearest", "bilinear"])
def test_upsampling_passes_channels_through(mode):
    """A U-Net-like decoder: upsampled features (module and function) concatenated with a
    skip connection; every conv prunes and the cut model equals the masked original."""
    class Decoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(1, 8, 3, 1, 1), nn.Conv2d(8, 12, 3, 2, 1)
            self.up = nn.Upsample(scale_factor=2, mode=mode)
            self.c, self.d = nn.Conv2d(20, 6, 3, 1, 1), nn.Conv2d(6, 1, 1)

        def forward(self, x):
            skip = F.relu(self.a(x))
            h = F.interpolate(F.relu(self.b(skip)), scale_factor=2, mode=mode)
            return self.d(self.up(F.max_pool2d(F.relu(self.c(torch.cat([h, skip], 1))), 2)))

    torch.manual_seed(0)
    model = Decoder().eval()
    pruned, record = prune(model, torch.randn(1, 1, 16, 16), criterion="l1", ratios=0.5)
    assert conv_widths(pruned) == [4, 6, 3, 1]
    _check_equivalent(model, pruned, record, torch.randn(2, 1, 16, 16))


def test_a_permute_that_moves_the_channels_inside_keeps_them():
    class ChannelsToHeight(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(8, 6, 1)
            self.c = nn.Conv2d(6, 2, 1)

        def forward(self, x):
            return self.c(torch.relu(self.b(self.a(x).permute(0, 2, 1, 3))))

    model = ChannelsToHeight().eval()
    pruned, record = prune(model, torch.randn(1, 1, 8, 8), ratios=0.5)
    assert conv_widths(pruned) == [4, 3, 2]
    _check_equivalent(model, pruned, record, torch.randn(2, 1, 8, 8))


def test_a_conv_along_channels_last_keeps_them():
    """b slides over a's channels (they are its W axis after the permute): a keeps them all,
    the conv before a still prunes."""

    class ConvOnChannelsLast(nn.Module):
        def __init__(self):
            super().__init__()
            self.pre = nn.Conv2d(1, 6, 3, padding=1)
            self.a, self.b = nn.Conv2d(6, 4, 3, padding=1), nn.Conv2d(8, 2, 1)

        def forward(self, x):
            return self.b(self.a(torch.relu(self.pre(x))).permute(0, 2, 3, 1))

    torch.manual_seed(0)
    pruned, _ = pruned_equivalently(ConvOnChannelsLast().eval(), (1, 1, 8, 8),
                                    torch.randn(4, 1, 8, 8), ratios=0.5)
    assert conv_widths(pruned) == [3, 4, 2]


def test_round_to_keeps_a_multiple_of_channels_in_every_pruned_layer():
    """The kernels take channels in pairs (a target's channel_multiple): each pruned group keeps
    the nearest multiple (halves up), through residual, concat and depthwise ties alike; a
    group the rounding gives back every channel stays whole."""
    model = ResidualConcatNet().eval()
    x = torch.randn(2, 1, 8, 8)
    widths = {}
    for m in (1, 2, 4):
        pruned, record = prune(model, x, criterion="l1", ratios=0.4, round_to=m)
        _check_equivalent(model, pruned, record, x)
        widths[m] = conv_widths(pruned)   # stem, a (its residual), b, c, dw (b + c), pw
        assert record["round_to"] == m
    assert widths[1] == [5, 5, 4, 2, 6, 7]
    assert widths[2] == [6, 6, 4, 2, 6, 8]
    assert widths[4] == [4, 4, 4, 4, 8, 8]
    # a MACs target is searched with the rounding in place, so it is still met
    model, shape = models.build("resnet8")
    _, rec = prune(model, torch.randn(shape), ratios=0.0, flops_target=0.45, round_to=4)
    assert 1 - rec["macs_after"] / rec["macs_before"] >= 0.45
    assert all(len(g["kept"]) % 4 == 0 for g in rec["groups"])
    with pytest.raises(EdgepruneError, match="round_to 0 must be a positive integer"):
        prune(model, torch.randn(shape), round_to=0)


class PerChannelConstants(nn.Module):
    """Constants with a value per channel on the way: a ConvNeXt-style layer scale on a
    residual branch, a bias added after a bias-free conv, a learnt map added to every channel
    alike (its channel axis is 1), and a positional embedding on channels-last frames."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(1, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.gamma = nn.Parameter(torch.rand(8, 1, 1) + 0.5)
        self.c = nn.Conv2d(8, 12, 3, padding=1, bias=False)
        self.shift = nn.Parameter(torch.randn(1, 12, 1, 1))
        self.spot = nn.Parameter(torch.randn(1, 1, 8, 8))
        self.d = nn.Linear(12, 6)
        self.pos = nn.Parameter(torch.randn(1, 64, 6))
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        y = self.a(x)
        y = y + self.gamma * torch.relu(self.b(y))
        y = torch.relu(self.c(y) + self.shift) * self.spot
        t = self.d(y.flatten(2).transpose(1, 2)) + self.pos     # (N, 64, 6)
        return self.fc(torch.relu(t).mean(1))


def test_per_channel_constants_prune_with_their_channels_also_from_onnx(tmp_path):
    from checks import read_back
    torch.manual_seed(0)
    model = PerChannelConstants().eval()
    x = torch.randn(3, 1, 8, 8)
    for source in (model, read_back(model, (1, 1, 8, 8), x, tmp_path, exporters=(False,))):
        graph = DepGraph(source, torch.randn(1, 1, 8, 8))
        assert sorted(g.units for g in graph.groups) == [6, 8, 12]
        pruned, record = prune(source, torch.randn(1, 1, 8, 8), criterion="l1", ratios=0.5)
        assert conv_widths(pruned) == [4, 4, 6]
        # the model's own tensors (ONNX's exporter folds the shift into c's bias)
        consts = {tuple(t.shape) for n, t in [*pruned.named_parameters(),
                                               *pruned.named_buffers()] if "." not in n}
        assert {(4, 1, 1), (1, 1, 8, 8), (1, 64, 3)} <= consts <= {(4, 1, 1), (1, 1, 8, 8),
                                                                   (1, 64, 3), (1, 6, 1, 1)}
        _check_equivalent(source, pruned, record, x)


class ConstantReadTwice(nn.Module):
    """One per-channel parameter scales two tensors (their channels prune together), and a
    bias that a concatenation also reads (it cannot be cut: those channels are kept)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(1, 6, 3, padding=1), nn.Conv2d(1, 6, 3, padding=1)
        self.c, self.d = nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(4, 4, 1)
        self.scale = nn.Parameter(torch.rand(1, 6, 1, 1) + 0.5)
        self.bias = nn.Parameter(torch.randn(1, 4, 1, 1))
        self.fc = nn.Linear(6 + 6 + 4, 3)

    def forward(self, x):
        u, v = self.a(x) * self.scale, self.b(x) * self.scale
        w = self.d(self.c(x) + self.bias)
        w = torch.cat([w, self.bias.expand(x.shape[0], 4, 1, 8)], 2)     # a row more
        return self.fc(torch.cat([u.mean((2, 3)), v.mean((2, 3)), w.mean((2, 3))], 1))


def test_a_constant_read_twice_prunes_both_readers_alike_or_is_kept():
    model, by_layer = _built(ConstantReadTwice)
    assert by_layer["a"] is by_layer["b"] and by_layer["a"].units == 6
    assert "c" not in by_layer
    pruned, record = prune(model, torch.randn(1, 1, 8, 8), criterion="l1", ratios=0.5)
    assert conv_widths(pruned) == [3, 3, 4, 4] and pruned.scale.shape == (1, 3, 1, 1)
    assert pruned.bias.shape == (1, 4, 1, 1)
    _check_equivalent(model, pruned, record, torch.randn(3, 1, 8, 8))


class BiasReadAsAConstant(nn.Module):
    """A Linear's bias also added on its own (an unrolled recurrent layer's first step reads
    its hidden Linear's bias so): the tensor it is added to prunes with that Linear's outputs,
    and surgery cuts the bias once, with the Linear."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.fc = nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.b(torch.relu(self.a(x) + self.b.bias))))


def test_a_layers_bias_read_as_a_constant_prunes_with_the_layer():
    torch.manual_seed(0)
    model = BiasReadAsAConstant().eval()
    graph = DepGraph(model, torch.randn(1, 4))
    assert [g.layers for g in graph.groups] == [["a", "b"]]
    pruned, record = prune(model, torch.randn(1, 4), criterion="l1", ratios=0.5)
    assert (pruned.a.out_features, pruned.b.in_features, pruned.b.bias.shape) == (4, 4, (4,))
    _check_equivalent(model, pruned, record, torch.randn(3, 4))
