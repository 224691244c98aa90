"""Parsing of user spec strings: `pgd20`, `pgd:steps=50,restarts=2`, `fsr:points=layer4`.

Every spec resolves against its plugin's keyword defaults to a canonical string (all parameters,
sorted, exact fractions kept), which is what gets stored with each result so that two numbers
are only compared when they were measured the same way.
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

from advdef.errors import UserError

POSITIONAL = "_"  # key of a bare leading value, mapped to the plugin's first parameter
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]*$")
_INT = re.compile(r"^[+-]?\d+$")
_FLOAT = re.compile(r"^[+-]?(\d+\.\d*|\.\d+|\d+)([eE][+-]?\d+)?$")
_FRACTION = re.compile(r"^[+-]?\d+/\d+$")


def parse_value(text: str) -> Any:
    """Turn one spec value into int, Fraction, float, bool, None or str (in that order)."""
    text = text.strip()
    if _INT.match(text):
        return int(text)
    if _FRACTION.match(text):
        numerator, denominator = text.split("/")
        if int(denominator) == 0:
            raise UserError(f"malformed value '{text}': division by zero")
        return Fraction(int(numerator), int(denominator))
    if _FLOAT.match(text):
        return float(text)
    lowered = text.lower()
    if lowered in ("true", "yes", "on"):
        return True
    if lowered in ("false", "no", "off"):
        return False
    if lowered == "none":
        return None
    return text


def format_value(value: Any) -> str:
    """The canonical text of a value; `parse_value(format_value(v)) == v` for spec values."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Fraction):
        return f"{value.numerator}/{value.denominator}"
    if isinstance(value, (list, tuple)):
        return ",".join(format_value(v) for v in value)
    if value is None:
        return "none"
    return str(value)


def parse_eps(value: str | float | Fraction) -> Fraction:
    """An epsilon in pixel units of [0,1] images, as an exact fraction in (0, 1].

    `8/255` stays exactly 8/255; a decimal such as 0.031 is kept as the decimal the user wrote
    (31/1000), never silently rounded to a /255 value, because 0.031 and 8/255 are different
    threat models.
    """
    if isinstance(value, Fraction):
        eps = value
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        eps = Fraction(str(value))
    else:
        parsed = parse_value(str(value))
        if isinstance(parsed, bool) or not isinstance(parsed, (int, float, Fraction)):
            raise UserError(f"epsilon '{value}' is not a number; write a fraction such as 8/255")
        eps = Fraction(str(parsed)) if isinstance(parsed, float) else Fraction(parsed)
    if not 0 < eps <= 1:
        raise UserError(f"epsilon {format_value(eps)} is outside (0, 1]; inputs live in [0,1], e.g. 8/255")
    return eps


@dataclass(frozen=True)
class Spec:
    """A plugin name with the parameters the user gave explicitly."""

    name: str
    params: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        if not self.params:
            return self.name
        body = ",".join(f"{k}={format_value(v)}" for k, v in sorted(self.params.items()))
        return f"{self.name}:{body}"


def parse_spec(text: str) -> Spec:
    """Parse `name` or `name:key=value,key=value`.

    A comma-separated chunk without `=` continues the previous key's value as a list, so
    `points=layer2,layer3` means points=["layer2", "layer3"].
    """
    text = text.strip()
    name, _, body = text.partition(":")
    name = name.strip()
    if not name or not _NAME.match(name):
        raise UserError(f"malformed spec '{text}': expected NAME or NAME:key=value,...")
    params: dict[str, Any] = {}
    last_key: str | None = None
    if body.strip():
        for chunk in body.split(","):
            if "=" in chunk:
                key, _, raw = chunk.partition("=")
                key = key.strip()
                if not _NAME.match(key) or not raw.strip():
                    raise UserError(f"malformed spec '{text}': bad parameter '{chunk}'")
                if key in params:
                    raise UserError(f"malformed spec '{text}': parameter '{key}' given twice")
                params[key] = parse_value(raw)
                last_key = key
            elif last_key is None and not params and chunk.strip():
                # `imagefolder:PATH`, `eot:20`: a leading bare value fills the first parameter.
                params[POSITIONAL] = parse_value(chunk)
                last_key = POSITIONAL
            elif last_key is not None and chunk.strip():
                previous = params[last_key]
                items = previous if isinstance(previous, list) else [previous]
                params[last_key] = items + [parse_value(chunk)]
            else:
                raise UserError(f"malformed spec '{text}': expected key=value, got '{chunk}'")
    return Spec(name, params)


def split_specs(text: str) -> list[str]:
    """Split a list of specs at the commas that start a new spec.

    `fgsm,pgd:steps=50,restarts=2,cw` -> [fgsm, pgd:steps=50,restarts=2, cw]: a chunk starts a new
    spec when its name (before any `:`) is a known attack; otherwise it continues the previous
    spec's parameters. `;` or spaces always separate specs, for list values that name attacks.
    """
    specs: list[str] = []
    for group in re.split(r"[;\s]+", text.strip()):
        current: str | None = None
        for chunk in group.split(","):
            if current is not None and ":" in current and (
                _continues_list(current, chunk) or not _starts_attack_spec(chunk)
            ):
                current += "," + chunk
            else:
                if current is not None:
                    specs.append(current)
                current = chunk
        if current:
            specs.append(current)
    return [s for s in (s.strip() for s in specs) if s]


def _continues_list(current: str, chunk: str) -> bool:
    """True when `chunk` is one more item of the list the current spec's last parameter holds and
    the plugin declares it a valid item (`list_values`), e.g. `square` in
    `aa:version=custom,attacks=apgd-ce,square`, though `square` is also an attack's name."""
    from advdef.registry import ATTACKS

    if "=" in chunk or ":" in chunk:
        return False
    name, _, body = current.partition(":")
    last_key = next((c.partition("=")[0].strip() for c in reversed(body.split(",")) if "=" in c), None)
    if last_key is None or not ATTACKS.knows(name.strip()):
        return False
    plugin, _ = ATTACKS.parse(name.strip())
    return chunk.strip() in getattr(plugin.factory, "list_values", {}).get(last_key, ())


def _starts_attack_spec(chunk: str) -> bool:
    from advdef.registry import ATTACKS  # the registry imports this module

    from advdef.evaluation.suites import is_keyword

    name = chunk.split(":", 1)[0].strip()
    return is_keyword(chunk.strip()) or (bool(_NAME.match(name)) and ATTACKS.knows(name))


def resolve_params(factory: Any, spec: Spec, what: str) -> dict[str, Any]:
    """Check spec parameters against the factory's keyword signature and fill in defaults.

    Returns every keyword parameter with its value, which is what a canonical spec lists.
    Unknown parameters are a UserError naming the valid ones.
    """
    signature = inspect.signature(factory)
    accepted = {
        name: p
        for name, p in signature.parameters.items()
        if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and name != "self"
    }
    params = dict(spec.params)
    # A factory may accept other spellings of its parameters, e.g. `transfer:from=RUN` for the
    # parameter `source` (`from` is a Python keyword).
    for alias, name in getattr(factory, "spec_aliases", {}).items():
        if alias in params:
            if name in params:
                raise UserError(f"{what} '{spec.name}': '{alias}' and '{name}' name the same parameter; give one")
            params[name] = params.pop(alias)
    if POSITIONAL in params:
        if not accepted:
            raise UserError(f"{what} '{spec.name}' takes no parameters")
        first = next(iter(accepted))
        if first in params:
            raise UserError(f"{what} '{spec.name}': '{first}' given twice")
        params[first] = params.pop(POSITIONAL)
    for key in params:
        if key not in accepted:
            from advdef.errors import suggest

            error = suggest(key, accepted, f"parameter of {what} '{spec.name}'")
            raise UserError(str(error))
    resolved: dict[str, Any] = {}
    for name, parameter in accepted.items():
        if name in params:
            resolved[name] = params[name]
        elif parameter.default is not inspect.Parameter.empty:
            resolved[name] = parameter.default
    return resolved
