"""Figures for the report: robust accuracy vs eps, per-class accuracy, channel statistics.

Every figure is drawn on a `matplotlib.figure.Figure` with the Agg canvas, never through pyplot,
so plotting selects no global backend and leaves no figure open in the caller's session. The
format follows the file's suffix (.png or .svg); each function writes one file and returns its
path. All numbers come from the store through `advdef.evaluation.summary` (or, for the channel
figure, from a `ChannelStats`), so a figure never disagrees with the report's tables.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from advdef.errors import UserError
from advdef.evaluation.engine import CLEAN
from advdef.evaluation.stats import wilson_interval
from advdef.evaluation.summary import EvalSummary, short_label, summarize
from advdef.specs import format_value

if TYPE_CHECKING:
    from advdef.analysis.channels import ChannelStats
    from advdef.store import Store

FORMATS = {".png": "png", ".svg": "svg"}
# The CAS paper's colours (Fig. 2 code: natural royal-blue, adversarial indian-red).
NATURAL_COLOR = "royalblue"
ADVERSARIAL_COLOR = "indianred"


def figure_path(path: str | Path) -> tuple[Path, str]:
    """The path and its format ("png" or "svg"); any other suffix is a UserError naming the valid ones."""
    path = Path(path)
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise UserError(
            f"cannot write a figure to '{path}': unknown suffix '{path.suffix}'; valid: {', '.join(FORMATS)}"
        )
    return path, fmt


def _save(fig: Figure, path: Path, fmt: str) -> Path:
    FigureCanvasAgg(fig)
    path.parent.mkdir(parents=True, exist_ok=True)
    # No creation date in SVGs: the same data gives the same file.
    metadata = {"Date": None} if fmt == "svg" else None
    fig.savefig(path, format=fmt, metadata=metadata, bbox_inches="tight")
    return path


def _run_label(run: dict) -> str:
    return f"{run['run_id']} ({run['defense']}, {run['at_method']})"


def _percent(value: float) -> float:
    return 100.0 * value


# -- robust accuracy vs eps ---------------------------------------------------------------


def _sample_set(evaluation: dict) -> tuple[Any, ...]:
    """Evaluations with equal keys measured the same model (epoch) on the same samples."""
    protocol = evaluation["protocol"]
    return (protocol.get("dataset"), protocol.get("split"), evaluation["sample_hash"], evaluation["seed"],
            protocol.get("epoch"))


def _eps_series(store: Store, run_id: str) -> list[EvalSummary]:
    """The run's summaries along eps on one sample set, sorted by eps (see plot_accuracy_vs_eps)."""
    groups: dict[tuple[Any, ...], dict[Fraction, EvalSummary]] = {}
    for evaluation in store.evaluations(run_id):  # ordered by eval_id
        summary = summarize(store, evaluation["eval_id"])
        if not summary.attacks:  # clean pass only: no robust accuracy to plot
            continue
        by_eps = groups.setdefault(_sample_set(evaluation), {})
        eps = Fraction(evaluation["eps"])
        if eps not in by_eps or len(summary.attacks) > len(by_eps[eps].attacks):
            by_eps[eps] = summary
    if not groups:
        return []
    # Most eps points; then most samples; then the earliest evaluation.
    best = min(
        groups.values(),
        key=lambda g: (-len(g), -max(s.clean.n for s in g.values()), min(s.eval_id for s in g.values())),
    )
    return [best[eps] for eps in sorted(best)]


def accuracy_vs_eps(store: Store, run_ids: Sequence[str]) -> pd.DataFrame:
    """The data of `plot_accuracy_vs_eps`: one row per (run, eps), eps 0 being the clean accuracy.

    Columns: run_id, label, eval_id, eps (fraction text), eps_value, accuracy, low, high (95%
    Wilson bounds; fractions), k, n, complete.
    """
    rows = []
    for run_id in run_ids:
        run = store.get_run(run_id)  # unknown ids: a UserError with suggestions
        series = _eps_series(store, run_id)
        if not series:
            continue
        label = _run_label(run)
        first = min(series, key=lambda s: s.eval_id)
        points = [("0", first.clean, first)] + [(format_value(Fraction(s.protocol["eps"])), s.worst, s) for s in series]
        for eps_text, proportion, summary in points:
            low, high = proportion.interval
            rows.append({
                "run_id": run_id, "label": label, "eval_id": summary.eval_id, "eps": eps_text,
                "eps_value": float(Fraction(eps_text)), "accuracy": proportion.value, "low": low, "high": high,
                "k": proportion.k, "n": proportion.n, "complete": summary.complete,
            })
    return pd.DataFrame(rows, columns=["run_id", "label", "eval_id", "eps", "eps_value", "accuracy", "low", "high",
                                       "k", "n", "complete"])


def plot_accuracy_vs_eps(store: Store, run_ids: Sequence[str], path: str | Path) -> Path:
    """Robust accuracy (%) vs eps, one line per run labelled `run_id (defense, at)`.

    Each point is the per-sample worst case over all of an evaluation's attacks, with its 95%
    Wilson interval as error bars; eps = 0 is the clean accuracy. A run's evaluations are
    grouped by sample set (dataset, split, sample hash, seed — and the checkpoint epoch, so one
    line is one model); when a run has several groups, the one with the most eps points is
    drawn (ties: more samples, then the earliest evaluation). Evaluations holding only the clean
    pass are left out, as are runs without any evaluation; a run whose line includes an
    unfinished evaluation is marked "(incomplete)".
    """
    path, fmt = figure_path(path)
    data = accuracy_vs_eps(store, run_ids)
    if data.empty:
        raise UserError("no evaluations with attacks for these runs; run advdef evaluate first")
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.add_subplot()
    ticks: dict[float, str] = {}
    for run_id, rows in data.groupby("run_id", sort=False):
        rows = rows.sort_values("eps_value")
        value = rows["accuracy"].to_numpy()
        errors = np.vstack([value - rows["low"].to_numpy(), rows["high"].to_numpy() - value])
        label = rows["label"].iloc[0] + ("" if rows["complete"].all() else " (incomplete)")
        ax.errorbar(rows["eps_value"], 100 * value, yerr=100 * errors, marker="o", capsize=3, label=label)
        ticks.update(dict(zip(rows["eps_value"], rows["eps"])))
    positions = sorted(ticks)
    ax.set_xticks(positions)
    ax.set_xticklabels([ticks[p] for p in positions], rotation=45 if len(positions) > 6 else 0)
    ax.set_ylim(-2, 102)
    ax.set_xlabel("ε (L∞, fraction of the [0,1] pixel range)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title("Robust accuracy vs ε (per-sample worst case over attacks; ε = 0: clean)")
    ax.grid(linestyle="--", color="lightgray")
    ax.legend(fontsize="small")
    return _save(fig, path, fmt)


# -- per-class accuracy -------------------------------------------------------------------


def per_class_accuracy(store: Store, eval_id: int) -> pd.DataFrame:
    """Clean and robust accuracy per class of one evaluation (fractions), from its outcomes.

    A sample is robust when its clean pass was correct and no attack row of it is broken (0) or
    NULL — NULL means an earlier attack already broke it (or it was clean-wrong), so it is not
    robust either: the per-sample worst case, per class. Columns: class, n, clean, robust.
    """
    if not any(e["eval_id"] == eval_id for e in store.evaluations()):
        raise UserError(f"unknown evaluation id {eval_id}")
    labels: dict[int, int] = {}
    clean_ok: set[int] = set()
    not_robust: set[int] = set()
    for row in store.outcomes(eval_id):
        sample = row["sample_id"]
        labels[sample] = row["label"]
        if row["attack"] == CLEAN:
            if row["robust"] == 1:
                clean_ok.add(sample)
        elif row["robust"] != 1:
            not_robust.add(sample)
    robust = clean_ok - not_robust
    rows = []
    for cls in sorted(set(labels.values())):
        members = [s for s, label in labels.items() if label == cls]
        n = len(members)
        rows.append({
            "class": cls, "n": n,
            "clean": sum(s in clean_ok for s in members) / n,
            "robust": sum(s in robust for s in members) / n,
        })
    frame = pd.DataFrame(rows, columns=["class", "n", "clean", "robust"])
    return frame.astype({"class": "int64", "n": "int64", "clean": "float64", "robust": "float64"})


def plot_per_class(
    store: Store, eval_id: int, path: str | Path, class_names: Sequence[str] | Mapping[int, str] | None = None
) -> Path:
    """Grouped bars per class: clean vs robust (worst-case) accuracy (%), with 95% Wilson intervals.

    `class_names` (a list indexed by class, or a mapping) labels the x axis; default the indices.
    """
    path, fmt = figure_path(path)
    data = per_class_accuracy(store, eval_id)
    if data.empty:
        raise UserError(f"evaluation {eval_id} has no outcomes yet")
    evaluation = next(e for e in store.evaluations() if e["eval_id"] == eval_id)
    run = store.get_run(evaluation["run_id"])
    names = []
    for cls in data["class"]:
        if isinstance(class_names, Mapping):
            names.append(str(class_names.get(cls, cls)))
        elif class_names is not None and 0 <= cls < len(class_names):
            names.append(str(class_names[cls]))
        else:
            names.append(str(cls))
    x = np.arange(len(data))
    width = 0.4
    fig = Figure(figsize=(max(6.0, 0.6 * len(data) + 2), 4.5), layout="constrained")
    ax = fig.add_subplot()
    for offset, column, color, label in ((-width / 2, "clean", NATURAL_COLOR, "clean"),
                                         (width / 2, "robust", ADVERSARIAL_COLOR, "robust (worst case)")):
        value = data[column].to_numpy()
        bounds = np.array([wilson_interval(round(v * n), n) for v, n in zip(value, data["n"])])
        errors = np.vstack([value - bounds[:, 0], bounds[:, 1] - value])
        ax.bar(x + offset, 100 * value, width, yerr=100 * errors, capsize=2, color=color, label=label)
    crowded = len(names) > 10 or max(map(len, names)) > 6
    ax.set_xticks(x)
    ax.set_xticklabels(names, rotation=45 if crowded else 0, ha="right" if crowded else "center")
    ax.set_ylim(0, 118)  # headroom for the legend above the 100% bars
    ax.set_yticks(range(0, 101, 20))
    ax.set_xlabel("class")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"{_run_label(run)}: evaluation {eval_id}, ε = {evaluation['eps']}, n = {int(data['n'].sum())}")
    ax.grid(axis="y", linestyle="--", color="lightgray")
    ax.set_axisbelow(True)
    ax.legend(fontsize="small", loc="upper center", ncols=2)
    return _save(fig, path, fmt)


# -- channel statistics (CAS paper, Figs. 1 and 2) ------------------------------------------


def _attack_label(spec: str, eps: str) -> str:
    """The short name of an attack spec (`pgd20`), or the spec itself when it cannot be shortened."""
    try:
        return short_label(spec, Fraction(eps))
    except Exception:  # a plugin not installed here, or not a registry spec (a hand-made attack)
        return spec


def plot_channels(stats: ChannelStats, path: str | Path) -> Path:
    """The CAS paper's channel figures for one layer, side by side (digest cas.md §5.2-5.3).

    (a) Activation magnitude (Fig. 1): the natural and the adversarial per-channel magnitudes,
        each sorted descending *independently* — magnitude profiles are compared, not paired
        channels — drawn as overlaid bars, adversarial behind and natural in front (alpha 0.5),
        as the paper's plotting code does.
    (b) Activation frequency (Figs. 2, 4-7, 10): channels ordered by *natural* frequency,
        descending; natural (royal blue) and adversarial (indian red, alpha 0.7, in front) bars
        overlaid at the same channel index.

    Deviations from the paper's figures: frequency is the fraction of the n samples (the paper
    plots the count out of its 1,000 images, y-axis 0-1000; the shapes are identical); the
    magnitude axis is not clipped to [0, 1] as in the paper's code, since magnitudes depend on
    the architecture's scale; panel (a) uses panel (b)'s colours (the paper's Fig. 1 code uses
    orange/blue) so one legend reads for both.
    """
    path, fmt = figure_path(path)
    channels = stats.channels
    index = np.arange(channels)
    width = 1.0 if channels > 64 else 0.8
    fig = Figure(figsize=(12, 4.5), layout="constrained")
    magnitude_ax, frequency_ax = fig.subplots(1, 2)

    natural = np.sort(stats.natural_magnitude)[::-1]
    adversarial = np.sort(stats.adversarial_magnitude)[::-1]
    magnitude_ax.bar(index, adversarial, width, color=ADVERSARIAL_COLOR, linewidth=0, label="adversarial examples")
    magnitude_ax.bar(index, natural, width, color=NATURAL_COLOR, alpha=0.5, linewidth=0, label="natural examples")
    magnitude_ax.set_ylim(bottom=0)
    magnitude_ax.set_xlabel("channel (each series sorted by its own magnitude)")
    rule = {"mean": "mean over samples", "activated": "mean over activating samples",
            "paper": "paper-code running average"}.get(stats.magnitude_rule, stats.magnitude_rule)
    magnitude_ax.set_ylabel(f"magnitude of activation ({rule})")
    magnitude_ax.set_title("(a) activation magnitude")

    order = np.argsort(-stats.natural_frequency, kind="stable")
    frequency_ax.bar(index, stats.natural_frequency[order], width, color=NATURAL_COLOR, linewidth=0,
                     label="natural examples")
    frequency_ax.bar(index, stats.adversarial_frequency[order], width, color=ADVERSARIAL_COLOR, alpha=0.7,
                     linewidth=0, label="adversarial examples")
    frequency_ax.set_ylim(0, 1.05)
    frequency_ax.set_xlabel("channel (sorted by natural frequency)")
    frequency_ax.set_ylabel(f"activation frequency (fraction of n = {stats.n})")
    frequency_ax.set_title(f"(b) activation frequency (activated: > {100 * stats.tau:g}% of the image's max)")

    for ax in (magnitude_ax, frequency_ax):
        ax.set_xlim(-0.5 - (1 - width) / 2, channels - 0.5 + (1 - width) / 2)
        ax.grid(linestyle="--", color="lightgray")
        ax.set_axisbelow(True)
        ax.legend(fontsize="small")
    subject = f"run {stats.run_id}, " if stats.run_id else ""
    cls = f", class {stats.class_id}" if stats.class_id is not None else ""
    fig.suptitle(f"{subject}{stats.layer} ({stats.capture} of the tap, {channels} channels): "
                 f"n = {stats.n}{cls}, {_attack_label(stats.attack, stats.eps)} at ε = {stats.eps}")
    return _save(fig, path, fmt)
