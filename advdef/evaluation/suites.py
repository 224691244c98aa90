"""Attack suites: keywords in `--attacks` / `--suite` that expand to attack specs for one run.

A suite is resolved against the evaluated run, because what a careful attacker runs depends on
the defense: its adaptive attacks come from its own declarations, a stochastic defense needs EOT
and AutoAttack's `rand` version, and a transfer attack needs a surrogate run in the same store.

    standard   fgsm, cw, pgd20, aa                  (what RobustBench-style tables report)
    adaptive   the defense's adaptive attacks        (advdef.attacks.adaptive.adaptive_suite)
    blackbox   square, noise                         (gradient-free: catch masked gradients)
    transfer   transfer:from=<surrogate run>         (an undefended run of the same data and arch)
    paper      the defense paper's own attacks, labelled as such (Defense.paper_attacks)
    full       standard + adaptive + blackbox + transfer: the default of `advdef evaluate`

`eot:N` among the items sets the EOT samples of every attack that takes them (as `--eot N`).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

from advdef.registry import ATTACKS

# cw before pgd20: the CW-vs-PGD check needs PGD to attack the points CW left standing.
STANDARD = ("fgsm", "cw", "pgd20", "aa")
BLACKBOX = ("square", "noise")
# Gradient-based attacks that accept `eot` (gradient samples per step) for stochastic defenses.
EOT_SAMPLES_STOCHASTIC = 20
# `--attacks pgd20,cw,eot:30`: every attack that takes `eot` uses 30 samples (like --eot 30).
EOT_MODIFIER = re.compile(r"eot:([1-9][0-9]*)")


@dataclass
class SuiteContext:
    """What suite expansion needs to know about the evaluated run."""

    defense: object
    run: dict
    store: object = None
    eot: int | None = None  # evaluate --eot (or an `eot:N` item); None = 20 for a stochastic defense, else 1
    notes: list[str] = field(default_factory=list)  # why something was left out, for the protocol card
    origins: dict[str, str] = field(default_factory=dict)  # expanded spec -> the suite it came from

    @property
    def stochastic(self) -> bool:
        return bool(getattr(self.defense, "stochastic", False))


def _standard(context: SuiteContext) -> list[str]:
    return list(STANDARD)


def _adaptive(context: SuiteContext) -> list[str]:
    from advdef.attacks.adaptive import adaptive_suite

    specs = adaptive_suite(context.defense)
    if not specs:
        context.notes.append("adaptive: the defense declares no heads, masks or gradient surrogates")
    return specs


def _blackbox(context: SuiteContext) -> list[str]:
    return list(BLACKBOX)


def _transfer(context: SuiteContext) -> list[str]:
    source = default_transfer_source(context.store, context.run)
    if source is None:
        context.notes.append(
            "transfer: no undefended run of the same dataset and architecture in the store; "
            "train one (--defense none) or name a surrogate with transfer:from=RUN_ID"
        )
        return []
    return [f"transfer:from={source}"]


def _paper(context: SuiteContext) -> list[str]:
    return list(getattr(context.defense, "paper_attacks", ()) or ("fgsm", "cw", "pgd20"))


def _full(context: SuiteContext) -> list[str]:
    return [*_standard(context), *_adaptive(context), *_blackbox(context), *_transfer(context)]


SUITES: dict[str, Callable[[SuiteContext], list[str]]] = {
    "standard": _standard,
    "adaptive": _adaptive,
    "blackbox": _blackbox,
    "transfer": _transfer,
    "paper": _paper,
    "full": _full,
}


def default_transfer_source(store, run: dict) -> str | None:
    """The newest trained run with the same dataset and architecture and no defense: the surrogate
    a transfer attack should come from (a same-recipe baseline whose gradients are honest)."""
    if store is None:
        return None
    candidates = [
        r for r in store.runs(status="trained")
        if r["run_id"] != run.get("run_id") and r["dataset"] == run.get("dataset") and r["arch"] == run.get("arch")
        and r["defense"] == "none" and r.get("best_epoch") is not None
    ]
    return candidates[-1]["run_id"] if candidates else None


def expand(items: list[str], context: SuiteContext) -> list[str]:
    """Replace suite keywords by their attacks and adapt the result to a stochastic defense.

    Plain attack specs pass through unchanged (first occurrence kept, order preserved). For a
    stochastic defense, gradient attacks that take `eot` and do not set it get `eot` samples
    per step, and `aa` without a version becomes `aa:version=rand` (AutoAttack's EOT version).
    """
    for item in items:  # `eot:N` modifies the whole list, wherever it stands
        match = EOT_MODIFIER.fullmatch(item.strip())
        if match:
            context.eot = int(match.group(1))
    expanded: list[str] = []
    for item in items:
        if EOT_MODIFIER.fullmatch(item.strip()):
            continue
        for spec in SUITES[item](context) if item in SUITES else [item]:
            if spec not in expanded:
                expanded.append(spec)
                if item in SUITES:
                    context.origins[spec] = item
    eot = context.eot if context.eot is not None else (EOT_SAMPLES_STOCHASTIC if context.stochastic else 1)
    if not (eot > 1 or context.stochastic):
        return expanded
    adapted = []
    for spec in expanded:
        adapted.append(_with_eot(spec, eot))
        if spec in context.origins:
            context.origins[adapted[-1]] = context.origins[spec]
    return adapted


def _with_eot(spec: str, eot: int) -> str:
    """`spec` with `eot` gradient samples if its attack takes them and it does not set them; `aa`
    without a version becomes `aa:version=rand`."""
    plugin, parsed = ATTACKS.parse(spec)
    if plugin.name == "aa" and "version" not in parsed.params:
        return _add_param(spec, "version", "rand")
    if eot > 1 and "eot" in ATTACKS.resolve(spec)[1] and "eot" not in parsed.params:
        return _add_param(spec, "eot", str(eot))
    return spec


def _add_param(spec: str, key: str, value: str) -> str:
    return f"{spec},{key}={value}" if ":" in spec else f"{spec}:{key}={value}"


def is_keyword(item: str) -> bool:
    """A suite name or the `eot:N` modifier: items of `--attacks` that are not attack specs."""
    return item in SUITES or EOT_MODIFIER.fullmatch(item.strip()) is not None


__all__ = ["SUITES", "SuiteContext", "default_transfer_source", "expand", "is_keyword"]
