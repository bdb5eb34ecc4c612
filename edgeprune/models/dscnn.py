import torch.nn as nn

from .cnn import conv_bn_relu


class DSCNN(nn.Module):
    """MLPerf Tiny keyword-spotting DS-CNN: a strided stem and four depthwise-separable blocks."""

    def __init__(self, in_channels: int = 1, num_classes: int = 12, width: int = 64, blocks: int = 4):
        super().__init__()
        layers = [nn.Conv2d(in_channels, width, (10, 4), (2, 2), (5, 1), bias=False),
                  nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
        for _ in range(blocks):
            layers += [conv_bn_relu(width, width, 3, groups=width), conv_bn_relu(width, width, 1)]
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x):
        return self.fc(self.pool(self.features(x)).flatten(1))
