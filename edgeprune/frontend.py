"""Bring any model the user names to one form: a simplified ONNX graph with static shapes.

PyTorch models are exported with the TorchScript exporter (the dynamo one needs onnxscript);
ONNX files are checked, given static shapes, and simplified with onnxsim so BN and shape
arithmetic are folded before TVM sees them.
"""

import contextlib
import io
import os
import sys
import warnings
from pathlib import Path

import numpy as np
import onnx

from .errors import EdgepruneError

OPSET = 17


@contextlib.contextmanager
def stdout_to_stderr():
    """File descriptor 1 points at stderr meanwhile: what C++ code prints keeps off the
    standard output (a command's --json)."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def export_dynamo(model, x, **kwargs):
    """torch's default (torch.export) ONNX exporter on input `x`, without its progress lines
    on stdout or its notes on optional packages (torchvision) in the log; its ONNXProgram."""
    import logging

    import torch
    log = logging.getLogger("torch.onnx")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        return torch.onnx.export(model, (x,), dynamo=True, verbose=False, **kwargs)
    finally:
        log.setLevel(level)


def export_torch(model, input_shape: tuple[int, ...]) -> onnx.ModelProto:
    import torch

    from .layers import adaptive_pools_as_windows

    model = adaptive_pools_as_windows(model, tuple(input_shape))   # exporters refuse them
    x = torch.zeros(input_shape)
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            with stdout_to_stderr():    # its IR dump when it fails (from C++)
                torch.onnx.export(model.eval(), (x,), buf, dynamo=False, opset_version=OPSET,
                                  input_names=["input"], output_names=["output"])
        except Exception as legacy:
            # ops the legacy exporter lacks (RMSNorm, channel_shuffle): torch's default one
            try:
                return export_dynamo(model.eval(), x, input_names=["input"],
                                     output_names=["output"]).model_proto
            except Exception as e:
                raise EdgepruneError("the PyTorch model does not export to ONNX (legacy "
                                     f"exporter: {str(legacy).splitlines()[0]}; default "
                                     f"exporter: {str(e).splitlines()[0]})") from None
    return onnx.load_from_string(buf.getvalue())


def load_onnx(path: Path) -> onnx.ModelProto:
    if not path.exists():
        raise EdgepruneError(f"model file {path} does not exist")
    try:
        model = onnx.load(str(path))
        onnx.checker.check_model(model)
    except Exception as e:
        raise EdgepruneError(f"{path}: not a valid ONNX model ({type(e).__name__}: {e})")
    return model


def graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    inits = {i.name for i in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


def static_input_shapes(model: onnx.ModelProto, override: tuple[int, ...] | None,
                        origin: str) -> dict[str, tuple[int, ...]]:
    """The input shapes, made static: from the graph, or from --input-shape where it is dynamic."""
    inputs = graph_inputs(model)
    shapes = {}
    for inp in inputs:
        dims = inp.type.tensor_type.shape.dim
        shape = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
                      for d in dims)
        if override is not None:
            if len(inputs) > 1:
                raise EdgepruneError(f"{origin}: --input-shape is ambiguous for a model with "
                                     f"{len(inputs)} inputs")
            if len(override) != len(shape):
                raise EdgepruneError(f"{origin}: --input-shape {override} has rank {len(override)} "
                                     f"but input '{inp.name}' has rank {len(shape)}")
            for have, want in zip(shape, override):
                if have is not None and have != want:
                    raise EdgepruneError(f"{origin}: --input-shape {override} conflicts with the "
                                         f"static shape {shape} of input '{inp.name}'")
            shape = override
        if any(d is None for d in shape):
            raise EdgepruneError(f"{origin}: input '{inp.name}' has a dynamic shape "
                                 f"{tuple(d if d else '?' for d in shape)}; pass --input-shape")
        shapes[inp.name] = tuple(shape)
    return shapes


def simplify(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]], origin: str,
             keep_bn: bool = False) -> onnx.ModelProto:
    """onnxsim at static input shapes; keep_bn: leave BatchNormalization unfused."""
    import onnxsim

    try:
        # fuse_attention would write ONNX Runtime's com.microsoft Attention, not standard ONNX
        simplified, ok = onnxsim.simplify(
            model, overwrite_input_shapes={k: list(v) for k, v in shapes.items()},
            skip_fuse_bn=keep_bn, skipped_optimizers=["fuse_attention"])
    except Exception as e:
        raise EdgepruneError(f"{origin}: onnxsim could not simplify the graph: {e}")
    if not ok:
        raise EdgepruneError(f"{origin}: the simplified graph failed onnxsim's check")
    return simplified


def celu_as_elu(model: onnx.ModelProto) -> onnx.ModelProto:
    """Each Celu node written as alpha * Elu(x / alpha), which it equals: TVM's ONNX frontend
    has Elu but no Celu."""
    from onnx import helper, numpy_helper

    nodes = []
    for node in model.graph.node:
        if node.op_type != "Celu":
            nodes.append(node)
            continue
        alpha = next((a.f for a in node.attribute if a.name == "alpha"), 1.0)
        k = f"{node.output[0]}_celu"
        model.graph.initializer.append(numpy_helper.from_array(np.float32(alpha), k + "_alpha"))
        nodes += [helper.make_node("Div", [node.input[0], k + "_alpha"], [k + "_x"], k + "_div"),
                  helper.make_node("Elu", [k + "_x"], [k + "_elu"], k + "_elu", alpha=1.0),
                  helper.make_node("Mul", [k + "_elu", k + "_alpha"], list(node.output),
                                   k + "_mul")]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return model


def check_supported_ops(model: onnx.ModelProto, origin: str) -> None:
    """Name the first node whose op TVM's ONNX frontend cannot convert, before converting."""
    from tvm.relax.frontend.onnx import onnx_frontend

    known = onnx_frontend._get_convert_map()
    for node in model.graph.node:
        if node.op_type not in known:
            raise EdgepruneError(f"{origin}: node '{node.name or '(unnamed)'}' uses op "
                                 f"'{node.op_type}', which the TVM ONNX frontend does not support")


def check_one_output(model: onnx.ModelProto, origin: str) -> None:
    outs = model.graph.output
    if len(outs) != 1:
        raise EdgepruneError(f"{origin}: the model has {len(outs)} outputs "
                             f"({', '.join(o.name for o in outs)}); training and accuracy take "
                             "models with one output (export the one the chip should compute, "
                             "or concatenate them); `quantize`, `compile` and `prune` without "
                             "--data take several")


def to_onnx(spec: str, input_shape: tuple[int, ...] | None = None,
            origin: str | None = None) -> onnx.ModelProto:
    """Any model spec (zoo name, .pt, .onnx) as a simplified, static-shape ONNX model;
    `origin` names it in errors (else the spec does)."""
    from .load import is_zoo_name, load_torch

    path = Path(spec)
    origin = origin or spec
    if path.suffix == ".onnx" and not is_zoo_name(spec):
        model = load_onnx(path)
    else:
        module, shape = load_torch(spec, input_shape, several_outputs=True)
        model = export_torch(module, shape)
        input_shape = shape
    shapes = static_input_shapes(model, input_shape, origin)
    model = celu_as_elu(simplify(model, shapes, origin))
    check_supported_ops(model, origin)
    return model


def reference_run(model: onnx.ModelProto, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    """The model's outputs on the host, by ONNX's own reference evaluator (independent of TVM)."""
    from onnx.reference import ReferenceEvaluator

    return [np.asarray(o) for o in ReferenceEvaluator(model).run(None, inputs)]
