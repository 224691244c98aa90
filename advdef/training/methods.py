"""Adversarial-training method plugins: each turns a batch into the outer training loss.

A method knows nothing about defenses: it calls the model with the true labels in the defense
context (training mode only), and adds whatever auxiliary loss the defense reports for the
forward pass on the inputs the outer loss uses.
"""

from __future__ import annotations

from fractions import Fraction

import torch
import torch.nn.functional as F

from advdef.attacks.pgd import EIGHT_255, pgd_attack
from advdef.defenses.base import Defense
from advdef.models.base import Classifier
from advdef.registry import TRAINING


class TrainingMethod:
    """Base: `loss(model, x, y, defense, generator)` -> (loss, logits on the trained inputs)."""

    name = "method"

    def loss(
        self, model: Classifier, x: torch.Tensor, y: torch.Tensor, defense: Defense, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    @staticmethod
    def supervised(model: Classifier, x: torch.Tensor, y: torch.Tensor, defense: Defense) -> tuple[torch.Tensor, torch.Tensor]:
        """CE of the model on x plus the defense's auxiliary loss on the same forward pass."""
        with model.labels(y):
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            aux = defense.aux_loss(model, y)
        return (loss if aux is None else loss + aux), logits


@TRAINING.register("standard")
class StandardTraining(TrainingMethod):
    """Standard (non-adversarial) training on clean inputs: the undefended reference."""

    name = "standard"

    def __init__(self) -> None:
        pass

    def loss(self, model, x, y, defense, generator):
        return self.supervised(model, x, y, defense)


@TRAINING.register("pgd_at")
class PGDAdversarialTraining(TrainingMethod):
    """PGD-AT (Madry et al. 2018): train on PGD-10 examples, eps 8/255, step eps/4 (2/255), random start."""

    name = "pgd_at"

    def __init__(
        self,
        *,
        eps: Fraction = EIGHT_255,
        alpha: Fraction | None = None,
        steps: int = 10,
        random_start: bool = True,
        bn_mode: str = "train",
    ) -> None:
        alpha = Fraction(eps) / 4 if alpha is None else alpha  # 2/255 at eps 8/255
        if not 0 < eps <= 1 or not 0 < alpha <= 1 or steps < 1:
            raise ValueError("need 0 < eps, alpha <= 1 and steps >= 1")
        if bn_mode not in ("train", "eval"):
            raise ValueError(f"bn_mode must be 'train' (Madry/Rice code) or 'eval', got '{bn_mode}'")
        self.eps, self.alpha, self.steps, self.random_start, self.bn_mode = eps, alpha, steps, random_start, bn_mode

    def loss(self, model, x, y, defense, generator):
        x_adv = craft_training_attack(
            model, x, y, eps=float(self.eps), alpha=float(self.alpha), steps=self.steps,
            random_start=self.random_start, bn_mode=self.bn_mode, generator=generator,
            objective=defense.training_attack_objective(model),
        )
        return self.supervised(model, x_adv, y, defense)


def craft_training_attack(
    model: Classifier,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    alpha: float,
    steps: int,
    random_start: bool,
    bn_mode: str,
    generator: torch.Generator,
    objective=None,
) -> torch.Tensor:
    """PGD examples for training, crafted with BatchNorm in `bn_mode`, model left in train mode.

    In train mode the defense may see labels (as the papers' training code does); in eval mode it
    may not. Parameters are frozen while crafting so only input gradients are computed.
    `objective` (from the defense) replaces the final-logit cross-entropy when given.
    """
    loss = objective if objective is not None else "ce"
    model.train(bn_mode == "train")
    requires = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        if model.training:
            with model.labels(y):
                x_adv = pgd_attack(model, x, y, eps=eps, alpha=alpha, steps=steps, random_start=random_start,
                                   loss=loss, generator=generator, track_best=False)
        else:
            x_adv = pgd_attack(model, x, y, eps=eps, alpha=alpha, steps=steps, random_start=random_start,
                               loss=loss, generator=generator, track_best=False)
    finally:
        for p, flag in zip(model.parameters(), requires):
            p.requires_grad_(flag)
        model.train()
    return x_adv.detach()
