"""Evaluation semantics: per-sample worst case, skipping broken samples, resume, protocol."""

from fractions import Fraction

import pytest

from advdef.evaluation.engine import CLEAN, EvalConfig, evaluate_run
from advdef.evaluation.stats import Proportion, wilson_interval
from advdef.evaluation.summary import summarize
from advdef.pipeline import evaluate, pending_runs
from advdef.store import Store
from conftest import interrupt_evaluation

CHEAP = ["fgsm", "pgd:steps=5"]


def test_wilson_interval_matches_known_values():
    low, high = wilson_interval(500, 1000)
    assert (high - low) / 2 == pytest.approx(0.0309, abs=5e-4)
    low, high = wilson_interval(0, 1000)
    assert low == 0 and high == pytest.approx(0.0038, abs=2e-4)
    assert Proportion(3, 4).value == 0.75


def _fake_evaluation(store: Store) -> int:
    store.insert_run({"run_id": "r", "status": "trained", "dataset": "d", "arch": "a", "defense": "none",
                      "at_method": "standard", "seed": 0, "run_dir": "/x", "config": {}, "versions": {}})
    protocol = {"eps": "8/255", "norm": "Linf", "n": 4, "sample_hash": "h", "seed": 0, "dataset": "d", "split": "test"}
    eval_id = store.get_or_create_evaluation("r", "k", protocol, [0, 1, 2, 3])
    # Attack A breaks samples 0 and 1, attack B breaks samples 2 and 3 (independently run):
    # each alone leaves 50% robust, but no sample survives both.
    outcomes = {
        CLEAN: [(i, 0, 1, 0) for i in range(4)],
        "fgsm": [(0, 0, 0, 1), (1, 0, 0, 1), (2, 0, 1, 0), (3, 0, 1, 0)],
        "pgd:steps=5": [(0, 0, 1, 0), (1, 0, 1, 0), (2, 0, 0, 1), (3, 0, 0, 1)],
    }
    for attack, rows in outcomes.items():
        store.start_attack(eval_id, attack, {})
        store.record_outcomes(eval_id, attack, rows, 1.0)
        store.finish_attack(eval_id, attack, {})
    return eval_id


def test_worst_case_is_the_per_sample_minimum_not_the_mean():
    store = Store(memory=True)
    summary = summarize(store, _fake_evaluation(store))
    assert [a.robust.value for a in summary.attacks] == [0.5, 0.5]
    assert summary.worst.k == 0, "min over attacks per sample, not min of per-attack means"
    assert summary.clean.k == 4


def test_evaluation_stores_every_sample_and_skips_broken_ones(eval_store):
    store, runs = eval_store
    config = EvalConfig(attacks=CHEAP, n=60, device="cpu", batch_size=32)
    eval_id = evaluate_run(store, runs["standard"], config)
    clean = {r["sample_id"]: r["robust"] for r in store.outcomes(eval_id, CLEAN)}
    specs = config.canonical_attacks()
    first = {r["sample_id"]: r["robust"] for r in store.outcomes(eval_id, specs[0])}
    second = {r["sample_id"]: r["robust"] for r in store.outcomes(eval_id, specs[1])}
    assert len(clean) == len(first) == len(second) == 60
    for sid in clean:
        if clean[sid] == 0 or first[sid] == 0:
            assert second[sid] is None, "already-broken samples are not attacked again"
        else:
            assert second[sid] in (0, 1)
    summary = summarize(store, eval_id)
    assert summary.worst.k == sum(1 for s in clean if clean[s] == 1 and first[s] != 0 and second[s] != 0)
    assert summary.attacks[1].robust.k <= summary.attacks[0].robust.k
    protocol = next(e for e in store.evaluations() if e["eval_id"] == eval_id)["protocol"]
    assert protocol["eps"] == "8/255" and protocol["norm"] == "Linf" and protocol["n"] == 60
    assert protocol["model_mode"] == "eval" and protocol["versions"]["torch"]


def test_interrupted_evaluation_resumes_to_the_same_outcomes(eval_store, monkeypatch):
    store, runs = eval_store
    config = EvalConfig(attacks=CHEAP, n=60, device="cpu", batch_size=16, seed=3)
    reference = evaluate_run(store, runs["standard"], config)
    expected = [(r["attack"], r["sample_id"], r["robust"], r["prediction"]) for r in store.outcomes(reference)]

    other = EvalConfig(attacks=CHEAP, n=60, device="cpu", batch_size=16, seed=3, epoch=store.get_run(runs["standard"])["best_epoch"])
    # A second store evaluating the same run, killed after two stored batches of the second attack.
    fresh = interrupt_evaluation(monkeypatch, store, runs["standard"], other, nth=3,
                                 selects=lambda attack, costs: attack.startswith("pgd"))
    eval_id = evaluate_run(fresh, runs["standard"], other)
    resumed = [(r["attack"], r["sample_id"], r["robust"], r["prediction"]) for r in fresh.outcomes(eval_id)]
    assert resumed == expected


def test_pending_runs_and_incremental_attacks(eval_store):
    store, runs = eval_store
    config = EvalConfig(attacks=["fgsm"], n=30, device="cpu")
    assert set(pending_runs(store, config)) == set(runs.values())
    evaluate(store, config)
    assert pending_runs(store, config) == []
    more = EvalConfig(attacks=["fgsm", "pgd:steps=5"], n=30, device="cpu")
    assert set(pending_runs(store, more)) == set(runs.values())
    evaluate(store, more, [runs["pgd_at"]])
    evaluation = store.evaluations(runs["pgd_at"])
    assert len(evaluation) == 1, "new attacks join the existing evaluation of the same protocol"
    assert [a["attack"].split(":")[0] for a in store.eval_attacks(evaluation[0]["eval_id"])] == [CLEAN, "fgsm", "pgd"]


def test_adversarial_training_beats_standard_under_attack(eval_store):
    store, runs = eval_store
    config = EvalConfig(attacks=["pgd20"], n=100, device="cpu", eps=Fraction(16, 255))
    results = {m: summarize(store, evaluate_run(store, r, config)).worst.value for m, r in runs.items()}
    assert results["pgd_at"] > results["standard"]


def test_model_is_evaluated_in_eval_mode_without_labels(eval_store, monkeypatch):
    store, runs = eval_store
    seen = []
    from advdef.models.base import Classifier

    original = Classifier.forward

    def spy(self, x):
        seen.append((self.training, self.context.labels))
        return original(self, x)

    monkeypatch.setattr(Classifier, "forward", spy)
    # Without the sanity checks: their label-independence check plants labels in the context on purpose.
    evaluate_run(store, runs["standard"], EvalConfig(attacks=["fgsm"], n=20, device="cpu", checks=False))
    assert seen and all(training is False and labels is None for training, labels in seen)


def test_sigkilled_evaluate_resumes_to_exactly_the_uninterrupted_outcomes(trained_store, tmp_path):
    """`advdef evaluate` killed with SIGKILL mid-attack, then rerun, stores what one uninterrupted run stores."""
    import shutil
    import signal
    import sqlite3
    import subprocess
    import sys
    import time

    path, runs = trained_store
    with Store(path) as source:
        source.conn.execute("PRAGMA wal_checkpoint(FULL)")
    stores = {name: tmp_path / f"{name}.sqlite" for name in ("reference", "killed")}
    for target in stores.values():
        shutil.copy(path, target)

    def command(store_path):
        return [sys.executable, "-m", "advdef", "evaluate", "--run", runs["standard"], "--attacks",
                "fgsm,pgd:steps=40", "--n", "300", "--batch-size", "8", "--no-checks", "--device", "cpu",
                "--store", str(store_path)]

    def pgd_rows(store_path) -> int:
        with sqlite3.connect(store_path) as conn:
            return conn.execute("SELECT COUNT(*) FROM outcomes WHERE attack LIKE 'pgd%'").fetchone()[0]

    process = subprocess.Popen(command(stores["killed"]), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while process.poll() is None and time.monotonic() < deadline:
        try:
            if pgd_rows(stores["killed"]) >= 8:  # some PGD batches stored, more in flight
                break
        except sqlite3.OperationalError:
            pass
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the evaluation finished before it could be killed"
    partial = pgd_rows(stores["killed"])
    assert 0 < partial < 300

    for store_path in (stores["killed"], stores["reference"]):
        finished = subprocess.run(command(store_path), capture_output=True, text=True, timeout=600)
        assert finished.returncode == 0, finished.stderr

    def outcomes(store_path):
        with Store(store_path) as opened:
            (evaluation,) = opened.evaluations(runs["standard"])
            return [(r["attack"], r["sample_id"], r["robust"], r["prediction"]) for r in opened.outcomes(evaluation["eval_id"])]

    assert outcomes(stores["killed"]) == outcomes(stores["reference"])
