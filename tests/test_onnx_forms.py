"""ONNX forms that exporters other than torch's write (hand-built graphs): Split into equal
pieces, the Upsample of opsets 7 to 9, the n-ary Sum."""

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
