"""CIFAR ResNet-18 as used by the seed papers: 3×3 stem, no max-pool, 4 stages of BasicBlocks.

11,173,962 parameters for 3×32×32 inputs and 10 classes. Weight names follow the common CIFAR
ResNet layout (conv1, bn1, layer1.0.conv1, ..., linear) so public checkpoints map onto it.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from advdef.models.base import Tap, stage_taps
from advdef.registry import MODELS


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )
        # Activations are modules, not F.relu, so a defense can swap them (`smooth`).
        self.relu1 = nn.ReLU()
        self.relu2 = nn.ReLU()
        self.tap = Tap()

    def forward(self, x):
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.tap(self.relu2(out + self.shortcut(x)))


class CifarResNet(nn.Module):
    def __init__(self, blocks: list[int], in_channels: int, num_classes: int, width: int = 64) -> None:
        super().__init__()
        self.in_planes = width
        self.conv1 = nn.Conv2d(in_channels, width, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        self.stem_tap = Tap()
        self.layer1 = self._stage(width, blocks[0], 1)
        self.layer2 = self._stage(2 * width, blocks[1], 2)
        self.layer3 = self._stage(4 * width, blocks[2], 2)
        self.layer4 = self._stage(8 * width, blocks[3], 2)
        self.linear = nn.Linear(8 * width, num_classes)
        self.feature_channels = {f"layer{i + 1}": width * 2**i for i in range(4)}

    def _stage(self, planes: int, count: int, stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (count - 1):
            layers.append(BasicBlock(self.in_planes, planes, s))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def insertion_points(self) -> dict[str, Tap]:
        """`stem`: relu(bn1(conv1(x))) entering layer1; `layerK.i`: output of block i of stage K
        (after its final ReLU); `layerK`: the stage's last block; `final`: the features entering
        global pooling (= `layer4`)."""
        points = {"stem": self.stem_tap}
        points.update(stage_taps({f"layer{i}": getattr(self, f"layer{i}") for i in range(1, 5)}))
        points["final"] = points["layer4"]
        return points

    def forward(self, x):
        out = self.stem_tap(self.relu(self.bn1(self.conv1(x))))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


@MODELS.register("resnet18")
def resnet18(*, in_channels: int = 3, num_classes: int = 10, width: int = 64) -> CifarResNet:
    """CIFAR ResNet-18 of the seed papers (3x3 stem, no max-pool); 11.2M params at width 64."""
    if width < 1:
        raise ValueError(f"width must be positive, got {width}")
    return CifarResNet([2, 2, 2, 2], in_channels, num_classes, width)
