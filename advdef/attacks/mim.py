"""MI-FGSM, the momentum iterative attack (Dong et al., CVPR 2018), l-inf.

Each step accumulates the L1-normalised gradient into a momentum buffer,
g <- mu g + grad / ||grad||_1 (per example), and moves alpha along sign(g). Momentum was designed
to escape poor local maxima and to transfer better between models; as a white-box attack it is
usually no stronger than PGD, so it is a cross-check, not a replacement. The paper's setting is
10 steps of eps/10, mu = 1, no random start. Like PGD here, an example keeps the first iterate that
is misclassified (best-iterate tracking), so the attack never "forgets" a success.
"""

from __future__ import annotations

from fractions import Fraction

import torch

from advdef.attacks.base import Attack, InstanceCanonical
from advdef.attacks.losses import cross_entropy, margin
from advdef.attacks.pgd import EIGHT_255, Forward, _record, project
from advdef.registry import ATTACKS
from advdef.validation import flag, number, whole

LOSSES = ("ce", "margin")


def mim_attack(
    forward: Forward,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    alpha: float,
    steps: int,
    mu: float = 1.0,
    random_start: bool = False,
    restarts: int = 1,
    loss: str = "ce",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """l-inf MI-FGSM maximising `loss` ("ce" or the per-example CW margin with kappa 0).

    Returns per example the first misclassified iterate, else the iterate of highest loss;
    restarts (random start only) run on the examples still unbroken.
    """
    objective = cross_entropy if loss == "ce" else margin
    best = x.clone()
    best_loss = torch.full((len(x),), float("-inf"), device=x.device)
    broken = torch.zeros(len(x), dtype=torch.bool, device=x.device)
    for _ in range(restarts):
        active = torch.nonzero(~broken).flatten()
        if len(active) == 0:
            break
        x_orig, y_active = x[active], y[active]
        if random_start:
            noise = torch.rand(x_orig.shape, generator=generator).to(x.device, x.dtype)
            x_adv = project(x_orig + (2 * noise - 1) * eps, x_orig, eps)
        else:
            x_adv = x_orig.clone()
        momentum = torch.zeros_like(x_orig)
        for step in range(steps + 1):  # the extra pass scores the last iterate
            x_adv.requires_grad_(True)
            with torch.enable_grad():
                logits = forward(x_adv)
                per_example = objective(logits, y_active)
                gradient = torch.autograd.grad(per_example.sum(), x_adv)[0] if step < steps else None
            x_adv = x_adv.detach()
            _record(best, best_loss, broken, active, x_adv, per_example.detach(), logits.detach().argmax(1) != y_active)
            if gradient is None:
                break
            l1 = gradient.abs().flatten(1).sum(1).clamp_min(1e-12).view(-1, *[1] * (x.dim() - 1))
            momentum = mu * momentum + gradient / l1
            x_adv = project(x_adv + alpha * momentum.sign(), x_orig, eps)
    return best


@ATTACKS.register("mim")
class MIM(InstanceCanonical, Attack):
    """MI-FGSM (Dong et al. 2018), l-inf: momentum mu 1.0 on L1-normalised gradients, 10 steps of eps/10, no random start (as the paper), loss ce|margin, best iterate kept."""

    name = "mim"

    def __init__(
        self,
        *,
        eps: Fraction = EIGHT_255,
        steps: int = 10,
        mu: float = 1.0,
        alpha: Fraction | float | None = None,
        random_start: bool = False,
        restarts: int = 1,
        loss: str = "ce",
    ) -> None:
        super().__init__(eps=eps)
        self.steps = whole("steps", steps)
        self.mu = number("mu", mu, at_least=0)
        if alpha is not None:
            number("alpha", alpha, above=0, at_most=1)
        self.alpha = Fraction(eps) / self.steps if alpha is None else alpha  # the paper: eps / T
        self.random_start = flag("random_start", random_start)
        self.restarts = whole("restarts", restarts)
        if self.restarts > 1 and not self.random_start:
            raise ValueError("restarts > 1 needs random_start=true (without it every restart repeats the same path)")
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {loss!r}")
        self.loss = loss


    def perturb(self, view, x, y, generator):
        return mim_attack(view, x, y, eps=float(self.eps), alpha=float(self.alpha), steps=self.steps, mu=self.mu,
                          random_start=self.random_start, restarts=self.restarts, loss=self.loss,
                          generator=generator)
