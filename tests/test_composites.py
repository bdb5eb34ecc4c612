"""Forms user code writes that every stage reads as ops it knows: in-place methods, F.glu,
Softmax2d, clone, a squeeze-excitation's expand_as, nearest downsizing and an adaptive pool
whose output does not divide its input (which torch's ONNX exporters refuse)."""

import onnx
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from checks import bit_exact, conv_widths, pruned_equivalently
from edgeprune.errors import EdgepruneError
from edgeprune.frontend import export_torch
from edgeprune.load import load_torch, save_torch
from edgeprune.onnx_to_torch import onnx_to_torch
from edgeprune.quantize import ptq

torch.set_num_threads(1)


def _saved_and_loaded(model: nn.Module, shape, tmp_path):
    """`model` saved with its input shape and loaded back as every command loads it."""
    save_torch(model, shape, tmp_path / "m.pt")
    return load_torch(str(tmp_path / "m.pt"))[0]


class Composites(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 16, 3, padding=1)
        self.c1 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc1, self.fc2 = nn.Linear(8, 4), nn.Linear(4, 8)
        self.c2 = nn.Conv2d(8, 8, 3)
        self.fc = nn.Linear(8 * 3 * 3, 4)

    def forward(self, x):
        g = F.glu(self.stem(x), 1)                 # the first 8 channels gated by the last 8
        y = self.c1(g)
        y += g
        y.relu_()                                  # in place: its result unused in the graph
        s = torch.sigmoid(self.fc2(F.relu(self.fc1(y.mean((2, 3))))))
        y = y * s.view(y.size(0), -1, 1, 1).expand_as(y)
        y = F.interpolate(y, scale_factor=0.5, mode="nearest")       # every other pixel
        y = self.c2(y).clone()                                       # (N, 8, 4, 4)
        return self.fc(F.adaptive_avg_pool2d(y, 3).flatten(1))      # windows of 2 and 1


def test_composites_load_prune_export_and_run_bit_exact(tmp_path):
    torch.manual_seed(0)
    model = Composites().eval()
    shape, x = (1, 1, 10, 10), torch.randn(8, 1, 10, 10)
    loaded = _saved_and_loaded(model, shape, tmp_path)
    code = loaded.code
    assert ".relu_()" not in code and "glu" not in code and "chunk" in code
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
    pruned, _ = pruned_equivalently(loaded, shape, x, ratios=0.5)
    assert conv_widths(pruned) == [8, 4, 4]       # the GLU's halves prune as pairs
    onnx.save(export_torch(pruned, shape), str(tmp_path / "p.onnx"))
    back, _ = onnx_to_torch(tmp_path / "p.onnx")  # at another batch than exported
    with torch.no_grad():
        torch.testing.assert_close(back(x), pruned(x), atol=1e-4, rtol=1e-4)
    qm = ptq.quantize_ptq(back, shape, torch.randn(64, *shape[1:]).numpy())
    bit_exact(qm, x[:4].numpy(), "cortex-m7", tmp_path, like=pruned, tol=0.1)


def test_softmax2d_is_a_softmax_over_the_channels(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1),
                          nn.Softmax2d()).eval()
    save_torch(model, (1, 3, 6, 6), tmp_path / "m.pt")
    loaded, shape = load_torch(str(tmp_path / "m.pt"))
    assert "softmax" in loaded.code
    x = torch.randn(4, 3, 6, 6)
    pruned, _ = pruned_equivalently(loaded, shape, x, ratios=0.5)
    assert conv_widths(pruned) == [4, 4]           # the softmax's channels kept
    qm = ptq.quantize_ptq(pruned, shape, torch.randn(64, *shape[1:]).numpy())
    assert any(o.kind == "softmax" for o in qm.ops)


class Functional(nn.Module):
    """Layers written as functions of parameters: a weight-standardized conv (the weight
    computed from its parameter on each call), a plain F.conv2d and an F.linear."""

    def __init__(self):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(8, 1, 3, 3))
        self.w2, self.b2 = nn.Parameter(torch.randn(8, 8, 3, 3) * 0.2), nn.Parameter(
            torch.zeros(8))
        self.lw = nn.Parameter(torch.randn(3, 8) * 0.3)

    def forward(self, x):
        w = self.w1
        w = (w - w.mean((1, 2, 3), keepdim=True)) / (w.std((1, 2, 3), keepdim=True) + 1e-5)
        y = F.relu(F.conv2d(x, w, padding=1))
        y = F.relu(F.conv2d(y, self.w2, self.b2, stride=2))
        return F.linear(y.mean((2, 3)), self.lw)


def test_functional_layers_of_parameters_become_layers_that_prune(tmp_path):
    torch.manual_seed(0)
    model = Functional().eval()
    save_torch(model, (1, 1, 10, 10), tmp_path / "m.pt")
    loaded, shape = load_torch(str(tmp_path / "m.pt"))
    assert not any(n.target in (F.conv2d, F.linear) for n in loaded.graph.nodes)
    assert conv_widths(loaded) == [8, 8]
    x = torch.randn(8, 1, 10, 10)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
    pruned, _ = pruned_equivalently(loaded, shape, x, ratios=0.5)
    assert conv_widths(pruned) == [4, 4]
    qm = ptq.quantize_ptq(pruned, shape, torch.randn(64, *shape[1:]).numpy())
    bit_exact(qm, x[:4].numpy(), "riscv32", tmp_path, like=pruned, tol=0.1)


class OneValueInADict(nn.Module):
    """A regression head: one value per sample, x.squeeze() (which at batch 1 would drop the
    batch axis too), returned in a dict."""

    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(1, 8, 3), nn.Linear(8, 1)

    def forward(self, x):
        return {"value": self.fc(F.relu(self.conv(x)).mean((2, 3))).squeeze()}


def test_one_tensor_in_a_container_and_a_squeezed_value_per_sample(tmp_path):
    torch.manual_seed(0)
    model = OneValueInADict().eval()
    save_torch(model, (1, 1, 8, 8), tmp_path / "m.pt")
    loaded, shape = load_torch(str(tmp_path / "m.pt"))
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        assert loaded(x).shape == (4,) and loaded(x[:1]).shape == (1,)
        torch.testing.assert_close(loaded(x), model(x)["value"])
    pruned, _ = pruned_equivalently(loaded, shape, x, ratios=0.5)
    assert conv_widths(pruned) == [4]
    qm = ptq.quantize_ptq(pruned, shape, torch.randn(64, *shape[1:]).numpy())
    bit_exact(qm, x.numpy(), "cortex-m4", tmp_path, like=pruned, tol=0.25)   # 4 small values


def test_in_place_results_and_constant_permutes_keep_their_values():
    """`z = y.mul_(2)` then `z + y` reads the doubled y twice; a permuted constant next to
    (T, N, C) frames is moved with them, not taken for a batch."""
    from edgeprune.layers import batch_first, functional_inplace

    class InPlace(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.pos = nn.Conv2d(1, 4, 3), nn.Parameter(torch.randn(5, 1, 4))

        def forward(self, x):
            y = self.conv(x)
            z = y.mul_(2)
            w = z + y
            w.relu_()
            frames = w.flatten(2).permute(2, 0, 1)                  # (T, N, C)
            return (frames + self.pos.permute(0, 1, 2) * 2).mean(0)
    model, x = InPlace().eval(), torch.randn(3, 1, 7, 3)
    with torch.no_grad():
        want = model(x.clone())
        rewritten = batch_first(functional_inplace(model, (1, 1, 7, 3)), (1, 1, 7, 3))
        assert "_(" not in rewritten.code and "mean(1)" in rewritten.code
        torch.testing.assert_close(rewritten(x), want)


class Copies(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(1, 4, 3), nn.Linear(4, 3)

    def forward(self, x):
        x = torch.clamp(x.float(), 0, 1).contiguous()
        y = self.conv(x.to(x.device)).detach().type_as(x)
        y = y * (y > 0).float()
        y = torch.add(y, y.relu(), alpha=0.5).sub(y.sigmoid(), alpha=2)   # y + 0.5 relu(y) ...
        return self.fc(y.amax(dim=(2, 3)))


def test_value_copies_are_dropped_and_alpha_adds_written_out_on_load(tmp_path):
    """`x.float()` of a float input, `.contiguous()`, `.to(device)`, `.detach()`,
    `.type_as(x)`: later ops read the input itself, and the model quantizes; a cast that
    changes the dtype (a mask's `.float()`) stays. An add or sub with `alpha` is a + alpha * b."""
    torch.manual_seed(0)
    model, shape, x = Copies().eval(), (1, 1, 6, 6), torch.rand(4, 1, 6, 6)
    loaded = _saved_and_loaded(model, shape, tmp_path)
    code = loaded.code
    assert "contiguous" not in code and "detach" not in code and "type_as" not in code
    assert code.count(".float()") == 1 and ".to(" not in code and "alpha" not in code
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
    qm = ptq.quantize_ptq(loaded, shape, torch.rand(64, *shape[1:]).numpy())
    bit_exact(qm, x.numpy(), "cortex-m7", tmp_path, like=loaded, tol=0.1)


class AttentionAndStack(nn.Module):
    """Newer attention code (F.scaled_dot_product_attention on (N, heads, T, d), maybe causal
    or with a boolean mask of the keys each query sees) and branches stacked, then averaged
    over the new axis."""

    def __init__(self, mask=None):
        super().__init__()
        self.emb, self.qkv = nn.Linear(6, 16), nn.Linear(16, 48)
        self.out, self.alt, self.fc = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 3)
        i = torch.arange(5)
        self.causal = mask == "causal"
        self.register_buffer("band", (i[:, None] - i[None, :]).abs() <= 1 if mask == "band"
                             else None)

    def forward(self, x):                                    # (N, T, 6)
        h = self.emb(x)
        n, t, _ = h.shape
        q, k, v = self.qkv(h).reshape(n, t, 3, 2, 8).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=self.band, is_causal=self.causal)
        a = a.transpose(1, 2).reshape(n, t, 16)
        h = torch.stack([h + self.out(a), torch.relu(self.alt(h))], dim=1).mean(1)
        return self.fc(h.mean(1))


@pytest.mark.parametrize("mask", [None, "causal", "band"])
def test_scaled_dot_product_attention_and_a_reduced_stack_run_bit_exact(mask, tmp_path):
    torch.manual_seed(0)
    model = AttentionAndStack(mask).eval()
    save_torch(model, (1, 5, 6), tmp_path / "m.pt")
    loaded, shape = load_torch(str(tmp_path / "m.pt"))
    assert "scaled_dot_product" not in loaded.code and "stack" not in loaded.code
    x = torch.randn(8, 5, 6)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), atol=1e-5, rtol=1e-4)
    pruned, _ = pruned_equivalently(loaded, shape, x, ratios=0.5)
    qm = ptq.quantize_ptq(pruned, shape, torch.randn(64, *shape[1:]).numpy())
    assert sum(o.kind == "matmul" for o in qm.ops) == 2
    keep = [v for k, v in qm.params.items() if k.endswith(".keep")]
    assert [v.reshape(5, 5).sum() for v in keep] == {None: [], "causal": [15], "band": [13]}[mask]
    bit_exact(qm, x[:4].numpy(), "riscv32", tmp_path, like=pruned, tol=0.1)


class UpToSize(nn.Module):
    """A decoder's upsampling to its skip connection's size: a transposed conv called with
    output_size, a bilinear resize to `skip.shape[2:]`."""

    def __init__(self):
        super().__init__()
        self.d1, self.d2 = nn.Conv2d(1, 8, 3, padding=1), nn.Conv2d(8, 8, 3, 2, padding=1)
        self.up, self.out = nn.ConvTranspose2d(8, 8, 3, stride=2, padding=1), nn.Conv2d(16, 2, 1)

    def forward(self, x):
        skip = torch.relu(self.d1(x))
        low = torch.relu(self.d2(skip))
        up = self.up(low, output_size=skip.size())
        up = up + F.interpolate(low, size=skip.shape[2:], mode="bilinear", align_corners=False)
        return self.out(torch.cat([up, skip], 1))


def test_a_transposed_conv_to_an_output_size_prunes_and_runs_bit_exact(tmp_path):
    torch.manual_seed(0)
    model = UpToSize().eval()
    save_torch(model, (1, 1, 10, 10), tmp_path / "m.pt")   # 10 -> 5 -> 10: output padding 1
    loaded, shape = load_torch(str(tmp_path / "m.pt"))
    x = torch.randn(4, 1, 10, 10)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
    pruned, _ = pruned_equivalently(loaded, shape, x, ratios=0.5)
    assert conv_widths(pruned) == [4, 4, 4, 2]
    qm = ptq.quantize_ptq(pruned, shape, torch.randn(64, *shape[1:]).numpy())
    bit_exact(qm, x.numpy(), "cortex-m55", tmp_path, like=pruned, tol=0.1)


class Normed(nn.Module):
    """AlexNet's local response normalization between convolutions."""

    def __init__(self, size: int):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(1, 6, 3, padding=1), nn.Conv2d(6, 8, 3)
        self.lrn = nn.LocalResponseNorm(size, alpha=0.05, beta=0.75, k=1.5)
        self.c3 = nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x):
        return self.c3(torch.relu(self.c2(self.lrn(torch.relu(self.c1(x))))))


def _lrn_onnx(model: Normed, shape, path):
    """`model` as a hand-written ONNX graph with an LRN node (torch's exporters write LRN
    as a pooling over a 5-D tensor instead)."""
    from onnx import helper, numpy_helper
    ws = [numpy_helper.from_array(c.weight.detach().numpy(), f"w{i}") for i, c in
          enumerate((model.c1, model.c2, model.c3))]
    bs = [numpy_helper.from_array(c.bias.detach().numpy(), f"b{i}") for i, c in
          enumerate((model.c1, model.c2, model.c3))]
    lrn = model.lrn
    nodes = [helper.make_node("Conv", ["x", "w0", "b0"], ["c1"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("LRN", ["r1"], ["l"], "lrn", size=lrn.size, alpha=lrn.alpha,
                              beta=lrn.beta, bias=lrn.k),
             helper.make_node("Conv", ["l", "w1", "b1"], ["c2"]),
             helper.make_node("Relu", ["c2"], ["r2"]),
             helper.make_node("Conv", ["r2", "w2", "b2"], ["y"], pads=[1, 1, 1, 1])]
    out = (shape[0], 4, shape[2] - 2, shape[3] - 2)
    graph = helper.make_graph(nodes, "lrn", [helper.make_tensor_value_info(
        "x", onnx.TensorProto.FLOAT, shape)], [helper.make_tensor_value_info(
            "y", onnx.TensorProto.FLOAT, out)], ws + bs)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


def _onnx_window(model: Normed, x):
    """`model` with the ONNX specification's window: channels c - floor((size - 1) / 2) to
    c + ceil((size - 1) / 2) (torch's starts at c - size // 2)."""
    lrn = model.lrn
    with torch.no_grad():
        r = torch.relu(model.c1(x))
        total = torch.zeros_like(r)
        for c in range(r.shape[1]):
            lo, hi = max(0, c - (lrn.size - 1) // 2), c + lrn.size // 2
            total[:, c] = (r[:, lo:hi + 1] ** 2).sum(1)
        y = r / (lrn.k + lrn.alpha / lrn.size * total) ** lrn.beta
        return model.c3(torch.relu(model.c2(y)))


@pytest.mark.parametrize("size", [5, 4])
def test_local_response_norm_from_torch_and_onnx_prunes_and_runs_bit_exact(size, tmp_path):
    """LRN written as the square, shifted channel slices and a table every stage knows: the
    channels it sums over keep their neighbours (not pruned), the rest prunes; a size past
    the channel count sums over every channel."""
    torch.manual_seed(0)
    model = Normed(size).eval()
    shape, x = (1, 1, 8, 8), torch.randn(8, 1, 8, 8) * 2
    loaded = _saved_and_loaded(model, shape, tmp_path)
    assert "lrn" not in loaded.code and "pad" in loaded.code
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
    pruned, _ = pruned_equivalently(loaded, shape, x, ratios=0.5)
    assert conv_widths(pruned) == [6, 4, 4]
    qm = ptq.quantize_ptq(pruned, shape, (torch.randn(64, *shape[1:]) * 2).numpy())
    bit_exact(qm, x[:4].numpy(), "cortex-m7", tmp_path / "torch", like=pruned, tol=0.1)
    from edgeprune.compile import compile_model
    from edgeprune.simulate import simulate
    compile_model(str(tmp_path / "m.pt"), "cortex-m7", tmp_path / "f", log=lambda *a: None)
    result, _ = simulate(tmp_path / "f", x[:2].numpy())   # in float too
    assert result["outputs_match"], result["rel_err"]

    model.lrn.size = size + 5      # ONNX: past the 6 channels
    _lrn_onnx(model, shape, tmp_path / "m.onnx")
    loaded, _ = load_torch(str(tmp_path / "m.onnx"))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), _onnx_window(model, x), atol=1e-4, rtol=1e-4)
    pruned, _ = pruned_equivalently(loaded, shape, x, ratios=0.5)
    onnx.save(export_torch(pruned, shape), str(tmp_path / "p.onnx"))   # channel pads
    back, _ = onnx_to_torch(tmp_path / "p.onnx")
    qm = ptq.quantize_ptq(back, shape, (torch.randn(64, *shape[1:]) * 2).numpy())
    bit_exact(qm, x[:4].numpy(), "riscv32", tmp_path / "onnx", like=pruned, tol=0.1)
    torch.onnx.export(model, (torch.zeros(shape),), str(tmp_path / "t.onnx"), dynamo=False)
    with pytest.raises(EdgepruneError, match="write nn.LocalResponseNorm as this pool"):
        load_torch(str(tmp_path / "t.onnx"))      # a 3-D pool over the channels: named
    if model.lrn.size % 2 == 0:   # TVM's float frontend takes odd sizes only: named
        with pytest.raises(EdgepruneError, match="'lrn' \\(LRN\\) has an even size 10"):
            compile_model(str(tmp_path / "m.onnx"), "cortex-m7", tmp_path / "f2",
                          log=lambda *a: None)


def test_local_response_norm_of_a_signal_runs_bit_exact(tmp_path):
    """After Conv1d (N, C, L): its channel padding lifts to 2-D with the rest of the model."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(2, 6, 3, padding=1), nn.ReLU(),
                          nn.LocalResponseNorm(3, 0.05, 0.75, 1.5), nn.Conv1d(6, 8, 3),
                          nn.ReLU(), nn.Flatten(), nn.Linear(8 * 14, 3)).eval()
    save_torch(model, (1, 2, 16), tmp_path / "m.pt")
    loaded, shape = load_torch(str(tmp_path / "m.pt"))
    x = torch.randn(4, 2, 16) * 2
    with torch.no_grad():
        torch.testing.assert_close(loaded(x.unsqueeze(2)), model(x))
    pruned, _ = pruned_equivalently(loaded, shape, x.unsqueeze(2), ratios=0.5)
    qm = ptq.quantize_ptq(pruned, shape, (torch.randn(64, *shape[1:]) * 2).numpy())
    bit_exact(qm, x.unsqueeze(2).numpy(), "cortex-m55", tmp_path, like=pruned, tol=0.1)


class Contractions(nn.Module):
    """torch.einsum as user code writes it: a 1x1 channel map with a weight, a Linear over
    each frame's features, attention's two products with heads; and x.repeat."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.mix = nn.Parameter(torch.randn(8, 6) * 0.3)          # (c, d)
        self.proj = nn.Parameter(torch.randn(6, 8) * 0.3)         # (d, e)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        y = torch.relu(self.stem(x)).repeat(1, 2, 1, 1)          # (N, 8, H, W)
        y = torch.einsum("nchw,cd->ndhw", y, self.mix)            # (N, 6, H, W)
        t = y.flatten(2).transpose(1, 2)                          # (N, T, 6)
        t = torch.einsum("ntd,de->nte", t, self.proj)             # (N, T, 8)
        q = t.reshape(t.shape[0], t.shape[1], 2, 4).transpose(1, 2)   # (N, 2, T, 4)
        att = torch.softmax(torch.einsum("bhqd,bhkd->bhqk", q, q) * 0.5, -1)
        o = torch.einsum("bhqk,bhkd->bhqd", att, q)
        return self.fc(o.transpose(1, 2).flatten(2).mean(1))


def test_einsum_and_repeat_load_as_products_and_concatenations_and_run_bit_exact(tmp_path):
    torch.manual_seed(0)
    model = Contractions().eval()
    shape, x = (1, 1, 4, 4), torch.randn(4, 1, 4, 4)
    loaded = _saved_and_loaded(model, shape, tmp_path)
    assert "torch.einsum" not in loaded.code and "repeat" not in loaded.code
    assert sum(isinstance(m, nn.Conv2d) for m in loaded.modules()) == 2   # the 1x1 map
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
    pruned, _ = pruned_equivalently(loaded, shape, x, ratios=0.5)
    assert conv_widths(pruned) == [2, 3]         # the stem (repeated: its copies as one)
    qm = ptq.quantize_ptq(pruned, shape, torch.randn(64, *shape[1:]).numpy())
    assert sum(o.kind == "matmul" for o in qm.ops) == 2
    bit_exact(qm, x.numpy(), "cortex-m7", tmp_path / "torch", like=pruned, tol=0.1)
    torch.onnx.export(model, (torch.zeros(shape),), str(tmp_path / "m.onnx"), dynamo=False)
    assert {"Einsum", "Tile"} <= {n.op_type for n in onnx.load(str(tmp_path / "m.onnx")).graph.node}
    back, _ = load_torch(str(tmp_path / "m.onnx"))      # ONNX Einsum and Tile
    with torch.no_grad():
        torch.testing.assert_close(back(x), model(x), atol=1e-5, rtol=1e-4)
    assert all(p.requires_grad for p in back.parameters())   # the einsum's weights train


class PerHead(nn.Module):
    """An einsum with a weight that has a batch (head) index: no product every stage knows."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(2, 4, 3))

    def forward(self, x):
        return torch.einsum("nhtd,hde->nhte", x, self.w)


def test_an_einsum_no_stage_knows_is_named(tmp_path):
    save_torch(PerHead(), (1, 2, 5, 4), tmp_path / "m.pt")
    loaded, shape = load_torch(str(tmp_path / "m.pt"))
    with pytest.raises(EdgepruneError, match="einsum"):
        ptq.quantize_ptq(loaded, shape, torch.randn(8, *shape[1:]).numpy())


class Bounds(nn.Module):
    """One-sided clamps written as their own methods and functions, and CELU (which TVM's
    ONNX frontend lacks)."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(1, 8, 3), nn.Conv2d(8, 8, 3)
        self.celu, self.fc = nn.CELU(0.5), nn.Linear(8, 3)

    def forward(self, x):
        h = torch.clamp_max(self.c1(x).clamp_min(-0.5), 2.0)
        h = F.celu(self.celu(self.c2(h)), 2.0)
        return self.fc(h.mean((2, 3)))


def test_one_sided_clamps_and_celu_prune_lower_and_run_bit_exact(tmp_path):
    from edgeprune.compile import compile_model

    torch.manual_seed(0)
    model, shape, x = Bounds().eval(), (1, 1, 8, 8), torch.randn(4, 1, 8, 8)
    loaded = _saved_and_loaded(model, shape, tmp_path)
    code = loaded.code
    assert code.count("torch.clamp(") == 2 and "clamp_min(" not in code and "clamp_max(" not in code
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
    pruned, _ = pruned_equivalently(loaded, shape, x, ratios=0.5)
    assert conv_widths(pruned) == [4, 4]
    save_torch(pruned, shape, tmp_path / "p.pt")
    build = compile_model(str(tmp_path / "p.pt"), "cortex-m7", tmp_path / "float",
                          log=lambda *a: None, firmware=False)    # the float model, by TVM
    assert build["kind"] == "float"
    qm = ptq.quantize_ptq(pruned, shape, torch.randn(64, *shape[1:]).numpy())
    bit_exact(qm, x.numpy(), "cortex-m4", tmp_path / "q", like=pruned, tol=0.1)


class NewAxes(nn.Module):
    """Axes added by indexing with None: a grey (N, H, W) input made a map, a squeeze-
    excitation's gate made (N, C, 1, 1), a mask over the channels made (N, 1, H, W)."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(1, 8, 3, padding=1), nn.Conv2d(8, 8, 3, 2, 1)
        self.se, self.fc = nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x):                                   # (N, H, W)
        h = torch.relu(self.c1(x[:, None]))
        h = h * torch.sigmoid(self.se(h.mean((2, 3))))[:, :, None, None]
        h = torch.relu(self.c2(h * torch.sigmoid(h.mean(1))[:, None, ...]))
        return self.fc(h.amax((2, 3)))


def test_axes_added_by_indexing_with_none_prune_and_run_bit_exact(tmp_path):
    torch.manual_seed(0)
    model, shape, x = NewAxes().eval(), (1, 10, 10), torch.randn(4, 10, 10)
    loaded = _saved_and_loaded(model, shape, tmp_path)
    assert loaded.code.count("torch.unsqueeze") == 4 and "None]" not in loaded.code
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
    pruned, _ = pruned_equivalently(loaded, shape, x, ratios=0.5)
    assert conv_widths(pruned) == [8, 4]       # the mean over c1's channels keeps them
    qm = ptq.quantize_ptq(pruned, shape, torch.randn(64, *shape[1:]).numpy())
    bit_exact(qm, x.numpy(), "cortex-m7", tmp_path / "q", like=pruned, tol=0.1)
