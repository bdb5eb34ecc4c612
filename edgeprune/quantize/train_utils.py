"""Small training helpers shared by the quantizer's tests, QAT/ADMM and the bench."""

from __future__ import annotations

import torch
import torch.nn as nn

from ..data import Dataset
from ..train import train


def quick_train(model: nn.Module, data: Dataset, samples: int = 6000, epochs: float = 1.0,
                lr: float = 0.05, seed: int = 0) -> nn.Module:
    """Briefly train a float model on the first `samples` training images (tests, smoke runs)."""
    torch.set_num_threads(1)
    return train(model, data, epochs=epochs, lr=lr, batch_size=64, seed=seed, max_samples=samples)
