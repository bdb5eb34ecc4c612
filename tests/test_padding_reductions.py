"""Padding that copies values (reflect, replicate, circular: a restoration or audio model's
convs and pad layers), zero padding no conv reads, reductions over the channels (CBAM's
spatial attention: the mean and max of all channels), sums over positions and adaptive pools
whose windows differ in size: pruned, read back from ONNX, and bit-exact in int8 on the host
and on a target."""

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from checks import bit_exact, conv_widths, pruned_equivalently
from edgeprune.errors import EdgepruneError
from edgeprune.lift1d import lift_1d
from edgeprune.onnx_to_torch import onnx_to_torch
from edgeprune.quantize import ptq, reference, to_relax

torch.set_num_threads(1)


class Padded(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(1, 8, 3, padding=1, padding_mode="reflect")
        self.c2 = nn.Conv2d(8, 8, (3, 5), padding=(1, 2), padding_mode="replicate")
        self.pad = nn.ReflectionPad2d((2, 1, 1, 0))
        self.c3 = nn.Conv2d(8, 12, 3, stride=2)
        self.c4 = nn.Conv2d(12, 12, 3, padding=1, padding_mode="circular")
        self.gate = nn.Conv2d(2, 1, 5, padding=2)
        self.fc = nn.Linear(12, 5)

    def forward(self, x):
        x = F.relu(self.c2(F.relu(self.c1(x))))
        x = F.relu(self.c3(self.pad(F.dropout2d(x, 0.1, self.training))))
        x = F.relu(self.c4(x)) + F.pad(x[:, :, 1:, :-1], (0, 1, 1, 0))   # zeros no conv reads
        both = torch.cat([x.mean(1, keepdim=True), x.amax(1, keepdim=True)], 1)
        x = x * torch.sigmoid(self.gate(both))                             # CBAM
        return self.fc(x.sum((2, 3)) / 50)


def test_padding_modes_and_channel_reductions_prune_and_run_bit_exact(tmp_path):
    torch.manual_seed(0)
    model = Padded().eval()
    shape, x = (1, 1, 16, 16), torch.randn(8, 1, 16, 16)
    pruned, _ = pruned_equivalently(model, shape, x, ratios=0.5)
    widths = conv_widths(pruned)
    assert widths == [4, 4, 12, 12, 1]    # c3/c4 feed the channel mean and max: kept

    calib = torch.randn(64, *shape[1:]).numpy()
    qm = ptq.quantize_ptq(pruned, shape, calib)
    modes = [o.attrs.get("mode") for o in qm.ops if o.kind == "pad"]
    assert {"reflect", "replicate", "circular", "constant"} <= set(modes)
    bit_exact(qm, x[:4].numpy(), "cortex-m4", tmp_path, like=pruned, tol=0.1)

    # torch's exporter writes circular padding as slices and a spatial concat
    torch.onnx.export(pruned, (torch.zeros(shape),), str(tmp_path / "m.onnx"), dynamo=False)
    back, _ = onnx_to_torch(tmp_path / "m.onnx")
    with torch.no_grad():
        torch.testing.assert_close(back(x), pruned(x), atol=1e-5, rtol=1e-5)
    qm = ptq.quantize_ptq(back, shape, calib)
    assert any(o.kind == "concat" and o.attrs.get("axis") == 3 for o in qm.ops)
    xq = reference.quantize_input(qm, x[:2].numpy())
    assert np.array_equal(to_relax.build_host(to_relax.to_relax(qm, batch=2))(xq),
                          reference.run(qm, xq))


class Signal(nn.Module):
    def __init__(self):
        super().__init__()
        self.pad = nn.ReflectionPad1d(3)
        self.c1 = nn.Conv1d(2, 8, 7)
        self.c2 = nn.Conv1d(8, 8, 5, padding=2, padding_mode="circular")
        self.rep = nn.ReplicationPad1d((0, 4))
        self.c3 = nn.Conv1d(8, 4, 5)

    def forward(self, x):
        return self.c3(self.rep(F.relu(self.c2(F.relu(self.c1(self.pad(x)))))))


def test_1d_padding_modes_lift_and_quantize_bit_exact():
    torch.manual_seed(0)
    model, x = Signal().eval(), torch.randn(8, 2, 40)
    lifted, shape = lift_1d(model, (1, 2, 40))
    with torch.no_grad():
        torch.testing.assert_close(lifted(x.view(8, 2, 1, 40)).flatten(2), model(x))
    qm = ptq.quantize_ptq(lifted, shape, x.view(8, 2, 1, 40).numpy())
    xq = reference.quantize_input(qm, x[:2].view(2, 2, 1, 40).numpy())
    want = reference.run(qm, xq)
    assert np.array_equal(to_relax.build_host(to_relax.to_relax(qm, batch=2))(xq), want)


def test_padding_that_cannot_run_is_refused_by_name():
    class Crop(nn.Module):
        def forward(self, x):
            return F.pad(x, (-1, 0, 0, 0)) + 1
    with pytest.raises(EdgepruneError, match="node 'pad'.*padding \\(-1, 0, 0, 0\\)"):
        ptq.extract(Crop(), (1, 1, 8, 8))


class Adaptive(nn.Module):
    """A head written for another input size: 11 x 11 maps pooled to 3 x 4 and 5 x 7, and
    the pools' features concatenated (a spatial pyramid: c's channels are kept)."""
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(1, 8, 3, padding=1)
        self.c = nn.Conv2d(8, 8, 3, stride=2)
        self.avg, self.max = nn.AdaptiveAvgPool2d((3, 4)), nn.AdaptiveMaxPool2d((5, 7))
        self.fc = nn.Linear(8 * (12 + 35), 6)

    def forward(self, x):
        y = F.relu(self.c(F.relu(self.c1(x))))
        return self.fc(torch.cat([self.avg(y).flatten(1), self.max(y).flatten(1)], 1))


def test_adaptive_pools_of_uneven_windows_run_bit_exact(tmp_path):
    torch.manual_seed(0)
    model, x = Adaptive().eval(), torch.randn(8, 1, 24, 24)
    pruned, _ = pruned_equivalently(model, (1, 1, 24, 24), x, ratios=0.5)
    qm = ptq.quantize_ptq(pruned, (1, 1, 24, 24), torch.randn(64, 1, 24, 24).numpy())
    pools = [o.attrs["output_size"] for o in qm.ops if "output_size" in o.attrs]
    assert pools == [[3, 4], [5, 7]]
    bit_exact(qm, x[:4].numpy(), "cortex-m7", tmp_path, like=pruned, tol=0.1)


class MergedPositions(nn.Module):
    """Global pools written over merged positions: x.view(n, c, -1).mean(-1), x.flatten(2),
    and the values of a max with indices (torch.max(x, dim)[0], x.max(dim).values)."""
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(1, 8, 3)
        self.c2 = nn.Conv2d(8, 8, 3)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        y = F.relu(self.c2(F.relu(self.c1(x))))
        flat = y.view(y.shape[0], 8, -1)
        return self.fc(flat.mean(-1) + torch.max(y.flatten(2), dim=2)[0]
                       + y.flatten(2).max(2).values)


def test_pools_over_merged_positions_prune_and_run_bit_exact():
    torch.manual_seed(0)
    model, x = MergedPositions().eval(), torch.randn(8, 1, 12, 12)
    pruned, _ = pruned_equivalently(model, (1, 1, 12, 12), x, ratios=0.5)
    assert conv_widths(pruned) == [4, 4]
    qm = ptq.quantize_ptq(pruned, (1, 1, 12, 12), x.numpy())
    assert [o.kind for o in qm.ops].count("maxpool") == 2
    xq = reference.quantize_input(qm, x[:2].numpy())
    assert np.array_equal(to_relax.build_host(to_relax.to_relax(qm, batch=2))(xq),
                          reference.run(qm, xq))


class DivisorOverride(nn.Module):
    """Average pools over a fixed divisor (divisor_override): padded, ceil-mode, functional."""
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(1, 8, 3)
        self.pool = nn.AvgPool2d(3, 2, 1, ceil_mode=True, divisor_override=4)
        self.c2 = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = self.pool(F.relu(self.c1(x)))
        return F.avg_pool2d(self.c2(y), 2, divisor_override=3)


def test_an_average_pool_over_a_fixed_divisor_runs_bit_exact(tmp_path):
    torch.manual_seed(0)
    model, x = DivisorOverride().eval(), torch.randn(8, 1, 12, 12)
    qm = ptq.quantize_ptq(model, (1, 1, 12, 12), torch.randn(64, 1, 12, 12).numpy())
    assert [o.kind for o in qm.ops].count("avgpool") == 2
    bit_exact(qm, x[:4].numpy(), "cortex-m4", tmp_path, like=model, tol=0.05)
