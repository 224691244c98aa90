"""Data-parallel training under torchrun: the process group, each rank's share of a batch, collectives.

A single process is rank 0 of a world of 1 (`SINGLE`), whose collectives are no-ops, so the
trainer has one code path and the distributed run cannot drift from the single-process one.

Exactness is the design goal: N ranks with a global batch B train the same weights as one
process with batch B (to float tolerance). Every rank draws the same global randomness (batch
order, augmentation, the training attack's starts) and keeps a contiguous share of each global
batch (`BatchShare`); per-example noise is drawn for the whole global batch and sliced
(`advdef.training.inner.example_noise`). Only the global RNG differs per rank (`rank_seed`).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import nn

from advdef.data.base import shard_bounds
from advdef.errors import UserError

T = TypeVar("T")


@dataclass(frozen=True)
class DistributedContext:
    """This process's place in the training job: rank `rank` of `world_size` (backend None: alone)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        """Rank 0 alone talks to the store, writes checkpoints and reports progress."""
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    def device(self, requested: torch.device) -> torch.device:
        """The training device of this rank: on CUDA each rank owns GPU LOCAL_RANK, whatever
        index was asked for (one `--device` serves every rank); otherwise `requested`."""
        if not self.is_distributed or requested.type != "cuda":
            return requested
        device = torch.device("cuda", self.local_rank % torch.cuda.device_count())  # as from_environment chose
        torch.cuda.set_device(device)
        return device

    def broadcast_object(self, value: T) -> T:
        """Rank 0's `value` on every rank (a picklable object: a run id, a run row)."""
        if not self.is_distributed:
            return value
        holder = [value if self.is_main else None]
        torch.distributed.broadcast_object_list(holder, src=0)
        return holder[0]  # type: ignore[return-value]

    def on_main(self, action: Callable[[], T]) -> T:
        """Run `action` on rank 0 only and hand its result to every rank.

        A failure on rank 0 reaches the other ranks too (a UserError as the same one-line error),
        so they stop with it instead of waiting in a collective until torchrun kills them.
        """
        result: Any = None
        failure: tuple[str, str] | None = None
        error: BaseException | None = None
        if self.is_main:
            try:
                result = action()
            except Exception as caught:  # noqa: BLE001 - handed to every rank below
                error = caught
                failure = ("user" if isinstance(caught, UserError) else "other", str(caught))
        result, failure = self.broadcast_object((result, failure))
        if error is not None:
            raise error
        if failure is not None:
            kind, text = failure
            raise UserError(text) if kind == "user" else RuntimeError(f"rank 0 failed: {text}")
        return result

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        """Element-wise sums over ranks (float64 on the CPU: exact for counts, gloo on any backend)."""
        if not self.is_distributed:
            return list(values)
        tensor = torch.tensor(values, dtype=torch.float64)
        torch.distributed.all_reduce(tensor)
        return tensor.tolist()

    def all_gather_int(self, value: int) -> list[int]:
        """Every rank's `value`, in rank order."""
        if not self.is_distributed:
            return [value]
        tensor = torch.tensor([value], dtype=torch.int64)
        gathered = [torch.zeros_like(tensor) for _ in range(self.world_size)]
        torch.distributed.all_gather(gathered, tensor)
        return [int(t.item()) for t in gathered]

    def barrier(self) -> None:
        """Wait for every rank (e.g. until rank 0 has written a checkpoint)."""
        if self.is_distributed:
            torch.distributed.barrier()

    def shutdown(self) -> None:
        """Leave the process group (rank-local; torchrun ends the job when every rank has)."""
        if self.is_distributed and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


SINGLE = DistributedContext()


def backend_for_machine() -> str:
    """gloo for CPU tensors always, NCCL for CUDA tensors when there are GPUs.

    One "cpu:gloo,cuda:nccl" group serves both kinds, so the group can exist before the run's
    device is known (a resumed run's device comes from its stored config, read on rank 0 and
    broadcast), and small CPU-side collectives (metrics, run ids) never need a GPU copy.
    """
    if torch.cuda.is_available() and torch.distributed.is_nccl_available():
        return "cpu:gloo,cuda:nccl"
    return "gloo"


def launched_world_size() -> int:
    """WORLD_SIZE as torchrun sets it (1 when not launched by torchrun)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise UserError(f"WORLD_SIZE must be a whole number, got {os.environ['WORLD_SIZE']!r}") from None


def from_environment() -> DistributedContext:
    """The context torchrun's environment describes, with the process group joined (env://).

    WORLD_SIZE unset or 1 gives `SINGLE` and no process group. Multi-node jobs need a filesystem
    shared by all nodes for the runs directory: every rank resumes from rank 0's checkpoints.
    """
    world_size = launched_world_size()
    if world_size <= 1:
        return SINGLE
    if not torch.distributed.is_available():
        raise UserError("this torch build has no torch.distributed; data-parallel training needs it")
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
    backend = backend_for_machine()
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend=backend)
    return DistributedContext(rank, world_size, local_rank, backend)


def current_context() -> DistributedContext:
    """The context of the process group this process has joined (`SINGLE` if none): the trainer's
    default, so library callers under torchrun need not pass one."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return SINGLE
    return DistributedContext(torch.distributed.get_rank(), torch.distributed.get_world_size(),
                              int(os.environ.get("LOCAL_RANK", "0")), str(torch.distributed.get_backend()))


@contextmanager
def distributed_session() -> Iterator[DistributedContext]:
    """`from_environment()` for the block; the process group is destroyed afterwards."""
    context = from_environment()
    try:
        yield context
    finally:
        context.shutdown()


def rank_seed(seed: int, rank: int) -> int:
    """The global-RNG seed of `rank` for a step seeded `seed`: rank 0 keeps it (so rank 0 draws as
    the single-process run does), other ranks get distinct ones derived from (seed, rank).

    Stochastic defense modules (FSR's Gumbel masks, randomize) draw from the global RNG per
    example without knowing the batch layout, so their draws under N ranks differ from the
    single-process run's: such runs are reproducible for a fixed N, not across N.
    """
    if rank == 0:
        return seed
    digest = hashlib.sha256(f"advdef-rank-seed:{seed}:{rank}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % (2**63)


# -- each rank's share of a global batch ---------------------------------------------------


@dataclass(frozen=True)
class BatchShare:
    """This process's rows of a global batch: rows [offset, offset + size) of `total`.

    Batch-wide random draws (the training attack's starts) are made for all `total` rows and
    sliced here, so the ranks' slices together are the single-process draw.
    """

    offset: int
    size: int
    total: int
    context: DistributedContext = SINGLE

    @classmethod
    def of(cls, total: int, context: DistributedContext = SINGLE) -> BatchShare:
        start, stop = shard_bounds(total, context.rank, context.world_size)
        return cls(start, stop - start, total, context)

    @property
    def loss_scale(self) -> float:
        """Factor turning this rank's mean loss into its part of the global mean, given that DDP
        averages gradients over ranks: size * world / total (1 exactly when alone)."""
        return self.size * self.context.world_size / self.total

    def place(self, count: int) -> tuple[int, int]:
        """Where `count` rows held here fall among a subset of the batch spread over all ranks
        (e.g. FAT's still-running examples): (rows on lower ranks, rows on all ranks).

        A collective: every rank must call it at the same point. Alone, (0, count).
        """
        counts = self.context.all_gather_int(count)
        return sum(counts[: self.context.rank]), sum(counts)


_CURRENT_SHARE: ContextVar[BatchShare | None] = ContextVar("advdef_batch_share", default=None)


@contextmanager
def sharing(share: BatchShare) -> Iterator[BatchShare]:
    """Declare, for the training step inside the block, which rows of the global batch this
    process holds; training methods need not know (see `advdef.training.inner.example_noise`)."""
    token = _CURRENT_SHARE.set(share)
    try:
        yield share
    finally:
        _CURRENT_SHARE.reset(token)


def current_share() -> BatchShare | None:
    """The batch share of the step being trained, or None outside the trainer (tests, tools)."""
    return _CURRENT_SHARE.get()


# -- gradient synchronisation --------------------------------------------------------------


class _LossGate(nn.Module):
    """Identity on the finished loss; holds the model so DDP knows its parameters.

    Why not wrap the model itself: an AT step runs many forwards (the attack's, which must not
    synchronise anything, then one or two update passes per method, with dual BatchNorm routes
    leaving some parameters unused). Passing the *loss* through DDP once per step lets DDP find
    the used parameters by walking the whole step's graph from it, whatever the method did.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        # A parameter no step uses (outside the model: not in its weights, not optimised). DDP
        # otherwise prints, once per rank, advice to turn find_unused_parameters off whenever a
        # run's steps happen to use every parameter, advice that is wrong for other runs.
        # On the model's device: DDP refuses modules spread over device types.
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        self.never_used = nn.Parameter(torch.zeros((), device=device))

    def forward(self, loss: torch.Tensor) -> torch.Tensor:
        return loss


GradientSync = Callable[[torch.Tensor], torch.Tensor]


def gradient_sync(model: nn.Module, context: DistributedContext) -> GradientSync:
    """A function to pass each step's loss through before `backward()`: with several ranks it
    makes backward all-reduce (average) the gradients over ranks, bucketed and overlapped with
    the backward pass by DistributedDataParallel; alone, the identity.

    find_unused_parameters=True because which parameters a step uses depends on the method and
    defense (dual BatchNorm, auxiliary heads read only by some losses); DDP then walks the step's
    graph from the loss once per step, small next to an AT step's many forwards. Buffers (BN
    running statistics) are broadcast from rank 0 at each step, so every rank keeps rank 0's.
    Compile the model before (advdef.device.compile_model works in place): DDP never sees it.
    """
    if not context.is_distributed:
        return lambda loss: loss
    # device_ids None: the loss already sits on this rank's device, there is nothing to scatter.
    return nn.parallel.DistributedDataParallel(_LossGate(model), device_ids=None, find_unused_parameters=True)
