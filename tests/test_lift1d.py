"""1-D models (Conv1d on (N, C, L) signals) run as the 2-D models they equal: (N, C, 1, L)."""

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from edgeprune.errors import EdgepruneError
from edgeprune.lift1d import lift_1d
from test_deploy import deploy_user_model


class Signal1d(nn.Module):
    """The 1-D ops a keyword-spotting or ECG model uses: a vector lifted to (N, 1, L), strided,
    grouped and padded convs, BN, a residual, both pools, F.pad, a mean over time, shape reads."""

    def __init__(self, classes=10):
        super().__init__()
        self.c1 = nn.Conv1d(1, 8, 9, stride=2, padding=4)
        self.b1 = nn.BatchNorm1d(8)
        self.dw = nn.Conv1d(8, 8, 3, padding=1, groups=8)
        self.pw = nn.Conv1d(8, 16, 1)
        self.c3 = nn.Conv1d(16, 16, 4)
        self.pool = nn.MaxPool1d(2)
        self.avg = nn.AvgPool1d(2)
        self.fc = nn.Linear(16, classes)

    def forward(self, x):
        x = x.view(x.size(0), 1, -1)
        x = F.relu(self.b1(self.c1(x)))
        x = self.pool(x + F.relu(self.dw(x)))
        x = F.relu(self.pw(x))
        x = self.avg(F.relu(self.c3(F.pad(x, (1, 2)))) + x)
        x = x.mean(-1)
        return self.fc(x.view(x.size(0), -1))


class Head1d(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv1d(2, 4, 3, padding=1)
        self.gap = nn.AdaptiveAvgPool1d(1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(torch.flatten(self.gap(torch.relu(self.c(x))), 1))


class FromVector(nn.Module):
    """An (N, L) input made a signal inside the model."""

    def __init__(self):
        super().__init__()
        self.c = nn.Conv1d(1, 4, 5, stride=2)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        h = torch.relu(self.c(x.unsqueeze(1)))
        return self.fc(h.amax(-1, keepdim=True).squeeze(-1))


class Cumulative(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv1d(2, 4, 3)

    def forward(self, x):
        return self.c(x).cumsum(2)


class Functional1d(nn.Module):
    """1-D pools written as functions, and nearest upsampling (module, function, by size)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv1d(2, 6, 5, padding=2), nn.Conv1d(6, 4, 3)
        self.up = nn.Upsample(scale_factor=2)

    def forward(self, x):
        h = F.max_pool1d(torch.relu(self.a(x)), 3, 2, 1, ceil_mode=True)
        h = F.avg_pool1d(self.up(h), kernel_size=2, count_include_pad=False)
        h = F.interpolate(self.b(h), scale_factor=2)
        h = F.interpolate(h, size=h.shape[-1] * 3)
        return torch.cat([F.adaptive_avg_pool1d(h, 1), F.adaptive_max_pool1d(h, 1)], 1).flatten(1)


class Linear1d(nn.Module):
    """Linear interpolation along L: a module by factor, a function to a size (align_corners)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv1d(2, 6, 5, 2, 2), nn.Conv1d(6, 3, 3, padding=1)
        self.up = nn.Upsample(scale_factor=2, mode="linear")

    def forward(self, x):
        h = self.up(torch.relu(self.a(x)))
        return self.b(F.interpolate(h, size=45, mode="linear", align_corners=True)).flatten(1)


@pytest.mark.parametrize("model, shape", [(Signal1d(), (2, 1, 160)), (Head1d(), (3, 2, 50)),
                                          (FromVector(), (2, 64)), (Functional1d(), (2, 2, 30)),
                                          (Linear1d(), (2, 2, 30))])
def test_a_1d_model_lifts_to_the_same_function(model, shape):
    torch.manual_seed(0)
    for m in model.modules():   # BN statistics that are not the identity
        if isinstance(m, nn.BatchNorm1d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    model.eval()
    lifted, shape2 = lift_1d(model, shape)
    assert shape2 == ((*shape[:2], 1, shape[2]) if len(shape) == 3 else shape)
    assert not any(isinstance(m, (nn.Conv1d, nn.BatchNorm1d, nn.MaxPool1d, nn.AvgPool1d,
                                  nn.AdaptiveAvgPool1d)) for m in lifted.modules())
    x = torch.randn(shape)
    with torch.no_grad():
        assert torch.allclose(lifted(x.view(shape2)), model(x), atol=1e-5)


def test_a_1d_op_without_a_2d_form_is_named():
    with pytest.raises(EdgepruneError, match=r"node 'cumsum' \(cumsum\)"):
        lift_1d(Cumulative().eval(), (1, 2, 20))


def test_data_that_does_not_fit_names_both_sample_shapes():
    from edgeprune.data import Dataset, fit_data
    d = Dataset("d", np.zeros((4, 1, 30), np.float32), np.zeros(4, np.int64),
                np.zeros((2, 1, 30), np.float32), np.zeros(2, np.int64))
    with pytest.raises(EdgepruneError, match=r"samples of shape \[1, 1, 40\].*are \[1, 30\]"):
        fit_data((1, 1, 1, 40), d, "m.onnx")
    assert fit_data((1, 1, 1, 30), d, "m.onnx").x_train.shape == (4, 1, 1, 30)


def _tones(n, length, seed):
    """10 classes of noisy tones of different pitch: (N, 1, L) signals."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 10, n)
    t = np.arange(length) / length
    x = np.sin(2 * np.pi * (4 + 3 * y[:, None]) * t + rng.uniform(0, 6, (n, 1)))
    x = x + 0.3 * rng.standard_normal((n, length))
    return x[:, None, :].astype(np.float32), y.astype(np.int64)


def _train_and_deploy(model, layout, tmp_path) -> dict:
    """Train `model` on tones (samples made by `layout` from (N, 1, L)), export it to ONNX,
    deploy it on the tones as .npz (cut by half); deploy's report."""
    from edgeprune import data
    from edgeprune.quantize.train_utils import quick_train

    (x_train, y_train), (x_test, y_test) = _tones(2000, 160, 0), _tones(200, 160, 1)
    x_train, x_test = layout(x_train), layout(x_test)
    np.savez(tmp_path / "tones.npz", x_train=x_train, y_train=y_train, x_test=x_test,
             y_test=y_test)
    quick_train(model, data.Dataset("tones", x_train, y_train, x_test, y_test), samples=2000,
                epochs=2.0, lr=0.05)
    torch.onnx.export(model.eval(), (torch.zeros(1, *x_train.shape[1:]),),
                      str(tmp_path / "m.onnx"), dynamo=False)
    return deploy_user_model(tmp_path / "m.onnx", tmp_path / "tones.npz", tmp_path, "0.5", 10)


def test_conv1d_onnx_model_deploys_bit_exact_on_signal_data(tmp_path):
    """A Conv1d model exported to ONNX, with (N, C, L) .npz data, deploys: pruned, int8,
    bit-exact in QEMU, its C input the same bytes as the signal."""
    torch.manual_seed(0)
    report = _train_and_deploy(Signal1d(), lambda x: x, tmp_path)
    assert report["input_shape"] == [1, 1, 1, 160]
    assert report["check"]["outputs_match"] and report["check"]["mismatches"] == 0
    assert report["accuracy"]["quantized"] > 60


def test_keras_style_conv1d_onnx_model_deploys_bit_exact(tmp_path):
    """A Keras Conv1D model as tf2onnx writes it: (N, L, C) input, Transpose to (N, C, L), the
    last feature map transposed back to (N, L, C) before Flatten. Lifted with its permutes
    around the unit height, pruned through the channels-last flatten, bit-exact on the target
    on (L, C) .npz signals."""
    class KerasConv1d(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv1d(2, 8, 9, stride=2, padding=4)
            self.b = nn.Conv1d(8, 12, 5, stride=2, padding=2)
            self.fc = nn.Linear(12 * 40, 10)

        def forward(self, x):                     # x: N, L, C
            x = torch.relu(self.b(torch.relu(self.a(x.permute(0, 2, 1)))))
            return self.fc(x.permute(0, 2, 1).reshape(x.shape[0], -1))

    def two_channels(x):   # (N, 1, L) tones -> (N, L, 2)
        return np.ascontiguousarray(np.concatenate([x, x * x], 1).transpose(0, 2, 1))

    torch.manual_seed(0)
    report = _train_and_deploy(KerasConv1d(), two_channels, tmp_path)
    assert report["input_shape"] == [1, 160, 1, 2]
    assert report["check"]["outputs_match"] and report["check"]["mismatches"] == 0
    assert report["accuracy"]["quantized"] > 60
    widths = {l["channels_before"]: l["channels_after"] for l in report["pruning"]["per_layer"]}
    assert widths[8] == 6 and widths[12] == 10, widths   # 9: the target's channel multiple, 2


def test_global_max_over_time_quantizes_bit_exact():
    """Global max pooling over time (AdaptiveMaxPool1d, amax over the last axis, with and
    without keepdim, a text CNN's `max(dim).values` and `torch.max(x, dim)[0]`), common in
    keyword-spotting and ECG heads: lifted, quantized, and the host build of the integer
    model equals the golden model."""
    from edgeprune.quantize import ptq, reference, to_relax

    class GlobalMax1d(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv1d(2, 6, 5, stride=2)
            self.gmp = nn.AdaptiveMaxPool1d(1)
            self.fc = nn.Linear(30, 3)

        def forward(self, x):
            h = torch.relu(self.c(x))
            return self.fc(torch.cat([self.gmp(h).flatten(1), h.amax(-1),
                                      h.amax(2, keepdim=True).flatten(1), h.max(dim=2).values,
                                      torch.max(h, -1, keepdim=True)[0].flatten(1)], 1))

    torch.manual_seed(0)
    model = GlobalMax1d().eval()
    lifted, shape = lift_1d(model, (1, 2, 50))
    x = torch.randn(8, 2, 50)
    with torch.no_grad():
        assert torch.allclose(lifted(x.view(8, 2, 1, 50)), model(x), atol=1e-5)
    qm = ptq.quantize_ptq(lifted, shape, x.view(8, 2, 1, 50).numpy())
    assert [o.kind for o in qm.ops].count("maxpool") == 5
    xq = reference.quantize_input(qm, x.view(8, 2, 1, 50).numpy())
    got = to_relax.build_host(to_relax.to_relax(qm, batch=8))(xq)
    assert np.array_equal(got, reference.run(qm, xq))


def test_functional_pools_and_upsampling_quantize_bit_exact():
    """The functional 1-D pools and the nearest upsampling of Functional1d, lifted: upsampling
    along L only (factors [1, s]), and the host build of the integer model equals the golden
    model."""
    from edgeprune.quantize import ptq, reference, to_relax

    torch.manual_seed(0)
    lifted, shape = lift_1d(Functional1d().eval(), (1, 2, 30))
    x = torch.randn(8, 2, 1, 30)
    qm = ptq.quantize_ptq(lifted, shape, x.numpy())
    assert [o.attrs["factors"] for o in qm.ops if o.kind == "upsample"] == [[1, 2], [1, 2],
                                                                           [1, 3]]
    xq = reference.quantize_input(qm, x.numpy())
    got = to_relax.build_host(to_relax.to_relax(qm, batch=8))(xq)
    assert np.array_equal(got, reference.run(qm, xq))


def test_linear_interpolation_along_l_quantizes_bit_exact():
    """Linear 1-D resizing becomes bilinear resizing of a one-row map: the int8 model is
    bit-exact on the host and close to the float model."""
    from edgeprune.quantize import ptq, reference, to_relax

    torch.manual_seed(0)
    model = Linear1d().eval()
    lifted, shape = lift_1d(model, (1, 2, 30))
    x = torch.randn(8, 2, 1, 30)
    qm = ptq.quantize_ptq(lifted, shape, x.numpy())
    assert [o.attrs for o in qm.ops if o.kind == "upsample"] == [
        {"mode": "bilinear", "align_corners": False, "size": [1, 30]},
        {"mode": "bilinear", "align_corners": True, "size": [1, 45]}]
    xq = reference.quantize_input(qm, x.numpy())
    want = reference.run(qm, xq)
    assert np.array_equal(to_relax.build_host(to_relax.to_relax(qm, batch=8))(xq), want)
    with torch.no_grad():
        y = model(x[:, :, 0]).numpy()
    assert np.abs(reference.dequantize_output(qm, want) - y).max() < 0.05 * np.abs(y).max()


class ECA(nn.Module):
    """ECA-Net's channel attention in a 2-D model: a Conv1d along the pooled channels."""
    def __init__(self):
        super().__init__()
        self.c0, self.c = nn.Conv2d(1, 8, 3), nn.Conv2d(8, 16, 3)
        self.k = nn.Conv1d(1, 1, 3, padding=1, bias=False)
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        y = torch.relu(self.c(torch.relu(self.c0(x))))
        w = y.mean((2, 3), keepdim=True).squeeze(-1).transpose(-1, -2)     # (N, 1, C)
        w = self.k(w).transpose(-1, -2).unsqueeze(-1)                       # (N, C, 1, 1)
        return self.fc((y * torch.sigmoid(w)).mean((2, 3)))


def test_a_conv1d_along_the_channels_of_a_2d_model_lifts_prunes_and_quantizes():
    from checks import conv_widths, pruned_equivalently
    from edgeprune.quantize import ptq, reference, to_relax
    torch.manual_seed(0)
    model, x = ECA().eval(), torch.randn(8, 1, 12, 12)
    lifted, shape = lift_1d(model, (1, 1, 12, 12))
    with torch.no_grad():
        torch.testing.assert_close(lifted(x), model(x))
    pruned, _ = pruned_equivalently(lifted, shape, x, ratios=0.5)
    assert conv_widths(pruned) == [4, 16, 1]     # c's channels are what the 1-D conv slides on
    qm = ptq.quantize_ptq(pruned, shape, x.numpy())
    xq = reference.quantize_input(qm, x[:2].numpy())
    assert np.array_equal(to_relax.build_host(to_relax.to_relax(qm, batch=2))(xq),
                          reference.run(qm, xq))


class M5(nn.Module):
    """torchaudio's speech-commands tutorial model on raw audio: a pool over the whole
    remaining length read from the shape, a permute, a log-softmax over the last axis and a
    squeeze."""
    def __init__(self, ch: int = 16, classes: int = 5):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv1d(1, ch, 80, stride=16), nn.BatchNorm1d(ch)
        self.conv2, self.bn2 = nn.Conv1d(ch, ch, 3), nn.BatchNorm1d(ch)
        self.conv3, self.bn3 = nn.Conv1d(ch, 2 * ch, 3), nn.BatchNorm1d(2 * ch)
        self.fc1 = nn.Linear(2 * ch, classes)

    def forward(self, x):
        x = F.max_pool1d(F.relu(self.bn1(self.conv1(x))), 4)
        x = F.max_pool1d(F.relu(self.bn2(self.conv2(x))), 4)
        x = F.relu(self.bn3(self.conv3(x)))
        x = F.avg_pool1d(x, x.shape[-1]).permute(0, 2, 1)
        return F.log_softmax(self.fc1(x), dim=2).squeeze(1)


class StatsPooling(nn.Module):
    """An x-vector's statistics pooling: the mean and standard deviation over time."""
    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv1d(13, 16, 5, dilation=2), nn.Conv1d(16, 16, 3)
        self.fc = nn.Linear(32, 4)

    def forward(self, x):
        h = F.relu(self.c2(F.relu(self.c1(x))))
        return self.fc(torch.cat([h.mean(-1), h.std(-1)], 1))


class MapsToSignal(nn.Module):
    """A 2-D model that averages its maps over the height, then pools the rows it got with a
    1-D pool (a spectrogram model's frequency-then-time pooling)."""
    def __init__(self):
        super().__init__()
        self.c, self.pool, self.fc = nn.Conv2d(1, 8, 3), nn.AdaptiveAvgPool1d(3), nn.Linear(24, 4)

    def forward(self, x):
        return self.fc(self.pool(F.relu(self.c(x)).mean(2)).flatten(1))


class RecurrentPool(nn.Module):
    """The maximum of a GRU's output frames over time by a 1-D pool."""
    def __init__(self):
        super().__init__()
        self.gru, self.pool = nn.GRU(6, 8, batch_first=True), nn.AdaptiveMaxPool1d(1)
        self.f1, self.f2 = nn.Linear(8, 12), nn.Linear(12, 4)

    def forward(self, x):
        h = self.pool(self.gru(x)[0].transpose(1, 2)).squeeze(-1)
        return self.f2(F.relu(self.f1(h)))


class RowsAsSignal(nn.Module):
    """A 2-D front end whose maps' channels and rows become a signal's channels
    (`y.flatten(1, 2)`: (N, C * H, W)) for Conv1d layers over time."""
    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(1, 8, 3, padding=1), nn.Conv2d(8, 8, 3, (2, 1), 1)
        self.t1, self.t2 = nn.Conv1d(8 * 5, 16, 3, padding=1), nn.Conv1d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        y = F.relu(self.c2(F.relu(self.c1(x))))
        return self.fc(F.relu(self.t2(F.relu(self.t1(y.flatten(1, 2))))).mean(-1))


def test_maps_flattened_into_a_signals_channels_prune_and_run_bit_exact(tmp_path):
    from checks import bit_exact, conv_widths, pruned_equivalently, saved_and_loaded
    from edgeprune.load import load_torch
    from edgeprune.quantize import ptq
    torch.manual_seed(0)
    model, shape = RowsAsSignal().eval(), (1, 1, 10, 20)
    x = torch.randn(6, *shape[1:])
    lifted, lifted_shape = saved_and_loaded(model, shape, x, tmp_path)
    pruned, _ = pruned_equivalently(lifted, lifted_shape, x, ratios=0.5)
    assert conv_widths(pruned) == [4, 4, 8, 8]    # c2's channels go with their rows of t1's
    qm = ptq.quantize_ptq(pruned, lifted_shape, x.numpy())
    bit_exact(qm, x[:3].numpy(), "cortex-m4", tmp_path, like=pruned)
    # ONNX writes the flatten as a Reshape to (N, C * H, W)
    torch.onnx.export(model, (torch.zeros(shape),), str(tmp_path / "m.onnx"), dynamo=False)
    back, back_shape = load_torch(str(tmp_path / "m.onnx"))
    pruned, _ = pruned_equivalently(back, back_shape, x, ratios=0.5)
    assert conv_widths(pruned) == [4, 4, 8, 8]


class GatedUnits(nn.Module):
    """WaveNet's gated residual units: dilated causal convs trimmed to the input's length read
    from its shape (`y[..., :n]`), tanh times sigmoid."""
    def __init__(self):
        super().__init__()
        self.inp, self.out = nn.Conv1d(1, 8, 1), nn.Linear(8, 3)
        self.f = nn.ModuleList(nn.Conv1d(8, 8, 2, dilation=d, padding=d) for d in (1, 2))
        self.g = nn.ModuleList(nn.Conv1d(8, 8, 2, dilation=d, padding=d) for d in (1, 2))
        self.r = nn.ModuleList(nn.Conv1d(8, 8, 1) for _ in range(2))

    def forward(self, x):
        h, n = self.inp(x), x.shape[-1]
        for f, g, r in zip(self.f, self.g, self.r):
            h = h + r(torch.tanh(f(h)[..., :n]) * torch.sigmoid(g(h)[..., :n]))
        return self.out(h.mean(-1))


@pytest.mark.parametrize("cls, shape", [(M5, (1, 1, 1600)), (StatsPooling, (1, 13, 30)),
                                        (MapsToSignal, (1, 1, 9, 14)), (RecurrentPool, (1, 5, 6)),
                                        (GatedUnits, (1, 1, 40))])
def test_audio_models_load_prune_and_run_bit_exact(cls, shape, tmp_path):
    from checks import bit_exact, pruned_equivalently
    from edgeprune.load import load_torch
    from edgeprune.quantize import ptq
    torch.manual_seed(0)
    model = cls().eval()
    torch.save(model, tmp_path / "m.pt")
    lifted, lifted_shape = load_torch(str(tmp_path / "m.pt"), shape)
    x = torch.randn(6, *shape[1:])
    with torch.no_grad():
        torch.testing.assert_close(lifted(x.reshape(6, *lifted_shape[1:])), model(x),
                                   atol=1e-4, rtol=1e-4)
    pruned, _ = pruned_equivalently(lifted, lifted_shape, x.reshape(6, *lifted_shape[1:]),
                                    ratios=0.5)
    calib = torch.randn(64, *lifted_shape[1:]).numpy()
    qm = ptq.quantize_ptq(pruned, lifted_shape, calib)
    bit_exact(qm, calib[:3], "riscv32", tmp_path, like=pruned, tol=0.15)
