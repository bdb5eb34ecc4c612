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


@pytest.mark.parametrize("k,s,p,op", [(3, 2, 1, 1), (4, 2, 1, 0), (3, 1, 1, 0), (2, 2, 0, 0),
                                      (5, 3, 2, 2), (3, 2, 0, 0)])
def test_a_transposed_conv_equals_its_convolution(k, s, p, op):
    torch.manual_seed(0)
    t = nn.ConvTranspose2d(4, 6, k, s, p, op)
    x = torch.randn(2, 4, 7, 5)
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


@pytest.mark.parametrize("layer,words", [
    (nn.ConvTranspose2d(4, 4, 3, 2, 1, groups=2), ["layer 'up'", "groups 2"]),
    (nn.ConvTranspose2d(4, 4, 3, 1, padding=3), ["layer 'up'", "padding [3, 3, 3, 3]",
                                                 "kernel [3, 3] - 1"]),
    (nn.ConvTranspose1d(4, 4, 3, 2), ["layer 'up'", "ConvTranspose1d"]),
])
def test_transposed_convs_without_a_conv_form_are_named(layer, words):
    model = nn.Sequential()
    model.add_module("up", layer)
    with pytest.raises(EdgepruneError) as e:
        lower_transposed_convs(model)
    for w in words:
        assert w in str(e.value), (w, str(e.value))


@pytest.mark.parametrize("attrs,size", [
    ({"strides": [2, 2], "pads": [0, 1, 1, 0]}, (14, 14)),                    # uneven pads
    ({"strides": [3, 2], "pads": [1, 1, 1, 1], "output_padding": [1, 0]}, (20, 13)),
    ({"strides": [2, 2], "auto_pad": "SAME_UPPER"}, (14, 14)),               # Keras 'same'
    ({"strides": [2, 2], "output_shape": [15, 15]}, (15, 15)),
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
        full = F.conv_transpose2d(x, torch.from_numpy(w), stride=s)   # (7 - 1) * s + 3
        op = attrs.get("output_padding", [0, 0])
        full = F.pad(full, (0, op[1], 0, op[0]))
        total = [f - n for f, n in zip(full.shape[2:], size)]
        t, l, b, r = attrs.get("pads") or [total[0] // 2, total[1] // 2,
                                           total[0] - total[0] // 2, total[1] - total[1] // 2]
        want = full[:, :, t:full.shape[2] - b, l:full.shape[3] - r]
    assert tuple(got.shape[2:]) == size
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
