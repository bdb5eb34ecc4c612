"""What a model is judged on, read from its labels: integer class labels (top-1 accuracy,
cross-entropy) or float regression targets shaped like the model's output (an autoencoder's
reconstruction, a regressor's values: R² in percent, mean squared error). Labels 0/1 against
one output per sample are a binary classifier's: a logit (or a sigmoid's probability) scored
at 0 (0.5), trained with binary cross-entropy.

Every stage asks here, so "accuracy" in reports, the quantizer's --max-drop, the mixed-precision
sensitivity and the feedback search's ranking all read a higher-is-better percentage either way:
top-1 accuracy, or R² = 1 - SSE / the targets' total variance (100 is exact, 0 is no better
than predicting the mean).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def is_regression(y) -> bool:
    if isinstance(y, torch.Tensor):
        return y.is_floating_point()
    return np.issubdtype(np.asarray(y).dtype, np.floating)


def metric_name(y) -> str:
    return "R²" if is_regression(y) else "accuracy"


def score(outputs: np.ndarray, y: np.ndarray) -> float:
    """Higher-is-better percentage of `outputs` (one row per sample) against `y`: top-1
    accuracy of the class scores, or R² of the regression targets over the whole set."""
    y = np.asarray(y)
    n = len(outputs)
    if n == 0:
        return 0.0
    out = np.asarray(outputs, np.float64).reshape(n, -1)
    # a count times 100 over n: one rounding, so 1763 of 2000 reads 88.15, not 88.14999999999999
    if not is_regression(y) and out.shape[1] == 1:
        return 100.0 * int(((binary_logits(out) > 0) == y[:n]).sum()) / n
    if not is_regression(y):
        return 100.0 * int((out.argmax(1) == y[:n]).sum()) / n
    target = y[:n].reshape(n, -1).astype(np.float64)
    total = float(((target - target.mean(0)) ** 2).sum())
    return 100.0 * (1.0 - float(((out - target) ** 2).sum()) / max(total, 1e-30))


def constant_score(y: np.ndarray) -> float:
    """The score of the best constant prediction: the commonest class's share, or 0 (R² of
    the targets' mean). A model scoring about this has learnt nothing."""
    y = np.asarray(y)
    if is_regression(y) or len(y) == 0:
        return 0.0
    return 100.0 * float(np.bincount(y.astype(np.int64)).max() / len(y))


def loss_scale(y) -> float:
    """What a fine-tuning loss is multiplied by (train()): 1 for labels; for regression
    targets, 1 over their variance (per output across samples, averaged: R²'s denominator), so
    the scaled MSE is 1 - R² and the fine-tuning rate tuned on classifiers is not slowed by
    small target units (a super-resolution net on [0, 1] pixels, MSE ~0.01: R² 33 % after a
    cut and 0.3 epochs of fine-tuning unscaled, 77 % scaled)."""
    if not is_regression(y) or len(y) < 2:
        return 1.0
    y = np.asarray(y[:10000], np.float64)   # plenty for a variance; bounds the copy
    v = y.reshape(len(y), -1).var(0).mean()
    return float(1.0 / v) if v > 0 else 1.0


def loss(out: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """The training loss: mean squared error on regression targets, else cross-entropy of the
    class scores: logits, or the probabilities of a model that ends in a softmax (every row
    non-negative and summing to 1), whose log is taken instead (cross-entropy on probabilities
    as logits barely trains)."""
    if y.is_floating_point():
        per = F.mse_loss(out.reshape(len(y), -1), y.reshape(len(y), -1), reduction="none")
        per = per.mean(1)
        return per.sum() if reduction == "sum" else per if reduction == "none" else per.mean()
    out = out.reshape(len(y), -1)   # class scores with trailing unit axes: (N, K, 1, 1)
    if out.shape[1] == 1:
        return F.binary_cross_entropy_with_logits(binary_logits(out), y.to(out.dtype),
                                                  reduction=reduction)
    if out.shape[1] > 1 and bool((out >= 0).all()) and torch.allclose(
            out.detach().sum(1), torch.ones((), dtype=out.dtype), atol=1e-4):
        return F.nll_loss(torch.log(out.clamp_min(1e-12)), y, reduction=reduction)
    return F.cross_entropy(out, y, reduction=reduction)


def binary_logits(out):
    """(N, 1) outputs of a binary classifier as (N,) logits: a sigmoid's probabilities (every
    value within [0, 1]) mapped back, so one threshold (0) and one loss serve both."""
    v = out.reshape(-1)
    if isinstance(v, torch.Tensor):
        if bool(((v >= 0) & (v <= 1)).all()):
            return torch.logit(v.clamp(1e-6, 1 - 1e-6))
        return v
    if np.all((v >= 0) & (v <= 1)):
        v = np.clip(v, 1e-6, 1 - 1e-6)
        return np.log(v / (1 - v))
    return v


def numpy_loss(outputs: np.ndarray, y: np.ndarray) -> float:
    """`loss` (mean) of float outputs in numpy: what ranks quantized candidates."""
    n = len(outputs)
    out = np.asarray(outputs, np.float64).reshape(n, -1)
    if is_regression(y):
        return float(((out - np.asarray(y, np.float64).reshape(n, -1)) ** 2).mean())
    if out.shape[1] == 1:
        z, t = binary_logits(out), np.asarray(y, np.float64)[:n]
        return float((np.maximum(z, 0) - z * t + np.log1p(np.exp(-np.abs(z)))).mean())
    shifted = out - out.max(1, keepdims=True)
    log_p = shifted - np.log(np.exp(shifted).sum(1, keepdims=True))
    return float(-log_p[np.arange(n), np.asarray(y, np.int64)].mean())


def check_outputs(out_shape: tuple[int, ...], data) -> None:
    """The model's output fits what `data` judges it on: class scores (N, K) for K classes
    (K or more; or K with unit axes around, as a conv classifier's (N, K, 1, 1)), or as many
    values per sample as the regression targets have."""
    from .errors import EdgepruneError
    y = data.y_test
    if is_regression(y):
        want = int(np.prod(y.shape[1:], dtype=np.int64))
        if int(np.prod(out_shape[1:], dtype=np.int64)) != want:
            labels = y.ndim == 1 and bool(np.all(y == np.round(y))) and y.min() >= 0
            hint = ("; float targets are regression targets: store class labels as integers "
                    "(y.astype(int))") if labels else ""
            raise EdgepruneError(f"the model's output is {list(out_shape)}; the regression "
                                 f"targets of {data.name} are {list(y.shape[1:])} per sample "
                                 f"({want} values){hint}")
    elif [d for d in out_shape[1:] if d != 1][:2] not in ([data.num_classes],) and not (
            len(out_shape) == 2 and out_shape[1] >= data.num_classes) and not (
            data.num_classes == 2 and int(np.prod(out_shape[1:])) == 1):   # one logit
        one = int(np.prod(out_shape[1:])) == 1
        lowest = min(int(v.min()) for v in (data.y_train, y) if v is not None and len(v))
        hint = (f"; one output is a binary classifier on labels 0/1 only (these run "
                f"{int(y.min())}..{int(y.max())}), or a regressor on float targets "
                f"(y.astype(np.float32))") if one else ""
        if not one and lowest >= 1 and int(np.prod(out_shape[1:])) == data.num_classes - 1:
            hint = (f"; the labels run {lowest}..{data.num_classes - 1} (as the UCR archive "
                    "numbers classes): classes are 0..K-1, store y - 1")
        raise EdgepruneError(f"the model's output is {list(out_shape)}; accuracy on {data.name} "
                             f"needs class scores (N, {data.num_classes}), or (N, "
                             f"{data.num_classes}, 1, 1) and the like{hint}")
