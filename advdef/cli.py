"""advdef's command line: a thin Typer shell over `advdef.pipeline` and friends.

Every command turns a `UserError` into one line on stderr and exit code 2. Results go to stdout;
progress and messages go to stderr.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Callable, Optional

import typer
from rich.console import Console

from advdef.errors import UserError

if TYPE_CHECKING:  # the CLI imports heavy modules lazily, inside each command
    from advdef.training.config import TrainConfig

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
# A string, not a Path: Path would fold a postgresql:// URL's '//' into '/'.
StoreOption = Annotated[
    Optional[str],
    typer.Option(
        "--store",
        help="SQLite file, or postgresql://user:pass@host/db for a store shared by many machines "
        "(default: $ADVDEF_STORE or ./advdef.sqlite).",
    ),
]
RunsDirOption = Annotated[Optional[Path], typer.Option("--runs-dir", help="Checkpoint folder (default: runs/ beside an SQLite store, ./runs for a PostgreSQL one).")]
DeviceOption = Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")]
DataDirOption = Annotated[Optional[str], typer.Option("--data-dir", help="Where torchvision datasets live (default ./data).")]
DownloadOption = Annotated[bool, typer.Option("--download", help="Let torchvision download the dataset (needs internet).")]


def _open_store(location: str | Path | None):
    """The store at --store (a path or a postgresql:// URL), else $ADVDEF_STORE, else ./advdef.sqlite."""
    from advdef.store import open_store

    return open_store(location)


def _eps(text: str):
    from advdef.specs import parse_eps

    return parse_eps(text)


def _reporter():
    from advdef.progress import RichReporter

    return RichReporter()


@app.command("list")
@handles_user_errors
def list_plugins(
    kind: Annotated[
        Optional[str], typer.Argument(help="datasets, models, defenses, training, attacks or presets (default: all).")
    ] = None,
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
        if name == "presets":
            _pipeline_presets_footnote()


def _pipeline_presets_footnote() -> None:
    """Training presets and `advdef run --preset` share a word; say which is which."""
    from advdef.pipeline import PRESETS as PIPELINE_PRESETS

    stdout.print(
        "  [dim]training recipes for `advdef train --preset NAME`; `advdef preset show NAME` shows their values. "
        f"`advdef run --preset` takes pipeline presets instead: {', '.join(PIPELINE_PRESETS)}[/]",
        highlight=False,
    )


@app.command()
@handles_user_errors
def info(
    arch: Annotated[str, typer.Option("--arch", help="Architecture spec, e.g. resnet18.")] = "resnet18",
    defense: Annotated[str, typer.Option("--defense", help="Defense spec, e.g. none or fsr:points=layer4.")] = "none",
    data: Annotated[str, typer.Option("--data", help="Dataset spec giving input shape and classes.")] = "cifar10",
    dual_bn: Annotated[str, typer.Option("--dual-bn", help="off, or clean/adversarial: dual BatchNorm as trained with --dual-bn.")] = "off",
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Show a model's parameter count (total and added by the defense) and insertion points."""
    from advdef.models import build_model
    from advdef.registry import DATASETS

    dataset_info = DATASETS.create(data).info
    built = build_model(arch, dataset_info, defense, dual_bn)
    payload = {
        "arch": built.arch_spec,
        "defense": built.defense_spec,
        "data": dataset_info.name,
        "input_shape": list(dataset_info.input_shape),
        "num_classes": dataset_info.num_classes,
        "params_total": built.params_total,
        "params_backbone": built.params_backbone,
        "params_added": built.params_added,
        "dual_bn": dual_bn,
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
    ctx: typer.Context,
    preset: Annotated[Optional[str], typer.Option("--preset", help="Paper training recipe (advdef list presets): options left unset take its values, then the defaults shown.")] = None,
    data: Annotated[Optional[str], typer.Option("--data", help="Dataset spec: digits (embedded, offline), cifar10, svhn, imagefolder:PATH, ... (default digits; with --preset cifar10)")] = None,
    arch: Annotated[Optional[str], typer.Option("--arch", help="Architecture spec. (default smallcnn)")] = None,
    defense: Annotated[Optional[str], typer.Option("--defense", help="Defense spec. (default none)")] = None,
    at: Annotated[Optional[str], typer.Option("--at", help="Training method: standard, pgd_at, or a spec like pgd_at:steps=7. (default pgd_at)")] = None,
    epochs: Annotated[Optional[int], typer.Option("--epochs", help="(default 10)")] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", help="(default 128)")] = None,
    optimizer: Annotated[Optional[str], typer.Option("--optimizer", help="sgd or adam. (default sgd)")] = None,
    lr: Annotated[Optional[float], typer.Option("--lr", help="Initial learning rate. (default 0.1)")] = None,
    momentum: Annotated[Optional[float], typer.Option("--momentum", help="SGD momentum. (default 0.9)")] = None,
    nesterov: Annotated[Optional[bool], typer.Option("--nesterov/--no-nesterov", help="Nesterov momentum (SGD). (default off)")] = None,
    weight_decay: Annotated[Optional[float], typer.Option("--weight-decay", help="(default 5e-4)")] = None,
    milestones: Annotated[Optional[str], typer.Option("--milestones", help="LR steps: epochs (75,90: decay after epoch 75 and 90), fractions of the run (0.5,0.75) or none. (default 0.5,0.75)")] = None,
    lr_decay: Annotated[Optional[float], typer.Option("--lr-decay", help="LR factor at each milestone. (default 0.1)")] = None,
    seed: Annotated[Optional[int], typer.Option("--seed", help="(default 0)")] = None,
    limit_train: Annotated[Optional[int], typer.Option("--limit-train", help="Use N training samples (class-balanced).")] = None,
    val_fraction: Annotated[Optional[float], typer.Option("--val-fraction", help="Share of train held out for checkpoint selection. (default 0.1)")] = None,
    select: Annotated[Optional[str], typer.Option("--select", help="auto, val_robust, val_clean or last. (default auto)")] = None,
    dual_bn: Annotated[Optional[str], typer.Option("--dual-bn", help="Separate BatchNorms for clean and adversarial inputs (AdvProp / Mixture BN), naming the set used at inference: clean, adversarial or off. (default clean for --at advprop, else off)")] = None,
    resume: Annotated[Optional[str], typer.Option("--resume", help="Continue run RUN_ID from its last checkpoint.")] = None,
    data_dir: DataDirOption = None,
    download: DownloadOption = False,
    device: DeviceOption = "auto",
    channels_last: Annotated[bool, typer.Option("--channels-last/--no-channels-last")] = True,
    amp: Annotated[bool, typer.Option("--amp/--no-amp", help="Mixed precision on CUDA (no effect on CPU).")] = True,
    compile: Annotated[bool, typer.Option("--compile", help="torch.compile the model's forward (same weights and checkpoint keys; falls back to eager with a warning if compiling fails).")] = False,
    nproc: Annotated[Optional[int], typer.Option("--nproc", help="Data-parallel training with N processes on this machine (re-runs this command under torchrun: one GPU each on CUDA, gloo on CPU). Under torchrun, leave it out.")] = None,
    sync_bn: Annotated[Optional[bool], typer.Option("--sync-bn/--no-sync-bn", help="Data-parallel runs: BatchNorm statistics over the global batch (the single-process model). (default off)")] = None,
    store_path: StoreOption = None,
    runs_dir: RunsDirOption = None,
) -> None:
    """Train a model (any defense x AT method x architecture); checkpoints every epoch, resumable."""
    if resume is not None and preset is not None:
        raise UserError("--resume continues a run with its stored config; drop --preset")
    options = dict(
        data=data, arch=arch, defense=defense, at=at, epochs=epochs, batch_size=batch_size, optimizer=optimizer,
        lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay, lr_decay=lr_decay, seed=seed,
        limit_train=limit_train, val_fraction=val_fraction, select=select, dual_bn=dual_bn, data_dir=data_dir,
        download=download,
        device=device, channels_last=channels_last, amp=amp, compile=compile, sync_bn=sync_bn,
    )
    if nproc is not None:
        from advdef.launch import check_nproc, relaunch

        check_nproc(nproc)
        if resume is None:  # mistakes in the options end here, before N processes start
            config = _train_config(preset, milestones, options)
            if config.batch_size < nproc:
                raise UserError(f"--batch-size {config.batch_size} is smaller than --nproc {nproc}; "
                                "each process needs at least one example per batch")
        raise typer.Exit(relaunch(ctx, nproc, ["train"]))
    from advdef.training.distributed import distributed_session

    with distributed_session() as dist:  # torchrun's process group, or a single process
        try:
            _train_ranks(dist, resume, preset, milestones, options, store_path, runs_dir)
        except UserError:
            if dist.is_main:
                raise
            raise typer.Exit(code=2) from None  # rank 0 prints the error once


def _train_ranks(dist: Any, resume: Optional[str], preset: Optional[str], milestones: Optional[str],
                 options: dict[str, Any], store_path: Optional[str], runs_dir: Optional[Path]) -> None:
    """`train` on this process: rank 0 (or the only process) uses the store and reports; the other
    torchrun ranks train silently without opening the store."""
    from contextlib import nullcontext

    from advdef.pipeline import runs_dir_for
    from advdef.progress import SilentReporter
    from advdef.training.trainer import start_run
    from advdef.training.trainer import train as resume_training

    config = _train_config(preset, milestones, options) if resume is None else None
    store = _open_store(store_path) if dist.is_main else None
    with _reporter() if dist.is_main else nullcontext(SilentReporter()) as reporter:
        if resume is not None:
            resume_training(resume, store, reporter)
            run_id = resume
        else:
            if config.preset is not None:
                reporter.message(_recipe_line(config))
            run_id = start_run(config, store, runs_dir_for(store, runs_dir) if store is not None else None, reporter)
    if store is not None:
        run = store.get_run(run_id)
        typer.echo(f"run {run_id}: {run['epochs_done']} epochs, best epoch {run['best_epoch']}, store {store.path}")


def _train_config(preset: Optional[str], milestones: Optional[str], options: dict[str, Any]) -> TrainConfig:
    """The validated TrainConfig: only the options the user gave override the preset, then the defaults."""
    from advdef.training.config import parse_milestones
    from advdef.training.presets import resolve_train_config

    explicit = {k: v for k, v in options.items() if v is not None}
    if milestones is not None:
        explicit["milestones"], explicit["milestone_unit"] = parse_milestones(milestones)
    return resolve_train_config(preset, explicit).validate()


def _recipe_line(config: TrainConfig) -> str:
    """What the preset resolved to, so the user sees the recipe before hours of training."""
    steps = ", ".join(str(m) for m in config.milestone_epochs()) or "never"
    return (
        f"preset {config.preset} on {config.data}: {config.arch} / {config.defense} / {config.at}; "
        f"{config.epochs} epochs, batch {config.batch_size}, {config.optimizer} lr {config.lr:g} "
        f"(x{config.lr_decay:g} after epochs {steps}), momentum {config.momentum:g}, weight decay {config.weight_decay:g}, "
        f"select {config.select}"
    )


preset_app = typer.Typer(
    help="Training presets for `advdef train --preset NAME` (list them with `advdef list presets`).",
    no_args_is_help=True,
)
app.add_typer(preset_app, name="preset")


@preset_app.command("show")
@handles_user_errors
def preset_show(
    name: Annotated[str, typer.Argument(help="Preset name, e.g. fsr-paper.")],
    data: Annotated[Optional[str], typer.Option("--data", help="Only this dataset's recipe.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Show every value a training preset sets, per dataset, with where each comes from."""
    from advdef.training.presets import describe

    described = describe(name, data)
    if as_json:
        typer.echo(json.dumps(described, indent=2))
        return
    for line in _preset_lines(described):
        stdout.print(line, highlight=False, markup=False)


def _preset_lines(described: dict[str, Any]) -> list[str]:
    from advdef.specs import format_value

    def pairs(values: dict[str, Any]) -> str:
        return ", ".join(f"{k}={format_value(v)}" for k, v in values.items())

    lines = [f"{described['name']}: {described['summary']}", f"  {described['citation']}"]
    for dataset, recipe in described["recipes"].items():
        default = " (the default --data)" if dataset == described["default_data"] else ""
        lines.append(f"{dataset}{default}")
        lines += [f"  {key:<15} {format_value(value)}" for key, value in recipe["settings"].items()]
        lines.append(f"  training attack any other --at inherits: {pairs(recipe['training_attack'])}")
        lines += [f"  with --arch {arch}: {pairs(extra)}" for arch, extra in recipe["by_arch"].items()]
        lines += [f"  with --at {method}: {pairs(extra)}" for method, extra in recipe["by_method"].items()]
        lines += [f"  source: {what} — {where}" for what, where in recipe["sources"]]
        lines += [f"  note: {note}" for note in recipe["notes"]]
    lines += [f"note: {note}" for note in described["notes"]]
    return lines


def _eval_config(attacks: str, n: Optional[int], eps: str, seed: int, batch_size: int | str, limit_test: Optional[int],
                 data_dir: Optional[str], download: bool, device: str, epoch: Optional[int], **options: Any):
    from advdef.evaluation.engine import EvalConfig
    from advdef.specs import split_specs

    specs = split_specs(attacks)
    if not specs:
        raise UserError("--attacks is empty; e.g. --attacks fgsm,pgd20,cw,aa or --suite full")
    if batch_size != "auto" and batch_size < 1:
        raise UserError("--batch-size must be at least 1")
    if limit_test is not None and limit_test < 1:
        raise UserError("--limit-test must be at least 1")
    config = EvalConfig(attacks=specs, eps=_eps(eps), n=n, seed=seed, batch_size=batch_size, limit_test=limit_test,
                        data_dir=data_dir, download=download, device=device, epoch=epoch, **options)
    config.canonical_attacks()
    return config


SUITE_HELP = (
    "Attack suite: standard (fgsm, cw, pgd20, aa), adaptive (the defense's own adaptive attacks), blackbox "
    "(square, noise), transfer (from an undefended run in the store), paper (the defense paper's attacks), "
    "full (standard + adaptive + blackbox + transfer)."
)
DEFAULT_SUITE_N = 100  # `evaluate` with neither --attacks nor --n: the full suite on a small sample


NOption = Annotated[Optional[int], typer.Option("--n", help="Evaluate N test samples (seeded, class-balanced); default all.")]
EpsOption = Annotated[str, typer.Option("--eps", help="L-inf budget as a fraction of [0,1], e.g. 8/255.")]
SeedOption = Annotated[int, typer.Option("--seed", help="Seed of the sample choice and the attacks.")]
BatchOption = Annotated[int, typer.Option("--batch-size")]
LimitTestOption = Annotated[Optional[int], typer.Option("--limit-test", help="Load only N test samples.")]
EpochOption = Annotated[Optional[int], typer.Option("--epoch", help="Evaluate this epoch instead of the selected one.")]


@app.command()
@handles_user_errors
def evaluate(
    ctx: typer.Context,
    attacks: Annotated[Optional[str], typer.Option("--attacks", help="Comma-separated attack specs or suite names, e.g. fgsm,pgd20,cw,aa or pgd20,adaptive. (default: --suite full on --n 100)")] = None,
    suite: Annotated[Optional[str], typer.Option("--suite", help=SUITE_HELP)] = None,
    run: Annotated[Optional[list[str]], typer.Option("--run", help="Run id (repeatable); default: every run lacking these attacks.")] = None,
    n: NOption = None,
    eps: EpsOption = "8/255",
    seed: SeedOption = 0,
    batch_size: Annotated[str, typer.Option("--batch-size", help="Samples per batch, or auto: the largest of 256, 128, ... whose forward+backward fits in GPU memory (256 on CPU). Fixed for the whole evaluation: it sets the batches' random starts, so it is recorded in the protocol.")] = "256",
    limit_test: LimitTestOption = None,
    epoch: EpochOption = None,
    data_dir: DataDirOption = None,
    download: DownloadOption = False,
    device: DeviceOption = "auto",
    amp: Annotated[str, typer.Option("--amp", help="Attack in mixed precision: off, bf16 or fp16 (for CUDA). The attacks are rerun in fp32 on --amp-check-n samples; if low precision looks more robust than the fp32 interval allows, the evaluation is marked unreliable and refused.")] = "off",
    amp_check_n: Annotated[int, typer.Option("--amp-check-n", help="Samples of the fp32 cross-check of --amp.")] = 200,
    compile: Annotated[bool, typer.Option("--compile", help="torch.compile the model's forward (falls back to eager with a warning if compiling fails).")] = False,
    eot: Annotated[Optional[int], typer.Option("--eot", help="Gradient samples per step for attacks that take eot (default 20 for a stochastic defense, else 1).")] = None,
    checks: Annotated[bool, typer.Option("--checks/--no-checks", help="Run the gradient-masking sanity checks after the attacks.")] = True,
    n_check: Annotated[int, typer.Option("--n-check", help="Samples the sanity checks attack.")] = 100,
    shard: Annotated[Optional[str], typer.Option("--shard", help="Run shard K of N (e.g. 2/4) of each evaluation: N processes on N GPUs or machines, sharing one --store, together give the unsharded outcomes. Under torchrun each rank takes its shard.")] = None,
    shard_wait: Annotated[Optional[float], typer.Option("--shard-wait", help="Seconds a shard waits for the others between attacks before giving up (default: no limit).")] = None,
    nproc: Annotated[Optional[int], typer.Option("--nproc", help="Shard over N processes on this machine (re-runs this command under torchrun: one GPU each on CUDA). Under torchrun, leave it out.")] = None,
    store_path: StoreOption = None,
) -> None:
    """Measure robust accuracy per attack and the per-sample worst case, then run sanity checks; resumable."""
    from advdef import pipeline
    from advdef.report import comparison_tables, print_rich

    from advdef.evaluation.batching import check_batch_size
    from advdef.evaluation.precision import check_amp
    from advdef.evaluation.sharding import ALL, from_environment, parse_shard
    from advdef.evaluation.suites import SUITES

    if suite is not None and suite not in SUITES:
        raise UserError(f"unknown suite '{suite}'; valid: {', '.join(SUITES)}")
    if attacks is None and suite is None:
        suite, n = "full", DEFAULT_SUITE_N if n is None else n
    combined = ",".join(part for part in (attacks, suite) if part)
    config = _eval_config(combined, n, eps, seed, check_batch_size(batch_size), limit_test, data_dir, download, device,
                          epoch, eot=eot, checks=checks, n_check=n_check, amp=check_amp(amp, amp_check_n),
                          amp_check_n=amp_check_n, compile=compile,
                          shard=parse_shard(shard) if shard is not None else (from_environment() or ALL),
                          shard_wait=shard_wait)
    if shard_wait is not None and shard_wait < 0:
        raise UserError("--shard-wait must be at least 0 seconds")
    if nproc is not None:  # the options were checked above, before N processes start
        from advdef.launch import check_nproc, relaunch

        check_nproc(nproc)
        if shard is not None:
            raise UserError("--nproc gives each process its shard; drop --shard")
        raise typer.Exit(relaunch(ctx, nproc, ["evaluate"]))
    store = _open_store(store_path)
    with _reporter() as reporter:
        eval_ids = pipeline.evaluate(store, config, run, reporter)
    if not eval_ids:
        _stderr().print("nothing to evaluate: every trained run already has these attacks (or no run is trained)")
        return
    if not config.shard.leader:  # shard 1 prints the tables once the evaluation is complete
        _stderr().print(f"shard {config.shard} done: evaluation(s) {', '.join(map(str, eval_ids))}; "
                        "`advdef report` shows them once every shard has finished")
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


REPORT_FORMATS = ("markdown", "csv", "latex", "json", "html")
PLOT_FORMATS = ("png", "svg")


@app.command()
@handles_user_errors
def report(
    markdown: Annotated[bool, typer.Option("--markdown", help="Markdown tables with protocol cards.")] = False,
    csv: Annotated[bool, typer.Option("--csv", help="CSV: fractions, Wilson bounds, counts, deltas, p-values, costs.")] = False,
    latex: Annotated[bool, typer.Option("--latex", help="LaTeX (booktabs) tables.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="JSON with RobustBench-style fields per row.")] = False,
    as_html: Annotated[bool, typer.Option("--html", help="One self-contained HTML page with tables and plots.")] = False,
    published: Annotated[bool, typer.Option("--published", help="Add the seed papers' own numbers for the same settings.")] = False,
    where: Annotated[Optional[list[str]], typer.Option("--where", help="Filter, e.g. defense=fsr,at=trades (values: a|b).")] = None,
    group_by: Annotated[Optional[str], typer.Option("--group-by", help="Split tables by dataset, arch, defense, at or eps (comma list).")] = None,
    sort: Annotated[Optional[str], typer.Option("--sort", help="Sort rows by a column, e.g. adaptive_worst (+col ascending).")] = None,
    compact: Annotated[bool, typer.Option("--compact", help="Only clean and worst-case columns (narrow terminals).")] = False,
    run: Annotated[Optional[list[str]], typer.Option("--run", help="Only these run ids (repeatable).")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="Write to this file instead of stdout.")] = None,
    plots: Annotated[Optional[Path], typer.Option("--plots", help="Also write the plots (accuracy vs eps, per class) to this folder.")] = None,
    plot_format: Annotated[str, typer.Option("--plot-format", help="png or svg.")] = "png",
    store_path: StoreOption = None,
) -> None:
    """Comparison tables of the evaluations in the store, one table per protocol."""
    from advdef.report import comparison_tables, print_rich, refused_evaluations, to_csv, to_json, to_latex, to_markdown
    from advdef.report.filters import parse_group_by, parse_where

    chosen = [name for name, flag in zip(REPORT_FORMATS, (markdown, csv, latex, as_json, as_html)) if flag]
    if len(chosen) > 1:
        raise UserError(f"choose one output format, got {', '.join('--' + c for c in chosen)}")
    if plot_format not in PLOT_FORMATS:
        raise UserError(f"--plot-format must be one of {', '.join(PLOT_FORMATS)}, got '{plot_format}'")
    conditions, groups = parse_where(where), parse_group_by(group_by)
    store = _open_store(store_path)
    for run_id in run or []:
        store.get_run(run_id)
    tables = comparison_tables(store, run, where=conditions, group_by=groups, sort=sort, published=published)
    refused = refused_evaluations(store, run)
    for line in refused:
        _stderr().print(f"refused: {line}", highlight=False)
    if not tables:
        _stderr().print("no evaluations match; run advdef evaluate first" if not (where or run or refused)
                        else "no complete evaluations match" if refused else "no evaluations match the filters")
        raise typer.Exit(1 if refused else 0)
    if plots is not None:
        from advdef.report.html import report_plots

        for path, _ in report_plots(store, tables, plots, f".{plot_format}"):
            _stderr().print(f"wrote {path}", highlight=False)
    if chosen:
        if as_html:
            from advdef.report.html import to_html

            text = to_html(store, tables, compact=compact)
        else:
            text = {"markdown": lambda: to_markdown(tables, compact), "csv": lambda: to_csv(tables),
                    "latex": lambda: to_latex(tables), "json": lambda: to_json(tables)}[chosen[0]]()
        if out is not None:
            out.write_text(text)
        else:
            sys.stdout.write(text)
    else:
        console = Console(file=out.open("w"), width=240) if out is not None else stdout
        print_rich(tables, console, compact=compact)
    if refused:  # the tables shown are complete, but some evaluations were held back
        raise typer.Exit(1)


@app.command("export")
@handles_user_errors
def export(
    table: Annotated[str, typer.Argument(help="runs, checkpoints, evaluations, eval_attacks, outcomes, checks or eval_shards.")],
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
    preset: Annotated[str, typer.Option("--preset", help="Pipeline preset: quick. (Training recipes are `advdef train --preset`.)")] = "quick",
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


from advdef.analysis.cli import analyze_app  # noqa: E402  (needs the option helpers above)

app.add_typer(analyze_app, name="analyze")
from advdef.importing.cli import import_command  # noqa: E402  (needs the option helpers above)

app.command("import")(import_command)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
