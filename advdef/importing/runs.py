"""Register an imported model as an ordinary advdef run: one checkpoint (epoch 1) and a store row.

Design: the run is indistinguishable from a trained one to the evaluation, except for what it
records. Its weights are re-saved as an advdef checkpoint (safetensors + card) in the run folder,
so loading never touches the original file again. Its config is a `TrainConfig` with `at` set to
the import label (default "imported"), `select="last"` (so the checkpoint rule never asks the
training registry about that label) and `dual_bn="off"`, plus an `imported` entry (source file,
sha256, layout, normalisation, factory) that `TrainConfig.from_json` ignores; the report's recipe
key includes it, so two different imported files never pool as seeds of one recipe.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from advdef.data.base import DataInfo
from advdef.errors import UserError
from advdef.importing.checkpoint_files import load_into
from advdef.importing.models import FACTORY_PREFIX, build_factory_model, parse_logits_key
from advdef.registry import DEFENSES, MODELS
from advdef.store import Store
from advdef.training import checkpoint
from advdef.training.config import TrainConfig
from advdef.training.trainer import open_dataset
from advdef.versions import library_versions

IMPORTED_EPOCH = 1
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


def parse_normalize(text: str | None, info: DataInfo) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """`--normalize MEAN/STD` ("0.49,0.48,0.45/0.25,0.24,0.26", "0.5/0.5" broadcast, or "none")."""
    channels = info.input_shape[0]
    if text is None:
        return tuple(info.mean), tuple(info.std)
    if text.strip().lower() == "none":
        return (0.0,) * channels, (1.0,) * channels
    mean_text, sep, std_text = text.partition("/")
    try:
        mean = tuple(float(v) for v in mean_text.split(","))
        std = tuple(float(v) for v in std_text.split(","))
    except ValueError:
        mean = std = ()
    if not sep or not mean or not std:
        raise UserError(f"--normalize '{text}': expected MEAN/STD, e.g. 0.4914,0.4822,0.4465/0.2471,0.2435,0.2616, or none")
    mean = mean * channels if len(mean) == 1 else mean
    std = std * channels if len(std) == 1 else std
    if len(mean) != channels or len(std) != channels:
        raise UserError(f"--normalize '{text}': {info.name} images have {channels} channel(s), got {len(mean)} means and {len(std)} stds")
    if any(s <= 0 for s in std):
        raise UserError(f"--normalize '{text}': every std must be positive")
    return mean, std


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _check_output(model: torch.nn.Module, info: DataInfo, what: str) -> None:
    """One eval-mode forward on a zero batch: the model must map the dataset's images to its classes."""
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.zeros(2, *info.input_shape))
    except UserError:
        raise
    except Exception as error:  # noqa: BLE001  (shape errors from the user's network)
        line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise UserError(f"{what} fails on {info.name} inputs of shape {tuple(info.input_shape)}: {line}") from None
    if tuple(out.shape) != (2, info.num_classes):
        raise UserError(
            f"{what} outputs shape {tuple(out.shape[1:])} per image, expected ({info.num_classes},) logits for {info.name}"
        )


def import_run(
    store: Store,
    runs_dir: Path,
    *,
    arch: str | None = None,
    model: str | None = None,
    kwargs: dict[str, Any] | None = None,
    weights: str | Path | None = None,
    defense: str = "none",
    data: str = "cifar10",
    data_dir: str | None = None,
    normalize: str | None = None,
    logits_key: str | None = None,
    name: str | None = None,
    at: str = "imported",
) -> str:
    """Register the model as a trained run; returns its run id."""
    if (arch is None) == (model is None):
        raise UserError("give exactly one of --arch (a built-in architecture) or --model package.module:factory")
    if arch is not None and weights is None:
        raise UserError("--arch needs --weights FILE (the checkpoint to import)")
    if arch is not None and (kwargs or logits_key is not None):
        raise UserError("--kwargs and --logits-key apply to --model factories only")
    if not re.fullmatch(r"[A-Za-z0-9_.\-]+", at):
        raise UserError(f"--at '{at}': use letters, digits, '_', '-' or '.'")
    if arch is not None:
        MODELS.resolve(arch)  # unknown names fail here with close matches
    DEFENSES.resolve(defense)
    dataset = open_dataset(data, data_dir)
    info = dataset.info
    mean, std = parse_normalize(normalize, info)
    info = replace(info, mean=mean, std=std)
    weights_path = Path(weights).expanduser() if weights is not None else None
    if weights_path is not None and not weights_path.is_file():
        raise UserError(f"weights file {weights_path} does not exist")

    if arch is not None:
        from advdef.models import build_model

        built = build_model(arch, info, defense)
        target, what = built.model.net, f"{built.arch_spec} ({info.name}, {info.num_classes} classes)"
        arch_label = built.arch_spec
        factory_spec = None
    else:
        factory_spec = {"factory": model, "kwargs": kwargs or {}, "logits_key": parse_logits_key(logits_key)}
        built = build_factory_model(factory_spec, info, defense)
        target, what = built.model.net, f"{FACTORY_PREFIX}{model}"
        arch_label = built.arch_spec
    source: dict[str, Any] = {"weights": None}
    if weights_path is not None:
        source = {"weights": str(weights_path.resolve()), "sha256": _sha256(weights_path),
                  **load_into(target, weights_path, what)}
    _check_output(built.model, info, what)

    run_id = name or f"imported-{arch_label.split(':')[0] if arch else 'factory'}-" + (
        source.get("sha256", "")[:6] or hashlib.sha256(json.dumps(factory_spec, sort_keys=True).encode()).hexdigest()[:6])
    if not _NAME.fullmatch(run_id):
        raise UserError(f"--name '{run_id}': use letters, digits, '_', '-' or '.'")
    if run_id in store.run_ids():
        raise UserError(f"run '{run_id}' already exists in store {store.path}; pick another --name")

    imported = {
        "source": source,
        "model": factory_spec,
        "input": {"range": "[0,1]", "shape": list(info.input_shape), "mean": list(mean), "std": list(std),
                  "normalize": "declared" if normalize is not None else f"{info.name} default"},
    }
    config = TrainConfig(
        data=data, arch=arch_label, defense=built.defense_spec, at=at, epochs=IMPORTED_EPOCH, select="last",
        data_dir=data_dir, device="auto", dual_bn="off",
        # Factory networks may reshape with .view, which fails on channels_last tensors.
        channels_last=factory_spec is None,
    ).to_json()
    config["imported"] = imported
    run_dir = Path(runs_dir) / run_id
    card = {
        "run_id": run_id, "arch": arch_label, "defense": built.defense_spec, "at": at, "dual_bn": "off",
        "data": info.to_json(), "seed": 0, "config": config, "versions": library_versions(),
        "params_total": built.params_total, "params_added": built.params_added, "imported": imported,
    }
    # No training state to keep: a parameter-free dummy optimizer satisfies the checkpoint format.
    dummy = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.0)
    card_path = checkpoint.save_checkpoint(run_dir, IMPORTED_EPOCH, built.model, dummy, card)
    store.insert_run({
        "run_id": run_id, "status": "trained", "dataset": info.name, "arch": arch_label,
        "defense": built.defense_spec, "at_method": at, "seed": 0, "run_dir": str(run_dir),
        "config": config, "versions": library_versions(),
        "epochs_done": IMPORTED_EPOCH, "best_epoch": IMPORTED_EPOCH,
    })
    store.record_checkpoint(run_id, IMPORTED_EPOCH, str(card_path), {"imported": True}, 0.0)
    return run_id
