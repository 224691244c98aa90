"""Adversarial-training method plugins: each turns a batch into the outer training loss.

A method knows no defense by name. It calls the model with the true labels in the defense
context (training mode only) and composes with the defense through the protocol of
`advdef.defenses.base.Defense`: the method's own loss form is applied to the final logits and to
each auxiliary head in `aux_logits` (weight `aux_weight`), `extra_aux_loss` is added on the
adversarial forward pass, and the inner attack includes the heads when `attack_aux_weight` asks
for it. PGD-AT and FAT are CE-based, so they use the defense's CE-form `aux_loss` and
`training_attack_objective` directly; TRADES and MART apply their KL forms per head
(`advdef.training.objectives`). docs/training.md lists each method's sources and options.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

import torch
import torch.nn.functional as F

from advdef.attacks.pgd import EIGHT_255, pgd_attack
from advdef.defenses.base import Defense
from advdef.models.base import Classifier
from advdef.registry import TRAINING
from advdef.training.inner import BN_MODES, STARTS, crafting, early_stopped_ascent, start_point
from advdef.training.objectives import (
    Objective,
    cross_entropy_objective,
    kl_attack_objective,
    mart_form,
    trades_form,
    with_heads,
)
from advdef.validation import number

MART_KL_WEIGHTS = ("head", "main")


class TrainingMethod:
    """Base: `loss(model, x, y, defense, generator)` -> (loss, logits on the trained inputs)."""

    name = "method"
    # What `--select auto` picks the best epoch by: robust accuracy for methods that train for
    # robustness, clean accuracy for those whose goal is clean accuracy (standard, AdvProp).
    selects_on = "val_robust"

    def loss(
        self, model: Classifier, x: torch.Tensor, y: torch.Tensor, defense: Defense, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    @staticmethod
    def supervised(
        model: Classifier, x: torch.Tensor, y: torch.Tensor, defense: Defense, route: str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """CE of the model on x plus the defense's auxiliary loss on the same forward pass.

        `route` says whether x is "clean" or "adversarial" (dual BatchNorm normalises each kind
        with its own statistics; a no-op otherwise)."""
        with model.labels(y), model.route(route):
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            aux = defense.aux_loss(model, y)
        return (loss if aux is None else loss + aux), logits


@TRAINING.register("standard")
class StandardTraining(TrainingMethod):
    """Standard (non-adversarial) training on clean inputs: the undefended reference."""

    name = "standard"
    selects_on = "val_clean"

    def __init__(self) -> None:
        pass

    def loss(self, model, x, y, defense, generator):
        return self.supervised(model, x, y, defense, "clean")


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
        inner = InnerAttack.checked(eps, alpha, steps, "uniform" if random_start else "none", bn_mode)
        self.eps, self.alpha, self.steps, self.bn_mode = inner.eps, inner.alpha, inner.steps, inner.bn_mode
        self.random_start = random_start  # bn_mode "train" is the Madry/Rice code's

    def loss(self, model, x, y, defense, generator):
        return self.supervised(model, self.craft(model, x, y, defense, generator), y, defense, "adversarial")

    def craft(self, model: Classifier, x: torch.Tensor, y: torch.Tensor, defense: Defense,
              generator: torch.Generator) -> torch.Tensor:
        """PGD examples maximising CE, or the defense's CE-form training objective."""
        return craft_training_attack(
            model, x, y, eps=float(self.eps), alpha=float(self.alpha), steps=self.steps,
            random_start=self.random_start, bn_mode=self.bn_mode, generator=generator,
            objective=defense.training_attack_objective(model),
        )


@TRAINING.register("advprop")
class AdvProp(PGDAdversarialTraining):
    """AdvProp (Xie et al. 2020): CE(x) through clean BatchNorms + CE(x') through adversarial ones; x' = PGD-5, eps 4/255, step 1/255."""

    name = "advprop"
    selects_on = "val_clean"  # AdvProp improves clean accuracy; it is not a robustness defense

    def __init__(
        self,
        *,
        eps: Fraction = Fraction(4, 255),
        alpha: Fraction | None = Fraction(1, 255),
        steps: int = 5,
        random_start: bool = True,
        bn_mode: str = "train",
    ) -> None:
        """
        eps, alpha, steps: the attacker (thesis Sec. 7.5.1: eps in {1..4}/255, steps eps+1 in pixel
            units, step 1/255; the ablations' default PGD5 at eps 4/255 is ours). Small networks
            gained most with the weakest attacker (Table 7.2: PGD1 at eps 1/255 for B0).
        random_start: PGD's uniform start (the thesis calls the variant without it I-FGSM).
        bn_mode: BatchNorm mode while crafting; the thesis does not say, "train" uses the
            adversarial BatchNorms' batch statistics (as the rest of the batch's forward does).

        Trained with `--dual-bn clean` (set automatically): the attack and CE(x') run through the
        adversarial BatchNorms, CE(x) and inference through the clean ones. With `--dual-bn off`
        it is the "clean + adversarial in separate passes, shared BN" ablation of thesis ch. 6.
        """
        super().__init__(eps=eps, alpha=alpha, steps=steps, random_start=random_start, bn_mode=bn_mode)

    def loss(self, model, x, y, defense, generator):
        """Both terms carry the defense's auxiliary loss on their own pass; the logits returned
        (for the training accuracy) are the clean pass's, AdvProp's measure of success."""
        x_adv = self.craft(model, x, y, defense, generator)
        clean_loss, clean_logits = self.supervised(model, x, y, defense, "clean")
        adversarial_loss, _ = self.supervised(model, x_adv, y, defense, "adversarial")
        return clean_loss + adversarial_loss, clean_logits


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
    # The uniform start is drawn here rather than by pgd_attack (same draw, same values) because
    # `start_point` draws per example for the global batch under data parallelism.
    x_start = start_point(x, "uniform" if random_start else "none", eps, generator)
    with crafting(model, bn_mode) as forward:
        # Without best-iterate tracking every step forwards the whole batch, so y lines up.
        x_adv = pgd_attack(lambda inputs: forward(inputs, y), x, y, eps=eps, alpha=alpha, steps=steps,
                           random_start=False, x_start=x_start, loss=loss, generator=generator, track_best=False)
    return x_adv.detach()


# -- shared pieces of the methods below ----------------------------------------------------


@dataclass
class InnerAttack:
    """The inner maximisation's budget and conventions, validated once for every method."""

    eps: Fraction | float
    alpha: Fraction | float
    steps: int
    start: str
    bn_mode: str

    @classmethod
    def checked(
        cls, eps: Fraction | float, alpha: Fraction | float | None, steps: int, start: str, bn_mode: str
    ) -> InnerAttack:
        """Validate the user's values; alpha None = eps/4 (2/255 at 8/255, the Madry/Rice step)."""
        number("eps", eps, above=0, at_most=1)
        if alpha is None:
            alpha = eps / 4 if isinstance(eps, float) else Fraction(eps) / 4
        number("alpha", alpha, above=0, at_most=1)
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
        if start not in STARTS:
            raise ValueError(f"start must be one of {', '.join(STARTS)}, got {start!r}")
        if bn_mode not in BN_MODES:
            raise ValueError(f"bn_mode must be one of {', '.join(BN_MODES)}, got {bn_mode!r}")
        return cls(eps, alpha, steps, start, bn_mode)

    def begin(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return start_point(x, self.start, float(self.eps), generator)

    def ascend(self, forward, objective: Objective, x: torch.Tensor, y: torch.Tensor,
               generator: torch.Generator) -> torch.Tensor:
        """`steps` sign-gradient steps from this attack's start point; the last iterate."""
        x_adv = pgd_attack(lambda inputs: forward(inputs, y), x, y, eps=float(self.eps), alpha=float(self.alpha),
                           steps=self.steps, loss=objective, x_start=self.begin(x, generator), track_best=False)
        return x_adv.detach()


@dataclass
class TwoPasses:
    """Final logits and auxiliary heads of the natural and the adversarial forward pass."""

    natural: torch.Tensor
    natural_heads: dict[str, torch.Tensor]
    adversarial: torch.Tensor
    adversarial_heads: dict[str, torch.Tensor]
    extra: torch.Tensor | None  # the defense's non-head losses, on the adversarial pass


def two_passes(model: Classifier, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor, defense: Defense) -> TwoPasses:
    """Train-mode forwards on x then x' with the labels, reading each pass's heads right after it.

    The adversarial pass comes last so that `extra_aux_loss` (which reads the last pass, e.g.
    FSR's separation loss and its y' from the final logits) sees the inputs AT trains on.
    """
    with model.labels(y):
        with model.route("clean"):
            natural = model(x)
            natural_heads = dict(defense.aux_logits(model))
        with model.route("adversarial"):
            adversarial = model(x_adv)
            adversarial_heads = dict(defense.aux_logits(model))
            extra = defense.extra_aux_loss(model, y)
    return TwoPasses(natural, natural_heads, adversarial, adversarial_heads, extra)


def _plus(loss: torch.Tensor, extra: torch.Tensor | None) -> torch.Tensor:
    return loss if extra is None else loss + extra


def _ce_objective(model: Classifier, defense: Defense) -> Objective:
    """The defense's CE-form inner objective (heads included when it asks), else CE on the final logits."""
    return defense.training_attack_objective(model) or cross_entropy_objective


# -- TRADES, MART, FAT ---------------------------------------------------------------------


@TRAINING.register("trades")
class TRADES(TrainingMethod):
    """TRADES (Zhang et al. 2019): CE(x) + beta*KL(p(x)||p(x')), x' = PGD-10 on the KL; beta 6, eps 8/255."""

    name = "trades"

    def __init__(
        self,
        *,
        beta: float = 6.0,
        eps: Fraction = EIGHT_255,
        alpha: Fraction | None = None,
        steps: int = 10,
        start: str = "normal",
        bn_mode: str = "eval",
    ) -> None:
        """
        beta: weight of the KL term (TRADES paper and EWAS code: 6 on CIFAR-10; the CAS code: 4).
        eps, alpha, steps: the inner attack (alpha None = eps/4; TRADES code: 0.007 at eps 0.031).
        start: "normal" = x + 0.001 N(0,1) (TRADES code), "uniform" in the eps-ball, or "none".
        bn_mode: "eval" = crafted in eval mode (TRADES `trades_loss`, CAS and EWAS code), "train" =
            an earlier `trades.py` revision, which never switched modes.
        """
        self.beta = number("beta", beta, at_least=0)
        self.inner = InnerAttack.checked(eps, alpha, steps, start, bn_mode)
        self.eps = self.inner.eps  # the trainer's validation attack uses the training eps

    def loss(
        self, model: Classifier, x: torch.Tensor, y: torch.Tensor, defense: Defense, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.outer(model, x, self.craft(model, x, y, defense, generator), y, defense)

    def craft(self, model: Classifier, x: torch.Tensor, y: torch.Tensor, defense: Defense,
              generator: torch.Generator) -> torch.Tensor:
        """x' maximising KL(p(x) || p(x')) (+ the heads' KL when the defense crafts on its heads)."""
        inner = self.inner
        with crafting(model, inner.bn_mode) as forward:
            with torch.no_grad():
                natural = forward(x, y).detach()
                natural_heads = {k: v.detach() for k, v in defense.aux_logits(model).items()}
            objective = kl_attack_objective(natural, natural_heads, lambda: defense.aux_logits(model),
                                            defense.attack_aux_weight())
            return inner.ascend(forward, objective, x, y, generator)

    def outer(self, model: Classifier, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor,
              defense: Defense) -> tuple[torch.Tensor, torch.Tensor]:
        """CE(h(x), y) + beta KL(h(x) || h(x')) for the final logits and, weighted, each head."""
        passes = two_passes(model, x, x_adv, y, defense)
        loss = trades_form(passes.natural, passes.adversarial, y, self.beta)
        loss = with_heads(loss, passes.natural_heads, passes.adversarial_heads, defense.aux_weight(),
                          lambda nat, adv: trades_form(nat, adv, y, self.beta))
        return _plus(loss, passes.extra), passes.adversarial


@TRAINING.register("mart")
class MART(TrainingMethod):
    """MART (Wang et al. 2020): boosted CE(x') + lam*KL(p(x)||p(x'))*(1-p_y(x)), x' = PGD-10 on CE; lam 6."""

    name = "mart"

    def __init__(
        self,
        *,
        lam: float = 6.0,
        eps: Fraction = EIGHT_255,
        alpha: Fraction | None = None,
        steps: int = 10,
        start: str = "normal",
        bn_mode: str = "eval",
        aux_kl_weight: str = "head",
    ) -> None:
        """
        lam: weight of the KL term (MART code's `beta`: 6, also the EWAS code's; the CAS code: 5).
        eps, alpha, steps: the inner attack (alpha None = eps/4; MART code: 0.007 at eps 0.031).
        start: "normal" = x + 0.001 N(0,1) (MART code), "uniform" or "none".
        bn_mode: "eval" = crafted in eval mode (MART, CAS and EWAS code), or "train".
        aux_kl_weight: what weights each head's KL: "head" = that head's own 1 - p_y (CAS Table 7,
            EWAS Table 1), "main" = the final classifier's (official MART+CAS / MART+EWAS code).
        """
        self.lam = number("lam", lam, at_least=0)
        if aux_kl_weight not in MART_KL_WEIGHTS:
            raise ValueError(f"aux_kl_weight must be one of {', '.join(MART_KL_WEIGHTS)}, got {aux_kl_weight!r}")
        self.aux_kl_weight = aux_kl_weight
        self.inner = InnerAttack.checked(eps, alpha, steps, start, bn_mode)
        self.eps = self.inner.eps

    def loss(
        self, model: Classifier, x: torch.Tensor, y: torch.Tensor, defense: Defense, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.outer(model, x, self.craft(model, x, y, defense, generator), y, defense)

    def craft(self, model: Classifier, x: torch.Tensor, y: torch.Tensor, defense: Defense,
              generator: torch.Generator) -> torch.Tensor:
        """x' maximising CE, or the defense's CE-form training objective."""
        inner = self.inner
        with crafting(model, inner.bn_mode) as forward:
            return inner.ascend(forward, _ce_objective(model, defense), x, y, generator)

    def outer(self, model: Classifier, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor,
              defense: Defense) -> tuple[torch.Tensor, torch.Tensor]:
        """BCE(h(x'), y) + lam KL(h(x) || h(x')) (1 - p_y) for the final logits and each head."""
        passes = two_passes(model, x, x_adv, y, defense)
        loss = mart_form(passes.natural, passes.adversarial, y, self.lam)
        weight_logits = passes.natural if self.aux_kl_weight == "main" else None
        loss = with_heads(loss, passes.natural_heads, passes.adversarial_heads, defense.aux_weight(),
                          lambda nat, adv: mart_form(nat, adv, y, self.lam, weight_logits))
        return _plus(loss, passes.extra), passes.adversarial


@TRAINING.register("fat")
class FAT(TrainingMethod):
    """FAT (Zhang et al. 2020): CE on PGD-10 examples stopped tau steps after misclassification; tau 0."""

    name = "fat"

    def __init__(
        self,
        *,
        tau: int = 0,
        eps: Fraction = EIGHT_255,
        alpha: Fraction | None = None,
        steps: int = 10,
        omega: float = 0.001,
        start: str = "uniform",
        bn_mode: str = "eval",
    ) -> None:
        """
        tau: extra steps allowed after an example is first misclassified (FAT code: 0; its dynamic
            schedule 0/1/2 at epochs 50/90 of 120 needs the epoch, which methods are not given).
        eps, alpha, steps: the inner attack (alpha None = eps/4; FAT code: 0.007 at eps 0.031).
        omega: std of the Gaussian noise added to each step (FAT code: 0.001; 0 = plain PGD steps).
        start: "uniform" in the eps-ball (FAT code for FAT-AT), "normal" (its FAT-TRADES) or "none".
        bn_mode: "eval" = crafted in eval mode (FAT code), or "train".
        """
        if isinstance(tau, bool) or not isinstance(tau, int) or tau < 0:
            raise ValueError(f"tau must be an integer >= 0, got {tau!r}")
        self.tau = tau
        self.omega = number("omega", omega, at_least=0)
        self.inner = InnerAttack.checked(eps, alpha, steps, start, bn_mode)
        self.eps = self.inner.eps

    def loss(
        self, model: Classifier, x: torch.Tensor, y: torch.Tensor, defense: Defense, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.supervised(model, self.craft(model, x, y, defense, generator), y, defense, "adversarial")

    def craft(self, model: Classifier, x: torch.Tensor, y: torch.Tensor, defense: Defense,
              generator: torch.Generator) -> torch.Tensor:
        """Friendly x': each example stops at its (tau+1)-th misclassified iterate, or after `steps`."""
        inner = self.inner
        with crafting(model, inner.bn_mode) as forward:
            x_adv, _ = early_stopped_ascent(
                forward, _ce_objective(model, defense), x, y, inner.begin(x, generator),
                eps=float(inner.eps), alpha=float(inner.alpha), steps=inner.steps, tau=self.tau,
                omega=self.omega, generator=generator, whole_batch=inner.bn_mode == "train",
            )
        return x_adv
