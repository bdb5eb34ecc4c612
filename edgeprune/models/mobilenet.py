import torch.nn as nn

from .cnn import conv_bn_relu

# (output channels at width 1.0, stride) of MobileNetV1's depthwise-separable blocks.
_BLOCKS = [(64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2),
           (512, 1), (512, 1), (512, 1), (512, 1), (512, 1), (1024, 2), (1024, 1)]


class MobileNetV1(nn.Module):
    """MobileNetV1 with a width multiplier (0.25 by default, as in MLPerf Tiny visual wake words)."""

    def __init__(self, in_channels: int = 3, num_classes: int = 2, alpha: float = 0.25):
        super().__init__()
        c = int(32 * alpha)
        layers = [conv_bn_relu(in_channels, c, 3, 2)]
        for cout, stride in _BLOCKS:
            cout = int(cout * alpha)
            layers += [conv_bn_relu(c, c, 3, stride, groups=c), conv_bn_relu(c, cout, 1)]
            c = cout
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x):
        return self.fc(self.pool(self.features(x)).flatten(1))
