"""Transfer attack: adversarial examples crafted on another trained run (the surrogate).

A defense that masks its own gradients still misclassifies points crafted on a model whose
gradients are honest; transfer examples breaking points that every white-box attack missed are
one of the clearest masking signals (evaluation-rigor.md S9, Athalye et al. 2018). The surrogate
is another run in the same store — typically an undefended or null-module model of the same
architecture and recipe — loaded through the same eval-mode, label-free view as any model.
"""

from __future__ import annotations

from fractions import Fraction

import torch

from advdef.attacks.base import Attack, AttackContext, LogitsView
from advdef.attacks.pgd import EIGHT_255, pgd_attack
from advdef.errors import UserError
from advdef.registry import ATTACKS


@ATTACKS.register("transfer")
class Transfer(Attack):
    """Transfer from another run: PGD-20 (CE, random start, last iterate) on run `from`, scored on this model; `transfer:from=RUN_ID`."""

    name = "transfer"
    family = "transfer"
    spec_aliases = {"from": "source"}

    def __init__(
        self,
        *,
        source: str,
        eps: Fraction = EIGHT_255,
        steps: int = 20,
        loss: str = "ce",
        epoch: int | None = None,
    ) -> None:
        """
        source: run id of the surrogate (`from=` works too); it must be in the evaluated store and
            share the evaluated run's input shape and classes.
        steps, loss: the PGD run on the surrogate (step eps/4, random start). The LAST
            iterate is returned, not the first one the surrogate misclassifies: points just across
            the surrogate's boundary transfer poorly.
        epoch: the surrogate's checkpoint (default: its selected best epoch).
        """
        super().__init__(eps=eps)
        if not isinstance(source, str) or not source:
            raise ValueError("transfer needs the surrogate's run id: transfer:from=RUN_ID")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
        if loss not in ("ce", "margin"):
            raise ValueError(f"loss must be 'ce' or 'margin', got '{loss}'")
        self.source = source
        self.steps = steps
        self.loss = loss
        self.epoch = epoch
        self._surrogate: LogitsView | None = None

    def bind(self, context: AttackContext) -> None:
        """Load the surrogate run's model from the evaluated store, in eval mode."""
        from advdef.training.trainer import load_run_model

        if context.store is None:
            raise UserError("transfer attacks need the store holding the surrogate run; run them through `advdef evaluate`")
        if self.source == context.run.get("run_id"):
            raise UserError(f"transfer:from={self.source} is the evaluated run itself; name another run (`advdef report` lists them)")
        surrogate_run = context.store.get_run(self.source)
        built, _ = load_run_model(surrogate_run, context.device, self.epoch)
        target_shape = tuple(getattr(context.model, "input_shape", ()))
        source_shape = tuple(built.model.input_shape)
        if target_shape and source_shape != target_shape:
            raise UserError(
                f"transfer:from={self.source} takes inputs of shape {source_shape}, the evaluated model {target_shape}"
            )
        if built.model.num_classes != getattr(context.model, "num_classes", built.model.num_classes):
            raise UserError(f"transfer:from={self.source} has {built.model.num_classes} classes, the evaluated model "
                            f"{context.model.num_classes}")
        self._surrogate = LogitsView(built.model.eval())

    def perturb(self, view, x, y, generator):
        if self._surrogate is None:
            raise RuntimeError("transfer attacks need their surrogate loaded: run them through `advdef evaluate`")
        with torch.enable_grad():
            return pgd_attack(self._surrogate, x, y, eps=float(self.eps), alpha=float(self.eps) / 4, steps=self.steps,
                              loss=self.loss, generator=generator, track_best=False)
