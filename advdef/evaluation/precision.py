"""Mixed precision for evaluation (`--amp bf16|fp16`), guarded by an automatic fp32 cross-check.

Low precision can only be trusted if it does not weaken the attacks. fp16 gradients underflow
to zero, bf16 keeps 8 bits of mantissa, and a loss surface that is fine in fp32 can be flat or
noisy in either. A weaker attack overstates robustness, which is the one error advdef must not
make. So:

- With `--amp`, the clean pass and every attack (their forwards, and the re-scoring of their
  outputs) run under `torch.autocast` in that dtype. The view still hands attacks float32 logits.
  The protocol card records the precision, and a low-precision evaluation is a separate
  evaluation (its protocol key includes the precision), never mixed with fp32 outcomes.
- After the attacks, the **AMP cross-check** (`amp_cross_check`) reruns the same attacks, in the
  same order and with the same skipping of broken samples, in fp32 on a seeded subset: the first
  `amp_check_n` (default 200) of a permutation of the evaluation's samples seeded by the
  evaluation seed. It compares the subset's robust accuracy (clean-correct and broken by no
  attack) from the stored low-precision outcomes with the fp32 one.
- It fails when the low-precision robust accuracy exceeds the fp32 one by more than the
  half-width of the fp32 estimate's 95% Wilson interval. The failure is stored as a failed sanity
  check, so the report marks the evaluation UNRELIABLE, and the command stops with a UserError
  that says to rerun without --amp. A pass is stored with its figures. The verdict is kept: a
  resumed evaluation with the same attacks and subset reuses it instead of recomputing it.
- Figure: (robust low precision - robust fp32) / subset size. Threshold: the half-width.
- The gradient-masking sanity checks (advdef.evaluation.checks) always run in fp32: their
  thresholds (1e-4 relative logit differences, for example) are calibrated for fp32.
"""

from __future__ import annotations

import hashlib
import json
from contextlib import nullcontext
from fractions import Fraction
from typing import TYPE_CHECKING, Any

import torch

from advdef.errors import UserError
from advdef.evaluation.stats import wilson_interval

if TYPE_CHECKING:
    from advdef.evaluation.engine import EvalConfig, EvaluationTarget
    from advdef.progress import Reporter
    from advdef.store import Store

AMP_CHOICES = ("off", "bf16", "fp16")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
CHECK_NAME = "amp_cross_check"
DEFAULT_CHECK_N = 200


def check_amp(amp: object, check_n: object = DEFAULT_CHECK_N, device: torch.device | None = None) -> str:
    """Validate `--amp` (and `--amp-check-n`); bf16 on CUDA needs a GPU that supports it."""
    if amp not in AMP_CHOICES:
        raise UserError(f"unknown --amp '{amp}'; valid: {', '.join(AMP_CHOICES)}")
    if isinstance(check_n, bool) or not isinstance(check_n, int) or check_n < 1:
        raise UserError(f"--amp-check-n must be a whole number >= 1, got {check_n!r}")
    if amp == "bf16" and device is not None and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UserError("--amp bf16 needs a GPU with bfloat16 support; use --amp fp16 or off")
    return str(amp)


def precision_name(amp: str) -> str:
    """The protocol card's `precision`: fp32, or the autocast dtype."""
    return "fp32" if amp == "off" else amp


def autocast(amp: str, device: torch.device) -> Any:
    """Autocast to the chosen dtype on the evaluation's device; a no-op for `off`."""
    if amp == "off":
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=DTYPES[amp])


def cross_check(store: Store, eval_id: int, target: EvaluationTarget, config: EvalConfig,
                reporter: Reporter) -> None:
    """The AMP cross-check (module doc): record pass or fail; raise UserError on fail."""
    if config.amp == "off":
        return
    from advdef.evaluation.engine import CLEAN

    attacks = [a["attack"] for a in store.eval_attacks(eval_id) if a["attack"] != CLEAN and a["status"] == "done"]
    subset = check_subset(len(target.samples), config)
    ids = target.samples.ids[subset].tolist()
    ids_hash = hashlib.sha256(json.dumps(ids).encode()).hexdigest()[:16]
    run_id = target.run["run_id"]
    stored = next((c for c in store.checks(eval_id) if c["name"] == CHECK_NAME), None)
    if stored is not None and stored["detail"].get("attacks") == attacks and stored["detail"].get("sample_hash") == ids_hash:
        verdict, detail = stored["verdict"], stored["detail"]
    else:
        low = _stored_robust(store, eval_id, attacks, ids)
        with reporter.task(f"{run_id}: amp cross-check (fp32)", len(attacks) + 1) as task:
            high = _fp32_robust(target, config, attacks, subset, task)
        m = len(ids)
        k_low, k_fp32 = int(sum(low)), int(high.sum())
        lower, upper = wilson_interval(k_fp32, m)
        half = (upper - lower) / 2
        figure = (k_low - k_fp32) / m
        verdict = "fail" if figure > half else "pass"
        detail = {
            "precision": precision_name(config.amp), "samples": m, "attacks": attacks, "sample_hash": ids_hash,
            "robust_low_precision": k_low, "robust_fp32": k_fp32, "wilson_half_width": half,
            "reason": (f"{precision_name(config.amp)} robust accuracy {k_low}/{m} vs fp32 {k_fp32}/{m}: "
                       "low precision weakens the attacks" if verdict == "fail" else ""),
        }
        store.record_check(eval_id, CHECK_NAME, verdict, figure, half, detail)
    low_acc, fp32_acc, m = detail["robust_low_precision"], detail["robust_fp32"], detail["samples"]
    if verdict == "fail":
        raise UserError(
            f"{run_id}: --amp {config.amp} overstates robustness (robust {low_acc}/{m} in {config.amp} vs {fp32_acc}/{m} "
            f"in fp32 on a seeded subset, beyond the Wilson half-width {detail['wilson_half_width']:.1%}); the evaluation "
            f"is marked unreliable: rerun without --amp, e.g. advdef evaluate --run {run_id} with the same options"
        )
    reporter.message(f"{run_id}: amp cross-check passed ({config.amp} robust {low_acc}/{m}, fp32 {fp32_acc}/{m})")


def check_subset(n: int, config: EvalConfig) -> torch.Tensor:
    """Positions of the cross-check's samples: the first amp_check_n of a seeded permutation, sorted."""
    from advdef.evaluation.engine import batch_seed

    generator = torch.Generator().manual_seed(batch_seed(config.seed, CHECK_NAME, 0))
    chosen = torch.randperm(n, generator=generator)[: min(n, config.amp_check_n)]
    return chosen.sort().values


def _stored_robust(store: Store, eval_id: int, attacks: list[str], ids: list[int]) -> list[bool]:
    """Per sample of `ids`: clean-correct and broken by none of `attacks`, from the stored outcomes."""
    from advdef.evaluation.engine import CLEAN

    clean = {r["sample_id"]: r["robust"] for r in store.outcomes(eval_id, CLEAN)}
    broken: set[int] = set()
    for attack in attacks:
        broken |= {r["sample_id"] for r in store.outcomes(eval_id, attack) if r["robust"] == 0}
    return [clean.get(sid) == 1 and sid not in broken for sid in ids]


def _fp32_robust(target: EvaluationTarget, config: EvalConfig, attacks: list[str], subset: torch.Tensor,
                 task: Any) -> torch.Tensor:
    """The evaluation's procedure in fp32 on `subset`: clean pass, then each attack on the survivors."""
    from advdef.attacks.base import AttackContext, check_budget
    from advdef.device import prepare
    from advdef.evaluation.engine import CLEAN, batch_seed, seeded_model_rng
    from advdef.registry import ATTACKS

    samples, device, size = target.samples, target.device, int(config.batch_size)
    alive = torch.zeros(len(subset), dtype=torch.bool)
    for spec in [CLEAN, *attacks]:
        attack = None
        if spec != CLEAN:
            attack = ATTACKS.create(spec, eps=Fraction(config.eps))
            attack.bind(AttackContext(model=target.model, defense=target.defense, run=target.run, device=device))
        rows = torch.arange(len(subset)) if spec == CLEAN else torch.nonzero(alive).flatten()
        for start in range(0, len(rows), size):
            chunk = rows[start : start + size]
            positions = subset[chunk]
            first = int(samples.ids[positions[0]])
            x = prepare(samples.float_images(positions), device, True)
            y = samples.labels[positions].to(device)
            with seeded_model_rng(config.seed, f"{spec}|{CHECK_NAME}", first):
                if attack is not None:
                    x_adv = attack(target.view, x, y, seed=batch_seed(config.seed, f"{spec}|{CHECK_NAME}", first))
                    check_budget(x, x_adv, float(config.eps))
                else:
                    x_adv = x
                with torch.no_grad():
                    alive[chunk] = (target.view(x_adv).argmax(1) == y).cpu()
        task.advance(1)
    return alive
