"""The evaluation's batch size: `--batch-size auto` and out-of-memory handling that never change results.

Why the batch size of an evaluation is fixed before it starts, and never changed while it runs:

- The batch partition sets the randomness. Attacks run over fixed batches of the eligible
  samples with a per-batch seed from (seed, attack, first sample id); a random start drawn for a
  batch of 256 from seed s is not the concatenation of two draws for 128, the global RNG that
  stochastic defenses draw from is seeded per batch too, and the official AutoAttack draws
  inside its own code. A different partition is a different (equally valid) evaluation.
- Even a deterministic attack on a deterministic model is not provably unchanged by splitting a
  batch: CUDA picks convolution and matrix kernels by shape, so a sample's logits can differ in
  the last bits between batch sizes, and a PGD step follows sign(gradient), which such bits can
  flip. Only the same batches through the same kernels give the same results.

So the result-preserving design is: one batch size per evaluation, chosen before any batch is
computed, recorded in the protocol card (`batch_size`) and in each attack's details.

- `auto` picks it on CUDA with a probe: one forward and backward pass through the evaluated view
  (in the evaluation's precision) on a batch of the evaluation's own samples, at the default 256
  first; on an out-of-memory error it empties the CUDA cache and halves, until a batch fits. It
  never goes above 256, so whenever 256 fits an `auto` evaluation is the default evaluation.
  On CPU there is nothing to probe: `auto` is 256. An `auto` evaluation that already exists in the
  store (resumed, or joined by new attacks) keeps its recorded batch size, so a resume never mixes
  two partitions.
- An out-of-memory error while the evaluation runs (an attack needing more than the probe's
  forward/backward, or memory taken by another process) empties the CUDA cache and retries the
  same batch once at the same size, with the same seeds: the retry computes exactly what the
  first attempt would have. If it fails again the evaluation stops with a UserError. Everything
  stored so far stays valid; running the same command again resumes at the same batch size.

The protocol key does not include the batch size (the store's key is dataset/samples/eps/seed/
epoch, plus the precision when it is not fp32); the card records it.
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

import torch

from advdef.attacks.base import preserved_rng
from advdef.device import prepare
from advdef.errors import UserError

if TYPE_CHECKING:
    from advdef.evaluation.engine import EvalConfig, EvaluationTarget
    from advdef.store import Store

AUTO = "auto"
DEFAULT_BATCH_SIZE = 256  # `auto` starts here and never goes above it
# Devices on which `auto` probes; CPU memory is not probed (its default always "fits"). Tests
# add "cpu" to drive the probe with a fake model that raises out-of-memory errors.
PROBED_DEVICE_TYPES: tuple[str, ...] = ("cuda",)

T = TypeVar("T")


def check_batch_size(value: object) -> int | str:
    """`auto` or a whole number >= 1 (the text of `--batch-size` is accepted too)."""
    if isinstance(value, str):
        text = value.strip().lower()
        if text == AUTO:
            return AUTO
        if text.isdigit():
            value = int(text)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"--batch-size must be a whole number >= 1 or auto, got {value!r}")
    return value


def is_out_of_memory(error: BaseException) -> bool:
    """CUDA's out-of-memory error, or a RuntimeError saying "out of memory" (older builds, other backends)."""
    if isinstance(error, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(error, RuntimeError) and "out of memory" in str(error).lower()


def free_memory(device: torch.device) -> None:
    """Release what a failed attempt left behind: unreachable tensors, then CUDA's cached blocks."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def probe(fits: Callable[[int], None], device: torch.device, start: int = DEFAULT_BATCH_SIZE) -> int:
    """The largest of start, start/2, ..., 1 for which `fits(size)` raises no out-of-memory error."""
    size = start
    while True:
        try:
            fits(size)
            return size
        except Exception as error:  # noqa: BLE001 - only out-of-memory errors are handled
            if not is_out_of_memory(error) or size == 1:
                raise
        free_memory(device)  # outside the except block: the traceback's tensors are gone
        size //= 2


def retry_out_of_memory(compute: Callable[[], T], device: torch.device, batch_size: int, what: str) -> T:
    """`compute()`; after an out-of-memory error, free memory and compute the same batch once more.

    `compute` must redo the whole batch from its seeds (a fresh generator, the batch's model-RNG
    seed, a fresh pass counter), so a retry gives what the first attempt would have given.
    """
    try:
        return compute()
    except Exception as error:  # noqa: BLE001 - only out-of-memory errors are handled
        if not is_out_of_memory(error):
            raise
    free_memory(device)
    try:
        return compute()
    except Exception as error:  # noqa: BLE001
        if not is_out_of_memory(error):
            raise
    free_memory(device)
    raise UserError(
        f"out of memory in {what} at batch size {batch_size}, twice (the CUDA cache was emptied in between); "
        "an evaluation never changes its batch size while it runs (the batches set the random starts): "
        f"free memory and run the same command again to resume, or start the evaluation with --batch-size auto or {max(1, batch_size // 2)}"
    )


def resolve_batch_size(store: Store, target: EvaluationTarget, config: EvalConfig) -> int:
    """The evaluation's batch size: the configured number, or `auto` resolved (see the module doc)."""
    if config.batch_size != AUTO:
        return int(config.batch_size)
    from advdef.evaluation.engine import protocol_key

    key = protocol_key(target.protocol)
    for evaluation in store.evaluations(target.run["run_id"]):
        if evaluation["protocol_key"] == key and isinstance(evaluation["protocol"].get("batch_size"), int):
            return int(evaluation["protocol"]["batch_size"])
    if target.device.type not in PROBED_DEVICE_TYPES:
        return DEFAULT_BATCH_SIZE
    return probe(lambda size: _forward_backward(target, config, size), target.device)


def _forward_backward(target: EvaluationTarget, config: EvalConfig, size: int) -> None:
    """One attack step's worth of memory: forward and input gradient on `size` of the samples."""
    from advdef.attacks.base import eval_mode
    from advdef.evaluation.precision import autocast

    count = min(size, len(target.samples))  # batches are never larger than the sample set
    x = prepare(target.samples.float_images(torch.arange(count)), target.device, True).requires_grad_(True)
    with preserved_rng(target.device), eval_mode(target.model) as view, autocast(config.amp, target.device):
        logits = view(x)
    torch.autograd.grad(logits.logsumexp(1).sum(), x)
