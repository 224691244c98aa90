"""Attacks against real trained models: they lower accuracy, respect the budget, and the AA
adapter matches the official AutoAttack called directly."""

from fractions import Fraction

import pytest
import torch
from torch import nn

from advdef.attacks import LogitsView, eval_mode, pgd_attack
from advdef.attacks.autoattack import STANDARD_SETTINGS, AutoAttack, standard_settings
from advdef.attacks.losses import margin
from advdef.data.base import iterate_batches
from advdef.registry import ATTACKS, DATASETS
from advdef.store import Store
from advdef.training.trainer import load_run_model

EPS = Fraction(16, 255)  # digits need a larger budget than CIFAR (see the quick preset)


@pytest.fixture(scope="module")
def standard_model(trained_store):
    path, runs = trained_store
    with Store(path) as store:
        built, _ = load_run_model(store.get_run(runs["standard"]), torch.device("cpu"))
    return built.model


@pytest.fixture(scope="module")
def test_batch():
    split = DATASETS.create("digits").load("test", limit=200, seed=0)
    x, y, _ = next(iterate_batches(split, 200))
    return x, y


def accuracy(view, x, y):
    with torch.no_grad():
        return (view(x).argmax(1) == y).float().mean().item()


@pytest.mark.parametrize("spec", ["fgsm", "pgd10", "cw:steps=10"])
def test_attacks_stay_in_budget_and_lower_accuracy(standard_model, test_batch, spec):
    x, y = test_batch
    with eval_mode(standard_model) as view:
        clean = accuracy(view, x, y)
        x_adv = ATTACKS.create(spec, eps=EPS)(view, x, y, seed=0)
        robust = accuracy(view, x_adv, y)
    assert clean > 0.8, "the fixture model must be trained"
    assert robust < clean - 0.1
    assert (x_adv - x).abs().max() <= float(EPS) + 1e-6
    assert x_adv.min() >= 0 and x_adv.max() <= 1


def test_pgd_is_never_weaker_than_fgsm(standard_model, test_batch):
    x, y = test_batch
    with eval_mode(standard_model) as view:
        fgsm = accuracy(view, ATTACKS.create("fgsm", eps=EPS)(view, x, y), y)
        pgd = accuracy(view, ATTACKS.create("pgd20", eps=EPS)(view, x, y), y)
    assert pgd <= fgsm and pgd < 0.5


def test_more_budget_never_helps_the_model(standard_model, test_batch):
    x, y = test_batch
    with eval_mode(standard_model) as view:
        small = accuracy(view, ATTACKS.create("pgd20", eps=Fraction(2, 255))(view, x, y), y)
        large = accuracy(view, ATTACKS.create("pgd20", eps=Fraction(64, 255))(view, x, y), y)
    assert large <= small and large < 0.05


class _Wobbly(nn.Module):
    """Misclassifies only in a thin slab of input space that PGD crosses and leaves again."""

    def forward(self, x):
        s = x.flatten(1).mean(1, keepdim=True)
        inside = ((s > 0.52) & (s < 0.56)).float()
        return torch.cat([1 - inside + 0 * s, inside + s - s.detach()], 1)


def test_best_iterate_is_kept():
    """An attack that passed through an adversarial point must return one (no silent success)."""
    x = torch.full((1, 1, 2, 2), 0.5)
    y = torch.tensor([0])
    toy = _Wobbly().eval()
    # A gradient that always increases the mean: track the iterates by hand.
    forward = lambda z: torch.cat([-z.flatten(1).sum(1, keepdim=True), torch.zeros(len(z), 1)], 1) * 0 + toy(z)  # noqa: E731
    x_adv = pgd_attack(lambda z: _ascending(z, toy), x, y, eps=0.2, alpha=0.03, steps=10, random_start=False)
    assert toy(x_adv).argmax(1).item() == 1
    del forward


def _ascending(z, toy):
    logits = toy(z)
    return logits + torch.stack([-z.flatten(1).mean(1), z.flatten(1).mean(1)], 1) - torch.stack(
        [-z.flatten(1).mean(1), z.flatten(1).mean(1)], 1).detach()


def test_margin_loss_is_per_example():
    logits = torch.tensor([[10.0, 0.0], [0.0, 1.0]], requires_grad=True)
    labels = torch.tensor([0, 0])
    loss = margin(logits, labels, kappa=0.0)
    assert loss.tolist() == [-10.0, 0.0]
    grad = torch.autograd.grad(loss.sum(), logits)[0]
    assert grad[0].abs().sum() > 0, "a batch-summed clamp would zero this example's gradient"


def test_logits_view_refuses_training_mode_and_out_of_range_inputs():
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    view = LogitsView(model)
    with pytest.raises(RuntimeError, match="training mode"):
        view(torch.rand(1, 1, 2, 2))
    model.eval()
    with pytest.raises(ValueError, match=r"\[0,1\]"):
        view(torch.full((1, 1, 2, 2), 1.5))
    assert view(torch.rand(3, 1, 2, 2)).dtype == torch.float32


def test_eval_mode_restores_the_callers_mode():
    model = nn.BatchNorm1d(2).train()
    with eval_mode(model):
        assert not model.training
    assert model.training


def test_aa_standard_uses_the_official_settings(standard_model):
    adversary = AutoAttack(eps=EPS).build(LogitsView(standard_model.eval()), torch.device("cpu"), seed=0)
    assert standard_settings(adversary) == STANDARD_SETTINGS
    assert adversary.epsilon == float(EPS)


def test_aa_adapter_agrees_with_autoattack_called_directly(standard_model, test_batch):
    from pyautoattack import AutoAttack as Official

    x, y = test_batch[0][:24], test_batch[1][:24]
    seed = 5
    with eval_mode(standard_model) as view:
        rng_before = torch.get_rng_state()
        adapter_adv = ATTACKS.create("aa", eps=EPS)(view, x, y, seed=seed)
        assert torch.equal(torch.get_rng_state(), rng_before), "the caller's RNG must be restored"
        direct = Official(view, eps=float(EPS), device="cpu", version="standard",
                          seed=AutoAttack.seed_from(torch.Generator().manual_seed(seed)))
        direct_adv, direct_pred = direct.run_standard_evaluation(x, y, batch_size=len(x))
        with torch.no_grad():
            adapter_pred = view(adapter_adv).argmax(1)
    assert torch.equal(adapter_pred == y, direct_pred == y)
    assert torch.allclose(adapter_adv, direct_adv)
    assert (adapter_pred == y).float().mean() < 0.2
