"""Importance criteria: one small class each, `scores(group, ctx) -> tensor[units]`, higher
means more important (kept first). Adding a criterion = adding a class here and a line in
CRITERIA. A group's units are channels that are removed together (see graph.py), so every
criterion sums its evidence over all the layers a unit lives in.
"""

from __future__ import annotations

import numpy as np
import torch

from .context import Context
from .graph import Group


class L1:
    """Sum of absolute filter weights (Li et al. 2017, "Pruning filters for efficient ConvNets")."""
    needs_data = False

    def scores(self, group: Group, ctx: Context) -> torch.Tensor:
        return ctx.unit_vectors(group, p=1).abs().sum(1)


class L2:
    """Euclidean norm of the filter weights."""
    needs_data = False

    def scores(self, group: Group, ctx: Context) -> torch.Tensor:
        return ctx.unit_vectors(group).norm(dim=1)


class FPGM:
    """Filter pruning via geometric median (He et al. 2019): a filter close to the geometric
    median of its layer is replaceable by the others. The score is the summed distance to all
    other filters (its minimiser is the geometric median among the filters)."""
    needs_data = False

    def scores(self, group: Group, ctx: Context) -> torch.Tensor:
        w = ctx.unit_vectors(group)
        return torch.cdist(w, w, p=2).sum(1)


class BNScale:
    """|gamma| of the BatchNorm channels (network slimming, Liu et al. 2017). Meaningful after
    training with an L1 penalty on gamma (methods.slimming_penalty); groups without BatchNorm
    fall back to L1 and say so in the record."""
    needs_data = False

    def scores(self, group: Group, ctx: Context) -> torch.Tensor:
        g = ctx.bn_gammas(group)
        if g is None:
            ctx.notes[group.name] = "no BatchNorm in group: L1 used instead of bn-scale"
            return L1().scores(group, ctx)
        return g


class Taylor:
    """First-order Taylor expansion of the loss change when a channel is removed (Molchanov et
    al. 2017): per sample |sum over positions of activation × gradient|, averaged over samples.
    The activation is the one removal zeroes: the unit's channel where layers read it (after
    BatchNorm and the nonlinearity; for a residual group, wherever the sum is read)."""
    needs_data = True

    def scores(self, group: Group, ctx: Context) -> torch.Tensor:
        ctx.require_data("taylor")
        return ctx.gate_terms(group).abs().mean(0)


def minkowski(w: torch.Tensor, p: float) -> torch.Tensor:
    return torch.cdist(w, w, p=p).sum(1) / max(1, w.shape[0] - 1)


def cosine_distance(w: torch.Tensor) -> torch.Tensor:
    n = torch.nn.functional.normalize(w, dim=1)
    return (1 - n @ n.T).sum(1) / max(1, w.shape[0] - 1)


class MFP:
    """Meta filter pruning (He et al. 2020): several distance criteria (Minkowski p=1, p=2,
    cosine; each the mean distance of a filter to the others) and a meta step that, each time
    it runs (each pruning epoch in an iterative schedule), keeps the criterion whose pruning
    best preserves the meta-attribute, here the loss on a held-out batch. The meta step is made
    per group: each candidate's pattern is applied to that group alone and evaluated."""
    needs_data = True
    candidates = {
        "minkowski-1": lambda w: minkowski(w, 1.0),
        "minkowski-2": lambda w: minkowski(w, 2.0),
        "cosine": cosine_distance,
    }

    def scores(self, group: Group, ctx: Context) -> torch.Tensor:
        ctx.require_data("mfp")
        w = ctx.unit_vectors(group)
        k = ctx.budget.get(group.index, 0)
        results = {name: fn(w) for name, fn in self.candidates.items()}
        if k == 0:
            return results["minkowski-2"]
        trials = {}
        for name, s in results.items():
            keep = torch.ones(group.units)
            keep[torch.argsort(s)[:k]] = 0
            trials[name] = ctx.masked_eval(group, keep)[0]
        best = min(trials, key=trials.get)
        ctx.notes[group.name] = f"mfp chose {best} (held-out loss " + ", ".join(
            f"{n}={v:.4f}" for n, v in trials.items()) + ")"
        return results[best]


class CCP:
    """Collaborative channel pruning (Peng et al. 2019). With beta_i = 1 when channel i is
    removed, the loss change is approximated to second order by

        dL(beta) = sum_i u_i beta_i + sum_ij s_ij beta_i beta_j,
        u_i = -g_i^T w_i,   s_ij = 1/2 w_i^T H_ij w_j,

    where g_i^T w_i is measured per sample as activation × gradient (ctx.taylor_terms) and the
    Hessian uses the paper's approximations: for cross-entropy H ~ E[g g^T] (so s_ij is half the
    mean product of per-sample terms), for MSE the Gauss-Newton H = 2 J^T J (per-output
    Jacobian terms). The 0/1 program under the budget sum(beta) = k is relaxed to [0, 1],
    solved by SQP (scipy SLSQP) and binarised by keeping the k largest beta."""
    needs_data = True

    def terms(self, group: Group, ctx: Context) -> tuple[np.ndarray, np.ndarray]:
        t = ctx.taylor_terms(group).double()
        n = max(1, t.shape[0])
        u = -t.mean(0)
        if ctx.loss == "mse":
            j = ctx.jacobian_terms(group).double()  # [N, O, U]
            s = torch.einsum("nou,nov->uv", j, j) / n
        else:
            s = 0.5 * (t.T @ t) / n
        return u.numpy(), s.numpy()

    def scores(self, group: Group, ctx: Context) -> torch.Tensor:
        from scipy.optimize import minimize
        ctx.require_data("ccp")
        u, s = self.terms(group, ctx)
        single = u + np.diag(s)  # loss increase when removing the channel alone
        k = ctx.budget.get(group.index, 0)
        n = len(u)
        if k == 0 or k >= n:
            return torch.as_tensor(single, dtype=torch.float32)
        scale = max(np.abs(s).max(), np.abs(u).max(), 1e-30)
        us, ss = u / scale, s / scale

        def f(b):
            return float(us @ b + b @ ss @ b)

        def grad(b):
            return us + (ss + ss.T) @ b
        x0 = np.full(n, k / n)
        res = minimize(f, x0, jac=grad, method="SLSQP", bounds=[(0.0, 1.0)] * n,
                       constraints=[{"type": "eq", "fun": lambda b: b.sum() - k,
                                     "jac": lambda b: np.ones_like(b)}],
                       options={"maxiter": 200, "ftol": 1e-10})
        beta = np.clip(res.x, 0, 1)
        # binarise: the k largest beta are removed; ties broken by the single-channel cost
        order = np.lexsort((single, -beta))
        removed = order[:k]
        tie = (single - single.min()) / (np.ptp(single) + 1e-30)
        score = 1.0 + tie  # kept channels rank above removed ones whatever their cost
        score[removed] = tie[removed] - 1.0
        ctx.notes[group.name] = f"ccp SLSQP {'converged' if res.success else res.message}"
        return torch.as_tensor(score, dtype=torch.float32)


class ParticleFilter:
    """Particle-filter pruning (Anwar et al. 2017): particles are connectivity patterns
    (which units of the group stay), weighted by the misclassification rate on a batch with the
    pattern applied, resampled and perturbed (swap one kept and one removed unit); the best
    pattern seen is kept. Half the initial particles perturb the L1 pattern, half are random."""
    needs_data = True
    particles = 16
    rounds = 4
    temperature = 0.02  # in misclassification rate

    def scores(self, group: Group, ctx: Context) -> torch.Tensor:
        ctx.require_data("particle")
        k = ctx.budget.get(group.index, 0)
        n = group.units
        l1 = L1().scores(group, ctx)
        if k == 0:
            return l1
        rng = ctx.rng(group)
        base = np.ones(n, dtype=bool)
        base[torch.argsort(l1)[:k].numpy()] = False

        def perturb(p):
            p = p.copy()
            i, j = rng.choice(np.flatnonzero(p)), rng.choice(np.flatnonzero(~p))
            p[i], p[j] = False, True
            return p

        def random_pattern():
            p = np.ones(n, dtype=bool)
            p[rng.choice(n, k, replace=False)] = False
            return p
        pop = [base] + [perturb(base) for _ in range(self.particles // 2 - 1)]
        pop += [random_pattern() for _ in range(self.particles - len(pop))]
        best, best_cost = None, np.inf
        for _ in range(self.rounds):
            costs = []
            for p in pop:
                loss, mcr = ctx.masked_eval(group, torch.as_tensor(p, dtype=torch.float32))
                cost = mcr + 1e-3 * loss  # loss only breaks ties between equal error rates
                costs.append(cost)
                if cost < best_cost:
                    best, best_cost = p, cost
            c = np.asarray(costs)
            w = np.exp(-(c - c.min()) / self.temperature)
            w /= w.sum()
            picks = rng.choice(len(pop), len(pop), p=w)
            pop = [perturb(pop[i]) for i in picks]
        ctx.notes[group.name] = f"particle best misclassification+tie {best_cost:.4f}"
        tie = (l1 - l1.min()) / (l1.max() - l1.min() + 1e-12)
        return torch.as_tensor(best, dtype=torch.float32) * 2.0 + tie


class Random:
    """Uniformly random scores: the baseline every criterion must beat."""
    needs_data = False

    def scores(self, group: Group, ctx: Context) -> torch.Tensor:
        return torch.as_tensor(ctx.rng(group).random(group.units), dtype=torch.float32)


class Fixed:
    """Scores computed elsewhere (learned gates, group-LASSO norms), by group index."""
    needs_data = False

    def __init__(self, scores: dict[int, torch.Tensor]):
        self._scores = scores

    def scores(self, group: Group, ctx: Context) -> torch.Tensor:
        return self._scores[group.index]


CRITERIA = {
    "l1": L1, "l2": L2, "fpgm": FPGM, "bn-scale": BNScale, "taylor": Taylor, "mfp": MFP,
    "ccp": CCP, "particle": ParticleFilter, "random": Random,
}


def get(name: str):
    from ..errors import EdgepruneError
    if name not in CRITERIA:
        raise EdgepruneError(f"unknown criterion '{name}'; known: {', '.join(CRITERIA)}",
                             stage="prune")
    return CRITERIA[name]()
