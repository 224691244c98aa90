"""`advdef analyze ...`: analyses of a stored run beyond accuracy.

Mounted by `advdef.cli` with `app.add_typer(analyze_app, name="analyze")`. `analyze_app` is
created before this module imports the shared option types from `advdef.cli`, so either module
may be imported first. Heavy modules (torch, matplotlib) load inside the command.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

analyze_app = typer.Typer(
    help="Analyses of a trained run beyond accuracy (e.g. the CAS paper's channel activations).",
    no_args_is_help=True,
)

from advdef.cli import DeviceOption, StoreOption, _eps, _open_store, handles_user_errors  # noqa: E402


@analyze_app.callback()
def analyze() -> None:
    """Analyses of a trained run beyond accuracy (e.g. the CAS paper's channel activations)."""
    # A callback keeps `analyze` a command group even with one command, so `channels` is always
    # named, whether the app runs mounted under `advdef` or on its own.


@analyze_app.command("channels")
@handles_user_errors
def channels(
    run: Annotated[str, typer.Option("--run", help="Run id to analyse.")],
    layer: Annotated[str, typer.Option("--layer", help="Insertion point, e.g. layer4 (resnet18) or block2 (smallcnn); `advdef info` lists them.")],
    n: Annotated[int, typer.Option("--n", help="Test samples (seeded, class-balanced, as the evaluation picks them).")] = 500,
    attack: Annotated[str, typer.Option("--attack", help="Attack crafting the adversarial inputs, e.g. pgd20.")] = "pgd20",
    eps: Annotated[str, typer.Option("--eps", help="L-inf budget as a fraction of [0,1], e.g. 8/255.")] = "8/255",
    out: Annotated[Path, typer.Option("--out", help="Figure file (.png or .svg).")] = Path("channels.png"),
    csv: Annotated[Optional[Path], typer.Option("--csv", help="Also write the per-channel statistics as CSV.")] = None,
    tau: Annotated[float, typer.Option("--tau", help="A channel is activated above tau x the image's strongest channel (paper: 0.01).")] = 0.01,
    magnitude: Annotated[str, typer.Option("--magnitude", help="mean (over all samples), activated (over activating samples) or paper (the CAS code's running average).")] = "mean",
    capture: Annotated[str, typer.Option("--capture", help="input: features before the defense modules at the tap (the paper's choice); output: after them.")] = "input",
    class_id: Annotated[Optional[int], typer.Option("--class", help="Only samples of this class (the paper: class 0).")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the sample choice and the attack.")] = 0,
    batch_size: Annotated[int, typer.Option("--batch-size")] = 128,
    epoch: Annotated[Optional[int], typer.Option("--epoch", help="Analyse this epoch instead of the selected one.")] = None,
    device: DeviceOption = "auto",
    store_path: StoreOption = None,
) -> None:
    """Channel-wise activation magnitude and frequency, natural vs adversarial (CAS paper, Figs. 1-2)."""
    from advdef.analysis.channels import analyze_run_channels
    from advdef.report.plots import figure_path, plot_channels

    figure_path(out)  # a bad suffix fails before any work
    budget = _eps(eps)
    store = _open_store(store_path)
    stats = analyze_run_channels(
        store, run, layer, n=n, attack=attack, eps=budget, seed=seed, device=device, tau=tau, magnitude=magnitude,
        capture=capture, class_id=class_id, batch_size=batch_size, epoch=epoch,
    )
    written = [plot_channels(stats, out)]
    if csv is not None:
        csv.parent.mkdir(parents=True, exist_ok=True)
        stats.to_frame().to_csv(csv, index=False)
        written.append(csv)
    natural, adversarial = stats.mean_magnitude
    typer.echo(
        f"{stats.layer}: {stats.channels} channels, n={stats.n}, mean magnitude natural {natural:.4g} vs "
        f"adversarial {adversarial:.4g} ({stats.attack} at eps {stats.eps}); wrote {', '.join(map(str, written))}"
    )
