"""Comparison tables from the store, rendered for terminal, Markdown, CSV, LaTeX, JSON and HTML."""

from advdef.report.render import print_rich, to_csv, to_json, to_latex, to_markdown
from advdef.report.tables import ComparisonTable, comparison_tables, refused_evaluations

__all__ = ["ComparisonTable", "comparison_tables", "refused_evaluations", "print_rich", "to_csv", "to_json", "to_latex", "to_markdown"]
