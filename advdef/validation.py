"""Validation of numeric plugin parameters, shared by every plugin.

Plugins raise ValueError for a bad value; the registry turns it into a one-line user error.
Spec values arrive as int, float or exact Fraction (`8/255`), so all real numbers are accepted.
"""

from __future__ import annotations

import math
from numbers import Real


def number(
    name: str,
    value: object,
    *,
    above: float | None = None,
    at_least: float | None = None,
    at_most: float | None = None,
) -> float:
    """`value` as a float if it is a finite real within the bounds, else a ValueError naming them."""
    bounds = [
        f"> {above:g}" if above is not None else "",
        f">= {at_least:g}" if at_least is not None else "",
        f"<= {at_most:g}" if at_most is not None else "",
    ]
    ok = isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(float(value))
    if ok:
        x = float(value)  # type: ignore[arg-type]
        ok = (above is None or x > above) and (at_least is None or x >= at_least) and (at_most is None or x <= at_most)
    if not ok:
        required = " and ".join(b for b in bounds if b)
        raise ValueError(f"{name} must be a finite number{' ' + required if required else ''}, got {value!r}")
    return float(value)  # type: ignore[arg-type]


def whole(name: str, value: object, minimum: int = 1) -> int:
    """A whole number >= minimum, else a one-line ValueError."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be a whole number >= {minimum}, got {value!r}")
    return value


def flag(name: str, value: object) -> bool:
    """A boolean spec value (true/false), else a one-line ValueError."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {value!r}")
    return value
