"""TRADES-style pre-activation WideResNet (WRN-34-10, WRN-28-10) for CIFAR-size inputs.

Depth d has n = (d - 4) / 6 units per stage (5 for WRN-34, 4 for WRN-28): a 3×3 stem conv, three
stages `block1..3` of width w·k, 2w·k, 4w·k (w = 16, k = widen factor) at strides 1, 2, 2, then
BN-ReLU, global average pooling and `fc`. Weight names follow the TRADES layout
(conv1, block1.layer.0.bn1, ..., block1.layer.0.convShortcut, bn1, fc) so public TRADES/CAS/CIFS/
FSR checkpoints map onto it.

Parameter counts exclude the TRADES code's `sub_block1`: a fourth stage-1 block that is built
but never called in forward. It is not built here, so it neither inflates counts (46,160,474
for WRN-34-10 instead of ~48.3M) nor appears in the state_dict; load a TRADES-family checkpoint
with its `sub_block1.*` keys dropped (or `strict=False`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from advdef.models.base import Tap, stage_taps
from advdef.registry import MODELS


class WideBasic(nn.Module):
    """One pre-activation unit: BN-ReLU-conv3×3, BN-ReLU-conv3×3, plus a shortcut.

    `preact_tap` sits on relu(bn1(x)) where it enters conv1, i.e. on the residual branch only:
    an equal-in/out unit adds the raw, unmasked x through its identity shortcut (the placement
    CAS and CIFS use inside WRN), and a widening/downsampling unit feeds its 1×1 `convShortcut`
    the untransformed relu(bn1(x)), so a defense on a preact tap never touches a shortcut.
    """

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.equal_in_out = stride == 1 and in_planes == planes
        # TRADES names this `convShortcut`; keep it for checkpoint compatibility.
        self.convShortcut: nn.Conv2d | None = None
        if not self.equal_in_out:
            self.convShortcut = nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False)
        # Activations are modules, not F.relu, so a defense can swap them (`smooth`).
        self.relu1 = nn.ReLU()
        self.relu2 = nn.ReLU()
        self.preact_tap = Tap()
        self.tap = Tap()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        preact = self.relu1(self.bn1(x))
        skip = x if self.convShortcut is None else self.convShortcut(preact)
        out = self.conv1(self.preact_tap(preact))
        out = self.conv2(self.relu2(self.bn2(out)))
        return self.tap(out + skip)


class WideStage(nn.Module):
    """A stage of units; the units live in `.layer` to keep TRADES' `blockK.layer.i` key names."""

    def __init__(self, in_planes: int, planes: int, count: int, stride: int) -> None:
        super().__init__()
        units = [WideBasic(in_planes if i == 0 else planes, planes, stride if i == 0 else 1) for i in range(count)]
        self.layer = nn.Sequential(*units)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    """Stem -> `block1..3` -> BN-ReLU (`final`) -> adaptive GAP -> `fc`."""

    def __init__(self, depth: int, widen_factor: int, in_channels: int, num_classes: int, width: int = 16) -> None:
        super().__init__()
        units = (depth - 4) // 6
        channels = [width, width * widen_factor, 2 * width * widen_factor, 4 * width * widen_factor]
        self.conv1 = nn.Conv2d(in_channels, channels[0], 3, stride=1, padding=1, bias=False)
        self.stem_tap = Tap()
        self.block1 = WideStage(channels[0], channels[1], units, 1)
        self.block2 = WideStage(channels[1], channels[2], units, 2)
        self.block3 = WideStage(channels[2], channels[3], units, 2)
        self.bn1 = nn.BatchNorm2d(channels[3])
        self.relu = nn.ReLU()
        self.final_tap = Tap()
        self.fc = nn.Linear(channels[3], num_classes)
        self.feature_channels = {f"block{k}": channels[k] for k in range(1, 4)}
        self._initialize()

    def _initialize(self) -> None:
        """The WRN/TRADES init: He-normal convs over fan-out, unit BN, zero linear bias.

        Kept so that training from scratch starts where the seed papers' runs started.
        """
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels
                nn.init.normal_(module.weight, 0.0, math.sqrt(2.0 / fan_out))
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                nn.init.zeros_(module.bias)

    def insertion_points(self) -> dict[str, Tap]:
        """`stem`: conv1(x) entering block1; `blockK.i`: output of unit i of stage K; `blockK`: the stage's last unit;
        `blockK.i.preact` (alias `blockK.last.preact` for the last unit): relu(bn1(x)) on unit
        i's residual branch only; `final`: relu(bn1(out)) after `block3`, before pooling."""
        stages = {f"block{k}": getattr(self, f"block{k}").layer for k in range(1, 4)}
        points = {"stem": self.stem_tap}
        points.update(stage_taps(stages))
        for name, stage in stages.items():
            for index, unit in enumerate(stage):
                points[f"{name}.{index}.preact"] = unit.preact_tap
            points[f"{name}.last.preact"] = stage[-1].preact_tap
        points["final"] = self.final_tap
        return points

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block3(self.block2(self.block1(self.stem_tap(self.conv1(x)))))
        out = self.final_tap(self.relu(self.bn1(out)))
        # Adaptive, not TRADES' avg_pool2d(8): 8×8 maps at 32×32 input, 4×4 on 16×16 digits.
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.fc(out)


def wide_resnet(*, depth: int, widen_factor: int, in_channels: int, num_classes: int, width: int) -> WideResNet:
    """Validate the WRN options and build the network (shared by the registered presets)."""
    if depth < 10 or (depth - 4) % 6:
        raise ValueError(f"depth must be 6n+4 with n >= 1 (10, 16, 22, 28, 34, ...), got {depth}")
    if widen_factor < 1:
        raise ValueError(f"widen_factor must be positive, got {widen_factor}")
    if width < 1:
        raise ValueError(f"width must be positive, got {width}")
    return WideResNet(depth, widen_factor, in_channels, num_classes, width)


@MODELS.register("wrn34_10")
def wrn34_10(
    *, in_channels: int = 3, num_classes: int = 10, depth: int = 34, widen_factor: int = 10, width: int = 16
) -> WideResNet:
    """TRADES-style pre-activation WideResNet-34-10 (FSR, CAS, EWAS); 46.16M params, no sub_block1.

    `depth` (6n+4) and `widen_factor` change the shape, e.g. `wrn34_10:widen_factor=1` for a CPU-size
    run; `width` is the stem width (16 in the WRN paper) that the stage widths scale from.
    """
    return wide_resnet(
        depth=depth, widen_factor=widen_factor, in_channels=in_channels, num_classes=num_classes, width=width
    )


@MODELS.register("wrn28_10")
def wrn28_10(
    *, in_channels: int = 3, num_classes: int = 10, depth: int = 28, widen_factor: int = 10, width: int = 16
) -> WideResNet:
    """TRADES-style pre-activation WideResNet-28-10 (CIFS, EWAS); 36.48M params.

    Same builder as `wrn34_10` with 4 units per stage instead of 5; options as there.
    """
    return wide_resnet(
        depth=depth, widen_factor=widen_factor, in_channels=in_channels, num_classes=num_classes, width=width
    )
