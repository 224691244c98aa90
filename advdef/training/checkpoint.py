"""Checkpoints: safetensors weights, safetensors training state, and a JSON card.

No pickles anywhere: a checkpoint can be shared and loaded without running code. The card holds
everything needed to rebuild the model (arch, defense, dataset shape and normalization) with no
other input. Files are written to a temporary name and renamed, card last, so a checkpoint whose
card exists is complete even if the process was killed mid-write.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

FORMAT = "advdef-checkpoint/1"


def _atomic_write_bytes(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    with open(tmp, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _contiguous(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in tensors.items()}


def paths(run_dir: Path, epoch: int) -> dict[str, Path]:
    stem = f"epoch-{epoch:03d}"
    return {
        "weights": run_dir / f"{stem}.safetensors",
        "state": run_dir / f"{stem}.state.safetensors",
        "card": run_dir / f"{stem}.json",
    }


def save_checkpoint(
    run_dir: Path,
    epoch: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    card: dict[str, Any],
) -> Path:
    """Write epoch `epoch`'s checkpoint; returns the card path."""
    run_dir.mkdir(parents=True, exist_ok=True)
    files = paths(run_dir, epoch)
    _atomic_write_bytes(files["weights"], lambda p: save_file(_contiguous(model.state_dict()), str(p)))
    optimizer_state = optimizer.state_dict()
    state_tensors: dict[str, torch.Tensor] = {}
    for index, state in optimizer_state["state"].items():
        for key, value in state.items():
            if not isinstance(value, torch.Tensor):
                value = torch.tensor(value)
            state_tensors[f"optimizer.{index}.{key}"] = value
    _atomic_write_bytes(files["state"], lambda p: save_file(_contiguous(state_tensors), str(p)))
    full_card = {
        **card,
        "format": FORMAT,
        "epoch": epoch,
        "weights": files["weights"].name,
        "state": files["state"].name,
        "optimizer_param_groups": optimizer_state["param_groups"],
    }
    text = json.dumps(full_card, indent=2, sort_keys=True, default=str)
    _atomic_write_bytes(files["card"], lambda p: p.write_text(text))
    return files["card"]


def read_card(card_path: Path) -> dict[str, Any]:
    card = json.loads(Path(card_path).read_text())
    if card.get("format") != FORMAT:
        raise ValueError(f"{card_path} is not an advdef checkpoint card ({FORMAT})")
    return card


def load_weights(card_path: Path) -> dict[str, torch.Tensor]:
    card = read_card(card_path)
    return load_file(str(Path(card_path).parent / card["weights"]))


def load_optimizer_state(card_path: Path, optimizer: torch.optim.Optimizer) -> None:
    """Restore optimizer state (momentum buffers, param groups) saved by `save_checkpoint`."""
    card = read_card(card_path)
    tensors = load_file(str(Path(card_path).parent / card["state"]))
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        _, index, key = name.split(".", 2)
        state.setdefault(int(index), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": card["optimizer_param_groups"]})


def latest_complete(run_dir: Path) -> Path | None:
    """The card of the last epoch whose checkpoint was fully written."""
    cards = sorted(Path(run_dir).glob("epoch-*.json"))
    return cards[-1] if cards else None
