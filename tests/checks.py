"""Checks that many tests make: a pruned model equals the original with the same channels
zeroed; an integer model computes on the host and on a target exactly what the golden model
does."""

import numpy as np
import torch

from edgeprune.compile import compile_model
from edgeprune.prune import masked_reference, prune
from edgeprune.quantize import reference, to_relax
from edgeprune.simulate import simulate


def pruned_equivalently(model, shape, x, **prune_args):
    """prune(model) at `shape`, checked on `x` against the masked original; (pruned, record)."""
    pruned, record = prune(model, torch.randn(shape), **prune_args)
    with torch.no_grad():
        with masked_reference(model, record["layers"]):
            want = model(x)
        torch.testing.assert_close(pruned(x), want, atol=1e-4, rtol=1e-4)
    return pruned, record


def saved_and_loaded(model, shape, x, tmp_path):
    """`model` saved with torch.save and loaded as the pipeline loads it, checked on `x`;
    (loaded, its input shape)."""
    from edgeprune.load import load_torch
    torch.save(model, tmp_path / "m.pt")
    loaded, loaded_shape = load_torch(str(tmp_path / "m.pt"), shape)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
    return loaded, loaded_shape


def read_back(model, shape, x, tmp_path, exporters=(False, True), tol: float = 1e-4):
    """`model` exported to ONNX (torch's legacy exporter, then its default one) and read back,
    checked on `x` each time; the last one read back."""
    from edgeprune.onnx_to_torch import onnx_to_torch
    for dynamo in exporters:
        torch.onnx.export(model, (torch.zeros(shape),), str(tmp_path / "m.onnx"), dynamo=dynamo)
        back, _ = onnx_to_torch(tmp_path / "m.onnx")
        with torch.no_grad():
            torch.testing.assert_close(back(x), model(x), atol=tol, rtol=tol)
    return back


def conv_widths(model) -> list[int]:
    """The output channels of every Conv2d of `model`, in order (what pruning left)."""
    return [m.out_channels for m in model.modules() if isinstance(m, torch.nn.Conv2d)]


def bit_exact(qm, x: np.ndarray, target: str, tmp_path, on_target: int = 3, like=None,
              tol: float = 0.05) -> np.ndarray:
    """The golden model's dequantized outputs for float `x`, after checking that TVM's host
    build and the target in QEMU (its first `on_target` samples) compute them bit for bit,
    and, given the float model `like`, that they are within `tol` of its largest output."""
    xq = reference.quantize_input(qm, x)
    want = reference.run(qm, xq)
    assert np.array_equal(to_relax.build_host(to_relax.to_relax(qm, batch=len(x)))(xq), want)
    compile_model(qm.save(tmp_path / "q"), target, tmp_path / "b", log=lambda *a: None)
    result, _ = simulate(tmp_path / "b", np.asarray(x[:on_target], np.float32))
    assert result["outputs_match"] and result["mismatches"] == 0, result
    y = reference.dequantize_output(qm, want)
    if like is not None:
        with torch.no_grad():
            f = like(torch.from_numpy(np.asarray(x, np.float32))).numpy()
        assert np.abs(y - f).max() < tol * np.abs(f).max()
    return y
