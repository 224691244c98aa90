"""Active-set shrinking (broken examples leave the batch mid-attack) returns the same points.

Each case runs an attack twice on the same model, inputs and seed, with and without shrinking,
and requires bit-identical adversarial examples: a speed feature must never change a result.
"""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch

from advdef.attacks import eval_mode
from advdef.attacks.pgd import FGSM, PGD
from advdef.data.base import DataInfo
from advdef.evaluation.cost import PassCounter
from advdef.models import build_model
from advdef.registry import ATTACKS
from conftest import TINY

EPS = Fraction(8, 255)
INFO = DataInfo("toy", (3, 16, 16), 10, tuple("abcdefghij"), (0.5,) * 3, (0.25,) * 3)


def _both(model, spec: str, x, y):
    results, passes = [], []
    for shrink in (False, True):
        attack = ATTACKS.create(spec, eps=EPS)
        attack._shrink = shrink
        with eval_mode(model) as view, PassCounter(model) as counter:
            results.append(attack(view, x, y, seed=7))
        passes.append(counter.forwards)
    return results, passes


@pytest.mark.parametrize("defense", ["none", "cas", "cifs", "fsr", "ewas"])
@pytest.mark.parametrize("spec", ["pgd:steps=10", "cw:steps=10", "pgd:steps=5,restarts=2",
                                  "pgd:steps=5,targeted=least_likely", "fgsm"])
def test_shrinking_returns_the_same_adversarial_examples(defense, spec):
    torch.manual_seed(0)
    model = build_model(TINY["resnet18"], INFO, defense).model.eval()
    x = torch.rand(24, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = model(x).argmax(1)  # all clean-correct, so every break happens during the attack
    (plain, shrunk), (cost_plain, cost_shrunk) = _both(model, spec, x, y)
    assert torch.equal(plain, shrunk)
    assert cost_shrunk <= cost_plain


def test_shrinking_saves_passes_on_a_trained_model(eval_store):
    from advdef.training.trainer import load_run_model

    store, runs = eval_store
    model, _ = load_run_model(store.get_run(runs["standard"]), torch.device("cpu"))
    from advdef.registry import DATASETS

    test = DATASETS.create("digits").load("test", limit=64, seed=0)
    x, y = test.float_images(torch.arange(64)), test.labels
    (plain, shrunk), (cost_plain, cost_shrunk) = _both(model.model, "pgd20", x, y)
    assert torch.equal(plain, shrunk)
    assert cost_shrunk < cost_plain, "samples broken mid-attack stop costing passes"
    assert PGD._shrink and FGSM._shrink, "on by default"
