"""Render comparison tables: terminal (rich), Markdown, CSV, LaTeX and JSON.

Every rendering prints a table's protocol card and notes with it: a number without the
protocol it was measured under is not worth pasting. The cell text comes from one place
(`text_rows`), so the formats cannot disagree.
"""

from __future__ import annotations

import io
import json
import math

from advdef.report.rows import ADAPTIVE_WORST, CLEAN, STANDARD_WORST, ReportRow
from advdef.report.tables import ComparisonTable

HEADERS = {CLEAN: "clean", STANDARD_WORST: "standard worst", ADAPTIVE_WORST: "adaptive worst"}
RELIABILITY = {True: "pass", False: "FAIL", None: "—"}
DELTA_METRICS = (CLEAN, STANDARD_WORST, ADAPTIVE_WORST)
SUMMARY_METRICS = (CLEAN, STANDARD_WORST, ADAPTIVE_WORST)

LEGEND = (
    "Robust accuracy in % (95% Wilson interval for one run; mean ± sd over seeds for several). Each attack column "
    "counts samples broken by earlier attacks as broken. standard worst = per-sample minimum over the white-box "
    "attacks on the final logits (what defense papers report); adaptive worst = per-sample minimum over every attack, "
    "adaptive, black-box and transfer included. Δ = percentage points against the undefended run with the same AT "
    "method, arch, data and protocol; p = exact McNemar test on the paired samples (adaptive worst). checks = "
    "gradient-masking sanity checks (FAIL: unreliable). passes = forward/backward passes per evaluated sample. "
    "paper rows quote the papers under their own protocols (see notes): not measured by advdef."
)


def percent(value: float | None, digits: int = 1) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.{digits}f}"


def format_measure(row: ReportRow, metric: str, intervals: bool = True, digits: int = 1) -> str:
    """`48.0 [38.5, 57.7]` for one run, `48.0 ± 1.2` over seeds, `48.45` for a paper's number."""
    if row.kind == "published":
        return percent(row.published.get(metric), 2)
    measure = row.metrics.get(metric)
    if measure is None:
        return "—"
    text = percent(measure.value, 1)
    if measure.sd is not None:
        return f"{text} ± {percent(measure.sd, 1)}"
    if intervals and measure.interval is not None:
        low, high = measure.interval
        text += f" [{percent(low, digits)}, {percent(high, digits)}]"
    return text


def format_delta(row: ReportRow, metric: str) -> str:
    if row.comparison is None or metric not in row.comparison.deltas:
        return ""
    return f"{100 * row.comparison.deltas[metric]:+.1f}"


def format_p(p: float | None) -> str:
    if p is None:
        return ""
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def _cost(row: ReportRow) -> tuple[str, str]:
    if row.kind == "published":
        return "", ""
    seconds = row.costs.get("eval_seconds")
    forwards, backwards = row.costs.get("forwards_per_sample"), row.costs.get("backwards_per_sample")
    passes = f"{forwards:.0f} / {backwards:.0f}" if forwards is not None and backwards is not None else "—"
    time = "—" if seconds is None else f"{seconds:.0f}" + ("" if row.complete else " (incomplete)")
    return time, passes


def table_metrics(table: ComparisonTable, compact: bool) -> list[str]:
    return [m for m in table.metrics if m in SUMMARY_METRICS] if compact else list(table.metrics)


def text_rows(
    table: ComparisonTable, identity: tuple[str, ...] = ("run", "dataset", "arch", "defense", "at"),
    intervals: bool = True, digits: int = 1, compact: bool = False, short: bool = False,
) -> tuple[list[str], list[list[str]]]:
    """Headers and cell text of a table, shared by every text format."""
    metrics = table_metrics(table, compact)
    deltas = [m for m in DELTA_METRICS if m in table.metrics]
    has_comparison = any(row.comparison for row in table.rows)
    headers = list(identity) + [HEADERS.get(m, m) for m in metrics]
    if has_comparison:
        headers += [f"Δ {HEADERS[m]}" for m in deltas] + ["p"]
    headers += ["checks", "eval s", "passes"]
    rows = []
    for row in table.rows:
        label = row.short_label if short else row.label
        cells = [label if column == "run" else str(getattr(row, column)) for column in identity]
        cells += [format_measure(row, m, intervals, digits) for m in metrics]
        if has_comparison:
            cells += [format_delta(row, m) for m in deltas]
            test = row.comparison.tests.get(ADAPTIVE_WORST) if row.comparison else None
            cells.append(format_p(test.p if test else None))
        reliability = "" if row.kind == "published" else RELIABILITY[row.reliable]
        cells += [reliability, *_cost(row)]
        rows.append(cells)
    return headers, rows


def _md(text: str) -> str:
    return text.replace("|", "\\|")


def to_markdown(tables: list[ComparisonTable], compact: bool = False) -> str:
    out = io.StringIO()
    for index, table in enumerate(tables, 1):
        headers, rows = text_rows(table, compact=compact)
        out.write(f"### Table {index}: {table.title}\n\n")
        out.write("**Protocol.**\n\n")
        for name, value in table.card:
            out.write(f"- {name}: {_md(value)}\n")
        out.write("\n| " + " | ".join(headers) + " |\n")
        out.write("|" + "|".join("---" if i < 5 else "---:" for i, _ in enumerate(headers)) + "|\n")
        for cells in rows:
            out.write("| " + " | ".join(_md(c) for c in cells) + " |\n")
        out.write(f"\n{LEGEND}\n\n")
        for note in table.notes:
            out.write(f"- {_md(note)}\n")
        out.write("\n")
    return out.getvalue()


def to_csv(tables: list[ComparisonTable]) -> str:
    import pandas as pd

    frames = []
    for index, table in enumerate(tables, 1):
        frame = table.numeric_frame()
        frame.insert(0, "table", index)
        frames.append(frame)
    if not frames:
        return ""
    return pd.concat(frames, ignore_index=True).to_csv(index=False)


def _robustbench_fields(row: ReportRow, table: ComparisonTable) -> dict:
    """RobustBench model-card fields (percent strings with two decimals) where they apply."""
    def pct(value: float | None) -> str | None:
        return None if value is None else f"{100 * value:.2f}"

    return {
        "name": row.label,
        "dataset": row.dataset,
        "threat_model": table.protocol["norm"],
        "eps": table.protocol["eps"],
        "architecture": row.arch,
        "additional_data": False,
        "number_forward_passes": 1,
        "clean_acc": pct(row.value(CLEAN)),
        # advdef's `aa` column counts samples earlier attacks broke: never above AutoAttack alone.
        "autoattack_acc": pct(row.value("aa")),
        "worst_case_acc": pct(row.value(ADAPTIVE_WORST)),
        "unreliable": row.reliable is False,
        "footnote": "; ".join(row.failed_checks) or None,
    }


def to_json(tables: list[ComparisonTable]) -> str:
    payload = []
    for table in tables:
        frame = json.loads(table.numeric_frame().to_json(orient="records"))
        rows = [{**_robustbench_fields(row, table), "advdef": record} for row, record in zip(table.rows, frame)]
        payload.append({"title": table.title, "protocol": table.protocol, "card": dict(table.card), "rows": rows,
                        "notes": table.notes, "legend": LEGEND})
    return json.dumps(payload, indent=2, default=str)


_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
                  "±": r"$\pm$", "Δ": r"$\Delta$", "—": "--", "<": r"\textless{}", ">": r"\textgreater{}"}


def latex_escape(text: str) -> str:
    return "".join(_LATEX_SPECIAL.get(ch, ch) for ch in text)


def to_latex(tables: list[ComparisonTable], compact: bool = True) -> str:
    """booktabs tables (\\usepackage{booktabs}); intervals in a smaller font under the value."""
    out = io.StringIO()
    out.write("% advdef report: needs \\usepackage{booktabs}\n")
    for index, table in enumerate(tables, 1):
        headers, rows = text_rows(table, identity=("run", "arch", "defense", "at"), compact=compact, short=True)
        align = "l" * 4 + "r" * (len(headers) - 4)
        card = "; ".join(f"{name}: {value}" for name, value in table.card)
        out.write("\\begin{table}[t]\n\\centering\n\\small\n")
        out.write(f"\\caption{{{latex_escape(table.title)}. {latex_escape(card)}}}\n")
        out.write(f"\\label{{tab:advdef-{index}}}\n")
        out.write(f"\\begin{{tabular}}{{{align}}}\n\\toprule\n")
        out.write(" & ".join(latex_escape(h) for h in headers) + " \\\\\n\\midrule\n")
        for cells in rows:
            rendered = []
            for cell in cells:
                value, bracket, rest = cell.partition(" [")
                text = latex_escape(value)
                if bracket:
                    text += f" {{\\scriptsize [{latex_escape(rest)}}}"
                rendered.append(text)
            out.write(" & ".join(rendered) + " \\\\\n")
        out.write("\\bottomrule\n\\end{tabular}\n")
        out.write("\\par\\footnotesize " + latex_escape(LEGEND))
        for note in table.notes:
            out.write("\\\\\n" + latex_escape(note))
        out.write("\n\\end{table}\n\n")
    return out.getvalue()


def print_rich(tables: list[ComparisonTable], console, compact: bool = False) -> None:
    from rich.markup import escape
    from rich.table import Table

    for index, table in enumerate(tables, 1):
        # The dataset is in the title; the terminal table keeps the columns that differ.
        headers, rows = text_rows(table, ("run", "arch", "defense", "at"), digits=0, compact=compact, short=True)
        rich_table = Table(title=escape(f"Table {index}: {table.title}"), caption=escape(LEGEND), caption_justify="left")
        for position, header in enumerate(headers):
            rich_table.add_column(escape(header), overflow="fold" if position < 4 else "ellipsis",
                                  no_wrap=position >= 4, justify="left" if position < 4 else "right")
        for row, cells in zip(table.rows, rows):
            style = "dim italic" if row.kind == "published" else ("red" if row.reliable is False else None)
            rich_table.add_row(*(escape(cell) for cell in cells), style=style)
        console.print(rich_table)
        for name, value in table.card:
            console.print(f"[bold]{escape(name)}:[/] {escape(value)}", highlight=False)
        for note in table.notes:
            console.print(f"[yellow]note:[/] {escape(note)}", highlight=False)
        console.print()
