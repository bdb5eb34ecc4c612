"""Low-bit weights by ADMM (Leng et al., "Extremely Low Bit Neural Network: Squeeze the Last Bit
Out with ADMM", AAAI 2018).

Problem: minimise loss(W) subject to every constrained layer's W_l = a_l * Q_l with Q_l from a
level set (per output channel a): power-of-two {0, +-1, +-2, +-4, ...}, ternary {-1, 0, 1}, or
uniform k-bit.  With the auxiliary G (the projected weights) and the scaled dual U, iterate

* W-step: minimise loss(W) + rho/2 * ||W - G + U||^2 by SGD with the *extra-gradient* update
  (W~ = W - lr * grad(W); W = W - lr * grad(W~)), which the paper uses for stability;
* G-step: G = Proj(W + U), computed by alternating the closed forms a = <V,Q>/<Q,Q> and
  Q = nearest-level(V / a) (`wquant.project`);
* dual update: U = U + W - G.

Within a short budget ADMM leaves the weights too far from the level set for the final
projection (a MobileNet-V2-like net on Fashion-MNIST, ternary, 0.3 epochs: 81.1 % float, 19.7 %
after ADMM), so the last `straight_through` fraction of the steps (default half) computes each
gradient at the projected weights and applies it to the latent ones (BinaryConnect, Courbariaux
et al. 2015): 56.1 % at one epoch with half, 60.9 % with all of them (25.0 % with none; pow2,
4-bit and other nets: within 0.5 pt either way, or better).

At the end the constrained weights are replaced by their projection (exactly representable), the
activations are re-calibrated on the quantized network and the QuantModel is exported with
those (Q, a).  Activation fake quantization is on during the W-step so the network also adapts
to 8-bit activations.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn as nn

from .. import task
from ..data import Dataset
from ..errors import EdgepruneError
from ..train import batches
from .ptq import IRNet, calibrate, extract, qconfig_for, to_qmodel
from .qmodel import QuantModel
from .wquant import project


def default_layer_formats(net: IRNet, fmt: str, bits: int, keep_first_last: bool = True
                          ) -> dict[str, tuple[str, int]]:
    """fmt/bits for every weight layer; the first and last stay 8-bit (tiny, most sensitive)."""
    names = [n.name for n in net.weight_nodes()]
    cfg = {n: (fmt, bits) for n in names}
    if keep_first_last and len(names) > 2:
        cfg[names[0]] = ("int", 8)
        cfg[names[-1]] = ("int", 8)
    return cfg


def admm_train(net: IRNet, data: Dataset, layer_formats: dict[str, tuple[str, int]],
               ranges: dict[str, tuple[float, float]] | None = None, epochs: float = 2.0,
               lr: float = 0.01, rho: float = 1e-3, rho_growth: float = 1.3,
               admm_every: int = 100, batch_size: int = 64, max_samples: int | None = None,
               seed: int = 0, progress: Callable[[float, float], None] | None = None,
               straight_through: float = 0.5) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Run ADMM on `net` in place; returns {layer: (Q int8, a (O,))} for the constrained layers.

    Layers whose format is ("int", 8) are trained freely (no constraint).  rho grows by
    `rho_growth` at every G-step so the weights are driven onto the quantized set.  The last
    `straight_through` of the steps train at the projected weights instead (see the module
    docstring).
    """
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    constrained = {k: v for k, v in layer_formats.items() if v != ("int", 8)}
    for k in constrained:
        if k not in net.weight:
            raise EdgepruneError(f"ADMM: no weight layer named '{k}'")
    if ranges is not None:
        net.qconfig = {"act": qconfig_for(net, ranges)["act"], "weight_bits": {}}
    params = list(net.parameters())
    g_q: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    G: dict[str, torch.Tensor] = {}
    U: dict[str, torch.Tensor] = {}

    def g_step():
        for k, (fmt, bits) in constrained.items():
            v = (net.weight[k].detach() + U[k]).double().numpy()
            prev = g_q[k][1] if k in g_q else None
            q, a = project(v, fmt, bits, scale=prev) if prev is not None else project(v, fmt, bits)
            g_q[k] = (q, a)
            G[k] = torch.from_numpy(a.reshape((-1,) + (1,) * (v.ndim - 1)) * q).float()

    for k in constrained:
        U[k] = torch.zeros_like(net.weight[k])
    g_step()

    x, y = data.x_train, data.y_train
    if max_samples:
        x, y = x[:max_samples], y[:max_samples]
    steps_per_epoch = (len(x) + batch_size - 1) // batch_size
    total = max(1, int(round(epochs * steps_per_epoch)))
    step, epoch = 0, 0
    cur_rho = rho
    scale = task.loss_scale(y)   # as train() fine-tunes: MSE / the targets' variance

    def grads(xb, yb):
        loss = task.loss(net(xb), yb) * scale
        for k in constrained:
            loss = loss + cur_rho / 2 * ((net.weight[k] - G[k] + U[k]) ** 2).sum()
        net.zero_grad()
        loss.backward()
        return float(loss.detach())

    from ..prune.patterns import held_patterns
    hold = held_patterns(net)   # pruned taps and kernel tiles stay pruned (as in train)
    ste_from = int(round(total * (1 - straight_through)))

    def w_step(xb, yb, cur_lr):
        saved = [p.detach().clone() for p in params]
        grads(xb, yb)                                          # extra-gradient: predictor
        with torch.no_grad():
            for p in params:
                if p.grad is not None:
                    p -= cur_lr * p.grad
        loss = grads(xb, yb)                                   # corrector at W~
        with torch.no_grad():
            for p, s in zip(params, saved):
                if p.grad is not None:
                    p.copy_(s - cur_lr * p.grad)
        return loss

    def straight_through_step(xb, yb, cur_lr):
        latent = {k: net.weight[k].detach().clone() for k in constrained}
        with torch.no_grad():
            for k, (fmt, bits) in constrained.items():
                q, a = project(latent[k].double().numpy(), fmt, bits, scale=g_q[k][1])
                g_q[k] = (q, a)
                net.weight[k].copy_(torch.from_numpy(
                    a.reshape((-1,) + (1,) * (q.ndim - 1)) * q).float())
        loss = task.loss(net(xb), yb) * scale
        net.zero_grad()
        loss.backward()
        with torch.no_grad():
            for k in constrained:
                net.weight[k].copy_(latent[k])
            for p in params:
                if p.grad is not None:
                    p -= cur_lr * p.grad
        return float(loss.detach())

    net.train()
    try:
        while step < total:
            for xb, yb in batches(x, y, batch_size, shuffle=True, seed=seed + epoch):
                cur_lr = lr * 0.5 * (1 + np.cos(np.pi * step / total))
                step_fn = w_step if step < ste_from else straight_through_step
                loss = step_fn(xb, yb, cur_lr)
                if hold is not None:
                    hold()
                step += 1
                if step <= ste_from and (step % admm_every == 0 or step == ste_from):
                    with torch.no_grad():
                        g_step()
                        for k in constrained:
                            U[k] += net.weight[k].detach() - G[k]
                    cur_rho *= rho_growth
                if progress is not None and (step % 50 == 0 or step == total):
                    progress(step / total, loss)
                if step >= total:
                    break
            epoch += 1
    finally:
        net.qconfig = None
        net.eval()
    # final hard projection of W itself (not W + U): the deployed weights
    out = {}
    with torch.no_grad():
        for k, (fmt, bits) in constrained.items():
            w = net.weight[k].detach().double().numpy()
            q, a = project(w, fmt, bits, scale=g_q[k][1])
            q2, a2 = project(w, fmt, bits)
            e1 = ((w - a.reshape((-1,) + (1,) * (w.ndim - 1)) * q) ** 2).sum()
            e2 = ((w - a2.reshape((-1,) + (1,) * (w.ndim - 1)) * q2) ** 2).sum()
            if e2 < e1:
                q, a = q2, a2
            out[k] = (q, a)
            net.weight[k].copy_(torch.from_numpy(a.reshape((-1,) + (1,) * (w.ndim - 1)) * q))
    return out


def quantize_admm(model: nn.Module, input_shape: tuple[int, ...], data: Dataset,
                  calib_x: np.ndarray, fmt: str = "pow2", bits: int = 4, epochs: float = 2.0,
                  lr: float = 0.01, rho: float = 1e-3, calib_method: str = "minmax",
                  layer_formats: dict[str, tuple[str, int]] | None = None,
                  act_dtypes: dict[str, str] | None = None, max_samples: int | None = None,
                  progress: Callable[[float, float], None] | None = None) -> QuantModel:
    """ADMM low-bit training and export.  fmt: "pow2" | "ternary" | "int" (with bits 4/2)."""
    net = extract(model, input_shape)
    ranges = calibrate(net, calib_x, calib_method)
    cfg = layer_formats or default_layer_formats(net, fmt, bits)
    qw = admm_train(net, data, cfg, ranges, epochs, lr, rho, max_samples=max_samples,
                    progress=progress)
    ranges = calibrate(net, calib_x, calib_method)      # activations of the quantized network
    return to_qmodel(net, ranges, cfg, act_dtypes, quantized_weights=qw,
                     meta={"method": f"admm-{fmt}{bits if fmt == 'int' else ''}",
                           "admm_epochs": epochs, "rho": rho, "calibration": calib_method,
                           "calibration_samples": int(len(calib_x))})
