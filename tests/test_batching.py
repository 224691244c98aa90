"""`--batch-size auto` and out-of-memory handling: results never depend on how memory ran out."""

from __future__ import annotations

import pytest
import torch

import advdef.evaluation.engine as engine
from advdef.device import prepare
from advdef.errors import UserError
from advdef.evaluation import batching
from advdef.evaluation.engine import CLEAN, EvalConfig, evaluate_run, load_target
from advdef.store import Store

ATTACKS = ["fgsm", "pgd:steps=3"]
N = 60
THRESHOLD = 24  # the fake GPU holds batches of at most this many samples


def _oom() -> torch.cuda.OutOfMemoryError:
    return torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (fake)")


# -- the pieces ----------------------------------------------------------------------------------
def test_batch_size_option_accepts_auto_or_a_positive_number():
    assert batching.check_batch_size("auto") == "auto"
    assert batching.check_batch_size(" AUTO ") == "auto"
    assert batching.check_batch_size("64") == 64
    assert batching.check_batch_size(7) == 7
    for bad in (0, -3, "0", "big", 2.5, True, None):
        with pytest.raises(UserError, match="whole number >= 1 or auto"):
            batching.check_batch_size(bad)


def test_out_of_memory_errors_are_recognised():
    assert batching.is_out_of_memory(_oom())
    assert batching.is_out_of_memory(RuntimeError("CUDA error: out of memory"))
    assert not batching.is_out_of_memory(RuntimeError("shape mismatch"))
    assert not batching.is_out_of_memory(ValueError("out of memory"))  # only RuntimeErrors say so


def test_probe_halves_until_a_batch_fits():
    tried = []

    def fits(size):
        tried.append(size)
        if size > 40:
            raise _oom()

    assert batching.probe(fits, torch.device("cpu")) == 32
    assert tried == [256, 128, 64, 32]
    with pytest.raises(torch.cuda.OutOfMemoryError):  # not even one sample fits: the error stands
        batching.probe(lambda size: (_ for _ in ()).throw(_oom()), torch.device("cpu"), start=4)
    with pytest.raises(ValueError):  # other errors are never taken for memory
        batching.probe(lambda size: (_ for _ in ()).throw(ValueError("bug")), torch.device("cpu"))


def test_retry_redoes_the_batch_once_then_refuses_with_a_one_line_error():
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) == 1:
            raise _oom()
        return "done"

    assert batching.retry_out_of_memory(flaky, torch.device("cpu"), 64, "attack pgd") == "done"
    assert len(calls) == 2

    def always():
        raise _oom()

    with pytest.raises(UserError, match="attack pgd at batch size 64") as error:
        batching.retry_out_of_memory(always, torch.device("cpu"), 64, "attack pgd")
    assert "\n" not in str(error.value) and "--batch-size auto or 32" in str(error.value)


# -- whole evaluations with a fake out-of-memory model ----------------------------------------------
@pytest.fixture()
def fake_gpu(monkeypatch):
    """The evaluated model raises CUDA's out-of-memory error on batches above `limit["size"]`
    (and on the calls listed in `limit["fail_calls"]`); the probe runs on CPU as it would on CUDA."""
    limit = {"size": THRESHOLD, "fail_calls": set(), "calls": 0, "raised": 0}
    real_load = engine.load_run_model

    def load(*args, **kwargs):
        built, card = real_load(*args, **kwargs)
        forward = built.model.forward

        def limited(x, *rest, **options):
            limit["calls"] += 1
            if x.shape[0] > limit["size"] or limit["calls"] in limit["fail_calls"]:
                limit["raised"] += 1
                raise _oom()
            return forward(x, *rest, **options)

        built.model.forward = limited
        return built, card

    monkeypatch.setattr(engine, "load_run_model", load)
    monkeypatch.setattr(batching, "PROBED_DEVICE_TYPES", ("cuda", "cpu"))
    return limit


def _outcomes(store: Store, eval_id: int) -> dict[str, list[tuple]]:
    return {a["attack"]: [(r["sample_id"], r["robust"], r["prediction"]) for r in store.outcomes(eval_id, a["attack"])]
            for a in store.eval_attacks(eval_id)}


def _fresh(store: Store, run_id: str) -> Store:
    other = Store(memory=True)
    other.insert_run(store.get_run(run_id))
    return other


def test_auto_backs_off_to_a_batch_that_fits_and_matches_that_fixed_batch_size(eval_store, fake_gpu):
    store, runs = eval_store
    run_id = runs["pgd_at"]
    auto = evaluate_run(store, run_id, EvalConfig(attacks=ATTACKS, n=N, device="cpu", batch_size="auto", checks=False))
    # 256 -> 128 -> 64 -> 32 do not fit (each probes min(size, 60) samples), 16 does.
    [evaluation] = [e for e in store.evaluations(run_id) if e["eval_id"] == auto]
    assert evaluation["protocol"]["batch_size"] == 16
    assert all(a["details"]["batch_size"] == 16 for a in store.eval_attacks(auto) if a["attack"] != CLEAN)

    reference_store = _fresh(store, run_id)
    reference = evaluate_run(reference_store, run_id,
                             EvalConfig(attacks=ATTACKS, n=N, device="cpu", batch_size=16, checks=False))
    assert _outcomes(store, auto) == _outcomes(reference_store, reference)
    assert any(r[1] == 0 for r in _outcomes(store, auto)[ATTACKS[0]]), "the attacks break something"

    # The evaluation now exists: `auto` keeps its batch size for new attacks (and resumes), even
    # if the probe would now choose differently.
    fake_gpu["size"] = 1000
    evaluate_run(store, run_id, EvalConfig(attacks=["pgd:steps=2"], n=N, device="cpu", batch_size="auto", checks=False))
    assert store.eval_attacks(auto)[-1]["details"]["batch_size"] == 16


def test_out_of_memory_while_running_never_changes_the_batch_size(eval_store, fake_gpu):
    store, runs = eval_store
    fresh = _fresh(store, runs["pgd_at"])
    with pytest.raises(UserError, match="the clean pass at batch size 32"):
        evaluate_run(fresh, runs["pgd_at"], EvalConfig(attacks=ATTACKS, n=N, device="cpu", batch_size=32, checks=False))
    [evaluation] = fresh.evaluations()
    assert fresh.outcomes(evaluation["eval_id"]) == [], "nothing computed at another batch size was stored"


def test_a_transient_out_of_memory_error_is_retried_with_the_same_seeds(eval_store, fake_gpu):
    store, runs = eval_store
    config = EvalConfig(attacks=ATTACKS, n=N, device="cpu", batch_size=16, checks=False)
    fake_gpu["size"] = 1000
    reference_store = _fresh(store, runs["pgd_at"])
    reference = evaluate_run(reference_store, runs["pgd_at"], config)
    total, fake_gpu["calls"] = fake_gpu["calls"], 0
    fake_gpu["fail_calls"] = {3, total // 2, total - 2}  # a clean batch, an FGSM or PGD step, the last PGD batch
    flaky_store = _fresh(store, runs["pgd_at"])
    flaky = evaluate_run(flaky_store, runs["pgd_at"], config)
    assert fake_gpu["raised"] == 3
    assert _outcomes(flaky_store, flaky) == _outcomes(reference_store, reference)
    # A retried batch is counted once: its costs are those of the successful attempt.
    costs = [[(a["forwards"], a["backwards"]) for a in s.eval_attacks(e)] for s, e in
             ((flaky_store, flaky), (reference_store, reference))]
    assert costs[0] == costs[1]


def test_auto_on_cpu_is_the_default_and_probes_nothing(eval_store, monkeypatch):
    store, runs = eval_store

    def no_probe(*args, **kwargs):
        raise AssertionError("auto must not probe on CPU")

    monkeypatch.setattr(batching, "probe", no_probe)
    auto_store, default_store = _fresh(store, runs["standard"]), _fresh(store, runs["standard"])
    auto = evaluate_run(auto_store, runs["standard"],
                        EvalConfig(attacks=ATTACKS, n=N, device="cpu", batch_size="auto", checks=False))
    default = evaluate_run(default_store, runs["standard"], EvalConfig(attacks=ATTACKS, n=N, device="cpu", checks=False))
    assert auto_store.evaluations()[0]["protocol"] == default_store.evaluations()[0]["protocol"]
    assert auto_store.evaluations()[0]["protocol"]["batch_size"] == 256
    assert _outcomes(auto_store, auto) == _outcomes(default_store, default)


def test_evaluation_runs_channels_last_on_cpu_as_on_cuda(eval_store):
    store, runs = eval_store
    target = load_target(store, runs["standard"], EvalConfig(n=8, device="cpu"))
    convolutions = [m for m in target.model.modules() if isinstance(m, torch.nn.Conv2d) and m.in_channels > 1]
    assert convolutions and all(m.weight.is_contiguous(memory_format=torch.channels_last) for m in convolutions)
    batch = prepare(torch.rand(4, 3, 8, 8), target.device, True)  # what the engine passes for every batch
    assert batch.is_contiguous(memory_format=torch.channels_last) and not batch.is_contiguous()
