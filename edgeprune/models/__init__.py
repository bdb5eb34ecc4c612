"""The built-in model zoo: small networks in the MLPerf Tiny style, by name."""

from collections.abc import Callable

import torch.nn as nn

from .cnn import SmallCNN
from .dscnn import DSCNN
from .mobilenet import MobileNetV1
from .resnet8 import ResNet8

# name -> (constructor, default input shape NCHW). Shapes default to Fashion-MNIST (1x28x28)
# where the topology allows, so every zoo model trains on the product's default data.
ZOO: dict[str, tuple[Callable[..., nn.Module], tuple[int, ...]]] = {
    "cnn": (SmallCNN, (1, 1, 28, 28)),
    "resnet8": (ResNet8, (1, 1, 28, 28)),
    "dscnn": (DSCNN, (1, 1, 49, 10)),
    "mobilenet": (MobileNetV1, (1, 3, 48, 48)),
}


def zoo_names() -> list[str]:
    return sorted(ZOO)


def build(name: str, input_shape: tuple[int, ...] | None = None, num_classes: int = 10,
          seed: int = 0) -> tuple[nn.Module, tuple[int, ...]]:
    """A freshly initialised zoo model and the input shape it is built for."""
    import torch

    from ..errors import EdgepruneError

    if name not in ZOO:
        raise EdgepruneError(f"unknown zoo model '{name}'; known: {', '.join(zoo_names())}")
    ctor, default_shape = ZOO[name]
    shape = tuple(input_shape) if input_shape else default_shape
    if len(shape) == 3:
        # the zoo's convs are 2-D: samples without a channel axis are grey images (1, H, W)
        # (Keras' mnist.npz); a few rows are the channels of signals, lifted to (C, 1, L)
        shape = (shape[0], 1) + shape[1:] if shape[1] > 4 else shape[:2] + (1, shape[2])
    if len(shape) != 4:
        raise EdgepruneError(f"zoo model '{name}' takes images (C, H, W) or signals (C, L); "
                             f"the data's samples are {list(shape[1:])}")
    torch.manual_seed(seed)
    model = ctor(in_channels=shape[1], num_classes=num_classes)
    return model.eval(), shape
