"""Attack cost as forward/backward sample-passes: the counting rule, storage, resume, old stores."""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch
from torch import nn

import advdef.store.sqlite as sqlite_store
from advdef.attacks.base import LogitsView
from advdef.attacks.official import PlainLogits
from advdef.attacks.pgd import CW, FGSM, PGD
from advdef.evaluation.cost import PassCounter
from advdef.evaluation.engine import EvalConfig, evaluate_run
from advdef.evaluation.summary import summarize
from advdef.store import Store
from advdef.store.schema import MIGRATIONS
from conftest import interrupt_evaluation

B = 5
EPS = Fraction(8, 255)


class Tiny(nn.Module):
    """(B, 3, 2, 2) -> 3 logits; keeps its hidden features like a defense's auxiliary head."""

    def __init__(self, bias: float = 0.0) -> None:
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(0)
            self.hidden = nn.Linear(12, 4)
            self.out = nn.Linear(4, 3)
        with torch.no_grad():
            self.out.bias[0] += bias
        self.aux: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.aux = torch.tanh(self.hidden(x.flatten(1)))
        return self.out(self.aux)


@pytest.fixture(autouse=True)
def no_shrinking(monkeypatch):
    """The exact counts below are the rule without active-set shrinking (broken examples leaving
    the batch mid-attack); test_shrinking_only_removes_passes covers what shrinking saves."""
    monkeypatch.setattr(PGD, "_shrink", False)
    monkeypatch.setattr(FGSM, "_shrink", False)


def _batch(model: nn.Module) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    x = torch.rand(B, 3, 2, 2, generator=torch.Generator().manual_seed(1))
    return LogitsView(model.eval()), x, torch.zeros(B, dtype=torch.long)


def _count(model: nn.Module, attack, *, seed: int = 0) -> tuple[int, int]:
    view, x, y = _batch(model)
    with PassCounter(model) as passes:
        attack(view, x, y, seed=seed)
    return passes.forwards, passes.backwards


# -- the counting rule on a tiny model ---------------------------------------------------------
def test_clean_forward_counts_the_batch_and_no_backward():
    model = Tiny()
    view, x, _ = _batch(model)
    with PassCounter(model) as passes, torch.no_grad():
        view(x)
    assert (passes.forwards, passes.backwards) == (B, 0)


def test_fgsm_is_two_forwards_and_one_backward_per_sample():
    # pgd_attack with steps=1: one forward + backward for the step, then one forward scoring the
    # stepped point (best-iterate tracking); no random start, one restart.
    assert _count(Tiny(), FGSM(eps=EPS)) == (2 * B, B)


@pytest.mark.parametrize("steps", [1, 3, 7])
def test_pgd_k_is_k_plus_one_forwards_and_k_backwards_per_sample(steps):
    # The random start costs nothing; k gradient steps; one last scoring forward of the final
    # iterate (run with gradients enabled, but nothing is differentiated through it).
    assert _count(Tiny(), PGD(eps=EPS, steps=steps)) == ((steps + 1) * B, steps * B)
    assert _count(Tiny(), CW(eps=EPS, steps=steps)) == ((steps + 1) * B, steps * B)


def test_eot_counts_every_draw():
    steps, eot = 3, 4
    assert _count(Tiny(), PGD(eps=EPS, steps=steps, eot=eot)) == ((steps * eot + 1) * B, steps * eot * B)
    assert _count(Tiny(), FGSM(eps=EPS, eot=eot)) == ((eot + 1) * B, eot * B)


def test_restarts_run_on_the_unbroken_points_only():
    # Class 0 wins by a margin no eps-step can close: nothing breaks, so both restarts attack all.
    steps = 2
    assert _count(Tiny(bias=100.0), PGD(eps=EPS, steps=steps, restarts=2)) == (2 * (steps + 1) * B, 2 * steps * B)


def test_targeted_pgd_counts_the_least_likely_class_forward():
    steps = 2
    counted = _count(Tiny(), PGD(eps=EPS, steps=steps, targeted="least_likely"))
    assert counted == ((steps + 2) * B, steps * B)


def test_wrappers_count_each_model_call_once():
    model = Tiny()
    view, x, _ = _batch(model)
    nested = PlainLogits(LogitsView(model), x.dtype)  # the official attacks' route to the model
    with PassCounter(model) as passes, torch.no_grad():
        view(x)
        nested(x)
        model(x[:2])  # an adaptive attack may call AttackContext.model directly
    assert (passes.forwards, passes.backwards) == (2 * B + 2, 0)


def test_backwards_through_auxiliary_tensors_and_repeated_backwards_count():
    model = Tiny().eval()
    _, x, _ = _batch(model)
    with PassCounter(model) as passes:
        x_adv = x.clone().requires_grad_(True)
        model(x_adv)
        # A loss on a head the model stored (adaptive mode=head): not through the returned logits.
        torch.autograd.grad(model.aux.sum(), x_adv)
        assert passes.backwards == B
        # FAB: one backward per class through a single forward.
        logits = model(x_adv)
        for k in range(3):
            torch.autograd.grad(logits[:, k].sum(), x_adv, retain_graph=True)
    assert (passes.forwards, passes.backwards) == (2 * B, 4 * B)


def test_counting_stops_at_the_end_of_the_block_and_keeps_gradients():
    model = Tiny().eval()
    _, x, _ = _batch(model)
    x_adv = x.clone().requires_grad_(True)
    expected = torch.autograd.grad(model(x_adv).sum(), x_adv)[0]
    with PassCounter(model) as passes:
        got = torch.autograd.grad(model(x_adv).sum(), x_adv)[0]
    torch.testing.assert_close(got, expected)
    with torch.no_grad():
        model(x)
    assert (passes.forwards, passes.backwards) == (B, B)
    assert not model._forward_pre_hooks, "the hook is removed"


# -- storage ------------------------------------------------------------------------------------
def test_record_outcomes_adds_costs_with_the_batch():
    store = Store(memory=True)
    store.insert_run({"run_id": "r", "status": "trained", "dataset": "d", "arch": "a", "defense": "none",
                      "at_method": "standard", "seed": 0, "run_dir": "/x", "config": {}, "versions": {}})
    eval_id = store.get_or_create_evaluation("r", "k", {"eps": "8/255", "norm": "Linf", "n": 2, "sample_hash": "h", "seed": 0}, [0, 1])
    store.start_attack(eval_id, "fgsm", {})
    store.record_outcomes(eval_id, "fgsm", [(0, 0, 1, 0)], 0.5, forwards=3, backwards=1)
    store.record_outcomes(eval_id, "fgsm", [(1, 0, 0, 1)], 0.5, forwards=3, backwards=1)
    store.record_outcomes(eval_id, "fgsm", [], 0.0)  # skipped rows cost nothing
    (row,) = store.eval_attacks(eval_id)
    assert (row["seconds"], row["forwards"], row["backwards"]) == (1.0, 6, 2)


def test_a_store_created_before_costs_gets_the_columns_with_zeros(tmp_path, monkeypatch):
    path = tmp_path / "old.sqlite"
    monkeypatch.setattr(sqlite_store, "MIGRATIONS", MIGRATIONS[:2])  # 0001_initial + 0002_checks
    with Store(path) as old:
        old.insert_run({"run_id": "r", "status": "trained", "dataset": "d", "arch": "a", "defense": "none",
                        "at_method": "standard", "seed": 0, "run_dir": "/x", "config": {}, "versions": {}})
        eval_id = old.get_or_create_evaluation("r", "k", {"eps": "8/255", "norm": "Linf", "n": 1, "sample_hash": "h", "seed": 0}, [7])
        # What the code of that time wrote: six columns, seconds only.
        old.conn.execute("INSERT INTO eval_attacks VALUES (?, 'clean', 0, 'done', 2.5, '{}')", (eval_id,))
        old.conn.execute("INSERT INTO outcomes VALUES (?, 'clean', 7, 0, 1, 0)", (eval_id,))
        columns = {r[1] for r in old.conn.execute("PRAGMA table_info(eval_attacks)")}
        assert "forwards" not in columns
    monkeypatch.setattr(sqlite_store, "MIGRATIONS", MIGRATIONS)

    with Store(path) as store:
        applied = [r[0] for r in store.conn.execute("SELECT name FROM _migrations ORDER BY name")]
        assert applied == [name for name, _ in MIGRATIONS]
        (row,) = store.eval_attacks(eval_id)
        assert (row["seconds"], row["forwards"], row["backwards"]) == (2.5, 0, 0)
        summary = summarize(store, eval_id)
        assert (summary.forwards, summary.backwards, summary.seconds) == (0, 0, 2.5)
        store.start_attack(eval_id, "fgsm", {})  # new attacks join the old evaluation
        store.record_outcomes(eval_id, "fgsm", [(7, 0, 1, 0)], 1.0, forwards=3, backwards=1)
        assert [(a["attack"], a["forwards"], a["backwards"]) for a in store.eval_attacks(eval_id)] == [
            ("clean", 0, 0), ("fgsm", 3, 1)]
    with Store(path) as reopened:  # reopening applies nothing twice
        assert reopened.conn.execute("SELECT COUNT(*) FROM _migrations").fetchone()[0] == len(MIGRATIONS)
        assert len(reopened.eval_attacks(eval_id)) == 2


# -- the evaluation engine ----------------------------------------------------------------------
PGD_STEPS = 3
ATTACKS = ["fgsm", f"pgd:steps={PGD_STEPS}"]


def _costs(store: Store, eval_id: int) -> list[tuple[str, int, int]]:
    return [(a["attack"], a["forwards"], a["backwards"]) for a in store.eval_attacks(eval_id)]


def test_evaluation_stores_exact_pass_counts(eval_store):
    store, runs = eval_store
    n = 40
    config = EvalConfig(attacks=ATTACKS, n=n, device="cpu", batch_size=16, checks=False)
    eval_id = evaluate_run(store, runs["pgd_at"], config)
    clean, fgsm, pgd = store.eval_attacks(eval_id)
    attacked = {a["attack"]: sum(1 for r in store.outcomes(eval_id, a["attack"]) if r["robust"] is not None)
                for a in (fgsm, pgd)}
    assert attacked[pgd["attack"]] > 0, "the test needs samples that survive FGSM"
    assert attacked[fgsm["attack"]] < n or attacked[pgd["attack"]] < attacked[fgsm["attack"]], "and skipped ones"

    assert (clean["forwards"], clean["backwards"]) == (n, 0)
    # Each batch: the attack's passes plus one re-scoring forward of x_adv; skipped samples are free.
    a = attacked[fgsm["attack"]]
    assert (fgsm["forwards"], fgsm["backwards"]) == (3 * a, a)
    a = attacked[pgd["attack"]]
    assert (pgd["forwards"], pgd["backwards"]) == ((PGD_STEPS + 2) * a, PGD_STEPS * a)

    summary = summarize(store, eval_id)
    assert [(r.spec, r.forwards, r.backwards) for r in summary.attacks] == _costs(store, eval_id)[1:]
    assert summary.forwards == clean["forwards"] + fgsm["forwards"] + pgd["forwards"]
    assert summary.backwards == fgsm["backwards"] + pgd["backwards"]


def test_interrupted_evaluation_counts_each_stored_batch_once(eval_store, monkeypatch):
    store, runs = eval_store
    config = EvalConfig(attacks=ATTACKS, n=48, device="cpu", batch_size=8, seed=5, checks=False)
    reference = evaluate_run(store, runs["pgd_at"], config)

    # The same evaluation in another store, killed after the passes of a PGD batch were spent
    # but before its outcomes were stored: the resumed run recomputes that batch.
    fresh = interrupt_evaluation(monkeypatch, store, runs["pgd_at"], config, nth=2,
                                 selects=lambda attack, costs: attack.startswith("pgd") and costs.get("forwards"))
    resumed = evaluate_run(fresh, runs["pgd_at"], config)

    assert _costs(fresh, resumed) == _costs(store, reference)
    totals = [(s.forwards, s.backwards) for s in (summarize(fresh, resumed), summarize(store, reference))]
    assert totals[0] == totals[1] and totals[0][1] > 0


def test_adaptive_head_attacks_count_their_backwards_through_the_heads():
    # mode=head differentiates the defense's auxiliary heads, never the returned logits, through
    # the model it was bound to (AttackContext.model), not the evaluation's view.
    from advdef.attacks.base import AttackContext
    from advdef.models import build_model
    from advdef.registry import ATTACKS, DATASETS

    info = DATASETS.create("digits").info
    with torch.random.fork_rng():
        torch.manual_seed(0)
        built = build_model("resnet18:width=4", info, "cifs")
    model = built.model.eval()
    steps, n = 3, 4
    attack = ATTACKS.create(f"adaptive:mode=head,head=mean,steps={steps}")
    attack.bind(AttackContext(model=model, defense=built.defense, run={}, device=torch.device("cpu")))
    x = torch.rand(n, *info.input_shape, generator=torch.Generator().manual_seed(0))
    y = torch.zeros(n, dtype=torch.long)
    with PassCounter(model) as passes:
        attack(LogitsView(model), x, y)
    # One forward + backward per step on the unbroken points, a last forward to judge the final
    # iterate; the loop stops early once every point is broken.
    assert passes.backwards > 0 and passes.backwards % n == 0
    assert passes.forwards - passes.backwards in (0, n)
    assert passes.backwards <= steps * n


def test_shrinking_only_removes_passes(monkeypatch):
    model = Tiny()
    view, x, y = _batch(model)
    without = _count(model, PGD(eps=EPS, steps=5), seed=3)
    x_without = PGD(eps=EPS, steps=5)(view, x, y, seed=3)
    monkeypatch.setattr(PGD, "_shrink", True)
    with_shrinking = _count(model, PGD(eps=EPS, steps=5), seed=3)
    assert torch.equal(PGD(eps=EPS, steps=5)(view, x, y, seed=3), x_without)
    assert with_shrinking[0] < without[0] and with_shrinking[1] <= without[1]
