"""Defense plugin contract.

A defense (1) performs surgery on a `Classifier` at named insertion points, (2) computes its
auxiliary training loss from what its modules wrote into the model's `DefenseContext`,
(3) declares what an adaptive attack may target, and (4) carries its paper's defaults, citation
and published numbers as data. Defenses know nothing about AT methods and vice versa: the trainer
adds `aux_loss` to whichever outer loss the AT method produced.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import math

import torch
import torch.nn.functional as F

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
    # The attacks of the paper's own tables as advdef specs (`evaluate --suite paper`), at the
    # paper's eps 8/255 (alpha=4/1275 is eps/10 there); () = fgsm, pgd20, cw. Differences from the
    # authors' code are in `published["protocol"]`.
    paper_attacks: tuple[str, ...] = ()

    def attach(self, model: Classifier) -> None:
        """Insert the defense's modules into `model` (in place)."""

    # -- composition with any AT method ---------------------------------------------------
    # A defense describes its auxiliary losses; AT methods apply their own loss form to them, so
    # neither knows the other by name. Classification heads (CAS, CIFS probes, EWAS's ALC) are
    # exposed as logits: PGD-AT/FAT add weight x mean CE(head), TRADES adds the head's CE on
    # natural inputs plus beta x KL(natural || adversarial), MART its boosted CE plus weighted
    # KL. Losses of another shape (FSR's separation/recalibration) are `extra_aux_loss`, added on
    # the inputs the outer loss trains on.

    def aux_logits(self, model: Classifier) -> dict[str, torch.Tensor]:
        """Logits of the defense's auxiliary classification heads from the last forward pass."""
        return {}

    def aux_weight(self) -> float:
        """Weight of the mean head loss in the training objective (the paper's beta / lambda)."""
        return 0.0

    def attack_aux_weight(self) -> float | None:
        """Weight of the heads in the training attack's objective: None = the paper crafts on the
        final logits only; inf = on the heads only; otherwise final + weight x mean over heads."""
        return None

    def extra_aux_loss(self, model: Classifier, labels: torch.Tensor) -> torch.Tensor | None:
        """Auxiliary losses that are not per-head classification losses, from the last forward pass."""
        return None

    def aux_loss(self, model: Classifier, labels: torch.Tensor) -> torch.Tensor | None:
        """The whole auxiliary loss in cross-entropy form for the last forward pass (PGD-AT, FAT)."""
        terms = []
        heads = list(self.aux_logits(model).values())
        if heads and self.aux_weight():
            terms.append(self.aux_weight() * torch.stack([F.cross_entropy(h.float(), labels) for h in heads]).mean())
        extra = self.extra_aux_loss(model, labels)
        if extra is not None:
            terms.append(extra)
        return sum(terms[1:], terms[0]) if terms else None

    def training_attack_objective(self, model: Classifier) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None:
        """Per-example loss the inner attack of a CE-based AT method maximises (None: CE on the
        final logits). Built from `attack_aux_weight`; it reads the heads after each forward."""
        weight = self.attack_aux_weight()
        if not weight:
            return None

        def objective(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            heads = list(self.aux_logits(model).values())
            if not heads:
                return F.cross_entropy(logits.float(), labels, reduction="none")
            head_loss = torch.stack([F.cross_entropy(h.float(), labels, reduction="none") for h in heads]).mean(0)
            if math.isinf(weight):
                return head_loss
            return F.cross_entropy(logits.float(), labels, reduction="none") + weight * head_loss

        return objective

    def adaptive(self) -> AdaptiveDeclaration:
        return AdaptiveDeclaration()

    # -- what adaptive attacks (advdef.attacks.adaptive) are generated from ----------------
    # Defaults mean "nothing to adapt to": a defense without heads, head-selected masks or
    # gradient surrogates gets no adaptive attacks, only the ordinary final-logit ones.

    def attack_heads(self, model: Classifier) -> dict[str, torch.Tensor]:
        """Logits of the last forward pass that an adaptive attack may push away from the true
        label (classifiers of y). Default: the training heads, `aux_logits`; a defense whose
        heads are not all classifiers of y (or are not in `aux_logits`) overrides it."""
        return self.aux_logits(model)

    def attack_head_names(self) -> tuple[str, ...]:
        """The keys `attack_heads` returns, in that order, known without a forward pass, so that
        attack specs can name heads before any input is seen. Default: the declared aux heads."""
        return tuple(self.adaptive().aux_heads)

    @property
    def selects_masks(self) -> bool:
        """True when the argmax/top-k of the attack heads selects the masks applied to features,
        so forcing a head's prediction to a class forces that class's mask (forced-selection
        attack). Default: any mask is declared; a defense whose masks do not depend on its heads'
        predictions overrides it with False."""
        return bool(self.adaptive().masks)

    def gradient_surrogates(self, model: Classifier | None) -> dict[str, Callable[[], AbstractContextManager[Any]]]:
        """Named gradient surrogates (BPDA, raised temperature, un-detached masks): each value,
        called, gives a context manager inside which `model`'s input gradients are the
        surrogate's. Attacks craft inside it and judge their points on the model outside it.

        The names depend on the defense's configuration only, not on `model` (attack specs are
        listed from `gradient_surrogates(None)`), and values use `model` only when called.
        Default: none.
        """
        return {}

    @property
    def stochastic(self) -> bool:
        return self.adaptive().stochastic
