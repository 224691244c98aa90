"""Models advdef does not define: a user's factory wrapped in the [0,1]-input Classifier contract.

`--model package.module:factory` names a function (or class) returning an `nn.Module`. The user's
code is trusted because they named it on the command line; weights are still only read through
`checkpoint_files` (no unpickling). The wrapper applies the declared normalisation, calls the
module, and unwraps a tuple/dict output to its logits entry, so the rest of advdef (LogitsView,
attacks, sanity checks) sees `[0,1] images -> logits` exactly as for a built-in architecture.
"""

from __future__ import annotations

import importlib
from typing import Any

import torch
from torch import nn

from advdef.data.base import DataInfo
from advdef.errors import UserError
from advdef.models import BuiltModel, Classifier, attach_defense, count_parameters
from advdef.models.base import Tap
from advdef.registry import DEFENSES

FACTORY_PREFIX = "factory:"


def parse_logits_key(text: str | None) -> int | str | None:
    """`--logits-key`: an integer indexes a tuple/list output, anything else names a dict entry."""
    if text is None or text == "":
        return None
    return int(text) if text.lstrip("-").isdigit() else text


def unwrap_logits(out: Any, key: int | str | None) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        index = 0 if key is None else key
        if not isinstance(index, int) or not -len(out) <= index < len(out):
            raise UserError(f"model returns a {type(out).__name__} of {len(out)} items; --logits-key must index it, got {key!r}")
        return unwrap_logits(out[index], None)
    if isinstance(out, dict):
        if key is None or key not in out:
            keys = ", ".join(repr(k) for k in out)
            raise UserError(f"model returns a dict with keys {keys}; name the logits entry with --logits-key")
        return unwrap_logits(out[key], None)
    raise UserError(f"model returns a {type(out).__name__}, not a tensor, tuple or dict of logits")


class ImportedClassifier(Classifier):
    """normalize -> user module -> logits entry; no insertion points (only input-level defenses fit)."""

    def __init__(self, net: nn.Module, info: DataInfo, logits_key: int | str | None) -> None:
        super().__init__(net, info.mean, info.std, info.input_shape, info.num_classes)
        self.logits_key = logits_key

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.context.aux = {}
        # Contiguous: input defenses may hand over strided tensors, and user code often uses .view.
        return unwrap_logits(self.net(self.normalize(self.input_tap(x)).contiguous()), self.logits_key)

    def insertion_points(self) -> dict[str, Tap]:
        return {}


def load_factory(path: str):
    """`package.module:attr.attr` -> the callable it names (one-line UserError otherwise)."""
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise UserError(f"--model '{path}': expected package.module:factory")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as error:
        raise UserError(f"--model '{path}': cannot import {module_name}: {error}") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise UserError(f"--model '{path}': {module_name} has no attribute '{attr}'")
        obj = getattr(obj, part)
    if not callable(obj):
        raise UserError(f"--model '{path}': {attr} is not callable")
    return obj


def build_factory_model(spec: dict[str, Any], info: DataInfo, defense: str = "none") -> BuiltModel:
    """Build the model a factory spec ({"factory", "kwargs", "logits_key"}) describes, untrained."""
    factory = load_factory(spec["factory"])
    kwargs = spec.get("kwargs") or {}
    try:
        net = factory(**kwargs)
    except TypeError as error:
        raise UserError(f"--model '{spec['factory']}' rejected --kwargs {kwargs}: {error}") from None
    if not isinstance(net, nn.Module):
        raise UserError(f"--model '{spec['factory']}' returned a {type(net).__name__}, not a torch.nn.Module")
    model = ImportedClassifier(net, info, spec.get("logits_key"))
    model.arch = FACTORY_PREFIX + spec["factory"]
    backbone = count_parameters(model)
    defense_plugin = attach_defense(model, defense, "a factory model")
    return BuiltModel(model, defense_plugin, model.arch, DEFENSES.canonical(defense), backbone)


def build_from_card(card: dict[str, Any]) -> BuiltModel:
    """The untrained model of a checkpoint card: a factory model if the card says so, else built-in."""
    from advdef.models import build_model

    info = DataInfo.from_json(card["data"])
    factory = (card.get("imported") or {}).get("model")
    if factory:
        return build_factory_model(factory, info, card["defense"])
    return build_model(card["arch"], info, card["defense"], card.get("dual_bn", "off"))
