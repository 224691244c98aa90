"""Gradient-masking sanity checks of an evaluation: a verdict and its figure per check.

An evaluation that fails any check is unreliable: its robust accuracy is likely overstated
(docs/evaluation.md, "Sanity checks"; research notes evaluation-rigor.md §3.6 and §6 items 13-33,
44-47). Every check is a small function returning a `CheckResult`, listed in `CHECKS` with its
kind:

- "stored" checks read the per-sample outcomes of the attacks the evaluation ran and run no
  attack. The engine does not attack a sample that an earlier attack already broke (outcome
  NULL), so "attack X broke this sample" is three-valued: yes, no, or unknown. A stored check
  counts the samples on which its event is certainly true (a lower bound) and those on which it
  is possibly true (an upper bound), both over all n samples of the evaluation. It fails when the
  lower bound exceeds its threshold, passes when the upper bound does not, and is skipped as
  inconclusive otherwise — the attack order then hides the answer, and the detail says so.
  A check whose attacks did not run is skipped.
- "diagnostic" checks run their own small computations through the evaluation's label-free,
  eval-mode view on a fixed subset: the first `n_check` clean-correct samples of a seeded
  permutation of the evaluation's samples. Every attack starts from the clean image, with seeds
  derived from the evaluation seed; the caller's RNG state is restored afterwards.

Figures and thresholds are fractions (0.01 = 1 percentage point) unless the detail says otherwise.
`run_checks` records every result in the store (upsert per evaluation and name).
"""

from __future__ import annotations

import hashlib
import inspect
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from fractions import Fraction
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from advdef.attacks.base import eval_mode, preserved_rng
from advdef.attacks.losses import cross_entropy
from advdef.attacks.pgd import pgd_attack
from advdef.device import prepare
from advdef.evaluation.stats import Proportion
from advdef.progress import Reporter, SilentReporter
from advdef.specs import parse_spec
from advdef.store import Store

if TYPE_CHECKING:  # the engine imports this module; import it only for type names
    from advdef.evaluation.engine import EvalConfig, EvaluationTarget

# The engine's name for the clean pass (advdef.evaluation.engine.CLEAN; not imported, see above).
CLEAN = "clean"
PASS, FAIL, SKIPPED = "pass", "fail", "skipped"

# -- thresholds (fractions of the points compared; evaluation-rigor.md §3.6) ---------------------
MIN_TOLERANCE = 0.005  # 0.5 pp: the floor under the Wilson half-width in S2 and S5
CONVERGENCE_DROP = 0.01  # S3/S4: doubling steps or 5 restarts may lower accuracy by less than 1 pp
CONVERGENCE_POINTS = 2  # ... and must break at least 2 more points: one point of ~100 is random-start noise
LARGE_EPS_FACTOR = 8  # S6 tests at max(64/255, 8 x the evaluated eps): 64/255 is 8 x the usual 8/255
LARGE_EPS_ACCURACY = 0.01  # S6: at most 1% of the subset survives PGD-20 at 64/255
SQUARE_EXTRA = 0.002  # S8: AutoAttack's check_square_sr alpha, 0.2 pp of n
TRANSFER_EXTRA = 0.005  # S9: 0.5 pp of n
NOISE_EXTRA = 0.005  # S10: 0.5 pp of n
CW_OVER_PGD = 0.03  # S11: 3 pp of n
PGD_OVER_AA = 0.05  # S12: 5 pp of n
LOGIT_TOLERANCE = 1e-4  # S14 (normalized logits, AA check_randomized); S15/S16 (relative to max|z|)

# -- diagnostic attack settings -------------------------------------------------------------------
PGD_STEPS = 20
DOUBLED_STEPS = 2 * PGD_STEPS
RESTARTS = 5
SWEEP_EPS = tuple(Fraction(k, 255) for k in (1, 2, 4, 8, 16, 32, 64))
UNBOUNDED_STEPS = 50
UNBOUNDED_ALPHA = 0.04  # 50 sign steps of 0.04: any pixel can cross [0,1] twice
RANDOMNESS_PASSES = 5

# Gradient-based (white-box) attack plugins: the ones black-box, transfer and noise attacks are
# compared with. `aa` counts as white-box: its Square component is judged by AutoAttack itself.
WHITE_BOX = frozenset({"fgsm", "pgd", "cw", "apgd", "mim", "aa"})


@dataclass(frozen=True)
class CheckResult:
    """One check's outcome: verdict 'pass', 'fail' or 'skipped', the measured figure and its limit."""

    name: str
    verdict: str
    figure: float | None = None
    threshold: float | None = None
    detail: dict[str, Any] = field(default_factory=dict)


class Skip(Exception):
    """Raised by a check that cannot run (attacks missing, nothing to measure); the message is the reason."""


def reliable(results: list[CheckResult]) -> bool:
    """An evaluation is reliable when no check failed (skipped checks do not count against it)."""
    return not any(r.verdict == FAIL for r in results)


def derived_seed(seed: int, name: str) -> int:
    """A 32-bit seed for one use inside the checks, derived from the evaluation seed."""
    digest = hashlib.sha256(f"{seed}|checks|{name}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def _fraction(k: int | float, n: int) -> float:
    return k / n if n else float("nan")


def _half_width(k: int, n: int) -> float:
    return Proportion(k, n).half_width


# == inputs shared by the checks ==================================================================
class CheckInputs:
    """What the checks read: the stored evaluation and, lazily, the diagnostic subset and attack runs."""

    def __init__(self, store: Store, eval_id: int, target: EvaluationTarget, config: EvalConfig, n_check: int) -> None:
        self.store = store
        self.eval_id = eval_id
        self.target = target
        self.config = config
        self.n_check = n_check
        self.view: nn.Module | None = None  # set by run_checks while the model is held in eval mode
        self.eps = float(Fraction(config.eps))
        self._cache: dict[Any, Any] = {}

    # -- stored outcomes ----------------------------------------------------------------------
    @property
    def n(self) -> int:
        if "n" not in self._cache:
            rows = [e for e in self.store.evaluations() if e["eval_id"] == self.eval_id]
            self._cache["n"] = int(rows[0]["n"]) if rows else len(self.target.samples)
        return self._cache["n"]

    @property
    def attacks(self) -> list[dict]:
        """The evaluation's attacks (not the clean pass), each with its plugin name and params."""
        if "attacks" not in self._cache:
            found = []
            for row in self.store.eval_attacks(self.eval_id):
                if row["attack"] == CLEAN:
                    continue
                spec = parse_spec(row["attack"])
                found.append({**row, "plugin": spec.name, "params": spec.params})
            self._cache["attacks"] = found
        return self._cache["attacks"]

    @property
    def clean_correct(self) -> list[int]:
        """Sample ids the stored clean pass got right: the only samples a robust accuracy counts."""
        if "clean_correct" not in self._cache:
            self._cache["clean_correct"] = [
                r["sample_id"] for r in self.store.outcomes(self.eval_id, CLEAN) if r["robust"] == 1
            ]
        return self._cache["clean_correct"]

    def broke(self, spec: str) -> dict[int, bool | None]:
        """Per clean-correct sample: did `spec` break it (True), not (False), or unknown (None, not attacked)."""
        key = ("broke", spec)
        if key not in self._cache:
            robust = {r["sample_id"]: r["robust"] for r in self.store.outcomes(self.eval_id, spec)}
            self._cache[key] = {
                sid: None if robust.get(sid) is None else robust[sid] == 0 for sid in self.clean_correct
            }
        return self._cache[key]

    def specs(self, select: Callable[[dict], bool]) -> list[str]:
        return [a["attack"] for a in self.attacks if select(a)]

    @property
    def max_eot(self) -> int:
        """The largest EOT sample count any attack of the evaluation used (1: none used EOT)."""
        return max([int(a["details"].get("eot", 1)) for a in self.attacks] or [1])

    # -- diagnostic subset ---------------------------------------------------------------------
    def seed(self, name: str) -> int:
        return derived_seed(self.config.seed, name)

    def require_view(self) -> nn.Module:
        if self.view is None:
            raise RuntimeError("run_checks sets the view; diagnostics need it")
        return self.view

    def images(self, positions: torch.Tensor) -> torch.Tensor:
        return prepare(self.target.samples.float_images(positions), self.target.device, True)

    def labels(self, positions: torch.Tensor) -> torch.Tensor:
        return self.target.samples.labels[positions].to(self.target.device)

    @contextmanager
    def model_rng(self, name: str) -> Iterator[None]:
        """Seed the global RNG (which stochastic defenses draw from) for one step; restore it after."""
        with preserved_rng(self.target.device):
            torch.manual_seed(self.seed(f"{name}|model-rng"))
            yield

    def predict(self, x: torch.Tensor, name: str) -> torch.Tensor:
        view = self.require_view()
        predictions = []
        with torch.no_grad(), self.model_rng(name):
            for start in range(0, len(x), self.config.batch_size):
                predictions.append(view(x[start : start + self.config.batch_size]).argmax(1))
        return torch.cat(predictions) if predictions else torch.empty(0, dtype=torch.long, device=x.device)

    def _select(self) -> None:
        """The pool (first n_check of a seeded permutation of the samples) and the subset (its first
        n_check clean-correct samples, scanning further when the pool holds fewer)."""
        samples = self.target.samples
        generator = torch.Generator().manual_seed(self.seed("subset"))
        order = torch.randperm(len(samples), generator=generator)
        correct: list[torch.Tensor] = []
        pool_correct = None
        chunk = max(self.n_check, 1)
        for start in range(0, len(order), chunk):
            positions = order[start : start + chunk]
            hit = (self.predict(self.images(positions), f"clean|{start}") == self.labels(positions)).cpu()
            if start == 0:
                pool_correct = hit
            correct.append(positions[hit])
            if sum(len(c) for c in correct) >= self.n_check:
                break
        self._cache["pool"] = order[: self.n_check]
        self._cache["pool_correct"] = pool_correct if pool_correct is not None else torch.zeros(0, dtype=torch.bool)
        self._cache["subset"] = torch.cat(correct)[: self.n_check] if correct else torch.zeros(0, dtype=torch.long)

    @property
    def subset(self) -> torch.Tensor:
        """Positions (in target.samples) of the diagnostic subset: clean-correct under the view."""
        if "subset" not in self._cache:
            self._select()
        if len(self._cache["subset"]) == 0:
            raise Skip("no clean-correct sample to diagnose")
        return self._cache["subset"]

    @property
    def pool(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(positions, clean-correct flags) of the pool; its clean-correct part is a prefix of the subset."""
        if "pool" not in self._cache:
            self._select()
        return self._cache["pool"], self._cache["pool_correct"]

    def survived(
        self,
        eps: float,
        steps: int = PGD_STEPS,
        restarts: int = 1,
        random_start: bool = True,
        alpha: float | None = None,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Per point of the subset (or `positions`): still correctly classified after this PGD run.

        Every run on the same points uses the same generator seed, so PGD-20 is a prefix of
        PGD-40 and the first restart of PGD-20 x 5 (paired comparisons, no random-start noise);
        a different eps scales the same random start.
        """
        positions = self.subset if positions is None else positions
        alpha = eps / 4 if alpha is None else alpha
        key = ("pgd", eps, steps, restarts, random_start, alpha, tuple(positions.tolist()))
        if key not in self._cache:
            view = self.require_view()
            x, y = self.images(positions), self.labels(positions)
            adversarial = []
            size = self.config.batch_size
            for start in range(0, len(x), size):
                generator = torch.Generator().manual_seed(self.seed(f"pgd|{start}"))
                with self.model_rng(f"pgd|{start}"):
                    adversarial.append(pgd_attack(
                        view, x[start : start + size], y[start : start + size], eps=eps, alpha=alpha,
                        steps=steps, restarts=restarts, random_start=random_start, generator=generator,
                    ))
            x_adv = torch.cat(adversarial)
            self._cache[key] = (self.predict(x_adv, "pgd-rescore") == y).cpu()
        return self._cache[key]


# == stored checks (outcomes of the evaluation's own attacks) ====================================
def _not(value: bool | None) -> bool | None:
    return None if value is None else not value


def _all(values: list[bool | None]) -> bool | None:
    if any(v is False for v in values):
        return False
    return True if all(v is True for v in values) else None


def _any(values: list[bool | None]) -> bool | None:
    if any(v is True for v in values):
        return True
    return False if all(v is False for v in values) else None


def _bounds(inputs: CheckInputs, event: Callable[[int], bool | None]) -> tuple[int, int]:
    """(samples where the event is certainly true, samples where it possibly is) over the clean-correct ones."""
    values = [event(sid) for sid in inputs.clean_correct]
    certain = sum(1 for v in values if v is True)
    return certain, certain + sum(1 for v in values if v is None)


def _bounded_verdict(
    name: str, inputs: CheckInputs, event: Callable[[int], bool | None], threshold: float, detail: dict
) -> CheckResult:
    """Fail when the certain count exceeds threshold*n, pass when the possible count does not, else skip."""
    n = inputs.n
    low, high = _bounds(inputs, event)
    detail = {**detail, "certain": low, "possible": high, "n": n, "upper_bound": _fraction(high, n)}
    if _fraction(low, n) > threshold:
        verdict = FAIL
    elif _fraction(high, n) <= threshold:
        verdict = PASS
    else:
        verdict = SKIPPED
        detail["reason"] = (
            "inconclusive: samples broken before the later attacks ran were not attacked again; "
            "run the attacks in the order the check needs (see detail 'order')"
        )
    return CheckResult(name, verdict, _fraction(low, n), threshold, detail)


def _missed_by_white_box(name: str, inputs: CheckInputs, plugins: Callable[[str], bool], threshold: float) -> CheckResult:
    """Attacks selected by `plugins` breaking samples that every white-box attack survived."""
    suspects = inputs.specs(lambda a: plugins(a["plugin"]))
    white = inputs.specs(lambda a: a["plugin"] in WHITE_BOX)
    if not suspects:
        raise Skip("no attack of this kind ran in the evaluation")
    if not white:
        raise Skip("no white-box attack ran in the evaluation")

    def event(sid: int) -> bool | None:
        broken = _any([inputs.broke(s)[sid] for s in suspects])
        missed = _all([_not(inputs.broke(w)[sid]) for w in white])
        return _all([broken, missed])

    detail = {"attacks": suspects, "white_box": white, "order": "these attacks after the white-box attacks"}
    return _bounded_verdict(name, inputs, event, threshold, detail)


def check_square(inputs: CheckInputs) -> CheckResult:
    """S8 black-box beats white-box: `square` breaks > 0.2 pp of n that no white-box attack broke
    (AutoAttack's check_square_sr). Gradients are masked: white-box attacks miss what a query attack finds."""
    return _missed_by_white_box("square_beats_whitebox", inputs, lambda p: p == "square", SQUARE_EXTRA)


def check_transfer(inputs: CheckInputs) -> CheckResult:
    """S9 transfer beats white-box: `transfer` attacks break > 0.5 pp of n the white-box attacks missed."""
    return _missed_by_white_box("transfer_beats_whitebox", inputs, lambda p: p.startswith("transfer"), TRANSFER_EXTRA)


def check_noise(inputs: CheckInputs) -> CheckResult:
    """S10 noise beats white-box: random points of the eps-ball (`noise`) break > 0.5 pp of n the white-box attacks missed."""
    return _missed_by_white_box("noise_beats_whitebox", inputs, lambda p: p.startswith("noise"), NOISE_EXTRA)


def _pair(name: str, inputs: CheckInputs, weak: list[str], strong: list[str], threshold: float, order: str) -> CheckResult:
    """Samples that a `strong` attack broke and the `weak` one survived, worst pair (each pair bounded)."""
    results = []
    for w in weak:
        for s in strong:
            event = (lambda w, s: lambda sid: _all([inputs.broke(s)[sid], _not(inputs.broke(w)[sid])]))(w, s)
            results.append(_bounded_verdict(name, inputs, event, threshold, {"weak": w, "strong": s, "order": order}))
    worst = max(results, key=lambda r: (r.verdict == FAIL, r.verdict == SKIPPED, r.figure))
    if len(results) > 1:
        worst = CheckResult(name, worst.verdict, worst.figure, threshold, {**worst.detail, "pairs": len(results)})
    return worst


def _is_pgd_ce(attack: dict) -> bool:
    return attack["plugin"] == "pgd" and attack["params"].get("loss", "ce") == "ce"


def check_cw_vs_pgd(inputs: CheckInputs) -> CheckResult:
    """S11 loss consistency: CW-margin accuracy above PGD-CE accuracy by > 3 pp of n, measured as the
    samples PGD-CE broke and CW survived. A loss-specific gradient masking (e.g. saturated margins)."""
    cw = inputs.specs(lambda a: a["plugin"] == "cw")
    pgd = inputs.specs(_is_pgd_ce)
    if not cw or not pgd:
        raise Skip("needs both a 'cw' and a PGD-CE ('pgd', loss=ce) attack")
    return _pair("cw_vs_pgd", inputs, cw, pgd, CW_OVER_PGD, "cw before pgd")


def check_pgd_vs_aa(inputs: CheckInputs) -> CheckResult:
    """S12 PGD vs AutoAttack: PGD accuracy above AA's by > 5 pp of n, measured as the samples AA
    broke and PGD survived: PGD alone would overstate robustness."""
    aa = inputs.specs(lambda a: a["plugin"] == "aa")
    pgd = inputs.specs(_is_pgd_ce)
    if not aa or not pgd:
        raise Skip("needs both a PGD-CE ('pgd') and an AutoAttack ('aa') attack")
    return _pair("pgd_vs_aa", inputs, pgd, aa, PGD_OVER_AA, "aa after pgd")


def check_stochastic_eot(inputs: CheckInputs) -> CheckResult:
    """Stochastic defense without EOT: the protocol declares a stochastic defense and no attack used eot > 1."""
    stochastic = bool(inputs.target.protocol.get("stochastic_defense", False))
    detail = {"stochastic_defense": stochastic, "max_eot": inputs.max_eot}
    verdict = FAIL if stochastic and inputs.max_eot <= 1 else PASS
    if verdict == FAIL:
        detail["reason"] = "stochastic defense evaluated without EOT: add an EOT attack, e.g. pgd:eot=30"
    return CheckResult("stochastic_without_eot", verdict, float(inputs.max_eot), 1.0, detail)


# == diagnostic checks (own computations on the subset) ==========================================
def check_attack_above_clean(inputs: CheckInputs) -> CheckResult:
    """S1 attack above clean: FGSM's or PGD-20's accuracy on the pool (clean-wrong samples included)
    exceeds the clean accuracy on the same samples. An attack that makes the model more accurate is broken."""
    pool, pool_correct = inputs.pool
    if len(pool) == 0:
        raise Skip("no samples")
    subset = inputs.subset
    k = int(pool_correct.sum())
    wrong = pool[~pool_correct]
    clean_acc = _fraction(k, len(pool))
    accuracies = {}
    for label, steps, random_start, alpha in (("fgsm", 1, False, inputs.eps), ("pgd20", PGD_STEPS, True, None)):
        right = int(inputs.survived(inputs.eps, steps, 1, random_start, alpha, subset)[:k].sum())
        if len(wrong):
            right += int(inputs.survived(inputs.eps, steps, 1, random_start, alpha, wrong).sum())
        accuracies[label] = _fraction(right, len(pool))
    figure = max(accuracies.values()) - clean_acc
    detail = {"points": len(pool), "clean": clean_acc, "accuracy": accuracies}
    return CheckResult("attack_above_clean", FAIL if figure > 0 else PASS, figure, 0.0, detail)


def check_pgd_above_fgsm(inputs: CheckInputs) -> CheckResult:
    """S2 iterative vs single-step: PGD-20 accuracy above FGSM's by more than max(0.5 pp, Wilson CI)."""
    m = len(inputs.subset)
    fgsm = int(inputs.survived(inputs.eps, 1, 1, False, inputs.eps).sum())
    pgd = int(inputs.survived(inputs.eps).sum())
    tolerance = max(MIN_TOLERANCE, _half_width(fgsm, m), _half_width(pgd, m))
    figure = _fraction(pgd - fgsm, m)
    detail = {"points": m, "fgsm": _fraction(fgsm, m), "pgd20": _fraction(pgd, m)}
    return CheckResult("pgd_above_fgsm", FAIL if figure > tolerance else PASS, figure, tolerance, detail)


def check_more_steps(inputs: CheckInputs) -> CheckResult:
    """S3 convergence in steps: doubling PGD-20 to PGD-40 (same start) lowers accuracy by >= 1 pp
    ("not converged"), or raises it by more than max(0.5 pp, CI) (more steps doing worse)."""
    m = len(inputs.subset)
    k20 = int(inputs.survived(inputs.eps).sum())
    k40 = int(inputs.survived(inputs.eps, DOUBLED_STEPS).sum())
    drop = _fraction(k20 - k40, m)
    rise_tolerance = max(MIN_TOLERANCE, _half_width(k20, m))
    detail = {"points": m, "pgd20": _fraction(k20, m), "pgd40": _fraction(k40, m)}
    if drop >= CONVERGENCE_DROP and k20 - k40 >= CONVERGENCE_POINTS:
        detail["reason"] = "not converged: evaluate with more steps"
    elif -drop > rise_tolerance:
        detail["reason"] = "more steps gave higher accuracy: unstable loss surface"
    verdict = FAIL if "reason" in detail else PASS
    return CheckResult("more_steps", verdict, drop, CONVERGENCE_DROP, detail)


def check_restarts(inputs: CheckInputs) -> CheckResult:
    """S4 convergence in restarts: PGD-20 with 5 restarts lowers accuracy by >= 1 pp against 1 restart."""
    m = len(inputs.subset)
    k1 = int(inputs.survived(inputs.eps).sum())
    k5 = int(inputs.survived(inputs.eps, PGD_STEPS, RESTARTS).sum())
    drop = _fraction(k1 - k5, m)
    detail = {"points": m, "restarts_1": _fraction(k1, m), f"restarts_{RESTARTS}": _fraction(k5, m)}
    if drop >= CONVERGENCE_DROP and k1 - k5 >= CONVERGENCE_POINTS:
        detail["reason"] = "not converged: evaluate with restarts"
    return CheckResult("restarts", FAIL if "reason" in detail else PASS, drop, CONVERGENCE_DROP, detail)


def _sweep(inputs: CheckInputs, extra: tuple[Fraction, ...] = ()) -> tuple[list[int], list[int]]:
    """PGD-20 survivors per sweep eps (plus `extra`, larger ones): (raw counts, counts with breaks
    propagated to larger eps)."""
    survived = [inputs.survived(float(eps)) for eps in (*SWEEP_EPS, *extra)]
    raw = [int(s.sum()) for s in survived]
    alive = torch.ones_like(survived[0])
    envelope = []
    for s in survived:
        alive = alive & s  # a sample broken at eps is broken at every larger eps
        envelope.append(int(alive.sum()))
    return raw, envelope


def check_eps_monotone(inputs: CheckInputs) -> CheckResult:
    """S5 eps sweep {1..64}/255: the raw PGD-20 accuracy must not rise with eps by more than max(0.5 pp, CI)."""
    m = len(inputs.subset)
    raw, envelope = _sweep(inputs)
    worst, worst_tolerance, excess = 0.0, MIN_TOLERANCE, float("-inf")
    for j in range(len(raw)):
        for i in range(j):
            rise = _fraction(raw[j] - raw[i], m)
            tolerance = max(MIN_TOLERANCE, _half_width(raw[i], m))
            if rise - tolerance > excess:
                worst, worst_tolerance, excess = rise, tolerance, rise - tolerance
    detail = {
        "points": m,
        "eps": [str(e) for e in SWEEP_EPS],
        "raw": [_fraction(k, m) for k in raw],
        "envelope": [_fraction(k, m) for k in envelope],
    }
    return CheckResult("eps_monotone", FAIL if excess > 0 else PASS, worst, worst_tolerance, detail)


def check_large_eps(inputs: CheckInputs) -> CheckResult:
    """S6 large eps: more than 1% of the subset survives PGD-20 at 64/255 (breaks propagated from
    smaller eps), with confidence: the Wilson interval's lower bound must exceed 1% to fail, since
    on a subset of ~100 samples one survivor is already 1%."""
    m = len(inputs.subset)
    large = min(Fraction(1), max(SWEEP_EPS[-1], LARGE_EPS_FACTOR * Fraction(inputs.eps).limit_denominator(255 * 255)))
    _, envelope = _sweep(inputs, (large,) if large > SWEEP_EPS[-1] else ())
    figure = _fraction(envelope[-1], m)
    lower = Proportion(envelope[-1], m).interval[0]
    detail = {"points": m, "eps": str(large), "survivors": envelope[-1], "lower_bound": lower}
    if lower > LARGE_EPS_ACCURACY:
        detail["reason"] = f"large-eps failure: at {large} adversarial examples must exist, yet PGD finds none"
    return CheckResult("large_eps", FAIL if lower > LARGE_EPS_ACCURACY else PASS, figure, LARGE_EPS_ACCURACY, detail)


def check_unbounded(inputs: CheckInputs) -> CheckResult:
    """S7 unbounded attack: PGD-50 with eps = 1 from the clean image (then, on survivors, from a random
    start) must break every clean-correct sample of a non-constant model."""
    pool, _ = inputs.pool
    if len(torch.unique(inputs.predict(inputs.images(pool), "constant"))) < 2:
        raise Skip("the model predicts one class on every pool sample (constant model)")
    subset = inputs.subset
    alive = inputs.survived(1.0, UNBOUNDED_STEPS, 1, False, UNBOUNDED_ALPHA).clone()
    if alive.any():
        retry = inputs.survived(1.0, UNBOUNDED_STEPS, 2, True, UNBOUNDED_ALPHA, subset[alive])
        alive[alive.clone()] = retry
    figure = _fraction(int(alive.sum()), len(subset))
    detail = {"points": len(subset), "survivors": int(alive.sum())}
    if figure > 0:
        detail["reason"] = "unconstrained attack failure: gradients do not lead anywhere"
    return CheckResult("unbounded", FAIL if figure > 0 else PASS, figure, 0.0, detail)


def _dlr(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Difference of logits ratio (Croce & Hein 2020), per example; needs >= 3 classes."""
    ordered = logits.sort(1, descending=True).values
    true = logits.gather(1, labels[:, None]).squeeze(1)
    others = logits.masked_fill(F.one_hot(labels, logits.shape[1]).bool(), float("-inf")).amax(1)
    return -(true - others) / (ordered[:, 0] - ordered[:, 2] + 1e-12)


def check_zero_gradients(inputs: CheckInputs) -> CheckResult:
    """S13 zero or NaN input gradients: the fraction of subset samples whose ||grad_x CE||_1 and
    ||grad_x DLR||_1 are both 0 (CE alone when there are fewer than 3 classes), or whose gradient
    holds NaN, at the clean image; any -> unreliable gradients. Both counts are in the detail."""
    view = inputs.require_view()
    positions = inputs.subset
    losses: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {"ce": cross_entropy}
    bad = torch.zeros(len(positions), dtype=torch.bool)
    counts: dict[str, int] = {}
    size = inputs.config.batch_size
    for start in range(0, len(positions), size):
        x, y = inputs.images(positions[start : start + size]), inputs.labels(positions[start : start + size])
        # CE's gradient also vanishes where softmax saturates (p_y = 1 in float32), which is not
        # masking; a point counts only if the scale-free DLR gradient vanishes as well.
        all_zero = torch.ones(len(x), dtype=torch.bool)
        for name in ("ce", "dlr"):
            x_var = x.clone().requires_grad_(True)
            with torch.enable_grad(), inputs.model_rng(f"gradient|{name}|{start}"):
                logits = view(x_var)
                if name == "dlr" and logits.shape[1] < 3:
                    continue
                loss = (losses.get(name) or _dlr)(logits, y)
                gradient = torch.autograd.grad(loss.sum(), x_var, allow_unused=True)[0]
            if gradient is None:
                gradient = torch.zeros_like(x_var)
            gradient = gradient.flatten(1)
            zero = (gradient.abs().sum(1) == 0).cpu()
            nan = torch.isnan(gradient).any(1).cpu()
            counts[f"{name}_zero"] = counts.get(f"{name}_zero", 0) + int(zero.sum())
            counts[f"{name}_nan"] = counts.get(f"{name}_nan", 0) + int(nan.sum())
            all_zero &= zero
            bad[start : start + size] |= nan
        bad[start : start + size] |= all_zero
    figure = _fraction(int(bad.sum()), len(positions))
    detail = {"points": len(positions), **counts}
    if figure > 0:
        detail["reason"] = "unreliable gradients: use BPDA, a margin loss or black-box attacks"
    return CheckResult("zero_gradients", FAIL if figure > 0 else PASS, figure, 0.0, detail)


def _batched(view: nn.Module, x: torch.Tensor, size: int) -> torch.Tensor:
    return torch.cat([view(x[start : start + size]) for start in range(0, len(x), size)])


def _measure_randomness(inputs: CheckInputs) -> dict:
    """Five forward passes of the subset (one seed, then the model's own draws)."""
    if "randomness" not in inputs._cache:
        view = inputs.require_view()
        x, y = inputs.images(inputs.subset), inputs.labels(inputs.subset)
        outputs = []
        with torch.no_grad(), inputs.model_rng("randomness"):
            for _ in range(RANDOMNESS_PASSES):
                outputs.append(_batched(view, x, inputs.config.batch_size))
        normalized = [F.normalize(o.flatten(1), dim=1) for o in outputs]
        distance = max(
            float((a - b).norm(dim=1).max()) for i, a in enumerate(normalized) for b in normalized[i + 1 :]
        )
        correct = [int((o.argmax(1) == y).sum()) for o in outputs]
        inputs._cache["randomness"] = {"distance": distance, "correct": correct}
    return inputs._cache["randomness"]


def _stochastic(inputs: CheckInputs) -> bool:
    measured = _measure_randomness(inputs)
    return measured["distance"] > LOGIT_TOLERANCE or len(set(measured["correct"])) > 1


def check_randomness(inputs: CheckInputs) -> CheckResult:
    """S14 determinism: over 5 forward passes, the normalized-logit l2 distance exceeds 1e-4 or the
    number of correct predictions changes (AutoAttack's check_randomized). A stochastic model fails
    unless an attack of the evaluation used EOT (eot > 1)."""
    measured = _measure_randomness(inputs)
    stochastic = _stochastic(inputs)
    detail = {**measured, "points": len(inputs.subset), "stochastic": stochastic, "max_eot": inputs.max_eot}
    verdict = PASS
    if stochastic and inputs.max_eot <= 1:
        verdict = FAIL
        detail["reason"] = "stochastic model: evaluate with EOT (e.g. pgd:eot=30)"
    return CheckResult("randomness", verdict, measured["distance"], LOGIT_TOLERANCE, detail)


def check_batch_independence(inputs: CheckInputs) -> CheckResult:
    """S15 batch independence: per-example logits at batch size 1 and at the full batch differ by more
    than 1e-4 * max|z| (e.g. BatchNorm using batch statistics). Skipped for stochastic models."""
    if inputs.target.protocol.get("stochastic_defense") or _stochastic(inputs):
        raise Skip("stochastic model: logits differ between passes regardless of the batch")
    view = inputs.require_view()
    x = inputs.images(inputs.subset)
    with torch.no_grad(), inputs.model_rng("batch"):
        full = _batched(view, x, inputs.config.batch_size)
        single = torch.cat([view(x[i : i + 1]) for i in range(len(x))])
    scale = float(full.abs().max())
    figure = float((full - single).abs().max()) / scale if scale > 0 else 0.0
    detail = {"points": len(x), "batch_size": min(len(x), inputs.config.batch_size), "max_abs_logit": scale}
    return CheckResult("batch_independence", FAIL if figure > LOGIT_TOLERANCE else PASS, figure, LOGIT_TOLERANCE, detail)


def _required_arguments(model: nn.Module) -> list[str]:
    """Names of the arguments of `model.forward` beyond the input that have no default."""
    try:
        parameters = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return []
    required = [
        p.name for p in parameters
        if p.default is inspect.Parameter.empty
        and p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    ]
    return required[1:]


def check_label_independence(inputs: CheckInputs) -> CheckResult:
    """S16 label independence. Labels cannot reach the model through the view (it passes inputs only),
    so this checks what can still go wrong: (a) a forward that requires a second argument (e.g.
    forward(x, y)) cannot be evaluated label-free; (b) a Classifier must refuse `model.labels(y)` in
    eval mode; (c) its defense modules must give the same logits when the defense context holds
    the true or shifted labels (set directly, bypassing the guard, to probe them)."""
    model = inputs.target.model
    detail: dict[str, Any] = {}
    extra = _required_arguments(model)
    if extra:
        detail.update(required_arguments=extra, reason="model forward requires labels (or another argument)")
        return CheckResult("label_independence", FAIL, 1.0, 0.0, detail)
    view = inputs.require_view()
    x, y = inputs.images(inputs.subset), inputs.labels(inputs.subset)
    try:
        with torch.no_grad(), inputs.model_rng("labels"):
            reference = view(x)
    except TypeError as error:
        detail.update(error=str(error), reason="model forward cannot run on inputs alone")
        return CheckResult("label_independence", FAIL, 1.0, 0.0, detail)
    if callable(getattr(model, "labels", None)):
        try:
            with model.labels(y):
                pass
        except RuntimeError:
            detail["labels_refused_in_eval"] = True
        else:
            detail.update(labels_refused_in_eval=False, reason="model accepts labels in eval mode")
            return CheckResult("label_independence", FAIL, 1.0, 0.0, detail)
    context = getattr(model, "context", None)
    figure = 0.0
    if context is not None and hasattr(context, "labels"):
        num_classes = reference.shape[1]
        scale = float(reference.abs().max()) or 1.0
        saved = context.labels
        try:
            for name, labels in (("true", y), ("shifted", (y + 1) % num_classes)):
                context.labels = labels
                with torch.no_grad(), inputs.model_rng("labels"):
                    logits = view(x)
                figure = max(figure, float((logits - reference).abs().max()) / scale)
        finally:
            context.labels = saved
        detail["probed_defense_context"] = True
    else:
        detail["probed_defense_context"] = False  # a plain module: only its signature can be checked
    if figure > LOGIT_TOLERANCE:
        detail["reason"] = "logits depend on the labels held by the defense context in eval mode"
    return CheckResult("label_independence", FAIL if figure > LOGIT_TOLERANCE else PASS, figure, LOGIT_TOLERANCE, detail)


def check_eval_mode(inputs: CheckInputs) -> CheckResult:
    """S17 mode hygiene: after forward passes in eval mode, no module is in training mode (a forward
    that toggles train(), as in CAS's released code, would score with batch statistics or dropout)."""
    view = inputs.require_view()
    with torch.no_grad(), inputs.model_rng("mode"):
        view(inputs.images(inputs.subset))
    training = [name or "<model>" for name, module in inputs.target.model.named_modules() if module.training]
    detail = {"training_modules": training[:20]}
    if training:
        detail["reason"] = "modules in training mode during evaluation"
    return CheckResult("eval_mode", FAIL if training else PASS, float(len(training)), 0.0, detail)


# == the table ====================================================================================
@dataclass(frozen=True)
class Check:
    name: str
    ref: str  # id in evaluation-rigor.md §3.6
    kind: str  # "stored" or "diagnostic"
    function: Callable[[CheckInputs], CheckResult]


CHECKS: list[Check] = [
    Check("stochastic_without_eot", "§3.6 S14 / EOT", "stored", check_stochastic_eot),
    Check("square_beats_whitebox", "S8", "stored", check_square),
    Check("transfer_beats_whitebox", "S9", "stored", check_transfer),
    Check("noise_beats_whitebox", "S10", "stored", check_noise),
    Check("cw_vs_pgd", "S11", "stored", check_cw_vs_pgd),
    Check("pgd_vs_aa", "S12", "stored", check_pgd_vs_aa),
    Check("label_independence", "S16", "diagnostic", check_label_independence),
    Check("eval_mode", "S17", "diagnostic", check_eval_mode),
    Check("randomness", "S14", "diagnostic", check_randomness),
    Check("batch_independence", "S15", "diagnostic", check_batch_independence),
    Check("zero_gradients", "S13", "diagnostic", check_zero_gradients),
    Check("attack_above_clean", "S1", "diagnostic", check_attack_above_clean),
    Check("pgd_above_fgsm", "S2", "diagnostic", check_pgd_above_fgsm),
    Check("more_steps", "S3", "diagnostic", check_more_steps),
    Check("restarts", "S4", "diagnostic", check_restarts),
    Check("eps_monotone", "S5", "diagnostic", check_eps_monotone),
    Check("large_eps", "S6", "diagnostic", check_large_eps),
    Check("unbounded", "S7", "diagnostic", check_unbounded),
]
CHECK_NAMES = [c.name for c in CHECKS]


def _run_one(check: Check, inputs: CheckInputs) -> CheckResult:
    try:
        result = check.function(inputs)
    except Skip as reason:
        result = CheckResult(check.name, SKIPPED, None, None, {"reason": str(reason)})
    except Exception as error:  # a model the diagnostics cannot run; the verdict says why
        result = CheckResult(
            check.name, SKIPPED, None, None,
            {"reason": "the check could not run", "error": f"{type(error).__name__}: {error}"},
        )
    figure = None if result.figure is None or not math.isfinite(result.figure) else float(result.figure)
    return CheckResult(check.name, result.verdict, figure, result.threshold, {"ref": check.ref, **result.detail})


@contextmanager
def _held_view(target: EvaluationTarget) -> Iterator[nn.Module]:
    """The target's view when the caller holds the model in eval mode, else one for this block."""
    if target.view is not None:
        yield target.view
    else:
        with eval_mode(target.model) as view:
            yield view


def run_checks(
    store: Store,
    eval_id: int,
    target: EvaluationTarget,
    config: EvalConfig,
    reporter: Reporter | None = None,
    n_check: int = 100,
    names: list[str] | None = None,
) -> list[CheckResult]:
    """Run every check (or those in `names`) on one evaluation, record each in the store, return them."""
    if n_check < 1:
        raise ValueError(f"n_check must be at least 1, got {n_check}")
    unknown = set(names or []) - set(CHECK_NAMES)
    if unknown:
        raise ValueError(f"unknown checks {sorted(unknown)}; valid: {', '.join(CHECK_NAMES)}")
    reporter = reporter or SilentReporter()
    selected = [c for c in CHECKS if names is None or c.name in names]
    inputs = CheckInputs(store, eval_id, target, config, n_check)
    results: list[CheckResult] = []
    run_id = target.run.get("run_id", "?")
    with preserved_rng(target.device), _held_view(target) as view, reporter.task(f"{run_id}: checks", len(selected)) as task:
        inputs.view = view
        for check in selected:
            result = _run_one(check, inputs)
            store.record_check(eval_id, result.name, result.verdict, result.figure, result.threshold, result.detail)
            results.append(result)
            task.advance(1, status=f"{check.name}: {result.verdict}")
    return results
