"""Comparison tables from the store: one table per protocol, one row per recipe.

A protocol is everything that makes two numbers comparable: dataset, split, sample set, eps,
norm, evaluation seed, checkpoint rule, and the attacks (specs, order and implementation
versions). Rows measured under different protocols are never ranked together: each protocol
gets its own table with its card, and a note says how the tables differ.

Adaptive attacks are derived from each defense's own declarations (`--suite adaptive`), so
they differ per defense by design: they are left out of the protocol key, shown per row in the
notes, and counted in the row's adaptive worst case.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import pandas as pd

from advdef.evaluation.sharding import refusal
from advdef.evaluation.summary import EvalSummary, summarize
from advdef.report.filters import Condition, SortOrder, parse_sort
from advdef.report.rows import (
    ADAPTIVE_WORST, CLEAN, STANDARD_WORST, ReportRow, advdef_row, compare, recipe_key,
)
from advdef.specs import parse_spec
from advdef.store import Store

IDENTITY_COLUMNS = ["run", "dataset", "arch", "defense", "at"]
PROTOCOL_FIELDS = ("dataset", "split", "n", "sample_hash", "eps", "norm", "seed", "checkpoint_rule", "precision")
COST_COLUMNS = ["eval_seconds", "forwards_per_sample", "backwards_per_sample", "train_seconds"]


@dataclass
class ComparisonTable:
    """Rows of one protocol, with its card and notes."""

    protocol: dict
    metrics: list[str]
    rows: list[ReportRow] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    group: dict[str, str] = field(default_factory=dict)  # --group-by values of this table

    @property
    def title(self) -> str:
        p = self.protocol
        grouped = "".join(f", {k} {v}" for k, v in self.group.items())
        return f"{p['dataset']} {p['split']} n={p['n']}, Linf eps={p['eps']}{grouped}"

    @property
    def card(self) -> list[tuple[str, str]]:
        """The protocol card: (field, value) lines every rendering prints with the table."""
        p = self.protocol
        attacks = "; ".join(f"{label} = {spec} [{impl}]" for label, spec, impl in p["attacks"]) or "none"
        return [
            ("dataset", f"{p['dataset']} ({p['split']} split)"),
            ("samples", f"n={p['n']}, class-balanced, seed {p['seed']}, sample-set hash {p['sample_hash']}"),
            ("threat model", f"{p['norm']}, eps = {p['eps']} (inputs in [0, 1])"),
            ("attacks, in order", attacks),
            ("adaptive attacks", "derived per defense from its declarations (--suite adaptive); listed per row"),
            ("checkpoint", p["checkpoint_rule"]),
            ("precision", p.get("precision") or "fp32"),
            ("model view", "eval mode, label-free, final logits (adaptive attacks excepted)"),
        ]

    def numeric_frame(self) -> pd.DataFrame:
        """Fractions, Wilson bounds, counts, sd, deltas, p-values and costs (for CSV/JSON)."""
        records = []
        for row in self.rows:
            record: dict = {"kind": row.kind, "run": row.label if row.kind == "published" else ",".join(row.runs),
                            "dataset": row.dataset, "arch": row.arch, "defense": row.defense, "at": row.at,
                            "seeds": ",".join(map(str, row.seeds))}
            record.update({k: self.protocol[k] for k in ("n", "eps", "norm", "sample_hash", "seed", "checkpoint_rule")})
            for metric in self.metrics:
                record.update(_metric_fields(row, metric))
            comparison = row.comparison
            record["baseline"] = ",".join(comparison.baseline_runs) if comparison else None
            for metric in self.metrics:
                record[f"delta_{metric}"] = comparison.deltas.get(metric) if comparison else None
            for metric in (CLEAN, STANDARD_WORST, ADAPTIVE_WORST):
                test = comparison.tests.get(metric) if comparison else None
                record[f"mcnemar_p_{metric}"] = test.p if test else None
                record[f"mcnemar_b_{metric}"] = test.b if test else None
                record[f"mcnemar_c_{metric}"] = test.c if test else None
            for cost in COST_COLUMNS:
                record[cost] = row.costs.get(cost)
            record["complete"] = row.complete
            record["reliable"] = row.reliable
            record["failed_checks"] = "; ".join(row.failed_checks)
            record["source"] = row.source
            records.append(record)
        return pd.DataFrame.from_records(records)


def _metric_fields(row: ReportRow, metric: str) -> dict:
    keys = (metric, f"{metric}_low", f"{metric}_high", f"{metric}_sd", f"{metric}_k")
    if row.kind == "published":
        return dict(zip(keys, (row.published.get(metric), None, None, None, None)))
    measure = row.metrics.get(metric)
    if measure is None:
        return dict.fromkeys(keys)
    low, high = measure.interval or (None, None)
    k = measure.proportions[0].k if measure.seeds == 1 else None
    return dict(zip(keys, (measure.value, low, high, measure.sd, k)))


# -- building ----------------------------------------------------------------------------

def protocol_attacks(summary: EvalSummary) -> list[tuple[str, str, str]]:
    """(label, spec, implementation) of the attacks that define the protocol, in order."""
    return [(a.label, a.spec, a.implementation) for a in summary.attacks if not is_adaptive(a)]


def is_adaptive(attack) -> bool:
    return attack.suite == "adaptive" or attack.family == "adaptive"


def protocol_of(summary: EvalSummary) -> dict:
    card = {name: summary.protocol.get(name) for name in PROTOCOL_FIELDS}
    card["precision"] = card["precision"] or "fp32"  # evaluations stored before precision was recorded
    card["attacks"] = protocol_attacks(summary)
    return card


def _key(protocol: dict, group: dict) -> str:
    return json.dumps([protocol, group], sort_keys=True, default=str)


def run_fields(summary: EvalSummary) -> dict[str, object]:
    """The fields `--where` and `--group-by` read."""
    run = summary.run
    return {
        "run": run["run_id"], "dataset": run["dataset"], "arch": run["arch"], "defense": run["defense"],
        "at": run["at_method"], "seed": run["seed"], "eps": summary.protocol.get("eps"),
        "n": summary.protocol.get("n"), "checkpoint": summary.protocol.get("checkpoint_rule"),
    }


def comparison_tables(
    store: Store,
    run_ids: list[str] | None = None,
    where: list[Condition] | None = None,
    group_by: list[str] | None = None,
    sort: str | None = None,
    published: bool = False,
) -> list[ComparisonTable]:
    """Every evaluation grouped into protocol tables of per-recipe rows, then filtered.

    Filters (`run_ids`, `where`) choose the rows shown; the undefended baseline of a shown row
    stays in its table even when the filter would drop it, because its deltas and p-values are
    measured against it. `sort` names a column (`--sort`; checked against the tables' columns).
    """
    buckets: dict[str, tuple[dict, dict, list[EvalSummary]]] = {}
    for evaluation in store.evaluations():
        if refusal(store, evaluation) is not None:  # shards missing: `refused_evaluations` says which
            continue
        summary = summarize(store, evaluation["eval_id"])
        fields = run_fields(summary)
        protocol = protocol_of(summary)
        group = {key: str(fields[key]) for key in group_by or []}
        buckets.setdefault(_key(protocol, group), (protocol, group, []))[2].append(summary)
    tables = []
    for protocol, group, summaries in buckets.values():
        table = _table(protocol, group, summaries)
        if _keep_selected(table, run_ids, where or []):
            tables.append(table)
    order = parse_sort(sort, sortable_columns(tables), ascending_by_default=set(COST_COLUMNS))
    for table in tables:
        _row_notes(table)
        if published:
            _add_published(table)
        _order(table, order)
    if len(tables) > 1:
        _note_protocol_differences(tables)
    return tables


def refused_evaluations(store: Store, run_ids: list[str] | None = None) -> list[str]:
    """One line per evaluation (of `run_ids`, or all) left out of the tables for missing shards."""
    lines = []
    for evaluation in store.evaluations():
        if run_ids is None or evaluation["run_id"] in run_ids:
            reason = refusal(store, evaluation)
            if reason is not None:
                lines.append(reason)
    return lines


def _selected(row: ReportRow, run_ids: list[str] | None, where: list[Condition]) -> bool:
    for summary in row.summaries:
        fields = run_fields(summary)
        if (run_ids is None or fields["run"] in run_ids) and all(c.matches(fields[c.key]) for c in where):
            return True
    return False


def _keep_selected(table: ComparisonTable, run_ids: list[str] | None, where: list[Condition]) -> bool:
    """Drop unselected rows except the baselines of selected ones; False if nothing is left."""
    if run_ids is None and not where:
        return bool(table.rows)
    chosen = [row for row in table.rows if _selected(row, run_ids, where)]
    baselines = [b for row in chosen if row.comparison for b in table.rows
                 if b.runs == row.comparison.baseline_runs and b not in chosen]
    for baseline in {id(b): b for b in baselines}.values():
        table.notes.append(f"{', '.join(baseline.runs)}: shown as the baseline of the selected rows")
    keep = {id(row) for row in chosen + baselines}
    table.rows = [row for row in table.rows if id(row) in keep]
    return bool(chosen)


def _table(protocol: dict, group: dict, summaries: list[EvalSummary]) -> ComparisonTable:
    metrics = [CLEAN] + [label for label, _, _ in protocol["attacks"]]
    if any(s.worst_whitebox is not None for s in summaries):
        metrics.append(STANDARD_WORST)
    metrics.append(ADAPTIVE_WORST)
    table = ComparisonTable(protocol, metrics, group=group)
    by_recipe: dict[tuple, list[EvalSummary]] = {}
    for summary in summaries:
        by_recipe.setdefault(recipe_key(summary.run), []).append(summary)
    table.rows = [advdef_row(sorted(group_, key=lambda s: s.run["seed"]), metrics) for group_ in by_recipe.values()]
    for row in table.rows:
        baseline = find_baseline(row, table.rows)
        if baseline is not None:
            row.comparison = compare(row, baseline)
    return table


def _plugin(spec: str) -> str:
    try:
        return parse_spec(spec).name
    except Exception:
        return spec


def find_baseline(row: ReportRow, rows: list[ReportRow]) -> ReportRow | None:
    """The undefended row with the same AT method, arch and data (same protocol: same table).

    Among several, the one whose training recipe differs from the row's in the fewest fields.
    """
    if row.kind != "advdef" or _plugin(row.defense) == "none":
        return None
    candidates = [r for r in rows if r.kind == "advdef" and _plugin(r.defense) == "none"
                  and (r.dataset, r.arch, r.at) == (row.dataset, row.arch, row.at)]
    if not candidates:
        return None
    mine = dict(row.recipe)
    return min(candidates, key=lambda r: sum(1 for k, v in r.recipe if k != "defense" and mine.get(k) != v))


def _row_notes(table: ComparisonTable) -> None:
    for row in table.rows:
        name = ", ".join(row.runs)
        if row.reliable is False:
            table.notes.append(f"{name}: UNRELIABLE — failed sanity checks: " + "; ".join(row.failed_checks))
        for summary in row.summaries:
            run_id = summary.run["run_id"]
            adaptive = [a for a in summary.attacks if is_adaptive(a)]
            if adaptive:
                table.notes.append(f"{run_id}: adaptive attacks: " + ", ".join(
                    f"{a.label} {100 * a.robust.value:.1f}%" for a in adaptive))
            paper = [a.label for a in summary.attacks if a.suite == "paper"]
            if paper:
                table.notes.append(f"{run_id}: the paper's own protocol (--suite paper): " + ", ".join(paper))
            breakers = {a.label: a.broke for a in summary.attacks if a.broke}
            if breakers:
                table.notes.append(f"{run_id}: samples broken first by: "
                                   + ", ".join(f"{label} {count}" for label, count in breakers.items()))
            if not summary.complete:
                table.notes.append(f"{run_id}: evaluation incomplete (resume with advdef evaluate)")
            if summary.stochastic:
                eot = ", ".join(a.label for a in summary.attacks if a.eot > 1) or "none"
                table.notes.append(f"{run_id}: stochastic defense, each accuracy is one random draw; EOT attacks: {eot}")
            warnings = sorted({f"{a.label} warning: {w}" for a in summary.attacks for w in a.warnings})
            for warning in warnings + [f"warning: {w}" for w in summary.warnings]:
                table.notes.append(f"{run_id}: {warning}")
        if row.defense != "none" and _plugin(row.defense) != "none" and row.comparison is None:
            table.notes.append(f"{name}: no undefended run with the same AT method, arch and data under this "
                               "protocol: no deltas")


def _add_published(table: ComparisonTable) -> None:
    """Insert the papers' own numbers for each row's setting right below it."""
    from advdef.report.published import match_published

    placed: set = set()
    rows: list[ReportRow] = []
    sources: dict[str, str] = {}
    for row in table.rows:
        rows.append(row)
        for record in match_published(row.dataset, row.arch, row.defense, row.at):
            key = (record.paper, record.defense, record.dataset, record.arch, record.at, record.checkpoint)
            if key in placed:
                continue
            placed.add(key)
            known = {m: v / 100 for m, v in record.metrics.items() if m in table.metrics}
            extra = {m: v for m, v in record.metrics.items() if m not in table.metrics}
            rows.append(ReportRow(kind="published", dataset=record.dataset, arch=record.arch, defense=record.defense,
                                  at=record.at, published=known, source=record.source, protocol_note=record.protocol,
                                  checkpoint=record.checkpoint))
            sources[record.source] = record.protocol
            differing = [f"{name} {spec}" for name, spec in (("arch", row.arch), ("at", row.at)) if spec != _plugin(spec)]
            if differing:
                table.notes.append(f"paper: {record.source} ({record.checkpoint}) is for the paper's default "
                                   f"{' and '.join(n.split()[0] for n in differing)}; advdef's row used "
                                   + ", ".join(differing))
            if extra:
                table.notes.append(f"paper: {record.source} ({record.checkpoint}), columns advdef did not run: "
                                   + ", ".join(f"{m} {v:.2f}" for m, v in extra.items()))
    table.rows = rows
    for source, protocol in sources.items():
        table.notes.append(f"paper: {source} — the paper's own protocol, not this table's: {protocol}")


def _order(table: ComparisonTable, sort: SortOrder | None) -> None:
    """Sort advdef rows (baseline first by default); published rows stay below their row."""
    blocks: list[list[ReportRow]] = []
    for row in table.rows:
        if row.kind == "published" and blocks:
            blocks[-1].append(row)
        else:
            blocks.append([row])
    if sort is None:
        blocks.sort(key=lambda b: (b[0].dataset, b[0].arch, b[0].at, _plugin(b[0].defense) != "none", b[0].defense))
    else:
        present = [b for b in blocks if b[0].sort_value(sort.column) is not None]
        missing = [b for b in blocks if b[0].sort_value(sort.column) is None]
        present.sort(key=lambda b: b[0].sort_value(sort.column), reverse=sort.descending)
        blocks = present + missing
    table.rows = [row for block in blocks for row in block]


def _note_protocol_differences(tables: list[ComparisonTable]) -> None:
    for index, table in enumerate(tables):
        others = []
        for other_index, other in enumerate(tables):
            if other is table:
                continue
            differing = [k for k in (*PROTOCOL_FIELDS, "attacks") if table.protocol.get(k) != other.protocol.get(k)]
            differing += [f"group {k}" for k in table.group if table.group.get(k) != other.group.get(k)]
            others.append(f"table {other_index + 1} ({', '.join(differing)})")
        table.notes.append(f"table {index + 1} of {len(tables)}; not ranked with " + "; ".join(others)
                           + ": different protocols are not comparable")


def sortable_columns(tables: list[ComparisonTable] | None = None) -> list[str]:
    """Every column `--sort` accepts (metrics of the given tables, identity, deltas, costs)."""
    metrics = {CLEAN, STANDARD_WORST, ADAPTIVE_WORST}
    for table in tables or []:
        metrics.update(table.metrics)
    return sorted(metrics) + [f"delta_{m}" for m in sorted(metrics)] + ["dataset", "arch", "defense", "at", "run",
                                                                          "seed"] + COST_COLUMNS
