"""CIFAR VGG16-BN as used by FSR and CAS: five conv stages `block0..4`, each followed by `pool0..4`.

Stages are conv3×3(+bias)-BN-ReLU × (2, 2, 3, 3, 3) at widths (w, 2w, 4w, 8w, 8w), w = 64, each
followed by a 2×2 max-pool; then adaptive average pooling to 1×1 and an MLP classifier
8w -> 8w -> 8w -> K. Weight names follow the FSR repo's layout (block0.0 conv, block0.1 BN,
block0.3 conv, ..., classifier.0/.2/.4) so its checkpoints map onto it.

Classifier choice: the default is FSR's head (Linear-ReLU, Linear-ReLU, Linear; no dropout, no
BN), because it is the one with a published, checkable size — 15,253,578 parameters for 3×32×32
and 10 classes, the FSR paper's 15.25M (Table 7). CAS's VGG16 uses the same three linear layers
with BatchNorm1d after each hidden one (Linear-BN-ReLU twice, then Linear: +2,048 parameters,
15,255,626); `head_bn=true` builds that head, so CAS's VGG rows can be reproduced too.

Pooling on small inputs: a max-pool whose input has a side shorter than 2 pixels is skipped (on
16×16 digits `block4` runs at 1×1 and `pool4` would produce an empty map). Pools have no
weights and the classifier reads a 1×1 adaptive average, so parameter counts do not depend on
the input size.
"""

from __future__ import annotations

import torch
from torch import nn

from advdef.models.base import Tap
from advdef.registry import MODELS

# Conv widths per stage, in units of the base width (VGG16: 2, 2, 3, 3, 3 convs).
_STAGES: tuple[tuple[int, ...], ...] = ((1, 1), (2, 2), (4, 4, 4), (8, 8, 8), (8, 8, 8))


class ConvStage(nn.Module):
    """conv-BN-ReLU layers registered as `0, 1, 2, 3, ...` (the flat VGG indices) with a tap after
    each ReLU; `taps[-1]` is the stage output. Taps are kept out of the numbered children so the
    state_dict keys stay `blockK.<index>.*` exactly as in a plain `nn.Sequential`."""

    def __init__(self, in_channels: int, widths: tuple[int, ...]) -> None:
        super().__init__()
        self.num_convs = len(widths)
        for i, out_channels in enumerate(widths):
            self.add_module(str(3 * i), nn.Conv2d(in_channels, out_channels, 3, padding=1))
            self.add_module(str(3 * i + 1), nn.BatchNorm2d(out_channels))
            self.add_module(str(3 * i + 2), nn.ReLU(inplace=True))
            in_channels = out_channels
        self.taps = nn.ModuleList(Tap() for _ in widths)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i in range(self.num_convs):
            conv, bn, relu = (getattr(self, str(3 * i + j)) for j in range(3))
            x = self.taps[i](relu(bn(conv(x))))
        return x


class VGG16BN(nn.Module):
    """`block0, pool0, ..., block4, pool4` -> adaptive 1×1 average -> `classifier` MLP."""

    def __init__(self, in_channels: int, num_classes: int, width: int = 64, head_bn: bool = False) -> None:
        super().__init__()
        for k, multipliers in enumerate(_STAGES):
            stage = ConvStage(in_channels, tuple(width * m for m in multipliers))
            self.add_module(f"block{k}", stage)
            self.add_module(f"pool{k}", nn.MaxPool2d(2, 2))
            in_channels = width * multipliers[-1]
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.final_tap = Tap()
        self.classifier = _classifier(in_channels, num_classes, head_bn)
        self.feature_channels = {f"block{k}": width * m[-1] for k, m in enumerate(_STAGES)}
        self._initialize()

    def _initialize(self) -> None:
        """The torchvision/FSR VGG init (He-normal fan-out convs, N(0, 0.01) linears, zero biases),
        so training from scratch starts where the seed papers' runs started."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(module.bias)
            elif isinstance(module, (nn.BatchNorm2d, nn.BatchNorm1d)):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, 0.0, 0.01)
                nn.init.zeros_(module.bias)

    def stages(self) -> list[ConvStage]:
        return [getattr(self, f"block{k}") for k in range(len(_STAGES))]

    def insertion_points(self) -> dict[str, Tap]:
        """`blockK`: output of conv stage K (K=0..4) before its max-pool; `blockK.i`: output of the
        stage's i-th conv-BN-ReLU (CAS masks each conv of `block4`); `final`: the 8w×1×1 pooled
        map entering the classifier (a C×H×W map like every other tap, flattened after it)."""
        points: dict[str, Tap] = {}
        for k, stage in enumerate(self.stages()):
            for i, tap in enumerate(stage.taps):
                points[f"block{k}.{i}"] = tap
            points[f"block{k}"] = stage.taps[-1]
        points["final"] = self.final_tap
        return points

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for k, stage in enumerate(self.stages()):
            x = stage(x)
            if min(x.shape[-2:]) >= 2:  # see the module docstring: never pool a 1-pixel side away
                x = getattr(self, f"pool{k}")(x)
        x = self.final_tap(self.avgpool(x))
        return self.classifier(x.flatten(1))


def _classifier(features: int, num_classes: int, head_bn: bool) -> nn.Sequential:
    """FSR's Linear-ReLU-Linear-ReLU-Linear, or CAS's with BatchNorm1d before each hidden ReLU."""
    layers: list[nn.Module] = []
    for _ in range(2):
        layers.append(nn.Linear(features, features))
        if head_bn:
            layers.append(nn.BatchNorm1d(features))
        layers.append(nn.ReLU(inplace=True))
    layers.append(nn.Linear(features, num_classes))
    return nn.Sequential(*layers)


@MODELS.register("vgg16_bn")
def vgg16_bn(*, in_channels: int = 3, num_classes: int = 10, width: int = 64, head_bn: bool = False) -> VGG16BN:
    """CIFAR VGG16-BN of FSR/CAS (5 conv stages, 512-512-512-K MLP head); 15.25M params at width 64.

    `head_bn=true` adds CAS's BatchNorm1d to the two hidden classifier layers.
    """
    if width < 1:
        raise ValueError(f"width must be positive, got {width}")
    if not isinstance(head_bn, bool):
        raise ValueError(f"head_bn must be true or false, got {head_bn!r}")
    return VGG16BN(in_channels, num_classes, width, head_bn)
