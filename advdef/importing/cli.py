"""`advdef import`: register a model trained elsewhere as a run (bring your own model).

Registered by `advdef.cli` with `app.command("import")(import_command)`, after the shared option
types exist. Heavy modules (torch) load inside the command.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from advdef.cli import DataDirOption, RunsDirOption, StoreOption, _open_store, handles_user_errors
from advdef.errors import UserError


@handles_user_errors
def import_command(
    arch: Annotated[Optional[str], typer.Option("--arch", help="Built-in architecture the weights fit, e.g. resnet18 (see `advdef list models`).")] = None,
    weights: Annotated[Optional[Path], typer.Option("--weights", help="Checkpoint: .safetensors, or a PyTorch file loadable with torch.load(weights_only=True).")] = None,
    model: Annotated[Optional[str], typer.Option("--model", help="Your own architecture: package.module:factory returning an nn.Module.")] = None,
    kwargs: Annotated[Optional[str], typer.Option("--kwargs", help="JSON object of keyword arguments for the --model factory.")] = None,
    logits_key: Annotated[Optional[str], typer.Option("--logits-key", help="Which entry of a tuple (index) or dict (key) output holds the logits (tuple default 0).")] = None,
    defense: Annotated[str, typer.Option("--defense", help="Defense the model was built with (its modules' weights must be in the file).")] = "none",
    data: Annotated[str, typer.Option("--data", help="Dataset the model classifies (fixes input shape and classes).")] = "cifar10",
    normalize: Annotated[Optional[str], typer.Option("--normalize", help="MEAN/STD the model expects after [0,1] scaling, e.g. 0.4914,0.4822,0.4465/0.2471,0.2435,0.2616; `none` if the model normalises itself. (default: the dataset's)")] = None,
    name: Annotated[Optional[str], typer.Option("--name", help="Run id (default imported-ARCH-SHA6).")] = None,
    at: Annotated[str, typer.Option("--at", help="Label for how it was trained, shown in the report's `at` column.")] = "imported",
    data_dir: DataDirOption = None,
    store_path: StoreOption = None,
    runs_dir: RunsDirOption = None,
) -> None:
    """Register a model trained elsewhere as a run, so `evaluate`, `attack` and `report` work on it."""
    from advdef.importing.runs import import_run
    from advdef.pipeline import runs_dir_for

    parsed_kwargs = None
    if kwargs is not None:
        try:
            parsed_kwargs = json.loads(kwargs)
        except json.JSONDecodeError as error:
            raise UserError(f"--kwargs is not valid JSON: {error}") from None
        if not isinstance(parsed_kwargs, dict):
            raise UserError("--kwargs must be a JSON object, e.g. '{\"num_classes\": 10}'")
    store = _open_store(store_path)
    run_id = import_run(
        store, runs_dir_for(store, runs_dir), arch=arch, model=model, kwargs=parsed_kwargs, weights=weights,
        defense=defense, data=data, data_dir=data_dir, normalize=normalize, logits_key=logits_key, name=name, at=at,
    )
    run = store.get_run(run_id)
    typer.echo(f"run {run_id}: imported {run['arch']} for {run['dataset']} (defense {run['defense']}, at {run['at_method']}), store {store.path}")
