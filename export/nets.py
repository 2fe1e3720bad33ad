"""LeNet-5 and ZFNet, written from the lecture notes' layer tables (neither ships in torchvision or timm).

LeNet-5: 32x32x1 input, conv 6@5x5, pool, conv 16@5x5, pool, FC 120, 84, 10.
ZFNet: AlexNet with conv1 96@7x7 stride 2 (was 11x11 stride 4) and conv3/4/5 depths 512, 1024, 512
(were 384, 384, 256).
"""

from __future__ import annotations

import torch
from torch import nn


class LeNet5(nn.Module):
    """LeNet-5 with ReLU and max pooling (the modern reading of the original tanh / subsampling layers)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 6, kernel_size=5),  # 32 -> 28
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),  # 28 -> 14
            nn.Conv2d(6, 16, kernel_size=5),  # 14 -> 10
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),  # 10 -> 5
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(16 * 5 * 5, 120),
            nn.ReLU(inplace=True),
            nn.Linear(120, 84),
            nn.ReLU(inplace=True),
            nn.Linear(84, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class ZFNet(nn.Module):
    """ZFNet (Zeiler & Fergus, 2013): AlexNet's layout with a smaller, denser first layer and wider conv3-5.

    An adaptive average pool before the classifier (as torchvision's AlexNet has) keeps the 6x6x512 feature
    map at 224x224 and lets smaller inputs through too.
    """

    def __init__(self, num_classes: int = 1000, dropout: float = 0.5) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 96, kernel_size=7, stride=2, padding=1),  # 224 -> 110
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2, padding=1),  # -> 55
            nn.Conv2d(96, 256, kernel_size=5, stride=2),  # -> 26
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2, padding=1),  # -> 13
            nn.Conv2d(256, 512, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(512, 1024, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(1024, 512, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),  # -> 6
        )
        self.avgpool = nn.AdaptiveAvgPool2d((6, 6))
        self.classifier = nn.Sequential(
            nn.Dropout(p=dropout),
            nn.Linear(512 * 6 * 6, 4096),
            nn.ReLU(inplace=True),
            nn.Dropout(p=dropout),
            nn.Linear(4096, 4096),
            nn.ReLU(inplace=True),
            nn.Linear(4096, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))
