"""Rows of a comparison table: one per training recipe, its seeds pooled.

A row holds, per metric, one Proportion per seed (run): a single run shows its 95% Wilson
interval, several show mean ± sd. Every figure is derived from the stored per-sample outcomes
(advdef.evaluation.summary): the worst cases are per-sample minima, never averages.

A defended row is compared with the undefended row (defense `none`) of the same AT method,
architecture, data and protocol: deltas of the means, and an exact McNemar test on the paired
per-sample outcomes (same sample, same training seed), which is what makes a 2-point gain on
1,000 images significant or not.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from advdef.evaluation.stats import Proportion, mcnemar_exact, mean_sd
from advdef.evaluation.summary import EvalSummary

CLEAN = "clean"
STANDARD_WORST = "standard_worst"
ADAPTIVE_WORST = "adaptive_worst"
# The per-sample sets a row carries for the paired tests, and the metric the report ranks on.
PAIRED_METRICS = (CLEAN, STANDARD_WORST, ADAPTIVE_WORST)
HEADLINE = ADAPTIVE_WORST
# Run configuration fields that do not change what was trained (pooled across, or irrelevant).
# `compile` changes how fast, not what, a run trains (and runs stored before it lack the key).
NOT_RECIPE = {"seed", "device", "data_dir", "download", "preset", "compile"}


@dataclass(frozen=True)
class Measure:
    """One metric of a row: a proportion per seed."""

    proportions: tuple[Proportion, ...]

    @property
    def value(self) -> float:
        return mean_sd([p.value for p in self.proportions])[0]

    @property
    def sd(self) -> float | None:
        return mean_sd([p.value for p in self.proportions])[1]

    @property
    def interval(self) -> tuple[float, float] | None:
        """The 95% Wilson interval of a single run (several seeds report sd instead)."""
        return self.proportions[0].interval if len(self.proportions) == 1 else None

    @property
    def seeds(self) -> int:
        return len(self.proportions)


@dataclass(frozen=True)
class PairedTest:
    """Exact McNemar test of a row against its baseline on the shared samples.

    b = samples robust for the defense but not the baseline, c = the reverse, pairs = shared
    (sample, seed) pairs.
    """

    b: int
    c: int
    pairs: int

    @property
    def p(self) -> float:
        return mcnemar_exact(self.b, self.c)


@dataclass
class Comparison:
    baseline_runs: list[str]
    deltas: dict[str, float]  # metric -> difference of the means, as a fraction
    tests: dict[str, PairedTest]  # metric -> paired test (PAIRED_METRICS)


@dataclass
class ReportRow:
    """A recipe of advdef's (kind "advdef") or a paper's own numbers (kind "published")."""

    kind: str
    dataset: str
    arch: str
    defense: str
    at: str
    runs: list[str] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)
    metrics: dict[str, Measure] = field(default_factory=dict)
    published: dict[str, float] = field(default_factory=dict)  # metric -> fraction (kind "published")
    comparison: Comparison | None = None
    costs: dict[str, float | None] = field(default_factory=dict)
    reliable: bool | None = None
    failed_checks: list[str] = field(default_factory=list)
    complete: bool = True
    source: str = ""  # published: the paper and table; advdef: ""
    protocol_note: str = ""  # published: the paper's protocol
    checkpoint: str = ""
    summaries: list[EvalSummary] = field(default_factory=list, repr=False)
    recipe: tuple = ()

    @property
    def label(self) -> str:
        """What the row's first column shows: its run ids, or the paper it quotes."""
        if self.kind == "published":
            return f"paper: {self.source}" + (f" ({self.checkpoint})" if self.checkpoint else "")
        return ", ".join(self.runs)

    @property
    def short_label(self) -> str:
        """The label for narrow outputs: one run id, or the first and the count of seeds."""
        if self.kind == "published" or len(self.runs) == 1:
            return self.label
        return f"{self.runs[0]} +{len(self.runs) - 1} (seeds {', '.join(map(str, self.seeds))})"

    def value(self, metric: str) -> float | None:
        """The row's figure for a metric as a fraction (mean over seeds), or None."""
        if self.kind == "published":
            return self.published.get(metric)
        measure = self.metrics.get(metric)
        return None if measure is None else measure.value

    def sort_value(self, column: str) -> Any:
        if column in ("dataset", "arch", "defense", "at"):
            return getattr(self, column)
        if column in ("run", "seed"):
            return self.label if column == "run" else min(self.seeds, default=0)
        if column.startswith("delta_"):
            if self.comparison is None:
                return None
            return self.comparison.deltas.get(column[len("delta_"):])
        if column in self.costs:
            return self.costs[column]
        return self.value(column)


def recipe_key(run: dict) -> tuple:
    """Everything the run was trained with except its seed (and where it ran)."""
    config = run["config"]
    return tuple(sorted((k, repr(v)) for k, v in config.items() if k not in NOT_RECIPE))


def _measures(summaries: list[EvalSummary], metrics: list[str]) -> dict[str, Measure]:
    measures: dict[str, Measure] = {}
    for metric in metrics:
        cells = [metric_of(summary, metric) for summary in summaries]
        if all(cell is not None for cell in cells):
            measures[metric] = Measure(tuple(cells))  # type: ignore[arg-type]
    return measures


def metric_of(summary: EvalSummary, metric: str) -> Proportion | None:
    if metric == CLEAN:
        return summary.clean
    if metric == STANDARD_WORST:
        return summary.worst_whitebox
    if metric == ADAPTIVE_WORST:
        return summary.worst
    for attack in summary.attacks:
        if attack.label == metric:
            return attack.robust
    return None


def _failed(check: dict) -> str:
    """`name (figure > threshold): reason` for a failed sanity check."""
    detail = check["detail"] if isinstance(check["detail"], dict) else {}
    measured = ""
    if check["figure"] is not None:
        limit = f" > {check['threshold']:.3g}" if check["threshold"] is not None else ""
        measured = f" ({check['figure']:.3g}{limit})"
    reason = detail.get("reason", "")
    return f"{check['name']}{measured}" + (f": {reason}" if reason else "")


def _costs(summaries: list[EvalSummary]) -> dict[str, float | None]:
    """Means over seeds: evaluation wall time, passes per evaluated sample, training wall time."""
    def mean(values: list[float]) -> float | None:
        return sum(values) / len(values) if values else None

    return {
        "eval_seconds": mean([s.seconds for s in summaries]),
        "forwards_per_sample": mean([getattr(s, "forwards", 0) / s.clean.n for s in summaries if s.clean.n]),
        "backwards_per_sample": mean([getattr(s, "backwards", 0) / s.clean.n for s in summaries if s.clean.n]),
        "train_seconds": mean([float(s.run.get("train_seconds") or 0.0) for s in summaries]),
    }


def advdef_row(summaries: list[EvalSummary], metrics: list[str]) -> ReportRow:
    """One row from the evaluations of the seeds of one recipe (same protocol)."""
    run = summaries[0].run
    failed = sorted({f"{s.run['run_id']}: {_failed(c)}" if len(summaries) > 1 else _failed(c)
                     for s in summaries for c in s.failed_checks})
    verdicts = [s.reliable for s in summaries]
    reliable = False if False in verdicts else (True if verdicts and all(v is True for v in verdicts) else None)
    return ReportRow(
        kind="advdef",
        dataset=run["dataset"],
        arch=run["arch"],
        defense=run["defense"],
        at=run["at_method"],
        runs=[s.run["run_id"] for s in summaries],
        seeds=[int(s.run["seed"]) for s in summaries],
        metrics=_measures(summaries, metrics),
        costs=_costs(summaries),
        reliable=reliable,
        failed_checks=failed,
        complete=all(s.complete for s in summaries),
        checkpoint=str(summaries[0].protocol.get("checkpoint_rule", "")),
        summaries=summaries,
        recipe=recipe_key(run),
    )


def _robust_sets(summary: EvalSummary) -> dict[str, frozenset[int]]:
    return summary.robust_ids


def compare(row: ReportRow, baseline: ReportRow) -> Comparison:
    """Deltas of the means and paired McNemar tests on (sample, seed) pairs both rows measured."""
    deltas = {}
    for metric, measure in row.metrics.items():
        base = baseline.metrics.get(metric)
        if base is not None:
            deltas[metric] = measure.value - base.value
    baseline_by_seed = {s.run["seed"]: s for s in baseline.summaries}
    fallback = baseline.summaries[0] if len(baseline.summaries) == 1 else None
    tests: dict[str, PairedTest] = {}
    for metric in PAIRED_METRICS:
        b = c = pairs = 0
        usable = False
        for summary in row.summaries:
            partner = baseline_by_seed.get(summary.run["seed"], fallback)
            if partner is None:
                continue
            mine, theirs = _robust_sets(summary).get(metric), _robust_sets(partner).get(metric)
            if mine is None or theirs is None:
                continue
            shared = set(summary.sample_ids) & set(partner.sample_ids)
            usable = True
            pairs += len(shared)
            b += len((mine - theirs) & shared)
            c += len((theirs - mine) & shared)
        if usable:
            tests[metric] = PairedTest(b, c, pairs)
    return Comparison([s.run["run_id"] for s in baseline.summaries], deltas, tests)
