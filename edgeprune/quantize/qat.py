"""Quantization-aware fine-tuning: fake quantization with a straight-through estimator.

The IRNet's fake-quant points sit exactly where the integer model rounds: the input, every
conv/dense/add/avgpool output (after its fused activation, with the calibrated scale and zero
point) and every conv/dense weight (per-channel symmetric max-abs, as `to_qmodel` does for 8-bit).
Rounding uses floor(x/s + 0.5), the same half-up rule as the integer requantization.
Activation ranges stay fixed at their calibrated values, so the exported QuantModel uses the very
scales the network was fine-tuned for.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn as nn

from ..data import Dataset
from ..train import train
from .ptq import IRNet, calibrate, extract, qconfig_for, to_qmodel
from .qmodel import QuantModel


def qat_finetune(net: IRNet, data: Dataset, ranges: dict[str, tuple[float, float]],
                 epochs: float = 1.0, lr: float = 0.005, act_dtypes: dict[str, str] | None = None,
                 weight_bits: int | None = 8, max_samples: int | None = None, seed: int = 0,
                 progress: Callable[[float, float], None] | None = None) -> IRNet:
    """Fine-tune `net` in place with fake quantization on; returns it (fake quant off)."""
    torch.set_num_threads(1)
    net.qconfig = qconfig_for(net, ranges, act_dtypes, weight_bits)
    try:
        train(net, data, epochs=epochs, lr=lr, seed=seed, max_samples=max_samples,
              progress=progress)
    finally:
        net.qconfig = None
    return net.eval()


def fake_quant_accuracy(net: IRNet, ranges, x: np.ndarray, y: np.ndarray,
                        act_dtypes: dict[str, str] | None = None, weight_bits: int | None = 8,
                        batch_size: int = 500) -> float:
    """Accuracy of the fake-quantized float network (a fast stand-in for the integer model)."""
    from ..task import score
    saved = net.qconfig
    net.qconfig = qconfig_for(net, ranges, act_dtypes, weight_bits)
    try:
        net.eval()
        with torch.no_grad():
            outs = [net(torch.from_numpy(x[i:i + batch_size])).reshape(
                min(batch_size, len(x) - i), -1).numpy() for i in range(0, len(x), batch_size)]
    finally:
        net.qconfig = saved
    return score(np.concatenate(outs) if outs else np.zeros((0, 1)), y)


def quantize_qat(model: nn.Module, input_shape: tuple[int, ...], data: Dataset,
                 calib_x: np.ndarray, epochs: float = 1.0, lr: float = 0.005,
                 calib_method: str = "minmax", act_dtypes: dict[str, str] | None = None,
                 max_samples: int | None = None,
                 progress: Callable[[float, float], None] | None = None) -> QuantModel:
    """PTQ calibration, then QAT fine-tuning, then export (int8 weights and activations)."""
    net = extract(model, input_shape)
    ranges = calibrate(net, calib_x, calib_method)
    qat_finetune(net, data, ranges, epochs, lr, act_dtypes, 8, max_samples, progress=progress)
    return to_qmodel(net, ranges, act_dtypes=act_dtypes,
                     meta={"method": "qat", "calibration": calib_method,
                           "calibration_samples": int(len(calib_x)), "qat_epochs": epochs})
