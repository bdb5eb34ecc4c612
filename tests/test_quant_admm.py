"""ADMM low-bit weights: the G-step projection's closed forms, and the trained layers' levels."""

import numpy as np
import pytest
import torch
import torch.nn as nn
from hypothesis import example, given, settings
from hypothesis import strategies as st

from edgeprune import data
from edgeprune.quantize import admm, ptq, reference
from edgeprune.quantize.wquant import levels, nearest_level, project

torch.set_num_threads(1)
FORMATS = [("pow2", 4), ("ternary", 2), ("int", 4), ("int", 2), ("pow2", 3)]


@settings(max_examples=60, deadline=None)
@given(fmt=st.sampled_from(FORMATS), seed=st.integers(0, 2 ** 31 - 1),
       o=st.integers(1, 6), k=st.integers(1, 40))
@example(fmt=("int", 4), seed=30131, o=2, k=37)   # not yet a fixed point after 10 alternations
def test_projection_is_a_fixed_point_of_its_closed_forms(fmt, seed, o, k):
    # The G-step result satisfies both alternation steps: Q is the nearest level to w / a, and
    # a = <w, Q> / <Q, Q> is the least-squares scale for that Q.
    w = np.random.default_rng(seed).normal(size=(o, k))
    q, a = project(w, *fmt)
    lv = levels(*fmt)
    qf = q.reshape(o, -1).astype(np.float64)
    assert set(np.unique(q)) <= set(lv.tolist())
    assert np.all(a > 0)
    assert np.array_equal(nearest_level(w / a[:, None], lv), q)
    for c in range(o):
        if (qf[c] ** 2).sum() > 0:
            assert a[c] == pytest.approx((w[c] * qf[c]).sum() / (qf[c] ** 2).sum(), rel=1e-6)


@settings(max_examples=60, deadline=None)
@given(fmt=st.sampled_from(FORMATS), seed=st.integers(0, 2 ** 31 - 1),
       scale=st.floats(1e-4, 10.0))
def test_projection_is_idempotent_on_representable_weights(fmt, seed, scale):
    rng = np.random.default_rng(seed)
    lv = levels(*fmt)
    q0 = rng.choice(lv, size=(3, 17))
    q0[:, 0] = lv.max()                       # every channel uses the top level
    w = scale * q0
    q, a = project(w, *fmt)
    assert np.allclose(a[:, None] * q, w, rtol=1e-9, atol=0)


def test_project_never_worse_than_nearest_with_more_levels():
    # more levels can only help: 4-bit int error <= ternary error on the same weights
    w = np.random.default_rng(3).normal(size=(8, 50))
    errs = {}
    for f in [("ternary", 2), ("int", 4), ("int", 8)]:
        q, a = project(w, *f)
        errs[f] = ((w - a[:, None] * q) ** 2).sum()
    assert errs[("int", 8)] <= errs[("int", 4)] <= errs[("ternary", 2)]


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(1, 4, 3, 2, 1)
        self.c2 = nn.Conv2d(4, 8, 3, 2, 1)
        self.c3 = nn.Conv2d(8, 8, 3, 2, 1)
        self.fc = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x):
        h = torch.relu(self.c3(torch.relu(self.c2(torch.relu(self.c1(x))))))
        return self.fc(h.flatten(1))


@pytest.mark.parametrize("fmt,bits", [("pow2", 4), ("ternary", 2)])
@pytest.mark.parametrize("straight_through", [0.0, 0.5, 1.0])   # ADMM alone, then half, none
def test_admm_constrains_only_the_chosen_layers(fmt, bits, straight_through):
    fm = data.load("fashion-mnist")
    model = Tiny().eval()
    net = ptq.extract(model, (1, 1, 28, 28))
    cfg = admm.default_layer_formats(net, fmt, bits)
    names = [n.name for n in net.weight_nodes()]
    assert cfg[names[0]] == ("int", 8) and cfg[names[-1]] == ("int", 8)
    assert {cfg[n] for n in names[1:-1]} == {(fmt, bits)}
    ranges = ptq.calibrate(net, fm.x_train[:64])
    before = {k: v.detach().clone() for k, v in net.weight.items()}
    qw = admm.admm_train(net, fm, cfg, ranges, epochs=1.0, max_samples=640, admm_every=3,
                         straight_through=straight_through)
    assert set(qw) == set(names[1:-1])
    lv = set(levels(fmt, bits).tolist())
    for k, (q, a) in qw.items():
        assert set(np.unique(q)) <= lv
        # the network's weights are now exactly a * Q (what the integer model deploys)
        assert torch.allclose(net.weight[k].double(),
                              torch.from_numpy(a.reshape(-1, 1, 1, 1) * q), atol=1e-6)
    for k in (names[0], names[-1]):       # trained freely, not projected
        assert not torch.equal(net.weight[k], before[k])
        assert len(torch.unique(net.weight[k])) > 2 ** bits
    assert net.qconfig is None            # fake quantization switched off again
    qm = ptq.to_qmodel(net, ptq.calibrate(net, fm.x_train[:64]), cfg, quantized_weights=qw)
    for k in qw:
        assert qm.op(k).attrs["weight_format"] == fmt
        assert np.array_equal(qm.param(k, "weight"), qw[k][0])
    assert reference.run(qm, reference.quantize_input(qm, fm.x_test[:4])).shape == (4, 10)
