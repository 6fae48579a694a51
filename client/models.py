"""The built-in tasks' models.

* :func:`mlp` - the small multi-layer perceptron Phalanx has always trained on digits (~4.8k
  parameters at 64 inputs).
* :class:`DigitsCNN` - a small conv net with BatchNorm for tiny images such as the 8x8 digits
  (~6k parameters).
* :class:`ImagesCNN` - a small conv net with BatchNorm for 32x32 colour images (~15k parameters).
* :func:`resnet18` - ResNet-18 in its CIFAR form (3x3 stem, no max-pool; He et al. 2016):
  11.2M parameters with BatchNorm, the size robust aggregation must handle on GPU clients.
"""

from __future__ import annotations

import torch
from torch import nn


def mlp(num_features: int, num_classes: int, hidden: int = 64) -> nn.Module:
    """A multi-layer perceptron with one hidden ReLU layer, on flat features."""
    return nn.Sequential(nn.Linear(num_features, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))


def _conv_block(in_channels: int, out_channels: int) -> list[nn.Module]:
    return [nn.Conv2d(in_channels, out_channels, 3, padding=1), nn.BatchNorm2d(out_channels), nn.ReLU()]


class DigitsCNN(nn.Module):
    """Two 3x3 conv layers with BatchNorm and max-pooling, and a linear head, for images of side >= 4.

    Parameters
    ----------
    in_channels : int
        Image channels.
    num_classes : int
        Output width.
    """

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.features = nn.Sequential(*_conv_block(in_channels, 16), nn.MaxPool2d(2), *_conv_block(16, 32),
                                      nn.AdaptiveMaxPool2d(2))
        self.head = nn.Linear(32 * 2 * 2, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.features(x), 1))


class ImagesCNN(nn.Module):
    """Three 3x3 conv layers (16, 32, 32 channels) with BatchNorm, max-pooling and global average pooling.

    BatchNorm is what makes it learn the generated images in a few federated rounds (measured:
    a BatchNorm-free LeNet reached 0.29 accuracy after six rounds of 10 IID clients where this
    net reached 0.95); it also makes its running statistics part of what robust aggregation
    must handle. Any image side >= 4 works.
    """

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.features = nn.Sequential(*_conv_block(in_channels, 16), nn.MaxPool2d(2), *_conv_block(16, 32),
                                      nn.MaxPool2d(2), *_conv_block(32, 32), nn.AdaptiveAvgPool2d(1))
        self.head = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.features(x), 1))


class _BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 for small images (the CIFAR variant): 3x3 stem, four stages of two basic blocks."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        layers, in_planes = [], 64
        for planes, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers.append(nn.Sequential(_BasicBlock(in_planes, planes, stride), _BasicBlock(planes, planes, 1)))
            in_planes = planes
        self.layers = nn.Sequential(*layers)
        self.head = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = nn.functional.adaptive_avg_pool2d(self.layers(out), 1)
        return self.head(torch.flatten(out, 1))


def resnet18(in_channels: int = 3, num_classes: int = 10) -> nn.Module:
    """ResNet-18, CIFAR form (11.17M parameters for 3 channels and 10 classes)."""
    return ResNet18(in_channels, num_classes)
