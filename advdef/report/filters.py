"""What the user selects and how rows are ordered: `--where`, `--group-by`, `--sort`.

`--where defense=fsr,at=trades` keeps runs whose fields match; a value matches a field equal
to it or whose plugin name is it (`defense=smooth` matches `smooth:act=silu`), and `|` separates
alternatives (`defense=fsr|cas`). Commas separate conditions, but a comma followed by text
without `=` or by a parameter of a spec (`defense=smooth:act=silu,passes=all`) stays inside the value:
a new condition starts only at `,KEY=` with KEY one of the filter keys.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from fractions import Fraction

from advdef.errors import UserError, suggest
from advdef.specs import parse_spec

# Run and protocol fields a report can filter and group on.
FILTER_KEYS = ("run", "dataset", "arch", "defense", "at", "seed", "eps", "n", "checkpoint")
GROUP_KEYS = ("dataset", "arch", "defense", "at", "eps")
SPEC_KEYS = {"arch", "defense", "at", "dataset"}


@dataclass(frozen=True)
class Condition:
    key: str
    alternatives: tuple[str, ...]

    def matches(self, value: object) -> bool:
        return any(_matches(self.key, value, wanted) for wanted in self.alternatives)


def _matches(key: str, value: object, wanted: str) -> bool:
    text = str(value)
    if text == wanted:
        return True
    if key == "eps":
        try:
            return Fraction(text) == Fraction(wanted)
        except (ValueError, ZeroDivisionError):
            return False
    if key in SPEC_KEYS:
        try:
            return parse_spec(text).name == wanted
        except Exception:  # a stored spec that no longer parses matches only exactly
            return False
    return False


def parse_where(texts: list[str] | None) -> list[Condition]:
    """`["defense=fsr,at=trades"]` -> conditions (every one must hold)."""
    conditions: list[Condition] = []
    key_pattern = "|".join(FILTER_KEYS)
    for text in texts or []:
        parts = re.split(rf",(?=\s*(?:{key_pattern})\s*=)", text.strip())
        for part in parts:
            key, sep, value = part.partition("=")
            key, value = key.strip(), value.strip()
            if not sep or not value:
                raise UserError(f"--where expects KEY=VALUE[,KEY=VALUE], got '{part}'; keys: {', '.join(FILTER_KEYS)}")
            if key not in FILTER_KEYS:
                raise suggest(key, FILTER_KEYS, "--where key")
            conditions.append(Condition(key, tuple(v.strip() for v in value.split("|") if v.strip())))
    return conditions


def parse_group_by(text: str | None) -> list[str]:
    """`arch,at` -> ["arch", "at"]: each distinct combination gets its own table."""
    keys = [k.strip() for k in (text or "").split(",") if k.strip()]
    for key in keys:
        if key not in GROUP_KEYS:
            raise suggest(key, GROUP_KEYS, "--group-by key")
    return keys


@dataclass(frozen=True)
class SortOrder:
    """Sort rows by a column; metrics sort best-first (descending) unless prefixed with `+`."""

    column: str
    descending: bool


def parse_sort(text: str | None, columns: list[str], ascending_by_default: set[str] = frozenset()) -> SortOrder | None:
    """`--sort worst` (best first), `--sort +worst` (worst first), `--sort defense` (A to Z).

    Accuracies and deltas sort descending by default; names and `ascending_by_default`
    columns (costs: cheaper first) ascending; `-` forces descending, `+` ascending.
    """
    if not text:
        return None
    text = text.strip()
    ascending = text.startswith("+")
    descending = text.startswith("-")
    column = text.lstrip("+-")
    if column not in columns:
        raise suggest(column, columns, "--sort column")
    default_ascending = column in FILTER_KEYS or column in ascending_by_default
    return SortOrder(column, descending=descending or (not ascending and not default_ascending))
