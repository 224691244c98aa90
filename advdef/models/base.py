"""The model contract every architecture and defense shares.

A `Classifier` is `normalize -> net`: inputs are [0,1] images, normalization lives inside the
model, and `eval(); model(x)` is a pure function x -> logits. Architectures place parameter-free
`Tap` modules at named insertion points (`layer4.0`, `layer4`, `block2`); a defense attaches its
modules to taps, so surgery never renames the backbone's weights (standard state_dict layouts
keep loading).

Defense modules talk to the trainer through one `DefenseContext`: they write auxiliary outputs
into it, and may read the true labels from it — but the classifier only accepts labels in
training mode, so a label can never reach an evaluated model.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


class Normalize(nn.Module):
    """(x - mean) / std per channel; buffers are not persisted so weight files stay standard."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


# Which gradient computation of adversarial training a forward pass feeds: the inner attack's
# input gradient or the outer parameter update. None outside training (inference, evaluation).
PHASES = ("attack", "update")
# Which kind of input a training forward pass carries; models with dual BatchNorm
# (`advdef.models.dual_bn`) normalise each kind with its own statistics.
ROUTES = ("clean", "adversarial")


@dataclass
class DefenseContext:
    """State shared by a classifier's defense modules during one forward pass.

    `phase` lets a module behave differently per pass without changing its outputs, e.g. the
    `smooth` defense's ReLU whose backward is a smooth surrogate only in the attack's pass.
    `route` says whether a training pass carries clean or adversarial inputs (dual BatchNorm).
    Both are None outside training.
    """

    labels: torch.Tensor | None = None
    aux: dict[str, Any] = field(default_factory=dict)
    phase: str | None = None
    route: str | None = None


class Tap(nn.Module):
    """A named insertion point: identity until a defense attaches modules to it."""

    def __init__(self) -> None:
        super().__init__()
        self.attached = nn.ModuleList()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for module in self.attached:
            x = module(x)
        return x


class Classifier(nn.Module):
    """[0,1] images -> logits, with named insertion points and a defense context."""

    def __init__(
        self,
        net: nn.Module,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        input_shape: tuple[int, int, int],
        num_classes: int | None = None,
    ) -> None:
        super().__init__()
        # Input-level defenses (e.g. `randomize`) attach here: they see [0,1] images, before
        # normalization, so pad values and ranges mean the same thing for every dataset.
        self.input_tap = Tap()
        self.normalize = Normalize(mean, std)
        self.net = net
        self.context = DefenseContext()
        self.input_shape = tuple(input_shape)
        self._num_classes = num_classes
        self.arch = type(net).__name__  # build_model sets the registry name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.context.aux = {}
        return self.net(self.normalize(self.input_tap(x)))

    def insertion_points(self) -> dict[str, Tap]:
        """Named taps of the architecture (`net.insertion_points()`)."""
        return self.net.insertion_points()

    @contextmanager
    def labels(self, labels: torch.Tensor) -> Iterator[None]:
        """Let defense modules see the true labels for the forward passes inside this block.

        Only allowed in training mode: evaluation must never depend on labels.
        """
        if not self.training:
            raise RuntimeError("labels may only be given to a model in training mode")
        self.context.labels = labels
        try:
            yield
        finally:
            self.context.labels = None

    def phase(self, name: str | None) -> AbstractContextManager[None]:
        """Mark the forward passes inside this block as feeding `name` ("attack": the training
        attack's input gradient; "update": the parameter update); the previous phase is restored."""
        return self._context_value("phase", name, PHASES)

    def route(self, kind: str | None) -> AbstractContextManager[None]:
        """Mark the forward passes inside this block as carrying `kind` inputs ("clean" or
        "adversarial"); a no-op for models without dual BatchNorm."""
        return self._context_value("route", kind, ROUTES)

    @contextmanager
    def _context_value(self, field_name: str, value: str | None, valid: tuple[str, ...]) -> Iterator[None]:
        """Set one field of the defense context for the block, restoring the previous value."""
        if value is not None and value not in valid:
            raise ValueError(f"{field_name} must be one of {', '.join(valid)} or None, got {value!r}")
        previous = getattr(self.context, field_name)
        setattr(self.context, field_name, value)
        try:
            yield
        finally:
            setattr(self.context, field_name, previous)

    @property
    def num_classes(self) -> int:
        """Width of the logits (defenses size their heads by it); build_model passes it from the
        dataset, otherwise one eval-mode forward on zeros measures it once."""
        if self._num_classes is None:
            was_training = self.training
            parameter = next(self.parameters(), None)
            device = parameter.device if parameter is not None else torch.device("cpu")
            try:
                self.eval()
                with torch.no_grad():
                    self._num_classes = int(self(torch.zeros(1, *self.input_shape, device=device)).shape[-1])
            finally:
                self.train(was_training)
        return self._num_classes

    def feature_shapes(self, names: list[str] | None = None) -> dict[str, tuple[int, ...]]:
        """Shape (C, H, W) of the features at each insertion point for this model's input size.

        Defenses size their modules from this (e.g. a linear head over C*H*W features), so one
        defense fits every architecture and input size. Runs one eval-mode forward on zeros.
        """
        points = self.insertion_points()
        wanted = names if names is not None else list(points)
        shapes: dict[str, tuple[int, ...]] = {}

        def recorder(name: str):
            def hook(_module: nn.Module, inputs: tuple[torch.Tensor, ...], _output: torch.Tensor) -> None:
                shapes.setdefault(name, tuple(inputs[0].shape[1:]))

            return hook

        handles = [points[name].register_forward_hook(recorder(name)) for name in wanted]
        was_training = self.training
        try:
            self.eval()
            with torch.no_grad():
                self(torch.zeros(1, *self.input_shape))
        finally:
            self.train(was_training)
            for handle in handles:
                handle.remove()
        return shapes

    def aux_outputs(self) -> dict[str, Any]:
        """Auxiliary outputs the defense modules wrote during the last forward pass."""
        return self.context.aux


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def stage_taps(stages: dict[str, nn.Sequential]) -> dict[str, Tap]:
    """Insertion points for stages of blocks that each own a `tap`: `stage.i` per block, `stage` = last block."""
    points: dict[str, Tap] = {}
    for stage_name, stage in stages.items():
        for index, block in enumerate(stage):
            points[f"{stage_name}.{index}"] = block.tap
        points[stage_name] = stage[-1].tap
    return points
