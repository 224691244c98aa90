"""Running single official attacks from `pyautoattack` (APGD, APGD-T, Square) on an advdef view.

The official classes have three traps (evaluation-rigor §1.4, §1.7): they reseed the *global*
torch RNG, they default to a device and a seed of their own, and they expect a plain model that
returns one logits tensor. `run_official` is the one place that handles all three for every
single-attack plugin: eps and device are passed explicitly by the builder, the seed is drawn from
the call's generator, the caller's RNG is restored, and the attack's own warnings are kept.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from advdef.attacks.autoattack import AutoAttack, _WarningCollector
from advdef.attacks.base import preserved_rng

LOGGER_NAME = "auto-attack"  # pyautoattack's logger: zero-gradient and other checks warn here

# build(model, seed, device, logger) -> an official attack object with `.perturb(x, y)`
Builder = Callable[[nn.Module, int, torch.device, logging.Logger], Any]


class _ContiguousGradient(torch.autograd.Function):
    """Identity whose backward hands on a contiguous (NCHW) gradient.

    advdef runs models in channels_last; the input gradient then comes back channels_last, and
    the official code flattens gradients with `.view(...)`, which a channels_last tensor refuses
    (APGD-DLR, APGD-T: "view size is not compatible with input tensor's size and stride").
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()


class PlainLogits(nn.Module):
    """The view as the official code expects a model: x -> one logits tensor.

    The official APGD casts inputs to float32; they are cast back to the caller's dtype so a
    float64 model still runs. Input gradients leave in the contiguous layout the official code
    assumes (`_ContiguousGradient`). Anything but a tensor is refused rather than guessed at.
    """

    def __init__(self, view: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.view = view
        self.dtype = dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.requires_grad:
            x = _ContiguousGradient.apply(x)
        out = self.view(x.to(self.dtype))
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"the official attacks need a model returning one logits tensor, got {type(out).__name__}")
        return out


def official_version() -> str:
    """`pyautoattack <version>`, for the protocol card."""
    from advdef.versions import library_versions

    return f"pyautoattack {library_versions()['pyautoattack']}"


def run_official(
    build: Builder, view: nn.Module, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator
) -> tuple[torch.Tensor, list[str]]:
    """Build an official attack for this call and run it on (x, y); returns (x_adv, warnings).

    The seed is the same draw AutoAttack's adapter uses (`AutoAttack.seed_from`), so equal
    generators give equal seeds across advdef's official attacks.
    """
    seed = AutoAttack.seed_from(generator)
    logger = logging.getLogger(LOGGER_NAME)
    collector = _WarningCollector()
    logger.addHandler(collector)
    try:
        with preserved_rng(x.device), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            adversary = build(PlainLogits(view, x.dtype), seed, x.device, logger)
            x_adv = adversary.perturb(x.contiguous(), y)
    finally:
        logger.removeHandler(collector)
    messages = collector.messages + [str(w.message) for w in caught]
    return x_adv.detach().to(x.device, x.dtype), messages
