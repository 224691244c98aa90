"""Gradient-masking sanity checks: known-answer controls, stored-outcome logic and storage.

Controls (evaluation-rigor.md §6 items 44-47): a PGD-AT model passes every check; input
quantisation (zero gradient almost everywhere) fails the zero-gradient check; a model with active
dropout at eval, and the `randomize` defense, fail the randomness check; a forward that needs
labels, or a defense that reads labels in eval mode, fails the label check.
"""

from __future__ import annotations

import dataclasses
import shutil
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from advdef.evaluation import checks as C
from advdef.evaluation.checks import CHECK_NAMES, CheckResult, reliable, run_checks
from advdef.evaluation.engine import CLEAN, EvalConfig, evaluate_run, load_target
from advdef.store import Store

N_EVAL = 100
N_CHECK = 60
# checks=False: the fixture's evaluation stores outcomes only; each test runs the checks it needs.
CONFIG = EvalConfig(attacks=["fgsm", "pgd20"], n=N_EVAL, device="cpu", batch_size=128, checks=False)
FIGURES: dict[str, dict] = {}  # printed at the end of the module (pytest -s) for the report


def _verdicts(results: list[CheckResult]) -> dict[str, str]:
    return {r.name: r.verdict for r in results}


def _log(control: str, results: list[CheckResult]) -> None:
    FIGURES[control] = {r.name: (r.verdict, None if r.figure is None else round(r.figure, 5)) for r in results}


@pytest.fixture(scope="module")
def evaluated(trained_store, tmp_path_factory):
    """A private store copy with the PGD-AT run evaluated (fgsm, pgd20 on 100 samples) and its target."""
    source_path, runs = trained_store
    source = Store(source_path)
    source.conn.execute("PRAGMA wal_checkpoint(FULL)")
    source.close()
    path = tmp_path_factory.mktemp("checks") / "advdef.sqlite"
    shutil.copy(source_path, path)
    store = Store(path)
    eval_id = evaluate_run(store, runs["pgd_at"], CONFIG)
    target = load_target(store, runs["pgd_at"], CONFIG)
    yield store, eval_id, target, path
    store.close()
    if FIGURES:
        print("\ncheck figures per control:")
        for control, figures in FIGURES.items():
            print(f"  {control}: {figures}")


def _control(store: Store, target, name: str, model: nn.Module, **protocol) -> tuple[int, object]:
    """A separate evaluation (no attacks stored) of `model` on the same samples."""
    eval_id = store.get_or_create_evaluation(
        target.run["run_id"], f"control-{name}", {**target.protocol, **protocol}, target.samples.ids.tolist()
    )
    return eval_id, dataclasses.replace(target, model=model, view=None, protocol={**target.protocol, **protocol})


class Quantized(nn.Module):
    """Input quantisation to 5 levels before the network: zero input gradient almost everywhere."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(torch.round(x * 4) / 4)


class InputDropout(nn.Module):
    """Dropout on the input that stays active in eval mode: a stochastic model."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(F.dropout(x, 0.2, training=True))


class NeedsLabels(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x, y):
        return self.inner(x) + F.one_hot(y, 10).float()


class LabelLeak(nn.Module):
    """A defense module that reads the context's labels whenever they are set (even in eval mode)."""

    def __init__(self, context) -> None:
        super().__init__()
        self.context = context

    def forward(self, x):
        if self.context.labels is not None:
            return x * (1 + 0.01 * self.context.labels.float().view(-1, 1, 1, 1))
        return x


# == known-answer controls =======================================================================
def test_pgd_at_model_passes_every_check(evaluated):
    store, eval_id, target, _ = evaluated
    started = time.perf_counter()
    results = run_checks(store, eval_id, target, CONFIG, n_check=N_CHECK)
    _log(f"pgd_at ({time.perf_counter() - started:.1f} s)", results)
    verdicts = _verdicts(results)
    assert [r.name for r in results] == CHECK_NAMES
    assert reliable(results), {r.name: (r.figure, r.detail) for r in results if r.verdict == "fail"}
    diagnostics = [c.name for c in C.CHECKS if c.kind == "diagnostic"]
    assert all(verdicts[name] == "pass" for name in diagnostics), verdicts
    # Only fgsm and pgd20 ran: the checks needing square, transfer, noise, cw or aa are skipped.
    for name in ("square_beats_whitebox", "transfer_beats_whitebox", "noise_beats_whitebox", "cw_vs_pgd", "pgd_vs_aa"):
        assert verdicts[name] == "skipped"
    assert verdicts["stochastic_without_eot"] == "pass"
    stored = {row["name"]: row for row in store.checks(eval_id)}
    assert set(stored) == set(CHECK_NAMES)
    assert stored["zero_gradients"]["figure"] == 0 and stored["zero_gradients"]["detail"]["ref"] == "S13"


def test_quantized_input_fails_the_zero_gradient_check(evaluated):
    store, _, target, _ = evaluated
    eval_id, control = _control(store, target, "quantized", Quantized(target.model))
    names = ["zero_gradients", "unbounded", "large_eps"]
    results = run_checks(store, eval_id, control, CONFIG, n_check=N_CHECK, names=names)
    _log("quantized", results)
    by_name = {r.name: r for r in results}
    assert by_name["zero_gradients"].verdict == "fail" and by_name["zero_gradients"].figure == 1.0
    # Gradient-free attacks cannot move from the clean image: unbounded and large-eps attacks fail too.
    assert by_name["unbounded"].verdict == "fail" and by_name["large_eps"].verdict == "fail"
    assert not reliable(results)
    assert store.checks(eval_id)[0]["eval_id"] == eval_id


def test_active_dropout_fails_the_randomness_check_unless_eot_was_used(evaluated):
    store, _, target, _ = evaluated
    eval_id, control = _control(store, target, "dropout", InputDropout(target.model))
    names = ["randomness", "batch_independence", "eval_mode"]
    results = {r.name: r for r in run_checks(store, eval_id, control, CONFIG, n_check=N_CHECK, names=names)}
    _log("dropout", list(results.values()))
    assert results["randomness"].verdict == "fail" and results["randomness"].figure > C.LOGIT_TOLERANCE
    assert "EOT" in results["randomness"].detail["reason"]
    assert results["batch_independence"].verdict == "skipped"
    # An EOT attack recorded with the evaluation makes the measured randomness acceptable.
    store.start_attack(eval_id, "pgd:eot=10,steps=20", {"eot": 10})
    again = run_checks(store, eval_id, control, CONFIG, n_check=N_CHECK, names=["randomness"])
    assert again[0].verdict == "pass" and again[0].figure > C.LOGIT_TOLERANCE


def test_randomize_defense_fails_the_randomness_check(evaluated):
    from advdef.models import build_model
    from advdef.registry import DATASETS, DEFENSES

    if not DEFENSES.knows("randomize"):
        pytest.skip("the randomize defense is not registered")
    store, _, target, _ = evaluated
    built = build_model("smallcnn:width=16", DATASETS.create("digits").info, "randomize")
    eval_id, control = _control(store, target, "randomize", built.model, stochastic_defense=True)
    results = {r.name: r for r in run_checks(
        store, eval_id, control, CONFIG, n_check=N_CHECK, names=["randomness", "stochastic_without_eot"]
    )}
    _log("randomize", list(results.values()))
    assert results["randomness"].verdict == "fail"
    assert results["stochastic_without_eot"].verdict == "fail"


def test_forward_that_needs_labels_fails_the_label_check(evaluated):
    store, _, target, _ = evaluated
    eval_id, control = _control(store, target, "labels", NeedsLabels(target.model))
    results = {r.name: r for r in run_checks(store, eval_id, control, CONFIG, n_check=N_CHECK)}
    _log("forward(x, y)", list(results.values()))
    assert results["label_independence"].verdict == "fail"
    assert results["label_independence"].detail["required_arguments"] == ["y"]
    # The other diagnostics cannot run such a model: skipped with the error, never a silent pass.
    assert results["zero_gradients"].verdict == "skipped" and "TypeError" in results["zero_gradients"].detail["error"]


def test_defense_reading_labels_in_eval_mode_fails_the_label_check(evaluated):
    from advdef.models import build_model
    from advdef.registry import DATASETS

    store, _, target, _ = evaluated
    built = build_model("smallcnn:width=16", DATASETS.create("digits").info)
    built.model.load_state_dict(target.model.state_dict())
    built.model.input_tap.attached.append(LabelLeak(built.model.context))
    eval_id, control = _control(store, target, "leak", built.model)
    result = run_checks(store, eval_id, control, CONFIG, n_check=N_CHECK, names=["label_independence"])[0]
    _log("label leak", [result])
    assert result.verdict == "fail" and result.figure > C.LOGIT_TOLERANCE
    assert built.model.context.labels is None, "the probe restores the context"
    # The unmodified classifier refuses labels in eval mode and ignores the context: pass.
    plain = run_checks(store, eval_id, dataclasses.replace(control, model=target.model), CONFIG,
                       n_check=N_CHECK, names=["label_independence"])[0]
    assert plain.verdict == "pass" and plain.detail["labels_refused_in_eval"] and plain.figure == 0


def test_checks_are_reproducible_and_restore_rng_and_mode(evaluated):
    store, eval_id, target, _ = evaluated
    names = ["randomness", "pgd_above_fgsm", "more_steps"]
    target.model.train()
    state = torch.get_rng_state()
    first = run_checks(store, eval_id, target, CONFIG, n_check=30, names=names)
    assert torch.equal(torch.get_rng_state(), state), "the caller's RNG stream is unchanged"
    assert target.model.training, "the caller's train/eval mode is restored"
    target.model.eval()
    second = run_checks(store, eval_id, target, CONFIG, n_check=30, names=names)
    assert first == second


# == stored-outcome checks on crafted evaluations ================================================
def _fake(store: Store, outcomes: dict[str, list], protocol: dict | None = None, details: dict | None = None) -> int:
    if "r" not in store.run_ids():
        store.insert_run({"run_id": "r", "status": "trained", "dataset": "d", "arch": "a", "defense": "none",
                          "at_method": "standard", "seed": 0, "run_dir": "/x", "config": {}, "versions": {}})
    n = len(outcomes[CLEAN])
    card = {"eps": "8/255", "norm": "Linf", "n": n, "sample_hash": "h", "seed": 0, **(protocol or {})}
    eval_id = store.get_or_create_evaluation("r", f"k{len(store.evaluations())}", card, list(range(n)))
    for attack, robust in outcomes.items():
        store.start_attack(eval_id, attack, (details or {}).get(attack, {"eot": 1}))
        store.record_outcomes(eval_id, attack, [(i, 0, r, None) for i, r in enumerate(robust)], 0.0)
        store.finish_attack(eval_id, attack, (details or {}).get(attack, {"eot": 1}))
    return eval_id


class _Target:
    def __init__(self, protocol=None):
        self.protocol = protocol or {}
        self.samples = []
        self.run = {"run_id": "r"}


def _stored(store: Store, eval_id: int, check, protocol=None) -> CheckResult:
    inputs = C.CheckInputs(store, eval_id, _Target(protocol), EvalConfig(), n_check=10)
    return C._run_one(next(c for c in C.CHECKS if c.function is check), inputs)


PGD = "pgd:alpha=2/255,kappa=0.0,loss=ce,random_start=true,restarts=1,steps=20"
SQUARE = "square:queries=100"


def test_square_breaking_points_white_box_missed_fails():
    store = Store(memory=True)
    # 1000 samples; pgd20 breaks 0-99; square (run after it) breaks 5 survivors: 0.5 pp > 0.2 pp.
    n = 1000
    pgd = [0 if i < 100 else 1 for i in range(n)]
    square = [None if i < 100 else (0 if i < 105 else 1) for i in range(n)]
    result = _stored(store, _fake(store, {CLEAN: [1] * n, PGD: pgd, SQUARE: square}), C.check_square)
    assert result.verdict == "fail" and result.figure == pytest.approx(0.005) and result.threshold == C.SQUARE_EXTRA
    assert result.detail["certain"] == result.detail["possible"] == 5
    # One extra point (0.1 pp) is within AutoAttack's tolerance.
    square = [None if i < 100 else (0 if i < 101 else 1) for i in range(n)]
    assert _stored(store, _fake(store, {CLEAN: [1] * n, PGD: pgd, SQUARE: square}), C.check_square).verdict == "pass"


def test_stored_checks_are_inconclusive_when_the_order_hides_the_answer():
    store = Store(memory=True)
    n = 100
    # Square ran first and broke 10 samples; pgd20 never attacked them: skipped, not passed.
    square = [0 if i < 10 else 1 for i in range(n)]
    pgd = [None if i < 10 else 1 for i in range(n)]
    eval_id = _fake(store, {CLEAN: [1] * n, SQUARE: square, PGD: pgd})
    result = _stored(store, eval_id, C.check_square)
    assert result.verdict == "skipped" and "inconclusive" in result.detail["reason"]
    assert result.figure == 0 and result.detail["possible"] == 10
    # Clean-wrong samples never count.
    eval_id = _fake(store, {CLEAN: [0] * 10 + [1] * 90, SQUARE: [None] * 10 + [1] * 90, PGD: [None] * 10 + [1] * 90})
    assert _stored(store, eval_id, C.check_square).verdict == "pass"


def test_pgd_vs_aa_cw_vs_pgd_and_missing_attacks():
    store = Store(memory=True)
    n = 100
    aa = "aa:version=standard"
    cw = "cw:alpha=2/255,kappa=50.0,random_start=true,restarts=1,steps=30"
    # AA (after pgd20) breaks 6 of pgd20's survivors: PGD overstates by 6 pp > 5 pp.
    eval_id = _fake(store, {CLEAN: [1] * n, PGD: [0] * 20 + [1] * 80, aa: [None] * 20 + [0] * 6 + [1] * 74})
    assert _stored(store, eval_id, C.check_pgd_vs_aa).verdict == "fail"
    assert _stored(store, eval_id, C.check_cw_vs_pgd).verdict == "skipped"  # no cw ran
    # CW before pgd20: pgd20 breaks 2 samples cw survived (2 pp <= 3 pp).
    eval_id = _fake(store, {CLEAN: [1] * n, cw: [0] * 10 + [1] * 90, PGD: [None] * 10 + [0] * 2 + [1] * 88})
    result = _stored(store, eval_id, C.check_cw_vs_pgd)
    assert result.verdict == "pass" and result.figure == pytest.approx(0.02)
    # CW after pgd20 (the default order): the samples pgd20 broke were never given to cw.
    eval_id = _fake(store, {CLEAN: [1] * n, PGD: [0] * 10 + [1] * 90, cw: [None] * 10 + [1] * 90})
    assert _stored(store, eval_id, C.check_cw_vs_pgd).verdict == "skipped"


def test_stochastic_defense_without_eot_fails():
    store = Store(memory=True)
    eval_id = _fake(store, {CLEAN: [1] * 4, PGD: [1] * 4})
    assert _stored(store, eval_id, C.check_stochastic_eot, {"stochastic_defense": True}).verdict == "fail"
    assert _stored(store, eval_id, C.check_stochastic_eot, {"stochastic_defense": False}).verdict == "pass"
    eval_id = _fake(store, {CLEAN: [1] * 4, PGD: [1] * 4}, details={PGD: {"eot": 30}})
    result = _stored(store, eval_id, C.check_stochastic_eot, {"stochastic_defense": True})
    assert result.verdict == "pass" and result.figure == 30


def test_reliable_means_no_failed_check():
    assert reliable([CheckResult("a", "pass"), CheckResult("b", "skipped")])
    assert not reliable([CheckResult("a", "pass"), CheckResult("b", "fail")])


def test_engine_and_checks_agree_on_the_clean_pass_name():
    assert C.CLEAN == CLEAN


# == storage ====================================================================================
def test_checks_table_upserts_per_evaluation_and_survives_reopening(tmp_path):
    path = tmp_path / "s.sqlite"
    with Store(path) as store:
        first = _fake(store, {CLEAN: [1, 1]})
        second = _fake(store, {CLEAN: [1, 0]})
        store.record_check(first, "zero_gradients", "fail", 0.25, 0.0, {"points": 4})
        store.record_check(first, "randomness", "pass", 0.0, 1e-4, {})
        store.record_check(second, "zero_gradients", "pass", 0.0, 0.0, {})
        store.record_check(first, "zero_gradients", "pass", 0.0, 0.0, {"points": 8})  # rerun: upsert
        with pytest.raises(ValueError, match="verdict"):
            store.record_check(first, "randomness", "maybe", None, None, {})
    with Store(path) as store:
        rows = store.checks(first)
        assert [(r["name"], r["verdict"], r["figure"]) for r in rows] == [("zero_gradients", "pass", 0.0), ("randomness", "pass", 0.0)]
        assert rows[0]["detail"] == {"points": 8} and rows[0]["created_at"]
        assert [r["name"] for r in store.checks(second)] == ["zero_gradients"]
        assert len(store.table("checks")) == 3
        store.record_check(second, "unbounded", "skipped", float("nan"), None, {"reason": "x"})
        assert store.checks(second)[1]["figure"] is None


def test_run_checks_twice_records_each_check_once(evaluated):
    store, eval_id, target, _ = evaluated
    names = ["stochastic_without_eot", "eval_mode"]
    run_checks(store, eval_id, target, CONFIG, n_check=10, names=names)
    run_checks(store, eval_id, target, CONFIG, n_check=10, names=names)
    rows = [r for r in store.table("checks") if r["eval_id"] == eval_id]
    assert len(rows) == len({r["name"] for r in rows})
