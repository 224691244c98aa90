"""Architectures and the model factory. Importing this package registers the built-in ones."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from advdef.data.base import DataInfo
from advdef.models import preact_resnet, resnet, smallcnn, vgg, wide_resnet  # noqa: F401  (registration)
from torch import nn

from advdef.models.base import Classifier, Tap, count_parameters
from advdef.models.dual_bn import DUAL_BN_CHOICES, convert_to_dual_bn
from advdef.errors import UserError
from advdef.registry import DEFENSES, MODELS
from advdef.specs import Spec


@dataclass
class BuiltModel:
    """A classifier with the plugins and canonical specs it was built from."""

    model: Classifier
    defense: Any
    arch_spec: str
    defense_spec: str
    params_backbone: int

    @property
    def params_total(self) -> int:
        return count_parameters(self.model)

    @property
    def params_added(self) -> int:
        return self.params_total - self.params_backbone


def attach_defense(model: nn.Module, defense: str, target: str):
    """Create the defense plugin and attach it to `model`; a defense that cannot attach (e.g. an
    insertion point `target` lacks) is a one-line UserError."""
    defense_plugin = DEFENSES.create(defense)
    try:
        defense_plugin.attach(model)
    except UserError:
        raise
    except (ValueError, KeyError) as error:
        raise UserError(f"defense '{defense}' cannot be attached to {target}: {error}") from None
    return defense_plugin


def build_model(arch: str, info: DataInfo, defense: str = "none", dual_bn: str = "off") -> BuiltModel:
    """Build `arch` for the dataset's shape and classes, then apply the defense's surgery.

    `dual_bn` "clean" or "adversarial" then gives every BatchNorm a clean and an adversarial copy
    (AdvProp / Mixture BN) and names the one used at inference; "off" keeps one set.
    """
    if dual_bn not in DUAL_BN_CHOICES:
        raise UserError(f"unknown dual BatchNorm setting '{dual_bn}'; valid: {', '.join(DUAL_BN_CHOICES)}")
    plugin, params = MODELS.resolve(arch)
    data_derived = {"in_channels": info.input_shape[0], "num_classes": info.num_classes}
    arch_params = {k: v for k, v in params.items() if k not in data_derived}
    arch_spec = str(Spec(plugin.name, arch_params))
    net = plugin.factory(**arch_params, **data_derived)
    model = Classifier(net, info.mean, info.std, info.input_shape, info.num_classes)
    model.arch = plugin.name  # defenses pick their per-architecture default insertion points by it
    backbone_params = count_parameters(model)
    defense_plugin = attach_defense(model, defense, f"'{arch_spec}'")
    if dual_bn != "off":
        try:
            convert_to_dual_bn(model, dual_bn)
        except ValueError as error:
            raise UserError(f"--dual-bn {dual_bn}: {error}") from None
    return BuiltModel(model, defense_plugin, arch_spec, DEFENSES.canonical(defense), backbone_params)


__all__ = ["BuiltModel", "Classifier", "Tap", "build_model", "count_parameters"]
