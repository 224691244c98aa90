"""Projected gradient descent in the l-inf ball, and the attacks built on it (FGSM, PGD, CW).

One implementation serves evaluation and adversarial training. It keeps, per example, any
iterate that is misclassified (AutoAttack's best-adversarial tracking), so an attack that passes
through an adversarial point never "forgets" it; restarts run only on points still unbroken.
"""

from __future__ import annotations

from collections.abc import Callable
from fractions import Fraction

import torch

from advdef.attacks.base import Attack
from advdef.attacks.losses import cross_entropy, margin
from advdef.registry import ATTACKS

Forward = Callable[[torch.Tensor], torch.Tensor]
Objective = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (logits, labels) -> per-example loss
EIGHT_255 = Fraction(8, 255)


def pgd_attack(
    forward: Forward,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    alpha: float,
    steps: int,
    random_start: bool = True,
    restarts: int = 1,
    loss: str | Objective = "ce",
    kappa: float = 0.0,
    generator: torch.Generator | None = None,
    track_best: bool = True,
    x_start: torch.Tensor | None = None,
    eot: int = 1,
    targets: torch.Tensor | None = None,
    shrink: bool = True,
) -> torch.Tensor:
    """l-inf PGD maximising `loss`; returns adversarial inputs within eps of x and in [0,1].

    `loss` is "ce", "margin" (CW, clamped at kappa) or a callable (logits, labels) -> per-example
    loss, e.g. a defense's joint loss that also reads its auxiliary outputs. With `track_best`, an
    example's result is the first iterate found misclassified (else the iterate of highest loss);
    without it (adversarial training), the last iterate. `x_start` replaces the random/no start
    with a caller-chosen first iterate (e.g. TRADES' x + 0.001 N(0,1)).

    `targets` (one class per example) makes the attack targeted: it descends the CE (or the
    targeted margin) towards them, while an example still counts as broken when it is
    misclassified as any class (robust accuracy stays untargeted).

    `eot` = K > 1 is Expectation over Transformation (Athalye et al. 2018) for stochastic models:
    each step follows the mean gradient of K independent forward/backward passes, K times the
    cost. Best-iterate tracking and the misclassification check use the first pass's logits.

    `shrink` (with `track_best`): examples found misclassified leave the batch at once, so they
    stop costing forward/backward passes. Their result is already fixed (the first misclassified
    iterate), and in eval mode each example's forward is independent of its batch-mates, so the
    returned points are the same as without shrinking; only a stochastic model's random draws
    (which depend on the batch size) differ.
    """
    eot = check_eot(eot)

    def objective(logits: torch.Tensor) -> torch.Tensor:
        if targets is not None:  # towards the target class; success is still any misclassification
            t_active = targets[active]
            return -cross_entropy(logits, t_active) if loss == "ce" else _targeted_margin(logits, t_active, kappa)
        if callable(loss):
            return loss(logits, y_active)
        return cross_entropy(logits, y_active) if loss == "ce" else margin(logits, y_active, kappa)

    best = x.clone()
    best_loss = torch.full((len(x),), float("-inf"), device=x.device)
    broken = torch.zeros(len(x), dtype=torch.bool, device=x.device)
    for _ in range(restarts):
        active = torch.nonzero(~broken).flatten() if track_best else torch.arange(len(x), device=x.device)
        if len(active) == 0:
            break
        x_orig, y_active = x[active], y[active]
        if x_start is not None:
            x_adv = x_start[active].detach().clone()
        elif random_start:
            noise = torch.rand(x_orig.shape, generator=generator).to(x.device, x.dtype)
            delta = (2 * noise - 1) * eps
            x_adv = (x_orig + delta).clamp(0, 1)
        else:
            x_adv = x_orig.clone()
        # With best-tracking, one extra forward scores the last iterate; training skips it.
        for step in range(steps + 1 if track_best else steps):
            x_adv.requires_grad_(True)
            with torch.enable_grad():
                logits = forward(x_adv)
                per_example = objective(logits)
                gradient = None
                if step < steps:
                    gradient = torch.autograd.grad(per_example.sum(), x_adv)[0]
                    for _ in range(eot - 1):  # further draws of the model's randomness
                        gradient = gradient + torch.autograd.grad(objective(forward(x_adv)).sum(), x_adv)[0]
                    gradient = gradient / eot
            x_adv = x_adv.detach()
            if track_best:
                _record(best, best_loss, broken, active, x_adv, per_example.detach(), logits.detach().argmax(1) != y_active)
            if gradient is None:
                break
            x_adv = x_adv + alpha * gradient.sign()
            x_adv = project(x_adv, x_orig, eps)
            if track_best and shrink:
                open_rows = ~broken[active]
                if not bool(open_rows.all()):
                    active, x_adv, x_orig, y_active = active[open_rows], x_adv[open_rows], x_orig[open_rows], y_active[open_rows]
                    if len(active) == 0:
                        break
        if not track_best:
            best[active] = x_adv
    return best


def _targeted_margin(logits: torch.Tensor, targets: torch.Tensor, kappa: float) -> torch.Tensor:
    """Per-example targeted CW margin to maximise: z_t - max_{j != t} z_j, clamped at kappa."""
    target_logit = logits.gather(1, targets[:, None]).squeeze(1)
    others = logits.masked_fill(torch.nn.functional.one_hot(targets, logits.shape[1]).bool(), float("-inf"))
    return (target_logit - others.amax(1)).clamp(max=kappa)


TARGET_RULES = ("none", "random", "least_likely")


def choose_targets(rule: str, view: Forward, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator) -> torch.Tensor | None:
    """One wrong class per example: uniformly random ("random", the feature-denoising protocol) or
    the clean input's least likely class ("least_likely"); None for untargeted attacks."""
    if rule == "none":
        return None
    if rule == "random":
        with torch.no_grad():
            classes = view(x[:1]).shape[1]
        shift = torch.randint(1, classes, (len(y),), generator=generator).to(y.device)
        return (y + shift) % classes
    with torch.no_grad():
        return view(x).argmin(1)


def check_eot(eot: object) -> int:
    """EOT sample count: a whole number >= 1 (1 = one pass per step, plain PGD)."""
    if isinstance(eot, bool) or not isinstance(eot, int) or eot < 1:
        raise ValueError(f"eot must be a whole number >= 1 (forward/backward passes per step), got {eot!r}")
    return eot


# Options added after results were first stored: at these defaults they are left out of the
# canonical spec, so earlier results keep matching.
LATER_DEFAULTS = {"eot": 1, "targeted": "none"}


def without_default_eot(params: dict) -> dict:
    """Attack params minus options added later (`eot`, `targeted`) at their defaults, so specs
    (and stored results) of attacks that do not use them keep their canonical text."""
    for key, default in LATER_DEFAULTS.items():
        if key in params and params[key] == default:
            params.pop(key)
    return params


def project(x_adv: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
    """Back into the l-inf ball of radius eps around x, and into [0, 1]."""
    return torch.min(torch.max(x_adv, x - eps), x + eps).clamp(0, 1)


def _record(
    best: torch.Tensor,
    best_loss: torch.Tensor,
    broken: torch.Tensor,
    active: torch.Tensor,
    x_adv: torch.Tensor,
    loss: torch.Tensor,
    misclassified: torch.Tensor,
) -> None:
    """Keep the first misclassified iterate per example, else the highest-loss one."""
    newly_broken = misclassified & ~broken[active]
    better = (loss > best_loss[active]) & ~broken[active]
    take = newly_broken | better
    rows = active[take]
    best[rows] = x_adv[take]
    best_loss[rows] = loss[take]
    broken[active[newly_broken]] = True


@ATTACKS.register("fgsm")
class FGSM(Attack):
    """FGSM (Goodfellow et al. 2015): one eps-step on the sign of the CE gradient, no random start; `eot=K` averages K gradients."""

    name = "fgsm"
    _shrink: bool = True  # as PGD's: a clean-misclassified example skips the final scoring pass

    def __init__(self, *, eps: Fraction = EIGHT_255, eot: int = 1) -> None:
        super().__init__(eps=eps)
        self.eot = check_eot(eot)

    @property
    def params(self):
        return without_default_eot(super().params)

    def perturb(self, view, x, y, generator):
        return pgd_attack(view, x, y, eps=float(self.eps), alpha=float(self.eps), steps=1,
                          random_start=False, generator=generator, eot=self.eot, shrink=self._shrink)


@ATTACKS.register("pgd", shorthand="steps")
class PGD(Attack):
    """PGD (Madry et al. 2018), l-inf: random start, step eps/4 (2/255 at 8/255), CE loss, best iterate kept; `pgd20` = 20 steps, `eot=K` for stochastic models."""

    name = "pgd"
    # Drop broken examples from the batch inside the iterations (same results, less compute);
    # private so it is not a parameter of the spec: benchmarks turn it off to measure the gain.
    _shrink: bool = True

    def __init__(
        self,
        *,
        eps: Fraction = EIGHT_255,
        steps: int = 20,
        alpha: Fraction | float | None = None,
        restarts: int = 1,
        random_start: bool = True,
        loss: str = "ce",
        kappa: float = 0.0,
        eot: int = 1,
        targeted: str = "none",
    ) -> None:
        """targeted: "none", "random" (a uniformly random wrong class per example, the feature-
        denoising papers' protocol) or "least_likely"; a targeted attack still counts any
        misclassification as a break, and its results are stored under its own spec."""
        super().__init__(eps=eps)
        if targeted not in TARGET_RULES:
            raise ValueError(f"targeted must be one of {', '.join(TARGET_RULES)}, got '{targeted}'")
        self.targeted = targeted
        if steps < 1 or restarts < 1:
            raise ValueError("steps and restarts must be at least 1")
        if loss not in ("ce", "margin"):
            raise ValueError(f"loss must be 'ce' or 'margin', got '{loss}'")
        if alpha is not None and not 0 < alpha <= 1:
            raise ValueError(f"alpha must be in (0, 1], got {alpha}")
        self.steps = steps
        self.alpha = Fraction(eps) / 4 if alpha is None else alpha  # 2/255 at eps 8/255
        self.restarts = restarts
        self.random_start = random_start
        self.loss = loss
        self.kappa = kappa
        self.eot = check_eot(eot)

    @property
    def params(self):
        return without_default_eot(super().params)

    def perturb(self, view, x, y, generator):
        return pgd_attack(
            view, x, y, eps=float(self.eps), alpha=float(self.alpha),
            steps=self.steps, random_start=self.random_start, restarts=self.restarts,
            loss=self.loss, kappa=float(self.kappa), generator=generator, eot=self.eot,
            targets=choose_targets(self.targeted, view, x, y, generator), shrink=self._shrink,
        )


@ATTACKS.register("cw")
class CW(PGD):
    """CW-inf as in the seed papers' tables: PGD-30 on the per-example CW margin loss, kappa 50; `eot=K` as PGD."""

    name = "cw"

    def __init__(
        self,
        *,
        eps: Fraction = EIGHT_255,
        steps: int = 30,
        alpha: Fraction | float | None = None,
        restarts: int = 1,
        random_start: bool = True,
        kappa: float = 50.0,
        eot: int = 1,
    ) -> None:
        super().__init__(eps=eps, steps=steps, alpha=alpha, restarts=restarts,
                         random_start=random_start, loss="margin", kappa=kappa, eot=eot)

    @property
    def params(self):
        params = super().params
        params.pop("loss")
        return params
