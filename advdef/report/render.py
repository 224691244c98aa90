"""Render comparison tables: terminal (rich), Markdown, CSV and JSON."""

from __future__ import annotations

import io
import json

from advdef.evaluation.stats import Proportion
from advdef.report.tables import IDENTITY_COLUMNS, ComparisonTable

HEADERS = {"worst": "worst case", "worst_whitebox": "white-box worst", "clean": "clean"}
RELIABILITY = {True: "pass", False: "FAIL", None: "—"}


def format_cell(cell: Proportion | None, digits: int = 1) -> str:
    """`85.0 [81.2, 88.1]`: percent with its 95% Wilson interval (bounds to `digits` decimals)."""
    if cell is None:
        return "—"
    low, high = cell.interval
    return f"{100 * cell.value:.1f} [{100 * low:.{digits}f}, {100 * high:.{digits}f}]"


def _text_rows(
    table: ComparisonTable, identity: list[str] = IDENTITY_COLUMNS, digits: int = 1
) -> tuple[list[str], list[list[str]]]:
    headers = identity + [HEADERS.get(m, m) for m in table.metrics] + ["checks", "time (s)"]
    rows = []
    for row in table.rows:
        cells = [str(row[c]) for c in identity]
        cells += [format_cell(row.get(m), digits) for m in table.metrics]
        cells.append(RELIABILITY[row.get("reliable")])
        cells.append(f"{row['seconds']:.0f}" + ("" if row["complete"] else " (incomplete)"))
        rows.append(cells)
    return headers, rows


LEGEND = (
    "Robust accuracy in % with 95% Wilson intervals; each attack column counts points broken by earlier attacks "
    "as broken; white-box worst = per-sample minimum over the attacks on the final logits; worst case = over all "
    "attacks (adaptive, black-box and transfer included); checks = gradient-masking sanity checks (FAIL: unreliable)."
)


def to_markdown(tables: list[ComparisonTable]) -> str:
    out = io.StringIO()
    for table in tables:
        headers, rows = _text_rows(table)
        out.write(f"### {table.title}\n\n")
        out.write("| " + " | ".join(headers) + " |\n")
        out.write("|" + "|".join("---" for _ in headers) + "|\n")
        for cells in rows:
            out.write("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |\n")
        out.write(f"\n{LEGEND}\n")
        for note in table.notes:
            out.write(f"\n- {note}")
        out.write("\n\n" if table.notes else "\n")
    return out.getvalue()


def to_csv(tables: list[ComparisonTable]) -> str:
    import pandas as pd

    frames = [t.numeric_frame() for t in tables]
    if not frames:
        return ""
    return pd.concat(frames, ignore_index=True).to_csv(index=False)


def to_json(tables: list[ComparisonTable]) -> str:
    payload = [
        {"protocol": t.protocol, "rows": json.loads(t.numeric_frame().to_json(orient="records")), "notes": t.notes}
        for t in tables
    ]
    return json.dumps(payload, indent=2, default=str)


def print_rich(tables: list[ComparisonTable], console) -> None:
    from rich.table import Table

    for table in tables:
        # The dataset is in the title; the terminal table keeps the columns that differ.
        headers, rows = _text_rows(table, [c for c in IDENTITY_COLUMNS if c != "dataset"], digits=0)
        rich_table = Table(title=table.title, caption=LEGEND, caption_justify="left")
        for index, header in enumerate(headers):
            rich_table.add_column(header, no_wrap=True, overflow="ellipsis" if index else "fold")
        for cells in rows:
            rich_table.add_row(*cells)
        console.print(rich_table)
        for note in table.notes:
            console.print(f"[yellow]note:[/] {note}")
