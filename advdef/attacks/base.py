"""What attacks see of a model, and the base class every attack plugin shares.

Attacks get a `LogitsView`: eval mode, no labels, one float32 logits tensor, inputs checked to be
in [0,1]. An attack returns adversarial inputs only; whether a point is robust is decided by the
evaluation re-scoring those inputs through the same view.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import torch
from torch import nn

from advdef.specs import Spec, format_value

_RANGE_TOLERANCE = 1e-6


class LogitsView(nn.Module):
    """x in [0,1] -> float32 logits of an eval-mode model; never given labels.

    The view refuses to run a model in training mode (BatchNorm would use batch statistics and
    defenses could read labels), and unwraps tuple/dict outputs to their logits.
    """

    def __init__(self, model: nn.Module, logits_key: int | str = 0) -> None:
        super().__init__()
        self.model = model
        self.logits_key = logits_key

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.model.training:
            raise RuntimeError("LogitsView: the model is in training mode; evaluate only in eval mode")
        low, high = float(x.detach().min()), float(x.detach().max())
        if low < -_RANGE_TOLERANCE or high > 1 + _RANGE_TOLERANCE:
            raise ValueError(f"LogitsView: inputs must lie in [0,1], got [{low:.4g}, {high:.4g}]")
        out = self.model(x)
        if isinstance(out, (tuple, list)):
            out = out[self.logits_key]  # type: ignore[index]
        elif isinstance(out, dict):
            out = out[self.logits_key]
        return out.float()


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[LogitsView]:
    """Put `model` in eval mode for the block, yield its view, and restore the caller's mode."""
    was_training = model.training
    model.eval()
    try:
        yield LogitsView(model)
    finally:
        model.train(was_training)


@contextmanager
def preserved_rng(device: torch.device | str | None = None) -> Iterator[None]:
    """Restore the global torch RNG (and CUDA's) afterwards: some attacks reseed it globally."""
    cpu_state = torch.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        torch.set_rng_state(cpu_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)


@dataclass
class AttackContext:
    """What an attack may know beyond the label-free view, handed over by `Attack.bind`.

    Ordinary attacks ignore it. Adaptive attacks deliberately target a defense's internals
    (auxiliary heads, masks, gradient surrogates) through `model` (in eval mode, labels refused)
    and `defense` (the plugin instance, with its declarations); transfer attacks load another run
    from `store`. Robustness is still decided by re-scoring the returned inputs through the view.
    """

    model: nn.Module
    defense: Any
    run: dict
    device: torch.device
    store: Any = None
    extras: dict[str, Any] = field(default_factory=dict)


class Attack:
    """Base of attack plugins (l-inf threat model).

    Subclasses implement `perturb(view, x, y, generator)`. `__call__` validates inputs and the
    result: the output stays within eps of x, within [0,1], and has no NaN — an attack that breaks
    its own budget is a bug, never a success.
    """

    name: str = "attack"
    norm: str = "Linf"
    # How the report groups attacks: "white-box" (gradients of the final logits: what defense
    # papers report), "adaptive" (targets the defense's internals), "black-box" (no gradients),
    # "transfer" (crafted on another model).
    family: str = "white-box"

    def __init__(self, *, eps: Fraction) -> None:
        if not 0 < eps <= 1:
            raise ValueError(f"eps must be in (0, 1], got {eps}")
        self.eps = eps

    @property
    def params(self) -> dict[str, Any]:
        """Public parameters except eps (the evaluation's threat model stores eps itself) and the
        warnings an attack collects while it runs (outputs, not parameters)."""
        return {k: v for k, v in vars(self).items() if not k.startswith("_") and k not in ("eps", "warnings")}

    @property
    def implementation(self) -> str:
        """Which code ran the attack, as recorded in the protocol card."""
        from advdef.versions import library_versions

        return f"advdef {library_versions()['advdef']}"

    def spec(self) -> str:
        """Canonical spec string of this attack, as stored with results."""
        return str(Spec(self.name, self.params))

    def __repr__(self) -> str:
        items = [("eps", self.eps), *sorted(self.params.items())]
        return f"{type(self).__name__}({', '.join(f'{k}={format_value(v)}' for k, v in items)})"

    def __call__(self, view: nn.Module, x: torch.Tensor, y: torch.Tensor, *, seed: int = 0) -> torch.Tensor:
        if x.min() < 0 or x.max() > 1:
            raise ValueError("attack inputs must lie in [0,1]")
        generator = torch.Generator().manual_seed(seed)
        x_adv = self.perturb(view, x.detach(), y.detach(), generator).detach()
        check_budget(x, x_adv, float(self.eps))
        return x_adv

    def perturb(self, view: nn.Module, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        raise NotImplementedError

    def bind(self, context: AttackContext) -> None:
        """Called by the evaluation before the first batch; attacks that need the defended model's
        internals or another run keep what they need. The default needs nothing."""


def check_budget(x: torch.Tensor, x_adv: torch.Tensor, eps: float, tolerance: float = 1e-6) -> None:
    """Raise if x_adv leaves the eps-ball around x, leaves [0,1], or holds NaN."""
    if torch.isnan(x_adv).any():
        raise RuntimeError("attack produced NaN inputs")
    distance = (x_adv - x).abs().flatten(1).amax(1).max().item() if len(x) else 0.0
    if distance > eps + tolerance:
        raise RuntimeError(f"attack left the eps-ball: |x_adv - x|_inf = {distance:.6g} > eps = {eps:.6g}")
    if len(x) and (x_adv.min() < -tolerance or x_adv.max() > 1 + tolerance):
        raise RuntimeError("attack left the [0,1] input range")


class InstanceCanonical:
    """Mixin for attacks whose stored spec drops or resolves parameters (defaults that do not
    apply, alphas derived from eps): the registry's canonical form is then what an instance
    stores, plus eps, so `ATTACKS.canonical(text)` and the stored spec agree."""

    @classmethod
    def canonical_params(cls, params: dict[str, Any]) -> dict[str, Any]:
        return {**cls(**params).params, "eps": params["eps"]}
