"""Dual BatchNorm: separate normalization statistics for clean and adversarial inputs.

AdvProp (Xie et al., CVPR 2020; thesis ch. 7) and Mixture BN (thesis ch. 6) rest on one
observation: clean and adversarial images come from different distributions, and one set of
BatchNorm statistics over their mixture serves neither. Every BatchNorm of the model is replaced
by a pair — `clean` and `adversarial` — sharing nothing but the surrounding layers. Which member a
forward pass uses is its *route*: training marks each pass (`Classifier.route`): the training
attack and the adversarial loss term go through `adversarial`, clean loss terms through `clean`.
Passes outside training (validation, evaluation, attacks) use the route chosen at inference:
`clean` for AdvProp (the auxiliary BNs are dropped at test time), `adversarial` for MBN_adv
(thesis Table 6.1). The choice is part of the run's card, so the evaluated model is exactly the
deployed one.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from advdef.models.base import ROUTES, Classifier, DefenseContext

DUAL_BN_CHOICES = ("off",) + ROUTES  # off, or the route used at inference


class DualBatchNorm(nn.Module):
    """Two copies of one BatchNorm (1d or 2d), chosen per forward by the model's route."""

    def __init__(self, original: nn.modules.batchnorm._BatchNorm, inference_route: str, context: DefenseContext) -> None:
        super().__init__()
        if inference_route not in ROUTES:
            raise ValueError(f"inference route must be one of {', '.join(ROUTES)}, got {inference_route!r}")
        self.clean = copy.deepcopy(original)
        self.adversarial = copy.deepcopy(original)
        self.inference_route = inference_route
        # The shared context is state, not a submodule (it must not enter the weights).
        object.__setattr__(self, "context", context)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        route = self.context.route or self.inference_route
        return getattr(self, route)(x)

    def extra_repr(self) -> str:
        return f"inference_route={self.inference_route!r}"


def convert_to_dual_bn(model: Classifier, inference_route: str) -> int:
    """Replace every BatchNorm inside `model` (backbone and defense modules) by a DualBatchNorm.

    Runs after the defense's surgery so its BatchNorms (e.g. FSR's nets) get both routes too.
    Returns how many were replaced; a model without BatchNorm cannot have dual statistics.
    """
    targets = [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if isinstance(child, nn.modules.batchnorm._BatchNorm)
    ]
    if not targets:
        raise ValueError(f"dual BatchNorm needs BatchNorm layers; '{model.arch}' has none")
    for parent, name, child in targets:
        setattr(parent, name, DualBatchNorm(child, inference_route, model.context))
    return len(targets)
