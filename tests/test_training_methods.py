"""AT methods (TRADES, MART, FAT): loss forms against the reference formulas, composition with
any defense through the protocol, inner-attack conventions, and training through the trainer.

The reference formulas below are written the way the TRADES and MART code compute them (KL summed
over classes and batch, divided by the batch size; MART's runner-up class from an argsort), so
they check the implementation by a different route rather than restating it.
"""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F

from advdef.attacks.pgd import pgd_attack
from advdef.data.base import iterate_batches
from advdef.evaluation.engine import EvalConfig, evaluate_run
from advdef.evaluation.summary import summarize
from advdef.models import build_model
from advdef.models.base import Classifier
from advdef.registry import DATASETS, DEFENSES, TRAINING
from advdef.store import Store
from advdef.training.config import TrainConfig
from advdef.training.inner import early_stopped_ascent
from advdef.training.methods import FAT, MART, TRADES, craft_training_attack
from advdef.training.objectives import kl_attack_objective, kl_per_example, mart_form, trades_form
from advdef.training.trainer import start_run

DIGITS = DATASETS.create("digits").info
AT_METHODS = ("trades", "mart", "fat")


# -- reference formulas ------------------------------------------------------------------------


def reference_trades(natural, adversarial, y, beta):
    """TRADES code: CE(natural) + beta * KLDiv(sum)(log_softmax(adv), softmax(nat)) / batch."""
    kl = F.kl_div(F.log_softmax(adversarial, 1), F.softmax(natural, 1), reduction="sum") / len(y)
    return F.cross_entropy(natural, y) + beta * kl


def reference_mart(natural, adversarial, y, lam, weight_from=None):
    """MART code: BCE(adv) + lam * sum_i KL_i * (1.0000001 - p_y(nat)) / batch."""
    adv_probs = F.softmax(adversarial, 1)
    top2 = adv_probs.argsort(1)[:, -2:]
    runner_up = torch.where(top2[:, -1] == y, top2[:, -2], top2[:, -1])
    boosted = F.cross_entropy(adversarial, y) + F.nll_loss(torch.log(1.0001 - adv_probs + 1e-12), runner_up)
    nat_probs = F.softmax(natural, 1)
    source = natural if weight_from is None else weight_from
    weight = 1.0000001 - F.softmax(source, 1).gather(1, y[:, None]).squeeze(1)
    kl = (nat_probs * (nat_probs.log() - torch.log(adv_probs + 1e-12))).sum(1)
    return boosted + lam * (kl * weight).sum() / len(y)


# -- helpers -------------------------------------------------------------------------------------


def tiny(defense: str = "cas", arch: str = "resnet18:width=4"):
    torch.manual_seed(0)
    built = build_model(arch, DIGITS, defense)
    built.model.train()
    return built


def fixed_batch(n: int = 8):
    generator = torch.Generator().manual_seed(1)
    x = torch.rand(n, *DIGITS.input_shape, generator=generator)
    y = torch.arange(n) % DIGITS.num_classes
    x_adv = (x + 0.1 * (2 * torch.rand(x.shape, generator=generator) - 1)).clamp(0, 1)
    return x, x_adv, y


def two_labelled_passes(model: Classifier, x, x_adv, y):
    """Natural then adversarial train-mode forward with labels, with each pass's aux outputs."""
    with model.labels(y):
        natural = model(x)
        natural_aux = dict(model.aux_outputs())
        adversarial = model(x_adv)
        adversarial_aux = dict(model.aux_outputs())
    return natural, natural_aux, adversarial, adversarial_aux


def digits_batch(n: int = 64):
    split = DATASETS.create("digits").load("train")
    x, y, _ = next(iterate_batches(split, n))
    return x, y


CAS_HEADS = ["cas/layer4.0", "cas/layer4.1"]  # resnet18's default CAS points (S = 2), beta 2


# -- loss forms ------------------------------------------------------------------------------------


def test_trades_and_mart_forms_match_the_reference_formulas_on_fixed_logits():
    generator = torch.Generator().manual_seed(3)
    natural = 3 * torch.randn(16, 10, generator=generator)
    adversarial = natural + torch.randn(16, 10, generator=generator)
    y = torch.randint(0, 10, (16,), generator=generator)
    trades, mart = trades_form(natural, adversarial, y, 6.0), mart_form(natural, adversarial, y, 6.0)
    assert torch.allclose(trades, reference_trades(natural, adversarial, y, 6.0), rtol=1e-5)
    assert torch.allclose(mart, reference_mart(natural, adversarial, y, 6.0), rtol=1e-5)
    other = torch.randn(16, 10, generator=generator)
    assert torch.allclose(mart_form(natural, adversarial, y, 5.0, kl_weight_logits=other),
                          reference_mart(natural, adversarial, y, 5.0, weight_from=other), rtol=1e-5)
    assert torch.allclose(kl_per_example(natural, natural), torch.zeros(16), atol=1e-6)


def test_loss_forms_stay_finite_when_a_probability_saturates():
    natural = torch.tensor([[80.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    adversarial = torch.tensor([[0.0, 80.0, 0.0], [80.0, 0.0, 0.0]])
    y = torch.tensor([0, 0])
    for value in (trades_form(natural, adversarial, y, 6.0), mart_form(natural, adversarial, y, 6.0)):
        assert torch.isfinite(value)


def test_trades_outer_loss_with_cas_heads_follows_table_7():
    """CE + beta*KL on the final logits, plus w * mean_s [CE(head_s(x)) + beta*KL(head_s)]."""
    built = tiny("cas")
    model, defense = built.model, built.defense
    x, x_adv, y = fixed_batch()
    loss, logits = TRADES().outer(model, x, x_adv, y, defense)
    natural, nat_aux, adversarial, adv_aux = two_labelled_passes(model, x, x_adv, y)
    heads = sum(reference_trades(nat_aux[k], adv_aux[k], y, 6.0) for k in CAS_HEADS) / len(CAS_HEADS)
    expected = reference_trades(natural, adversarial, y, 6.0) + 2.0 * heads
    assert torch.allclose(loss, expected, rtol=1e-5)
    assert torch.allclose(logits, adversarial)


@pytest.mark.parametrize("aux_kl_weight", ["head", "main"])
def test_mart_outer_loss_with_cas_heads_follows_table_7_or_the_official_code(aux_kl_weight):
    """Per head: BCE(head(x')) + lam*KL*(1 - p_y) with the head's own p_y (Table 7) or the final
    classifier's (official MART+CAS code)."""
    built = tiny("cas")
    model, defense = built.model, built.defense
    x, x_adv, y = fixed_batch()
    loss, _ = MART(aux_kl_weight=aux_kl_weight).outer(model, x, x_adv, y, defense)
    natural, nat_aux, adversarial, adv_aux = two_labelled_passes(model, x, x_adv, y)
    weight_from = natural if aux_kl_weight == "main" else None
    heads = sum(reference_mart(nat_aux[k], adv_aux[k], y, 6.0, weight_from) for k in CAS_HEADS) / len(CAS_HEADS)
    expected = reference_mart(natural, adversarial, y, 6.0) + 2.0 * heads
    assert torch.allclose(loss, expected, rtol=1e-5)


def test_without_heads_only_the_main_form_remains():
    built = tiny("none", "smallcnn:width=4")
    x, x_adv, y = fixed_batch()
    trades, _ = TRADES(beta=4).outer(built.model, x, x_adv, y, built.defense)
    mart, _ = MART(lam=5).outer(built.model, x, x_adv, y, built.defense)
    natural, _, adversarial, _ = two_labelled_passes(built.model, x, x_adv, y)
    assert torch.allclose(trades, reference_trades(natural, adversarial, y, 4.0), rtol=1e-5)
    assert torch.allclose(mart, reference_mart(natural, adversarial, y, 5.0), rtol=1e-5)


@pytest.mark.parametrize("method", [TRADES, MART])
def test_extra_aux_loss_is_added_on_the_adversarial_pass(method):
    """FSR's separation/recalibration loss reads the last forward: it must be the adversarial one."""
    built = tiny("fsr", "smallcnn:width=4")
    model, defense = built.model, built.defense
    x, x_adv, y = fixed_batch()
    torch.manual_seed(5)  # FSR's Gumbel noise in train mode
    loss, _ = method().outer(model, x, x_adv, y, defense)
    torch.manual_seed(5)
    with model.labels(y):
        natural = model(x)
        adversarial = model(x_adv)
        extra = defense.extra_aux_loss(model, y)
    reference = reference_trades if method is TRADES else reference_mart
    form = reference(natural, adversarial, y, 6.0)
    assert extra is not None and extra > 0
    assert torch.allclose(loss, form + extra, rtol=1e-5)


def test_trades_inner_objective_weights_heads_as_the_defense_asks():
    generator = torch.Generator().manual_seed(4)
    natural = torch.randn(5, 10, generator=generator)
    natural_heads = {"a": torch.randn(5, 10, generator=generator), "b": torch.randn(5, 10, generator=generator)}
    adversarial = torch.randn(5, 10, generator=generator)
    adversarial_heads = {k: torch.randn(5, 10, generator=generator) for k in natural_heads}
    y = torch.zeros(5, dtype=torch.long)
    main = kl_per_example(natural, adversarial)
    heads = (kl_per_example(natural_heads["a"], adversarial_heads["a"])
             + kl_per_example(natural_heads["b"], adversarial_heads["b"])) / 2

    def objective(weight):
        return kl_attack_objective(natural, natural_heads, lambda: adversarial_heads, weight)(adversarial, y)

    assert torch.allclose(objective(None), main)
    assert torch.allclose(objective(0.0), main)
    assert torch.allclose(objective(2.0), main + 2.0 * heads)
    assert torch.allclose(objective(math.inf), heads)
    at_natural = kl_attack_objective(natural, natural_heads, lambda: natural_heads, 2.0)(natural, y)
    assert torch.allclose(at_natural, torch.zeros(5), atol=1e-6)


# -- inner attack ------------------------------------------------------------------------------


def toy_forward(x: torch.Tensor, _y: torch.Tensor) -> torch.Tensor:
    """Two classes: class 1 exactly when the mean pixel exceeds 0.5."""
    score = x.flatten(1).mean(1)
    return torch.stack([torch.zeros_like(score), 40 * (score - 0.5)], 1)


@pytest.mark.parametrize("whole_batch", [False, True])
@pytest.mark.parametrize("tau", [0, 2])
def test_fat_stops_each_example_tau_steps_after_it_is_misclassified(tau, whole_batch):
    # Every step adds alpha = 0.05 to the mean (label 0, CE grows with it); misclassified above 0.5.
    start = torch.tensor([0.32, 0.42, 0.62, 0.01]).view(4, 1, 1, 1)
    y = torch.zeros(4, dtype=torch.long)
    first_wrong = torch.tensor([4, 2, 0, 99])  # the step at which each example is first misclassified
    x_adv, taken = early_stopped_ascent(
        toy_forward, lambda logits, labels: F.cross_entropy(logits, labels, reduction="none"),
        start, y, start, eps=1.0, alpha=0.05, steps=10, tau=tau, whole_batch=whole_batch,
    )
    expected = torch.clamp(first_wrong + tau, max=10)
    assert taken.tolist() == expected.tolist()
    assert torch.allclose(x_adv.flatten(), start.flatten() + 0.05 * expected, atol=1e-6)


@pytest.mark.parametrize("name", AT_METHODS)
def test_crafting_is_label_free_in_eval_mode_and_labelled_in_train_mode(name, monkeypatch):
    built = tiny("cas", "smallcnn:width=4")
    x, _, y = fixed_batch()
    seen: list[tuple[bool, bool]] = []
    original = Classifier.forward

    def spy(self, inputs):
        seen.append((self.training, self.context.labels is not None))
        return original(self, inputs)

    monkeypatch.setattr(Classifier, "forward", spy)
    generator = torch.Generator().manual_seed(0)
    TRAINING.create(name).loss(built.model, x, y, built.defense, generator)
    crafting = [s for s in seen if not s[0]]
    assert crafting and all(not labelled for _, labelled in crafting), "eval-mode crafting must not see labels"
    assert all(labelled for training, labelled in seen if training), "train-mode passes carry the labels"
    seen.clear()
    TRAINING.create(f"{name}:bn_mode=train").loss(built.model, x, y, built.defense, generator)
    assert seen and all(training and labelled for training, labelled in seen)
    assert built.model.training and all(p.requires_grad for p in built.model.parameters())


@pytest.mark.parametrize("name", AT_METHODS)
def test_crafted_examples_respect_the_budget(name):
    built = tiny("cifs", "smallcnn:width=4")
    x, _, y = fixed_batch()
    method = TRAINING.create(f"{name}:eps=4/255")
    x_adv = method.craft(built.model, x, y, built.defense, torch.Generator().manual_seed(0))
    assert (x_adv - x).abs().max() <= 4 / 255 + 1e-6
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert not torch.equal(x_adv, x)


def test_pgd_at_crafting_is_unchanged_by_the_shared_crafting_context():
    built = tiny("cas", "smallcnn:width=4")
    model, defense = built.model, built.defense
    x, _, y = fixed_batch()
    crafted = craft_training_attack(model, x, y, eps=8 / 255, alpha=2 / 255, steps=3, random_start=True,
                                    bn_mode="train", generator=torch.Generator().manual_seed(0),
                                    objective=defense.training_attack_objective(model))
    for p in model.parameters():
        p.requires_grad_(False)
    with model.labels(y):
        direct = pgd_attack(model, x, y, eps=8 / 255, alpha=2 / 255, steps=3, random_start=True,
                            loss=defense.training_attack_objective(model),
                            generator=torch.Generator().manual_seed(0), track_best=False)
    assert torch.equal(crafted, direct)


# -- options -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("trades", {"beta": -1}), ("trades", {"beta": math.inf}), ("trades", {"eps": 0}),
        ("trades", {"eps": Fraction(2)}), ("trades", {"alpha": 0}), ("trades", {"bn_mode": "test"}),
        ("mart", {"lam": -0.5}), ("mart", {"steps": 0}), ("mart", {"steps": 2.5}), ("mart", {"start": "gauss"}),
        ("mart", {"aux_kl_weight": "both"}), ("fat", {"tau": -1}), ("fat", {"tau": 1.5}), ("fat", {"omega": -0.1}),
        ("fat", {"eps": "big"}),
    ],
)
def test_bad_values_are_value_errors(name, options):
    with pytest.raises(ValueError):
        TRAINING.get(name).factory(**options)


def test_methods_are_registered_with_a_summary_and_documented_defaults():
    for name in AT_METHODS:
        assert name in TRAINING.names() and TRAINING.get(name).summary
    trades, mart, fat = TRADES(), MART(), FAT()
    assert (trades.beta, trades.inner.steps, trades.inner.start, trades.inner.bn_mode) == (6.0, 10, "normal", "eval")
    assert (mart.lam, mart.inner.start, mart.inner.bn_mode, mart.aux_kl_weight) == (6.0, "normal", "eval", "head")
    assert (fat.tau, fat.omega, fat.inner.start, fat.inner.bn_mode) == (0, 0.001, "uniform", "eval")
    for method in (trades, mart, fat):
        assert method.eps == Fraction(8, 255) and method.inner.alpha == Fraction(2, 255)


# -- training ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", TRAINING.names())
def test_each_method_lowers_its_loss_on_a_fixed_batch(name):
    built = tiny("none", "smallcnn:width=8")
    model, defense = built.model, built.defense
    method = TRAINING.create(name)
    x, y = digits_batch()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)

    def measured() -> float:
        loss, _ = method.loss(model, x, y, defense, torch.Generator().manual_seed(0))
        return float(loss.detach())

    before = measured()
    for step in range(15):
        loss, _ = method.loss(model, x, y, defense, torch.Generator().manual_seed(step))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert measured() < 0.8 * before


@pytest.mark.parametrize("defense", DEFENSES.names())
@pytest.mark.parametrize("method", TRAINING.names())
def test_every_method_trains_with_every_defense(method, defense, tmp_path):
    store = Store(memory=True)
    config = TrainConfig(data="digits", arch="smallcnn:width=4", defense=defense, at=method, epochs=1,
                         limit_train=40, batch_size=20, val_n=10, device="cpu")
    run_id = start_run(config, store, tmp_path)
    assert store.get_run(run_id)["status"] == "trained"
    assert math.isfinite(store.checkpoints(run_id)[0]["metrics"]["train_loss"])


@pytest.mark.slow
def test_trades_and_mart_are_more_robust_than_standard_training(tmp_path, capsys):
    """Same seed and recipe (smallcnn:width=16, 10 epochs, digits); pgd20 at eps 16/255 on 100 test images."""
    store = Store(memory=True)
    eps = Fraction(16, 255)
    table = {}
    for method in ("standard", "trades:eps=16/255", "mart:eps=16/255"):
        config = TrainConfig(data="digits", arch="smallcnn:width=16", defense="none", at=method, epochs=10,
                             batch_size=64, lr=0.05, device="cpu")
        run_id = start_run(config, store, tmp_path)
        evaluation = evaluate_run(store, run_id, EvalConfig(attacks=["pgd20"], n=100, eps=eps, device="cpu"))
        summary = summarize(store, evaluation)
        table[method.split(":")[0]] = (summary.clean.value, summary.worst.value)
    with capsys.disabled():
        print("\nmethod      clean  pgd20@16/255 (n=100)")
        for name, (clean, robust) in table.items():
            print(f"{name:10s}  {clean:.2f}   {robust:.2f}")
    assert table["trades"][1] > table["standard"][1]
    assert table["mart"][1] > table["standard"][1]
