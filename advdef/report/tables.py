"""Comparison tables from the store: one row per evaluated run, one table per protocol.

Rows measured under different protocols (dataset, sample set, eps, norm, seed) are never put in
one table, because their numbers are not comparable.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd

from advdef.evaluation.stats import Proportion
from advdef.evaluation.summary import EvalSummary, summarize
from advdef.store import Store

IDENTITY_COLUMNS = ["run", "dataset", "arch", "defense", "at"]
PROTOCOL_FIELDS = ("dataset", "split", "n", "sample_hash", "eps", "norm", "seed")


@dataclass
class ComparisonTable:
    """Rows of one protocol; metric cells are Proportions (k of n)."""

    protocol: dict
    metrics: list[str]
    rows: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def title(self) -> str:
        p = self.protocol
        return (
            f"{p['dataset']} {p['split']} n={p['n']} (samples {p['sample_hash']}), "
            f"Linf eps={p['eps']}, seed {p['seed']}"
        )

    def numeric_frame(self) -> pd.DataFrame:
        """One column per metric fraction plus its Wilson bounds and counts (for CSV/JSON)."""
        records = []
        for row in self.rows:
            record = {k: row[k] for k in IDENTITY_COLUMNS}
            record.update({k: self.protocol[k] for k in ("n", "eps", "norm", "sample_hash", "seed")})
            for metric in self.metrics:
                cell: Proportion | None = row.get(metric)
                if cell is None:
                    record.update({metric: None, f"{metric}_low": None, f"{metric}_high": None, f"{metric}_k": None})
                else:
                    low, high = cell.interval
                    record.update({metric: cell.value, f"{metric}_low": low, f"{metric}_high": high, f"{metric}_k": cell.k})
            record["seconds"] = row["seconds"]
            record["complete"] = row["complete"]
            record["reliable"] = row["reliable"]
            record["failed_checks"] = "; ".join(row["failed_checks"])
            records.append(record)
        return pd.DataFrame.from_records(records)


def _failed(check: dict) -> str:
    """`name (figure > threshold): reason` for a failed sanity check."""
    detail = check["detail"] if isinstance(check["detail"], dict) else {}
    measured = ""
    if check["figure"] is not None:
        limit = f" > {check['threshold']:.3g}" if check["threshold"] is not None else ""
        measured = f" ({check['figure']:.3g}{limit})"
    reason = detail.get("reason", "")
    return f"{check['name']}{measured}" + (f": {reason}" if reason else "")


def _row(summary: EvalSummary) -> dict:
    run = summary.run
    row = {
        "run": run["run_id"],
        "dataset": run["dataset"],
        "arch": run["arch"],
        "defense": run["defense"],
        "at": run["at_method"],
        "clean": summary.clean,
        "worst": summary.worst,
        "worst_whitebox": summary.worst_whitebox,
        "reliable": summary.reliable,
        "failed_checks": [_failed(check) for check in summary.failed_checks],
        "breakers": {a.label: a.broke for a in summary.attacks if a.broke},
        "paper_attacks": [a.label for a in summary.attacks if a.suite == "paper"],
        "seconds": summary.seconds,
        "complete": summary.complete,
        # Each attack's own warnings (AutoAttack's checks), then the evaluation's (stochastic without EOT).
        "warnings": sorted({f"{a.label} warning: {w}" for a in summary.attacks for w in a.warnings})
        + [f"warning: {w}" for w in summary.warnings],
        "stochastic": summary.stochastic,
        "eot_attacks": [a.label for a in summary.attacks if a.eot > 1],
    }
    for attack in summary.attacks:
        row[attack.label] = attack.robust
    return row


def comparison_tables(store: Store, run_ids: list[str] | None = None) -> list[ComparisonTable]:
    """Group every evaluation (optionally of some runs) by protocol into comparison tables."""
    tables: dict[tuple, ComparisonTable] = {}
    for evaluation in store.evaluations():
        if run_ids is not None and evaluation["run_id"] not in run_ids:
            continue
        summary = summarize(store, evaluation["eval_id"])
        key = tuple(summary.protocol[f] for f in PROTOCOL_FIELDS)
        table = tables.setdefault(key, ComparisonTable(summary.protocol, ["clean"]))
        for attack in summary.attacks:
            if attack.label not in table.metrics:
                table.metrics.append(attack.label)
        table.rows.append(_row(summary))
    for table in tables.values():
        whitebox = ["worst_whitebox"] if any(row["worst_whitebox"] is not None for row in table.rows) else []
        table.metrics = [m for m in table.metrics if m != "worst"] + whitebox + ["worst"]
        for row in table.rows:
            if row["reliable"] is False:
                table.notes.append(f"{row['run']}: UNRELIABLE — failed sanity checks: " + "; ".join(row["failed_checks"]))
            if row["paper_attacks"]:
                table.notes.append(f"{row['run']}: the paper's own protocol (--suite paper): " + ", ".join(row["paper_attacks"]))
            if row["breakers"]:
                broken = ", ".join(f"{label} {count}" for label, count in row["breakers"].items())
                table.notes.append(f"{row['run']}: samples broken first by: {broken}")
            if not row["complete"]:
                table.notes.append(f"{row['run']}: evaluation incomplete (resume with advdef evaluate)")
            if row["stochastic"]:
                eot = ", ".join(row["eot_attacks"]) or "none"
                table.notes.append(f"{row['run']}: stochastic defense, each accuracy is one random draw; EOT attacks: {eot}")
            for warning in row["warnings"]:
                table.notes.append(f"{row['run']}: {warning}")
        if len(tables) > 1:
            table.notes.append("other protocols are in separate tables: their numbers are not comparable")
    return list(tables.values())
