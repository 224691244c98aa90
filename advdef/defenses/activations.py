"""Smooth activation functions for the `smooth` defense (SAT), and a ReLU with a swappable backward.

One table (`ACTIVATIONS`) maps an activation name to its forward f(x), its derivative f'(x) and
the options it takes with their defaults. The same table serves both uses of the thesis (Xie,
PhD thesis 2020, ch. 5):

- `SmoothActivation`: f replaces ReLU in forward and backward (SAT proper, Sec. 5.4);
- `SurrogateReLU`: the forward stays exactly ReLU and only the backward uses f'(x), in the passes
  the model's `DefenseContext.phase` selects (the Table 5.1 diagnostic, Sec. 5.3).

The derivatives are written out (not autograd of f) so the surrogate backward costs one
elementwise op, and the tests check each against autograd of its forward. Where f' has a kink
(ELU with alpha != 1 at 0) the value at 0 follows PyTorch's autograd of the same forward, so a
surrogate backward and a fully smooth model agree everywhere.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from advdef.models.base import DefenseContext
from advdef.validation import number

Tensor = torch.Tensor

GELU_APPROXIMATIONS = ("none", "tanh")  # "none": the thesis's x*Phi(x); "tanh": the official code
_TANH_GELU_K = math.sqrt(2.0 / math.pi)
_TANH_GELU_C = 0.044715


# -- forwards and derivatives -----------------------------------------------------------------
def softplus(x: Tensor, beta: float) -> Tensor:
    """(1/beta) log(1 + exp(beta x)); PyTorch switches to x above beta*x = 20 (error < 1e-9)."""
    return F.softplus(x, beta=beta)


def softplus_grad(x: Tensor, beta: float) -> Tensor:
    """Thesis Eq. 5.3: 1 / (1 + exp(-beta x))."""
    return torch.sigmoid(beta * x)


def silu(x: Tensor) -> Tensor:
    return F.silu(x)


def silu_grad(x: Tensor) -> Tensor:
    """d/dx x*s(x) = s(x) (1 + x (1 - s(x))): exceeds 1 for x > 0 and dips below 0 for x < -1.28."""
    s = torch.sigmoid(x)
    return s * (1 + x * (1 - s))


def gelu(x: Tensor, approximate: str) -> Tensor:
    return F.gelu(x, approximate=approximate)


def gelu_grad(x: Tensor, approximate: str) -> Tensor:
    """Phi(x) + x phi(x) (exact), or the derivative of 0.5 x (1 + tanh(k (x + c x^3))) (tanh)."""
    if approximate == "tanh":
        t = torch.tanh(_TANH_GELU_K * (x + _TANH_GELU_C * x**3))
        return 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * _TANH_GELU_K * (1 + 3 * _TANH_GELU_C * x * x)
    cdf = 0.5 * (1 + torch.erf(x / math.sqrt(2.0)))
    pdf = torch.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)
    return cdf + x * pdf


def elu(x: Tensor, alpha: float) -> Tensor:
    return F.elu(x, alpha=alpha)


def elu_grad(x: Tensor, alpha: float) -> Tensor:
    """Eq. 5.6: 1 for x > 0, alpha exp(x) otherwise (a jump at 0 unless alpha = 1)."""
    # exp of the clamped input: the unused branch must stay finite for double backward.
    return torch.where(x > 0, torch.ones_like(x), alpha * torch.exp(x.clamp(max=0)))


def celu(x: Tensor, alpha: float) -> Tensor:
    return F.celu(x, alpha=alpha)


def celu_grad(x: Tensor, alpha: float) -> Tensor:
    """1 for x > 0, exp(x / alpha) otherwise: continuous at 0 for every alpha (C^1)."""
    return torch.where(x > 0, torch.ones_like(x), torch.exp(x.clamp(max=0) / alpha))


def smooth_relu(x: Tensor, a: Tensor) -> Tensor:
    """Eq. 5.4 as the official code writes it: relu(x - log(a|x| + 1)/a).

    For x < 0 the argument is negative (0 out); for x >= 0 it is x - log(ax + 1)/a >= 0, so this
    equals the piecewise form; gradients reach both x and the learnable a.
    """
    return torch.relu(x - torch.log1p(a * x.abs()) / a)


def smooth_relu_grad(x: Tensor, a: Tensor) -> Tensor:
    """Eq. 5.5: a x / (1 + a x) for x > 0, else 0."""
    positive = x.clamp(min=0)
    return a * positive / (1 + a * positive)


@dataclass(frozen=True)
class ActivationKind:
    """One row of the activation table.

    `options` are the spec parameters the activation takes, with defaults; `learnable` names the
    option that initialises a learnable scale instead of fixing one (smoothrelu's `init` -> a).
    """

    forward: Callable[..., Tensor]
    derivative: Callable[..., Tensor]
    options: Mapping[str, Any] = field(default_factory=dict)
    learnable: str | None = None
    formula: str = ""


ACTIVATIONS: dict[str, ActivationKind] = {
    "softplus": ActivationKind(softplus, softplus_grad, {"beta": 1.0}, formula="(1/beta) log(1 + exp(beta x))"),
    "silu": ActivationKind(silu, silu_grad, formula="x sigmoid(x)"),
    "gelu": ActivationKind(gelu, gelu_grad, {"approximate": "none"}, formula="x Phi(x)"),
    "elu": ActivationKind(elu, elu_grad, {"alpha": 1.0}, formula="x if x > 0 else alpha (exp(x) - 1)"),
    "celu": ActivationKind(celu, celu_grad, {"alpha": 1.0}, formula="x if x > 0 else alpha (exp(x/alpha) - 1)"),
    "smoothrelu": ActivationKind(
        smooth_relu, smooth_relu_grad, {"init": 400.0}, learnable="init",
        formula="x - log(a x + 1)/a if x >= 0 else 0, a learnable (init 400)",
    ),
}
ALIASES = {"swish": "silu"}


def _positive(name: str) -> Callable[[Any], float]:
    return lambda value: number(name, value, above=0)


def _gelu_approximation(value: Any) -> str:
    if value not in GELU_APPROXIMATIONS:
        raise ValueError(f"approximate must be one of {', '.join(GELU_APPROXIMATIONS)}, got {value!r}")
    return value


# Validation of each option (all options of every activation appear here; their names are the
# `smooth` defense's option parameters).
OPTION_CHECKS: dict[str, Callable[[Any], Any]] = {
    "beta": _positive("beta"),
    "alpha": _positive("alpha"),
    "init": _positive("init"),
    "approximate": _gelu_approximation,
}


def resolve_activation(act: str, given: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """The canonical activation name and its full, validated options.

    `given` maps option names to values, None meaning "not set" (the activation's default).
    Unknown activations and options the chosen activation does not take are ValueErrors naming
    the valid activations / the activations that take the option.
    """
    name = ALIASES.get(act, act) if isinstance(act, str) else act
    if name not in ACTIVATIONS:
        valid = ", ".join(sorted([*ACTIVATIONS, *ALIASES]))
        raise ValueError(f"unknown act {act!r}; valid: {valid}")
    kind = ACTIVATIONS[name]
    options = dict(kind.options)
    for option, value in given.items():
        if value is None:
            continue
        if option not in kind.options:
            takers = [n for n, k in ACTIVATIONS.items() if option in k.options]
            raise ValueError(f"{option} applies to act={' or act='.join(takers)} only, not act={name}")
        options[option] = OPTION_CHECKS[option](value)
    return name, options


# -- modules ------------------------------------------------------------------------------------
class SmoothActivation(nn.Module):
    """A smooth activation in forward and backward (SAT proper); one instance per replaced ReLU."""

    def __init__(self, act: str, options: Mapping[str, Any]) -> None:
        super().__init__()
        self.act = act
        self.kind = ACTIVATIONS[act]
        self.options = {k: v for k, v in options.items() if k != self.kind.learnable}
        if self.kind.learnable is not None:
            # a = r^2 keeps a positive without a constraint, as the official code does (r0 = 20).
            self.r = nn.Parameter(torch.tensor(math.sqrt(float(options[self.kind.learnable]))))

    @property
    def scale(self) -> Tensor | None:
        """The learnable a = r^2 (smoothrelu), else None."""
        return self.r**2 if self.kind.learnable is not None else None

    def forward(self, x: Tensor) -> Tensor:
        if self.kind.learnable is not None:
            return self.kind.forward(x, a=self.scale.to(x.dtype))
        return self.kind.forward(x, **self.options)

    def extra_repr(self) -> str:
        return ", ".join([self.act, *(f"{k}={v}" for k, v in self.options.items())])


class _ReLUWithSurrogateBackward(torch.autograd.Function):
    """relu(x) forward; backward multiplies the incoming gradient by `derivative(x)`.

    The backward is made of ordinary differentiable ops, so double backward works too.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, derivative: Callable[[Tensor], Tensor]) -> Tensor:
        ctx.save_for_backward(x)
        ctx.derivative = derivative
        return torch.relu(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        (x,) = ctx.saved_tensors
        return grad * ctx.derivative(x).to(grad.dtype), None


class SurrogateReLU(nn.Module):
    """Exactly ReLU in the forward; the backward is a smooth activation's f'(x) in chosen passes.

    Which pass a forward feeds is read from the model's shared `DefenseContext.phase` at forward
    time ("attack": the training attack's crafting; "update": the parameter update; None:
    inference/evaluation). `always` (set by `Smooth.surrogate_gradients`) uses the surrogate in
    every pass, for a white-box attack on the ReLU model with smooth gradients.
    """

    def __init__(self, act: str, options: Mapping[str, Any], phases: frozenset[str], context: DefenseContext) -> None:
        super().__init__()
        kind = ACTIVATIONS[act]
        if kind.learnable is not None:
            raise ValueError(f"act={act} has a learnable parameter that needs the smooth forward; use passes=all")
        self.act = act
        self.options = dict(options)
        self.derivative = functools.partial(kind.derivative, **self.options)
        self.phases = frozenset(phases)
        self.always = False
        # A plain attribute, not a submodule: the context is shared state, not part of the weights.
        object.__setattr__(self, "context", context)

    def surrogate_active(self) -> bool:
        return self.always or self.context.phase in self.phases

    def forward(self, x: Tensor) -> Tensor:
        if self.surrogate_active():
            return _ReLUWithSurrogateBackward.apply(x, self.derivative)
        return torch.relu(x)

    def extra_repr(self) -> str:
        options = "".join(f", {k}={v}" for k, v in self.options.items())
        return f"backward={self.act}{options}, phases={','.join(sorted(self.phases))}"
