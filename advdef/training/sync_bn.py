"""Synchronised BatchNorm for data-parallel training, on CPU (gloo) as on CUDA.

With a share of the batch per rank, a plain BatchNorm normalises each rank's share by that share's
statistics: a different model from the single-process one on the whole batch. torch's own
SyncBatchNorm runs on CUDA only, so CPU ranks could not train the same model, and one
implementation on every device is one tested path. `SyncBatchNorm` gathers every rank's (count,
mean, variance) in a single differentiable all-reduce, combines them into the global batch's
statistics without the cancellation of E[x^2] - E[x]^2, normalises with them and updates the
running statistics as nn.BatchNorm does; in eval mode, or alone, it *is* nn.BatchNorm.
Converting keeps parameter and buffer names, so checkpoints load into the plain model.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

# Input ranks each replaced class accepts (as its own _check_input_dim does).
_INPUT_DIMS: dict[type, tuple[int, ...]] = {nn.BatchNorm1d: (2, 3), nn.BatchNorm2d: (4,)}


class _SumOverRanks(torch.autograd.Function):
    """all_reduce(SUM) whose backward all-reduces the gradient (every rank's loss depends on every
    rank's contribution). torch.distributed.nn.functional.all_reduce does the same but is
    deprecated (a FutureWarning per call)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        total = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        total = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(total)
        return total


def sum_over_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """Differentiable sum of `tensor` over all ranks of the default process group."""
    return _SumOverRanks.apply(tensor)


def _synchronising() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class SyncBatchNorm(_BatchNorm):
    """BatchNorm whose batch statistics are those of the global batch over all ranks.

    Same parameters, buffers and names as the BatchNorm it replaces (`from_batchnorm`). Each
    rank's mean and variance are computed as BatchNorm does (two-pass, float32) and combined in
    float64; normalising happens in float32 and the output has the input's dtype (AMP).
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, input_dims: tuple[int, ...] = (2, 3, 4)) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats)
        self.input_dims = input_dims

    @classmethod
    def from_batchnorm(cls, original: _BatchNorm) -> SyncBatchNorm:
        """A SyncBatchNorm sharing `original`'s parameter and buffer tensors (not copies), so an
        optimizer built before conversion still updates it and state_dict keys stay unchanged."""
        converted = cls(original.num_features, original.eps, original.momentum, original.affine,
                        original.track_running_stats, _INPUT_DIMS.get(type(original), (2, 3, 4)))
        for name, parameter in original.named_parameters(recurse=False):
            setattr(converted, name, parameter)
        for name, buffer in original.named_buffers(recurse=False):
            converted._buffers[name] = buffer
        converted.train(original.training)
        return converted

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() not in self.input_dims:
            shown = " or ".join(f"{d}D" for d in self.input_dims)
            raise ValueError(f"expected {shown} input (got {input.dim()}D input)")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        uses_batch_statistics = self.training or (self.running_mean is None and self.running_var is None)
        if not (uses_batch_statistics and _synchronising()):
            return super().forward(input)  # exactly nn.BatchNorm
        return self._synchronised_forward(input)

    # Eager under torch.compile (a graph break per layer): a collective in the middle would
    # otherwise split the layer into frames that recompile for every channel count.
    @torch.compiler.disable
    def _synchronised_forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        channels, world, rank = self.num_features, dist.get_world_size(), dist.get_rank()
        dims = [0, *range(2, input.dim())]
        values = input.float()
        # Each rank's (count, mean, variance) in its own row of a world x (2C+1) table; one
        # all-reduce of the table is an all-gather that autograd can differentiate through.
        variance_r, mean_r = torch.var_mean(values, dims, correction=0)
        count_r = torch.full((1,), input.numel() // channels, dtype=torch.float64, device=input.device)
        row = torch.cat([count_r, mean_r.double(), variance_r.double()])
        table = torch.zeros(world, row.numel(), dtype=torch.float64, device=input.device)
        table = table.index_copy(0, torch.tensor([rank], device=input.device), row[None])
        table = sum_over_ranks(table)
        counts, means, variances = table[:, :1], table[:, 1 : channels + 1], table[:, channels + 1 :]
        count = counts.sum()
        mean = (counts * means).sum(0) / count
        # Chan et al.'s pairwise combination: within-rank plus between-rank squares, no E[x^2] - E[x]^2.
        variance = ((counts * variances).sum(0) + (counts * (means - mean) ** 2).sum(0)) / count
        if self.training and self.track_running_stats:
            self._update_running_stats(mean.detach(), variance.detach(), float(count.detach()))
        shape = [1, channels] + [1] * (input.dim() - 2)
        scale = torch.rsqrt(variance + self.eps).float()
        out = (values - mean.float().view(shape)) * scale.view(shape)
        if self.affine:
            out = out * self.weight.float().view(shape) + self.bias.float().view(shape)
        return out.to(input.dtype)

    @torch.no_grad()
    def _update_running_stats(self, mean: torch.Tensor, variance: torch.Tensor, count: float) -> None:
        """As nn.BatchNorm: momentum (or a cumulative average when None), unbiased variance."""
        self.num_batches_tracked.add_(1)
        factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        unbiased = variance * (count / (count - 1)) if count > 1 else variance
        self.running_mean.mul_(1 - factor).add_(mean.to(self.running_mean.dtype), alpha=factor)
        self.running_var.mul_(1 - factor).add_(unbiased.to(self.running_var.dtype), alpha=factor)


def convert_sync_batchnorm(module: nn.Module) -> int:
    """Replace every BatchNorm1d/2d inside `module` (those inside DualBatchNorm included) by a
    SyncBatchNorm sharing its tensors; returns how many. Subclasses with their own forward are
    left alone: replacing them would change what they compute."""
    targets = [
        (parent, name, child)
        for parent in module.modules()
        for name, child in parent.named_children()
        if type(child) in _INPUT_DIMS
    ]
    for parent, name, child in targets:
        setattr(parent, name, SyncBatchNorm.from_batchnorm(child))
    return len(targets)
