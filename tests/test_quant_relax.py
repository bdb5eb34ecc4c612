"""to_relax(qmodel) compiled for the host (llvm) is bit-identical to the numpy golden model."""

import re

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from edgeprune import data, models
from edgeprune.errors import EdgepruneError
from edgeprune.quantize import ptq, reference, to_relax
from edgeprune.quantize.qmodel import window_counts
from edgeprune.quantize.requant import quantize_multipliers
from edgeprune.quantize.train_utils import quick_train

torch.set_num_threads(1)
N = 40


class Mix(nn.Module):
    """Every op kind: strided/dilated/asymmetric convs, depthwise, ReLU6, residual add,
    padded max and avg pools, global average pool, flatten, dense."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Sequential(nn.Conv2d(1, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.dw = nn.Sequential(nn.Conv2d(8, 8, 3, 2, 1, groups=8, bias=False), nn.BatchNorm2d(8),
                                nn.ReLU6())
        self.pw = nn.Sequential(nn.Conv2d(8, 8, 1, bias=False), nn.BatchNorm2d(8))
        self.relu = nn.ReLU()
        self.mp = nn.MaxPool2d(3, 2, 1)
        self.c3 = nn.Conv2d(8, 16, (3, 2), (1, 2), (1, 0), dilation=(2, 1))
        self.ap = nn.AvgPool2d(2, 1, 1)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        h = self.dw(self.c1(x))
        h = self.relu(self.pw(h) + h)
        h = torch.clamp(self.c3(self.mp(h)), -1.0, 4.0)
        return self.fc(self.gap(self.ap(h)).flatten(1))


@pytest.fixture(scope="module")
def fmnist():
    return data.load("fashion-mnist")


@pytest.fixture(scope="module")
def mix(fmnist):
    torch.manual_seed(0)    # the weights must not depend on which tests ran before in the process
    model = Mix().eval()
    quick_train(model, fmnist, samples=2000, epochs=1.0, lr=0.05)
    return model


def _check(qm, x):
    xq = reference.quantize_input(qm, x)
    want = reference.run(qm, xq)
    got = to_relax.build_host(to_relax.to_relax(qm, batch=len(x)))(xq)
    assert got.dtype == want.dtype
    assert np.array_equal(got, want), f"{int((got != want).sum())} mismatches"
    return want


def _onnx_round_trip(model, tmp_path, fmnist):
    """`model` exported to ONNX at (1, 1, 28, 28) and read back: the same outputs."""
    from edgeprune.onnx_to_torch import onnx_to_torch

    torch.onnx.export(model.eval(), (torch.zeros(1, 1, 28, 28),), str(tmp_path / "m.onnx"),
                      dynamo=False)
    back, _ = onnx_to_torch(tmp_path / "m.onnx")
    x = torch.from_numpy(fmnist.x_test[:N])
    with torch.no_grad():
        torch.testing.assert_close(back(x), model(x), atol=1e-5, rtol=1e-4)
    return back


def _kernels(qm):
    fused = to_relax.legalize_and_fuse(to_relax.to_relax(qm))
    return [b.value.args[0].name_hint for blk in fused["main"].body.blocks for b in blk.bindings]


def test_int8_mix_bit_exact_and_fused(fmnist, mix):
    qm = ptq.quantize_ptq(mix, (1, 1, 28, 28), fmnist.x_train[:200])
    kinds = {o.kind for o in qm.ops}
    assert kinds == {"conv2d", "dense", "add", "maxpool", "avgpool", "reshape"}
    out = _check(qm, fmnist.x_test[:N])
    assert len(np.unique(out.argmax(1))) > 1          # a live model, not a constant
    names = _kernels(qm)
    conv_kernels = [k for k in names if "conv2d" in k or "matmul" in k]
    # each conv/dense sits in one kernel with its requantization (multiply + shift + clip)
    assert len(conv_kernels) == len([o for o in qm.ops if o.kind in ("conv2d", "dense")]) + 1
    for k in conv_kernels:
        assert "right_shift" in k and "clip" in k, k


def test_packed_subbyte_int16_bit_exact(fmnist, mix):
    cfg = {"c1_0": ("int", 4), "dw_0": ("pow2", 4), "pw_0": ("ternary", 2), "c3": ("int", 2),
           "fc": ("int", 4)}
    qm = ptq.quantize_ptq(mix, (1, 1, 28, 28), fmnist.x_train[:200], weight_cfg=cfg,
                          act_dtypes={"dw_0": "int16", "c3": "int16"})
    _check(qm, fmnist.x_test[:N])
    packed = {}
    for blk in to_relax.legalize_and_fuse(to_relax.to_relax(qm))["main"].body.blocks:
        for b in blk.bindings:
            name = b.value.args[0].name_hint
            for f in b.value.args[1].fields:
                if hasattr(f, "value") and f.ty.dtype == "uint8":
                    packed[name] = f.value.numpy().size
    assert len(packed) == 5, packed
    # packed bytes reach the kernels: 8 * 9 weights at 4 bits = 36 bytes for c1
    assert 36 in packed.values(), packed
    # pow2 and packed kernels still fuse the requantization
    assert all("right_shift" in k for k in packed), packed


def test_zoo_cnn_bit_exact(fmnist):
    model, shape = models.build("cnn")
    quick_train(model, fmnist, samples=1000, epochs=0.5)
    qm = ptq.quantize_ptq(model, shape, fmnist.x_train[:100], calib_method="percentile")
    _check(qm, fmnist.x_test[:N])


class Cat(nn.Module):
    """Concatenations: branches with their own scales, a ReLU after the concat (fused into the
    branches' convs), the graph input as a branch, one tensor twice (an exact copy, its ReLU6
    fused into the concat) and dense outputs (2-D)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(1, 6, 3, 1, 1)
        self.b = nn.Conv2d(1, 4, 5, 1, 2)
        self.c = nn.Conv2d(11, 8, 3, 2, 1)
        self.fa = nn.Linear(16, 6)
        self.fb = nn.Linear(16, 4)
        self.fc = nn.Linear(10, 10)

    def forward(self, x):
        h = torch.relu(torch.cat([self.a(x), self.b(x)], 1))
        h = torch.relu(self.c(torch.cat((h, x), dim=1)))
        h = nn.functional.max_pool2d(h, 2)
        h = nn.functional.adaptive_avg_pool2d(F.relu6(torch.cat([h, h], -3)), 1).flatten(1)
        return self.fc(torch.cat([self.fa(h), torch.relu(self.fb(h))], -1))


def test_concat_bit_exact_on_host_and_in_qemu(fmnist, tmp_path):
    from edgeprune.compile import compile_model
    from edgeprune.simulate import simulate

    torch.manual_seed(0)
    model = Cat().eval()
    quick_train(model, fmnist, samples=2000, epochs=1.0, lr=0.05)
    shape = (2, 1, 28, 28)                      # a static batch of 2
    qm = ptq.quantize_ptq(model, shape, fmnist.x_train[:200], act_dtypes={"a": "int16"})
    cats = [o for o in qm.ops if o.kind == "concat"]
    assert len(cats) == 4 and cats[0].attrs["activation"] is None
    assert [o.attrs["activation"] for o in qm.ops if o.name in ("a", "b")] == ["relu", "relu"]
    assert cats[2].attrs["activation"] == "relu6"    # pieces from a pool: on the concat
    assert qm.tensors[cats[0].inputs[0]].dtype == "int16"
    out = _check(qm, fmnist.x_test[:N])
    with torch.no_grad():
        want = model(torch.from_numpy(fmnist.x_test[:N])).argmax(1).numpy()
    assert np.mean(out.argmax(1) == want) >= 0.9   # the integer model computes the same thing

    compile_model(str(qm.save(tmp_path / "q")), "cortex-m7", tmp_path / "b", log=lambda *a: None)
    result, _ = simulate(tmp_path / "b", fmnist.x_test[:4])
    assert result["outputs_match"] and result["mismatches"] == 0, result


class InceptionBN(nn.Module):
    """Branches concatenated, then one BatchNorm over them all (GoogLeNet's v1 style); `pooled`
    makes one branch a pool, whose values no conv's weights can scale."""

    def __init__(self, pooled: bool):
        super().__init__()
        self.pooled, self.stem = pooled, nn.Conv2d(1, 8, 3, 2, 1)
        self.b1, self.b3 = nn.Conv2d(8, 4, 1), nn.Conv2d(8, 6, 3, padding=1, bias=False)
        self.b5 = nn.Conv2d(8, 4, 5, padding=2)
        self.bn, self.fc = nn.BatchNorm2d(22 if pooled else 14), nn.Linear(22 if pooled else 14, 10)

    def forward(self, x):
        x = F.relu(self.stem(x))
        pieces = [self.b1(x), self.b3(x), self.b5(x)] + ([F.max_pool2d(x, 3, 1, 1)]
                                                         if self.pooled else [])
        return self.fc(F.relu(self.bn(torch.cat(pieces, 1))).mean((2, 3)))


@pytest.mark.parametrize("pooled", [False, True])
def test_batchnorm_after_a_concat_of_convs_folds_into_them(fmnist, pooled, tmp_path):
    """A BatchNorm after a concatenation of conv outputs folds into each branch's conv (no op of
    its own, no requantization per value), and the ReLU after it into their requantizations;
    with a pool's piece the BatchNorm stays a 1x1 depthwise conv.
    The integer model computes what the float one does, bit-exact on the host and the M7."""
    from edgeprune.compile import compile_model
    from edgeprune.simulate import simulate

    torch.manual_seed(0)
    model = InceptionBN(pooled).eval()
    quick_train(model, fmnist, samples=2000, epochs=1.0, lr=0.05)
    qm = ptq.quantize_ptq(model, (1, 1, 28, 28), fmnist.x_train[:200])
    convs = [o for o in qm.ops if o.kind == "conv2d"]
    assert len(convs) == 4 + pooled
    if not pooled:   # the ReLU too is in the branches: the concat writes no value of its own
        assert [o.attrs["activation"] for o in qm.ops if o.kind == "concat"] == [None]
        assert [o.attrs["activation"] for o in convs[1:]] == ["relu"] * 3
    out = _check(qm, fmnist.x_test[:N])
    with torch.no_grad():
        want = model(torch.from_numpy(fmnist.x_test[:N])).argmax(1).numpy()
    assert np.mean(out.argmax(1) == want) >= 0.9
    if not pooled:
        compile_model(str(qm.save(tmp_path / "q")), "cortex-m7", tmp_path / "b",
                      log=lambda *a: None)
        result, _ = simulate(tmp_path / "b", fmnist.x_test[:3])
        assert result["outputs_match"] and result["mismatches"] == 0, result


class PreAct(nn.Module):
    """Pre-activation residual block: BatchNorms with no conv before them (on the input, after
    the add) and shape arithmetic in forward (x.shape, x.size(0)) feeding functional pools."""

    def __init__(self):
        super().__init__()
        self.bn0 = nn.BatchNorm2d(1)
        self.c0 = nn.Conv2d(1, 8, 3, padding=1)
        self.bn1, self.c1 = nn.BatchNorm2d(8), nn.Conv2d(8, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        y = nn.functional.max_pool2d(self.c0(self.bn0(x)), x.size(-1) // 14)
        y = torch.relu(self.bn2(y + self.c1(torch.relu(self.bn1(y)))))
        y = nn.functional.avg_pool2d(y, y.shape[2:])
        return self.fc(y.view(y.size(0), -1))


def test_standalone_batchnorm_and_shape_arithmetic(fmnist):
    torch.manual_seed(0)
    model = PreAct().eval()
    quick_train(model, fmnist, samples=2000, epochs=1.0, lr=0.05)
    qm = ptq.quantize_ptq(model, (1, 1, 28, 28), fmnist.x_train[:200])
    # a BatchNorm with no conv before it becomes a per-channel scale: a 1x1 depthwise conv
    bns = [o for o in qm.ops if o.name in ("bn0", "bn2")]
    assert [(o.kind, o.attrs["groups"]) for o in bns] == [("conv2d", 1), ("conv2d", 8)]
    assert bns[1].attrs["activation"] == "relu"
    out = _check(qm, fmnist.x_test[:N])
    with torch.no_grad():
        want = model(torch.from_numpy(fmnist.x_test[:N])).argmax(1).numpy()
    assert np.mean(out.argmax(1) == want) >= 0.9


class Acts(nn.Module):
    """Activations that are not a clamp (hardswish, LeakyReLU, SiLU, GELU, tanh, sigmoid), and a
    ReLU after a pool (nothing to fuse it into)."""

    def __init__(self):
        super().__init__()
        self.c0, self.act0 = nn.Conv2d(1, 8, 3, padding=1), nn.Hardswish()
        self.c1, self.lrelu = nn.Conv2d(8, 8, 3, padding=1), nn.LeakyReLU(0.1)
        self.c2 = nn.Conv2d(8, 12, 3, stride=2, padding=1)
        self.fc = nn.Linear(12, 10)

    def forward(self, x):
        y = torch.relu(nn.functional.max_pool2d(self.act0(self.c0(x)), 2))
        y = self.lrelu(self.c1(y))
        y = torch.tanh(nn.functional.gelu(nn.functional.silu(self.c2(y))))
        return torch.sigmoid(self.fc(nn.functional.adaptive_avg_pool2d(y, 1).flatten(1)))


def test_table_activations_bit_exact(fmnist):
    torch.manual_seed(0)
    model = Acts().eval()
    quick_train(model, fmnist, samples=2000, epochs=1.0, lr=0.05)
    qm = ptq.quantize_ptq(model, (1, 1, 28, 28), fmnist.x_train[:200])
    luts = [o.attrs["function"] for o in qm.ops if o.kind == "lut"]
    assert luts == ["hardswish", "relu", "leaky_relu", "silu", "gelu", "tanh", "sigmoid"]
    out = _check(qm, fmnist.x_test[:N])
    with torch.no_grad():
        want = model(torch.from_numpy(fmnist.x_test[:N])).argmax(1).numpy()
    assert np.mean(out.argmax(1) == want) >= 0.9
    # a table needs an int8 input: int16 there is refused by name
    with pytest.raises(EdgepruneError, match="'act0'.*int8 input.*int16"):
        ptq.quantize_ptq(model, (1, 1, 28, 28), fmnist.x_train[:50], act_dtypes={"c0": "int16"})


def test_onnx_activations_convert_and_quantize(fmnist, tmp_path):
    """What exporters write for these activations (HardSwish, LeakyRelu, PRelu, Elu, Tanh,
    HardSigmoid, Sigmoid, Gelu, and x * Sigmoid(x) for SiLU) comes back as torch modules."""

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.Hardswish(), nn.MaxPool2d(2),
                          nn.LeakyReLU(0.1), nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.SiLU(),
                          nn.PReLU(), nn.Tanh(), nn.ELU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Hardsigmoid(), nn.Linear(8, 10), nn.GELU(), nn.Linear(10, 10),
                          nn.Sigmoid()).eval()
    quick_train(model, fmnist, samples=1000, epochs=1.0, lr=0.05)
    back = _onnx_round_trip(model, tmp_path, fmnist)
    kinds = [type(m).__name__ for m in back.modules() if not list(m.children())]
    for k in ("Hardswish", "LeakyReLU", "SiLU", "PReLU", "Tanh", "ELU", "Hardsigmoid", "GELU",
              "Sigmoid"):
        assert k in kinds, (k, kinds)
    qm = ptq.quantize_ptq(back, (1, 1, 28, 28), fmnist.x_train[:200])
    assert len([o for o in qm.ops if o.kind == "lut"]) == 9    # none is a clamp: 9 tables
    _check(qm, fmnist.x_test[:N])


def test_more_table_activations_from_torch_and_onnx(fmnist, tmp_path):
    """SELU, CELU, Softplus, Softsign, LogSigmoid, Tanhshrink, Hard/Softshrink, abs, exp and
    negation are elementwise: each becomes a 256-entry table, from torch modules, functions and
    the ONNX ops exporters write for them (a chain with arithmetic on a number, the negation,
    one table)."""

    class Mix(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(1, 6, 3, stride=2)
            self.acts = nn.Sequential(nn.SELU(), nn.CELU(0.5), nn.Softplus(2.0), nn.Softsign(),
                                      nn.LogSigmoid(), nn.Tanhshrink(), nn.Hardshrink(0.1),
                                      nn.Softshrink(0.05))
            self.fc = nn.Linear(6 * 13 * 13, 10)

        def forward(self, x):
            h = torch.exp(-torch.abs(self.acts(self.c(x)).flatten(1)))
            return self.fc(F.softplus(F.selu(h), beta=1.5))

    torch.manual_seed(0)
    model = Mix().eval()
    qm = ptq.quantize_ptq(model, (1, 1, 28, 28), fmnist.x_train[:200])
    tables = [o.attrs["function"] for o in qm.ops if o.kind == "lut"]
    assert tables == ["selu", "celu", "softplus", "softsign", "logsigmoid", "tanhshrink",
                      "hardshrink", "softshrink", "region"]
    region = next(o for o in qm.ops if o.kind == "lut" and o.attrs["function"] == "region")
    assert all(f in region.attrs["param"] for f in ("abs", "exp", "selu", "softplus"))
    _check(qm, fmnist.x_test[:N])

    onnx_model = nn.Sequential(nn.Conv2d(1, 6, 3, stride=2), nn.SELU(), nn.CELU(0.5),
                               nn.Softplus(), nn.Softsign(), nn.Flatten(),
                               nn.Linear(6 * 13 * 13, 10)).eval()

    class AbsExpNeg(nn.Module):
        def forward(self, x):
            return torch.exp(-torch.abs(x))
    onnx_model.insert(6, AbsExpNeg())
    back = _onnx_round_trip(onnx_model, tmp_path, fmnist)
    qm = ptq.quantize_ptq(back, (1, 1, 28, 28), fmnist.x_train[:200])
    assert len([o for o in qm.ops if o.kind == "lut"]) == 4 + 1
    _check(qm, fmnist.x_test[:N])


def test_math_functions_and_powers_are_tables_from_torch_and_onnx(fmnist, tmp_path):
    """sqrt, rsqrt, reciprocal, square, sign, log, sin, cos, x ** c and c / x (a norm or a
    feature written by hand) are elementwise: h, a function of y value by value, is one
    table, from torch and from the ONNX ops."""

    class Math(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(1, 6, 3, stride=2)
            self.fc = nn.Linear(6, 10)

        def forward(self, x):
            y = self.c(x)
            p = torch.relu(y) + 0.5
            h = torch.sqrt(p) + torch.rsqrt(p) + torch.reciprocal(p) + torch.square(y)
            h = h + torch.sign(y) + torch.log(p) + torch.sin(y) + torch.cos(y) + y ** 3 + 2 / p
            return self.fc(h.flatten(2).mean(2))

    torch.manual_seed(0)
    model = Math().eval()
    every = {"sqrt", "rsqrt", "reciprocal", "square", "sign", "log", "sin", "cos", "**", " / "}
    onnx = {"sqrt", "reciprocal", "sign", "log", "sin", "cos", "**"}   # as exporters write them
    for source, want in ((model, every), (_onnx_round_trip(model, tmp_path, fmnist), onnx)):
        qm = ptq.quantize_ptq(source, (1, 1, 28, 28), fmnist.x_train[:200])
        tables = [o for o in qm.ops if o.kind == "lut"]
        assert len(tables) == 1 and tables[0].attrs["function"] == "region", tables
        assert all(f in tables[0].attrs["param"] for f in want), tables[0].attrs["param"]
        _check(qm, fmnist.x_test[:N])


def test_softmax_bit_exact_in_qemu(fmnist, tmp_path):
    """A softmax head (probabilities out, as many deployed models end) and a channel softmax."""
    from edgeprune.compile import compile_model
    from edgeprune.simulate import simulate

    class Heads(nn.Module):
        def __init__(self):
            super().__init__()
            self.c, self.fc = nn.Conv2d(1, 6, 3, stride=2), nn.Linear(6 * 13 * 13, 10)

        def forward(self, x):
            h = torch.softmax(self.c(x), 1)
            return self.fc(h.flatten(1)).softmax(-1)

    torch.manual_seed(0)
    model = Heads().eval()
    quick_train(model, fmnist, samples=1000, epochs=1.0, lr=0.05)
    qm = ptq.quantize_ptq(model, (1, 1, 28, 28), fmnist.x_train[:200])
    assert [o.attrs["axis"] for o in qm.ops if o.kind == "softmax"] == [1, 1]
    out = _check(qm, fmnist.x_test[:N])
    probs = reference.dequantize_output(qm, out)
    with torch.no_grad():
        want = model(torch.from_numpy(fmnist.x_test[:N])).numpy()
    assert np.abs(probs - want).max() < 0.05 and np.allclose(probs.sum(1), 1, atol=0.05)
    compile_model(str(qm.save(tmp_path / "q")), "cortex-m7", tmp_path / "b", log=lambda *a: None)
    result, _ = simulate(tmp_path / "b", fmnist.x_test[:3])
    assert result["outputs_match"] and result["mismatches"] == 0, result


def test_log_softmax_bit_exact_and_close_to_float(fmnist, tmp_path):
    """A log_softmax head (what NLLLoss-trained models end with, the PyTorch MNIST example
    among them): log-probabilities on a 1/16 grid, bit-exact on the host and in QEMU; the op
    is within half a grid step (plus its log2 table's error) of the exact log_softmax of its
    int8 input, above the grid's floor."""
    from edgeprune.compile import compile_model
    from edgeprune.simulate import simulate

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 6, 3, stride=2), nn.ReLU(), nn.Flatten(),
                          nn.Linear(6 * 13 * 13, 10), nn.LogSoftmax(dim=1)).eval()
    quick_train(model, fmnist, samples=1000, epochs=1.0, lr=0.05)
    qm = ptq.quantize_ptq(model, (1, 1, 28, 28), fmnist.x_train[:200])
    assert qm.ops[-1].kind == "log_softmax"
    _check(qm, fmnist.x_test[:N])
    x = fmnist.x_test[:1000]
    env = reference.run(qm, reference.quantize_input(qm, x), return_all=True)
    op = qm.ops[-1]
    tin, tout = qm.tensors[op.inputs[0]], qm.tensors[op.output]
    logits = (env[op.inputs[0]].astype(np.float64) - tin.zero_point) * tin.scale
    exact = torch.log_softmax(torch.from_numpy(logits), 1).numpy()
    got = (env[op.output].astype(np.float64) - tout.zero_point) * tout.scale
    assert np.abs(got - exact)[exact > -15.9].max() < 1 / 32 + 0.005
    with torch.no_grad():
        want = model(torch.from_numpy(x)).numpy()
    assert (got.argmax(1) == want.argmax(1)).mean() > 0.95
    compile_model(str(qm.save(tmp_path / "q")), "cortex-m7", tmp_path / "b", log=lambda *a: None)
    result, _ = simulate(tmp_path / "b", fmnist.x_test[:2])
    assert result["outputs_match"] and result["mismatches"] == 0, result


def test_squeeze_excite_mul_bit_exact(fmnist):
    """x * sigmoid(fc(pool(x))) broadcast over the map: the quantized product (op mul), its
    product and clamp in 32 bits."""
    class SE(nn.Module):
        def __init__(self):
            super().__init__()
            self.c0, self.f1, self.f2 = nn.Conv2d(1, 8, 3, 2), nn.Linear(8, 4), nn.Linear(4, 8)
            self.fc = nn.Linear(8, 10)

        def forward(self, x):
            y = torch.relu(self.c0(x))
            w = torch.sigmoid(self.f2(torch.relu(self.f1(y.mean((2, 3))))))
            y = torch.relu(w[:, :, None, None] * y)     # broadcast operand first, fused ReLU
            return self.fc(y.mean((2, 3)))

    torch.manual_seed(0)
    model = SE().eval()
    quick_train(model, fmnist, samples=1000, epochs=1.0, lr=0.05)
    qm = ptq.quantize_ptq(model, (2, 1, 28, 28), fmnist.x_train[:200])
    mul = [o for o in qm.ops if o.kind == "mul"]
    assert len(mul) == 1 and mul[0].attrs["activation"] == "relu"
    assert qm.tensors[mul[0].inputs[1]].shape == [2, 8, 1, 1]
    # the product of two int8 values and the clamp in 32 bits; widened for the multiplier only
    script = to_relax.to_relax(qm).script()
    assert re.search(r'dtype="int32"\) = R\.multiply\(lv\d+, lv\d+\)', script)
    assert len(re.findall(r'dtype="int32"\) = R\.clip\(', script)) == 1
    out = _check(qm, fmnist.x_test[:N])
    with torch.no_grad():
        want = model(torch.from_numpy(fmnist.x_test[:N])).argmax(1).numpy()
    assert np.mean(out.argmax(1) == want) >= 0.9


class Difference(nn.Module):
    """Tensor - tensor: a residual that subtracts (with a fused ReLU), and one whose second
    operand is int16."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(1, 8, 3, 2, 1), nn.Conv2d(8, 8, 3, 1, 1)
        self.c = nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        h = torch.relu(self.a(x))
        h = torch.relu(h - self.b(h))
        h = torch.sub(self.c(h), h)
        return self.fc(h.mean((2, 3)))


def test_subtraction_bit_exact_from_torch_and_onnx_and_in_qemu(fmnist, tmp_path):
    from edgeprune.compile import compile_model
    from edgeprune.simulate import simulate

    torch.manual_seed(0)
    model = Difference().eval()
    quick_train(model, fmnist, samples=1000, epochs=1.0, lr=0.05)
    for i, source in enumerate((model, _onnx_round_trip(model, tmp_path, fmnist))):
        qm = ptq.quantize_ptq(source, (1, 1, 28, 28), fmnist.x_train[:200],
                              act_dtypes={"c": "int16"} if i == 0 else None)
        subs = [o for o in qm.ops if o.kind == "add"]
        assert len(subs) == 2 and all(int(o.attrs["multipliers"][1]) < 0 for o in subs)
        out = _check(qm, fmnist.x_test[:N])
        with torch.no_grad():
            want = model(torch.from_numpy(fmnist.x_test[:N])).argmax(1).numpy()
        assert np.mean(out.argmax(1) == want) >= 0.9
    # the M55's vector add and the M7's scalar one, each with a negative multiplier
    for target in ("cortex-m55", "cortex-m7"):
        compile_model(str(qm.save(tmp_path / "q")), target, tmp_path / target,
                      log=lambda *a: None)
        result, _ = simulate(tmp_path / target, fmnist.x_test[:3])
        assert result["outputs_match"] and result["mismatches"] == 0, (target, result)


class Normalized(nn.Module):
    """Constants that vary by channel: (x - mean) / std of an RGB input inside the model, a
    learnt layer scale of a residual branch, and a bias on pooled features."""

    def __init__(self):
        super().__init__()
        self.register_buffer("mean", torch.tensor([0.5, 0.4, 0.3]).reshape(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.2, 0.25, 0.3]).reshape(3, 1, 1))
        self.a, self.b = nn.Conv2d(3, 8, 3, 2, 1), nn.Conv2d(8, 8, 3, 1, 1)
        self.gamma = nn.Parameter(torch.rand(8, 1, 1) + 0.5)
        self.shift = nn.Parameter(torch.randn(8) * 0.1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        h = torch.relu(self.a((x - self.mean) / self.std))
        h = h + self.gamma * torch.relu(self.b(h))
        return self.fc(h.mean((2, 3)) + self.shift)


def test_per_channel_constants_are_depthwise_convs_from_torch_and_onnx(tmp_path):
    from edgeprune.compile import compile_model
    from edgeprune.simulate import simulate

    torch.manual_seed(0)
    model = Normalized().eval()
    rgb = np.random.default_rng(0).random((300, 3, 16, 16)).astype(np.float32)
    torch.onnx.export(model, (torch.zeros(1, 3, 16, 16),), str(tmp_path / "m.onnx"),
                      dynamo=False)
    from edgeprune.onnx_to_torch import onnx_to_torch
    back, _ = onnx_to_torch(tmp_path / "m.onnx")
    for source in (model, back):
        qm = ptq.quantize_ptq(source, (1, 3, 16, 16), rgb[:200])
        dw = [o for o in qm.ops if o.kind == "conv2d" and o.attrs["groups"] > 1]
        # (x - mean) / std (the division folds into the subtraction's), gamma *, + shift
        assert len(dw) == 3, [o.name for o in qm.ops]
        out = _check(qm, rgb[200:240])
        y = reference.dequantize_output(qm, out)
        with torch.no_grad():
            want = model(torch.from_numpy(rgb[200:240])).numpy()
        assert np.abs(y - want).max() < 0.05 * np.abs(want).max()
    compile_model(qm.save(tmp_path / "q"), "cortex-m33", tmp_path / "b", log=lambda *a: None)
    result, _ = simulate(tmp_path / "b", rgb[:3])
    assert result["outputs_match"] and result["mismatches"] == 0, result


def test_a_constant_tensor_the_quantizer_cannot_take_is_named():
    class Offsets(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(1, 4, 3)
            self.register_buffer("grid", torch.randn(1, 4, 6, 6))

        def forward(self, x):
            return (self.c(x) * self.grid).mean((2, 3))

    with pytest.raises(EdgepruneError, match=r"constant tensor 'grid' of shape \(1, 4, 6, 6\)"):
        ptq.quantize_ptq(Offsets().eval(), (1, 1, 8, 8), np.zeros((4, 1, 8, 8), np.float32))


class SamePad(nn.Module):
    """TensorFlow's SAME padding: an explicit asymmetric F.pad before stride-2 convs and pools
    (what Keras models carry through ONNX: Pad nodes, or auto_pad)."""

    def __init__(self):
        super().__init__()
        self.c0 = nn.Conv2d(1, 8, 3, stride=2)
        self.c1 = nn.Conv2d(8, 8, 3, stride=2, groups=8)
        self.c2 = nn.Conv2d(8, 12, 1)
        self.fc = nn.Linear(12, 10)

    def forward(self, x):
        y = torch.relu(self.c0(nn.functional.pad(x, (0, 1, 0, 1))))
        y = torch.relu(self.c1(nn.functional.pad(y, (1, 1, 0, 1))))
        y = nn.functional.pad(torch.relu(self.c2(y)), (0, 1, 0, 1), value=float("-inf"))
        y = nn.functional.avg_pool2d(nn.functional.pad(nn.functional.max_pool2d(y, 2),
                                                       (1, 0, 1, 0)), 2)
        return self.fc(y.mean((2, 3)))


def test_same_padding_folds_into_convs_and_pools(fmnist, tmp_path):

    torch.manual_seed(0)
    model = SamePad().eval()
    quick_train(model, fmnist, samples=1000, epochs=1.0, lr=0.05)
    back = _onnx_round_trip(model, tmp_path, fmnist)
    x = torch.from_numpy(fmnist.x_test[:N])
    with torch.no_grad():
        want = model(x).argmax(1).numpy()
    for m in (model, back):
        qm = ptq.quantize_ptq(m, (1, 1, 28, 28), fmnist.x_train[:200])
        pads = [o.attrs["padding"] for o in qm.ops if o.kind in ("conv2d", "maxpool", "avgpool")]
        assert pads[:5] == [[0, 0, 1, 1], [0, 1, 1, 1], [0, 0, 0, 0], [0, 0, 1, 1],
                            [1, 1, 0, 0]], pads
        out = _check(qm, fmnist.x_test[:N])
        assert np.mean(out.argmax(1) == want) >= 0.9


def test_average_pool_that_does_not_count_padding(fmnist, tmp_path):
    """count_include_pad=False (TensorFlow's SAME average pooling): each output divides by its
    window's real taps, a multiplier per position; bit-exact on the host and in QEMU."""
    from edgeprune.compile import compile_model
    from edgeprune.simulate import simulate

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, stride=2), nn.ReLU(),
                          nn.AvgPool2d(3, 2, 1, count_include_pad=False),
                          nn.AvgPool2d((2, 3), 1, (1, 1), count_include_pad=False),
                          nn.Flatten(), nn.Linear(4 * 8 * 7, 10)).eval()
    quick_train(model, fmnist, samples=1000, epochs=1.0, lr=0.05)
    qm = ptq.quantize_ptq(model, (1, 1, 28, 28), fmnist.x_train[:200])
    pools = [o for o in qm.ops if o.kind == "avgpool"]
    assert all(o.attrs["count_include_pad"] is False for o in pools)
    assert qm.param(pools[0], "multiplier").shape == (7, 7)
    out = _check(qm, fmnist.x_test[:N])
    with torch.no_grad():
        want = model(torch.from_numpy(fmnist.x_test[:N])).numpy()
    got = reference.dequantize_output(qm, out)
    assert np.abs(got - want).max() < 0.1 * np.abs(want).max()
    compile_model(str(qm.save(tmp_path / "q")), "cortex-m7", tmp_path / "b", log=lambda *a: None)
    result, _ = simulate(tmp_path / "b", fmnist.x_test[:2])
    assert result["outputs_match"] and result["mismatches"] == 0, result
    # a byte per position indexes the few distinct divisors: no int64 constant per position
    text = (tmp_path / "b" / "c_library" / "model.c").read_text()
    wide = [int(n) for n in re.findall(r"static const int64_t \w+\[(\d+)\]", text)]
    assert max(wide, default=0) < 7 * 7, wide
    # one shift for every position; a model saved with a shift per position still runs exact
    assert len(np.unique(qm.param(pools[0], "shift"))) == 1
    for op in pools:
        scale = qm.tensors[op.inputs[0]].scale / qm.tensors[op.output].scale
        counts = window_counts(*qm.tensors[op.inputs[0]].shape[2:], op.attrs)
        m, sh = quantize_multipliers(scale / counts)
        qm.params[f"{op.name}.multiplier"] = m.reshape(counts.shape)
        qm.params[f"{op.name}.shift"] = sh.reshape(counts.shape)
    assert len(np.unique(qm.param(pools[0], "shift"))) > 1
    _check(qm, fmnist.x_test[:N])


def test_ceil_mode_and_global_max_pools_bit_exact(fmnist, tmp_path):
    """ceil_mode pools (their last window hangs off the end: the end padding grows to reach
    it), a TensorFlow SAME average pool with uneven pads from ONNX, global max pooling as a
    module (GlobalMaxPool) and as amax (ReduceMax): bit-exact on the host and in QEMU. (The
    average pool's uneven zero-point pad fuses into the max pool's kernel: the RAM schedule
    must not move a pad that writes more than the pool's outputs, edgeprune.schedule.)"""
    from edgeprune.compile import compile_model
    from edgeprune.simulate import simulate

    class Pools(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(1, 6, 3)                                    # 26 x 26
            self.mp = nn.MaxPool2d(3, 2, ceil_mode=True)                   # 13 x 13
            self.ap = nn.AvgPool2d(2, 2, ceil_mode=True)                   # 7 x 7
            self.ap_pad = nn.AvgPool2d(3, 2, 1, ceil_mode=True, count_include_pad=False)  # 4
            self.c2 = nn.Conv2d(6, 8, 1)
            self.gmp = nn.AdaptiveMaxPool2d(1)
            self.fc = nn.Linear(16, 10)

        def forward(self, x):
            h = self.ap_pad(self.ap(self.mp(torch.relu(self.c(x)))))
            h = self.c2(h)
            return self.fc(torch.cat([self.gmp(h).flatten(1), h.amax((2, 3))], 1))

    torch.manual_seed(0)
    model = Pools().eval()
    quick_train(model, fmnist, samples=1000, epochs=1.0, lr=0.05)
    back = _onnx_round_trip(model, tmp_path, fmnist)
    x = torch.from_numpy(fmnist.x_test[:N])
    for m in (model, back):
        qm = ptq.quantize_ptq(m, (1, 1, 28, 28), fmnist.x_train[:200])
        pools = [o for o in qm.ops if o.kind in ("maxpool", "avgpool")]
        assert [o.kind for o in pools] == ["maxpool", "avgpool", "avgpool", "maxpool", "maxpool"]
        assert pools[0].attrs["padding"] == [0, 0, 1, 1]          # reaches the 13th window
        assert pools[1].attrs["padding"] == [0, 0, 1, 1]
        assert pools[1].attrs["count_include_pad"] is False
        out = _check(qm, fmnist.x_test[:N])
        with torch.no_grad():
            want = m(x).numpy()
        got = reference.dequantize_output(qm, out)
        assert np.abs(got - want).max() < 0.1 * np.abs(want).max()
    compile_model(str(qm.save(tmp_path / "q")), "cortex-m7", tmp_path / "b", log=lambda *a: None)
    result, _ = simulate(tmp_path / "b", fmnist.x_test[:2])
    assert result["outputs_match"] and result["mismatches"] == 0, result


def test_padding_modules_fold_into_the_layer_after_them(fmnist):
    """nn.ZeroPad2d / nn.ConstantPad2d (how torch models write TensorFlow's SAME padding) fold
    into the conv or pool that reads them, like F.pad; pruning passes through them."""
    from edgeprune.prune import prune

    torch.manual_seed(0)
    model = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(1, 6, 3, 2), nn.ReLU(),
                          nn.ConstantPad2d((1, 0, 1, 0), float("-inf")), nn.MaxPool2d(2),
                          nn.Flatten(), nn.Linear(6 * 7 * 7, 10)).eval()
    quick_train(model, fmnist, samples=1000, epochs=1.0, lr=0.05)
    qm = ptq.quantize_ptq(model, (1, 1, 28, 28), fmnist.x_train[:200])
    assert [(o.kind, o.attrs.get("padding")) for o in qm.ops][:2] == [
        ("conv2d", [0, 0, 1, 1]), ("maxpool", [1, 1, 0, 0])]
    _check(qm, fmnist.x_test[:N])
    pruned, _ = prune(model, torch.zeros(1, 1, 28, 28), criterion="l1", ratios=0.5)
    assert pruned(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


def test_hand_written_hardswish_with_scalar_arithmetic(fmnist, tmp_path):
    """x * relu6(x + 3) / 6 as MobileNetV3 code writes it, and scalar steps after it: a function
    of the conv's output value by value, one table; the same from ONNX (Add, Clip, Mul, Div,
    Sub)."""

    class HSwish(nn.Module):
        def __init__(self):
            super().__init__()
            self.c, self.fc = nn.Conv2d(1, 6, 3, 2), nn.Linear(6 * 13 * 13, 10)

        def forward(self, x):
            y = self.c(x)
            y = y * nn.functional.relu6(y + 3) / 6
            y = 1.0 - (0.5 * y)
            return self.fc(y.flatten(1))

    torch.manual_seed(0)
    model = HSwish().eval()
    quick_train(model, fmnist, samples=1000, epochs=1.0, lr=0.05)
    qm = ptq.quantize_ptq(model, (1, 1, 28, 28), fmnist.x_train[:200])
    luts = [(o.attrs["function"], o.attrs["param"]) for o in qm.ops if o.kind == "lut"]
    assert len(luts) == 1 and luts[0][0] == "region" and "relu6" in luts[0][1], luts
    assert "mul" not in [o.kind for o in qm.ops]
    out = _check(qm, fmnist.x_test[:N])
    with torch.no_grad():
        want = model(torch.from_numpy(fmnist.x_test[:N])).argmax(1).numpy()
    assert np.mean(out.argmax(1) == want) >= 0.9
    back = _onnx_round_trip(model, tmp_path, fmnist)
    _check(ptq.quantize_ptq(back, (1, 1, 28, 28), fmnist.x_train[:200]), fmnist.x_test[:N])


def test_a_chain_of_functions_and_numbers_is_one_table(fmnist, tmp_path):
    """Elementwise steps one after another on one tensor (an input normalization, a hard
    sigmoid written by hand, a scaled sigmoid, a GELU times a number) are each one table, one
    pass and one rounding; a ReLU that starts a chain stays with the conv before it, and the
    numbers a conv's output is scaled and offset by fold into its weights. The same from
    ONNX; bit-exact on the host, and within 5 % of the float model's largest output."""

    class Chains(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.c2 = nn.Conv2d(1, 6, 3, 2), nn.Conv2d(6, 6, 3)
            self.c3, self.c4 = nn.Conv2d(6, 6, 3), nn.Conv2d(6, 6, 3)
            self.fc = nn.Linear(6, 10)

        def forward(self, x):
            y = self.c1((x - 0.5) / 0.25) * 0.5 + 0.25
            y = self.c2(F.relu6(y + 3) / 6)
            y = self.c3((torch.sigmoid(y) * 2 + 1) / 3)
            y = self.c4(F.relu(y) * 2 - 1)
            return self.fc((F.gelu(y) * 1.5).mean((2, 3)))

    torch.manual_seed(0)
    model = Chains().eval()
    quick_train(model, fmnist, samples=1000, epochs=1.0, lr=0.05)
    for source in (model, _onnx_round_trip(model, tmp_path, fmnist)):
        qm = ptq.quantize_ptq(source, (1, 1, 28, 28), fmnist.x_train[:200])
        kinds = [(o.kind, o.attrs.get("activation")) for o in qm.ops]
        assert [k for k, _ in kinds].count("lut") == 5, kinds
        assert ("conv2d", "relu") in kinds         # c3's, before the table of 2 x - 1
        # c1's * 0.5 + 0.25 + 3 in its weights and bias, then the ReLU6 its clamp
        assert kinds[1] == ("conv2d", "relu6") and len(qm.ops) == 4 + 5 + 3, kinds
        out = reference.dequantize_output(qm, _check(qm, fmnist.x_test[:N]))
    with torch.no_grad():
        want = model(torch.from_numpy(fmnist.x_test[:N])).numpy()
    assert np.abs(out - want).max() < 0.05 * np.abs(want).max()


def test_a_number_folds_into_a_conv_only_where_nothing_else_reads_the_conv(fmnist):
    """y = conv(x) * 0.5 folds into the conv; y + 4 does not, as y is also read elsewhere."""

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.c, self.c2, self.c3 = (nn.Conv2d(1, 4, 3, 2), nn.Conv2d(4, 4, 3),
                                        nn.Conv2d(4, 4, 3))

        def forward(self, x):
            y = self.c(x) * 0.5
            return (self.c2(y + 4.0) + self.c3(torch.sigmoid(y))).mean((2, 3))

    torch.manual_seed(0)
    model = Twice().eval()
    qm = ptq.quantize_ptq(model, (1, 1, 28, 28), fmnist.x_train[:200])
    assert [o.kind for o in qm.ops][:2] == ["conv2d", "lut"]     # y + 4: a table of y
    out = reference.dequantize_output(qm, _check(qm, fmnist.x_test[:N]))
    with torch.no_grad():
        want = model(torch.from_numpy(fmnist.x_test[:N])).numpy()
    assert np.abs(out - want).max() < 0.05 * np.abs(want).max()


def test_nearest_upsampling_bit_exact_from_torch_and_onnx(fmnist, tmp_path):
    """A conv autoencoder's decoder: nearest upsampling by whole factors (nn.Upsample,
    F.interpolate, ONNX Resize) repeats int8 values, keeping their scale; bit-exact on the host
    for both, and in QEMU on the RISC-V target."""
    from edgeprune.compile import compile_model
    from edgeprune.simulate import simulate

    class Decoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = nn.Conv2d(1, 6, 3, 2, 1)                  # 14 x 14
            self.enc2 = nn.Conv2d(6, 8, 3, 2, 1)                 # 7 x 7
            self.up = nn.Upsample(scale_factor=2)                # 14 x 14
            self.dec = nn.Conv2d(8, 4, 3, 1, 1)
            self.out = nn.Conv2d(4, 1, 3, 1, 1)

        def forward(self, x):
            h = self.dec(self.up(torch.relu(self.enc2(torch.relu(self.enc(x))))))
            return torch.sigmoid(self.out(F.interpolate(torch.relu(h), scale_factor=(2, 2))))

    torch.manual_seed(0)
    model = Decoder().eval()
    back = _onnx_round_trip(model, tmp_path, fmnist)
    assert sum(isinstance(m, nn.Upsample) for m in back.modules()) == 2
    for m in (model, back):
        qm = ptq.quantize_ptq(m, (1, 1, 28, 28), fmnist.x_train[:200])
        ups = [o for o in qm.ops if o.kind == "upsample"]
        assert [o.attrs["factors"] for o in ups] == [[2, 2], [2, 2]]
        assert all(qm.tensors[o.output].scale == qm.tensors[o.inputs[0]].scale for o in ups)
        out = _check(qm, fmnist.x_test[:N])
        assert out.shape == (N, 1, 28, 28)
    compile_model(str(qm.save(tmp_path / "q")), "riscv32", tmp_path / "b", log=lambda *a: None)
    result, _ = simulate(tmp_path / "b", fmnist.x_test[:2])
    assert result["outputs_match"] and result["mismatches"] == 0, result


def test_batch_norms_without_affine_parameters_fold_and_run_bit_exact(fmnist):
    """BatchNorm with affine=False (no scale, no shift) after a conv, after a Linear and
    alone: folded like any other, close to the float model."""
    class NoAffine(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1 = nn.Conv2d(1, 6, 3, 2, bias=False)
            self.b1 = nn.BatchNorm2d(6, affine=False)
            self.b2 = nn.BatchNorm2d(6, affine=False)
            self.fc = nn.Linear(6, 10)
            self.b3 = nn.BatchNorm1d(10, affine=False)

        def forward(self, x):
            h = self.b2(torch.relu(self.b1(self.c1(x))))
            return self.b3(self.fc(h.mean((2, 3))))

    torch.manual_seed(0)
    model = NoAffine().eval()
    for bn in (model.b1, model.b2, model.b3):
        bn.running_mean.uniform_(-0.3, 0.3)
        bn.running_var.uniform_(0.5, 2.0)
    qm = ptq.quantize_ptq(model, (1, 1, 28, 28), fmnist.x_train[:200])
    out = reference.dequantize_output(qm, _check(qm, fmnist.x_test[:N]))
    with torch.no_grad():
        want = model(torch.from_numpy(fmnist.x_test[:N])).numpy()
    assert np.abs(out - want).max() < 0.05 * np.abs(want).max()


def test_fractional_nearest_resizing_reads_back_from_onnx_bit_exact(fmnist, tmp_path):
    """Nearest resizing by a fractional factor or to a size no multiple of the input's
    (F.interpolate): its ONNX Resize reads back as the torch resize that picks the same
    pixels, and both forms quantize bit-exact on the host."""
    class Resized(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1 = nn.Conv2d(1, 4, 3, 3)                      # 10 x 10
            self.c2 = nn.Conv2d(4, 6, 3, 1, 1)

        def forward(self, x):
            h = F.interpolate(torch.relu(self.c1(x)), scale_factor=1.7)       # 15 x 15
            h = F.interpolate(torch.relu(self.c2(h)), size=(7, 11))
            return h.mean((2, 3))

    torch.manual_seed(0)
    model = Resized().eval()
    back = _onnx_round_trip(model, tmp_path, fmnist)
    assert sum(isinstance(m, nn.Upsample) for m in back.modules()) == 2
    for m in (model, back):
        _check(ptq.quantize_ptq(m, (1, 1, 28, 28), fmnist.x_train[:200]), fmnist.x_test[:N])


@pytest.mark.parametrize("ctm,rounding,factor,repeats", [
    ("asymmetric", "floor", 3, True),                 # torch's export of nearest upsampling
    ("half_pixel", "round_prefer_floor", 3, True),    # ONNX's defaults
    ("pytorch_half_pixel", "round_prefer_ceil", 2, True),
    ("asymmetric", "round_prefer_floor", 3, False),   # output 2 picks input 1, not 0
    ("align_corners", "round_prefer_floor", 3, False),
    ("half_pixel", "floor", 2, False),
])
def test_onnx_nearest_resize_is_taken_only_where_it_repeats_values(ctm, rounding, factor,
                                                                   repeats):
    from edgeprune.onnx_to_torch import _nearest_picks
    picks = _nearest_picks(7, 7 * factor, ctm, rounding)
    assert np.array_equal(picks, np.arange(7 * factor) // factor) == repeats


@pytest.mark.parametrize("ctm,rounding,size,picks", [
    ("asymmetric", "floor", 4, [0, 3, 6, 9]),         # torch's export of scale 1/3
    ("half_pixel", "round_prefer_floor", 4, [1, 4, 7, 10]),
    ("align_corners", "round_prefer_floor", 3, [0, 5, 11]),    # not every k-th
])
def test_onnx_nearest_downsizing_picks(ctm, rounding, size, picks):
    """Nearest resizing down picks pixels by the ONNX rule; every k-th reads as a strided
    slice, anything else is refused."""
    from edgeprune.onnx_to_torch import _nearest_picks, _strided
    got = _nearest_picks(12, size, ctm, rounding)
    assert got.tolist() == picks
    assert _strided(got) == (ctm != "align_corners")


@pytest.mark.parametrize("n_in,n_out,align_corners", [
    (7, 14, False), (7, 14, True), (7, 10, False), (6, 13, True), (5, 3, False), (1, 4, False),
    (4, 1, True), (4, 1, False)])
def test_linear_taps_are_torchs_weights(n_in, n_out, align_corners):
    """The integer taps of bilinear resizing, as a matrix, equal torch's interpolation of a
    one-hot basis (to the weights' rounding)."""
    from edgeprune.quantize.requant import linear_taps

    i0, i1, w1 = linear_taps(n_in, n_out, align_corners, 20)
    ours = np.zeros((n_out, n_in))
    np.add.at(ours, (np.arange(n_out), i0), 1 - w1 / 2**20)
    np.add.at(ours, (np.arange(n_out), i1), w1 / 2**20)
    theirs = F.interpolate(torch.eye(n_in)[None, None], size=(n_in, n_out), mode="bilinear",
                           align_corners=align_corners)[0, 0].numpy().T
    assert np.abs(ours - theirs).max() < 2**-19


def test_bilinear_resizing_bit_exact_from_torch_and_onnx(fmnist, tmp_path):
    """A decoder that resizes bilinearly: by a module's factor, and by a function to a size
    that is no multiple of the input's (align_corners).  From torch and from its ONNX export,
    int8 and int16 activations are bit-exact on the host and close to the float model; the
    int8 model is bit-exact in QEMU on the Cortex-M7."""
    from edgeprune.compile import compile_model
    from edgeprune.simulate import simulate

    class Decoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = nn.Conv2d(1, 6, 3, 2, 1)                         # 14 x 14
            self.enc2 = nn.Conv2d(6, 8, 3, 2, 1)                        # 7 x 7
            self.up = nn.Upsample(scale_factor=2, mode="bilinear")      # 14 x 14
            self.dec = nn.Conv2d(8, 4, 3, 1, 1)
            self.out = nn.Conv2d(4, 2, 3, 1, 1)

        def forward(self, x):
            h = self.dec(self.up(torch.relu(self.enc2(torch.relu(self.enc(x))))))
            h = F.interpolate(torch.relu(h), size=(25, 30), mode="bilinear", align_corners=True)
            return self.out(h)

    torch.manual_seed(0)
    model = Decoder().eval()
    back = _onnx_round_trip(model, tmp_path, fmnist)
    with torch.no_grad():
        y = model(torch.from_numpy(fmnist.x_test[:N])).numpy()
    for m in (model, back):
        names = [n.output for n in ptq.extract(m, (1, 1, 28, 28)).nodes]
        for act_dtypes in (None, {"input": "int16"} | {n: "int16" for n in names}):
            qm = ptq.quantize_ptq(m, (1, 1, 28, 28), fmnist.x_train[:200], act_dtypes=act_dtypes)
            ups = [o for o in qm.ops if o.kind == "upsample"]
            assert [o.attrs for o in ups] == [
                {"mode": "bilinear", "align_corners": False, "size": [14, 14]},
                {"mode": "bilinear", "align_corners": True, "size": [25, 30]}]
            out = reference.dequantize_output(qm, _check(qm, fmnist.x_test[:N]))
            assert np.abs(out - y).max() < 0.03 * np.abs(y).max()
    qm = ptq.quantize_ptq(back, (1, 1, 28, 28), fmnist.x_train[:200])
    compile_model(str(qm.save(tmp_path / "q")), "cortex-m7", tmp_path / "b", log=lambda *a: None)
    result, _ = simulate(tmp_path / "b", fmnist.x_test[:2])
    assert result["outputs_match"] and result["mismatches"] == 0, result


def test_resizing_that_is_not_supported_is_refused_by_name(tmp_path):
    """Bicubic resizing, ONNX's asymmetric linear coordinates, and a bilinear scale factor that
    torch does not sample at the output size's coordinates are refused, naming what."""
    from onnx import TensorProto, helper, save

    from edgeprune.onnx_to_torch import onnx_to_torch

    model = nn.Sequential(nn.Conv2d(1, 4, 3, 2, 1), nn.Upsample(scale_factor=2, mode="bicubic"),
                          nn.Conv2d(4, 2, 3, 1, 1)).eval()
    torch.onnx.export(model, (torch.zeros(1, 1, 28, 28),), str(tmp_path / "b.onnx"),
                      dynamo=False)
    with pytest.raises(EdgepruneError, match=r"Resize.*cubic resize of \[1, 4, 14, 14\] to "
                                             r"\[1, 4, 28, 28\].*not supported"):
        onnx_to_torch(tmp_path / "b.onnx")
    with pytest.raises(EdgepruneError, match="resizing mode 'bicubic' is not supported"):
        ptq.quantize_ptq(model, (1, 1, 28, 28), np.zeros((2, 1, 28, 28), np.float32))
    fractional = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Upsample(scale_factor=1.3, mode="bilinear"))
    with pytest.raises(EdgepruneError, match=r"scale factors \[1.3, 1.3\] do not give the "
                                             r"output size \[33, 33\] of input \[26, 26\]"):
        ptq.quantize_ptq(fractional, (1, 1, 28, 28), np.zeros((2, 1, 28, 28), np.float32))

    resize = helper.make_node("Resize", ["x", "", "scales"], ["y"], name="up", mode="linear",
                              coordinate_transformation_mode="asymmetric")
    graph = helper.make_graph(
        [resize], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 12, 12])],
        [helper.make_tensor("scales", TensorProto.FLOAT, [4], [1, 1, 2, 2])])
    save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]),
         str(tmp_path / "a.onnx"))
    with pytest.raises(EdgepruneError, match=r"node 'up' \(Resize\): linear resize.*"
                                             r"asymmetric.*not supported"):
        onnx_to_torch(tmp_path / "a.onnx")