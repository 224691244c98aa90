"""Reading weight files from other code bases without running their code.

Only two readers are used: safetensors (pure tensors) and `torch.load(..., weights_only=True)`,
whose restricted unpickler refuses any global that is not a tensor, container or primitive — a
pickle carrying a code payload fails before the payload runs. Key layouts seen in the wild are
normalised: a bare state_dict, a dict holding one under `state_dict`/`model`/`net`/..., and the
`module.` (DataParallel) / `_orig_mod.` (torch.compile) / `net.` (advdef Classifier) prefixes.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch

from advdef.errors import UserError

# Where checkpoints of common training scripts keep the model's state_dict, in order of preference.
NESTED_KEYS = ("state_dict", "model_state_dict", "model", "net", "state_dict_ema", "model_ema")
# Prefixes added by wrappers around the network; stripped when every key carries them.
PREFIXES = ("module.", "_orig_mod.", "net.")


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def read_file(path: str | Path) -> tuple[Any, str]:
    """The object stored in `path` and its format ("safetensors" or "torch"); never unpickles code."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"weights file {path} does not exist")
    with open(path, "rb") as handle:
        head = handle.read(16)
    if path.suffix == ".safetensors" or (len(head) >= 9 and head[8:9] == b"{"):
        from safetensors.torch import load_file

        try:
            return load_file(str(path)), "safetensors"
        except Exception as error:  # noqa: BLE001  (any parse failure is the user's file)
            if path.suffix == ".safetensors":
                raise UserError(f"{path} is not a readable safetensors file: {_first_line(error)}") from None
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True), "torch"
    except pickle.UnpicklingError as error:
        raise UserError(
            f"{path} needs unpickling of code, which advdef refuses ({_first_line(error)}); "
            "re-save it with torch.save(model.state_dict(), ...) or as safetensors"
        ) from None
    except Exception as error:  # noqa: BLE001
        raise UserError(f"{path} is not a readable PyTorch or safetensors file: {_first_line(error)}") from None


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    )


def extract_state_dict(obj: Any, source: str = "the file") -> tuple[dict[str, torch.Tensor], str]:
    """The state_dict inside a loaded checkpoint object and a description of the layout found."""
    if _is_state_dict(obj):
        state, layout = dict(obj), "state_dict"
    elif isinstance(obj, dict):
        for key in NESTED_KEYS:
            if _is_state_dict(obj.get(key)):
                state, layout = dict(obj[key]), f"dict['{key}']"
                break
        else:
            shown = ", ".join(repr(k) for k in list(obj)[:8])
            raise UserError(
                f"{source} holds no state_dict: top-level keys are {shown}; expected tensors or one of "
                + ", ".join(NESTED_KEYS)
            )
    else:
        raise UserError(f"{source} holds a {type(obj).__name__}, not a state_dict")
    return state, layout


def strip_prefixes(state: dict[str, torch.Tensor], expected: set[str]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Drop wrapper prefixes every key carries, unless the keys already fit the model as they are."""
    stripped: list[str] = []
    changed = True
    while changed and not set(state) <= expected:
        changed = False
        for prefix in PREFIXES:
            if all(k.startswith(prefix) for k in state):
                state = {k[len(prefix):]: v for k, v in state.items()}
                stripped.append(prefix)
                changed = True
                break
    return state, stripped


def _listed(keys: list[str], limit: int = 4) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")


def check_keys(module: torch.nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """Raise a one-line UserError naming missing/unexpected keys and shape mismatches."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing keys: {_listed(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_listed(unexpected)}")
    if shapes:
        problems.append(f"shape mismatch (file vs model): {_listed(shapes, 3)}")
    if problems:
        raise UserError(f"weights do not fit {what}: " + "; ".join(problems))


def load_into(module: torch.nn.Module, path: str | Path, what: str) -> dict[str, Any]:
    """Load the weights of `path` into `module` (strict); returns what was read (for the card)."""
    obj, fmt = read_file(path)
    state, layout = extract_state_dict(obj, str(path))
    state, stripped = strip_prefixes(state, set(module.state_dict()))
    if stripped:
        layout += ", prefix " + "".join(stripped) + " stripped"
    check_keys(module, state, what)
    module.load_state_dict(state, strict=True)
    return {"format": fmt, "layout": layout, "tensors": len(state)}
