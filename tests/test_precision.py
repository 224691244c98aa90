"""`--amp`: attacks under autocast, refused when an fp32 rerun shows low precision overstating robustness.

CPU runs bf16 autocast, so the whole path (autocast, the cross-check, the stored verdict, the
refusal) is exercised here as it runs on CUDA.
"""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch
from torch import nn

import advdef.evaluation.engine as engine
from advdef.errors import UserError
from advdef.evaluation import precision
from advdef.evaluation.engine import EvalConfig, evaluate_run, protocol_key
from advdef.evaluation.stats import wilson_interval
from advdef.evaluation.summary import summarize
from advdef.pipeline import pending_runs
from advdef.report import comparison_tables
from advdef.store import Store

EPS = Fraction(32, 255)  # large, so fp32 FGSM breaks most of the standard model's samples
N = 40


def test_amp_options_are_validated_with_the_valid_values():
    assert precision.check_amp("off") == "off" and precision.check_amp("bf16", 10) == "bf16"
    with pytest.raises(UserError, match="unknown --amp 'fp8'; valid: off, bf16, fp16"):
        precision.check_amp("fp8")
    with pytest.raises(UserError, match="--amp-check-n must be a whole number >= 1"):
        precision.check_amp("bf16", 0)
    with pytest.raises(UserError, match="--amp"):
        evaluate_run(Store(memory=True), "no-such-run", EvalConfig(amp="half", device="cpu"))


def test_autocast_lowers_the_model_only_and_logits_stay_float32():
    from advdef.attacks.base import LogitsView

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 5)).eval()
    x = torch.rand(2, 3, 8, 8)
    with precision.autocast("bf16", torch.device("cpu")):
        assert model[0](x).dtype == torch.bfloat16
        assert LogitsView(model)(x).dtype == torch.float32
    with precision.autocast("off", torch.device("cpu")):
        assert model[0](x).dtype == torch.float32
    assert precision.precision_name("off") == "fp32" and precision.precision_name("fp16") == "fp16"


def _fresh(store: Store, run_id: str) -> Store:
    other = Store(memory=True)
    other.insert_run(store.get_run(run_id))
    return other


def _config(**options) -> EvalConfig:
    return EvalConfig(**{"attacks": ["fgsm"], "eps": EPS, "n": N, "device": "cpu", "checks": False, "amp": "bf16",
                         "amp_check_n": 30, **options})


def _check(store: Store, eval_id: int) -> dict:
    [check] = [c for c in store.checks(eval_id) if c["name"] == precision.CHECK_NAME]
    return check


def test_bf16_evaluation_passes_the_cross_check_and_is_its_own_evaluation(eval_store):
    store, runs = eval_store
    fresh = _fresh(store, runs["standard"])
    fp32 = evaluate_run(fresh, runs["standard"], _config(amp="off"))
    assert pending_runs(fresh, _config()) == [runs["standard"]], "fp32 outcomes do not finish a bf16 evaluation"
    low = evaluate_run(fresh, runs["standard"], _config())
    assert pending_runs(fresh, _config()) == [] and pending_runs(fresh, _config(amp="off")) == []
    tables = comparison_tables(fresh)
    assert sorted(t.protocol["precision"] for t in tables) == ["bf16", "fp32"], "never pooled as seeds of one row"
    assert low != fp32, "low-precision outcomes never join an fp32 evaluation"
    protocols = {e["eval_id"]: e["protocol"] for e in fresh.evaluations()}
    assert protocols[fp32]["precision"] == "fp32" and protocols[low]["precision"] == "bf16"
    assert protocol_key(protocols[fp32]) == protocol_key({**protocols[fp32], "precision": "fp32", "batch_size": 1})
    assert fresh.checks(fp32) == [], "no cross-check without --amp"

    check = _check(fresh, low)
    detail = check["detail"]
    assert check["verdict"] == "pass" and detail["samples"] == 30 and detail["attacks"] == ["fgsm"]
    low_k, fp32_k = detail["robust_low_precision"], detail["robust_fp32"]
    lower, upper = wilson_interval(fp32_k, 30)
    assert check["figure"] == pytest.approx((low_k - fp32_k) / 30)
    assert check["threshold"] == pytest.approx((upper - lower) / 2)
    assert fp32_k < 30, "the fp32 attack breaks samples, so the comparison means something"


class MaskedInLowPrecision(nn.Module):
    """A model whose low-precision path hides its input gradient (as fp16 underflow can): under
    autocast every gradient attack sees a zero gradient, while fp32 attacks work normally."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_autocast_enabled(x.device.type):
            x = x * 0 + x.detach()
        return self.model(x)


def test_low_precision_that_looks_more_robust_is_refused_and_marked_unreliable(eval_store, monkeypatch):
    store, runs = eval_store
    real_load = engine.load_run_model

    def load(*args, **kwargs):
        built, card = real_load(*args, **kwargs)
        built.model = MaskedInLowPrecision(built.model)
        return built, card

    monkeypatch.setattr(engine, "load_run_model", load)
    fresh = _fresh(store, runs["standard"])
    with pytest.raises(UserError, match="--amp bf16 overstates robustness") as error:
        evaluate_run(fresh, runs["standard"], _config())
    assert "rerun without --amp" in str(error.value) and "\n" not in str(error.value)

    [evaluation] = fresh.evaluations()
    check = _check(fresh, evaluation["eval_id"])
    assert check["verdict"] == "fail" and check["figure"] > check["threshold"]
    assert check["detail"]["robust_low_precision"] > check["detail"]["robust_fp32"]
    summary = summarize(fresh, evaluation["eval_id"])
    assert summary.reliable is False and [c["name"] for c in summary.failed_checks] == [precision.CHECK_NAME]

    # Running the same command again reuses the stored verdict (and refuses again) without rerunning fp32.
    monkeypatch.setattr(precision, "_fp32_robust", lambda *a, **k: pytest.fail("recomputed the cross-check"))
    with pytest.raises(UserError, match="overstates robustness"):
        evaluate_run(fresh, runs["standard"], _config())

    # The fp32 evaluation the error asks for is a separate evaluation, unaffected by the failed one.
    fp32 = evaluate_run(fresh, runs["standard"], _config(amp="off"))
    assert fp32 != evaluation["eval_id"] and fresh.checks(fp32) == []
