"""Defense plugin contract.

A defense (1) performs surgery on a `Classifier` at named insertion points, (2) computes its
auxiliary training loss from what its modules wrote into the model's `DefenseContext`,
(3) declares what an adaptive attack may target, and (4) carries its paper's defaults, citation
and published numbers as data. Defenses know nothing about AT methods and vice versa: the trainer
adds `aux_loss` to whichever outer loss the AT method produced.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from advdef.errors import UserError
from advdef.models.base import Classifier


class InsertionPointError(UserError, ValueError):
    """A defense's insertion points do not fit the model: unknown name, no default, one tap twice.

    A ValueError as plugin contracts ask, and a UserError so the CLI prints one line wherever it is
    raised (attach also runs outside the registry's ValueError translation).
    """


def point_list(points: Sequence[str] | str | None) -> tuple[str, ...] | None:
    """Normalize a `points=` spec value (`layer4.1` or `layer4.0,layer4.1`); None = the arch default."""
    if points is None:
        return None
    if not isinstance(points, (str, list, tuple)):
        raise ValueError(f"points must be insertion point names, got {points!r}")
    items = [points] if isinstance(points, str) else list(points)
    if not items or any(not isinstance(p, str) or not p.strip() for p in items):
        raise ValueError(f"points must be insertion point names, got {points!r}")
    names = tuple(p.strip() for p in items)
    if len(set(names)) != len(names):
        raise ValueError(f"points lists a name twice: {', '.join(names)}")
    return names


def resolve_points(
    model: Classifier, points: Sequence[str] | None, defaults: Mapping[str, Sequence[str]], defense: str
) -> tuple[str, ...]:
    """The user's points, else the architecture's default, checked against the model's taps.

    Aliases (`layer4`, `layer4.1` and `final` on resnet18) name one tap; two modules there would
    be a mistake, so that is refused too. Every error names the valid points.
    """
    available = model.insertion_points()
    valid = ", ".join(available)
    if points is None:
        if model.arch not in defaults:
            raise InsertionPointError(
                f"{defense} has no default insertion points for architecture '{model.arch}'; "
                f"set {defense}:points=NAME (valid: {valid})"
            )
        points = defaults[model.arch]
    for point in points:
        if point not in available:
            raise InsertionPointError(f"unknown insertion point '{point}' for {model.arch}; valid: {valid}")
    seen: dict[int, str] = {}
    for point in points:
        other = seen.setdefault(id(available[point]), point)
        if other != point:
            raise InsertionPointError(f"'{other}' and '{point}' are the same insertion point of {model.arch}; list it once")
    return tuple(points)


@dataclass(frozen=True)
class AdaptiveDeclaration:
    """What an adaptive attack may use: auxiliary heads, masks, the authors' joint loss, randomness."""

    aux_heads: tuple[str, ...] = ()
    masks: tuple[str, ...] = ()
    joint_loss: str | None = None
    stochastic: bool = False
    notes: str = ""


class Defense:
    """Base class; the `none` defense is this class unchanged."""

    citation: str = ""
    published: dict[str, Any] = {}

    def attach(self, model: Classifier) -> None:
        """Insert the defense's modules into `model` (in place)."""

    def aux_loss(self, model: Classifier, labels: torch.Tensor) -> torch.Tensor | None:
        """Weighted auxiliary loss from the last forward pass, or None when the defense has none."""
        return None

    def training_attack_objective(self, model: Classifier) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None:
        """Per-example loss the AT method's inner attack maximises, when the paper's training code
        crafts with more than the final logits' CE (e.g. a joint loss over auxiliary heads).

        The callable gets (final logits, labels) right after a forward pass, so it may read
        `model.aux_outputs()`. None means cross-entropy on the final logits.
        """
        return None

    def adaptive(self) -> AdaptiveDeclaration:
        return AdaptiveDeclaration()

    @property
    def stochastic(self) -> bool:
        return self.adaptive().stochastic


@dataclass
class DefenseInfo:
    """Summary written to run cards and `advdef info`."""

    name: str
    params: dict[str, Any] = field(default_factory=dict)
