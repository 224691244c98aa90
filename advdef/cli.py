"""advdef's command line: a thin Typer shell over `advdef.pipeline` and friends.

Every command turns a `UserError` into one line on stderr and exit code 2. Results go to stdout;
progress and messages go to stderr.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import typer
from rich.console import Console

from advdef.errors import UserError

app = typer.Typer(
    name="advdef",
    help="Benchmark adversarial defenses of image classifiers: train, attack, evaluate, report.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)
stdout = Console()
if not stdout.is_terminal:
    stdout = Console(width=max(stdout.width, 200))  # pipes and files get whole table rows


def _stderr() -> Console:
    return Console(stderr=True)


def handles_user_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """Print a UserError as one line and exit 2 — never a traceback for a user's mistake."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except UserError as error:
            typer.echo(f"error: {error}", err=True)
            raise typer.Exit(code=error.exit_code) from None
        except KeyboardInterrupt:
            typer.echo("interrupted; everything finished so far is stored — run the same command to resume", err=True)
            raise typer.Exit(code=130) from None

    return wrapper


# Options shared by several commands.
StoreOption = Annotated[
    Optional[Path], typer.Option("--store", help="SQLite store (default: $ADVDEF_STORE or ./advdef.sqlite).")
]
RunsDirOption = Annotated[Optional[Path], typer.Option("--runs-dir", help="Checkpoint folder (default: runs/ beside the store).")]
DeviceOption = Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")]
DataDirOption = Annotated[Optional[str], typer.Option("--data-dir", help="Where torchvision datasets live (default ./data).")]
DownloadOption = Annotated[bool, typer.Option("--download", help="Let torchvision download the dataset (needs internet).")]


def _open_store(path: Path | None):
    from advdef.store import Store

    return Store(path) if path is not None else Store()


def _eps(text: str):
    from advdef.specs import parse_eps

    return parse_eps(text)


def _reporter():
    from advdef.progress import RichReporter

    return RichReporter()


@app.command("list")
@handles_user_errors
def list_plugins(
    kind: Annotated[Optional[str], typer.Argument(help="datasets, models, defenses, training or attacks (default: all).")] = None,
) -> None:
    """List the registered plugins with a one-line summary each."""
    from advdef.errors import suggest
    from advdef.registry import REGISTRIES

    if kind is not None and kind not in REGISTRIES:
        raise suggest(kind, REGISTRIES, "plugin kind")
    for name, registry in REGISTRIES.items():
        if kind is not None and name != kind:
            continue
        stdout.print(f"[bold]{name}[/]")
        for plugin in registry:
            source = "" if plugin.source == "builtin" else f"  [dim]({plugin.source})[/]"
            stdout.print(f"  {plugin.name:<14} {plugin.summary}{source}", highlight=False)


@app.command()
@handles_user_errors
def info(
    arch: Annotated[str, typer.Option("--arch", help="Architecture spec, e.g. resnet18.")] = "resnet18",
    defense: Annotated[str, typer.Option("--defense", help="Defense spec, e.g. none or fsr:points=layer4.")] = "none",
    data: Annotated[str, typer.Option("--data", help="Dataset spec giving input shape and classes.")] = "cifar10",
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Show a model's parameter count (total and added by the defense) and insertion points."""
    from advdef.models import build_model
    from advdef.registry import DATASETS

    dataset_info = DATASETS.create(data).info
    built = build_model(arch, dataset_info, defense)
    payload = {
        "arch": built.arch_spec,
        "defense": built.defense_spec,
        "data": dataset_info.name,
        "input_shape": list(dataset_info.input_shape),
        "num_classes": dataset_info.num_classes,
        "params_total": built.params_total,
        "params_backbone": built.params_backbone,
        "params_added": built.params_added,
        "insertion_points": list(built.model.insertion_points()),
    }
    if as_json:
        typer.echo(json.dumps(payload, indent=2))
    else:
        for key, value in payload.items():
            stdout.print(f"{key:<17} {value}", highlight=False)


@app.command()
@handles_user_errors
def train(
    data: Annotated[str, typer.Option("--data", help="Dataset spec: digits (embedded, offline), cifar10, imagefolder:PATH, ...")] = "digits",
    arch: Annotated[str, typer.Option("--arch", help="Architecture spec.")] = "smallcnn",
    defense: Annotated[str, typer.Option("--defense", help="Defense spec.")] = "none",
    at: Annotated[str, typer.Option("--at", help="Training method: standard, pgd_at, or a spec like pgd_at:steps=7.")] = "pgd_at",
    epochs: Annotated[int, typer.Option("--epochs")] = 10,
    batch_size: Annotated[int, typer.Option("--batch-size")] = 128,
    lr: Annotated[float, typer.Option("--lr", help="SGD learning rate (x0.1 at 50% and 75% of the epochs).")] = 0.1,
    weight_decay: Annotated[float, typer.Option("--weight-decay")] = 5e-4,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    limit_train: Annotated[Optional[int], typer.Option("--limit-train", help="Use N training samples (class-balanced).")] = None,
    val_fraction: Annotated[float, typer.Option("--val-fraction", help="Share of train held out for checkpoint selection.")] = 0.1,
    select: Annotated[str, typer.Option("--select", help="auto, val_robust, val_clean or last.")] = "auto",
    resume: Annotated[Optional[str], typer.Option("--resume", help="Continue run RUN_ID from its last checkpoint.")] = None,
    data_dir: DataDirOption = None,
    download: DownloadOption = False,
    device: DeviceOption = "auto",
    channels_last: Annotated[bool, typer.Option("--channels-last/--no-channels-last")] = True,
    amp: Annotated[bool, typer.Option("--amp/--no-amp", help="Mixed precision on CUDA (no effect on CPU).")] = True,
    store_path: StoreOption = None,
    runs_dir: RunsDirOption = None,
) -> None:
    """Train a model (any defense x AT method x architecture); checkpoints every epoch, resumable."""
    from advdef.pipeline import runs_dir_for
    from advdef.training.config import TrainConfig
    from advdef.training.trainer import start_run
    from advdef.training.trainer import train as resume_training

    store = _open_store(store_path)
    with _reporter() as reporter:
        if resume is not None:
            resume_training(resume, store, reporter)
            run_id = resume
        else:
            config = TrainConfig(
                data=data, arch=arch, defense=defense, at=at, epochs=epochs, batch_size=batch_size, lr=lr,
                weight_decay=weight_decay, seed=seed, limit_train=limit_train, val_fraction=val_fraction,
                select=select, data_dir=data_dir, download=download, device=device,
                channels_last=channels_last, amp=amp,
            ).validate()
            run_id = start_run(config, store, runs_dir_for(store, runs_dir), reporter)
    run = store.get_run(run_id)
    typer.echo(f"run {run_id}: {run['epochs_done']} epochs, best epoch {run['best_epoch']}, store {store.path}")


def _eval_config(attacks: str, n: Optional[int], eps: str, seed: int, batch_size: int, limit_test: Optional[int],
                 data_dir: Optional[str], download: bool, device: str, epoch: Optional[int]):
    from advdef.evaluation.engine import EvalConfig
    from advdef.specs import split_specs

    specs = split_specs(attacks)
    if not specs:
        raise UserError("--attacks is empty; e.g. --attacks fgsm,pgd20,cw,aa")
    if batch_size < 1:
        raise UserError("--batch-size must be at least 1")
    if limit_test is not None and limit_test < 1:
        raise UserError("--limit-test must be at least 1")
    config = EvalConfig(attacks=specs, eps=_eps(eps), n=n, seed=seed, batch_size=batch_size, limit_test=limit_test,
                        data_dir=data_dir, download=download, device=device, epoch=epoch)
    config.canonical_attacks()
    return config


NOption = Annotated[Optional[int], typer.Option("--n", help="Evaluate N test samples (seeded, class-balanced); default all.")]
EpsOption = Annotated[str, typer.Option("--eps", help="L-inf budget as a fraction of [0,1], e.g. 8/255.")]
SeedOption = Annotated[int, typer.Option("--seed", help="Seed of the sample choice and the attacks.")]
BatchOption = Annotated[int, typer.Option("--batch-size")]
LimitTestOption = Annotated[Optional[int], typer.Option("--limit-test", help="Load only N test samples.")]
EpochOption = Annotated[Optional[int], typer.Option("--epoch", help="Evaluate this epoch instead of the selected one.")]


@app.command()
@handles_user_errors
def evaluate(
    attacks: Annotated[str, typer.Option("--attacks", help="Comma-separated attack specs: fgsm,pgd20,cw,aa.")] = "fgsm,pgd20,cw,aa",
    run: Annotated[Optional[list[str]], typer.Option("--run", help="Run id (repeatable); default: every run lacking these attacks.")] = None,
    n: NOption = None,
    eps: EpsOption = "8/255",
    seed: SeedOption = 0,
    batch_size: BatchOption = 256,
    limit_test: LimitTestOption = None,
    epoch: EpochOption = None,
    data_dir: DataDirOption = None,
    download: DownloadOption = False,
    device: DeviceOption = "auto",
    store_path: StoreOption = None,
) -> None:
    """Measure robust accuracy per attack and the per-sample worst case; resumable."""
    from advdef import pipeline
    from advdef.report import comparison_tables, print_rich

    config = _eval_config(attacks, n, eps, seed, batch_size, limit_test, data_dir, download, device, epoch)
    store = _open_store(store_path)
    with _reporter() as reporter:
        eval_ids = pipeline.evaluate(store, config, run, reporter)
    if not eval_ids:
        _stderr().print("nothing to evaluate: every trained run already has these attacks (or no run is trained)")
        return
    run_ids = sorted({e["run_id"] for e in store.evaluations() if e["eval_id"] in eval_ids})
    print_rich(comparison_tables(store, run_ids), stdout)


@app.command()
@handles_user_errors
def attack(
    run: Annotated[str, typer.Option("--run", help="Run id to attack.")],
    attack_spec: Annotated[str, typer.Option("--attack", help="Attack spec, e.g. pgd20 or pgd:steps=50,restarts=2.")] = "pgd20",
    out: Annotated[Path, typer.Option("--out", help="Output .safetensors file.")] = Path("adversarial.safetensors"),
    n: NOption = None,
    eps: EpsOption = "8/255",
    seed: SeedOption = 0,
    batch_size: BatchOption = 256,
    limit_test: LimitTestOption = None,
    epoch: EpochOption = None,
    data_dir: DataDirOption = None,
    download: DownloadOption = False,
    device: DeviceOption = "auto",
    store_path: StoreOption = None,
) -> None:
    """Craft adversarial examples for a run's test samples and save them (safetensors)."""
    from advdef.pipeline import craft

    config = _eval_config(attack_spec, n, eps, seed, batch_size, limit_test, data_dir, download, device, epoch)
    store = _open_store(store_path)
    result = craft(store, run, attack_spec, out, config)
    typer.echo(
        f"saved {result.attacked} adversarial examples to {result.path}; success rate "
        f"{100 * result.success_rate:.1f}% ({result.succeeded} of {result.clean_correct} clean-correct samples)"
    )


@app.command()
@handles_user_errors
def report(
    markdown: Annotated[bool, typer.Option("--markdown", help="Markdown tables.")] = False,
    csv: Annotated[bool, typer.Option("--csv", help="CSV with fractions, Wilson bounds and counts.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="JSON.")] = False,
    run: Annotated[Optional[list[str]], typer.Option("--run", help="Only these run ids (repeatable).")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="Write to this file instead of stdout.")] = None,
    store_path: StoreOption = None,
) -> None:
    """Comparison tables of every evaluation in the store, one table per protocol."""
    from advdef.report import comparison_tables, print_rich, to_csv, to_json, to_markdown

    if sum([markdown, csv, as_json]) > 1:
        raise UserError("choose one of --markdown, --csv, --json")
    store = _open_store(store_path)
    for run_id in run or []:
        store.get_run(run_id)
    tables = comparison_tables(store, run)
    if not tables:
        _stderr().print("no evaluations in the store yet; run advdef evaluate first")
        return
    if markdown or csv or as_json:
        text = to_markdown(tables) if markdown else to_csv(tables) if csv else to_json(tables)
        if out is not None:
            out.write_text(text)
        else:
            sys.stdout.write(text)
        return
    console = Console(file=out.open("w"), width=200) if out is not None else stdout
    print_rich(tables, console)


@app.command("export")
@handles_user_errors
def export(
    table: Annotated[str, typer.Argument(help="runs, checkpoints, evaluations, eval_attacks or outcomes.")],
    out: Annotated[Optional[Path], typer.Option("--out", help="CSV file (default stdout).")] = None,
    store_path: StoreOption = None,
) -> None:
    """Export one store table as CSV (per-sample outcomes included)."""
    import pandas as pd

    rows = _open_store(store_path).table(table)
    text = pd.DataFrame.from_records(rows).to_csv(index=False)
    if out is not None:
        out.write_text(text)
    else:
        sys.stdout.write(text)


@app.command("run")
@handles_user_errors
def run_command(
    preset: Annotated[str, typer.Option("--preset", help="Recipe to run: quick.")] = "quick",
    device: DeviceOption = "auto",
    store_path: StoreOption = None,
    runs_dir: RunsDirOption = None,
) -> None:
    """Train, evaluate and report in one go from a preset (quick: offline, a few minutes on CPU)."""
    from advdef.pipeline import run_preset, runs_dir_for
    from advdef.report import comparison_tables, print_rich

    store = _open_store(store_path)
    with _reporter() as reporter:
        run_ids = run_preset(preset, store, runs_dir_for(store, runs_dir), reporter, device=device)
    print_rich(comparison_tables(store, run_ids), stdout)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
