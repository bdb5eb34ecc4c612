"""Recurrent layers (nn.GRU, nn.LSTM, nn.RNN; batch_first) are unrolled over the model's static
sequence length into their Linears, tables, products and sums (edgeprune.layers.
lower_recurrent): the same outputs, pruned around, and bit-exact in int8 on the host and on a
target, with each weight matrix stored once."""

import json
import re

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from checks import bit_exact, conv_widths, pruned_equivalently, saved_and_loaded
from edgeprune.errors import EdgepruneError
from edgeprune.layers import lower_recurrent
from edgeprune.load import load_torch
from edgeprune.quantize import ptq, reference, to_relax

torch.set_num_threads(1)
SHAPE = (1, 1, 10, 12)     # a spectrogram: 10 bands, 12 frames


class CRNN(nn.Module):
    """Convs over a spectrogram, its frames through a recurrent layer, a head on the last."""
    def __init__(self, rnn: nn.Module, head_from_state: bool = False):
        super().__init__()
        self.c1 = nn.Conv2d(1, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, stride=(2, 1), padding=1)
        self.rnn, self.head_from_state = rnn, head_from_state
        width = rnn.hidden_size * (2 if rnn.bidirectional else 1)
        self.fc = nn.Linear(rnn.hidden_size if head_from_state else width, 5)

    def forward(self, x):
        y = F.relu(self.c2(F.relu(self.c1(x))))           # (N, 8, 5, T)
        out, state = self.rnn(y.permute(0, 3, 1, 2).flatten(2))      # frames: (N, T, 40)
        if self.head_from_state:
            h = state[0] if isinstance(state, tuple) else state       # an LSTM's (h_n, c_n)
            return self.fc(h[-1])
        return self.fc(out[:, -1])


RNNS = {"gru": lambda: nn.GRU(40, 16, batch_first=True),
        "lstm-2-layers": lambda: nn.LSTM(40, 16, num_layers=2, batch_first=True),
        "rnn-bidirectional": lambda: nn.RNN(40, 16, batch_first=True, bidirectional=True),
        "gru-2-bidirectional": lambda: nn.GRU(40, 16, 2, batch_first=True,
                                              bidirectional=True)}


@pytest.mark.parametrize("kind", list(RNNS))
@pytest.mark.parametrize("head_from_state", [False, True])
def test_unrolled_recurrent_layers_compute_what_torch_does(kind, head_from_state):
    torch.manual_seed(0)
    model = CRNN(RNNS[kind](), head_from_state).eval()
    x = torch.randn(4, *SHAPE[1:])
    with torch.no_grad():
        want = model(x)
        torch.testing.assert_close(lower_recurrent(model, SHAPE)(x), want)


@pytest.mark.parametrize("kind", list(RNNS)[:3])
def test_recurrent_models_prune_and_quantize_bit_exact(kind):
    torch.manual_seed(0)
    model = lower_recurrent(CRNN(RNNS[kind]()).eval(), SHAPE)
    x = torch.randn(8, *SHAPE[1:])
    pruned, _ = pruned_equivalently(model, SHAPE, x, ratios=0.5)
    # c2's channels reach the recurrent layer as frames of its bands (permute + flatten):
    # each channel prunes with its 5 columns of the input weights
    assert conv_widths(pruned) == [4, 4]
    inputs = {(m.out_features, m.in_features) for n, m in pruned.named_modules()
              if isinstance(m, nn.Linear) and ".ih." in n}
    assert max(i for _, i in inputs) == 20       # the first layer's: 40 -> 20
    # the recurrent state prunes: every gate's rows and the state's columns, at every step
    hidden = {n: (m.out_features, m.in_features) for n, m in pruned.named_modules()
              if isinstance(m, nn.Linear) and ".hh." in n}
    assert hidden and set(hidden.values()) == {(8, 8)}
    qm = ptq.quantize_ptq(pruned, SHAPE, x.numpy())
    xq = reference.quantize_input(qm, x[:2].numpy())
    assert np.array_equal(to_relax.build_host(to_relax.to_relax(qm, batch=2))(xq),
                          reference.run(qm, xq))


def test_a_crnn_that_reshapes_its_maps_to_frames_with_sizes_read_from_them_prunes_its_conv():
    class Reshaped(CRNN):
        def forward(self, x):
            y = F.relu(self.c2(F.relu(self.c1(x))))
            b, c, f, t = y.shape
            out, _ = self.rnn(y.permute(0, 3, 1, 2).reshape(b, t, c * f))
            return self.fc(out[:, -1])

    torch.manual_seed(0)
    model = lower_recurrent(Reshaped(RNNS["gru"]()).eval(), SHAPE)
    pruned, _ = pruned_equivalently(model, SHAPE, torch.randn(8, *SHAPE[1:]), ratios=0.5)
    assert conv_widths(pruned) == [4, 4]
    assert {m.in_features for n, m in pruned.named_modules()
            if isinstance(m, nn.Linear) and ".ih." in n} == {20}


def test_a_gru_model_runs_bit_exact_on_a_target_with_its_weights_once(tmp_path):
    torch.manual_seed(0)
    model = lower_recurrent(CRNN(RNNS["gru"](), head_from_state=True).eval(), SHAPE)
    x = torch.randn(8, *SHAPE[1:])
    qm = ptq.quantize_ptq(model, SHAPE, x.numpy())
    bit_exact(qm, x[:3].numpy(), "cortex-m7", tmp_path, like=model, tol=0.1)
    # every step's dense ops hold the same int8 matrices; the C library stores one of each
    weights = [qm.params[f"{o.name}.weight"] for o in qm.ops if o.kind == "dense"]
    once = {(w.shape, w.tobytes()) for w in weights}
    assert len(weights) == 12 * 3 + 11 * 3 + 1 and len(once) == 6 + 1   # no h at step 0
    stored = json.loads((tmp_path / "b" / "build.json").read_text())["weights_bytes"]
    assert stored < sum(w.nbytes for w in weights)
    # and one range per role at every step (the hidden state's too): the steps' ops have the
    # same integer constants, so the C library runs a few kernels many times
    model_c = (tmp_path / "b" / "c_library" / "model.c").read_text()
    calls = re.findall(r"\{__tvm_ffi_model_(\w+), ", model_c)
    dense = {c for c in calls if "dense" in c}
    assert len(set(calls)) < len(calls) / 8 and len(dense) <= 6 + 1     # 16 of 165, 3
    # each step's frame is a view of the sequence, not a kernel that copies it out
    assert not [c for c in set(calls) if "strided_slice" in c], calls
    # calls of a later step that find their tensors where an earlier step's were share that
    # step's argument list (and DLTensors) in flash
    lists = re.findall(r"static const TVMFFIAny model_args\d+\[", model_c)
    assert len(lists) < len(calls) / 2, (len(lists), len(calls))     # 73 of 165
    every = {qm.params[f"{o.name}.weight"].tobytes() for o in qm.weight_ops()}
    assert qm.total_weight_bytes() == sum(len(w) for w in every)      # what reports count

    # QAT trains one matrix per Linear too (the steps share its parameter)
    from edgeprune.data import Dataset
    from edgeprune.quantize.qat import quantize_qat
    y = torch.randint(0, 5, (8,)).numpy()
    qm = quantize_qat(model, SHAPE, Dataset("random", x.numpy(), y, x.numpy(), y), x.numpy(),
                      epochs=1.0, lr=0.05)
    weights = [qm.params[f"{o.name}.weight"] for o in qm.ops if o.kind == "dense"]
    assert len({(w.shape, w.tobytes()) for w in weights}) == 6 + 1


def test_recurrent_forms_that_cannot_run_are_named():
    with pytest.raises(EdgepruneError, match="layer 'rnn'.*batch_first=True"):
        lower_recurrent(CRNN(nn.GRU(40, 16)).eval(), SHAPE)

    class WithState(CRNN):
        def forward(self, x):
            y = F.relu(self.c2(F.relu(self.c1(x)))).permute(0, 3, 1, 2).flatten(2)
            return self.fc(self.rnn(y, torch.zeros(1, len(x), 16))[0][:, -1])
    with pytest.raises(EdgepruneError, match="layer 'rnn'.*initial hidden state"):
        lower_recurrent(WithState(nn.GRU(40, 16, batch_first=True)).eval(), SHAPE)(
            torch.zeros(SHAPE))


class ZeroState(CRNN):
    """The recurrent layer given its initial state: zeros, as without one."""
    def forward(self, x):
        y = F.relu(self.c2(F.relu(self.c1(x)))).permute(0, 3, 1, 2).flatten(2)
        h0 = torch.zeros(self.rnn.num_layers, x.shape[0], 16)
        state = (h0, torch.zeros_like(h0)) if isinstance(self.rnn, nn.LSTM) else h0
        return self.fc(self.rnn(y, state)[0][:, -1])


class ZeroBuffer(CRNN):
    """... zeros kept as a buffer and expanded over the batch."""
    def __init__(self, rnn):
        super().__init__(rnn)
        self.register_buffer("h0", torch.zeros(rnn.num_layers, 1, 16))

    def forward(self, x):
        y = F.relu(self.c2(F.relu(self.c1(x)))).permute(0, 3, 1, 2).flatten(2)
        h0 = self.h0.expand(-1, x.shape[0], -1).contiguous()
        state = (h0, h0.clone()) if isinstance(self.rnn, nn.LSTM) else h0
        return self.fc(self.rnn(y, state)[0][:, -1])


@pytest.mark.parametrize("kind", ["gru", "lstm-2-layers"])
@pytest.mark.parametrize("form", [ZeroState, ZeroBuffer])
def test_an_initial_state_of_zeros_loads_as_the_default_one(form, kind, tmp_path):
    torch.manual_seed(0)
    model, x = form(RNNS[kind]()).eval(), torch.randn(4, *SHAPE[1:])
    lowered, shape = saved_and_loaded(model, SHAPE, x, tmp_path)
    pruned, _ = pruned_equivalently(lowered, shape, x, ratios=0.5)
    assert conv_widths(pruned) == [4, 4]


def test_an_initial_state_of_other_values_is_refused_by_name(tmp_path):
    model = ZeroBuffer(nn.GRU(40, 16, batch_first=True)).eval()
    model.h0.fill_(0.5)
    torch.save(model, tmp_path / "m.pt")
    with pytest.raises(EdgepruneError, match="layer 'rnn'.*initial hidden state"):
        load_torch(str(tmp_path / "m.pt"), SHAPE)[0](torch.zeros(SHAPE))


class Projected(nn.Module):
    """Two LSTM layers with proj_size: each step's state a Linear of o * tanh(c)."""
    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(10, 16, num_layers=2, batch_first=True, proj_size=8)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(self.lstm(x)[0][:, -1])


def test_an_lstm_with_a_projection_unrolls_prunes_and_quantizes():
    torch.manual_seed(0)
    model, shape = Projected().eval(), (1, 6, 10)
    x = torch.randn(8, *shape[1:])
    with torch.no_grad():
        want = model(x)
        lowered = lower_recurrent(model, shape)
        torch.testing.assert_close(lowered(x), want)
    pruned, _ = pruned_equivalently(lowered, shape, x, ratios=0.5)
    widths = {(m.out_features, m.in_features) for n, m in pruned.named_modules()
              if isinstance(m, nn.Linear) and ".proj." in n}
    assert widths == {(4, 8)}        # the cells 16 -> 8, the projected states 8 -> 4
    qm = ptq.quantize_ptq(pruned, shape, x.numpy())
    xq = reference.quantize_input(qm, x[:2].numpy())
    assert np.array_equal(to_relax.build_host(to_relax.to_relax(qm, batch=2))(xq),
                          reference.run(qm, xq))


class Signal(nn.Module):
    """Conv1d over a signal, then its frames (x.transpose(1, 2)) through a recurrent layer."""
    def __init__(self, rnn: nn.Module, head_from_state: bool):
        super().__init__()
        self.c0, self.c = nn.Conv1d(2, 8, 3, padding=1), nn.Conv1d(8, 8, 5, stride=2)
        self.rnn, self.head_from_state = rnn, head_from_state
        self.fc = nn.Linear(12, 3)

    def forward(self, x):
        out, state = self.rnn(F.relu(self.c(F.relu(self.c0(x)))).transpose(1, 2))
        if self.head_from_state:
            return self.fc((state[0] if isinstance(state, tuple) else state)[-1])
        return self.fc(out[:, -1])


@pytest.mark.parametrize("rnn,head_from_state", [(nn.GRU, True), (nn.LSTM, False)])
def test_a_1d_model_with_a_recurrent_layer_loads_prunes_and_quantizes(rnn, head_from_state,
                                                                       tmp_path):
    from edgeprune.load import load_torch
    torch.manual_seed(0)
    model = Signal(rnn(8, 12, batch_first=True), head_from_state).eval()
    torch.save(model, tmp_path / "m.pt")
    lifted, shape = load_torch(str(tmp_path / "m.pt"), (1, 2, 30))
    assert shape == (1, 2, 1, 30)
    x = torch.randn(8, 2, 30)
    with torch.no_grad():
        torch.testing.assert_close(lifted(x.view(8, 2, 1, 30)), model(x))
    pruned, _ = pruned_equivalently(lifted, shape, x.view(8, *shape[1:]), ratios=0.5)
    assert conv_widths(pruned) == [4, 4]      # the frames' channels prune with the layer's
    qm = ptq.quantize_ptq(pruned, shape, x.view(8, *shape[1:]).numpy())
    xq = reference.quantize_input(qm, x[:2].view(2, *shape[1:]).numpy())
    assert np.array_equal(to_relax.build_host(to_relax.to_relax(qm, batch=2))(xq),
                          reference.run(qm, xq))


class Exported(nn.Module):
    def __init__(self, rnn: nn.Module, head_from_state: bool):
        super().__init__()
        self.c, self.rnn, self.head_from_state = nn.Conv1d(4, 8, 3, padding=1), rnn, \
            head_from_state
        self.fc = nn.Linear(12 if head_from_state is True else 12 * (1 + rnn.bidirectional), 3)

    def forward(self, x):
        if self.head_from_state == "time":   # a layer without batch_first: (T, N, F)
            out, _ = self.rnn(torch.relu(self.c(x)).permute(2, 0, 1))
            return self.fc(out[-1])
        out, h = self.rnn(torch.relu(self.c(x)).transpose(1, 2))
        if self.head_from_state == "pool":   # the maximum over time of (N, F, T)
            return self.fc(out.transpose(1, 2).amax(-1))
        if self.head_from_state:
            return self.fc((h[0] if isinstance(h, tuple) else h)[-1])
        return self.fc(out[:, -1])


@pytest.mark.parametrize("rnn,head_from_state,dynamo", [
    (lambda: nn.GRU(8, 12, batch_first=True), True, False),
    (lambda: nn.GRU(8, 12, batch_first=True, bidirectional=True), False, True),
    (lambda: nn.LSTM(8, 12, batch_first=True), False, False),
    (lambda: nn.LSTM(8, 12, batch_first=True, bidirectional=True), True, True),
    (lambda: nn.RNN(8, 12, batch_first=True, nonlinearity="relu"), False, False),
    (lambda: nn.GRU(8, 12, batch_first=True), "pool", False),
    (lambda: nn.LSTM(8, 12, batch_first=True, bidirectional=True), "pool", True),
    (lambda: nn.LSTM(8, 12), "time", False), (lambda: nn.GRU(8, 12), "time", True)])
def test_recurrent_layers_read_back_from_onnx(rnn, head_from_state, dynamo, tmp_path):
    """torch exports a batch_first layer as Transpose -> GRU/LSTM/RNN -> Squeeze or
    Transpose/Reshape (Y) and Gather or Squeeze (Y_h), time first: read back batch first; a
    Transpose of the time-first output to (N, F, T) too, and the last step y[-1] of a layer
    without batch_first (a Gather along time)."""
    from edgeprune.load import load_torch
    torch.manual_seed(0)
    model = Exported(rnn(), head_from_state).eval()
    torch.onnx.export(model, (torch.zeros(1, 4, 10),), str(tmp_path / "m.onnx"), dynamo=dynamo)
    lifted, shape = load_torch(str(tmp_path / "m.onnx"))
    x = torch.randn(6, 4, 10)
    with torch.no_grad():
        torch.testing.assert_close(lifted(x.view(6, *shape[1:])), model(x))
    qm = ptq.quantize_ptq(lifted, shape, x.view(6, *shape[1:]).numpy())
    xq = reference.quantize_input(qm, x[:2].view(2, *shape[1:]).numpy())
    assert np.array_equal(to_relax.build_host(to_relax.to_relax(qm, batch=2))(xq),
                          reference.run(qm, xq))


CELL_LOOP = '''
import torch
import torch.nn as nn


class CellLoop(nn.Module):
    """A GRUCell stepped over time in Python: torch.fx cannot trace the loop."""
    def __init__(self):
        super().__init__()
        self.cell, self.fc = nn.GRUCell(10, 16), nn.Linear(16, 4)

    def forward(self, x):
        h = torch.zeros(x.shape[0], 16)
        for t in range(x.shape[1]):
            h = self.cell(x[:, t], h)
        return self.fc(h)
'''


def test_a_cell_stepped_in_python_deploys_pruned_and_bit_exact(tmp_path, monkeypatch):
    """A model torch.fx cannot trace (a loop over the input's time steps) is read back from
    torch's ONNX export, unrolled at its static shape. Its gate biases are per-channel
    constants that prune with the recurrent state: every step's gate Linear loses the same
    rows (16 -> 12 a gate), and deploy quantizes, compiles and runs it bit-exact."""
    from test_deploy import deploy_user_model
    (tmp_path / "cells.py").write_text(CELL_LOOP)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    from cells import CellLoop
    torch.manual_seed(0)
    torch.save(CellLoop().eval(), tmp_path / "m.pt")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, 6, 10)).astype(np.float32)
    y = (x[:, -1, :4].argmax(1)).astype(np.int64)
    np.savez(tmp_path / "seq.npz", x_train=x[:200], y_train=y[:200], x_test=x[200:],
             y_test=y[200:])
    report = deploy_user_model(tmp_path / "m.pt", tmp_path / "seq.npz", tmp_path, "0", 3)
    assert report["input_shape"] == [1, 6, 10]
    assert report["check"]["outputs_match"] and report["check"]["mismatches"] == 0
    cuts = {(c["channels_before"], c["channels_after"]) for c in report["pruning"]["per_layer"]}
    assert len(report["pruning"]["per_layer"]) == 6 + 5 + 1 and cuts == {(48, 36), (4, 4)}
