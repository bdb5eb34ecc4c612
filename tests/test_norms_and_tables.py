"""Normalizations over several axes (LayerNorm([C, H, W]), RMSNorm, F.normalize), ConvNeXt's
layer scale, minima, and hand-written activations (torch.where masks, x * sigmoid(1.702 x)):
pruned, read back from ONNX, bit-exact in int8 on the host and on a target."""

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from checks import bit_exact, conv_widths, pruned_equivalently, read_back, saved_and_loaded
from edgeprune.load import load_torch
from edgeprune.quantize import ptq

torch.set_num_threads(1)


class NormsAndGates(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 16, 2, 2)
        self.dw = nn.Conv2d(16, 16, 5, padding=2, groups=16)      # a ConvNeXt block
        self.ln = nn.LayerNorm(16)
        self.up, self.down = nn.Linear(16, 32), nn.Linear(32, 16)
        self.gamma = nn.Parameter(torch.full((16,), 0.5))
        self.c1 = nn.Conv2d(16, 8, 3)
        self.ln_map = nn.LayerNorm([8, 4, 4])
        self.c2 = nn.Conv2d(8, 8, 1)
        self.c3 = nn.Conv2d(8, 8, 1)
        self.fc1, self.fc = nn.Linear(8, 8), nn.Linear(8, 4)

    def forward(self, x):
        x = self.stem(x)                                           # (N, 16, 6, 6)
        y = self.dw(x).permute(0, 2, 3, 1)
        y = self.gamma * self.down(F.gelu(self.up(self.ln(y))))
        x = x + y.permute(0, 3, 1, 2)
        x = self.ln_map(self.c1(x))                                # over C, H and W
        a = self.c2(x)
        a = torch.where(a > 0, a, 0.1 * a)                         # hand-written leaky ReLU
        b = self.c3(a)
        b = b * torch.sigmoid(1.702 * b)                           # quick GELU
        v = self.fc1(b.amin((2, 3)) + b.mean((2, 3)))
        return self.fc(F.normalize(v, dim=1))


def test_norms_layer_scale_minima_and_handwritten_activations_run_bit_exact(tmp_path):
    torch.manual_seed(0)
    model = NormsAndGates().eval()
    shape, x = (1, 1, 12, 12), torch.randn(8, 1, 12, 12)
    pruned, _ = pruned_equivalently(model, shape, x, ratios=0.5)
    # the stem prunes with the ConvNeXt block through its LayerNorm over the channels and its
    # layer scale; c1 feeds the LayerNorm over C, H, W: kept; c2 and c3 prune through the
    # hand-written activations and the minimum
    assert conv_widths(pruned) == [8, 8, 8, 4, 4]
    back = read_back(pruned, shape, x, tmp_path)
    qm = ptq.quantize_ptq(back, shape, torch.randn(64, *shape[1:]).numpy())
    tables = [o for o in qm.ops if o.kind == "lut" and o.attrs["function"] == "region"]
    assert len(tables) == 2          # the masked leaky ReLU and the quick GELU: one table each
    assert "where" in tables[0].attrs["param"] and "sigmoid" in tables[1].attrs["param"]
    # gamma folded into the Linear before it: no op of its own
    assert [o.kind for o in qm.ops].count("conv2d") == len(conv_widths(pruned))
    assert sum(o.kind == "layernorm" for o in qm.ops) == 3       # one more in F.normalize
    bit_exact(qm, x[:4].numpy(), "cortex-m4", tmp_path, like=pruned, tol=0.1)


class RmsAndSoftplus(nn.Module):
    def __init__(self):
        super().__init__()
        self.c0, self.c1 = nn.Conv2d(1, 8, 3), nn.Conv2d(8, 8, 3)
        self.norm = nn.RMSNorm([8, 8])
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        x = F.softplus(self.c0(x))
        x = self.norm(self.c1(x))                  # over H and W: channels prune
        y, _ = torch.min(x.flatten(2), dim=2)
        return self.fc(y + F.hardshrink(x).mean((2, 3)))


def test_rmsnorm_softplus_and_min_from_the_default_exporter_run_bit_exact(tmp_path):
    torch.manual_seed(0)
    model = RmsAndSoftplus().eval()
    shape, x = (1, 1, 12, 12), torch.randn(8, 1, 12, 12)
    pruned, _ = pruned_equivalently(model, shape, x, ratios=0.5)
    assert conv_widths(pruned) == [4, 4]
    # torch's default exporter writes Softplus's threshold and Hardshrink with Where masks
    back = read_back(pruned, shape, x, tmp_path, exporters=(True,))
    qm = ptq.quantize_ptq(back, shape, torch.randn(64, *shape[1:]).numpy())
    # and the RMSNorm as its pieces: 1 / sqrt(mean + eps) one table of the mean
    assert sum(o.kind == "lut" and o.attrs["function"] == "region" for o in qm.ops) == 3
    for q in (qm, ptq.quantize_ptq(pruned, shape, torch.randn(64, *shape[1:]).numpy())):
        kinds = [o.kind for o in q.ops]
        assert "maxpool" in kinds and "where" not in kinds
    bit_exact(qm, x[:4].numpy(), "riscv32", tmp_path, like=pruned, tol=0.1)


class ChannelsFirstLayerNorm(nn.Module):
    """ConvNeXt's own LayerNorm for NCHW maps, written out by hand."""
    def __init__(self, c: int, eps: float = 1e-6):
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.ones(c)), nn.Parameter(torch.zeros(c))
        self.eps = eps

    def forward(self, x):
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class HandWritten(nn.Module):
    def __init__(self):
        super().__init__()
        self.c0 = nn.Conv2d(1, 8, 3)
        self.norm = ChannelsFirstLayerNorm(8)
        self.c1 = nn.Conv2d(8, 8, 3)
        self.shuffle = nn.ChannelShuffle(2)
        self.c2 = nn.Conv2d(8, 6, 1)
        self.proj = nn.Linear(6, 6)
        self.gain = nn.Parameter(torch.linspace(0.5, 1.5, 6))
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        x = self.c1(F.gelu(self.norm(self.c0(x))))
        x = self.c2(F.relu(self.shuffle(x)))
        t = self.proj(x.flatten(2).transpose(1, 2))                 # (N, HW, 6)
        mean = t.mean(-1, keepdim=True)
        var = t.var(-1, keepdim=True, unbiased=False)
        t = (t - mean) / torch.sqrt(var + 1e-5) * self.gain + 0.1   # by hand, last axis
        return self.fc(t.mean(1))


def test_hand_written_layer_norms_and_weight_expressions_load_as_layer_norms(tmp_path):
    """On load, computations on weights alone (w[:, None, None]) become parameters and hand-
    written normalizations nn.LayerNorm (the channels-first one between permutes), so they
    prune, quantize to one integer layernorm each (the affine after the last-axis one
    folded into it) and run bit-exact on a target."""
    torch.manual_seed(0)
    model = HandWritten().eval()
    torch.save(model, tmp_path / "m.pt")
    shape, x = (1, 1, 9, 9), torch.randn(8, 1, 9, 9)
    loaded, _ = load_torch(str(tmp_path / "m.pt"), shape)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), atol=1e-4, rtol=1e-4)
    assert sum(isinstance(m, nn.LayerNorm) for m in loaded.modules()) == 2
    pruned, _ = pruned_equivalently(loaded, shape, x, ratios=0.5)
    # c0's channels prune through their norm, c1's through the shuffle (channel j of both
    # groups together), and c2's
    assert conv_widths(pruned) == [4, 4, 3]
    qm = ptq.quantize_ptq(pruned, shape, torch.randn(64, *shape[1:]).numpy())
    kinds = [o.kind for o in qm.ops]
    assert kinds.count("layernorm") == 2 and kinds.count("conv2d") == 4  # + the affine
    bit_exact(qm, x[:4].numpy(), "cortex-m55", tmp_path, like=pruned, tol=0.1)


class HandScaled(nn.Module):
    """Scaling to unit length and RMSNorm written by hand, and a cosine classifier: an
    embedding's dot products with prototypes scaled to unit length, x @ W."""
    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(1, 16, 3, 2, 1), nn.Conv2d(16, 16, 3, 2, 1)
        self.tok = nn.Linear(16, 16)
        self.gain = nn.Parameter(torch.rand(16) + 0.5)
        self.emb = nn.Linear(16, 8)
        self.protos = nn.Parameter(torch.randn(5, 8))

    def forward(self, x):
        y = F.relu(self.c1(x))
        y = y / y.norm(dim=1, keepdim=True).clamp(min=1e-6)            # each pixel's channels
        t = self.c2(y).flatten(2).transpose(1, 2)                       # (N, HW, 16)
        t = t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + 1e-6) * self.gain
        e = self.emb(F.relu(self.tok(t)).mean(1))
        e = e / (torch.linalg.vector_norm(e, dim=1, keepdim=True) + 1e-6)
        p = self.protos / torch.sqrt((self.protos ** 2).sum(1, keepdim=True))
        return 10 * e @ p.t()


def test_hand_written_unit_length_and_rms_norms_load_as_norms_and_prune(tmp_path):
    """They load as F.normalize and nn.RMSNorm (from torch and from both ONNX exporters,
    which write 1 / sqrt), the product with constant prototypes as a Linear; channels
    scaled to unit length prune (a pruned channel is a zero in the norm, as masked), and
    the cut model runs bit-exact on a target."""
    torch.manual_seed(0)
    model = HandScaled().eval()
    shape, x = (1, 1, 16, 16), torch.randn(8, 1, 16, 16)
    loaded, _ = saved_and_loaded(model, shape, x, tmp_path)
    for dynamo in (False, True):
        torch.onnx.export(model, (torch.zeros(shape),), str(tmp_path / "m.onnx"),
                          dynamo=dynamo)
        back, _ = load_torch(str(tmp_path / "m.onnx"), shape)
        with torch.no_grad():
            torch.testing.assert_close(back(x), model(x), atol=1e-4, rtol=1e-4)
        for source in (loaded, back):
            targets = [n.target for n in source.graph.nodes]
            assert targets.count(F.normalize) == 2
            assert sum(isinstance(m, nn.RMSNorm) for m in source.modules()) == 1
    pruned, _ = pruned_equivalently(loaded, shape, x, ratios=0.5)
    # c1 prunes through the unit length, c2 through the RMSNorm
    assert conv_widths(pruned) == [8, 8]
    widths = {n: m.out_features for n, m in pruned.named_modules() if isinstance(m, nn.Linear)}
    assert list(widths.values()) == [8, 4, 5]          # tok, emb, the prototypes' Linear
    qm = ptq.quantize_ptq(pruned, shape, torch.randn(64, *shape[1:]).numpy())
    assert [o.kind for o in qm.ops].count("layernorm") == 3
    bit_exact(qm, x[:3].numpy(), "cortex-m4", tmp_path, like=pruned, tol=0.1)


def test_a_model_the_legacy_exporter_refuses_exports_with_the_default_one(capfd, tmp_path):
    """deploy writes model.onnx with torch's legacy exporter, and with its default one for the
    ops the legacy one lacks (RMSNorm, channel_shuffle), printing nothing on stdout."""
    import onnx

    from edgeprune.frontend import export_torch
    from edgeprune.onnx_to_torch import onnx_to_torch
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ChannelShuffle(2), nn.RMSNorm([4, 6, 6]),
                          nn.Flatten(), nn.Linear(4 * 6 * 6, 3)).eval()
    proto = export_torch(model, (1, 1, 8, 8))
    assert capfd.readouterr().out == ""
    onnx.save(proto, str(tmp_path / "m.onnx"))
    back, _ = onnx_to_torch(tmp_path / "m.onnx")
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(back(x), model(x), atol=1e-4, rtol=1e-4)



class Repeated(nn.Module):
    """The same call written out three times; two zero tensors, each filled in."""
    def __init__(self, fill=True):
        super().__init__()
        self.fill = fill
        self.c1, self.c2 = nn.Conv2d(1, 8, 3), nn.Conv2d(8, 8, 3)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        x = self.c1(x)
        x = torch.where(self.c2(x) > 0, self.c2(x), 0.1 * self.c2(x))
        if not self.fill:
            return self.fc(x.mean((2, 3)))
        a, b = x.new_zeros(x.shape[0], 8), x.new_zeros(x.shape[0], 8)
        a[:, :4].copy_(x.mean((2, 3))[:, :4])
        b.view(-1, 2, 4)[:, 1].copy_(x.amax((2, 3))[:, 4:])
        return self.fc(a + b)


def test_a_call_repeated_on_the_same_inputs_is_computed_once():
    import torch.fx as fx

    from edgeprune.quantize import reference, to_relax
    torch.manual_seed(0)
    x = torch.randn(4, 1, 10, 10)
    model = Repeated().eval()
    gm = fx.symbolic_trace(model)
    ptq.merge_repeated_calls(gm)
    gm.recompile()
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["c1", "c2", "fc"]
    assert [n.target for n in gm.graph.nodes].count("new_zeros") == 2    # both written into
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x))
    qm = ptq.quantize_ptq(Repeated(fill=False).eval(), (1, 1, 10, 10), x.numpy())
    assert [o.kind for o in qm.ops].count("conv2d") == 2          # c2 once, then one table
    xq = reference.quantize_input(qm, x.numpy())
    assert np.array_equal(to_relax.build_host(to_relax.to_relax(qm, batch=4))(xq),
                          reference.run(qm, xq))
