"""Suites resolved against the evaluated run, transfer attacks, targeted PGD, and the report's
white-box vs all-attack worst cases."""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch

from advdef.attacks.base import AttackContext, LogitsView
from advdef.attacks.pgd import choose_targets, pgd_attack
from advdef.errors import UserError
from advdef.evaluation.engine import EvalConfig, evaluate_run
from advdef.evaluation.suites import STANDARD, SuiteContext, default_transfer_source, expand
from advdef.evaluation.summary import summarize
from advdef.models import build_model
from advdef.registry import ATTACKS, DATASETS, DEFENSES
from advdef.report import comparison_tables

DIGITS = DATASETS.create("digits").info
EPS = Fraction(8, 255)


def context(defense: str = "none", **kwargs) -> SuiteContext:
    return SuiteContext(defense=build_model("smallcnn:width=4", DIGITS, defense).defense, run={"run_id": "r"}, **kwargs)


def test_standard_suite_and_plain_specs_pass_through_in_order_without_duplicates():
    assert expand(["standard"], context()) == list(STANDARD)
    assert expand(["pgd20", "standard", "fgsm"], context()) == ["pgd20", "fgsm", "cw", "aa"]


def test_a_stochastic_defense_gets_eot_and_autoattack_rand():
    expanded = expand(["standard", "pgd:steps=5,eot=3"], context("randomize"))
    assert expanded == ["fgsm:eot=20", "cw:eot=20", "pgd20:eot=20", "aa:version=rand", "pgd:steps=5,eot=3"]
    for spec in expanded:  # every rewritten spec is valid
        ATTACKS.create(spec, eps=EPS)
    assert ATTACKS.create("aa:version=rand", eps=EPS).eot == 20


def test_eot_option_applies_to_deterministic_defenses_too_and_one_means_none():
    assert expand(["pgd20", "square"], context(eot=4))[0] == "pgd20:eot=4"
    assert expand(["pgd20"], context("randomize", eot=1)) == ["pgd20"]


def test_transfer_suite_needs_an_undefended_run_of_the_same_data_and_arch(eval_store):
    store, runs = eval_store
    pgd_run = store.get_run(runs["pgd_at"])
    assert default_transfer_source(store, pgd_run) == runs["standard"]
    assert default_transfer_source(None, pgd_run) is None
    missing = SuiteContext(defense=DEFENSES.create("none"), run={"run_id": "x", "dataset": "other", "arch": "a"},
                           store=store)
    assert expand(["transfer"], missing) == [] and "no undefended run" in missing.notes[0]


def test_transfer_attack_crafts_on_the_surrogate_and_lowers_accuracy(eval_store):
    store, runs = eval_store
    config = EvalConfig(attacks=[f"transfer:from={runs['standard']}"], n=60, eps=Fraction(32, 255), device="cpu",
                        checks=False)
    summary = summarize(store, evaluate_run(store, runs["pgd_at"], config))
    (transfer,) = summary.attacks
    assert transfer.family == "transfer" and transfer.complete
    assert transfer.robust.k < summary.clean.k  # examples from the standard model transfer at 32/255


def test_transfer_refuses_itself_unknown_runs_and_unbound_use(eval_store):
    store, runs = eval_store
    model = build_model("smallcnn:width=16", DIGITS).model.eval()
    attack = ATTACKS.create(f"transfer:from={runs['pgd_at']}", eps=EPS)
    with pytest.raises(UserError, match="the evaluated run itself"):
        attack.bind(AttackContext(model=model, defense=None, run={"run_id": runs["pgd_at"]}, device="cpu", store=store))
    with pytest.raises(UserError):
        ATTACKS.create("transfer:from=nope", eps=EPS).bind(
            AttackContext(model=model, defense=None, run={"run_id": "x"}, device="cpu", store=store))
    with pytest.raises(RuntimeError, match="advdef evaluate"):
        attack(LogitsView(model), torch.rand(2, *DIGITS.input_shape), torch.tensor([0, 1]))
    assert ATTACKS.canonical("transfer:abc") == ATTACKS.canonical("transfer:from=abc") == ATTACKS.canonical("transfer:source=abc")


def test_random_targets_are_wrong_classes_and_least_likely_is_the_argmin():
    generator = torch.Generator().manual_seed(0)
    model = LogitsView(build_model("smallcnn:width=4", DIGITS).model.eval())
    x, y = torch.rand(200, *DIGITS.input_shape), torch.randint(0, 10, (200,))
    targets = choose_targets("random", model, x, y, generator)
    assert (targets != y).all() and len(set(targets.tolist())) == 10
    assert torch.equal(choose_targets("least_likely", model, x, y, generator), model(x).argmin(1))
    assert choose_targets("none", model, x, y, generator) is None


def test_targeted_pgd_reaches_its_targets_on_an_undefended_model(eval_store):
    store, runs = eval_store
    from advdef.training.trainer import load_run_model

    built, _ = load_run_model(store.get_run(runs["standard"]), torch.device("cpu"))
    view = LogitsView(built.model.eval())
    test = DATASETS.create("digits").load("test", limit=64, seed=0)
    x, y = test.float_images(torch.arange(64)), test.labels
    targets = choose_targets("least_likely", view, x, y, torch.Generator())
    # The last iterate of the targeted ascent lands on the target (the attack plugin itself keeps
    # the first misclassified iterate, since robust accuracy counts any misclassification).
    x_last = pgd_attack(view, x, y, eps=64 / 255, alpha=4 / 255, steps=40, targets=targets, track_best=False,
                        generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reached = (view(x_last).argmax(1) == targets).float().mean().item()
    assert reached > 0.8
    attack = ATTACKS.create("pgd:steps=40,targeted=least_likely", eps=Fraction(64, 255))
    x_adv = attack(view, x, y, seed=0)
    with torch.no_grad():
        assert (view(x_adv).argmax(1) != y).float().mean() > 0.8
    assert "targeted=least_likely" in attack.spec() and "targeted" not in ATTACKS.create("pgd20", eps=EPS).spec()
    with pytest.raises(UserError, match="targeted must be one of none, random, least_likely"):
        ATTACKS.create("pgd:targeted=yes", eps=EPS)


def test_report_shows_white_box_and_overall_worst_cases_and_who_broke_what(eval_store):
    store, runs = eval_store
    config = EvalConfig(attacks=["fgsm", "pgd:steps=5", f"transfer:from={runs['standard']}"], n=40, device="cpu",
                        eps=Fraction(16, 255), checks=False)
    summary = summarize(store, evaluate_run(store, runs["pgd_at"], config))
    assert summary.worst_whitebox is not None and summary.worst.k <= summary.worst_whitebox.k
    assert summary.clean.k - summary.worst.k == sum(a.broke for a in summary.attacks)
    (table,) = comparison_tables(store, [runs["pgd_at"]])
    assert table.metrics[-2:] == ["standard_worst", "adaptive_worst"]
    assert any("broken first by" in note for note in table.notes)


def test_white_box_worst_is_withheld_when_another_family_ran_first(eval_store):
    store, runs = eval_store
    config = EvalConfig(attacks=[f"transfer:from={runs['standard']}", "fgsm"], n=20, device="cpu", checks=False)
    assert summarize(store, evaluate_run(store, runs["pgd_at"], config)).worst_whitebox is None


def test_suite_keywords_are_refused_where_they_cannot_be_expanded():
    config = EvalConfig(attacks=["full", "pgd20"])
    assert config.canonical_attacks() == [ATTACKS.create("pgd20", eps=EPS).spec()]
    with pytest.raises(UserError, match="--eot"):
        EvalConfig(attacks=["pgd20"], eot=0).canonical_attacks()


def test_eot_modifier_sets_the_samples_of_every_attack_that_takes_them():
    ctx = context()
    assert expand(["pgd20", "square", "eot:30"], ctx) == ["pgd20:eot=30", "square"] and ctx.eot == 30
    assert EvalConfig(attacks=["pgd20", "eot:30"]).canonical_attacks() == [ATTACKS.create("pgd20", eps=EPS).spec()]


def test_paper_suite_is_the_defense_papers_attacks_and_is_labelled(eval_store):
    ctx = context("ewas")
    assert expand(["paper"], ctx) == list(DEFENSES.create("ewas").paper_attacks)
    assert set(ctx.origins.values()) == {"paper"}
    assert expand(["paper"], context()) == ["fgsm", "cw", "pgd20"]  # no paper: advdef's fgsm, cw, pgd20
    store, runs = eval_store
    config = EvalConfig(attacks=["paper"], n=20, device="cpu", checks=False)
    evaluate_run(store, runs["pgd_at"], config)
    (table,) = comparison_tables(store, [runs["pgd_at"]])
    assert any("the paper's own protocol (--suite paper): fgsm, cw, pgd20" in note for note in table.notes)
