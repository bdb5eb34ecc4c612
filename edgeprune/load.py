"""Turn what the user names (a .pt / .onnx path or a zoo name) into a model and its input shape."""

from pathlib import Path

import torch
import torch.nn as nn

from . import models
from .errors import EdgepruneError

# Attribute under which edgeprune stores a module's static input shape when it saves it.
INPUT_SHAPE_ATTR = "edgeprune_input_shape"


# what a model argument may name, for the commands' help
MODEL_FILES = "a torch.save, TorchScript, torch.export (.pt2) or .onnx file"


def parse_shape(text: str | None) -> tuple[int, ...] | None:
    if not text:
        return None
    try:   # 1,1,28,28 or 1x1x28x28; an empty or other entry is an error, not skipped
        dims = tuple(int(d) for d in text.replace("x", ",").split(","))
    except ValueError:
        raise EdgepruneError(f"--input-shape '{text}' is not a list of integers like 1,1,28,28")
    if not dims or any(d <= 0 for d in dims):
        raise EdgepruneError(f"--input-shape '{text}' must have positive dimensions")
    return dims


def is_zoo_name(spec: str) -> bool:
    return spec in models.ZOO and not Path(spec).exists()


def load_torch(spec: str, input_shape: tuple[int, ...] | None = None,
               num_classes: int = 10, data_shape: tuple[int, ...] | None = None,
               several_outputs: bool = False) -> tuple[nn.Module, tuple[int, ...]]:
    """A torch module (eval mode) and its input shape from a zoo name or a model file. The
    shape: `input_shape`, else the one the file stores, else `data_shape` (one sample of the
    data it will run on). A model that returns several tensors is refused unless
    `several_outputs` (quantization takes one; pruning and training need one)."""
    if is_zoo_name(spec):
        return models.build(spec, input_shape, num_classes=num_classes)
    path = Path(spec)
    if not path.exists():
        raise EdgepruneError(f"model file {path} does not exist (nor is '{spec}' a zoo model: "
                             f"{', '.join(models.zoo_names())})")
    if path.suffix == ".onnx":
        from .onnx_to_torch import onnx_to_torch
        model, shape = onnx_to_torch(path, input_shape, data_shape, several_outputs)
    elif path.suffix == ".pt2":      # torch.export.save: a graph of ATen ops
        program = torch.export.load(path)
        shape = input_shape or _example_shape(program, path)
        model, shape = _via_onnx(_pools_as_windows(program, tuple(shape)), shape, path,
                                 "an exported program")
    else:
        model = _torch_load(path)
        shape = input_shape or getattr(model, INPUT_SHAPE_ATTR, None) or \
            (data_shape and _shape_it_takes(model, tuple(data_shape)))
        if shape is None:
            raise EdgepruneError(f"{path}: the input shape is not stored in the model; "
                                 "pass --input-shape, e.g. --input-shape 1,1,28,28")
        if isinstance(model, torch.jit.ScriptModule):   # fx cannot trace TorchScript
            model, shape = _via_onnx(model, shape, path, "a TorchScript module")
    from .layers import (batch_first, drop_value_copies, drop_zero_states, fold_constants,
                         functional_inplace, lower_attention, lower_composites,
                         lower_functional_layers, lower_functional_norms, lower_group_norms,
                         lower_handwritten_norms, lower_recurrent, lower_statistics,
                         lower_transposed_convs)
    from .lift1d import is_1d, lift_1d
    model = _one_output(model.eval(), tuple(shape), spec, several_outputs)
    if not _traces(model):   # control flow on shapes, a loop over time steps: unrolled
        model, shape = _via_onnx(model, tuple(shape), path, "a model torch.fx cannot trace")
    model = functional_inplace(model, tuple(shape))   # y.relu_(): y = y.relu()
    model = drop_value_copies(model, tuple(shape))    # x.float(), x.contiguous(): x
    model = batch_first(model, tuple(shape))   # (T, N, C) for a GRU or transformer: (N, T, C)
    model = lower_transposed_convs(model)   # the convolutions they equal
    model = lower_attention(model)          # transformer layers as their Linears and matmuls
    model = drop_zero_states(model, tuple(shape))  # h0 = torch.zeros(...): the default
    model = lower_recurrent(model, tuple(shape))   # GRU/LSTM/RNN unrolled over their steps
    model = fold_constants(model)           # w[:, None, None]: a parameter of that shape
    model = lower_functional_layers(model, tuple(shape))   # F.conv2d(x, w): a Conv2d
    model = lower_handwritten_norms(model, tuple(shape))   # (x - mean) / sqrt(var + eps)
    model = lower_functional_norms(model, tuple(shape))    # F.layer_norm(x, s, w, b): a module
    model = lower_group_norms(model, tuple(shape))  # ONNX's reshape, InstanceNorm, reshape
    model = lower_statistics(model, tuple(shape))   # x.std(-1): means, a product, a root
    model = lower_composites(model, tuple(shape))   # GLU, Softmax2d: what they are made of
    if is_1d(model):   # every stage after this one works on 2-D convolutions
        return lift_1d(model, tuple(shape))
    return model.eval(), tuple(shape)


def _shape_it_takes(model: nn.Module, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The data's sample shape, or where the model does not run on it, the first other reading
    of the samples it runs on: channels-last images (N, H, W, C) as (N, C, H, W); signals
    stored lifted (N, C, 1, L) (ecg200) as (N, C, L); (N, A, B) as grey images (N, 1, A, B)
    or as signals (N, L, C) channels first, (N, C, L) (fit_data then moves the samples'
    values)."""
    def runs(s) -> bool:
        try:
            with torch.no_grad():
                model.eval()(torch.zeros(s))
        except Exception:
            return False
        return True
    others = []
    if len(shape) == 4 and shape[3] in (1, 3, 4) and shape[1] not in (1, 3, 4):
        others.append((shape[0], shape[3], shape[1], shape[2]))
    if len(shape) == 4 and shape[2] == 1:
        others.append((shape[0], shape[1], shape[3]))
    if len(shape) == 3:
        others += [(shape[0], 1, shape[1], shape[2]), (shape[0], shape[2], shape[1])]
    if not others or runs(shape):
        return shape
    return next((s for s in others if runs(s)), shape)


def _via_onnx(source, shape: tuple[int, ...], path: Path, what: str):
    """A TorchScript module, an exported program or a module fx cannot trace, as the torch
    model its ONNX export reads back to (torch's exporters read all three, at a static
    shape)."""
    import tempfile

    from .frontend import export_dynamo, stdout_to_stderr
    from .onnx_to_torch import onnx_to_torch
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = Path(tmp) / "model.onnx"
        try:
            if isinstance(source, torch.jit.ScriptModule):   # only the legacy exporter reads it
                with stdout_to_stderr():
                    torch.onnx.export(source, (torch.zeros(shape),), str(onnx_path),
                                      dynamo=False)
            else:
                export_dynamo(source, torch.zeros(shape)).save(str(onnx_path))
        except Exception as e:
            raise EdgepruneError(f"{path}: {what} that torch cannot export to ONNX on an "
                                 f"input of shape {list(shape)} ({type(e).__name__}: "
                                 f"{str(e).splitlines()[0] if str(e) else ''}); save the "
                                 "nn.Module itself, a torch.jit.trace of it (loops "
                                 "unrolled), or its ONNX export") from None
        try:
            return onnx_to_torch(onnx_path, tuple(shape))
        except EdgepruneError as e:   # name the route: the user gave no ONNX file
            avoid = ("a forward torch.fx can trace (no Python control flow on shapes or values)"
                     if isinstance(source, nn.Module) and
                     not isinstance(source, torch.jit.ScriptModule) else
                     "saving the nn.Module itself (torch.save)")
            raise EdgepruneError(f"{path}: {what}, read through torch's ONNX export of it: "
                                 f"{e.args[0]}; {avoid} avoids the export",
                                 stage=e.stage) from None


def _pools_as_windows(program, shape: tuple[int, ...]):
    """An exported program, or where it has an adaptive average pool whose size does not
    divide its input, its module with that pool written as window means (torch's exporter
    writes such a pool as GatherND, which no stage takes; layers.adaptive_pools_as_windows)."""
    from .layers import adaptive_pools_as_windows
    module = program.module()
    rewritten = adaptive_pools_as_windows(module, shape)
    return program if rewritten is module else rewritten


def _traces(model: nn.Module) -> bool:
    """torch.fx can trace `model` (modules of torch.nn are leaves, as every stage has them)."""
    try:
        torch.fx.symbolic_trace(model)
    except Exception:
        return False
    return True


def _example_shape(program, path: Path) -> tuple[int, ...]:
    """The shape of an exported program's one example input."""
    args = (program.example_inputs or ((), {}))[0]
    if len(args) != 1 or not isinstance(args[0], torch.Tensor):
        raise EdgepruneError(f"{path}: the exported program stores no single example input; "
                             "pass --input-shape, e.g. --input-shape 1,1,28,28")
    return tuple(args[0].shape)


class OnlyOutput(nn.Module):
    """A model that returns one tensor in a tuple, list or dict, returning that tensor."""

    def __init__(self, model: nn.Module, key):
        super().__init__()
        self.model, self.key = model, key

    def forward(self, x):
        return self.model(x)[self.key]


def _one_output(model: nn.Module, shape: tuple[int, ...], spec: str,
                several: bool = False) -> nn.Module:
    """`model`, returning its one tensor (or, if `several`, its tuple of tensors): every stage
    but quantization runs models that return one tensor; say so before one of them trips."""
    try:
        with torch.no_grad():
            out = model(torch.zeros(shape))
    except Exception as e:
        inputs = _required_inputs(model)
        if len(inputs) > 1:
            raise EdgepruneError(f"{spec}: the model takes {len(inputs)} inputs "
                                 f"({', '.join(inputs)}); prune, quantize and deploy take models "
                                 "with one input (compile, simulate and profile take several, "
                                 "in float, from its ONNX export)") from None
        hint = ""
        if len(shape) == 4 and shape[3] in (1, 3, 4) and shape[1] not in (1, 3, 4):
            hint = ("; channels-last samples? a PyTorch conv takes (N, C, H, W): store them as "
                    f"x.transpose(0, 3, 1, 2), or pass --input-shape {shape[0]},{shape[3]},"
                    f"{shape[1]},{shape[2]}")
        embeddings = [n for n, m in model.named_modules() if isinstance(m, nn.Embedding)]
        if embeddings and "indices" in str(e):
            hint = (f"; layer '{embeddings[0]}' (Embedding) reads integer indices (tokens): "
                    "edgeprune runs models on real-valued samples; look the vectors up "
                    "before the model and give it those")
        raise EdgepruneError(f"{spec}: the model does not run on an input of shape "
                             f"{list(shape)} ({type(e).__name__}: {e}){hint}") from None
    if isinstance(out, (tuple, list, dict)) and len(out) == 1:
        key = next(iter(out)) if isinstance(out, dict) else 0
        if isinstance(out[key], torch.Tensor):
            return OnlyOutput(model, key)
    if several and isinstance(out, (tuple, list)) and \
            all(isinstance(t, torch.Tensor) for t in out):
        return model
    if not isinstance(out, torch.Tensor):
        what = (f"a {type(out).__name__} of {len(out)}" if isinstance(out, (tuple, list, dict))
                else f"a {type(out).__name__}")
        raise EdgepruneError(f"{spec}: the model returns {what}, not one tensor; only models "
                             "with one output are supported here (return the one the chip "
                             "should compute, or concatenate them; `quantize`, `compile` and "
                             "`prune` without --data take several)")
    return model


def _required_inputs(model: nn.Module) -> list[str]:
    """The names of the arguments `model.forward` requires."""
    import inspect
    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return []
    return [p.name for p in params if p.default is inspect.Parameter.empty and
            p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]


def _torch_load(path: Path) -> nn.Module:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        # A whole pickled nn.Module cannot load with weights_only; it is the user's own file.
        try:
            obj = torch.load(path, map_location="cpu", weights_only=False)
        except (AttributeError, ModuleNotFoundError) as e:   # the pickle names a class
            raise EdgepruneError(f"{path}: the saved module's class cannot be imported here "
                                 f"({type(e).__name__}: {e}); define it in a module on "
                                 "PYTHONPATH (not in the script that saved it), or export the "
                                 "model to ONNX") from None
        except Exception as e:
            raise EdgepruneError(f"{path}: not a PyTorch model file ({type(e).__name__}: {e})")
    if isinstance(obj, dict) and "zoo" in obj and "state_dict" in obj:
        model, shape = models.build(obj["zoo"], obj.get("input_shape"),
                                    num_classes=obj.get("num_classes", 10))
        model.load_state_dict(obj["state_dict"])
        setattr(model, INPUT_SHAPE_ATTR, shape)
        return model
    if isinstance(obj, dict):   # a training checkpoint: {"model": module, "epoch": ..., ...}
        held = [k for k, v in obj.items() if isinstance(v, nn.Module)]
        if len(held) == 1:
            obj = obj[held[0]]
        elif held:
            raise EdgepruneError(f"{path}: holds several modules ({', '.join(map(str, held))}); "
                                 "save the one to deploy by itself")
    if not isinstance(obj, nn.Module):
        what = ("a state_dict (weights without the module)" if isinstance(obj, dict) and obj
                and all(isinstance(v, torch.Tensor) for v in obj.values())
                else f"a {type(obj).__name__}")
        raise EdgepruneError(f"{path}: holds {what}, not an nn.Module (save the module "
                             "itself, or {'zoo': name, 'state_dict': ...})")
    # a half- or double-precision copy (mixed-precision training): every stage runs float32
    if any(t.is_floating_point() and t.dtype != torch.float32
           for t in [*obj.parameters(), *obj.buffers()]):
        obj = obj.float()
    return obj


def save_torch(model: nn.Module, input_shape: tuple[int, ...], path: Path) -> None:
    """Save a whole module with its input shape, so every command can load it back alone."""
    setattr(model, INPUT_SHAPE_ATTR, tuple(input_shape))
    torch.save(model, path)
