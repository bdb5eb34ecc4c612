"""A small transformer block on frames (keyword spotting on feature frames): a positional
embedding (op addconst), multi-head self-attention (products of two activations, op matmul),
softmax over the keys (with a causal, band or padding mask: the keys it removes are
skipped), LayerNorm, a feed-forward block. From torch and both ONNX exporters; pruning cuts
the feed-forward width, the residual stream (through the LayerNorm and the positional
constant) and every head's width (its queries with its keys, its values); int8 bit-exact on
the host and on targets."""

import copy
import re

import numpy as np
import pytest
import torch
import torch.nn as nn

from checks import bit_exact, pruned_equivalently, read_back, saved_and_loaded
from edgeprune.errors import EdgepruneError
from edgeprune.onnx_to_torch import onnx_to_torch
from edgeprune.quantize import ptq, reference, to_relax

torch.set_num_threads(1)
SHAPE = (1, 12, 10)


class Block(nn.Module):
    def __init__(self, heads):
        super().__init__()
        self.heads = heads
        self.emb = nn.Linear(10, 16)
        self.pos = nn.Parameter(torch.randn(1, 12, 16) * 0.5)    # a positional embedding
        self.q, self.k, self.v, self.o = (nn.Linear(16, 16) for _ in range(4))
        self.norm, self.f1, self.f2 = nn.LayerNorm(16), nn.Linear(16, 32), nn.Linear(32, 16)
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        t = self.emb(x) + self.pos
        n, length, c = t.shape
        h, d = self.heads, c // self.heads

        def split(y):
            return y.reshape(n, length, h, d).transpose(1, 2)
        q, k, v = split(self.q(t)), split(self.k(t)), split(self.v(t))
        a = torch.softmax(q @ k.transpose(-2, -1) / d ** 0.5, -1)
        t = self.norm(t + self.o((a @ v).transpose(1, 2).reshape(n, length, c)))
        t = t + self.f2(torch.relu(self.f1(t)))
        return self.fc(t.mean(1))


def _sources(model, x, tmp_path):
    """`model`, then what each of torch's ONNX exporters makes of it, checked equal on `x`."""
    yield model
    for dynamo in (False, True):
        path = tmp_path / f"m{int(dynamo)}.onnx"
        torch.onnx.export(model, (torch.zeros(SHAPE),), str(path), dynamo=dynamo)
        back = onnx_to_torch(path)[0]
        with torch.no_grad():
            torch.testing.assert_close(back(x), model(x), atol=1e-5, rtol=1e-4)
        yield back


@pytest.mark.parametrize("heads, target", [(1, "cortex-m55"), (2, "riscv32")])
def test_attention_block_prunes_and_runs_bit_exact(heads, target, tmp_path):
    torch.manual_seed(0)
    model = Block(heads).eval()
    x = torch.randn(8, *SHAPE[1:])
    calib = torch.randn(64, *SHAPE[1:]).numpy()
    for i, source in enumerate(_sources(model, x, tmp_path)):
        pruned, _ = pruned_equivalently(source, SHAPE, x, ratios=0.5)
        widths = [m.out_features for m in pruned.modules() if isinstance(m, nn.Linear)]
        # f1: 32 -> 16; the residual stream (emb, o, f2) through the LayerNorm: 16 -> 8; every
        # head's values and its queries with its keys: 8 -> 4 a head (the exporters split the
        # keys' heads and transpose them in one permute)
        assert sorted(widths) == [4] + [8] * 6 + [16]
        qm = ptq.quantize_ptq(source, SHAPE, calib)
        assert [o.kind for o in qm.ops].count("matmul") == 2
        assert [o.kind for o in qm.ops].count("addconst") == 1
        assert "lut" not in [o.kind for o in qm.ops]   # / d ** 0.5: in q k^T's multiplier
    # both products run as the int8 kernel that reads its operands as they are
    assert to_relax.to_relax(qm).script().count('"edgeprune.kernel": "matmul"') == 2
    bit_exact(qm, calib[:4], target, tmp_path, on_target=2, like=model)   # the last source's
    # the positional constant (12 x 16) and the LayerNorm's per-channel constants sit in
    # flash in the narrowest integers that hold them, not as int64
    text = (tmp_path / "b" / "c_library" / "model.c").read_text()
    wide = [int(n) for n in re.findall(r"static const int64_t \w+\[(\d+)\]", text)]
    assert max(wide, default=0) < 16, wide


class Mixer(nn.Module):
    """MLP-Mixer: a token MLP over the positions, transposed back onto the residual stream."""
    def __init__(self):
        super().__init__()
        self.emb, self.n1, self.n2 = nn.Linear(10, 16), nn.LayerNorm(16), nn.LayerNorm(16)
        self.tok = nn.Sequential(nn.Linear(12, 24), nn.GELU(), nn.Linear(24, 12))
        self.ch = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        t = self.emb(x)
        t = t + self.tok(self.n1(t).transpose(1, 2)).transpose(1, 2)
        t = t + self.ch(self.n2(t))
        return self.fc(t.mean(1))


def test_token_mixing_mlps_prune_their_hidden_widths_and_run_bit_exact(tmp_path):
    torch.manual_seed(0)
    model = Mixer().eval()
    x = torch.randn(8, *SHAPE[1:])
    pruned, _ = pruned_equivalently(model, SHAPE, x, ratios=0.5)
    widths = {n: m.out_features for n, m in pruned.named_modules() if isinstance(m, nn.Linear)}
    # the hidden widths and the residual stream's channels halve (the token MLP maps each
    # channel's positions); the positions stay
    assert widths == {"emb": 8, "tok.0": 12, "tok.2": 12, "ch.0": 16, "ch.2": 8, "fc": 4}
    # ONNX writes the GELU as erf and arithmetic on numbers: the hidden widths prune alike
    loaded = read_back(model, SHAPE, x, tmp_path, exporters=(False,))
    from_onnx, _ = pruned_equivalently(loaded, SHAPE, x, ratios=0.5)
    assert sorted(m.out_features for m in from_onnx.modules() if isinstance(m, nn.Linear)) == \
        sorted(widths.values())
    calib = torch.randn(64, *SHAPE[1:]).numpy()
    bit_exact(ptq.quantize_ptq(pruned, SHAPE, calib), calib[:4], "cortex-m7", tmp_path,
              on_target=2, like=pruned)


def test_a_matrix_product_with_a_broadcast_batch_is_named():
    class Broadcast(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4)

        def forward(self, x):
            y = self.a(x)
            return (y.unsqueeze(1) @ y.transpose(1, 2)).mean((2, 3))   # (N, 1, ..) @ (N, ..)

    with pytest.raises(EdgepruneError, match="node 'matmul'.*same leading shape"):
        ptq.quantize_ptq(Broadcast().eval(), (2, 3, 4), np.zeros((4, 3, 4), np.float32))


class TorchTransformer(nn.Module):
    """torch's own layers: nn.TransformerEncoder of two post- or pre-norm GELU layers and an
    nn.MultiheadAttention (edgeprune.layers.lower_attention writes them as plain ops)."""

    def __init__(self, norm_first):
        super().__init__()
        self.emb = nn.Linear(10, 16)
        layer = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True, norm_first=norm_first,
                                           activation="gelu")
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.mha, self.fc = nn.MultiheadAttention(16, 4, batch_first=True), nn.Linear(16, 4)

    def forward(self, x):
        t = self.enc(self.emb(x))
        o, _ = self.mha(t, t, t)
        return self.fc((t + o).mean(1))


@pytest.mark.parametrize("norm_first, target", [(False, "cortex-a53"), (True, "cortex-m7")])
def test_torch_transformer_layers_lower_prune_and_run_bit_exact(norm_first, target, tmp_path):
    from edgeprune.layers import lower_attention

    torch.manual_seed(0)
    model = TorchTransformer(norm_first).eval()
    x = torch.randn(8, *SHAPE[1:])
    with torch.no_grad():
        want = model(x)
        lowered = lower_attention(model)
        torch.testing.assert_close(lowered(x), want, atol=1e-5, rtol=1e-4)
    pruned, _ = pruned_equivalently(lowered, SHAPE, x, ratios=0.5)
    # each layer's feed-forward width 32 -> 16, and the residual stream through the
    # LayerNorms (emb, the attentions' output projections, the feed-forwards' second Linears)
    # 16 -> 8, every head's queries with its keys and its values 16 -> 8
    assert sorted(m.out_features for m in pruned.modules() if isinstance(m, nn.Linear)) == \
        [4] + [8] * 15 + [16] * 2
    calib = torch.randn(64, *SHAPE[1:]).numpy()
    qm = ptq.quantize_ptq(lowered, SHAPE, calib)
    assert [o.kind for o in qm.ops].count("layernorm") == 4
    bit_exact(qm, calib[:4], target, tmp_path, on_target=2, like=lowered)


@pytest.mark.parametrize("dynamo, target", [(True, "cortex-m7"), (False, "riscv32")])
def test_torch_transformer_layers_read_back_from_onnx(dynamo, target, tmp_path):
    """torch's exporters write nn.MultiheadAttention time first ((T, N, E), heads merged with
    the batch: (T, N * H, d)): those values are read per sample, the batch axis in front;
    the model prunes and runs bit-exact like the torch one."""
    torch.manual_seed(0)
    model = TorchTransformer(norm_first=True).eval()
    torch.onnx.export(model, (torch.zeros(SHAPE),), str(tmp_path / "m.onnx"), dynamo=dynamo)
    back, shape = onnx_to_torch(tmp_path / "m.onnx")
    x = torch.randn(8, *SHAPE[1:])
    with torch.no_grad():
        torch.testing.assert_close(back(x), model(x), atol=1e-5, rtol=1e-4)
    pruned, _ = pruned_equivalently(back, shape, x, ratios=0.5)
    # each layer's feed-forward width 32 -> 16, the residual stream 16 -> 8, and the attention's
    # input projection (queries, keys and values of 2 heads: 3 x 2 x 8) 48 -> 24
    assert [m.out_features for m in pruned.modules() if isinstance(m, nn.Linear)] == \
        [8, 24, 8, 16, 8, 24, 8, 16, 8, 24, 8, 4]
    calib = torch.randn(64, *SHAPE[1:]).numpy()
    qm = ptq.quantize_ptq(pruned, shape, calib)
    bit_exact(qm, calib[:3], target, tmp_path, like=pruned)


class ConvThenTimeFirstAttention(nn.Module):
    """A Conv1d's features made time first, (T, N, C), for nn.MultiheadAttention and an
    nn.TransformerEncoderLayer without batch_first, then averaged over time: a 1-D model with
    attention, from ONNX."""
    def __init__(self):
        super().__init__()
        self.conv, self.mha = nn.Conv1d(10, 12, 3, padding=1), nn.MultiheadAttention(12, 3)
        self.enc = nn.TransformerEncoderLayer(12, 2, 20, dropout=0.0)
        self.f1, self.f2 = nn.Linear(12, 16), nn.Linear(16, 4)

    def forward(self, x):
        t = torch.relu(self.conv(x.transpose(1, 2))).permute(2, 0, 1)
        a, _ = self.mha(t, t, t)
        return self.f2(torch.relu(self.f1(self.enc(t + a).mean(0))))


def test_time_first_attention_after_a_conv1d_reads_back_from_onnx(tmp_path):
    from edgeprune.load import load_torch
    torch.manual_seed(0)
    model = ConvThenTimeFirstAttention().eval()
    torch.onnx.export(model, (torch.zeros(SHAPE),), str(tmp_path / "m.onnx"), dynamo=False)
    lifted, shape = load_torch(str(tmp_path / "m.onnx"))
    x = torch.randn(6, *SHAPE[1:])
    with torch.no_grad():
        torch.testing.assert_close(lifted(x.view(6, *shape[1:])), model(x), atol=1e-5,
                                   rtol=1e-4)
    xs = x.view(6, *shape[1:])
    pruned, _ = pruned_equivalently(lifted, shape, xs, ratios=0.5)
    widths = [m.out_features for m in pruned.modules() if isinstance(m, nn.Linear)]
    assert 10 in widths and widths[-2:] == [8, 4]     # feed-forward 20 -> 10, f1 16 -> 8
    qm = ptq.quantize_ptq(pruned, shape, xs.numpy())
    xq = reference.quantize_input(qm, xs[:2].numpy())
    assert np.array_equal(to_relax.build_host(to_relax.to_relax(qm, batch=2))(xq),
                          reference.run(qm, xq))


def test_sequence_first_attention_is_refused_by_name():
    from edgeprune.layers import lower_attention

    class SeqFirst(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = nn.MultiheadAttention(8, 2)

        def forward(self, x):
            return self.mha(x, x, x)[0]

    with pytest.raises(EdgepruneError, match="layer 'mha'.*batch_first=True"):
        lower_attention(SeqFirst())


class SequenceFirst(nn.Module):
    """torch's default layout for its sequence layers: frames (T, N, C) from a permute, a
    positional embedding (T, 1, C), a transformer layer and an LSTM without batch_first, the
    last step read out."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(4, 16, 3, padding=1)
        self.pos = nn.Parameter(torch.randn(12, 1, 16) * 0.3)
        self.enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0),
                                         1, enable_nested_tensor=False)
        self.lstm, self.fc = nn.LSTM(16, 8), nn.Linear(8, 3)

    def forward(self, x):
        t = torch.relu(self.conv(x)).permute(2, 0, 1) + self.pos
        out, _ = self.lstm(self.enc(t))
        return self.fc(out[-1])


def test_sequence_first_layers_are_written_batch_first_and_run_bit_exact(tmp_path):
    from edgeprune.load import load_torch, save_torch

    torch.manual_seed(0)
    model = SequenceFirst().eval()
    shape, x = (1, 4, 12), torch.randn(8, 4, 12)
    save_torch(model, shape, tmp_path / "m.pt")
    loaded, shape = load_torch(str(tmp_path / "m.pt"))     # lifted to 2-D: (N, 4, 1, 12)
    assert shape == (1, 4, 1, 12) and "permute((0, 3, 2, 1))" in loaded.code
    x2 = x.unsqueeze(2)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x2), model(x), atol=1e-5, rtol=1e-4)
    pruned, _ = pruned_equivalently(loaded, shape, x2, ratios=0.5)
    qm = ptq.quantize_ptq(pruned, shape, torch.randn(64, *shape[1:]).numpy())
    bit_exact(qm, x2[:4].numpy(), "cortex-m7", tmp_path, on_target=2, like=pruned, tol=0.1)


class ClassToken(nn.Module):
    """KWT's head: a learnt class token before the frames, a positional embedding, the token's
    row read out (op pad, then addconst)."""

    def __init__(self):
        super().__init__()
        self.emb, self.f, self.fc = nn.Linear(10, 16), nn.Linear(16, 16), nn.Linear(16, 4)
        self.cls = nn.Parameter(torch.randn(1, 1, 16))
        self.pos = nn.Parameter(torch.randn(1, 13, 16) * 0.3)

    def forward(self, x):
        t = self.emb(x)
        t = torch.cat([self.cls.expand(t.shape[0], -1, -1), t], 1) + self.pos
        return self.fc(torch.relu(self.f(t))[:, 0])


def test_class_token_prunes_and_runs_bit_exact(tmp_path):
    torch.manual_seed(0)
    model = ClassToken().eval()
    x = torch.randn(8, *SHAPE[1:])
    calib = torch.randn(64, *SHAPE[1:]).numpy()
    for source in _sources(model, x, tmp_path):
        pruned, _ = pruned_equivalently(source, SHAPE, x, ratios=0.5)
        # the token and the positional embedding are cut with the frames' channels
        assert [m.out_features for m in pruned.modules() if isinstance(m, nn.Linear)] == \
            [8, 8, 4]
        qm = ptq.quantize_ptq(source, SHAPE, calib)
        assert [o.kind for o in qm.ops][:3] == ["dense", "pad", "addconst"]
    bit_exact(qm, calib[:4], "cortex-m4", tmp_path, on_target=2, like=model)
    qm = ptq.quantize_ptq(pruned, SHAPE, calib)     # the last source's, cut
    assert [o.kind for o in qm.ops][:3] == ["dense", "pad", "addconst"]
    bit_exact(qm, calib[:4], "cortex-m4", tmp_path / "pruned", on_target=2, like=pruned)


class LearntPositions(nn.Module):
    """Positions learnt as an nn.Embedding looked up at constant indices (BERT-style)."""

    def __init__(self):
        super().__init__()
        self.emb, self.pos = nn.Linear(10, 16), nn.Embedding(12, 16)
        self.register_buffer("at", torch.arange(12))
        self.ff, self.fc = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16)), \
            nn.Linear(16, 4)

    def forward(self, x):
        h = self.emb(x) + self.pos(self.at)
        return self.fc((h + self.ff(h)).mean(1))


def test_learnt_positions_looked_up_at_constant_indices_fold_and_prune(tmp_path):
    """The lookup folds on load into the table it gives (still trained), which prunes with
    the residual stream; bit-exact on a target."""
    torch.manual_seed(0)
    x = torch.randn(8, *SHAPE[1:])
    loaded, _ = saved_and_loaded(LearntPositions().eval(), SHAPE, x, tmp_path)
    modules = dict(loaded.named_modules())
    assert not any(isinstance(modules.get(n.target), nn.Embedding) for n in loaded.graph.nodes
                   if n.op == "call_module")
    assert any(p.shape == (12, 16) for p in loaded.parameters())
    pruned, _ = pruned_equivalently(loaded, SHAPE, x, ratios=0.5)
    assert [m.out_features for m in pruned.modules() if isinstance(m, nn.Linear)] == \
        [8, 16, 8, 4]
    qm = ptq.quantize_ptq(pruned, SHAPE, torch.randn(64, *SHAPE[1:]).numpy())
    bit_exact(qm, x[:3].numpy(), "cortex-m7", tmp_path, on_target=2, like=pruned)


class Masked(nn.Module):
    """Attention that may not look everywhere: a causal nn.TransformerEncoder (a float 0/-inf
    mask and is_causal), an nn.MultiheadAttention with a boolean mask (a band, and the last
    two frames taken as padding), and a hand-written head that fills its future
    scores with -inf. Each softmax skips the keys its mask removes (op softmax, params keep)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Linear(10, 16)
        self.enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, batch_first=True),
                                         1, enable_nested_tensor=False)
        self.mha, self.q, self.k = nn.MultiheadAttention(16, 4, batch_first=True), \
            nn.Linear(16, 8), nn.Linear(16, 8)
        self.fc = nn.Linear(16, 4)
        i = torch.arange(12)
        self.register_buffer("causal", nn.Transformer.generate_square_subsequent_mask(12))
        self.register_buffer("band", ((i[:, None] - i[None, :]).abs() > 3) | (i[None, :] >= 10))

    def forward(self, x):
        t = self.enc(self.emb(x), mask=self.causal, is_causal=True)
        o, _ = self.mha(t, t, t, attn_mask=self.band)
        s = (self.q(t) @ self.k(t).transpose(1, 2)).masked_fill(self.causal < 0, float("-inf"))
        return self.fc((t + o + torch.softmax(s, -1) @ t).mean(1))


@pytest.mark.parametrize("target", ["cortex-m7", "cortex-a53"])
def test_attention_masks_prune_quantize_and_run_bit_exact(target, tmp_path):
    from edgeprune.layers import lower_attention

    torch.manual_seed(0)
    model = Masked().eval()
    x = torch.randn(8, *SHAPE[1:])
    with torch.no_grad():
        want = model(x)
        lowered = lower_attention(copy.deepcopy(model))
        torch.testing.assert_close(lowered(x), want, atol=1e-5, rtol=1e-4)
    pruned, _ = pruned_equivalently(lowered, SHAPE, x, ratios=0.5)
    # the feed-forward width 32 -> 16, the residual stream, every head's queries, keys and
    # values 16 -> 8; the hand-written head's queries with its keys 8 -> 4
    assert sorted(m.out_features for m in pruned.modules() if isinstance(m, nn.Linear)) == \
        [4] * 3 + [8] * 10 + [16]
    calib = torch.randn(64, *SHAPE[1:]).numpy()
    qm = ptq.quantize_ptq(pruned, SHAPE, calib)
    keep = {k: v for k, v in qm.params.items() if k.endswith(".keep")}
    assert sorted(v.shape for v in keep.values()) == [(1, 1, 12, 12)] * 2 + [(1, 12, 12)]
    future = np.triu(np.ones((12, 12), bool), 1)
    for k, v in keep.items():    # every mask keeps no future key; the band mask and padding less
        assert not v.reshape(12, 12)[future].any() or not v.reshape(12, 12)[:, 10:].any()
    bit_exact(qm, calib[:4], target, tmp_path, on_target=2, like=pruned)
    for dynamo in (False, True):     # the masks as ONNX writes them (Add, Where) read back
        torch.onnx.export(pruned, (torch.zeros(SHAPE),), str(tmp_path / "m.onnx"), dynamo=dynamo)
        back = onnx_to_torch(tmp_path / "m.onnx")[0]
        qm = ptq.quantize_ptq(back, SHAPE, calib)
        assert len([k for k in qm.params if k.endswith(".keep")]) == 3
        xq = reference.quantize_input(qm, calib[:4])
        assert np.array_equal(to_relax.build_host(to_relax.to_relax(qm, batch=4))(xq),
                              reference.run(qm, xq))


def test_attention_masks_the_quantizer_cannot_take_are_named():
    class FromInput(nn.Module):    # padding read from the input itself: not a constant
        def __init__(self):
            super().__init__()
            self.mha = nn.MultiheadAttention(10, 2, batch_first=True)

        def forward(self, x):
            return self.mha(x, x, x, key_padding_mask=x[:, :, 0] > 5)[0]

    class Bias(nn.Module):         # removed keys and a finite bias in one additive mask
        def __init__(self, every=False):
            super().__init__()
            m = torch.zeros(12, 12)
            m[:, 6:], m[:, 0] = float("-inf"), 0.5
            if every:
                m[3] = float("-inf")
            self.register_buffer("m", m)

        def forward(self, x):
            return torch.softmax(x @ x.transpose(1, 2) + self.m, -1)

    from edgeprune.layers import lower_attention
    calib = np.zeros((4, *SHAPE[1:]), np.float32)
    for model, match in ((lower_attention(FromInput()), "attention mask computed from the input"),
                         (Bias(), "finite non-zero entries"),):
        with pytest.raises(EdgepruneError, match=match):
            ptq.quantize_ptq(model.eval(), SHAPE, calib)
    m = Bias()
    m.m[:, 0] = 0.0
    m.m[3] = float("-inf")
    with pytest.raises(EdgepruneError, match="removes every key of some row"):
        ptq.quantize_ptq(m.eval(), SHAPE, calib)


class CausalHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(10, 24)
        self.register_buffer("causal", nn.Transformer.generate_square_subsequent_mask(12))

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, -1)
        return torch.softmax(q @ k.transpose(1, 2) + self.causal, -1) @ v


def test_a_float_model_with_a_causal_mask_compiles_and_matches_on_the_target(tmp_path):
    """The mask's -inf reaches the C library as a constant (no NaN: it is never alone in a
    row), and the target computes what ONNX's reference does."""
    from edgeprune.compile import compile_model
    from edgeprune.simulate import simulate

    torch.manual_seed(0)
    torch.onnx.export(CausalHead().eval(), (torch.zeros(SHAPE),), str(tmp_path / "m.onnx"),
                      dynamo=False)
    compile_model(tmp_path / "m.onnx", "cortex-m7", tmp_path / "b", log=lambda *a: None)
    assert "__builtin_inff()" in (tmp_path / "b" / "c_library" / "model.c").read_text()
    result, _ = simulate(tmp_path / "b", samples=2)
    assert result["outputs_match"], result


def test_data_driven_criteria_see_the_queries_and_keys():
    """No conv or Linear reads a head's queries and keys (q @ k^T alone does): the gates that
    Taylor's terms and the trial masks use sit where q and k make them, so their units score
    by what removing them costs, not all alike."""
    torch.manual_seed(0)
    model = Block(2).eval()
    x, y = torch.randn(32, *SHAPE[1:]), torch.randint(0, 4, (32,))
    from edgeprune.prune import prune
    for criterion in ("taylor", "mfp"):
        _, record = prune(model, torch.randn(SHAPE), criterion=criterion, ratios=0.5,
                          data=[(x, y)], meta_batch=(x, y))
        scores = record["layers"]["q"]["scores"]
        assert len(set(scores)) > 2, (criterion, scores)


class GlobalContext(nn.Module):
    """GCNet's global context block: the maps' positions weighed by a softmax over them,
    (N, C, HW) @ (N, HW, 1), transformed and added back; then positions mixed by a constant
    matrix, (N, C, HW) @ (HW, HW')."""

    def __init__(self):
        super().__init__()
        self.c1, self.mask = nn.Conv2d(1, 16, 3, 2, 1), nn.Conv2d(16, 1, 1)
        self.t1, self.t2 = nn.Conv2d(16, 4, 1), nn.Conv2d(4, 16, 1)
        self.mix = nn.Parameter(torch.randn(36, 9) * 0.3)
        self.c2, self.fc = nn.Conv2d(16, 12, 3, 1, 1), nn.Linear(12, 5)

    def forward(self, x):
        x = torch.relu(self.c1(x))
        n, c, h, w = x.shape
        m = torch.softmax(self.mask(x).view(n, 1, h * w), dim=2)
        ctx = torch.matmul(x.view(n, c, h * w), m.transpose(1, 2)).view(n, c, 1, 1)
        x = x + self.t2(torch.relu(self.t1(ctx)))
        x = (x.flatten(2) @ self.mix).view(n, c, 3, 3)
        return self.fc(torch.relu(self.c2(x)).mean((2, 3)))


@pytest.mark.parametrize("from_onnx", [False, True])
def test_maps_with_their_positions_weighed_prune_and_run_bit_exact(from_onnx, tmp_path):
    """The channels of (N, C, L) maps pass through a product that weighs their positions, so
    the maps' producer prunes (it kept all 16 channels before); what weighs them is kept."""
    torch.manual_seed(0)
    model, shape, x = GlobalContext().eval(), (1, 1, 12, 12), torch.randn(4, 1, 12, 12)
    model = read_back(model, shape, x, tmp_path, exporters=(False,)) if from_onnx else \
        saved_and_loaded(model, shape, x, tmp_path)[0]     # the constant matrix: a Linear
    pruned, _ = pruned_equivalently(model, shape, x, ratios=0.5)
    widths = [m.out_channels for m in pruned.modules() if isinstance(m, nn.Conv2d)]
    assert widths == [8, 1, 2, 8, 6], widths
    qm = ptq.quantize_ptq(pruned, shape, torch.randn(64, *shape[1:]).numpy())
    bit_exact(qm, x.numpy(), "cortex-m4", tmp_path / "q", like=pruned, tol=0.1)
