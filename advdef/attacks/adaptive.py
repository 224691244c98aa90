"""Adaptive attacks generated from a defense plugin's declarations (evaluation-rigor menu A2-A6).

Feature-level defenses (CAS, CIFS, FSR, EWAS) route features through masks chosen by the argmax
of auxiliary heads, or through saturated / detached masks. Their final logits then carry
gradients that never say "this mask could switch", so an attack on the final logits alone
overstates robustness. A careful attacker instead targets what the defense declares:

    head       CE (or margin) of one auxiliary head, or the mean over heads, alone   (A3)
    joint      L(final) + weight * mean_h L(head_h); weight = inf: heads only       (A2)
    forced     L(final, y) - sum_h CE(head_h, t), t = the clean input's top wrong    (A4)
               class: drives the mask-selecting heads, hence the masks, to class t
    surrogate  L(final) under a named gradient surrogate of the defense (BPDA soft
               selection, raised mask temperature, un-detached masks)                (A5, A6)

`adaptive_suite(defense)` lists the specs that fit a defense; the evaluation takes the per-sample
worst case over them and the ordinary attacks. The attacks read the heads the defense exposes
(`Defense.attack_heads`) after each forward of the eval-mode model; labels never reach the model.

Every iterate is judged on the real defended model's final logits, outside any surrogate
context (EWAS.relaxed changes the forward, not only the gradient), so a point that only fools a
surrogate is never reported as found. The loop is our own rather than `pgd_attack` for exactly
that: crafting and judging may need different forwards. Per example it keeps the first iterate
the real model misclassifies, else the one closest to its decision boundary.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from fractions import Fraction
from typing import Any

import torch
import torch.nn.functional as F

from advdef.attacks.base import Attack, AttackContext, LogitsView
from advdef.attacks.losses import cross_entropy, margin
from advdef.attacks.pgd import EIGHT_255, project
from advdef.errors import UserError
from advdef.registry import ATTACKS
from advdef.specs import format_value, parse_value

MODES = ("head", "joint", "forced", "surrogate")
LOSS_NAMES = ("ce", "margin")
MEAN = "mean"  # head=mean: the mean over all attack heads
# The suite's weight sweep. weight=inf (heads only) is accepted but not listed: it is exactly
# head=mean (or the single head), which the suite already runs.
JOINT_WEIGHTS = (0.1, 1.0, 10.0)
UNBOUND = "adaptive attacks need the defended model: run them through `advdef evaluate`"
_UNSAFE_VALUE = re.compile(r"[,;\s]")  # characters that would split a spec value

# (final logits, head logits by key, labels, per-example targets or None) -> per-example loss.
Objective = Callable[[torch.Tensor, dict[str, torch.Tensor], torch.Tensor, torch.Tensor | None], torch.Tensor]


class AdaptiveError(UserError, ValueError):
    """An adaptive attack that does not fit the defense it is bound to (one line in the CLI)."""


def _per_example(loss: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """CE or the CW margin clamped at kappa 0, per example, in float32."""
    if loss == "ce":
        return lambda logits, labels: cross_entropy(logits.float(), labels)
    return lambda logits, labels: margin(logits.float(), labels, 0.0)


def _weight(value: Any) -> float | None:
    """A joint weight >= 0, `inf` allowed (spec text `inf` parses to the string "inf")."""
    if value is None:
        return None
    if isinstance(value, str) and value.strip().lower() in ("inf", "infinity"):
        return math.inf
    if isinstance(value, bool) or not isinstance(value, (int, float, Fraction)):
        raise ValueError(f"weight must be a number >= 0 or inf, got {value!r}")
    weight = float(value)
    if not weight >= 0:
        raise ValueError(f"weight must be a number >= 0 or inf, got {value!r}")
    return weight


@ATTACKS.register("adaptive")
class Adaptive(Attack):
    """Adaptive attacks on a defense's aux heads, mask selection and gradient surrogates (mode=head|joint|forced|surrogate); `adaptive` alone = the defense's suite."""

    name = "adaptive"
    family = "adaptive"

    def __init__(
        self,
        *,
        eps: Fraction = EIGHT_255,
        mode: str | None = None,
        head: str | int | None = None,
        weight: float | str | None = None,
        surrogate: str | None = None,
        loss: str = "ce",
        steps: int = 50,
        alpha: Fraction | float | None = None,
        restarts: int = 1,
    ) -> None:
        """
        mode: head (attack one aux head, or head=mean), joint (final + weight x mean head loss),
            forced (drive the mask-selecting heads to the top wrong class), surrogate (final
            loss under a named gradient surrogate of the defense).
        head: mode=head only: an attack head's key (e.g. ewas/layer4.0), its index in the
            defense's order, or mean.
        weight: mode=joint only: the heads' weight (default 1; inf = heads only).
        surrogate: mode=surrogate only: a name from the defense's `gradient_surrogates`.
        loss: ce or margin (CW, kappa 0), on the final logits and the heads alike.
        steps, alpha (default eps/4), restarts: PGD with a uniform random start per restart;
            restarts run only on points the real model still classifies correctly.
        """
        super().__init__(eps=eps)
        if mode not in MODES:
            raise ValueError(
                f"mode must be one of {', '.join(MODES)}, got {mode!r} "
                "(`--attacks adaptive` alone expands to the suite that fits the defense)"
            )
        self._refuse_foreign(mode, head=head, weight=weight, surrogate=surrogate)
        if mode == "head" and (head is None or isinstance(head, bool) or not isinstance(head, (str, int))):
            raise ValueError(f"mode=head needs head=KEY, head=INDEX or head={MEAN}, got {head!r}")
        if isinstance(head, int) and head < 0:
            raise ValueError(f"head index must be >= 0, got {head}")
        if mode == "surrogate" and (not isinstance(surrogate, str) or not surrogate.strip()):
            raise ValueError("mode=surrogate needs surrogate=NAME (one of the defense's gradient surrogates)")
        if loss not in LOSS_NAMES:
            raise ValueError(f"loss must be one of {', '.join(LOSS_NAMES)}, got {loss!r}")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be a whole number >= 1, got {steps!r}")
        if isinstance(restarts, bool) or not isinstance(restarts, int) or restarts < 1:
            raise ValueError(f"restarts must be a whole number >= 1, got {restarts!r}")
        if alpha is not None and (isinstance(alpha, bool) or not 0 < alpha <= 1):
            raise ValueError(f"alpha must be in (0, 1], got {alpha}")
        self.mode = mode
        self.head = head
        self.weight = (1.0 if weight is None else _weight(weight)) if mode == "joint" else None
        self.surrogate = surrogate
        self.loss = loss
        self.steps = steps
        self.alpha = Fraction(eps) / 4 if alpha is None else alpha
        self.restarts = restarts
        self._model: torch.nn.Module | None = None
        self._defense: Any = None

    @staticmethod
    def _refuse_foreign(mode: str, **given: Any) -> None:
        """head/weight/surrogate belong to one mode each; setting one elsewhere is a mistake that
        would otherwise be silently ignored (and make two specs name one attack)."""
        owner = {"head": "head", "weight": "joint", "surrogate": "surrogate"}
        for key, value in given.items():
            if value is not None and owner[key] != mode:
                raise ValueError(f"{key}= applies to mode={owner[key]} only, not mode={mode}")

    @property
    def params(self) -> dict[str, Any]:
        """Only the parameters the mode uses, so each attack has one spec string."""
        return {k: v for k, v in super().params.items() if v is not None}

    @classmethod
    def canonical_params(cls, params: dict[str, Any]) -> dict[str, Any]:
        """The spec `ATTACKS.canonical` stores: validated, unused mode options dropped."""
        return {"eps": params["eps"], **cls(**params).params}

    # -- binding to the defended model ------------------------------------------------------
    def bind(self, context: AttackContext) -> None:
        """Keep the eval-mode model and the defense plugin; refuse a mode that does not fit."""
        self._check_fits(context.defense, context.model)
        self._model, self._defense = context.model, context.defense

    def _check_fits(self, defense: Any, model: torch.nn.Module) -> None:
        label = f"adaptive:mode={self.mode}"
        if self.mode == "surrogate":
            valid = list(defense.gradient_surrogates(model)) if defense is not None else []
            if self.surrogate not in valid:
                raise AdaptiveError(
                    f"{label}: unknown surrogate '{self.surrogate}' for this defense; "
                    f"valid: {', '.join(valid) if valid else '(none: the defense declares no gradient surrogates)'}"
                )
            return
        names = list(defense.attack_head_names()) if defense is not None else []
        if not names:
            raise AdaptiveError(f"{label} needs auxiliary heads; this defense declares none")
        if self.mode == "head":
            self._head_keys(names)
        if self.mode == "forced" and not defense.selects_masks:
            raise AdaptiveError(
                f"{label} needs heads whose prediction selects the masks; this defense's masks "
                f"do not depend on its heads (heads: {', '.join(names)})"
            )

    def _head_keys(self, names: list[str]) -> list[str]:
        """The head keys mode=head attacks: one (by key or index) or all (mean)."""
        if self.head == MEAN:
            return names
        if isinstance(self.head, int) and self.head < len(names):
            return [names[self.head]]
        if self.head in names:
            return [self.head]
        choices = ", ".join([MEAN, *(f"{i}={n}" for i, n in enumerate(names))])
        raise AdaptiveError(f"adaptive:mode=head: unknown head '{self.head}'; valid: {choices}")

    # -- the attack -------------------------------------------------------------------------
    def perturb(self, view: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if self._model is None:
            raise RuntimeError(UNBOUND)
        forward = LogitsView(self._model)  # eval mode enforced, no labels, float32 logits
        objective = self._objective()
        targets = self._targets(forward, x, y) if self.mode == "forced" else None
        crafting = self._crafting_context()
        return self._ascend(forward, objective, crafting, x, y, targets, generator)

    def _objective(self) -> Objective:
        """The per-example loss of the mode, reading the heads of the forward that made `logits`."""
        per_example = _per_example(self.loss)
        weight = self.weight

        def head_term(heads: dict[str, torch.Tensor], y: torch.Tensor) -> torch.Tensor:
            return torch.stack([per_example(h, y) for h in heads.values()]).mean(0)

        if self.mode == "head":
            return lambda logits, heads, y, t: head_term(heads, y)
        if self.mode == "joint":
            if weight == 0:
                return lambda logits, heads, y, t: per_example(logits, y)
            if math.isinf(weight):
                return lambda logits, heads, y, t: head_term(heads, y)
            return lambda logits, heads, y, t: per_example(logits, y) + weight * head_term(heads, y)
        if self.mode == "forced":
            def forced(logits: torch.Tensor, heads: dict[str, torch.Tensor], y: torch.Tensor, t: torch.Tensor | None) -> torch.Tensor:
                pulled = sum(F.cross_entropy(h.float(), t, reduction="none") for h in heads.values())
                return per_example(logits, y) - pulled

            return forced
        return lambda logits, heads, y, t: per_example(logits, y)

    def _heads(self) -> dict[str, torch.Tensor]:
        """The heads the mode uses, from the last forward pass (empty for mode=surrogate)."""
        if self.mode == "surrogate":
            return {}
        heads = self._defense.attack_heads(self._model)
        if self.mode == "head":
            return {k: heads[k] for k in self._head_keys(list(self._defense.attack_head_names()))}
        return heads

    @torch.no_grad()
    def _targets(self, forward: LogitsView, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per example, the highest-scoring wrong class of the final logits at the clean input."""
        logits = forward(x)
        return logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), float("-inf")).argmax(1)

    def _crafting_context(self) -> Callable[[], AbstractContextManager[Any]]:
        """The surrogate's context factory (mode=surrogate), else a no-op."""
        if self.mode == "surrogate":
            return self._defense.gradient_surrogates(self._model)[self.surrogate]
        return nullcontext

    def _ascend(
        self,
        forward: LogitsView,
        objective: Objective,
        crafting: Callable[[], AbstractContextManager[Any]],
        x: torch.Tensor,
        y: torch.Tensor,
        targets: torch.Tensor | None,
        generator: torch.Generator,
    ) -> torch.Tensor:
        """Sign-gradient ascent with restarts on the still-unbroken points; iterates judged on the
        real model (a separate no-grad forward outside the surrogate context in mode=surrogate)."""
        eps, alpha = float(self.eps), float(self.alpha)
        rescore = self.mode == "surrogate"
        best = x.clone()
        closest = torch.full((len(x),), float("-inf"), device=x.device)
        broken = torch.zeros(len(x), dtype=torch.bool, device=x.device)
        for _ in range(self.restarts):
            active = torch.nonzero(~broken).flatten()
            if len(active) == 0:
                break
            x0, y0 = x[active], y[active]
            t0 = None if targets is None else targets[active]
            noise = torch.rand(x0.shape, generator=generator).to(x.device, x.dtype)
            x_adv = (x0 + (2 * noise - 1) * eps).clamp(0, 1)
            for step in range(self.steps + 1):
                last = step == self.steps
                if rescore:
                    with torch.no_grad():
                        judged = forward(x_adv)  # the real model, outside the surrogate
                    gradient = None if last else self._gradient(forward, objective, crafting, x_adv, y0, t0)[1]
                else:
                    judged, gradient = self._gradient(forward, objective, crafting, x_adv, y0, t0, need=not last)
                _record(best, closest, broken, active, x_adv, judged, y0)
                if gradient is None or bool(broken[active].all()):
                    break
                x_adv = project(x_adv + alpha * gradient.sign(), x0, eps)
        return best

    def _gradient(
        self,
        forward: LogitsView,
        objective: Objective,
        crafting: Callable[[], AbstractContextManager[Any]],
        x_adv: torch.Tensor,
        y: torch.Tensor,
        targets: torch.Tensor | None,
        need: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(final logits, input gradient of the objective) of one forward inside `crafting`."""
        x_adv = x_adv.detach().requires_grad_(need)
        with crafting(), torch.set_grad_enabled(need):
            logits = forward(x_adv)
            if not need:
                return logits.detach(), None
            loss = objective(logits, self._heads(), y, targets)
            gradient = torch.autograd.grad(loss.sum(), x_adv)[0]
        return logits.detach(), gradient


def _record(
    best: torch.Tensor,
    closest: torch.Tensor,
    broken: torch.Tensor,
    active: torch.Tensor,
    x_adv: torch.Tensor,
    logits: torch.Tensor,
    y: torch.Tensor,
) -> None:
    """Keep, per example, the first iterate the real model misclassifies, else the one closest to
    its decision boundary (largest uncapped margin max_{j != y} z_j - z_y)."""
    gap = margin(logits.float(), y, math.inf)
    open_rows = ~broken[active]
    newly_broken = (gap > 0) & open_rows
    take = newly_broken | ((gap > closest[active]) & open_rows)
    rows = active[take]
    best[rows] = x_adv[take].detach()
    closest[rows] = gap[take]
    broken[active[newly_broken]] = True


# -- the suite `--attacks adaptive` expands to ------------------------------------------------
def _head_value(key: str, index: int) -> str:
    """A head as a spec value: its key when that parses back to the same text, else its index."""
    if key == MEAN or _UNSAFE_VALUE.search(key) or parse_value(key) != key:
        return str(index)
    return key


def adaptive_suite(defense: Any) -> list[str]:
    """The adaptive attack specs that fit an attached defense (empty: nothing to adapt to).

    Each attack head alone and, with several, their mean (A3); the joint-loss sweep over
    JOINT_WEIGHTS (A2); forced selection when the heads' predictions select masks (A4); each
    declared gradient surrogate (A5/A6). Stochastic defenses get nothing extra here: EOT is the
    evaluation's business. Call it on the defense instance attached to the evaluated model, so
    that head keys are the resolved insertion points.
    """
    if defense is None:
        return []
    heads = list(defense.attack_head_names())
    specs: list[str] = []
    if heads:
        specs += [f"adaptive:mode=head,head={_head_value(key, i)}" for i, key in enumerate(heads)]
        if len(heads) > 1:
            specs.append(f"adaptive:mode=head,head={MEAN}")
        specs += [f"adaptive:mode=joint,weight={format_value(w)}" for w in JOINT_WEIGHTS]
        if defense.selects_masks:
            specs.append("adaptive:mode=forced")
    specs += [f"adaptive:mode=surrogate,surrogate={name}" for name in defense.gradient_surrogates(None)]
    return specs
