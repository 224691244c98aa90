"""Aggregates of one evaluation, all derived from the stored per-sample outcomes.

Robust accuracy under an attack counts a sample robust only if it was clean-correct and the
attack did not break it; samples an earlier attack already broke (outcome NULL) count as not
robust, so each attack's column is the accuracy after it and every earlier attack. The worst
case is the per-sample minimum over all attacks — never an average of per-attack accuracies.
Beside it, the white-box worst case (attacks on the final logits only, what defense papers
report) shows how much adaptive, black-box and transfer attacks added; every broken sample was
broken by exactly one attack (later attacks skip it), whose count the report shows.

The sanity checks' verdicts (advdef.evaluation.checks) are read back here: a failed check makes
the evaluation unreliable, whatever its numbers.

Warnings about the evaluation as a whole (a stochastic defense that no EOT attack evaluated) are
derived here from what the evaluation recorded, so adding an EOT attack later clears them.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

from advdef.evaluation.engine import CLEAN
from advdef.evaluation.stats import Proportion
from fractions import Fraction

from advdef.attacks.pgd import EIGHT_255
from advdef.registry import ATTACKS
from advdef.errors import UserError
from advdef.specs import Spec, format_value, parse_spec, parse_value
from advdef.store import Store


@dataclass
class AttackResult:
    spec: str
    label: str
    robust: Proportion
    attacked: int
    seconds: float
    complete: bool
    warnings: list[str] = field(default_factory=list)
    eot: int = 1  # gradient samples per step (Expectation over Transformation)
    family: str = "white-box"  # Attack.family
    broke: int = 0  # samples this attack broke (each broken sample has exactly one breaker)
    suite: str | None = None  # the suite keyword it was expanded from, if any
    implementation: str = ""  # which code ran it, with its version (part of the report's protocol)
    # Cost in sample-passes through the model (advdef.evaluation.cost), re-scoring included;
    # per attacked sample: forwards / attacked. 0 for evaluations stored before costs were.
    forwards: int = 0
    backwards: int = 0


@dataclass
class EvalSummary:
    eval_id: int
    run: dict
    protocol: dict
    clean: Proportion
    attacks: list[AttackResult]
    worst: Proportion
    seconds: float
    warnings: list[str] = field(default_factory=list)  # about the evaluation as a whole
    # Worst case over the white-box attacks only; None when another family ran before one of
    # them (the white-box attack then skipped samples it might have broken).
    worst_whitebox: Proportion | None = None
    checks: list[dict] = field(default_factory=list)  # stored sanity-check verdicts
    sample_ids: list[int] = field(default_factory=list)  # the evaluated test-split ids
    # Robust sample ids per aggregate ("clean", "standard_worst", "adaptive_worst"), for paired
    # tests between evaluations of the same samples; standard_worst absent when undefined.
    robust_ids: dict[str, frozenset[int]] = field(default_factory=dict)
    # Total sample-passes of the whole evaluation: the clean pass plus every attack.
    forwards: int = 0
    backwards: int = 0

    @property
    def complete(self) -> bool:
        return all(a.complete for a in self.attacks)

    @property
    def failed_checks(self) -> list[dict]:
        return [c for c in self.checks if c["verdict"] == "fail"]

    @property
    def reliable(self) -> bool | None:
        """False when any sanity check failed; None when no check ran."""
        if not self.checks:
            return None
        return not self.failed_checks

    @property
    def stochastic(self) -> bool:
        """The evaluated defense draws new randomness every forward pass (each score is one draw)."""
        return bool(self.protocol.get("stochastic_defense", False))


STOCHASTIC_WITHOUT_EOT = (
    "stochastic defense evaluated without EOT: its robust accuracy is likely overstated "
    "(each gradient follows one random draw); add an EOT attack, e.g. pgd:eot=30"
)


def evaluation_warnings(protocol: dict, attacks: list[AttackResult]) -> list[str]:
    """Warnings about the set of attacks an evaluation ran, as opposed to one attack's own warnings."""
    if protocol.get("stochastic_defense") and not any(a.eot > 1 for a in attacks):
        return [STOCHASTIC_WITHOUT_EOT]
    return []


def short_label(spec: str, eps: Fraction = EIGHT_255) -> str:
    """The shortest spec naming the same attack: `pgd20` for the canonical PGD-20, `aa` for standard AA."""
    parsed = parse_spec(spec)
    plugin, _ = ATTACKS.resolve(parsed.name)
    try:
        defaults = parse_spec(ATTACKS.create(parsed.name, eps=eps).spec()).params
    except (TypeError, ValueError, UserError):  # required parameters (transfer, adaptive): the signature's defaults
        defaults = {name: parse_value(format_value(p.default)) for name, p in inspect.signature(plugin.factory).parameters.items()
                    if p.default is not inspect.Parameter.empty}
    changed = {k: v for k, v in parsed.params.items() if defaults.get(k, object()) != v}
    if plugin.shorthand:
        rest = {k: v for k, v in changed.items() if k != plugin.shorthand}
        steps = parsed.params.get(plugin.shorthand, defaults.get(plugin.shorthand))
        return str(Spec(f"{plugin.name}{steps}", rest))
    return str(Spec(plugin.name, changed))


def attack_family(spec: str) -> str:
    """The family (Attack.family) of an attack spec; unknown plugins count as white-box."""
    try:
        plugin, _ = ATTACKS.parse(spec)
    except Exception:  # a plugin uninstalled since the evaluation: its rows still count
        return "white-box"
    return getattr(plugin.factory, "family", "white-box")


def whitebox_survivors(clean_ok: set[int], attacks: list[AttackResult], broken_by: dict[str, set[int]]) -> set[int] | None:
    """Samples robust to every white-box attack, if they all ran before any other family."""
    families = [a.family for a in attacks]
    if "white-box" not in families:
        return None
    last_whitebox = max(i for i, f in enumerate(families) if f == "white-box")
    if any(f != "white-box" for f in families[:last_whitebox]):
        return None
    broken = set().union(*(broken_by[a.spec] for a in attacks if a.family == "white-box"))
    return clean_ok - broken


def whitebox_worst(clean_ok: set[int], attacks: list[AttackResult], broken_by: dict[str, set[int]], n: int) -> Proportion | None:
    """Worst case over the white-box attacks, if they all ran before any other family."""
    survivors = whitebox_survivors(clean_ok, attacks, broken_by)
    return None if survivors is None else Proportion(len(survivors), n)


def summarize(store: Store, eval_id: int) -> EvalSummary:
    evaluation = next(e for e in store.evaluations() if e["eval_id"] == eval_id)
    run = store.get_run(evaluation["run_id"])
    n = evaluation["n"]
    outcomes = store.outcomes(eval_id)
    by_attack: dict[str, list[dict]] = {}
    for row in outcomes:
        by_attack.setdefault(row["attack"], []).append(row)
    clean_rows = by_attack.get(CLEAN, [])
    clean_ok = {r["sample_id"] for r in clean_rows if r["robust"] == 1}
    broken: set[int] = set()
    broken_by: dict[str, set[int]] = {}
    results: list[AttackResult] = []
    seconds = 0.0
    for attack in store.eval_attacks(eval_id):
        seconds += attack["seconds"]
        if attack["attack"] == CLEAN:
            continue
        rows = by_attack.get(attack["attack"], [])
        survived = {r["sample_id"] for r in rows if r["robust"] == 1}
        broken_by[attack["attack"]] = {r["sample_id"] for r in rows if r["robust"] == 0} & clean_ok
        broken |= broken_by[attack["attack"]]
        results.append(
            AttackResult(
                spec=attack["attack"],
                label=short_label(attack["attack"], Fraction(evaluation["eps"])),
                robust=Proportion(len(survived & clean_ok), n),
                attacked=sum(1 for r in rows if r["robust"] is not None),
                seconds=attack["seconds"],
                complete=attack["status"] == "done" and len(rows) == n,
                warnings=attack["details"].get("warnings", []),
                eot=attack["details"].get("eot", 1),
                family=attack_family(attack["attack"]),
                broke=len(broken_by[attack["attack"]]),
                suite=attack["details"].get("suite"),
                implementation=attack["details"].get("implementation", ""),
                forwards=attack.get("forwards") or 0,
                backwards=attack.get("backwards") or 0,
            )
        )
    robust_ids = {"clean": frozenset(clean_ok), "adaptive_worst": frozenset(clean_ok - broken)}
    survivors = whitebox_survivors(clean_ok, results, broken_by)
    if survivors is not None:
        robust_ids["standard_worst"] = frozenset(survivors)
    return EvalSummary(
        eval_id=eval_id,
        run=run,
        protocol=evaluation["protocol"],
        clean=Proportion(len(clean_ok), n),
        attacks=results,
        worst=Proportion(len(clean_ok - broken), n),
        seconds=seconds,
        warnings=evaluation_warnings(evaluation["protocol"], results),
        worst_whitebox=whitebox_worst(clean_ok, results, broken_by, n),
        checks=store.checks(eval_id),
        sample_ids=list(evaluation["sample_ids"]),
        robust_ids=robust_ids,
        forwards=sum(a.get("forwards") or 0 for a in store.eval_attacks(eval_id)),
        backwards=sum(a.get("backwards") or 0 for a in store.eval_attacks(eval_id)),
    )
