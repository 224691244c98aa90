"""One self-contained HTML page: the comparison tables, their protocol cards and notes, and the
plots embedded as data URIs — a file that can be mailed or attached to a paper's supplement
without a folder of images beside it, and that loads nothing from the network (no scripts,
no fonts, no external styles).
"""

from __future__ import annotations

import base64
import html
import tempfile
from pathlib import Path

from advdef.report.render import LEGEND, text_rows
from advdef.report.tables import ComparisonTable
from advdef.store import Store

STYLE = """
body { font-family: system-ui, -apple-system, 'Segoe UI', sans-serif; margin: 2rem; color: #1d1d1f; }
h1 { font-size: 1.4rem; } h2 { font-size: 1.15rem; margin-top: 2.2rem; }
table { border-collapse: collapse; font-size: 0.85rem; margin: 0.6rem 0; }
th, td { border-bottom: 1px solid #ddd; padding: 0.25rem 0.55rem; text-align: right; white-space: nowrap; }
th { background: #f4f4f6; } td.id, th.id { text-align: left; }
tr.published td { color: #666; font-style: italic; } tr.unreliable td { color: #b00020; }
dl.card { display: grid; grid-template-columns: max-content auto; gap: 0.15rem 1rem; font-size: 0.85rem; }
dl.card dt { font-weight: 600; } dl.card dd { margin: 0; }
p.legend, ul.notes { font-size: 0.8rem; color: #444; max-width: 70rem; }
figure { display: inline-block; margin: 0.5rem 1rem 0.5rem 0; } figcaption { font-size: 0.8rem; color: #444; }
img { max-width: 36rem; }
"""

IDENTITY = ("run", "dataset", "arch", "defense", "at")


def _escape(text: str) -> str:
    return html.escape(text, quote=True)


def _table_html(index: int, table: ComparisonTable, compact: bool) -> str:
    headers, rows = text_rows(table, IDENTITY, compact=compact)
    parts = [f'<h2 id="table-{index}">Table {index}: {_escape(table.title)}</h2>', '<dl class="card">']
    parts += [f"<dt>{_escape(name)}</dt><dd>{_escape(value)}</dd>" for name, value in table.card]
    parts.append("</dl>")
    parts.append("<table><thead><tr>" + "".join(
        f'<th class="{"id" if i < len(IDENTITY) else "num"}">{_escape(h)}</th>' for i, h in enumerate(headers)
    ) + "</tr></thead><tbody>")
    for row, cells in zip(table.rows, rows):
        kind = "published" if row.kind == "published" else ("unreliable" if row.reliable is False else "advdef")
        parts.append(f'<tr class="{kind}">' + "".join(
            f'<td class="{"id" if i < len(IDENTITY) else "num"}">{_escape(c)}</td>' for i, c in enumerate(cells)
        ) + "</tr>")
    parts.append("</tbody></table>")
    parts.append(f'<p class="legend">{_escape(LEGEND)}</p>')
    if table.notes:
        parts.append('<ul class="notes">' + "".join(f"<li>{_escape(n)}</li>" for n in table.notes) + "</ul>")
    return "\n".join(parts)


def _figure(path: Path, caption: str) -> str:
    mime = "image/svg+xml" if path.suffix == ".svg" else "image/png"
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return (f'<figure><img alt="{_escape(caption)}" src="data:{mime};base64,{data}">'
            f"<figcaption>{_escape(caption)}</figcaption></figure>")


def report_plots(store: Store, tables: list[ComparisonTable], directory: Path, suffix: str = ".png") -> list[tuple[Path, str]]:
    """Write the report's plots for the runs in `tables`: accuracy vs eps, and per-class accuracy
    of each evaluation. Returns (file, caption) pairs."""
    from advdef.report.plots import plot_accuracy_vs_eps, plot_per_class

    directory.mkdir(parents=True, exist_ok=True)
    run_ids = list(dict.fromkeys(run for table in tables for row in table.rows if row.kind == "advdef" for run in row.runs))
    figures = []
    if run_ids:
        path = plot_accuracy_vs_eps(store, run_ids, directory / f"accuracy_vs_eps{suffix}")
        figures.append((path, "Worst-case robust accuracy vs eps per run (95% Wilson intervals; eps 0 = clean)"))
    for table in tables:
        for row in table.rows:
            for summary in row.summaries:
                run_id = summary.run["run_id"]
                name = f"per_class_{run_id}_eval{summary.eval_id}{suffix}"
                path = plot_per_class(store, summary.eval_id, directory / name)
                figures.append((path, f"Per-class clean and worst-case robust accuracy: {run_id} "
                                      f"({row.defense}, {row.at}), eps {table.protocol['eps']}"))
    return figures


def to_html(store: Store, tables: list[ComparisonTable], compact: bool = False, plots: bool = True) -> str:
    """The whole report as one page; plots are rendered into a temporary folder and inlined."""
    body = [_table_html(index, table, compact) for index, table in enumerate(tables, 1)]
    if plots and tables:
        with tempfile.TemporaryDirectory() as folder:
            figures = report_plots(store, tables, Path(folder))
            body.append("<h2>Plots</h2>")
            body += [_figure(path, caption) for path, caption in figures]
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        "<title>advdef report</title>\n"
        f"<style>{STYLE}</style>\n</head>\n<body>\n<h1>advdef report</h1>\n"
        + "\n".join(body)
        + "\n</body>\n</html>\n"
    )
