"""Adaptive attacks generated from defense declarations: suites, budgets, objectives, surrogates,
errors, and a gradient-masking control where they succeed and final-logit PGD fails."""

from __future__ import annotations

from contextlib import contextmanager
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import advdef.attacks.adaptive as adaptive_module
from advdef.attacks.adaptive import Adaptive, AdaptiveError, UNBOUND, adaptive_suite
from advdef.attacks.base import AttackContext, LogitsView, check_budget
from advdef.attacks.pgd import pgd_attack
from advdef.defenses.base import Defense
from advdef.defenses.ewas import EWAS, EWASModule
from advdef.errors import UserError
from advdef.models import build_model
from advdef.models.base import Classifier, Tap
from advdef.registry import ATTACKS, DATASETS
from advdef.specs import split_specs

DIGITS = DATASETS.create("digits").info
TINY = "resnet18:width=4"

SUITES = {
    "cas": ["head=cas/layer4.0", "head=cas/layer4.1", "head=mean", "weight=0.1", "weight=1.0", "weight=10.0",
            "forced", "surrogate=soft_mask", "surrogate=soft_mask_t0.1"],
    "cifs": ["head=cifs/layer4.0/logits", "head=cifs/layer4.1/logits", "head=mean", "weight=0.1", "weight=1.0",
             "weight=10.0", "forced", "surrogate=undetached"],
    "fsr": ["head=fsr/layer4/robust", "head=fsr/layer4/recalibrated", "head=mean", "weight=0.1", "weight=1.0",
            "weight=10.0", "surrogate=mask_temperature", "surrogate=mask_temperature_0.5"],
    "ewas": ["head=ewas/layer4.0", "weight=0.1", "weight=1.0", "weight=10.0", "forced",
             "surrogate=soft_mask", "surrogate=soft_mask_t0.1"],
}


def tiny(defense: str):
    torch.manual_seed(0)
    built = build_model(TINY, DIGITS, defense)
    built.model.eval()
    return built


def bound(spec: str, built, **overrides) -> Adaptive:
    attack = ATTACKS.create(spec, **overrides)
    attack.bind(AttackContext(model=built.model, defense=built.defense, run={}, device=torch.device("cpu")))
    return attack


def images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, *DIGITS.input_shape, generator=torch.Generator().manual_seed(seed))


def short(spec: str) -> str:
    """`adaptive:mode=head,head=K` -> `head=K`, `adaptive:mode=forced` -> `forced`."""
    body = spec.split(":", 1)[1].split(",")
    return body[1] if len(body) > 1 else body[0].split("=")[1]


@pytest.fixture(autouse=True)
def one_thread():
    """These tensors are tiny: a second intra-op thread only adds synchronisation, which on a
    loaded 2-core machine measured 0.3 s -> 60 s for one test. Restored afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def built_models():
    return {name: tiny(name) for name in SUITES}


# -- the suite ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(SUITES))
def test_suite_lists_the_modes_that_fit_each_defense(built_models, name):
    suite = adaptive_suite(built_models[name].defense)
    assert [short(s) for s in suite] == SUITES[name]
    assert split_specs(",".join(suite)) == suite, "the suite must survive --attacks list splitting"
    for spec in suite:
        canonical = ATTACKS.canonical(spec)
        assert ATTACKS.canonical(canonical) == canonical
        assert ATTACKS.create(canonical).spec() == ATTACKS.create(spec).spec()


@pytest.mark.parametrize("defense", ["none", "denoise", "randomize", "smooth"])
def test_nothing_to_adapt_to_gives_an_empty_suite(defense):
    assert adaptive_suite(tiny(defense).defense) == []
    assert adaptive_suite(None) == []


def test_surrogates_follow_the_defense_configuration():
    assert adaptive_suite(tiny("smooth:passes=attack").defense) == ["adaptive:mode=surrogate,surrogate=smooth_backward"]
    assert "surrogate=undetached" not in ",".join(adaptive_suite(tiny("cifs:mask_grad=full").defense))
    no_suppress = adaptive_suite(tiny("cas:suppress=false").defense)
    assert not any("forced" in s or "surrogate" in s for s in no_suppress), "no mask reaches the features"
    assert any("head=mean" in s for s in no_suppress)


def test_head_keys_that_would_not_parse_are_named_by_index():
    class Odd(Defense):
        def attack_head_names(self):
            return ("a,b", "1/2", "mean", "ok/key.0")

    assert [short(s) for s in adaptive_suite(Odd())][:4] == ["head=0", "head=1", "head=2", "head=ok/key.0"]


# -- every generated attack runs, within budget, label-free ------------------------------------
@pytest.mark.parametrize("name", sorted(SUITES))
def test_every_generated_attack_runs_within_budget_without_labels(built_models, name):
    built = built_models[name]
    model = built.model
    seen = []

    def no_labels(module, inputs):
        assert not module.training and module.context.labels is None
        seen.append(inputs[0].shape[0])

    handle = model.register_forward_pre_hook(no_labels)
    x = images(4)
    with torch.no_grad():
        y = model(x).argmax(1)  # correct at x, so the ascent really runs
    eps = Fraction(8, 255)
    try:
        for spec in adaptive_suite(built.defense):
            attack = bound(spec, built, steps=2, eps=eps)
            x_adv = attack(LogitsView(model), x, y, seed=1)
            check_budget(x, x_adv, float(eps))
            assert x_adv.shape == x.shape
    finally:
        handle.remove()
    assert seen, "the attacks must run the bound model"
    with pytest.raises(RuntimeError, match="training mode"):
        with model.labels(y):
            pass


# -- what each mode optimises ------------------------------------------------------------------
def constant_final(built, label: int = 3) -> None:
    """Make the final logits (almost) input-independent with `label` far ahead, so no iterate is
    ever misclassified and the ascent runs all its steps; sharpen the EWAS head (zero bias)."""
    net = built.model.net
    with torch.no_grad():
        net.linear.weight.mul_(1e-3)
        net.linear.bias.zero_()
        net.linear.bias[label] = 10.0
        for module in built.model.modules():
            if isinstance(module, EWASModule):
                module.alc.weight.mul_(30)
                module.alc.bias.zero_()


def last_iterate(monkeypatch) -> list[torch.Tensor]:
    """Record every iterate the attack judges; the last entry is its final iterate."""
    iterates: list[torch.Tensor] = []
    original = adaptive_module._record

    def spy(best, closest, broken, active, x_adv, logits, y):
        iterates.append(x_adv.clone())
        original(best, closest, broken, active, x_adv, logits, y)

    monkeypatch.setattr(adaptive_module, "_record", spy)
    return iterates


def test_head_mode_raises_the_heads_loss(monkeypatch):
    built = tiny("ewas")
    constant_final(built)
    x, y = images(8), torch.full((8,), 3)
    iterates = last_iterate(monkeypatch)
    bound("adaptive:mode=head,head=ewas/layer4.0", built, steps=10)(LogitsView(built.model), x, y)
    defense, model = built.defense, built.model
    with torch.no_grad():
        model(x)
        before = F.cross_entropy(defense.attack_heads(model)["ewas/layer4.0"], y, reduction="none")
        model(iterates[-1])
        after = F.cross_entropy(defense.attack_heads(model)["ewas/layer4.0"], y, reduction="none")
    assert (after > before).float().mean() >= 0.9  # measured: all 8


def test_forced_mode_drives_the_mask_selecting_head_to_the_target(monkeypatch):
    built = tiny("ewas")
    constant_final(built)
    x, y = images(16), torch.full((16,), 3)
    attack = bound("adaptive:mode=forced", built, steps=20, eps=Fraction(3, 10))
    iterates = last_iterate(monkeypatch)
    attack(LogitsView(built.model), x, y)
    targets = attack._targets(LogitsView(built.model), x, y)
    assert (targets != y).all() and len(set(targets.tolist())) > 1
    model = built.model
    with torch.no_grad():
        model(x)
        at_x = model.aux_outputs()["ewas/layer4.0/selected"].clone()
        model(iterates[-1])
        forced = model.aux_outputs()["ewas/layer4.0/selected"]
    assert (at_x == targets).float().mean() == 0
    assert (forced == targets).float().mean() >= 0.5  # measured: 13 of 16


# -- surrogates: craft on the surrogate, judge on the real model ---------------------------------
def test_surrogate_iterates_are_judged_on_the_real_model(monkeypatch):
    built = tiny("ewas")
    model = built.model
    x = images(6)
    with torch.no_grad():
        y = model(x).argmax(1)
    checked = []
    original = adaptive_module._record

    def spy(best, closest, broken, active, x_adv, logits, labels):
        with torch.no_grad():
            real = model(x_adv)  # outside any surrogate context here
            with EWAS.relaxed(model, 1.0):
                relaxed = model(x_adv)
        assert not torch.allclose(real, relaxed), "the test needs a surrogate whose forward differs"
        assert torch.allclose(logits, real), "iterates must be judged on the real model's logits"
        checked.append(len(x_adv))
        original(best, closest, broken, active, x_adv, logits, labels)

    monkeypatch.setattr(adaptive_module, "_record", spy)
    bound("adaptive:mode=surrogate,surrogate=soft_mask", built, steps=3)(LogitsView(model), x, y)
    assert checked


class Linear2(nn.Module):
    """A 2-class linear model on two pixels: logit gap 10 * (u - 0.5); label 0 iff u > 0.5."""

    def __init__(self) -> None:
        super().__init__()
        self.tap = Tap()
        self.fc = nn.Linear(2, 2)
        with torch.no_grad():
            self.fc.weight.copy_(torch.tensor([[10.0, 0.0], [0.0, 0.0]]))
            self.fc.bias.copy_(torch.tensor([-5.0, 0.0]))

    def insertion_points(self) -> dict[str, Tap]:
        return {"feat": self.tap}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.tap(x).flatten(1))


class Lying(Defense):
    """A surrogate whose forward calls every input class 1 (gradient unchanged): a point that only
    fools it must not be reported as found."""

    def gradient_surrogates(self, model):
        @contextmanager
        def lie():
            handle = model.register_forward_hook(lambda m, i, out: out + torch.tensor([0.0, 100.0]))
            try:
                yield
            finally:
                handle.remove()

        return {"lying": lie}


def test_points_that_only_fool_the_surrogate_are_not_returned(monkeypatch):
    model = Classifier(Linear2(), (0.0,), (1.0,), (1, 1, 2), 2).eval()
    eps = 0.1
    u = torch.linspace(0.56, 0.59, 8)  # 0.6-0.9 eps from the real boundary u = 0.5
    x = torch.stack([u, torch.full_like(u, 0.5)], 1).view(8, 1, 1, 2)
    y = torch.zeros(8, dtype=torch.long)
    attack = Adaptive(eps=Fraction(1, 10), mode="surrogate", surrogate="lying", steps=10)
    attack.bind(AttackContext(model=model, defense=Lying(), run={}, device=torch.device("cpu")))
    with torch.no_grad(), Lying().gradient_surrogates(model)["lying"]():
        assert (model(x).argmax(1) == 1).all(), "the surrogate calls every point adversarial"
    iterates = last_iterate(monkeypatch)
    x_adv = attack(LogitsView(model), x, y)
    check_budget(x, x_adv, eps)
    with torch.no_grad():
        # Judged by the surrogate, the random start would be "found" for every point; for the
        # real model most random starts are still correct ...
        assert (model(iterates[0]).argmax(1) == y).float().mean() >= 0.5
        # ... and the points returned are the real adversarials the ascent went on to find.
        assert (model(x_adv).argmax(1) != y).all()


# -- errors ------------------------------------------------------------------------------------
def test_unbound_use_and_bad_modes_give_clear_errors(built_models):
    x, y = images(2), torch.zeros(2, dtype=torch.long)
    attack = ATTACKS.create("adaptive:mode=joint")
    with pytest.raises(RuntimeError, match="need the defended model"):
        attack(LogitsView(built_models["ewas"].model), x, y)
    assert "advdef evaluate" in UNBOUND
    for bad, message in [
        ("adaptive", "mode must be one of head, joint, forced, surrogate"),
        ("adaptive:mode=sideways", "mode must be one of"),
        ("adaptive:mode=head", "needs head="),
        ("adaptive:mode=surrogate", "needs surrogate="),
        ("adaptive:mode=joint,head=0", "head= applies to mode=head only"),
        ("adaptive:mode=head,head=0,weight=2", "weight= applies to mode=joint only"),
        ("adaptive:mode=joint,weight=-1", "weight must be"),
        ("adaptive:mode=forced,loss=dlr", "loss must be"),
    ]:
        with pytest.raises(UserError, match=message):
            ATTACKS.create(bad)
    with pytest.raises(UserError, match="head= applies"):
        ATTACKS.canonical("adaptive:mode=forced,head=mean")

    none = tiny("none")
    for spec, message in [
        ("adaptive:mode=head,head=mean", "needs auxiliary heads; this defense declares none"),
        ("adaptive:mode=surrogate,surrogate=soft_mask", r"valid: \(none"),
    ]:
        with pytest.raises(AdaptiveError, match=message):
            bound(spec, none)
    with pytest.raises(AdaptiveError, match=r"unknown head 'ewas/layer9'; valid: mean, 0=ewas/layer4.0"):
        bound("adaptive:mode=head,head=ewas/layer9", built_models["ewas"])
    with pytest.raises(AdaptiveError, match="unknown head '3'"):
        bound("adaptive:mode=head,head=3", built_models["ewas"])
    with pytest.raises(AdaptiveError, match="valid: soft_mask, soft_mask_t0.1"):
        bound("adaptive:mode=surrogate,surrogate=relaxed", built_models["ewas"])
    with pytest.raises(AdaptiveError, match="masks do not depend on its heads"):
        bound("adaptive:mode=forced", built_models["fsr"])
    assert "\n" not in str(AdaptiveError("x")) and issubclass(AdaptiveError, ValueError)


def test_specs_keep_only_the_parameters_of_their_mode():
    assert ATTACKS.create("adaptive:mode=joint,weight=inf").spec() == (
        "adaptive:alpha=2/255,loss=ce,mode=joint,restarts=1,steps=50,weight=inf"
    )
    assert ATTACKS.create("adaptive:mode=joint,weight=inf").weight == float("inf")
    assert ATTACKS.create("adaptive:mode=joint").weight == 1.0
    assert ATTACKS.create("adaptive:mode=forced").spec() == "adaptive:alpha=2/255,loss=ce,mode=forced,restarts=1,steps=50"
    assert ATTACKS.canonical("adaptive:mode=head,head=0") == (
        "adaptive:alpha=2/255,eps=8/255,head=0,loss=ce,mode=head,restarts=1,steps=50"
    )


# -- the masking control -----------------------------------------------------------------------
class TwoPixels(nn.Module):
    """Features z = (u, v) at the tap `feat`, then a linear layer: with EWAS on `feat`, the final
    logits see (u, v) * W[argmax ALC(u, v)]."""

    def __init__(self) -> None:
        super().__init__()
        self.tap = Tap()
        self.fc = nn.Linear(2, 2)

    def insertion_points(self) -> dict[str, Tap]:
        return {"feat": self.tap}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.tap(x).flatten(1))


def masked_control() -> tuple[Classifier, EWAS]:
    """EWAS with hand-set weights whose robustness is pure gradient masking.

    ALC: s0 = 10 (u + v - 0.8), s1 = 0; rows W[0] = (10, 10), W[1] = (0, 0). Final margin
    f0 - f1 = (u - v) * row - 1: with row 0 it is 10 (u - v) - 1 > 0 throughout the eps-ball of
    the points below, with row 1 it is -1. The final-logit gradient moves u - v only (sign
    steps (-a, +a) keep u + v), so PGD on the final logits never switches the row; pushing the
    ALC away from class 0 lowers u + v by up to 2 eps and does.
    """
    model = Classifier(TwoPixels(), (0.0,), (1.0,), (1, 1, 2), 2)
    defense = EWAS(points="feat")
    defense.attach(model)
    alc = next(m for m in model.modules() if isinstance(m, EWASModule)).alc
    with torch.no_grad():
        alc.weight.copy_(torch.tensor([[10.0, 10.0], [0.0, 0.0]]))
        alc.bias.copy_(torch.tensor([-8.0, 0.0]))
        model.net.fc.weight.copy_(torch.tensor([[1.0, -1.0], [0.0, 0.0]]))
        model.net.fc.bias.copy_(torch.tensor([-1.0, 0.0]))
    return model.eval(), defense


def test_adaptive_suite_breaks_a_masked_defense_that_final_logit_pgd_cannot():
    model, defense = masked_control()
    eps = 0.1
    n = 16
    generator = torch.Generator().manual_seed(0)
    gap = 0.8 + eps * (1.5 + 0.4 * torch.rand(n, generator=generator))  # u + v: 1.5-1.9 eps above 0.8
    diff = 0.45 + 0.1 * torch.rand(n, generator=generator)  # u - v
    x = torch.stack([(gap + diff) / 2, (gap - diff) / 2], 1).view(n, 1, 1, 2)
    y = torch.zeros(n, dtype=torch.long)
    view = LogitsView(model)
    with torch.no_grad():
        assert (view(x).argmax(1) == y).all()

    final_only = pgd_attack(view, x, y, eps=eps, alpha=eps / 4, steps=20, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        pgd_correct = view(final_only).argmax(1) == y

    suite = adaptive_suite(defense)
    assert [short(s) for s in suite] == ["head=ewas/feat", *SUITES["ewas"][1:]]
    worst_correct = torch.ones(n, dtype=torch.bool)
    for spec in suite:
        attack = ATTACKS.create(spec, eps=Fraction(1, 10), steps=20)
        attack.bind(AttackContext(model=model, defense=defense, run={}, device=torch.device("cpu")))
        x_adv = attack(view, x, y, seed=0)
        check_budget(x, x_adv, eps)
        with torch.no_grad():
            worst_correct &= view(x_adv).argmax(1) == y
    assert pgd_correct.float().mean() >= 0.85  # measured: final-logit PGD leaves 16 of 16 correct
    assert worst_correct.float().mean() <= 0.1  # measured: 0 of 16 (joint 0.1: 10, soft_mask: 10 correct)
    with torch.no_grad():
        model(x)
        clean_rows = model.aux_outputs()["ewas/feat/selected"].clone()
        model(final_only)
        assert torch.equal(model.aux_outputs()["ewas/feat/selected"][pgd_correct], clean_rows[pgd_correct])
