"""SmallCNN: a ~0.5M-parameter CNN that trains at CPU speed, for quick runs and tests."""

from __future__ import annotations

from torch import nn

from advdef.models.base import Tap
from advdef.registry import MODELS


def conv_bn(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class SmallCNN(nn.Module):
    """Two conv-BN-ReLU blocks (32-64, 128-128) with max-pooling, then a 128-unit MLP head.

    BatchNorm makes it train in a few epochs on small data, which quick runs need.
    """

    def __init__(self, in_channels: int, num_classes: int, width: int = 32) -> None:
        super().__init__()
        w = width
        self.block1 = nn.Sequential(conv_bn(in_channels, w), conv_bn(w, 2 * w), nn.MaxPool2d(2))
        self.tap1 = Tap()
        self.block2 = nn.Sequential(conv_bn(2 * w, 4 * w), conv_bn(4 * w, 4 * w), nn.MaxPool2d(2))
        self.tap2 = Tap()
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(4 * w * 16, 128), nn.ReLU(inplace=True), nn.Linear(128, num_classes)
        )
        self.feature_channels = {"block1": 2 * w, "block2": 4 * w}

    def insertion_points(self) -> dict[str, Tap]:
        return {"block1": self.tap1, "block2": self.tap2}

    def forward(self, x):
        x = self.tap1(self.block1(x))
        x = self.tap2(self.block2(x))
        return self.head(self.pool(x))


@MODELS.register("smallcnn")
def smallcnn(*, in_channels: int = 3, num_classes: int = 10, width: int = 32) -> SmallCNN:
    """Small 4-conv CNN (0.5M params at width 32): fast on CPU, for quick presets and tests."""
    if width < 1:
        raise ValueError(f"width must be positive, got {width}")
    return SmallCNN(in_channels, num_classes, width)
