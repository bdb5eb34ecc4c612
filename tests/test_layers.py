"""Transposed convolutions run as the convolutions they equal (edgeprune.layers): the same
function, pruned as real Conv2d layers, int8 bit-exact on the host and on a target."""

import copy

import numpy as np
import pytest
import torch
import torch.fx as fx
import torch.nn as nn

from edgeprune import data
from edgeprune.errors import EdgepruneError
from edgeprune.layers import ConvTransposeAsConv, lower_transposed_convs, zero_insert
from edgeprune.lift1d import lift_1d


@pytest.mark.parametrize("k,s,p,op,g,d", [
    (3, 2, 1, 1, 1, 1), (4, 2, 1, 0, 1, 1), (3, 1, 1, 0, 1, 1), (2, 2, 0, 0, 1, 1),
    (5, 3, 2, 2, 1, 1), (3, 2, 0, 0, 1, 1),
    (4, 2, 1, 0, 2, 1), (4, 2, 1, 0, 6, 1),                     # grouped, depthwise (in 6)
    (3, 2, 3, 1, 1, 2), (3, 1, 2, 0, 3, (2, 1))])                # dilated
def test_a_transposed_conv_equals_its_convolution(k, s, p, op, g, d):
    torch.manual_seed(0)
    t = nn.ConvTranspose2d(6, 6, k, s, p, op, groups=g, dilation=d)
    x = torch.randn(2, 6, 7, 5)
    torch.testing.assert_close(ConvTransposeAsConv.from_module(t, "t")(x), t(x), atol=1e-5,
                               rtol=1e-4)


class ConvAutoencoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.e1, self.e2 = nn.Conv2d(1, 8, 3, 2, 1), nn.Conv2d(8, 16, 3, 2, 1)
        self.d1 = nn.ConvTranspose2d(16, 8, 3, 2, 1, output_padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.d2 = nn.ConvTranspose2d(8, 1, 4, 2, 1)

    def forward(self, x):
        h = torch.relu(self.e2(torch.relu(self.e1(x))))
        return torch.sigmoid(self.d2(torch.relu(self.bn(self.d1(h)))))


def test_conv_autoencoder_from_torch_and_onnx_prunes_and_runs_bit_exact(tmp_path):
    """The decoder's transposed convs, lowered from torch and imported from ONNX: the same
    outputs, pruned by half as Conv2d layers (equal to the masked original), int8 with the
    `dilate` op inserting zero points, bit-exact on the host for both and in QEMU on the M7."""
    from edgeprune.compile import compile_model
    from edgeprune.onnx_to_torch import onnx_to_torch
    from edgeprune.prune import masked_reference, prune
    from edgeprune.quantize import ptq, reference, to_relax
    from edgeprune.simulate import simulate

    torch.manual_seed(0)
    model = ConvAutoencoder().eval()
    torch.onnx.export(model, (torch.zeros(1, 1, 28, 28),), str(tmp_path / "cae.onnx"),
                      dynamo=False)
    from_onnx, shape = onnx_to_torch(tmp_path / "cae.onnx")
    lowered = lower_transposed_convs(copy.deepcopy(model))
    assert not any(isinstance(m, nn.ConvTranspose2d) for m in lowered.modules())
    x = torch.from_numpy(data.load("fashion-mnist").x_test[:8])
    for m in (from_onnx, lowered):
        with torch.no_grad():
            torch.testing.assert_close(m(x), model(x), atol=1e-5, rtol=1e-4)
        pruned, record = prune(m, torch.zeros(shape), criterion="l1", ratios=0.5)
        assert [c.out_channels for c in pruned.modules() if isinstance(c, nn.Conv2d)] == \
            [4, 8, 4, 1]
        with torch.no_grad(), masked_reference(m, record["layers"]):
            torch.testing.assert_close(pruned(x), m(x), atol=1e-5, rtol=1e-4)
        # the pruned model's ONNX (what prune and deploy write) reads back: the zero insertion
        # exports as a 1x1 transposed conv of ones per channel and returns as zero_insert
        torch.onnx.export(pruned, (torch.zeros(shape),), str(tmp_path / "p.onnx"), dynamo=False)
        again, _ = onnx_to_torch(tmp_path / "p.onnx")
        with torch.no_grad():
            torch.testing.assert_close(again(x), pruned(x), atol=1e-5, rtol=1e-4)
        assert sum(n.target is zero_insert for n in fx.symbolic_trace(again).graph.nodes) == 2
        qm = ptq.quantize_ptq(pruned, shape, x.numpy())
        dilates = [o for o in qm.ops if o.kind == "dilate"]
        assert [o.attrs["strides"] for o in dilates] == [[2, 2], [2, 2]]
        xq = reference.quantize_input(qm, x.numpy())
        want = reference.run(qm, xq)
        assert np.array_equal(to_relax.build_host(to_relax.to_relax(qm, batch=8))(xq), want)
        with torch.no_grad():
            assert np.abs(reference.dequantize_output(qm, want) - pruned(x).numpy()).max() < 0.05
    compile_model(str(qm.save(tmp_path / "q")), "cortex-m7", tmp_path / "b", log=lambda *a: None)
    result, _ = simulate(tmp_path / "b", x.numpy()[:2])
    assert result["outputs_match"] and result["mismatches"] == 0, result


def test_transposed_convs_without_a_conv_form_are_named():
    """Padding beyond the (dilated) kernel would crop the output: refused, naming the layer."""
    model = nn.Sequential()
    model.add_module("up", nn.ConvTranspose2d(4, 4, 3, 1, padding=3))
    with pytest.raises(EdgepruneError, match=r"layer 'up'.*padding \[3, 3, 3, 3\].*"
                                             r"dilated kernel \[3, 3\] - 1"):
        lower_transposed_convs(model)
    one_d = nn.Sequential()
    one_d.add_module("up", nn.ConvTranspose1d(4, 4, 3, 1, padding=3))
    with pytest.raises(EdgepruneError, match=r"'up'.*padding \[0, 3, 0, 3\]"):
        lift_1d(one_d, (1, 4, 20))


class Decoder1d(nn.Module):
    """A 1-D decoder: a depthwise and a plain transposed conv (output_padding)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv1d(2, 8, 5, 2, 2)
        self.up = nn.ConvTranspose1d(8, 8, 4, 2, 1, groups=8)
        self.out = nn.ConvTranspose1d(8, 2, 3, 2, 1, output_padding=1)

    def forward(self, x):
        return self.out(torch.relu(self.up(torch.relu(self.a(x))))).flatten(1)


def test_1d_transposed_convs_from_torch_and_onnx_lift_and_run_bit_exact(tmp_path):
    """nn.ConvTranspose1d (and ONNX's 1-D ConvTranspose) lift with the 1-D model to the
    convolutions they equal; the int8 model is bit-exact on the host."""
    from edgeprune.load import load_torch
    from edgeprune.quantize import ptq, reference, to_relax

    torch.manual_seed(0)
    model = Decoder1d().eval()
    torch.save(model, tmp_path / "d.pt")
    torch.onnx.export(model, (torch.zeros(1, 2, 40),), str(tmp_path / "d.onnx"), dynamo=False)
    x = torch.randn(8, 2, 40)
    for path in (tmp_path / "d.pt", tmp_path / "d.onnx"):
        lifted, shape = load_torch(str(path), (1, 2, 40))
        assert shape == (1, 2, 1, 40)
        assert sum(isinstance(m, ConvTransposeAsConv) for m in lifted.modules()) == 2
        with torch.no_grad():
            torch.testing.assert_close(lifted(x[:, :, None]), model(x), atol=1e-5, rtol=1e-4)
        qm = ptq.quantize_ptq(lifted, shape, x[:, :, None].numpy())
        xq = reference.quantize_input(qm, x[:, :, None].numpy())
        got = to_relax.build_host(to_relax.to_relax(qm, batch=8))(xq)
        assert np.array_equal(got, reference.run(qm, xq))


@pytest.mark.parametrize("attrs,size", [
    ({"strides": [2, 2], "pads": [0, 1, 1, 0]}, (14, 14)),                    # uneven pads
    ({"strides": [3, 2], "pads": [1, 1, 1, 1], "output_padding": [1, 0]}, (20, 13)),
    ({"strides": [2, 2], "auto_pad": "SAME_UPPER"}, (14, 14)),               # Keras 'same'
    ({"strides": [2, 2], "output_shape": [15, 15]}, (15, 15)),
    ({"strides": [2, 2], "pads": [1, 1, 1, 1], "group": 2, "dilations": [2, 1]}, (15, 13)),
])
def test_onnx_transposed_conv_padding_forms(tmp_path, attrs, size):
    """ONNX ConvTranspose pads, output_padding, auto_pad and output_shape, against the full
    transposed convolution cropped by the pads ONNX defines."""
    import onnx
    import torch.nn.functional as F
    from onnx import TensorProto, helper, numpy_helper

    from edgeprune.onnx_to_torch import onnx_to_torch

    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("ConvTranspose", ["x", "w"], ["y"], **attrs)], "t",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 7, 7])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", "c", "h", "w"])],
        [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, tmp_path / "t.onnx")
    x = torch.from_numpy(rng.standard_normal((1, 4, 7, 7)).astype(np.float32))
    with torch.no_grad():
        got = onnx_to_torch(tmp_path / "t.onnx")[0](x)
        s = attrs["strides"]
        full = F.conv_transpose2d(x, torch.from_numpy(w), stride=s, groups=attrs.get("group", 1),
                                  dilation=attrs.get("dilations", 1))
        op = attrs.get("output_padding", [0, 0])
        full = F.pad(full, (0, op[1], 0, op[0]))
        total = [f - n for f, n in zip(full.shape[2:], size)]
        t, l, b, r = attrs.get("pads") or [total[0] // 2, total[1] // 2,
                                           total[0] - total[0] // 2, total[1] - total[1] // 2]
        want = full[:, :, t:full.shape[2] - b, l:full.shape[3] - r]
    assert tuple(got.shape[2:]) == size
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("pads,output_padding,ok", [([1, 1], 1, True), ([2, 1], 0, True),
                                                    ([1, 2], 0, False)])
def test_onnx_1d_transposed_conv_pads(tmp_path, pads, output_padding, ok):
    """A 1-D ONNX ConvTranspose with pads torch's module can express (more at the start is
    made up by output_padding) equals the full transposed convolution cropped by its pads;
    one it cannot is refused, naming the node and pads."""
    import onnx
    import torch.nn.functional as F
    from onnx import TensorProto, helper, numpy_helper

    from edgeprune.onnx_to_torch import onnx_to_torch

    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 3, 3)).astype(np.float32)
    attrs = {"strides": [2], "pads": pads, "output_padding": [output_padding]}
    graph = helper.make_graph(
        [helper.make_node("ConvTranspose", ["x", "w"], ["y"], name="up", **attrs)], "t",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 9])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", "c", "l"])],
        [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, tmp_path / "t.onnx")
    if not ok:
        with pytest.raises(EdgepruneError, match=r"'up' \(ConvTranspose\): 1-D pads \[1, 2\]"):
            onnx_to_torch(tmp_path / "t.onnx")
        return
    x = torch.from_numpy(rng.standard_normal((1, 4, 9)).astype(np.float32))
    with torch.no_grad():
        got = onnx_to_torch(tmp_path / "t.onnx")[0](x)
        full = F.pad(F.conv_transpose1d(x, torch.from_numpy(w), stride=2), (0, output_padding))
    torch.testing.assert_close(got, full[:, :, pads[0]:full.shape[2] - pads[1]], atol=1e-5,
                               rtol=1e-4)


class DenseDecoder(nn.Module):
    """An autoencoder whose bottleneck is a Linear unflattened to maps for the decoder."""
    def __init__(self, view: bool):
        super().__init__()
        self.e = nn.Conv2d(1, 8, 3, stride=2, padding=1)
        self.bottleneck, self.expand = nn.Linear(8 * 7 * 7, 16), nn.Linear(16, 6 * 7 * 7)
        self.unflatten, self.view = nn.Unflatten(1, (6, 7, 7)), view
        self.d = nn.ConvTranspose2d(6, 4, 4, 2, 1)

    def forward(self, x):
        z = torch.relu(self.bottleneck(torch.relu(self.e(x)).flatten(1)))
        y = torch.relu(self.expand(z))
        y = y.view(-1, 6, 7, 7) if self.view else self.unflatten(y)
        return torch.sigmoid(self.d(y))


@pytest.mark.parametrize("view", [False, True])
def test_a_linear_unflattened_to_maps_prunes_by_channel(view):
    """Channel c of the unflattened maps is 49 outputs of the Linear: pruning it removes
    those rows and the decoder's input channel together."""
    from checks import pruned_equivalently
    from edgeprune.layers import lower_transposed_convs
    from edgeprune.quantize import ptq, reference, to_relax
    torch.manual_seed(0)
    model = lower_transposed_convs(DenseDecoder(view).eval())
    x = torch.rand(8, 1, 14, 14)
    pruned, _ = pruned_equivalently(model, (1, 1, 14, 14), x, ratios=0.5)
    assert pruned.expand.out_features == 3 * 49
    qm = ptq.quantize_ptq(pruned, (1, 1, 14, 14), x.numpy())
    xq = reference.quantize_input(qm, x[:2].numpy())
    assert np.array_equal(to_relax.build_host(to_relax.to_relax(qm, batch=2))(xq),
                          reference.run(qm, xq))
