"""A Linear over the frames of a sequence (N, T, F): one dense per frame, a mean over time and a
flatten, as small audio models on feature frames are written. From torch and from both of its
ONNX exporters (onnxsim writes the frames as rows of (N * T, F) around each Gemm), pruned,
and in int8 bit-exact on a target."""

import numpy as np
import pytest
import torch
import torch.nn as nn

from checks import bit_exact, pruned_equivalently
from edgeprune.onnx_to_torch import onnx_to_torch
from edgeprune.prune import CRITERIA, prune
from edgeprune.quantize import ptq, reference, to_relax

torch.set_num_threads(1)
SHAPE = (1, 20, 10)    # 20 frames of 10 features


class Frames(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(10, 24), nn.Linear(24, 16)
        self.fc, self.fc2 = nn.Linear(16, 4), nn.Linear(20 * 16, 4)

    def forward(self, x):
        h = torch.relu(self.b(torch.relu(self.a(x))))
        return self.fc(h.mean(1)) + self.fc2(h.flatten(1))


@pytest.fixture(scope="module")
def frames():
    torch.manual_seed(0)
    return Frames().eval()


@pytest.mark.parametrize("criterion", CRITERIA)
def test_linear_over_frames_prunes_equivalently(frames, criterion):
    data = [(torch.randn(16, *SHAPE[1:]), torch.randint(0, 4, (16,))) for _ in range(2)]
    pruned, _ = pruned_equivalently(frames, SHAPE, torch.randn(8, *SHAPE[1:]),
                                    criterion=criterion, ratios=0.5, data=data,
                                    meta_batch=data[0])
    assert [m.out_features for m in pruned.modules() if isinstance(m, nn.Linear)] == [12, 8, 4, 4]


@pytest.mark.parametrize("dynamo", [False, True])
def test_linear_over_frames_from_onnx_is_one_dense_per_layer(frames, dynamo, tmp_path):
    torch.onnx.export(frames, (torch.zeros(SHAPE),), str(tmp_path / "m.onnx"), dynamo=dynamo)
    back, _ = onnx_to_torch(tmp_path / "m.onnx")
    x = torch.randn(8, *SHAPE[1:])          # any batch: the frames were not folded into rows
    with torch.no_grad():
        torch.testing.assert_close(back(x), frames(x), atol=1e-5, rtol=1e-4)
    assert sum(isinstance(m, nn.Linear) for m in back.modules()) == 4
    pruned, _ = prune(back, torch.randn(SHAPE), ratios=0.5)
    assert [m.out_features for m in pruned.modules() if isinstance(m, nn.Linear)] == [12, 8, 4, 4]


def test_linear_over_frames_runs_bit_exact(frames, tmp_path):
    calib = np.random.default_rng(0).standard_normal((64, *SHAPE[1:])).astype(np.float32)
    qm = ptq.quantize_ptq(frames, SHAPE, calib)
    assert [o.kind for o in qm.ops][:2] == ["dense", "dense"]
    assert qm.tensors[qm.ops[0].output].shape == [1, 20, 24]
    bit_exact(qm, calib[:4], "cortex-m7", tmp_path, on_target=2, like=frames)


def test_image_rows_as_frames_prune():
    """(N, 1, H, W) squeezed to H frames of W: the squeeze keeps the input's axes."""
    class Rows(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.fc = nn.Linear(8, 12), nn.Linear(6 * 12, 3)

        def forward(self, x):
            return self.fc(torch.relu(self.a(x.squeeze(1))).flatten(1))

    torch.manual_seed(0)
    model = Rows().eval()
    pruned, _ = pruned_equivalently(model, (1, 1, 6, 8), torch.randn(4, 1, 6, 8), ratios=0.5)
    assert pruned.a.out_features == 6 and pruned.fc.in_features == 36


class LastFrame(nn.Module):
    """A head on one frame (o[:, -1], x[:, 0]): an index that drops the time axis."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.fc = nn.Linear(10, 16), nn.Linear(16, 8), nn.Linear(24, 4)

    def forward(self, x):
        h = torch.relu(self.a(x))
        return self.fc(torch.cat([torch.relu(self.b(h))[:, -1], h[:, 0]], 1))


@pytest.mark.parametrize("dynamo", [None, False, True])
def test_one_frame_heads_prune_and_quantize(dynamo, tmp_path):
    torch.manual_seed(0)
    model = LastFrame().eval()
    if dynamo is not None:
        torch.onnx.export(model, (torch.zeros(SHAPE),), str(tmp_path / "m.onnx"), dynamo=dynamo)
        model = onnx_to_torch(tmp_path / "m.onnx")[0]
    x = torch.randn(8, *SHAPE[1:])
    pruned, _ = pruned_equivalently(model, SHAPE, x, ratios=0.5)
    assert [m.out_features for m in pruned.modules() if isinstance(m, nn.Linear)] == [8, 4, 4]
    qm = ptq.quantize_ptq(model, SHAPE, torch.randn(64, *SHAPE[1:]).numpy())
    assert [o.kind for o in qm.ops].count("slice") == 2
    xq = reference.quantize_input(qm, x.numpy())
    want = reference.run(qm, xq)
    assert np.array_equal(to_relax.build_host(to_relax.to_relax(qm, batch=8))(xq), want)


def test_attention_pooling_over_frames_prunes_the_frames_it_weighs():
    """(w * h).sum(1) with w = softmax over time of one score per frame: the scores' one
    channel scales every channel of h, which prune."""
    class AttentionPool(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.score, self.fc = nn.Linear(10, 16), nn.Linear(16, 1), nn.Linear(16, 3)

        def forward(self, x):
            h = torch.relu(self.a(x))
            w = torch.softmax(self.score(h), dim=1)
            return self.fc((w * h).sum(1))

    torch.manual_seed(0)
    model, x = AttentionPool().eval(), torch.randn(8, *SHAPE[1:])
    pruned, _ = pruned_equivalently(model, SHAPE, x, ratios=0.5)
    assert [m.out_features for m in pruned.modules() if isinstance(m, nn.Linear)] == [8, 1, 3]
    qm = ptq.quantize_ptq(pruned, SHAPE, x.numpy())
    xq = reference.quantize_input(qm, x[:2].numpy())
    assert np.array_equal(to_relax.build_host(to_relax.to_relax(qm, batch=2))(xq),
                          reference.run(qm, xq))
