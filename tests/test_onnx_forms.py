"""ONNX forms that exporters other than torch's write (hand-built graphs): Split into equal
pieces, the Upsample of opsets 7 to 9, the n-ary Sum and Mean, shrinks, Lp norms and pools."""

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn
from onnx import TensorProto, helper, numpy_helper

from edgeprune.errors import EdgepruneError
from edgeprune.onnx_to_torch import onnx_to_torch


def _read_back(tmp_path, nodes, in_shape, out_shape, opset=13, inits=()):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, list(in_shape))
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, list(out_shape))
    graph = helper.make_graph(nodes, "g", [x], [y], initializer=list(inits))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    onnx.save(model, tmp_path / "m.onnx")
    back, _ = onnx_to_torch(tmp_path / "m.onnx")
    return back


def test_onnx_split_forms_read_back(tmp_path):
    nodes = [helper.make_node("Split", ["x"], ["p", "q", "r"], axis=1),      # equal pieces
             helper.make_node("Concat", ["r", "p", "q"], ["y"], axis=1)]
    back = _read_back(tmp_path, nodes, (1, 6, 4, 4), (1, 6, 4, 4))
    t = torch.randn(1, 6, 4, 4)
    torch.testing.assert_close(back(t), torch.cat([t[:, 4:], t[:, :4]], 1))



def test_opset9_upsample_and_sum_read_back(tmp_path):
    scales = numpy_helper.from_array(np.array([1, 1, 2, 3], np.float32), "scales")
    nodes = [helper.make_node("Upsample", ["x", "scales"], ["u"], mode="nearest"),
             helper.make_node("Relu", ["u"], ["r"]),
             helper.make_node("Sum", ["u", "r", "u"], ["y"])]
    back = _read_back(tmp_path, nodes, (1, 2, 3, 4), (1, 2, 6, 12), opset=9, inits=[scales])
    t = torch.randn(2, 2, 3, 4)
    u = t.repeat_interleave(2, 2).repeat_interleave(3, 3)
    torch.testing.assert_close(back(t), u + torch.relu(u) + u)


def test_opset9_linear_upsample_is_refused_by_name(tmp_path):
    scales = numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales")
    nodes = [helper.make_node("Upsample", ["x", "scales"], ["y"], mode="linear")]
    with pytest.raises(EdgepruneError, match="Upsample.*linear by scales"):
        _read_back(tmp_path, nodes, (1, 2, 3, 4), (1, 2, 6, 8), opset=9, inits=[scales])


def test_depth_space_pads_and_extrema_read_back_as_onnx_computes_them(tmp_path):
    """DepthToSpace in both modes, SpaceToDepth, Pad in reflect/edge/wrap modes, Max and Min
    of tensors, ReduceSum: compared with ONNX's own reference evaluator."""
    from onnx.reference import ReferenceEvaluator
    pads = numpy_helper.from_array(np.array([0, 0, 1, 2, 0, 0, 2, 1], np.int64), "pads")
    axes = numpy_helper.from_array(np.array([1], np.int64), "axes")
    nodes = [helper.make_node("DepthToSpace", ["x"], ["dcr"], blocksize=2, mode="DCR"),
             helper.make_node("DepthToSpace", ["x"], ["crd"], blocksize=2, mode="CRD"),
             helper.make_node("Max", ["dcr", "crd"], ["hi"]),
             helper.make_node("Pad", ["hi", "pads"], ["r"], mode="reflect"),
             helper.make_node("Pad", ["hi", "pads"], ["e"], mode="edge"),
             helper.make_node("Pad", ["hi", "pads"], ["w"], mode="wrap"),
             helper.make_node("Min", ["r", "e", "w"], ["lo"]),
             helper.make_node("SpaceToDepth", ["lo"], ["s"], blocksize=3),
             helper.make_node("ReduceSum", ["s", "axes"], ["y"], keepdims=1)]
    back = _read_back(tmp_path, nodes, (1, 8, 3, 3), (1, 1, 3, 3), opset=18,
                      inits=[pads, axes])
    t = np.random.default_rng(0).normal(size=(1, 8, 3, 3)).astype(np.float32)
    want = ReferenceEvaluator(str(tmp_path / "m.onnx")).run(None, {"x": t})[0]
    np.testing.assert_allclose(back(torch.from_numpy(t)).numpy(), want, rtol=1e-5, atol=1e-5)


def test_an_onnx_file_with_free_spatial_axes_takes_the_data_shape(tmp_path):
    """Free H and W (a fully convolutional export): the data's sample shape fixes them; with
    neither that nor --input-shape, the error says which axes are free."""
    from edgeprune.load import load_torch
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 10)).eval()
    torch.onnx.export(model, (torch.zeros(1, 1, 28, 28),), str(tmp_path / "m.onnx"),
                      dynamo=False, input_names=["x"],
                      dynamic_axes={"x": {0: "n", 2: "h", 3: "w"}})
    with pytest.raises(EdgepruneError, match=r"dynamic shape \('\?', 1, '\?', '\?'\)"):
        load_torch(str(tmp_path / "m.onnx"))
    back, shape = load_torch(str(tmp_path / "m.onnx"), data_shape=(1, 1, 20, 20))
    assert shape == (1, 1, 20, 20)
    x = torch.randn(2, 1, 20, 20)
    with torch.no_grad():
        torch.testing.assert_close(back(x), model(x), atol=1e-5, rtol=1e-5)


def _activations_and_norms():
    """ThresholdedRelu, Shrink, Mean, LpNormalization and a GlobalLpPool of p=2."""
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"], pads=[1, 1, 1, 1]),
             helper.make_node("ThresholdedRelu", ["a"], ["b"], alpha=0.2),
             helper.make_node("Conv", ["b", "w2"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Shrink", ["c"], ["s"], lambd=0.3, bias=0.1),
             helper.make_node("Conv", ["s", "w3"], ["t"], pads=[1, 1, 1, 1]),
             helper.make_node("Mean", ["s", "t"], ["m"]),
             helper.make_node("LpNormalization", ["m"], ["n"], axis=1, p=2),
             helper.make_node("Conv", ["n", "w4"], ["u"]),
             helper.make_node("GlobalLpPool", ["u"], ["g"], p=2)]
    return nodes, dict(w1=(8, 1, 3, 3), w2=(8, 8, 3, 3), w3=(8, 8, 3, 3), w4=(6, 8, 3, 3),
                       fc=(4, 6))


def _sums_of_powers():
    """ReduceSumSquare, ReduceL1 and a GlobalLpPool of p=1, added by a Sum."""
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["a"], ["r"]),
             helper.make_node("Conv", ["r", "w2"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("ReduceSumSquare", ["c", "axes"], ["q"], keepdims=1),
             helper.make_node("ReduceL1", ["c", "axes"], ["l"], keepdims=1),
             helper.make_node("GlobalLpPool", ["c"], ["g"], p=1),
             helper.make_node("Sum", ["q", "l", "g"], ["z"])]
    return nodes, dict(w1=(8, 1, 3, 3), w2=(8, 8, 3, 3), fc=(4, 8))


@pytest.mark.parametrize("graph, widths", [(_activations_and_norms, [4, 4, 4, 3]),
                                           (_sums_of_powers, [4, 4])])
def test_onnx_activations_norms_and_reductions_prune_and_run_bit_exact(graph, widths,
                                                                       tmp_path):
    """Ops other exporters write, read as torch ops every stage knows: checked against ONNX's
    reference evaluator (its GlobalLpPool as the ReduceL1/L2 it equals: it has none)."""
    from onnx.reference import ReferenceEvaluator

    from checks import bit_exact, conv_widths, pruned_equivalently
    from edgeprune.load import load_torch
    from edgeprune.quantize import ptq

    rng = np.random.default_rng(0)
    nodes, shapes = graph()
    nodes += [helper.make_node("Flatten", [nodes[-1].output[0]], ["f"]),
              helper.make_node("Gemm", ["f", "fc"], ["y"], transB=1)]
    inits = [numpy_helper.from_array(rng.normal(size=s).astype(np.float32) * 0.5, k)
             for k, s in shapes.items()] + [numpy_helper.from_array(np.array([2, 3]), "axes")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, [1, 1, 8, 8])], [helper.make_tensor_value_info(
            "y", TensorProto.FLOAT, [1, 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.save(model, tmp_path / "m.onnx")
    for node in model.graph.node:
        if node.op_type == "GlobalLpPool":
            p = next(a.i for a in node.attribute if a.name == "p")
            node.CopyFrom(helper.make_node(f"ReduceL{p}", [node.input[0], "axes"],
                                           list(node.output), keepdims=1))
    x = rng.normal(size=(4, 1, 8, 8)).astype(np.float32)
    want = np.concatenate([ReferenceEvaluator(model).run(None, {"x": x[i:i + 1]})[0]
                           for i in range(len(x))])
    loaded, shape = load_torch(str(tmp_path / "m.onnx"))
    with torch.no_grad():
        got = loaded(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    pruned, _ = pruned_equivalently(loaded, shape, torch.from_numpy(x), ratios=0.5)
    assert conv_widths(pruned) == widths
    qm = ptq.quantize_ptq(pruned, shape, rng.normal(size=(64, 1, 8, 8)).astype(np.float32))
    bit_exact(qm, x, "cortex-m7", tmp_path, like=pruned, tol=0.1)


def test_norms_these_stages_cannot_take_are_named(tmp_path):
    with pytest.raises(EdgepruneError, match="'n' \\(LpNormalization\\): p=1"):
        _read_back(tmp_path, [helper.make_node("LpNormalization", ["x"], ["y"], "n", p=1)],
                   (1, 4, 3, 3), (1, 4, 3, 3))
    with pytest.raises(EdgepruneError, match="'g' \\(GlobalLpPool\\): p=3"):
        _read_back(tmp_path, [helper.make_node("GlobalLpPool", ["x"], ["y"], "g", p=3)],
                   (1, 4, 3, 3), (1, 4, 1, 1))
