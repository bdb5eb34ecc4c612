"""Every criterion gives a smaller model that equals the original with the same channels zeroed
(before fine-tuning), on a model with a residual add, a concat, a depthwise conv and a spatial
flatten -> Linear, scored on real Fashion-MNIST batches."""

import itertools

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from edgeprune import data as datasets
from edgeprune.prune import CRITERIA, DepGraph, masked_reference, prune
from edgeprune.prune.context import Context
from edgeprune.prune.criteria import CCP
from edgeprune.prune.methods import scoring_batches


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.a = nn.Conv2d(8, 8, 3, padding=1)
        self.bn_a = nn.BatchNorm2d(8)
        self.b = nn.Conv2d(8, 6, 1)
        self.c = nn.Conv2d(8, 4, 3, padding=1)
        self.dw = nn.Conv2d(10, 10, 3, stride=2, padding=1, groups=10)
        self.pw = nn.Conv2d(10, 12, 1)
        self.pool = nn.AvgPool2d(7)
        self.fc = nn.Linear(12 * 1 * 1, 10)

    def forward(self, x):
        s = F.relu(self.bn(self.stem(x)))
        s = F.relu(s + self.bn_a(self.a(s)))
        y = torch.cat([F.relu(self.b(s)), F.relu(self.c(s))], 1)
        y = F.relu(self.pw(F.relu(self.dw(y))))
        return self.fc(torch.flatten(self.pool(y), 1))


@pytest.fixture(scope="module")
def fmnist():
    return datasets.fashion_mnist()


@pytest.fixture(scope="module")
def trained(fmnist):
    """Net after a few hundred SGD steps on real data, so data-driven scores mean something."""
    from edgeprune.train import train
    torch.manual_seed(0)
    return train(Net(), fmnist, epochs=1, lr=0.05, max_samples=4096)


@pytest.mark.parametrize("criterion", CRITERIA)
def test_criterion_prunes_equivalently(criterion, trained, fmnist):
    batches, meta = scoring_batches(fmnist, batches=2, batch_size=64)
    x = torch.from_numpy(fmnist.x_test[:16])
    pruned, record = prune(trained, x[:1], criterion=criterion, ratios=0.5, data=batches,
                           meta_batch=meta)
    m = dict(pruned.named_modules())
    assert (m["stem"].out_channels, m["b"].out_channels, m["c"].out_channels,
            m["dw"].out_channels, m["pw"].out_channels) == (4, 3, 2, 5, 6)
    assert record["macs_after"] < 0.5 * record["macs_before"]
    for g in record["groups"]:
        assert len(g["scores"]) == g["channels_before"]
        assert np.isfinite(g["scores"]).all()
    with torch.no_grad():
        with masked_reference(trained, record["layers"]):
            ref = trained(x)
        out = pruned(x)
    assert out.shape == (16, 10) and torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)


def test_data_free_criteria_need_no_data(trained):
    for criterion in ("l1", "l2", "fpgm", "random"):
        pruned, _ = prune(trained, torch.zeros(1, 1, 28, 28), criterion=criterion, ratios=0.25)
        assert pruned.stem.out_channels == 6
    with pytest.raises(Exception, match="criterion 'taylor' needs data.*--data"):
        prune(trained, torch.zeros(1, 1, 28, 28), criterion="taylor")


def test_data_driven_criteria_beat_random_on_the_held_out_batch(trained, fmnist):
    """Removing the channels Taylor calls least important hurts less than removing random ones
    (averaged over random seeds), measured on test samples the scores never saw."""
    batches, meta = scoring_batches(fmnist, batches=4, batch_size=128)
    x, y = torch.from_numpy(fmnist.x_test[:2000]), torch.from_numpy(fmnist.y_test[:2000])

    def loss(crit, seed=0):
        p, _ = prune(trained, x[:1], criterion=crit, ratios=0.5, data=batches, meta_batch=meta,
                     seed=seed)
        with torch.no_grad():
            return float(F.cross_entropy(p(x), y))
    random = np.mean([loss("random", s) for s in range(4)])
    assert loss("taylor") < random
    assert loss("ccp") < random


def test_ccp_relaxed_qp_is_near_the_brute_force_optimum():
    """The SLSQP relaxation, binarised, solves small 0/1 programs exactly most of the time and
    always beats removing the channels that are cheapest one at a time (no interactions)."""
    rng = np.random.default_rng(0)
    ccp = CCP()
    exact = 0
    for trial in range(10):
        n, k = 8, 3
        t = rng.normal(size=(32, n)) + rng.normal(size=n)  # per-sample g_i^T w_i
        u, s = -t.mean(0), 0.5 * (t.T @ t) / 32
        ccp.terms = lambda group, ctx, u=u, s=s: (u, s)
        group = type("G", (), {"units": n, "index": 0, "name": "g"})()
        ctx = type("C", (), {"budget": {0: k}, "notes": {}, "require_data": lambda self, c: None,
                             "loss": "ce"})()
        scores = ccp.scores(group, ctx).numpy()

        def cost(removed):
            b = np.array([i in removed for i in range(n)], dtype=float)
            return u @ b + b @ s @ b
        got = cost(set(np.argsort(scores)[:k]))
        best = min(cost(set(c)) for c in itertools.combinations(range(n), k))
        greedy = cost(set(np.argsort(u + np.diag(s))[:k]))
        assert got <= greedy + 1e-9
        exact += got <= best + 1e-9
        assert ctx.notes["g"] == "ccp SLSQP converged"
    assert exact >= 5


def test_ccp_mse_uses_gauss_newton_terms(trained, fmnist):
    batches, _ = scoring_batches(fmnist, batches=1, batch_size=16)
    graph = DepGraph(trained, batches[0][0][:1])
    ctx = Context(graph, trained, batches=batches, loss="mse")
    g = graph.group("pw")
    u, s = CCP().terms(g, ctx)
    j = ctx.jacobian_terms(g).double()                # [N, outputs, units]
    assert j.shape == (16, 10, g.units)
    assert np.allclose(s, np.einsum("nou,nov->uv", j.numpy(), j.numpy()) / 16)
    assert np.allclose(s, s.T) and (np.linalg.eigvalsh(s) > -1e-9).all()  # PSD like J^T J


def test_taylor_is_the_first_order_loss_change(trained, fmnist):
    """The gate term equals the derivative of the loss when the unit's activation is scaled."""
    batches, _ = scoring_batches(fmnist, batches=1, batch_size=32)
    graph = DepGraph(trained, batches[0][0][:1])
    ctx = Context(graph, trained, batches=batches)
    g = graph.group("b")
    terms = ctx.gate_terms(g).sum(0)
    x, y = batches[0]

    def loss_with(scale):
        with torch.no_grad(), ctx.gate() as gate:
            v = torch.ones(g.units)
            v[0] = scale
            gate.set(g.index, v)
            return float(F.cross_entropy(trained(x), y, reduction="sum"))
    eps = 1e-2
    fd = (loss_with(1 + eps) - loss_with(1 - eps)) / (2 * eps)
    assert abs(fd - float(terms[0])) < 1e-2 * max(1.0, abs(fd))


def test_mfp_meta_step_records_its_choice(trained, fmnist):
    batches, meta = scoring_batches(fmnist, batches=1, batch_size=64)
    _, record = prune(trained, batches[0][0][:1], criterion="mfp", ratios=0.5, data=batches,
                      meta_batch=meta)
    notes = [g["note"] for g in record["groups"]]
    assert all(n and n.startswith("mfp chose ") for n in notes)
    assert {n.split()[2] for n in notes} <= {"minkowski-1", "minkowski-2", "cosine"}


def test_particle_filter_is_no_worse_than_its_l1_start(trained, fmnist):
    from edgeprune.prune.context import Context as Ctx
    batches, meta = scoring_batches(fmnist, batches=1, batch_size=128)
    graph = DepGraph(trained, batches[0][0][:1])
    g = graph.group("pw")
    ctx = Ctx(graph, trained, batches=batches, meta_batch=meta, budget={g.index: 6})
    from edgeprune.prune.criteria import L1, ParticleFilter
    pf = ParticleFilter().scores(g, ctx)
    l1 = L1().scores(g, ctx)

    def keep(scores):
        k = torch.ones(g.units)
        k[torch.argsort(scores)[:6]] = 0
        return ctx.masked_eval(g, k)[1]
    assert keep(pf) <= keep(l1)


class Fire(nn.Module):
    """SqueezeNet's fire module: a 1x1 and a 3x3 branch concatenated, both of the same weight
    scale, added to a residual."""

    def __init__(self):
        super().__init__()
        self.stem, self.squeeze = nn.Conv2d(1, 16, 3, padding=1), nn.Conv2d(16, 4, 1)
        self.e1, self.e3 = nn.Conv2d(4, 8, 1), nn.Conv2d(4, 8, 3, padding=1)
        self.fc = nn.Linear(16, 3)

    def forward(self, x):
        x = F.relu(self.stem(x))
        s = F.relu(self.squeeze(x))
        return self.fc((torch.cat([self.e1(s), self.e3(s)], 1) + x).mean((2, 3)))


@pytest.mark.parametrize("criterion", ["l1", "l2", "fpgm"])
def test_branches_of_different_kernels_compare_per_layer(criterion):
    """Channels of a 1x1 and a 3x3 branch in one group rank by their weights relative to
    their own layer's: before, the 3x3 filters' nine times as many weights outranked every
    1x1 filter and the cheap branch was cut to one channel."""
    torch.manual_seed(0)
    model = Fire().eval()
    for conv in (model.e1, model.e3):        # the same scale per weight in both branches
        nn.init.uniform_(conv.weight, -0.5, 0.5)
    pruned, _ = prune(model, torch.randn(1, 1, 8, 8), criterion=criterion, ratios=0.5)
    assert 3 <= pruned.e1.out_channels <= 5 and 3 <= pruned.e3.out_channels <= 5
