"""User-facing errors.

Anything a user can get wrong (a name, a spec, a path, a run id) raises `UserError`; the CLI turns
it into one line on stderr and exit code 2, never a traceback. Internal bugs stay ordinary
exceptions so they are not disguised as user mistakes.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class UserError(Exception):
    """Bad input from the user: printed as one line, exit code 2."""

    exit_code = 2


def suggest(name: str, valid: Iterable[str], what: str, where: str = "") -> UserError:
    """An 'unknown X' error that names the close matches, or else everything valid."""
    valid = sorted(valid)
    close = difflib.get_close_matches(name, valid, n=3, cutoff=0.5)
    if close:
        hint = "did you mean " + ", ".join(close) + "?"
    else:
        hint = "valid: " + (", ".join(valid) if valid else "(none)")
    location = f" {where}" if where else ""
    return UserError(f"unknown {what} '{name}'{location}; {hint}")
