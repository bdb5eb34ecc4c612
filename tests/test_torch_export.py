"""Models exported with torch.onnx.export's default exporter (torch.export + onnxscript, opset
20: folded BatchNorm, Unsqueeze/ReduceMean for 1-D global pools, Resize for 2-D interpolation)
import with the same function, quantize bit-exact, and compile and run in QEMU: what a user of
torch 2.13 gets without asking for the legacy exporter."""

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from edgeprune import cli, models
from edgeprune.load import load_torch
from edgeprune.quantize import ptq, reference, to_relax
from edgeprune.simulate import simulate
from test_layers import Decoder1d


class Signal1d(nn.Module):
    """Conv1d + BatchNorm1d, a max pool and a global average pool (exported as Unsqueeze to
    (N, C, 1, L), ReduceMean, Squeeze)."""

    def __init__(self):
        super().__init__()
        self.a, self.bn = nn.Conv1d(2, 8, 5, 2, 2), nn.BatchNorm1d(8)
        self.b, self.fc = nn.Conv1d(8, 8, 3, 1, 1), nn.Linear(8, 4)

    def forward(self, x):
        h = F.max_pool1d(F.relu(self.b(F.relu(self.bn(self.a(x))))), 2)
        return self.fc(F.adaptive_avg_pool1d(h, 1).flatten(1))


class Decoder(nn.Module):
    """A transposed conv, nearest and bilinear upsampling, a U-Net skip resized to its size."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(1, 8, 3, 1, 1), nn.Conv2d(8, 8, 3, 2, 1)
        self.t = nn.ConvTranspose2d(8, 4, 4, 2, 1)
        self.up = nn.Upsample(scale_factor=2, mode="bilinear")
        self.c, self.d = nn.Conv2d(12, 4, 3, 1, 1), nn.Conv2d(4, 1, 1)

    def forward(self, x):
        a = F.relu(self.a(x))
        b = F.relu(self.b(a))
        u = F.interpolate(F.relu(self.t(b)), scale_factor=2, mode="nearest")
        u = F.interpolate(self.up(F.avg_pool2d(u, 4)), size=a.shape[2:], mode="bilinear",
                          align_corners=True)
        return self.d(F.elu(self.c(torch.cat([u, a], 1))))


class MobileBlock(nn.Module):
    """SiLU, squeeze-excite with hardsigmoid, a depthwise conv, Mish (an ONNX op since opset
    18), a ceil-mode average pool and clamp(min=0) (exported as Max with a constant)."""

    def __init__(self):
        super().__init__()
        self.a, self.fc = nn.Conv2d(3, 16, 3, 2, 1), nn.Linear(16, 3)
        self.se1, self.se2 = nn.Conv2d(16, 4, 1), nn.Conv2d(4, 16, 1)
        self.dw, self.bn = nn.Conv2d(16, 16, 3, 1, 1, groups=16, bias=False), nn.BatchNorm2d(16)

    def forward(self, x):
        h = self.a(x)
        h = h * torch.sigmoid(h)
        w = F.hardsigmoid(self.se2(F.relu(self.se1(torch.mean(h, (2, 3), keepdim=True)))))
        h = F.mish(self.bn(self.dw(h * w)))
        h = F.avg_pool2d(h, 3, 2, 1, ceil_mode=True, count_include_pad=False).clamp(min=0)
        return self.fc(F.adaptive_max_pool2d(h, (1, 1)).view(-1, 16))


def _randomize_bn(model):
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2)


@pytest.mark.parametrize("name", ["resnet8", "signal1d", "decoder", "decoder1d", "mobile"])
def test_default_exporter_model_imports_and_quantizes_bit_exact(name, tmp_path):
    torch.manual_seed(0)
    model, shape = {"signal1d": (Signal1d(), (1, 2, 40)), "decoder": (Decoder(), (1, 1, 16, 16)),
                    "decoder1d": (Decoder1d(), (1, 2, 40)),
                    "mobile": (MobileBlock(), (1, 3, 20, 20))}.get(name) or models.build(name)
    _randomize_bn(model)
    model.eval()
    torch.onnx.export(model, (torch.zeros(shape),), str(tmp_path / "m.onnx"))
    back, lifted_shape = load_torch(str(tmp_path / "m.onnx"))
    x = torch.randn((4,) + tuple(shape[1:]))
    xl = x.reshape((4,) + tuple(lifted_shape[1:]))
    with torch.no_grad():
        torch.testing.assert_close(back(xl).reshape(4, -1), model(x).reshape(4, -1), atol=1e-5,
                                   rtol=1e-4)
    qm = ptq.quantize_ptq(back, lifted_shape, torch.randn((32,) + tuple(lifted_shape[1:])).numpy())
    xq = reference.quantize_input(qm, xl.numpy())
    got = to_relax.build_host(to_relax.to_relax(qm, batch=4))(xq)
    assert np.array_equal(got, reference.run(qm, xq))


def test_default_exporter_model_compiles_and_matches_in_qemu(tmp_path, capsys):
    torch.manual_seed(0)
    model = Signal1d()
    _randomize_bn(model)
    torch.onnx.export(model.eval(), (torch.zeros(1, 2, 40),), str(tmp_path / "m.onnx"))
    rc = cli.main(["compile", str(tmp_path / "m.onnx"), "--target", "riscv32",
                   "--out", str(tmp_path / "o")])
    assert rc == 0, capsys.readouterr().err
    result, _ = simulate(tmp_path / "o", samples=2)
    assert result["outputs_match"], result


def test_1d_linear_interpolation_names_the_exporter_that_works(tmp_path):
    """torch's default exporter writes a 1-D linear interpolation as GatherND on a transposed
    tensor: refused, saying the legacy exporter writes it as a Resize, which imports."""
    from edgeprune.errors import EdgepruneError
    from edgeprune.onnx_to_torch import onnx_to_torch

    model = nn.Sequential(nn.Conv1d(2, 4, 3), nn.Upsample(scale_factor=2, mode="linear")).eval()
    torch.onnx.export(model, (torch.zeros(1, 2, 20),), str(tmp_path / "d.onnx"))
    with pytest.raises(EdgepruneError, match=r"\(GatherND\) is not supported.*dynamo=False"):
        onnx_to_torch(tmp_path / "d.onnx")
    torch.onnx.export(model, (torch.zeros(1, 2, 20),), str(tmp_path / "l.onnx"), dynamo=False)
    back, shape = onnx_to_torch(tmp_path / "l.onnx")
    x = torch.randn(3, 2, 20)
    with torch.no_grad():
        torch.testing.assert_close(back(x), model(x), atol=1e-5, rtol=1e-4)


def test_an_exported_program_that_the_onnx_reader_refuses_names_the_route(tmp_path):
    """A `.pt2` is read through torch's ONNX export: a refusal there names the file, the
    route and what avoids it, not an ONNX file the user never gave."""
    from edgeprune.errors import EdgepruneError

    model = nn.Sequential(nn.Conv1d(2, 4, 3), nn.Upsample(scale_factor=2, mode="linear")).eval()
    torch.export.save(torch.export.export(model, (torch.zeros(1, 2, 20),)), tmp_path / "m.pt2")
    with pytest.raises(EdgepruneError, match=r"m.pt2: an exported program, read through "
                       r"torch's ONNX export of it: ONNX node .*GatherND.*saving the nn.Module"):
        load_torch(str(tmp_path / "m.pt2"))


def test_an_exported_program_with_an_adaptive_pool_that_does_not_divide_reads_back(tmp_path):
    """torch's exporter writes an adaptive average pool of 7 -> 3 as GatherND; a `.pt2` is
    read through that exporter, so its module's pool is first written as window means, as an
    nn.Module's is: the same values, and they quantize."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, 2, 1), nn.ReLU(), nn.Conv2d(8, 8, 3, 2, 1),
                          nn.ReLU(), nn.AdaptiveAvgPool2d((3, 3)), nn.Flatten(),
                          nn.Linear(72, 10)).eval()
    torch.export.save(torch.export.export(model, (torch.zeros(1, 1, 28, 28),)),
                      tmp_path / "m.pt2")
    back, shape = load_torch(str(tmp_path / "m.pt2"))
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(back(x), model(x), atol=1e-5, rtol=1e-4)
    assert shape == (1, 1, 28, 28)
    qm = ptq.quantize_ptq(back, shape, torch.randn(32, 1, 28, 28).numpy())
    np.testing.assert_allclose(reference.predict(qm, x.numpy()), model(x).detach().numpy(),
                               atol=0.15)
