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
    torch.manual_seed(seed)
    model = ctor(in_channels=shape[1], num_classes=num_classes)
    return model.eval(), shape
