"""Device, memory-format and precision choices, kept in one place so CPU exercises the CUDA paths.

channels_last is on by default on every device (the probe measured +10-65% on this CPU too);
AMP is used only on CUDA, where it pays off, and never changes the fp32 path on CPU.
"""

from __future__ import annotations

import warnings
from contextlib import nullcontext
from typing import Any

import torch

from advdef.errors import UserError


def select_device(name: str = "auto") -> torch.device:
    """`auto` picks CUDA when present, else CPU; an explicit CUDA device must exist."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device '{name}'; valid: auto, cpu, cuda, cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device '{name}' requested but CUDA is not available; use --device cpu or auto")
    return device


def memory_format(channels_last: bool) -> torch.memory_format:
    return torch.channels_last if channels_last else torch.contiguous_format


def prepare(tensor: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    """Move a batch to the device in the model's memory format.

    To CUDA, a host tensor goes through page-locked memory (unless it is already pinned, e.g. by
    the training prefetcher) and is copied asynchronously: later kernels on the same stream wait
    for it, and PyTorch's pinned-memory cache does not reuse the buffer before the copy is done.
    Elsewhere this is a plain `.to(device)`.
    """
    if device.type == "cuda" and tensor.device.type == "cpu" and not tensor.is_pinned():
        tensor = tensor.pin_memory()
    tensor = tensor.to(device, non_blocking=True)
    if tensor.dim() == 4:
        tensor = tensor.contiguous(memory_format=memory_format(channels_last))
    return tensor


def autocast(device: torch.device, enabled: bool) -> Any:
    """fp16 autocast on CUDA when enabled; a no-op elsewhere."""
    if enabled and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.float16)
    return nullcontext()


def grad_scaler(device: torch.device, enabled: bool) -> torch.amp.GradScaler:
    return torch.amp.GradScaler("cuda", enabled=enabled and device.type == "cuda")


# torch.compile backend for `--compile`; tests swap in a cheap or a failing one.
COMPILE_BACKEND: Any = "inductor"


def compile_model(model: torch.nn.Module, enabled: bool = True) -> torch.nn.Module:
    """`--compile`: compile the model's forward in place, falling back to eager if compiling fails.

    Only the instance's `forward` is replaced (by a compiled version of itself), so parameters,
    buffers and `state_dict()` keys are the module's own (no `_orig_mod.` prefix) and checkpoints
    stay interchangeable with uncompiled runs; hooks on the model (the evaluation's pass counter)
    run eagerly around the compiled forward. torch.compile compiles lazily at each new input
    shape or mode; if that fails (no C++ compiler, an unsupported op) while the eager forward
    works, a warning says so and the model stays eager from then on. An error the eager forward
    raises too is the model's own and is raised as is; out-of-memory errors are never retried.
    Compiled kernels round differently from eager ones: logits agree to float tolerance, not bit
    for bit.
    """
    if not enabled:
        return model
    eager = model.forward
    compiled = torch.compile(eager, backend=COMPILE_BACKEND)
    state = {"compiled": True}

    def forward(*args: Any, **kwargs: Any) -> Any:
        if state["compiled"]:
            try:
                return compiled(*args, **kwargs)
            except Exception as error:  # noqa: BLE001 - decided below: compiler failure or the model's own error
                if isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in str(error).lower():
                    raise
                failure = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
            output = eager(*args, **kwargs)  # raises the model's own error if there is one
            state["compiled"] = False
            warnings.warn(f"torch.compile failed ({failure}); running {type(model).__name__} eagerly", RuntimeWarning,
                          stacklevel=2)
            return output
        return eager(*args, **kwargs)

    model.forward = forward
    return model
