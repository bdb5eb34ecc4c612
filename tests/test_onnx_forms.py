"""ONNX forms that exporters other than torch's write (hand-built graphs): Split into equal
pieces, the Upsample of opsets 7 to 9, the n-ary Sum."""

import numpy as np
import onnx
import pytest
import torch
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
