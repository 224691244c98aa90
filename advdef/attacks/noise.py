"""Uniform random noise in the eps-ball: the gradient-free control of an evaluation.

A point that random noise breaks but a white-box attack left standing means the white-box attack
failed (masked gradients, a bug, a bad step size) — Carlini et al. 2019's sanity check. Noise is
never a robustness estimate by itself: it is far weaker than any real attack.
"""

from __future__ import annotations

from fractions import Fraction

import torch

from advdef.validation import whole
from advdef.attacks.base import Attack
from advdef.attacks.pgd import EIGHT_255, project
from advdef.registry import ATTACKS

# At most this many images per forward pass (draws are batched: a chunk of draws x the batch).
FORWARD_IMAGES = 512


def noise_attack(
    forward, x: torch.Tensor, y: torch.Tensor, *, eps: float, draws: int, generator: torch.Generator
) -> torch.Tensor:
    """Per example, the first of `draws` points x + U(-eps, eps)^d (clipped to [0,1]) that is
    misclassified, else the last draw.

    Every draw is generated for the whole batch whether or not an example is already broken, so
    an example's draws do not depend on the others; only unbroken examples are scored.
    """
    n = len(x)
    result = x.clone()
    broken = torch.zeros(n, dtype=torch.bool, device=x.device)
    chunk = max(1, min(draws, FORWARD_IMAGES // max(n, 1)))
    for start in range(0, draws, chunk):
        count = min(chunk, draws - start)
        uniform = torch.rand((count, *x.shape), generator=generator).to(x.device, x.dtype)
        candidates = project(x + (2 * uniform - 1) * eps, x, eps)  # (count, n, ...)
        active = torch.nonzero(~broken).flatten()
        if len(active) == 0:
            break
        trial = candidates[:, active]
        with torch.no_grad():
            logits = forward(trial.reshape(count * len(active), *x.shape[1:]))
        wrong = (logits.argmax(1) != y[active].repeat(count)).reshape(count, len(active))
        hit = wrong.any(0)
        first = wrong.float().argmax(0)  # index of the first misclassified draw (0 when none)
        last_draw = start + count == draws
        pick = torch.where(hit, first, torch.full_like(first, count - 1))
        take = hit | last_draw
        rows = active[take]
        result[rows] = trial[pick[take], torch.nonzero(take).flatten()]
        broken[active[hit]] = True
    return result


@ATTACKS.register("noise")
class UniformNoise(Attack):
    """Uniform noise control: 100 draws x + U(-eps, eps)^d per example, first misclassified kept; gradient-free check that white-box attacks miss nothing noise finds."""

    name = "noise"
    family = "black-box"

    def __init__(self, *, eps: Fraction = EIGHT_255, draws: int = 100) -> None:
        super().__init__(eps=eps)
        self.draws = whole("draws", draws)

    @classmethod
    def canonical_params(cls, params: dict) -> dict:
        """The registry's canonical form is exactly what an instance stores, plus eps."""
        return {**cls(**params).params, "eps": params["eps"]}

    def perturb(self, view, x, y, generator):
        return noise_attack(view, x, y, eps=float(self.eps), draws=self.draws, generator=generator)
