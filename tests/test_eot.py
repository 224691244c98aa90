"""Expectation over Transformation in the gradient attacks, and how evaluations flag stochastic
defenses evaluated without it."""

import shutil

import pytest
import torch
from torch import nn

from advdef.attacks.pgd import pgd_attack, project
from advdef.errors import UserError
from advdef.evaluation.engine import CLEAN, EvalConfig, evaluate_run
from advdef.evaluation.summary import STOCHASTIC_WITHOUT_EOT, evaluation_warnings, short_label, summarize
from advdef.registry import ATTACKS
from advdef.report import comparison_tables
from advdef.store import Store
from advdef.training.config import TrainConfig
from advdef.training.trainer import start_run


class TwoMaps(nn.Module):
    """logits = (w . x, 0) with w drawn per forward from {a, b} by a seeded generator; logs each draw.

    With the objective "logit 0", the input gradient of one pass is exactly the drawn w, so the
    EOT step direction is predictable: sign(mean of the drawn w's).
    """

    def __init__(self, a: list[float], b: list[float], seed: int = 0) -> None:
        super().__init__()
        self.maps = torch.tensor([a, b])
        self.generator = torch.Generator().manual_seed(seed)
        self.draws: list[int] = []

    def draw(self) -> int:
        return int(torch.randint(2, (1,), generator=self.generator))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pick = self.draw()
        self.draws.append(pick)
        score = x.flatten(1) @ self.maps[pick]
        return torch.stack([score, torch.zeros_like(score)], 1)


def logit_zero(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return logits[:, 0]


A, B = [1.0, 1.0, -1.0, 0.5], [-3.0, 1.0, 1.0, -0.2]


@pytest.mark.parametrize("eot", [1, 3, 4])
def test_eot_calls_the_forward_k_times_and_steps_along_the_mean_gradient(eot):
    model = TwoMaps(A, B, seed=eot)
    x, y = torch.full((2, 4), 0.5), torch.zeros(2, dtype=torch.long)
    steps, alpha, eps = 2, 0.05, 0.3
    x_adv = pgd_attack(model, x, y, eps=eps, alpha=alpha, steps=steps, random_start=False, loss=logit_zero,
                       track_best=False, eot=eot)
    assert len(model.draws) == steps * eot
    expected = x.clone()
    for step in range(steps):
        drawn = model.maps[model.draws[step * eot:(step + 1) * eot]]
        expected = project(expected + alpha * drawn.mean(0).sign(), x, eps)
    assert torch.allclose(x_adv, expected)


def test_eot_direction_is_the_mean_not_the_first_draw():
    # Draws (a, a, b): the mean's sign on coordinate 0 is that of a + a + b = -1, i.e. b's, not a's.
    model = TwoMaps(A, B)
    forced = iter([0, 0, 1])
    model.draw = lambda: next(forced)  # type: ignore[method-assign]
    x, y = torch.full((1, 4), 0.5), torch.zeros(1, dtype=torch.long)
    x_adv = pgd_attack(model, x, y, eps=0.3, alpha=0.1, steps=1, random_start=False, loss=logit_zero,
                       track_best=False, eot=3)
    assert torch.allclose(x_adv, x + 0.1 * torch.tensor([[-1.0, 1.0, -1.0, 1.0]]))


def test_best_iterate_uses_the_first_pass_logits():
    model = TwoMaps(A, B, seed=1)
    x, y = torch.full((2, 4), 0.5), torch.zeros(2, dtype=torch.long)
    pgd_attack(model, x, y, eps=0.1, alpha=0.05, steps=3, random_start=False, eot=2, shrink=False)
    assert len(model.draws) == 3 * 2 + 1, "one extra forward scores the last iterate, without EOT"


def _small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))


def test_eot_1_is_bit_identical_to_plain_pgd():
    net = _small_net()
    x, y = torch.rand(6, 1, 4, 4), torch.randint(3, (6,))
    common = dict(eps=0.1, alpha=0.02, steps=5, restarts=2)
    plain = pgd_attack(net, x, y, **common, generator=torch.Generator().manual_seed(1))
    with_eot = pgd_attack(net, x, y, **common, eot=1, generator=torch.Generator().manual_seed(1))
    assert torch.equal(plain, with_eot)
    # ... and to the textbook loop it implements (no best tracking, no start noise).
    reference = x.clone()
    for _ in range(5):
        reference.requires_grad_(True)
        loss = nn.functional.cross_entropy(net(reference), y, reduction="sum")
        gradient = torch.autograd.grad(loss, reference)[0]
        reference = project(reference.detach() + 0.02 * gradient.sign(), x, 0.1)
    ours = pgd_attack(net, x, y, eps=0.1, alpha=0.02, steps=5, random_start=False, track_best=False, eot=1)
    assert torch.equal(ours, reference)


def test_eot_specs_parse_validate_and_canonicalise():
    attack = ATTACKS.create("pgd20:eot=4")
    assert attack.eot == 4 and attack.steps == 20
    assert attack.spec() == "pgd:alpha=2/255,eot=4,kappa=0.0,loss=ce,random_start=true,restarts=1,steps=20"
    assert short_label(attack.spec()) == "pgd20:eot=4"
    # Without EOT the canonical specs are unchanged, so stored results keep matching.
    assert "eot" not in ATTACKS.create("pgd20").spec() and ATTACKS.create("fgsm").spec() == "fgsm"
    assert ATTACKS.create("pgd20:eot=1").spec() == ATTACKS.create("pgd20").spec()
    assert ATTACKS.create("fgsm:eot=3").spec() == "fgsm:eot=3"
    assert ATTACKS.create("cw:eot=2").eot == 2 and "eot=2" in ATTACKS.create("cw:eot=2").spec()
    for bad in ("pgd:eot=0", "pgd:eot=1.5", "pgd:eot=true", "fgsm:eot=-1"):
        with pytest.raises(UserError, match="eot must be"):
            ATTACKS.create(bad)


def test_warning_only_for_stochastic_defenses_without_eot():
    class Result:
        def __init__(self, eot):
            self.eot = eot

    assert evaluation_warnings({"stochastic_defense": True}, [Result(1)]) == [STOCHASTIC_WITHOUT_EOT]
    assert evaluation_warnings({"stochastic_defense": True}, [Result(1), Result(30)]) == []
    assert evaluation_warnings({"stochastic_defense": False}, [Result(1)]) == []
    assert evaluation_warnings({}, [Result(1)]) == [], "evaluations stored before the flag existed"


@pytest.fixture(scope="module")
def randomized_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("randomize")
    with Store(root / "store.sqlite") as store:
        config = TrainConfig(data="digits", arch="smallcnn:width=4", defense="randomize", at="standard", epochs=1,
                             limit_train=64, batch_size=32, val_n=16, lr=0.01, device="cpu")
        run_id = start_run(config, store, root / "runs")
    return root / "store.sqlite", run_id


def _copy(path, tmp_path) -> Store:
    shutil.copy(path, tmp_path / "copy.sqlite")
    return Store(tmp_path / "copy.sqlite")


def test_evaluation_warns_until_an_eot_attack_is_run(randomized_run, tmp_path):
    path, run_id = randomized_run
    store = _copy(path, tmp_path)
    # --eot 1 switches off the EOT a stochastic defense otherwise gets by default (advdef.evaluation.suites).
    eval_id = evaluate_run(store, run_id, EvalConfig(attacks=["fgsm"], n=10, device="cpu", eot=1, checks=False))
    summary = summarize(store, eval_id)
    assert summary.stochastic and summary.protocol["stochastic_defense"] is True
    assert summary.warnings == [STOCHASTIC_WITHOUT_EOT]
    notes = comparison_tables(store)[0].notes
    assert any(STOCHASTIC_WITHOUT_EOT in note and "pgd:eot=30" in note for note in notes)
    assert any("stochastic defense, each accuracy is one random draw; EOT attacks: none" in n for n in notes)

    again = evaluate_run(store, run_id, EvalConfig(attacks=["fgsm", "pgd:steps=5,eot=4"], n=10, device="cpu", eot=1,
                                                   checks=False))
    assert again == eval_id
    summary = summarize(store, eval_id)
    assert [a.eot for a in summary.attacks] == [1, 4]
    assert summary.warnings == []
    notes = comparison_tables(store)[0].notes
    assert not any(STOCHASTIC_WITHOUT_EOT in note for note in notes)
    assert any("EOT attacks: pgd5:eot=4" in note for note in notes)


def test_eot_only_evaluation_has_no_warning(randomized_run, tmp_path):
    path, run_id = randomized_run
    store = _copy(path, tmp_path)
    eval_id = evaluate_run(store, run_id, EvalConfig(attacks=["pgd:steps=5,eot=4"], n=10, device="cpu", checks=False))
    assert summarize(store, eval_id).warnings == []


def test_a_stochastic_defense_gets_eot_by_default(randomized_run, tmp_path):
    path, run_id = randomized_run
    store = _copy(path, tmp_path)
    summary = summarize(store, evaluate_run(store, run_id, EvalConfig(attacks=["fgsm"], n=10, device="cpu",
                                                                      checks=False)))
    assert [a.eot for a in summary.attacks] == [20] and summary.warnings == []


def test_stochastic_evaluation_is_reproducible(randomized_run, tmp_path):
    # The defense draws from the global RNG, which the evaluation seeds per batch: two stores
    # evaluating the same run agree on every outcome, clean and attacked.
    path, run_id = randomized_run
    outcomes = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        store = _copy(path, tmp_path / name)
        torch.manual_seed(len(outcomes))  # the caller's RNG state must not matter
        eval_id = evaluate_run(store, run_id, EvalConfig(attacks=["fgsm"], n=20, batch_size=8, device="cpu"))
        outcomes.append([(r["attack"], r["sample_id"], r["robust"], r["prediction"]) for r in store.outcomes(eval_id)])
    assert outcomes[0] == outcomes[1]
    assert any(attack == CLEAN for attack, *_ in outcomes[0])
