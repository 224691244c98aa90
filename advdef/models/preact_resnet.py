"""CIFAR PreAct ResNet-18: 3×3 stem, no max-pool, 4 stages of pre-activation blocks, final BN-ReLU.

The pre-activation ordering (BN -> ReLU -> conv inside each block) is the variant the AT
literature uses most (Rice et al.'s robust-overfitting baseline, feature-denoising CIFAR runs).
11,172,170 parameters for 3×32×32 inputs and 10 classes. Weight names follow the common public
layout (conv1, layer1.0.bn1, layer1.0.conv1, ..., layer2.0.shortcut.0, bn, linear) so public
checkpoints map onto it; the taps are parameter-free and add no state_dict keys.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from advdef.models.base import Tap, stage_taps
from advdef.registry import MODELS


class PreActBlock(nn.Module):
    """BN-ReLU-conv3×3 twice plus a shortcut; the sum is not activated (the next block does it).

    Two taps: `preact_tap` on relu(bn1(x)) where it enters conv1 (the residual branch only) and
    `tap` on the block output. A downsampling block's 1×1 shortcut conv reads the same
    relu(bn1(x)) — but the *untransformed* one: a defense attached to `preact_tap` reweights only
    the residual branch, as for the identity-shortcut blocks, so the preact taps mean the same
    thing in every block.
    """

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.shortcut: nn.Sequential | None = None
        if stride != 1 or in_planes != planes:
            # A bare 1×1 conv (no BN) on the pre-activated input, as in the public layout.
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False))
        # Activations are modules, not F.relu, so a defense can swap them (`smooth`).
        self.relu1 = nn.ReLU()
        self.relu2 = nn.ReLU()
        self.preact_tap = Tap()
        self.tap = Tap()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        preact = self.relu1(self.bn1(x))
        skip = x if self.shortcut is None else self.shortcut(preact)
        out = self.conv1(self.preact_tap(preact))
        out = self.conv2(self.relu2(self.bn2(out)))
        return self.tap(out + skip)


class PreActResNet(nn.Module):
    """Stem conv -> stages `layer1..4` (widths w, 2w, 4w, 8w; strides 1, 2, 2, 2) -> BN-ReLU -> GAP -> linear."""

    def __init__(self, blocks: list[int], in_channels: int, num_classes: int, width: int = 64) -> None:
        super().__init__()
        self.in_planes = width
        self.conv1 = nn.Conv2d(in_channels, width, 3, stride=1, padding=1, bias=False)
        self.stem_tap = Tap()
        self.layer1 = self._stage(width, blocks[0], 1)
        self.layer2 = self._stage(2 * width, blocks[1], 2)
        self.layer3 = self._stage(4 * width, blocks[2], 2)
        self.layer4 = self._stage(8 * width, blocks[3], 2)
        # The final BN-ReLU is needed because pre-activation blocks leave their sum un-normalised.
        self.bn = nn.BatchNorm2d(8 * width)
        self.relu = nn.ReLU()
        self.final_tap = Tap()
        self.linear = nn.Linear(8 * width, num_classes)
        self.feature_channels = {f"layer{i + 1}": width * 2**i for i in range(4)}

    def _stage(self, planes: int, count: int, stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (count - 1):
            layers.append(PreActBlock(self.in_planes, planes, s))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def insertion_points(self) -> dict[str, Tap]:
        """`stem`: conv1(x) entering layer1; `layerK.i`: output of block i of stage K (after the residual add); `layerK`: the stage's
        last block; `layerK.i.preact`: relu(bn1(x)) of block i on its residual branch, before
        conv1; `final`: relu(bn(out)) after `layer4`, the features entering global pooling."""
        stages = {f"layer{k}": getattr(self, f"layer{k}") for k in range(1, 5)}
        points = {"stem": self.stem_tap}
        points.update(stage_taps(stages))
        for name, stage in stages.items():
            for index, block in enumerate(stage):
                points[f"{name}.{index}.preact"] = block.preact_tap
        points["final"] = self.final_tap
        return points

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.stem_tap(self.conv1(x))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = self.final_tap(self.relu(self.bn(out)))
        # Adaptive pooling: 4×4 maps at 32×32 input, 2×2 on 16×16 digits — same parameters.
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


@MODELS.register("preact_resnet18")
def preact_resnet18(*, in_channels: int = 3, num_classes: int = 10, width: int = 64) -> PreActResNet:
    """CIFAR PreAct ResNet-18 (3x3 stem, no max-pool, final BN-ReLU); 11.17M params at width 64."""
    if width < 1:
        raise ValueError(f"width must be positive, got {width}")
    return PreActResNet([2, 2, 2, 2], in_channels, num_classes, width)
