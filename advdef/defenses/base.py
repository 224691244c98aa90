"""Defense plugin contract.

A defense (1) performs surgery on a `Classifier` at named insertion points, (2) computes its
auxiliary training loss from what its modules wrote into the model's `DefenseContext`,
(3) declares what an adaptive attack may target, and (4) carries its paper's defaults, citation
and published numbers as data. Defenses know nothing about AT methods and vice versa: the trainer
adds `aux_loss` to whichever outer loss the AT method produced.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from advdef.models.base import Classifier


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
