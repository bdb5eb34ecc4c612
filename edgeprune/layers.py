"""Layers edgeprune rewrites into the forms every stage already knows.

A transposed convolution (nn.ConvTranspose2d, ONNX ConvTranspose: the upsampling layer of conv
autoencoders and decoders) is the convolution it equals: zeros inserted between the input's
pixels (its stride), padded by k - 1 - p on each side (plus output_padding at the end), then a
stride-1 Conv2d with the kernel flipped and its in/out axes swapped per group (the same groups
and dilation; the padding is that of the dilated kernel). After the rewrite the
pruner cuts a real Conv2d, fine-tuning trains it, and the int8 stages run it in their conv
kernels; only the zero insertion is new (the int8 `dilate` op, which inserts the zero point).

torch's transformer layers (nn.TransformerEncoder, nn.TransformerEncoderLayer,
nn.MultiheadAttention) are whole modules to torch.fx; written as their Linears, matrix
products, softmax and LayerNorms, every stage sees inside them.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.passes.shape_prop import TensorMetadata

from .errors import EdgepruneError
from .slicing import ShapeAndSizeProp


def zero_insert(x: torch.Tensor, sh: int, sw: int) -> torch.Tensor:
    """(N, C, H, W) -> (N, C, (H - 1) * sh + 1, (W - 1) * sw + 1): sh - 1 rows and sw - 1
    columns of zeros between neighbouring pixels. Written as the transposed convolution it
    is (1x1 kernels of ones, one per channel), so that it exports to one ONNX node that
    edgeprune reads back as this function."""
    c = int(x.shape[1])   # static: the ONNX exporter needs the kernel's shape
    return F.conv_transpose2d(x, torch.ones(c, 1, 1, 1, dtype=x.dtype), stride=(sh, sw),
                              groups=c)


fx.wrap("zero_insert")   # one node in traced graphs (the pruner and quantizer know it)


class ConvTransposeAsConv(nn.Module):
    """A 2-D transposed convolution as zero insertion, padding and a stride-1 Conv2d (`conv`,
    with the same groups and dilation) with the same function."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, stride, pads,
                 output_padding=(0, 0), groups: int = 1, dilation=(1, 1)):
        """weight: the transposed convolution's (in, out / groups, kh, kw); pads: its (top,
        left, bottom, right) input padding, each at most the dilated kernel's size - 1."""
        super().__init__()
        c_in, c_out_g, kh, kw = weight.shape
        dh, dw = (int(d) for d in dilation)
        eh, ew = dh * (kh - 1) + 1, dw * (kw - 1) + 1   # the dilated kernel's extent
        t, l, b, r = (int(p) for p in pads)
        oph, opw = (int(p) for p in output_padding)
        if max(t, b) > eh - 1 or max(l, r) > ew - 1:
            raise EdgepruneError(f"a transposed convolution with padding {[t, l, b, r]} larger "
                                 f"than its dilated kernel {[eh, ew]} - 1 is not supported")
        self.stride = (int(stride[0]), int(stride[1]))
        self.pads = (ew - 1 - l, ew - 1 - r + opw, eh - 1 - t, eh - 1 - b + oph)
        self.output_padding = (oph, opw)
        self.conv = nn.Conv2d(c_in, c_out_g * groups, (kh, kw), dilation=(dh, dw),
                              groups=groups, bias=bias is not None)
        # per group, (in_g, out_g) -> (out_g, in_g), kernels flipped
        w = weight.reshape(groups, c_in // groups, c_out_g, kh, kw).transpose(1, 2)
        with torch.no_grad():
            self.conv.weight.copy_(w.reshape(c_out_g * groups, c_in // groups, kh, kw)
                                   .flip(2, 3))
            if bias is not None:
                self.conv.bias.copy_(bias)

    @classmethod
    def from_module(cls, m: nn.ConvTranspose2d | nn.ConvTranspose1d, where: str
                    ) -> ConvTransposeAsConv:
        """The module's equal; a 1-D one's works on (N, C, 1, L) maps (edgeprune.lift1d)."""
        if m.padding_mode != "zeros":
            raise EdgepruneError(f"{where}: {type(m).__name__} with padding mode "
                                 f"'{m.padding_mode}' is not supported (zero padding)")
        w = m.weight.detach()
        if isinstance(m, nn.ConvTranspose1d):   # along W of a one-row map
            p = m.padding[0]
            w, stride, pads = w.unsqueeze(2), (1, m.stride[0]), (0, p, 0, p)
            out_pad, dilation = (0, m.output_padding[0]), (1, m.dilation[0])
        else:
            (ph, pw), stride, out_pad, dilation = m.padding, m.stride, m.output_padding, m.dilation
            pads = (ph, pw, ph, pw)
        try:
            return cls(w, None if m.bias is None else m.bias.detach(), stride, pads, out_pad,
                       m.groups, dilation)
        except EdgepruneError as e:
            raise EdgepruneError(f"{where}: {e}") from None

    def forward(self, x, output_size=None):
        pads = self.pads
        if output_size is not None:    # (..., H, W) asked for: output padding to reach it
            (sh, sw), (oph, opw) = self.stride, self.output_padding
            kh, kw = ((k - 1) * d + 1 for k, d in zip(self.conv.kernel_size, self.conv.dilation))
            l, r, t, b = pads[0], pads[1] - opw, pads[2], pads[3] - oph
            h = (x.shape[-2] - 1) * sh + 1 + t + b - kh + 1      # without output padding
            w = (x.shape[-1] - 1) * sw + 1 + l + r - kw + 1
            pads = (l, r + output_size[-1] - w, t, b + output_size[-2] - h)
        if self.stride != (1, 1):
            x = zero_insert(x, *self.stride)
        return self.conv(F.pad(x, pads))


def lower_transposed_convs(model: nn.Module) -> nn.Module:
    """`model` with every nn.ConvTranspose2d replaced (in place) by its ConvTransposeAsConv
    (a 1-D one is replaced when edgeprune.lift1d lifts the model to 2-D)."""
    for name, m in list(model.named_modules()):
        if isinstance(m, nn.ConvTranspose2d):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child,
                    ConvTransposeAsConv.from_module(m, f"layer '{name}'"))
    return model


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    lin.weight.data.copy_(weight.detach())
    if bias is not None:
        lin.bias.data.copy_(bias.detach())
    return lin


def attention_bias(attn_mask, key_padding_mask, heads: int) -> torch.Tensor:
    """What torch's attention adds to its (N, H, T, S) scores for these masks, as one tensor
    that broadcasts to them: -inf where a boolean mask is True, a float mask as it is;
    attn_mask (T, S) or (N * H, T, S), key_padding_mask (N, S). One node in traced graphs,
    so that a constant mask folds into a constant (layers.fold_constants) that the
    quantizer reads as the keys its softmax skips."""
    bias = torch.zeros(())
    for m, padding in ((attn_mask, False), (key_padding_mask, True)):
        if m is None:
            continue
        b = torch.zeros(m.shape).masked_fill(m, float("-inf")) if m.dtype == torch.bool \
            else m.float()
        if padding:
            b = b[:, None, None, :]
        elif b.dim() == 3:
            b = b.reshape(-1, heads, *b.shape[1:])
        bias = bias + b
    return bias


fx.wrap("attention_bias")


def local_response_norm(x: torch.Tensor, size: int, alpha: float, beta: float, k: float,
                        before: int) -> torch.Tensor:
    """Local response normalization (AlexNet's LRN): x / (k + alpha / size * S)^beta, S the
    sum of x^2 over the `size` channels from c - before (zeros past the ends). torch's window
    has before = size // 2, ONNX's (size - 1) // 2. One node in traced graphs, written out as
    its ops by `lower_composites`."""
    return _local_response_norm_ops(x, x.dim(), int(x.shape[1]), size, alpha, beta, k, before)


fx.wrap("local_response_norm")


def _local_response_norm_ops(x, rank: int, channels: int, size: int, alpha: float,
                             beta: float, k: float, before: int):
    """The LRN of `x` (a tensor, or an fx Proxy: then its ops go into the graph) as a square,
    channel slices shifted by zero padding and added, and x times a power of their sum: one
    table and one product of activations for the int8 stages."""
    def pad(front: int, back: int):   # F.pad's pairs run from the last axis to the channels
        return (0, 0) * (rank - 2) + (front, back)
    square = x * x
    total = None
    for d in range(max(-before, 1 - channels), min(size - before, channels)):
        if d < 0:      # channel c reads c + d: the first -d channels read zeros
            term = F.pad(square[:, :d], pad(-d, 0))
        elif d > 0:
            term = F.pad(square[:, d:], pad(0, d))
        else:
            term = square
        total = term if total is None else total + term
    return x * (k + alpha / size * total) ** -beta


class AttentionAsOps(nn.Module):
    """nn.MultiheadAttention (batch_first) as the Linears, matrix products and softmax it
    computes, so that every stage sees them (torch.fx keeps torch.nn modules whole)."""

    def __init__(self, mha: nn.MultiheadAttention, where: str):
        super().__init__()
        if not mha.batch_first:
            raise EdgepruneError(f"{where}: MultiheadAttention with batch_first=False takes "
                                 "(T, N, E); edgeprune's batch axis is the first: use "
                                 "batch_first=True")
        if not mha._qkv_same_embed_dim or mha.bias_k is not None or mha.add_zero_attn:
            raise EdgepruneError(f"{where}: MultiheadAttention with separate key/value sizes, "
                                 "bias_k/bias_v or add_zero_attn is not supported")
        e = mha.embed_dim
        self.heads = mha.num_heads
        w, b = mha.in_proj_weight, mha.in_proj_bias
        self.q, self.k, self.v = (_linear(w[i * e:(i + 1) * e], None if b is None else
                                          b[i * e:(i + 1) * e]) for i in range(3))
        self.out = _linear(mha.out_proj.weight, mha.out_proj.bias)
        self.scale = (e // self.heads) ** -0.5   # torch's: pruning a head's width keeps it
        self.where = where

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True,
                attn_mask=None, average_attn_weights=True, is_causal=False):
        if is_causal and attn_mask is None:    # as torch: the flag is a hint about the mask
            raise EdgepruneError(f"{self.where}: is_causal without the causal mask itself "
                                 "(pass attn_mask, e.g. nn.Transformer."
                                 "generate_square_subsequent_mask)")
        n, t = query.shape[:2]
        s, h = key.shape[1], self.heads
        q, k, v = self.q(query), self.k(key), self.v(value)
        # head widths from the projections, not the embedding: pruning may cut either
        d, dv = q.shape[-1] // h, v.shape[-1] // h
        q = q.reshape(n, t, h, d).transpose(1, 2)
        k = k.reshape(n, s, h, d).transpose(1, 2)
        v = v.reshape(n, s, h, dv).transpose(1, 2)
        scores = q @ k.transpose(-2, -1) * self.scale
        if attn_mask is not None or key_padding_mask is not None:
            scores = scores + attention_bias(attn_mask, key_padding_mask, h)
        a = torch.softmax(scores, -1)
        return self.out((a @ v).transpose(1, 2).reshape(n, t, h * dv)), None


class EncoderLayerAsOps(nn.Module):
    """nn.TransformerEncoderLayer (batch_first, ReLU or GELU, either norm order) as its ops."""

    def __init__(self, layer: nn.TransformerEncoderLayer, where: str):
        super().__init__()
        self.attn = AttentionAsOps(layer.self_attn, f"{where}.self_attn")
        self.linear1, self.linear2 = layer.linear1, layer.linear2
        self.norm1, self.norm2 = layer.norm1, layer.norm2
        act = layer.activation
        self.activation = {F.relu: nn.ReLU(), F.gelu: nn.GELU()}.get(act, act)
        if not isinstance(self.activation, nn.Module):
            raise EdgepruneError(f"{where}: activation {act} is not supported (ReLU, GELU)")
        self.norm_first, self.where = layer.norm_first, where

    def _block(self, x, mask):
        attn_mask, key_padding_mask, is_causal = mask
        return self.attn(x, x, x, key_padding_mask, attn_mask=attn_mask,
                         is_causal=is_causal)[0]

    def _ff(self, x):
        return self.linear2(self.activation(self.linear1(x)))

    def forward(self, src, src_mask=None, src_key_padding_mask=None, is_causal=False):
        mask = (src_mask, src_key_padding_mask, is_causal)
        x = src
        if self.norm_first:
            x = x + self._block(self.norm1(x), mask)
            return x + self._ff(self.norm2(x))
        x = self.norm1(x + self._block(x, mask))
        return self.norm2(x + self._ff(x))


class EncoderAsOps(nn.Module):
    """nn.TransformerEncoder: its layers in turn, then its norm."""

    def __init__(self, encoder: nn.TransformerEncoder, where: str):
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayerAsOps(m, f"{where}.layers.{i}")
                                    for i, m in enumerate(encoder.layers))
        self.norm = encoder.norm

    def forward(self, src, mask=None, src_key_padding_mask=None, is_causal=None):
        for layer in self.layers:
            src = layer(src, mask, src_key_padding_mask, bool(is_causal))
        return src if self.norm is None else self.norm(src)


class HiddenStates:
    """The final hidden states of a lowered recurrent layer, one (N, H) tensor per layer and
    direction: what h_n[-1], h_n[0] or h_n.squeeze(0) read (h_n itself is (L * D, N, H), its
    batch axis not the first, which no stage takes)."""

    def __init__(self, states: list, where: str):
        self.states, self.where = states, where

    def __getitem__(self, i):
        if not isinstance(i, int):
            raise EdgepruneError(f"{self.where}: its final hidden states are read by {i!r}; "
                                 "only h_n[k] (one layer and direction) is supported")
        return self.states[i]

    def __len__(self):
        return len(self.states)

    def squeeze(self, dim=None):
        if len(self.states) != 1 or dim not in (None, 0):
            raise EdgepruneError(f"{self.where}: h_n.squeeze({dim}) of {len(self.states)} "
                                 "states; read one as h_n[k]")
        return self.states[0]

    def __getattr__(self, name):
        raise EdgepruneError(f"{self.where}: its final hidden states are read by .{name}; only "
                             "h_n[k] or h_n.squeeze(0) is supported")


class RecurrentAsOps(nn.Module):
    """nn.GRU, nn.LSTM (with proj_size too) and nn.RNN (batch_first, any layers and
    directions, no initial state but zeros) unrolled over the static sequence length: at
    each step the gates are Linears of the frame and of the previous hidden state (the same
    modules at every step: one copy of the weights in flash), then sigmoid/tanh tables,
    products and sums. The first step starts from zeros, so its hidden-state terms are the
    biases alone."""

    def __init__(self, rnn: nn.RNNBase, where: str, steps: int):
        super().__init__()
        if not rnn.batch_first:
            raise EdgepruneError(f"{where}: {type(rnn).__name__} with batch_first=False takes "
                                 "(T, N, F); edgeprune's batch axis is the first: use "
                                 "batch_first=True")
        self.kind = {nn.GRU: "gru", nn.LSTM: "lstm"}.get(type(rnn), rnn.mode.lower())
        gates = {"gru": 3, "lstm": 4}.get(self.kind, 1)
        self.layers, self.directions = rnn.num_layers, 2 if rnn.bidirectional else 1
        self.steps, self.where = steps, where     # the sequence length the model runs at
        h = rnn.hidden_size
        self.ih, self.hh = nn.ModuleList(), nn.ModuleList()
        # an LSTM with proj_size: its hidden state is a Linear (no bias) of o * tanh(c)
        self.proj = nn.ModuleList() if getattr(rnn, "proj_size", 0) else None
        for layer in range(self.layers):
            for d in range(self.directions):
                sfx = f"_l{layer}" + ("_reverse" if d else "")
                w_ih, w_hh = getattr(rnn, "weight_ih" + sfx), getattr(rnn, "weight_hh" + sfx)
                b_ih = getattr(rnn, "bias_ih" + sfx, None)
                b_hh = getattr(rnn, "bias_hh" + sfx, None)
                self.ih.append(nn.ModuleList(
                    _linear(w_ih[g * h:(g + 1) * h], None if b_ih is None else
                            b_ih[g * h:(g + 1) * h]) for g in range(gates)))
                self.hh.append(nn.ModuleList(
                    _linear(w_hh[g * h:(g + 1) * h], None if b_hh is None else
                            b_hh[g * h:(g + 1) * h]) for g in range(gates)))
                if self.proj is not None:
                    self.proj.append(_linear(getattr(rnn, "weight_hr" + sfx), None))

    def _gates(self, k: int, x, h):
        """Per gate: (frame term, hidden term); at the first step (h None) the hidden term is
        the bias of the hidden Linear (a constant), or None."""
        out = []
        for ih, hh in zip(self.ih[k], self.hh[k]):
            hidden = hh(h) if h is not None else hh.bias
            out.append((ih(x), hidden))
        return out

    def _step(self, k: int, x, h, c):
        def total(pair):
            a, b = pair
            return a if b is None else a + b
        g = self._gates(k, x, h)
        if self.kind == "gru":
            r, z = torch.sigmoid(total(g[0])), torch.sigmoid(total(g[1]))
            frame, hidden = g[2]
            n = torch.tanh(frame if hidden is None else frame + r * hidden)
            return (1 - z) * n if h is None else (1 - z) * n + z * h, None
        if self.kind == "lstm":
            i, f = torch.sigmoid(total(g[0])), torch.sigmoid(total(g[1]))
            cell, o = torch.tanh(total(g[2])), torch.sigmoid(total(g[3]))
            c = i * cell if c is None else f * c + i * cell
            h = o * torch.tanh(c)
            return (h if self.proj is None else self.proj[k](h)), c
        pre = total(g[0])
        return (torch.tanh(pre) if self.kind == "rnn_tanh" else torch.relu(pre)), None

    def forward(self, x, hx=None):
        if hx is not None:
            raise EdgepruneError(f"{self.where}: an initial hidden state other than zeros "
                                 "is not supported")
        if isinstance(x, torch.Tensor) and x.shape[1] != self.steps:
            raise EdgepruneError(f"{self.where}: unrolled for {self.steps} steps, given "
                                 f"{x.shape[1]}")
        steps, finals_h, finals_c = self.steps, [], []
        for layer in range(self.layers):
            outs = []
            for d in range(self.directions):
                k = layer * self.directions + d
                h = c = None
                seq = [None] * steps
                for t in (range(steps - 1, -1, -1) if d else range(steps)):
                    h, c = self._step(k, x[:, t], h, c)
                    seq[t] = h.unsqueeze(1)
                outs.append(torch.cat(seq, 1))
                finals_h.append(h)
                finals_c.append(c)
            x = outs[0] if len(outs) == 1 else torch.cat(outs, 2)
        hn = HiddenStates(finals_h, self.where)
        return x, ((hn, HiddenStates(finals_c, self.where)) if self.kind == "lstm" else hn)


def lower_recurrent(model: nn.Module, input_shape: tuple[int, ...]) -> nn.Module:
    """`model` with nn.GRU, nn.LSTM and nn.RNN replaced (in place) by RecurrentAsOps,
    unrolled for the sequence length each sees at `input_shape`."""
    rnns = {name: m for name, m in model.named_modules() if isinstance(m, nn.RNNBase)}
    if not rnns:
        return model
    steps: dict[str, int] = {}

    def record(name):
        def hook(module, args):
            steps.setdefault(name, int(args[0].shape[1]))    # returns None: args unchanged
        return hook
    hooks = [m.register_forward_pre_hook(record(name)) for name, m in rnns.items()]
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(input_shape))
    finally:
        for h in hooks:
            h.remove()
    for name, m in rnns.items():
        if name not in steps:
            continue          # never called
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child,
                RecurrentAsOps(m, f"layer '{name}'", steps[name]))
    return model


def drop_zero_states(model: nn.Module, shape: tuple[int, ...]) -> nn.Module:
    """`model` with an initial state that is zeros whatever the input (`h0 = torch.zeros(...)`,
    a buffer of zeros expanded over the batch, an LSTM's (h0, c0)) no longer passed to its
    GRU, LSTM and RNN layers, which start from zeros without it. `model` itself if there is
    none. A state of other values is left for lower_recurrent to name."""
    gm = _traced(model, shape)
    if gm is None:
        return model
    modules = dict(gm.named_modules())
    given = [n for n in gm.graph.nodes if n.op == "call_module" and
             isinstance(modules.get(n.target), nn.RNNBase) and _state_arg(n) is not None]
    if not given:
        return model
    # Judged by value, on two different inputs: however the model wrote its zeros.
    zero = {n: True for n in given}
    for seed in (0, 1):
        x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            states = _StatesGiven(gm, given).states(x)
        for n, state in states.items():
            parts = state if isinstance(state, (tuple, list)) else (state,)
            zero[n] = zero[n] and all(isinstance(t, torch.Tensor) and not t.any() for t in parts)
    found = False
    for n in given:
        if zero[n]:
            n.args = n.args[:1]
            n.kwargs = {k: v for k, v in n.kwargs.items() if k != "hx"}
            found = True
    return _rewritten(gm, model) if found else model


def _state_arg(node: fx.Node):
    """The initial state a recurrent layer's call passes, or None."""
    return node.args[1] if len(node.args) > 1 else node.kwargs.get("hx")


class _StatesGiven(fx.Interpreter):
    """Runs a traced model, keeping the initial state each of `nodes` (recurrent layer
    calls) is given."""
    def __init__(self, gm: fx.GraphModule, nodes: list[fx.Node]):
        super().__init__(gm)
        self.nodes, self.seen = set(nodes), {}

    def states(self, x: torch.Tensor) -> dict:
        self.run(x)
        return self.seen

    def run_node(self, n: fx.Node):
        if n in self.nodes:
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            self.seen[n] = args[1] if len(args) > 1 else kwargs["hx"]
        return super().run_node(n)


def lower_attention(model: nn.Module) -> nn.Module:
    """`model` with nn.TransformerEncoder, nn.TransformerEncoderLayer and
    nn.MultiheadAttention replaced (in place) by the same computation in plain ops."""
    kinds = ((nn.TransformerEncoder, EncoderAsOps),
             (nn.TransformerEncoderLayer, EncoderLayerAsOps),
             (nn.MultiheadAttention, AttentionAsOps))
    lowered: list[str] = []    # a lowered module's torch.nn children are lowered inside it
    for name, m in list(model.named_modules()):
        if any(name.startswith(p + ".") for p in lowered):
            continue
        for kind, as_ops in kinds:
            if isinstance(m, kind):
                parent, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent) if parent else model, child,
                        as_ops(m, f"layer '{name}'"))
                lowered.append(name)
                break
    return model


def fold_constants(model: nn.Module) -> nn.Module:
    """`model` with every computation on weights alone (w[:, None, None], w.view(-1, 1, 1),
    log_scale.exp(), an nn.Embedding of constant indices) done once: a parameter of the
    result in its place, so the stages see a per-channel constant where the model wrote an
    expression. `model` itself if there is none (or fx cannot trace it)."""
    try:
        gm = fx.GraphModule(model, FrameLayersWhole().trace(model))
    except Exception:
        return model
    constant: dict[str, object] = {}    # node -> its value, for nodes the input never reaches
    learnt: set[str] = set()            # ... of those, the ones computed from a parameter
    for n in gm.graph.nodes:
        if n.op == "get_attr":
            constant[n.name] = operator.attrgetter(n.target)(gm)
            if isinstance(constant[n.name], nn.Parameter):
                learnt.add(n.name)
        elif n.op in ("call_function", "call_method", "call_module") and \
                all(a.name in constant for a in n.all_input_nodes) and \
                (n.all_input_nodes or n.op == "call_function"):
            # a module too: nn.Embedding of constant positions (learnt positional encodings)
            args, kwargs = fx.node.map_arg((n.args, n.kwargs), lambda a: constant[a.name])
            module = gm.get_submodule(n.target) if n.op == "call_module" else None
            with torch.no_grad():
                constant[n.name] = (n.target(*args, **kwargs) if n.op == "call_function"
                                    else module(*args, **kwargs) if module is not None
                                    else getattr(args[0], n.target)(*args[1:], **kwargs))
            if any(a.name in learnt for a in n.all_input_nodes) or (
                    module is not None and any(True for _ in module.parameters())):
                learnt.add(n.name)
    folds = [n for n in gm.graph.nodes if n.op != "get_attr" and n.name in constant
             and isinstance(constant[n.name], torch.Tensor)
             and any(u.name not in constant for u in n.users)]
    for n in folds:
        value = constant[n.name].detach().clone()
        name = f"folded_{n.name}"
        if n.name in learnt and value.is_floating_point():   # fine-tuning still trains it
            gm.register_parameter(name, nn.Parameter(value))
        else:
            gm.register_buffer(name, value)
        with gm.graph.inserting_before(n):
            n.replace_all_uses_with(gm.graph.get_attr(name))
    return _rewritten(gm, model) if folds else model


class FrameLayersWhole(fx.Tracer):
    """Keeps each lowered recurrent, attention or encoder layer one call: they run on frames
    (N, T, F), and a rewrite of the model around them (a 1-D model's lifting to 2-D) leaves
    their own ops as they are."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (RecurrentAsOps, AttentionAsOps, EncoderLayerAsOps,
                              EncoderAsOps)) or super().is_leaf_module(m, qualname)


def _traced(model: nn.Module, shape: tuple[int, ...]) -> fx.GraphModule | None:
    """`model` traced by torch.fx (lowered layers kept whole), each node's shape at input
    `shape` in its meta; None if it does not trace."""
    try:
        gm = fx.GraphModule(model, FrameLayersWhole().trace(model))
        with torch.no_grad():
            ShapeAndSizeProp(gm).propagate(torch.zeros(shape))
    except Exception:
        return None
    return gm


def _rewritten(gm: fx.GraphModule, model: nn.Module) -> fx.GraphModule:
    """`gm` after a rewrite of its graph: what nothing reads dropped, its code regenerated."""
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm.train(model.training)


def lower_handwritten_norms(model: nn.Module, shape: tuple[int, ...]) -> nn.Module:
    """`model` with every normalization written out by hand as what every stage knows:
    (x - mean) / sqrt(var + eps) over some axes (ConvNeXt's channels-first LayerNorm, older
    transformer code) as F.layer_norm, x * rsqrt(mean(x ** 2) + eps) as F.rms_norm (over
    those axes, moved last by a permute when they are not), and x / x.norm(dim=d,
    keepdim=True) (+ eps, .clamp(min=eps), or as a root of a sum of squares) as F.normalize.
    The affine after it stays as written. `model` itself if there is none."""
    gm = _traced(model, shape)
    if gm is None:
        return model
    found = False
    for node in list(gm.graph.nodes):
        match = _handwritten_norm(node) or _handwritten_scaling(node)
        if match is None:
            continue
        x, dims, eps, kind = match
        rank = len(x.meta["tensor_meta"].shape)
        dims = sorted(d % rank for d in dims)
        if 0 in dims or (kind == "l2" and len(dims) != 1):
            continue              # over the batch: not a layer's norm
        with gm.graph.inserting_before(node):
            if kind == "l2":
                y = gm.graph.call_function(F.normalize, (x,), {"p": 2.0, "dim": dims[0],
                                                              "eps": max(eps, 1e-12)})
            else:
                perm = [k for k in range(rank) if k not in dims] + dims
                sizes = tuple(int(x.meta["tensor_meta"].shape[k]) for k in dims)
                y = x if perm == list(range(rank)) else \
                    gm.graph.call_method("permute", (x, *perm))
                y = gm.graph.call_function(F.layer_norm if kind == "layer" else F.rms_norm,
                                           (y, sizes), {"eps": float(eps)})
                if perm != list(range(rank)):
                    y = gm.graph.call_method("permute",
                                             (y, *[perm.index(k) for k in range(rank)]))
        node.replace_all_uses_with(y)
        found = True
    return _rewritten(gm, model) if found else model


# modules that take (T, N, ...) unless batch_first: written batch first again by batch_first()
_SEQUENCE_FIRST = (nn.RNNBase, nn.MultiheadAttention, nn.TransformerEncoderLayer,
                   nn.TransformerEncoder)
_REDUCTIONS = {torch.mean, torch.sum, torch.amax, torch.amin, torch.softmax, F.softmax,
               torch.log_softmax, F.log_softmax, "mean", "sum", "amax", "amin", "softmax",
               "log_softmax"}
_LAST_AXIS_MODULES = (nn.Linear, nn.LayerNorm, nn.RMSNorm)


def _moved(nd: int, src: int, dst: int) -> list[int]:
    """The permutation that is movedim(t, src, dst) on a tensor of rank nd."""
    axes = [k for k in range(nd) if k != src]
    axes.insert(dst, src)
    return axes


def _sequence_first(mod: nn.Module) -> bool:
    if isinstance(mod, nn.TransformerEncoder):
        return not mod.layers[0].self_attn.batch_first
    if isinstance(mod, nn.TransformerEncoderLayer):
        return not mod.self_attn.batch_first
    return isinstance(mod, _SEQUENCE_FIRST) and not mod.batch_first


def _as_batch_first(mod: nn.Module) -> nn.Module:
    import copy
    mod = copy.deepcopy(mod)
    for m in mod.modules():
        if isinstance(m, (nn.RNNBase, nn.MultiheadAttention, nn.TransformerEncoderLayer)):
            m.batch_first = True
    return mod


def batch_first(model: nn.Module, shape: tuple[int, ...]) -> nn.Module:
    """`model` with the batch axis first in every tensor, where it moved it (a permute to
    (T, N, C) for a GRU, LSTM or transformer layer without batch_first): each such layer
    made batch_first and the ops around it written on batch-first tensors, the same values.
    `model` itself if the batch never moves, or if an op on a moved batch is one this does
    not know (the stage that meets it names it)."""
    gm = _traced(model, shape)
    if gm is None:
        return model
    modules = dict(gm.named_modules())
    where: dict[fx.Node, int] = {}      # where the batch axis is in the user's tensor
    moved = False

    def rank(n) -> int:
        meta = n.meta.get("tensor_meta") if isinstance(n, fx.Node) else None
        return len(meta.shape) if hasattr(meta, "shape") else -1

    def axis_of(n, d: int) -> int:      # axis d of the user's tensor n, in its batch-first form
        return _moved(rank(n), 0, where.get(n, 0))[d % rank(n)]

    for node in list(gm.graph.nodes):
        if node.op == "placeholder":
            where[node] = 0
            continue
        if node in where:             # a sequence-first layer's output, placed with it
            continue
        if node.op in ("get_attr", "output"):
            if node.op == "output" and any(where.get(a, 0) for a in node.all_input_nodes):
                return model
            continue
        t = node.target
        mod = modules.get(t) if node.op == "call_module" else None
        tensors = [a for a in node.all_input_nodes if a in where]
        b = where.get(tensors[0], 0) if tensors else 0
        if node.op in ("call_method", "call_function") and node.args[0] in where and \
                (t in ("permute", "transpose") or t in (torch.permute, torch.transpose)):
            nd, x = rank(node), node.args[0]
            rest = list(node.args[1:]) or list(node.kwargs.values())
            if t in ("transpose", torch.transpose):
                i, j = rest[0] % nd, rest[1] % nd
                perm = list(range(nd))
                perm[i], perm[j] = j, i
            else:
                perm = [d % nd for d in (rest[0] if len(rest) == 1 else rest)]
            out = perm.index(b)
            inner = _moved(nd, 0, b)
            q = [inner[perm[j]] for j in _moved(nd, out, 0)]
            node.target, node.op = "permute", "call_method"
            node.args, node.kwargs = (x, *q), {}
            where[node] = out
            moved = moved or out != 0
            continue
        if not any(where.get(a, 0) for a in tensors):   # the batch first all along
            if tensors and rank(node) >= 1 and not (mod is not None and _sequence_first(mod)):
                where[node] = 0       # (what only constants make stays a constant)
            continue
        if mod is not None and _sequence_first(mod):     # its (T, N, ...) inputs: batch first
            if any(where.get(a, 0) != 1 for a in tensors):
                return model
            parent, _, child = t.rpartition(".")
            setattr(gm.get_submodule(parent) if parent else gm, child, _as_batch_first(mod))
            if isinstance(mod, nn.RNNBase) or isinstance(mod, nn.MultiheadAttention):
                for user in node.users:     # (output, h_n or weights): h_n stays as it is
                    if user.target is operator.getitem and user.args[1] == 0:
                        where[user] = 1
            else:
                where[node] = 1
            continue
        if node.target is operator.getitem and node.args[0] in where and \
                isinstance(node.args[1], (int, slice, tuple)):
            x, index = node.args
            index = index if isinstance(index, tuple) else (index,)
            nd = rank(x)
            if any(i is None or i is Ellipsis for i in index):
                return model
            index = list(index) + [slice(None)] * (nd - len(index))
            if index[b] != slice(None):
                return model
            order = _moved(nd, 0, b)
            node.args = (x, tuple(index[k] for k in order))
            where[node] = b - sum(isinstance(i, int) for i in index[:b])
            continue
        if node.op in ("call_method", "call_function") and t in _REDUCTIONS:
            x = node.args[0]
            dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
            if dims is None:
                return model
            one = isinstance(dims, int)
            dims = [d % rank(x) for d in ([dims] if one else dims)]
            if b in dims:
                return model
            new = [axis_of(x, d) for d in dims]
            node.args = (x, new[0] if one else tuple(new), *node.args[2:])
            node.kwargs = {k: v for k, v in node.kwargs.items() if k != "dim"}
            keep = node.kwargs.get("keepdim", node.args[2] if len(node.args) > 2 else False)
            kept = keep or "softmax" in getattr(t, "__name__", str(t))
            where[node] = b if kept else b - sum(d < b for d in dims)
            continue
        if mod is not None and isinstance(mod, _LAST_AXIS_MODULES) or t in (F.linear,
                                                                             F.layer_norm):
            if b >= rank(node) - (len(mod.normalized_shape) if isinstance(
                    mod, (nn.LayerNorm, nn.RMSNorm)) else 1):
                return model
            where[node] = b
            continue
        if _elementwise(node, mod):
            nd = rank(node)
            if any(where.get(a, 0) != b for a in tensors if rank(a) == nd):
                return model
            for a in node.all_input_nodes:    # constants and lower-rank operands: moved too
                if a in where and rank(a) == nd:
                    continue
                if rank(a) > 0:
                    with gm.graph.inserting_before(node):
                        full = a if rank(a) == nd else gm.graph.call_method(
                            "reshape", (a, *[1] * (nd - rank(a)), *a.meta["tensor_meta"].shape))
                        node.replace_input_with(a, gm.graph.call_method(
                            "permute", (full, *_moved(nd, b, 0))))
            where[node] = b
            continue
        return model                  # an op on a moved batch this does not know
    return _rewritten(gm, model) if moved else model


def _elementwise(node: fx.Node, mod: nn.Module | None) -> bool:
    from .prune.graph import (BINARY_FUNCTIONS, BINARY_METHODS, PASSTHROUGH_FUNCTIONS,
                              PASSTHROUGH_METHODS, PASSTHROUGH_MODULES, SPATIAL_FUNCTIONS,
                              SPATIAL_MODULES)
    if mod is not None:
        return isinstance(mod, PASSTHROUGH_MODULES) and not isinstance(mod, SPATIAL_MODULES)
    if node.op == "call_method":
        return node.target in PASSTHROUGH_METHODS | BINARY_METHODS
    return node.target in (PASSTHROUGH_FUNCTIONS - SPATIAL_FUNCTIONS) | BINARY_FUNCTIONS


def functional_inplace(model: nn.Module, shape: tuple[int, ...]) -> nn.Module:
    """`model` with each in-place method (`y.relu_()`, `y.mul_(2)`) written as its
    functional form, which its own result and every later read of `y` take: the traced
    graph reads `y` as it was, and a rewrite that drops dead code drops an unused one."""
    gm = _traced(model, shape)
    if gm is None:
        return model
    found = False
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    for node in list(gm.graph.nodes):
        t = node.target
        if node.op != "call_method" or not t.endswith("_") or t.endswith("__") \
                or not hasattr(torch.Tensor, t[:-1]) or not isinstance(node.args[0], fx.Node):
            continue
        x = node.args[0]
        with gm.graph.inserting_after(node):
            y = gm.graph.call_method(t[:-1], node.args, node.kwargs)
        node.replace_all_uses_with(y)
        for user in list(x.users):
            if user is not node and user is not y and order.get(user, len(order)) > order[node]:
                user.replace_input_with(x, y)
        gm.graph.erase_node(node)
        found = True
    return _rewritten(gm, model) if found else model


# Methods that return their input's values (`.to` and `.type` only when the dtype stays).
_VALUE_COPIES = {"contiguous", "clone", "detach", "cpu", "float", "to", "type", "type_as"}


def drop_value_copies(model: nn.Module, shape: tuple[int, ...]) -> nn.Module:
    """`model` without the methods that hand on their input's values (`x.float()` of a float
    input, `x.contiguous()`, `x.to(device)`, `x.detach()`): later ops read the input itself,
    and no stage has to know them. `model` itself if there is none. Without `.contiguous()`
    a `.view` may meet a transposed layout (ShuffleNet's channel shuffle), so every `.view`
    then becomes `.reshape`: the same values, copied where the layout needs it."""
    gm = _traced(model, shape)
    if gm is None:
        return model
    found = False
    for node in list(gm.graph.nodes):
        x = node.args[0] if node.args else None
        if node.op != "call_method" or node.target not in _VALUE_COPIES \
                or not isinstance(x, fx.Node):
            continue
        have, get = x.meta.get("tensor_meta"), node.meta.get("tensor_meta")
        if not isinstance(have, TensorMetadata) or not isinstance(get, TensorMetadata) \
                or (have.dtype, have.shape) != (get.dtype, get.shape):
            continue
        node.replace_all_uses_with(x)
        gm.graph.erase_node(node)
        found = True
        if node.target == "contiguous":
            for view in gm.graph.nodes:
                if view.op == "call_method" and view.target == "view" and not any(
                        isinstance(a, torch.dtype) for a in view.args[1:]):
                    view.target = "reshape"
    return _rewritten(gm, model) if found else model


def adaptive_pools_as_windows(model: nn.Module, shape: tuple[int, ...]) -> nn.Module:
    """`model` with each 2-D adaptive pool whose output size does not divide its input's
    written as the mean (max) of each window, row by row then column by column, joined by
    concatenation: the same values, in ops ONNX has (torch's exporters refuse such a pool or
    write it as gathers). `model` itself if there is none."""
    gm = _traced(model, shape)
    if gm is None:
        return model
    found = False
    modules = dict(gm.named_modules())
    kinds = {nn.AdaptiveAvgPool2d: "mean", F.adaptive_avg_pool2d: "mean",
             nn.AdaptiveMaxPool2d: "amax", F.adaptive_max_pool2d: "amax",
             # an exported program's module (.pt2) calls the ATen op
             torch.ops.aten.adaptive_avg_pool2d.default: "mean",
             torch.ops.aten._adaptive_avg_pool2d.default: "mean"}
    for node in list(gm.graph.nodes):
        mod = modules.get(node.target) if node.op == "call_module" else None
        reduce = kinds.get(type(mod)) if mod is not None else \
            kinds.get(node.target) if node.op == "call_function" else None
        if reduce is None or (mod is not None and getattr(mod, "return_indices", False)):
            continue
        x = node.args[0]
        size = mod.output_size if mod is not None else \
            (node.args[1] if len(node.args) > 1 else node.kwargs["output_size"])
        size = (size, size) if isinstance(size, int) else tuple(size)
        in_hw = tuple(x.meta["tensor_meta"].shape[-2:])
        out_hw = tuple(i if o is None else o for i, o in zip(in_hw, size))
        if all(i % o == 0 for i, o in zip(in_hw, out_hw)):
            continue
        y = x
        with gm.graph.inserting_before(node):
            for axis, (i, o) in enumerate(zip(in_hw, out_hw)):
                if i % o == 0:
                    continue
                dim = axis - 2
                pieces = []
                for k in range(o):   # window k: [floor(k i / o), ceil((k + 1) i / o))
                    start, end = k * i // o, -(-(k + 1) * i // o)
                    part = gm.graph.call_method("narrow", (y, dim, start, end - start))
                    pieces.append(gm.graph.call_method(reduce, (part, dim), {"keepdim": True}))
                y = gm.graph.call_function(torch.cat, (pieces, dim))
            y = gm.graph.call_function(F.adaptive_avg_pool2d if reduce == "mean"
                                       else F.adaptive_max_pool2d, (y, out_hw))
        node.replace_all_uses_with(y)
        found = True
    return _rewritten(gm, model) if found else model


_FUNCTIONAL_LAYERS = {F.conv1d: nn.Conv1d, F.conv2d: nn.Conv2d, F.linear: nn.Linear}
_CONV_ARGS = ("stride", "padding", "dilation", "groups")


def lower_functional_layers(model: nn.Module, shape: tuple[int, ...]) -> nn.Module:
    """`model` with each F.conv1d, F.conv2d, F.linear and x @ W of a constant weight (a
    parameter, or one computed from parameters alone, as weight standardization does, once
    fold_constants has run) as the module it equals, which every stage knows. The module's
    weight is the value; a fixed (buffer) weight stays untrained. `model` itself if there is
    none."""
    gm = _traced(model, shape)
    if gm is None:
        return model
    found = False
    for node in list(gm.graph.nodes):
        kind = _FUNCTIONAL_LAYERS.get(node.target) if node.op == "call_function" else None
        product = kind is None and _product_with_matrix(gm, node)   # x @ W: weight W^T
        if kind is None and not product:
            continue
        kind = nn.Linear if product else kind
        args = dict(zip(("input", "weight", "bias", *_CONV_ARGS), node.args)) | node.kwargs
        w, b = args.get("weight"), args.get("bias")
        if not (isinstance(w, fx.Node) and w.op == "get_attr") or not (
                b is None or isinstance(b, fx.Node) and b.op == "get_attr"):
            continue
        weight = operator.attrgetter(w.target)(gm).detach()
        if product:
            weight = weight.t()
        bias = None if b is None else operator.attrgetter(b.target)(gm).detach()
        if kind is nn.Linear:
            mod = nn.Linear(weight.shape[1], weight.shape[0], bias is not None)
        else:
            conv = {k: args[k] for k in _CONV_ARGS if k in args}
            groups = conv.get("groups", 1)
            mod = kind(weight.shape[1] * groups, weight.shape[0], tuple(weight.shape[2:]),
                       bias=bias is not None, **conv)
        mod.weight.data.copy_(weight)
        mod.weight.requires_grad_(isinstance(operator.attrgetter(w.target)(gm), nn.Parameter))
        if bias is not None:
            mod.bias.data.copy_(bias)
        _called_as(gm, node, mod, args["input"])
        found = True
    return _rewritten(gm, model) if found else model


def lower_functional_norms(model: nn.Module, shape: tuple[int, ...]) -> nn.Module:
    """`model` with each F.layer_norm and F.rms_norm whose weights are constants or None
    (ConvNeXt's own LayerNorm class, a hand-written norm once lower_handwritten_norms has run)
    as the module it equals, whose channels prune with their weights. `model` itself if there
    is none."""
    gm = _traced(model, shape)
    if gm is None:
        return model
    found = False
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in (F.layer_norm, F.rms_norm):
            continue
        layer_norm = node.target is F.layer_norm
        names = ("input", "normalized_shape", "weight", *(("bias",) if layer_norm else ()), "eps")
        args = dict(zip(names, node.args)) | node.kwargs
        w, b = args.get("weight"), args.get("bias")
        if any(t is not None and not (isinstance(t, fx.Node) and t.op == "get_attr")
               for t in (w, b)) or (w is None and b is not None):
            continue
        dims = tuple(args["normalized_shape"])
        if layer_norm:
            mod = nn.LayerNorm(dims, args.get("eps", 1e-5), w is not None, bias=b is not None)
        else:
            mod = nn.RMSNorm(dims, args.get("eps"), w is not None)
        for attr, t in (("weight", w), ("bias", b)):
            if t is not None:
                value = operator.attrgetter(t.target)(gm)
                getattr(mod, attr).data.copy_(value.detach())
                getattr(mod, attr).requires_grad_(isinstance(value, nn.Parameter))
        _called_as(gm, node, mod, args["input"])
        found = True
    return _rewritten(gm, model) if found else model


def _called_as(gm: fx.GraphModule, node: fx.Node, mod: nn.Module, x: fx.Node) -> None:
    """`node`'s readers read `mod` called on `x` instead (the function call becomes a layer)."""
    name = f"{node.name}_layer"
    gm.add_submodule(name, mod)
    with gm.graph.inserting_before(node):
        layer = gm.graph.call_module(name, (x,))
    node.replace_all_uses_with(layer)


def _product_with_matrix(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether `node` is x @ W for a constant 2-D W (a cosine classifier's prototypes)."""
    if not (_called(node, (operator.matmul, torch.matmul, torch.mm), "matmul") or
            _called(node, (), "mm")) or len(node.args) != 2 or node.kwargs:
        return False
    x, w = node.args
    return isinstance(x, fx.Node) and isinstance(w, fx.Node) and w.op == "get_attr" and \
        operator.attrgetter(w.target)(gm).dim() == 2


def lower_composites(model: nn.Module, shape: tuple[int, ...]) -> nn.Module:
    """`model` with each op that is a short composition of ops every stage knows written as
    that composition: a GLU as its halves' gate, Softmax2d as a softmax over the channels,
    F.scaled_dot_product_attention as its products and softmax, a stack reduced over its new
    axis as the sum (mean, maximum, minimum) of its pieces, `torch.add(a, b, alpha=k)` as
    a + k * b, `x.clamp_min(a)` as `torch.clamp(x, min=a)`, `x[:, [0, 3, 4]]` as its runs'
    slices concatenated, `x[:, None]` as an unsqueeze; and `x.squeeze()` as a squeeze of
    its unit axes after the batch (at the static batch of 1 it would drop the batch axis too).
    `model` itself if there is none."""
    gm = _traced(model, shape)
    if gm is None:
        return model
    found = False
    modules = dict(gm.named_modules())
    for node in list(gm.graph.nodes):
        if ((node.op == "call_method" and node.target == "squeeze") or (
                node.op == "call_function" and node.target is torch.squeeze)) and \
                len(node.args) == 1 and not node.kwargs:
            in_shape = node.args[0].meta["tensor_meta"].shape
            units = tuple(i for i in range(1, len(in_shape)) if in_shape[i] == 1)
            node.target, node.op = torch.squeeze, "call_function"
            node.args = (node.args[0], units)
            found = True
            continue
        if node.op == "call_function" and node.target is F.scaled_dot_product_attention:
            found = _attention_as_ops(gm, node) or found
            continue
        if "alpha" in node.kwargs and ((node.op == "call_method" and node.target in (
                "add", "sub")) or (node.op == "call_function" and node.target in (
                torch.add, torch.sub))) and len(node.args) == 2:   # a + alpha * b
            name = node.target if isinstance(node.target, str) else node.target.__name__
            with gm.graph.inserting_before(node):
                scaled = gm.graph.call_function(operator.mul,
                                                (node.args[1], node.kwargs["alpha"]))
                y = gm.graph.call_function(getattr(operator, name), (node.args[0], scaled))
            node.replace_all_uses_with(y)
            found = True
            continue
        if len(node.args) == 2 and not node.kwargs and (
                (node.op == "call_method" and node.target in ("clamp_min", "clamp_max")) or
                (node.op == "call_function" and node.target in (torch.clamp_min,
                                                                 torch.clamp_max))):
            bound = "min" if "min" in getattr(node.target, "__name__", node.target) else "max"
            node.op, node.target = "call_function", torch.clamp
            node.args, node.kwargs = (node.args[0],), {bound: node.args[1]}
            found = True
            continue
        if node.op == "call_function" and node.target is torch.stack:
            found = _stack_reduced_as_ops(gm, node) or found
            continue
        if (node.op == "call_function" and node.target in (operator.getitem,
                                                           torch.index_select)) or (
                node.op == "call_method" and node.target == "index_select"):
            found = _new_axes_as_unsqueezes(gm, node) or _picks_as_slices(gm, node) or found
            continue
        if node.op == "call_function" and node.target is torch.einsum:
            found = _einsum_as_ops(gm, node) or found
            continue
        if (node.op == "call_method" and node.target == "repeat") or (
                node.op == "call_function" and node.target is torch.tile):
            found = _repeat_as_concat(gm, node) or found
            continue
        mod = modules.get(node.target) if node.op == "call_module" else None
        if isinstance(mod, nn.LocalResponseNorm) or (
                node.op == "call_function" and node.target is local_response_norm):
            found = _local_response_norm_as_ops(gm, node, mod) or found
            continue
        is_glu = isinstance(mod, nn.GLU) or (node.op == "call_function" and node.target is F.glu)
        if not (is_glu or isinstance(mod, nn.Softmax2d)):
            continue
        x = node.args[0]
        with gm.graph.inserting_before(node):
            if isinstance(mod, nn.Softmax2d):
                y = gm.graph.call_function(F.softmax, (x,), {"dim": -3})
            else:      # the first half gated by the sigmoid of the second
                dim = mod.dim if mod is not None else \
                    (node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", -1))
                halves = gm.graph.call_function(torch.chunk, (x, 2, dim))
                a = gm.graph.call_function(operator.getitem, (halves, 0))
                b = gm.graph.call_function(operator.getitem, (halves, 1))
                y = gm.graph.call_function(operator.mul, (a, gm.graph.call_function(
                    torch.sigmoid, (b,))))
        node.replace_all_uses_with(y)
        found = True
    return _rewritten(gm, model) if found else model


def _has_shape(x) -> bool:
    """An fx node whose shape the trace recorded (not one an earlier rewrite added)."""
    return isinstance(x, fx.Node) and "tensor_meta" in x.meta


def _new_axes_as_unsqueezes(gm: fx.GraphModule, node: fx.Node) -> bool:
    """x[:, None] (x[..., None, :], any index of whole axes and Nones) as the unsqueezes it
    is. False for any other index, or one that adds an axis before the batch."""
    if node.target is not operator.getitem:
        return False
    x, key = node.args
    key = key if isinstance(key, tuple) else (key,)
    if not _has_shape(x) or None not in key or key.count(Ellipsis) > 1 or not all(
            k is None or k is Ellipsis or k == slice(None) for k in key):
        return False
    rank = len(x.meta["tensor_meta"].shape) + key.count(None)
    cut = key.index(Ellipsis) if Ellipsis in key else len(key)
    axes = [i for i, k in enumerate(key[:cut]) if k is None]
    axes += [rank - len(key) + i for i in range(cut + 1, len(key)) if key[i] is None]
    if 0 in axes:
        return False
    with gm.graph.inserting_before(node):
        y = x
        for axis in sorted(axes):     # the output's axes, lowest first
            y = gm.graph.call_function(torch.unsqueeze, (y, axis))
    node.replace_all_uses_with(y)
    return True


def _picks_as_slices(gm: fx.GraphModule, node: fx.Node) -> bool:
    """x[:, idx] or x.index_select(axis, idx) with constant indices (a list, or a tensor of
    integers) along one axis after the batch, as the concatenation of its runs of consecutive
    indices, each a slice (what every stage knows). False for any other indexing."""
    from .onnx_to_torch import runs

    if node.target is operator.getitem:
        x, key = node.args
        picked = [i for i, k in enumerate(key) if k != slice(None)] \
            if isinstance(key, tuple) and Ellipsis not in key else []
        if len(picked) != 1:
            return False
        axis, idx = picked[0], key[picked[0]]
    else:
        x, axis, idx = (list(node.args) + [node.kwargs.get("dim"), node.kwargs.get("index")])[:3]
    if isinstance(idx, fx.Node) and idx.op == "get_attr":
        idx = operator.attrgetter(idx.target)(gm)
    if isinstance(idx, torch.Tensor):
        if idx.dim() != 1 or idx.dtype not in (torch.int64, torch.int32):
            return False
        idx = idx.tolist()
    if not (_has_shape(x) and isinstance(axis, int) and isinstance(idx, (list, tuple)) and idx
            and all(isinstance(i, int) and not isinstance(i, bool) for i in idx)):
        return False
    shape = x.meta["tensor_meta"].shape
    axis %= len(shape)
    if axis == 0:
        return False
    with gm.graph.inserting_before(node):
        pieces = [gm.graph.call_function(torch.narrow, (x, axis, a, b - a))
                  for a, b in runs([i % shape[axis] for i in idx])]
        y = pieces[0] if len(pieces) == 1 else gm.graph.call_function(torch.cat, (pieces, axis))
    node.replace_all_uses_with(y)
    return True


def _repeat_as_concat(gm: fx.GraphModule, node: fx.Node) -> bool:
    """x.repeat(r0, r1, ...) or torch.tile(x, dims) as the concatenation of r copies along
    each axis repeated (a concatenation every stage knows); False for a repeat that adds axes."""
    x, *reps = node.args
    reps = list(reps[0]) if len(reps) == 1 and isinstance(reps[0], (list, tuple)) else reps
    if not _has_shape(x):
        return False
    rank = len(x.meta["tensor_meta"].shape)
    if not all(isinstance(r, int) for r in reps) or len(reps) > rank:
        return False
    reps = [1] * (rank - len(reps)) + reps   # torch.tile pads its dims with leading ones
    y = x
    with gm.graph.inserting_before(node):
        for axis, r in enumerate(reps):
            if r > 1:
                y = gm.graph.call_function(torch.cat, ([y] * r, axis))
    y.meta = dict(node.meta)   # its shape, for rewrites after this one
    node.replace_all_uses_with(y)
    return True


def _einsum_as_ops(gm: fx.GraphModule, node: fx.Node) -> bool:
    """torch.einsum of two operands as permutes, reshapes and one product: with a constant
    operand (a weight) an nn.Conv2d/Conv1d of 1x1 kernels when it maps the channels of an NCHW
    or NCL tensor, else an nn.Linear over the contracted axes moved last; of two activations a
    torch.matmul. False (left for the stage that meets it to name) for other forms (ellipsis,
    one operand, an index repeated or summed within one operand, a weight with batch axes)."""
    equation, *ops = node.args
    ops = list(ops[0]) if len(ops) == 1 and isinstance(ops[0], (list, tuple)) else ops
    equation = equation.replace(" ", "") if isinstance(equation, str) else ""
    if len(ops) != 2 or "->" not in equation or "." in equation:
        return False
    ins, out = equation.split("->")
    a, b = ins.split(",")
    if any(len(set(t)) != len(t) for t in (a, b, out)) or not set(out) <= set(a + b):
        return False
    if any(i not in out and i not in (b if t is a else a) for t in (a, b) for i in t):
        return False   # an index summed within one operand
    if not all(_has_shape(o) for o in ops):
        return False
    const = [o.op == "get_attr" for o in ops]
    if const[0]:
        (a, b), ops, const = (b, a), ops[::-1], const[::-1]
    if const[0]:
        return False
    batch = [i for i in out if i in a and i in b]
    contract = [i for i in a if i in b and i not in out]
    a_only, b_only = [i for i in a if i not in b], [i for i in b if i not in a]
    first = (a_only if const[1] else batch)[:1]
    if not (contract and a_only and b_only) or first != [a[0]] or out[0] != a[0] or \
            (not const[1] and b[0] != a[0]):
        return False      # the batch axis first in the activations and the output
    shape = dict(zip(a, ops[0].meta["tensor_meta"].shape))
    g = gm.graph

    def size(idx):
        return int(torch.tensor([shape[i] for i in idx]).prod())

    def free_batch(idx):     # a static shape but the batch axis (training runs others)
        return [-1] + [shape[i] for i in idx[1:]]

    with g.inserting_before(node):
        if const[1]:
            if batch:
                return False
            w = operator.attrgetter(ops[1].target)(gm)
            shape.update(zip(b, w.shape))
            w2 = w.detach().permute([b.index(i) for i in contract + b_only]).reshape(
                size(contract), -1).t().contiguous()           # (N, K)
            conv = len(a) in (3, 4) and contract == [a[1]] and len(b_only) == 1 and \
                out == a.replace(a[1], b_only[0])
            if conv:       # the channels of NCHW (NCL) mapped: 1x1 kernels
                mod = (nn.Conv2d if len(a) == 4 else nn.Conv1d)(w2.shape[1], w2.shape[0], 1,
                                                                 bias=False)
            else:
                mod = nn.Linear(w2.shape[1], w2.shape[0], bias=False)
            mod.weight.data.copy_(w2.reshape(mod.weight.shape))
            mod.weight.requires_grad_(isinstance(w, nn.Parameter))
            name = next(f"einsum{i}" for i in range(len(g.nodes) + 1)
                        if not hasattr(gm, f"einsum{i}"))
            gm.add_submodule(name, mod)
            if conv:
                y = g.call_module(name, (ops[0],))
                y.meta = dict(node.meta)
                node.replace_all_uses_with(y)
                return True
            x = g.call_method("permute", (ops[0], [a.index(i) for i in a_only + contract]))
            if len(contract) > 1:
                x = g.call_method("reshape", (x, free_batch(a_only) + [size(contract)]))
            y, order = g.call_module(name, (x,)), a_only + b_only
            flat = len(b_only) > 1
        else:
            shape.update(zip(b, ops[1].meta["tensor_meta"].shape))
            x = g.call_method("permute", (ops[0], [a.index(i) for i in batch + a_only + contract]))
            z = g.call_method("permute", (ops[1], [b.index(i) for i in batch + contract + b_only]))
            flat = max(len(a_only), len(b_only), len(contract)) > 1
            if flat:
                x = g.call_method("reshape", (x, free_batch(batch) + [size(a_only),
                                                                      size(contract)]))
                z = g.call_method("reshape", (z, free_batch(batch) + [size(contract),
                                                                      size(b_only)]))
            y, order = g.call_function(torch.matmul, (x, z)), batch + a_only + b_only
        if flat:
            y = g.call_method("reshape", (y, free_batch(order)))
        perm = [order.index(i) for i in out]
        if perm != sorted(perm):
            y = g.call_method("permute", (y, perm))
    y.meta = dict(node.meta)
    node.replace_all_uses_with(y)
    return True


def _local_response_norm_as_ops(gm: fx.GraphModule, node: fx.Node, mod) -> bool:
    x = node.args[0]
    if mod is not None:
        args = (mod.size, mod.alpha, mod.beta, mod.k, mod.size // 2)
    else:
        names = ("size", "alpha", "beta", "k", "before")
        given = dict(zip(names, node.args[1:])) | node.kwargs
        args = tuple(given[n] for n in names)
    if not _has_shape(x):
        return False
    shape = x.meta["tensor_meta"].shape
    with gm.graph.inserting_before(node):
        y = _local_response_norm_ops(fx.Proxy(x), len(shape), int(shape[1]), *args).node
    y.meta = dict(node.meta)
    node.replace_all_uses_with(y)
    return True


def _attention_as_ops(gm: fx.GraphModule, node: fx.Node) -> bool:
    """F.scaled_dot_product_attention without dropout as softmax(q k^T * scale + mask) v, the
    mask (a constant attn_mask, or is_causal) a constant of 0 and -inf; False (left as it is,
    for the stage that meets it to name) otherwise."""
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale")
    args = dict(zip(names, node.args)) | node.kwargs
    if args.get("dropout_p") or args.get("enable_gqa"):
        return False
    q, k, v = args["query"], args["key"], args["value"]
    scale = args.get("scale") or q.meta["tensor_meta"].shape[-1] ** -0.5
    mask = args.get("attn_mask")
    bias = None
    if args.get("is_causal"):   # query i sees keys 0 .. i
        rows, cols = q.meta["tensor_meta"].shape[-2], k.meta["tensor_meta"].shape[-2]
        bias = torch.zeros(rows, cols).masked_fill(
            ~torch.ones(rows, cols, dtype=torch.bool).tril(), float("-inf"))
    if mask is not None:
        if not isinstance(mask, fx.Node) or mask.op != "get_attr":
            return False        # a mask computed from the input
        m = operator.attrgetter(mask.target)(gm)     # as SDPA takes it: True takes part
        m = torch.zeros(m.shape).masked_fill(~m, float("-inf")) if m.dtype == torch.bool \
            else m.float()
        bias = m if bias is None else bias + m
    g = gm.graph
    with g.inserting_before(node):
        scores = g.call_function(operator.matmul, (q, g.call_method("transpose", (k, -2, -1))))
        scores = g.call_function(operator.mul, (scores, scale))
        if bias is not None:
            name = next(f"attention_mask{i}" for i in range(len(gm.graph.nodes) + 1)
                        if not hasattr(gm, f"attention_mask{i}"))
            gm.register_buffer(name, bias)
            scores = g.call_function(operator.add, (scores, g.get_attr(name)))
        weights = g.call_function(torch.softmax, (scores, -1))
        y = g.call_function(operator.matmul, (weights, v))
    node.replace_all_uses_with(y)
    return True


def _stack_reduced_as_ops(gm: fx.GraphModule, node: fx.Node) -> bool:
    """torch.stack(xs, d) that is only summed, averaged, maxed or minned over d: the sum
    (mean, maximum, minimum) of the xs, without the new axis no stage knows."""
    xs = node.args[0]
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    rank = len(node.meta["tensor_meta"].shape)
    folds = {"sum": operator.add, "mean": operator.add, "amax": torch.maximum,
             "amin": torch.minimum}

    def reduced(user):
        name = user.target if user.op == "call_method" else getattr(user.target, "__name__", "")
        d = user.args[1] if len(user.args) > 1 else user.kwargs.get("dim")
        d = d[0] if isinstance(d, (tuple, list)) and len(d) == 1 else d
        keep = user.args[2] if len(user.args) > 2 else user.kwargs.get("keepdim", False)
        ok = user.op in ("call_method", "call_function") and user.args[0] is node and \
            name in folds and isinstance(d, int) and d % rank == dim % rank and not keep
        return name if ok else None
    if not node.users or not all(reduced(u) for u in node.users):
        return False
    for user in list(node.users):
        kind = reduced(user)
        with gm.graph.inserting_before(user):
            y = xs[0]
            for x in xs[1:]:
                y = gm.graph.call_function(folds[kind], (y, x))
            if kind == "mean":
                y = gm.graph.call_function(operator.mul, (y, 1 / len(xs)))
        user.replace_all_uses_with(y)
    return True


def _called(n, functions: tuple, method: str) -> bool:
    return isinstance(n, fx.Node) and ((n.op == "call_function" and n.target in functions)
                                       or (n.op == "call_method" and n.target == method))


def _reduction(n, functions: tuple, method: str):
    """(x, dims, keepdim, node) of a reduction `n` (torch.mean(x, dims) / x.mean(dims))."""
    if not _called(n, functions, method) or not n.args:
        return None
    dims = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim")
    keep = n.args[2] if len(n.args) > 2 and isinstance(n.args[2], bool) else \
        n.kwargs.get("keepdim", False)
    if dims is None or not keep:
        return None
    return n.args[0], tuple([dims] if isinstance(dims, int) else dims), n


def _centred(n):
    """(x, dims) when `n` is x - x.mean(dims, keepdim=True)."""
    if not _called(n, (operator.sub, torch.sub), "sub") or len(n.args) != 2:
        return None
    mean = _reduction(n.args[1], (torch.mean,), "mean")
    if mean is None or mean[0] is not n.args[0]:
        return None
    return n.args[0], mean[1]


def _handwritten_norm(node):
    """(x, dims, eps, "layer") when `node` computes (x - mean) / sqrt(var + eps) over
    `dims`."""
    if not _called(node, (operator.truediv, torch.div), "div") or len(node.args) != 2:
        return None
    centred, root = node.args
    found = _centred(centred)
    if found is None or not _called(root, (torch.sqrt,), "sqrt"):
        return None
    x, dims = found
    total = root.args[0]
    if not _called(total, (operator.add, torch.add), "add") or len(total.args) != 2:
        return None
    var, eps = total.args if isinstance(total.args[1], (int, float)) else total.args[::-1]
    if not isinstance(eps, (int, float)) or isinstance(eps, bool):
        return None
    same = (lambda d: sorted(d) == sorted(dims))
    variance = _reduction(var, (torch.var,), "var")
    if variance is not None:     # the population variance only (LayerNorm's)
        biased = var.kwargs.get("unbiased", True) is False or var.kwargs.get("correction") == 0
        return (x, dims, eps, "layer") if variance[0] is x and same(variance[1]) and biased \
            else None
    mean = _reduction(var, (torch.mean,), "mean")
    if mean is None or not same(mean[1]):
        return None
    again = _centred(_squared(mean[0]))
    return (x, dims, eps, "layer") if again is not None and again[0] is x and \
        same(again[1]) else None


def _squared(n):
    """y when `n` is y ** 2, y * y or torch.square(y); else None."""
    if _called(n, (operator.pow, torch.pow), "pow") and n.args[1:] == (2,):
        return n.args[0]
    if _called(n, (operator.mul, torch.mul), "mul") and len(n.args) == 2 and \
            n.args[0] is n.args[1]:
        return n.args[0]
    return n.args[0] if _called(n, (torch.square,), "square") else None


def _handwritten_scaling(node):
    """(x, dims, eps, kind) when `node` divides x by its own 2-norm over `dims` (kind "l2",
    eps as F.normalize's: x / x.norm(dim=d, keepdim=True), + eps or .clamp(min=eps), or
    x * rsqrt(sum(x ** 2) + eps)) or by its root mean square (kind "rms", eps as
    F.rms_norm's: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))."""
    if _called(node, (operator.truediv, torch.div), "div") and len(node.args) == 2:
        x, by = node.args
        root = _rooted(by, False)
    elif _called(node, (operator.mul, torch.mul), "mul") and len(node.args) == 2:
        x, by = node.args
        root = _rooted(by, True)
        if root is None:
            by, x = node.args
            root = _rooted(by, True)
    else:
        return None
    if root is None or root[0] is not x:
        return None
    return root


def _rooted(n, inverse: bool):
    """(x, dims, eps, kind) when `n` is the norm of x `_handwritten_scaling` divides by
    (its reciprocal when `inverse`)."""
    if inverse and _called(n, (torch.reciprocal,), "reciprocal"):
        n, inverse = n.args[0], False
    elif inverse and _called(n, (operator.truediv, torch.div), "div") and \
            len(n.args) == 2 and n.args[0] == 1:        # 1 / root, as ONNX writes it
        n, inverse = n.args[1], False
    eps, stable = 0.0, n
    if not inverse:
        if _plus_constant(n) is not None:
            stable, eps = _plus_constant(n)
        elif (_called(n, (torch.clamp,), "clamp") or _called(n, (torch.clamp_min,), "clamp_min")):
            floor = n.args[1] if len(n.args) > 1 else n.kwargs.get("min")
            if isinstance(floor, (int, float)) and n.kwargs.get("max") is None and \
                    (len(n.args) < 3 or n.args[2] is None):
                stable, eps = n.args[0], floor
        norm = _two_norm(stable)
        if norm is not None:
            return (*norm, float(eps), "l2")
    if not _called(n, (torch.rsqrt,) if inverse else (torch.sqrt,),
                   "rsqrt" if inverse else "sqrt"):
        return None
    total = n.args[0]
    if _plus_constant(total) is not None:
        total, eps = _plus_constant(total)
    for kind, functions, method in (("l2", (torch.sum,), "sum"), ("rms", (torch.mean,), "mean")):
        reduced = _reduction(total, functions, method)
        if reduced is not None and _squared(reduced[0]) is not None:
            # F.normalize's eps bounds the norm (the root), F.rms_norm's the mean square
            return (_squared(reduced[0]), reduced[1],
                    float(eps) ** 0.5 if kind == "l2" else float(eps), kind)
    return None


def _plus_constant(n):
    """(y, c) when `n` is y + c (or c + y) for a number c."""
    if not _called(n, (operator.add, torch.add), "add") or len(n.args) != 2:
        return None
    y, c = n.args if isinstance(n.args[1], (int, float)) else n.args[::-1]
    ok = isinstance(c, (int, float)) and not isinstance(c, bool) and isinstance(y, fx.Node)
    return (y, c) if ok else None


def _two_norm(n):
    """(x, dims) when `n` is x's 2-norm over dims, kept: x.norm(dim=d, keepdim=True),
    torch.norm, torch.linalg.norm or torch.linalg.vector_norm."""
    if not _called(n, (torch.norm, torch.linalg.norm, torch.linalg.vector_norm), "norm"):
        return None
    names = ("ord", "dim", "keepdim") if n.target in (torch.linalg.norm,
                                                      torch.linalg.vector_norm) \
        else ("p", "dim", "keepdim")
    given = dict(zip(names, n.args[1:]), **n.kwargs)
    dims = given.get("dim")
    order = given.get(names[0], 2 if n.target is not torch.linalg.norm else None)
    if dims is None or not given.get("keepdim", False) or order not in (2, 2.0, None, "fro"):
        return None
    return n.args[0], tuple([dims] if isinstance(dims, int) else dims)


def lower_statistics(model: nn.Module, shape: tuple[int, ...]) -> nn.Module:
    """`model` with each variance or standard deviation over some axes (an x-vector's
    statistics pooling, x.std(-1)) written as the means, product and square root every stage
    knows. `model` itself if there is none."""
    gm = _traced(model, shape)
    if gm is None:
        return model
    found = False
    for node in list(gm.graph.nodes):
        kind = next((k for k, f in (("var", torch.var), ("std", torch.std))
                     if _called(node, (f,), k)), None)
        if kind is None:
            continue
        x = node.args[0]
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        given = node.args[2] if len(node.args) > 2 else None
        correction = int(given) if isinstance(given, bool) else \
            int(node.kwargs.get("unbiased", node.kwargs.get("correction", 1)))
        keep = node.args[3] if len(node.args) > 3 else node.kwargs.get("keepdim", False)
        if dims is None or not isinstance(x, fx.Node):
            continue
        dims = [dims] if isinstance(dims, int) else list(dims)
        in_shape = x.meta["tensor_meta"].shape
        count = int(torch.tensor([in_shape[d] for d in dims]).prod())
        with gm.graph.inserting_before(node):
            mean = gm.graph.call_method("mean", (x, dims), {"keepdim": True})
            deviation = gm.graph.call_function(operator.sub, (x, mean))
            square = gm.graph.call_function(operator.mul, (deviation, deviation))
            y = gm.graph.call_method("mean", (square, dims), {"keepdim": keep})
            if correction and count > correction:
                y = gm.graph.call_function(operator.mul, (y, count / (count - correction)))
            if kind == "std":
                y = gm.graph.call_function(torch.sqrt, (y,))
        node.replace_all_uses_with(y)
        found = True
    return _rewritten(gm, model) if found else model


def _reshape_of(node) -> fx.Node | None:
    """The input of a reshape/view node (torch.reshape, x.reshape, x.view), else None."""
    if _called(node, (torch.reshape,), "reshape") or _called(node, (), "view"):
        x = node.args[0]
        return x if isinstance(x, fx.Node) else None
    return None


def _channel_constant(gm: fx.GraphModule, node: fx.Node, kind: str, fns: tuple,
                      shape: tuple[int, ...]) -> torch.Tensor | None:
    """The constant (per channel of `shape`, or one number) that `node`'s only user multiplies
    or adds it by, as (C,) values; None if its user is anything else."""
    if len(node.users) != 1:
        return None
    user = next(iter(node.users))
    if not _called(user, fns, kind) or len(user.args) != 2 or user.kwargs:
        return None
    other = user.args[1] if user.args[0] is node else user.args[0]
    if not isinstance(other, fx.Node) or other.op != "get_attr":
        return None
    c = gm
    for part in str(other.target).split("."):
        c = getattr(c, part)
    c = torch.as_tensor(c).detach().float()
    per_channel = (1, shape[1]) + (1,) * (len(shape) - 2)
    if c.numel() == 1:
        return c.reshape(()).expand(shape[1]).clone()
    if c.dim() > len(shape) or (1,) * (len(shape) - c.dim()) + tuple(c.shape) != per_channel:
        return None
    return c.reshape(-1)


def lower_group_norms(model: nn.Module, shape: tuple[int, ...]) -> nn.Module:
    """`model` with each GroupNorm that an ONNX exporter wrote as a reshape of (N, C, ...) to
    (N, G, -1), an InstanceNormalization and a reshape back (what torch's exporters write below
    opset 18) as the nn.GroupNorm it is, its per-group affine repeated over each group's
    channels: the pruner prunes a GroupNorm by whole groups, where it must keep an
    InstanceNorm of reshaped maps whole (with residuals, often the whole model). The Mul and
    Add by constants per channel after it (its affine, as exported) join its weight and bias:
    the pruner keeps whole the channels a constant multiplies. `model` itself if there is
    none."""
    gm = _traced(model, shape)
    if gm is None:
        return model
    modules = dict(gm.named_modules())
    found = False
    for node in list(gm.graph.nodes):
        norm = modules.get(node.target) if node.op == "call_module" else None
        if not isinstance(norm, nn.InstanceNorm1d) or norm.track_running_stats \
                or len(node.args) != 1 or len(node.users) != 1:
            continue
        grouped, back = node.args[0], next(iter(node.users))
        x = _reshape_of(grouped)
        if x is None or _reshape_of(back) is not node or len(grouped.users) != 1 \
                or "tensor_meta" not in x.meta or "tensor_meta" not in back.meta:
            continue
        x_shape, g_shape = tuple(x.meta["tensor_meta"].shape), \
            tuple(grouped.meta["tensor_meta"].shape)
        if len(x_shape) < 3 or tuple(back.meta["tensor_meta"].shape) != x_shape \
                or len(g_shape) != 3 or g_shape[0] != x_shape[0]:
            continue
        channels, groups = int(x_shape[1]), int(g_shape[1])
        if groups != norm.num_features or channels % groups:
            continue
        gn = nn.GroupNorm(groups, channels, eps=norm.eps, affine=True)
        with torch.no_grad():
            per = channels // groups
            gn.weight.copy_(norm.weight.detach().repeat_interleave(per) if norm.affine
                            else torch.ones(channels))
            gn.bias.copy_(norm.bias.detach().repeat_interleave(per) if norm.affine
                          else torch.zeros(channels))
        last = back
        for kind, fns in (("mul", (operator.mul, torch.mul)), ("add", (operator.add, torch.add))):
            c = _channel_constant(gm, last, kind, fns, x_shape)
            if c is None:
                continue
            with torch.no_grad():
                if kind == "mul":
                    gn.weight.mul_(c)
                    gn.bias.mul_(c)
                else:
                    gn.bias.add_(c)
            last = next(iter(last.users))
        name = f"{str(node.target).replace('.', '_')}_group_norm"
        gm.add_submodule(name, gn)
        with gm.graph.inserting_before(back):
            y = gm.graph.call_module(name, (x,))
        last.replace_all_uses_with(y)
        found = True
    if not found:
        return model
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()   # the InstanceNorms, that nothing calls now
    return _rewritten(gm, model)
