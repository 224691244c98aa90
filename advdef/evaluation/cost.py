"""What an evaluation costs, as forward and backward passes through the evaluated model.

Wall time depends on the machine and on whatever else runs on it; the number of passes through
the model does not, so it is what makes attack costs comparable across machines, batch sizes and
papers (RobustBench reports `number_forward_passes` for the same reason). The unit is the
*sample-pass*: one image through the model once.

Counting rule (`PassCounter`):

- forward: every call of the evaluated model on a batch of B images counts B forwards, whoever
  made it: the evaluation's `LogitsView`, the official pyautoattack code (through `PlainLogits`
  and the view), or an adaptive attack's own `LogitsView` over `AttackContext.model`.
- backward: every backward pass that reaches the input of such a call counts B backwards. An
  EOT attack with K samples per step makes K forward/backward pairs per step and counts K x B
  each; FAB's per-class backwards through one forward (C of them) count C x B; a forward that
  nothing is differentiated through (a final scoring pass, even one run with gradients enabled)
  counts no backward.

Why a hook on the model and not on the view: adaptive attacks call the model through a view of
their own, and the official attacks through a wrapper around the evaluation's view; a hook on
the model itself sees every call exactly once, however many wrappers it went through.

Why backwards are counted at the model's *input* and not on its output tensor: adaptive attacks
on auxiliary heads (`adaptive:mode=head`, `joint` with weight=inf) differentiate tensors the
defense stored during the forward, never the returned logits, so a hook on the output would miss
their backwards. Every attack gradient is an input gradient, so each backward pass reaches the
model's input exactly once: an identity autograd function placed there (only when the input
requires grad) fires once per backward pass through that forward, whichever outputs it started
from.

Not counted: passes through other models (a transfer attack's surrogate is another run, not a
query to the evaluated one), and anything outside the `with` block.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class _BackwardTap(torch.autograd.Function):
    """Identity on the model's input whose backward adds the batch size to a counter."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, counter: PassCounter) -> torch.Tensor:
        ctx.counter = counter
        ctx.batch = int(x.shape[0]) if x.dim() else 1
        # A copy, not the input itself: a defense may modify its input in place.
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        ctx.counter.backwards += ctx.batch
        return grad, None


class PassCounter:
    """Count forward and backward sample-passes through `model` while the block runs.

        with PassCounter(model) as passes:
            x_adv = attack(view, x, y)
        passes.forwards, passes.backwards   # e.g. 22 * len(x), 20 * len(x) for PGD-20

    See the module docstring for the exact rule. Counters only grow; one counter per batch gives
    the batch's cost.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.forwards = 0
        self.backwards = 0
        self._handle: Any = None

    def __enter__(self) -> PassCounter:
        if self._handle is not None:
            raise RuntimeError("PassCounter is already counting")
        # prepend: see the raw input before any pre-hook a defense may have registered.
        self._handle = self.model.register_forward_pre_hook(self._pre_hook, prepend=True, with_kwargs=True)
        return self

    def __exit__(self, *exc: object) -> None:
        self._handle.remove()
        self._handle = None

    def _pre_hook(self, _module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if args:
            x, replace = args[0], lambda tapped: ((tapped, *args[1:]), kwargs)
        else:  # the input given by keyword: the first tensor
            key = next((k for k, v in kwargs.items() if isinstance(v, torch.Tensor)), None)
            if key is None:
                return None
            x, replace = kwargs[key], lambda tapped: (args, {**kwargs, key: tapped})
        if not isinstance(x, torch.Tensor):
            return None
        self.forwards += int(x.shape[0]) if x.dim() else 1
        if torch.is_grad_enabled() and x.requires_grad:
            return replace(_BackwardTap.apply(x, self))
        return None
