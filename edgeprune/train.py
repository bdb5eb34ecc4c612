"""Training and evaluation loops shared by every stage that touches weights."""

import math
import time
from collections.abc import Callable

import numpy as np
import torch
import torch.nn as nn

from . import task
from .data import Dataset


DEFAULT_SAMPLES = 20_000   # what training with no epochs given sees at least


def default_epochs(n_samples: int) -> float:
    """Epochs when none are given: one, or on a small dataset as many as it takes to see
    DEFAULT_SAMPLES samples (one epoch of 400 ECG beats is 7 steps: nothing is learnt)."""
    return float(max(1, math.ceil(DEFAULT_SAMPLES / max(n_samples, 1))))


def batches(x: np.ndarray, y: np.ndarray, batch_size: int, shuffle: bool, seed: int = 0):
    idx = np.random.default_rng(seed).permutation(len(x)) if shuffle else np.arange(len(x))
    for i in range(0, len(x), batch_size):
        j = idx[i:i + batch_size]
        yield torch.from_numpy(x[j]), torch.from_numpy(y[j])


def evaluate(model: nn.Module, x: np.ndarray, y: np.ndarray, batch_size: int = 500) -> float:
    """Top-1 accuracy in percent (R² in percent on regression targets: edgeprune.task)."""
    model.eval()
    outs = []
    with torch.no_grad():
        for xb, _ in batches(x, y, batch_size, shuffle=False):
            outs.append(model(xb).reshape(len(xb), -1).numpy())
    return task.score(np.concatenate(outs) if outs else np.zeros((0, 1)), y)


def train(model: nn.Module, data: Dataset, epochs: float = 1.0, lr: float = 0.01,
          batch_size: int = 64, seed: int = 0, max_samples: int | None = None,
          extra_loss: Callable[[nn.Module], torch.Tensor] | None = None,
          after_step: Callable[[nn.Module], None] | None = None,
          progress: Callable[[float, float], None] | None = None,
          onednn: bool = False, from_scratch: bool = False,
          loss: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None
          ) -> nn.Module:
    """SGD with momentum and a cosine schedule; `epochs` may be fractional.

    oneDNN is off unless `onednn`: torch 2.13's oneDNN conv backward aborts the process
    ("double free or corruption") on some pruned widths (ResNet-8 at 7/15/30 channels); the
    native kernels are ~1.5x slower, so only callers training known-good widths turn it on.

    `extra_loss` adds a regulariser (sparsity penalties, ADMM terms); `after_step` runs after
    each optimiser step (masking, projection); `progress(fraction, loss)` reports progress.
    Conv window taps that are zero in every filter (an intra-kernel pattern) stay zero.
    `loss(logits, x, y)` replaces task.loss (cross-entropy, or MSE on regression targets),
    e.g. distillation from a teacher.

    On regression targets the loss is multiplied by task.loss_scale (MSE / the targets'
    variance): a trained model's outputs are at its targets' scale, and its hidden layers'
    gradients shrink with the square of the targets' units. `from_scratch` keeps the plain
    MSE: an untrained model's outputs are not at that scale, and on small targets the scaled
    loss diverges (NaN from 2 epochs at 0.01 on targets of std 0.03).
    """
    from .prune.patterns import held_patterns
    hold = held_patterns(model)   # pruned taps and kernel tiles stay pruned
    if hold is not None:
        user_step = after_step

        def after_step(m):
            if user_step is not None:
                user_step(m)
            hold()
    was = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = onednn
    try:
        return _train(model, data, epochs, lr, batch_size, seed, max_samples, extra_loss,
                      after_step, progress, loss, from_scratch)
    finally:
        torch.backends.mkldnn.enabled = was


def train_or_retry(model: nn.Module, data: Dataset, lr: float, retries: int = 2,
                   **kw) -> float:
    """train(), but where it ends at a higher loss than it began on the first 256 training
    samples (a rate too large for this model: its ReLUs died, a regression blew up; seen on
    TFLite Micro's sine MLP at 0.01), again from the same start at a tenth of the rate, up to
    `retries` times; the model as it began if none holds. Returns the rate that held (0.0:
    none)."""
    import copy

    loss_fn = kw.get("loss") or (lambda out, xb, yb: task.loss(out, yb))
    n = min(256, kw.get("max_samples") or len(data.x_train))
    x, y = torch.from_numpy(data.x_train[:n]), torch.from_numpy(data.y_train[:n])

    def probe() -> float:
        model.eval()
        with torch.no_grad():
            return float(loss_fn(model(x), x, y))
    start, before = copy.deepcopy(model.state_dict()), probe()
    for _ in range(retries + 1):
        train(model, data, lr=lr, **kw)
        if probe() <= before * 1.01:
            return lr
        model.load_state_dict(start)
        lr /= 10
    model.eval()
    return 0.0


def _train(model, data, epochs, lr, batch_size, seed, max_samples, extra_loss, after_step,
           progress, loss_of=None, from_scratch=False) -> nn.Module:
    torch.manual_seed(seed)
    x, y = data.x_train, data.y_train
    if max_samples:
        x, y = x[:max_samples], y[:max_samples]
    steps_per_epoch = (len(x) + batch_size - 1) // batch_size
    total = max(1, int(round(epochs * steps_per_epoch)))
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, total)
    loss_fn = loss_of or (lambda out, xb, yb: task.loss(out, yb))
    scale = 1.0 if from_scratch else task.loss_scale(y)   # see train()
    step, epoch = 0, 0
    model.train()
    while step < total:
        for xb, yb in batches(x, y, batch_size, shuffle=True, seed=seed + epoch):
            loss = loss_fn(model(xb), xb, yb) * scale
            if extra_loss is not None:
                loss = loss + extra_loss(model)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            if after_step is not None:
                after_step(model)
            step += 1
            if progress is not None and (step % 50 == 0 or step == total):
                progress(step / total, float(loss.detach()))
            if step >= total:
                break
        epoch += 1
    return model.eval()


def timed(fn, *args, **kwargs):
    t = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t
