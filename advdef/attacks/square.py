"""Square Attack (Andriushchenko et al., ECCV 2020) run through the official `pyautoattack` code.

Square is a score-based black-box attack: it only reads the logits, proposing random squares of
+-eps updates and keeping those that lower the margin z_y - max_{j!=y} z_j. It never touches a
gradient, so a defense that masks or shatters gradients (non-differentiable layers, saturated
softmax, randomness) cannot hide from it; Square beating the white-box attacks is the classic
symptom of gradient masking (AutoAttack's own check, evaluation-rigor §1.5).
"""

from __future__ import annotations

from fractions import Fraction

from advdef.attacks.base import Attack, InstanceCanonical
from advdef.attacks.official import official_version, run_official
from advdef.attacks.pgd import EIGHT_255
from advdef.registry import ATTACKS
from advdef.validation import number, whole


@ATTACKS.register("square")
class Square(InstanceCanonical, Attack):
    """Square Attack (Andriushchenko et al. 2020), official pyautoattack code: gradient-free random search on the margin, 5000 queries, p_init 0.8, 1 restart (AA standard)."""

    name = "square"
    family = "black-box"

    def __init__(
        self,
        *,
        eps: Fraction = EIGHT_255,
        queries: int = 5000,
        p_init: float = 0.8,
        restarts: int = 1,
    ) -> None:
        super().__init__(eps=eps)
        self.queries = whole("queries", queries)
        self.p_init = number("p_init", p_init, above=0, at_most=1)  # a float: one canonical spec
        self.restarts = whole("restarts", restarts)
        self.warnings: list[str] = []



    @property
    def implementation(self) -> str:
        return f"{official_version()} SquareAttack (official Square)"

    def perturb(self, view, x, y, generator):
        def build(model, seed, device, logger):
            from pyautoattack.square import SquareAttack

            # As in AutoAttack standard: margin loss and the square-size schedule of the paper
            # (not rescaled to the query budget).
            return SquareAttack(model, norm="Linf", n_queries=self.queries, eps=float(self.eps),
                                p_init=self.p_init, n_restarts=self.restarts, seed=seed, loss="margin",
                                resc_schedule=False, device=device)

        x_adv, self.warnings = run_official(build, view, x, y, generator)
        return x_adv
