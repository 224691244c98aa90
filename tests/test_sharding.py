"""Sharded evaluation: N processes give the unsharded outcomes sample by sample (advdef.evaluation.sharding)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from advdef.cli import app
from advdef.errors import UserError
from advdef.evaluation.engine import EvalConfig, _batches, check_same_order, evaluate_run, shared_batch_size
from advdef.evaluation.sharding import Shard, from_environment, missing_shards, parse_shard, refusal, wait_until_complete
from advdef.progress import SilentReporter
from advdef.report import comparison_tables, refused_evaluations
from advdef.store import Store

# Random starts (pgd), a random search (square) and a deterministic attack: every kind of
# per-batch randomness must land on the same samples when the batches are spread over shards.
ATTACKS_CLEAN = "fgsm,pgd:steps=5,square:queries=20"


@pytest.mark.parametrize(
    ("text", "expected"),
    [("1/1", Shard(1, 1)), ("2/4", Shard(2, 4)), (" 3 / 3 ", Shard(3, 3))],
)
def test_parse_shard_accepts_k_of_n(text, expected):
    assert parse_shard(text) == expected


@pytest.mark.parametrize("text", ["0/2", "3/2", "2", "a/b", "1/0", "-1/2", "1/2/3"])
def test_parse_shard_rejects_with_one_line(text):
    with pytest.raises(UserError, match="--shard must be K/N"):
        parse_shard(text)


@pytest.mark.parametrize("count", [1, 2, 3, 5])
def test_shards_cover_every_batch_exactly_once(count):
    import torch

    positions = torch.arange(103)
    seen = [p for k in range(1, count + 1) for batch in _batches(positions, 8, Shard(k, count)) for p in batch.tolist()]
    assert sorted(seen) == list(range(103))


def test_torchrun_environment_gives_the_rank_its_shard():
    assert from_environment({"WORLD_SIZE": "4", "RANK": "2", "LOCAL_RANK": "2"}) == Shard(3, 4)
    assert from_environment({"WORLD_SIZE": "1", "RANK": "0"}) is None
    assert from_environment({}) is None


def _evaluation(store: Store, n: int = 4, batch_size: int = 2) -> int:
    store.insert_run({"run_id": "r", "status": "trained", "dataset": "d", "arch": "a", "defense": "none",
                      "at_method": "standard", "seed": 0, "run_dir": "/x", "config": {}, "versions": {}})
    protocol = {"eps": "8/255", "norm": "Linf", "n": n, "sample_hash": "h", "seed": 0, "batch_size": batch_size}
    return store.get_or_create_evaluation("r", "k", protocol, list(range(n)))


def test_shards_share_the_batch_size_the_evaluation_recorded(store):
    """The batch size draws the layout the shards split: auto adopts the recorded one, another is refused."""
    eval_id = _evaluation(store, batch_size=32)
    assert shared_batch_size(store, eval_id, 32, False, Shard(2, 2)) == 32
    assert shared_batch_size(store, eval_id, 256, True, Shard(2, 2)) == 32  # --batch-size auto probed 256
    with pytest.raises(UserError, match=r"--batch-size 64, but evaluation \d+ runs with batch size 32"):
        shared_batch_size(store, eval_id, 64, False, Shard(2, 2))


def test_shard_with_another_attack_order_is_refused(store):
    eval_id = _evaluation(store)
    for attack in ("clean", "fgsm", "pgd"):
        store.start_attack(eval_id, attack, {})
    check_same_order(store, eval_id, ["clean", "fgsm"], "pgd", Shard(2, 2))
    with pytest.raises(UserError, match="another order"):
        check_same_order(store, eval_id, ["clean", "pgd"], "fgsm", Shard(2, 2))


def test_waiting_shard_gives_up_naming_what_is_missing(store):
    eval_id = _evaluation(store)
    store.start_attack(eval_id, "clean", {})
    store.record_outcomes(eval_id, "clean", [(0, 0, 1, 0), (1, 1, 1, 1)], 0.0)
    now = [0.0]
    with pytest.raises(UserError, match=r"gave up after 30s .*clean lacks 2 of 4"):
        wait_until_complete(store, eval_id, ["clean"], 4, Shard(2, 2), SilentReporter(), timeout=30,
                            clock=lambda: now[0], sleep=lambda s: now.__setitem__(0, now[0] + s))
    # Unsharded work never waits: it did everything itself.
    wait_until_complete(store, eval_id, ["clean"], 4, Shard(1, 1), SilentReporter(), timeout=0)


def test_attack_is_done_only_when_every_shard_has_landed(store):
    eval_id = _evaluation(store)
    store.start_attack(eval_id, "clean", {})
    store.record_outcomes(eval_id, "clean", [(0, 0, 1, 0), (2, 0, 1, 0)], 0.0)
    assert store.finish_attack(eval_id, "clean", {"warnings": ["from shard 1"]}) is False
    assert store.eval_attacks(eval_id)[0]["status"] == "running"
    store.record_outcomes(eval_id, "clean", [(1, 1, 1, 1), (3, 1, 0, 0)], 0.0)
    assert store.finish_attack(eval_id, "clean", {"warnings": ["from shard 2"]}) is True
    (attack,) = store.eval_attacks(eval_id)
    assert attack["status"] == "done"
    assert attack["details"]["warnings"] == ["from shard 1", "from shard 2"]


def test_second_shard_count_is_refused_while_the_first_is_unfinished(store):
    eval_id = _evaluation(store)
    store.register_shard(eval_id, 1, 2, "host:1")
    store.register_shard(eval_id, 2, 2, "host:2")
    with pytest.raises(UserError, match=r"sharded as 1/2.*--shard K/2"):
        store.register_shard(eval_id, 1, 3, "host:3")
    store.finish_shard(eval_id, 1, 2)
    store.finish_shard(eval_id, 2, 2)
    store.register_shard(eval_id, 1, 3, "host:3")  # all of the old split finished: a new split may start


def test_report_refuses_an_evaluation_with_a_missing_shard(store, tmp_path):
    eval_id = _evaluation(store)
    store.register_shard(eval_id, 1, 2, "host:1")
    store.start_attack(eval_id, "clean", {})
    store.record_outcomes(eval_id, "clean", [(0, 0, 1, 0), (2, 0, 1, 0)], 0.0)
    store.finish_attack(eval_id, "clean", {})
    store.finish_shard(eval_id, 1, 2)
    assert missing_shards(store, eval_id) == ["2/2"]
    (evaluation,) = store.evaluations()
    assert "missing shard(s) 2/2" in refusal(store, evaluation)
    assert comparison_tables(store) == []
    assert len(refused_evaluations(store)) == 1

    result = CliRunner().invoke(app, ["report", "--markdown", "--store", store.path])
    assert result.exit_code == 1
    assert "missing shard(s) 2/2" in result.output and "--shard K/2" in result.output

    # The second shard lands: the same evaluation is now reported.
    store.register_shard(eval_id, 2, 2, "host:2")
    store.record_outcomes(eval_id, "clean", [(1, 1, 1, 1), (3, 1, 0, 0)], 0.0)
    store.finish_attack(eval_id, "clean", {})
    store.finish_shard(eval_id, 2, 2)
    assert refused_evaluations(store) == []
    assert len(comparison_tables(store)) == 1


# -- end to end: shards as real processes against one store ------------------------------------
def _copy(trained_store, target: Path) -> Path:
    path, _ = trained_store
    with Store(path) as source:
        source.conn.execute("PRAGMA wal_checkpoint(FULL)")
    shutil.copy(path, target)
    return target


def _outcomes(store_path: Path | str, run_id: str) -> list[tuple]:
    with Store(store_path) as opened:
        (evaluation,) = opened.evaluations(run_id)
        return [(r["attack"], r["sample_id"], r["label"], r["robust"], r["prediction"])
                for r in opened.outcomes(evaluation["eval_id"])]


def _unsharded(trained_store, tmp_path: Path) -> list[tuple]:
    _, runs = trained_store
    reference = _copy(trained_store, tmp_path / "reference.sqlite")
    with Store(reference) as store:
        config = EvalConfig(attacks=ATTACKS_CLEAN.split(","), n=60, batch_size=8, device="cpu", checks=False)
        evaluate_run(store, runs["pgd_at"], config)
    return _outcomes(reference, runs["pgd_at"])


def _command(store_path: Path | str, run_id: str, *extra: str) -> list[str]:
    # "--" ends torchrun's own options: it would take --run and --n for abbreviations of its own.
    return ["-m", "advdef", "--", "evaluate", "--run", run_id, "--attacks", ATTACKS_CLEAN, "--n", "60",
            "--batch-size", "8", "--device", "cpu", "--store", str(store_path), *extra]


def test_two_shard_processes_equal_the_unsharded_evaluation_per_sample(trained_store, tmp_path):
    _, runs = trained_store
    expected = _unsharded(trained_store, tmp_path)
    sharded = _copy(trained_store, tmp_path / "sharded.sqlite")
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    processes = [
        subprocess.Popen([sys.executable, *_command(sharded, runs["pgd_at"], "--shard", f"{k}/2", "--n-check", "20")],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        for k in (1, 2)
    ]
    for process in processes:
        out, err = process.communicate(timeout=600)
        assert process.returncode == 0, err
    assert _outcomes(sharded, runs["pgd_at"]) == expected
    with Store(sharded) as store:
        (evaluation,) = store.evaluations(runs["pgd_at"])
        assert [a["status"] for a in store.eval_attacks(evaluation["eval_id"])] == ["done"] * 4
        assert [(s["shard"], s["shards"], s["status"]) for s in store.shards(evaluation["eval_id"])] == [
            (1, 2, "done"), (2, 2, "done")]
        assert store.checks(evaluation["eval_id"]), "shard 1 runs the sanity checks on the merged outcomes"
        assert refused_evaluations(store) == []


@pytest.mark.parametrize("launcher", ["torchrun", "nproc"])
def test_torchrun_ranks_shard_automatically(trained_store, tmp_path, launcher):
    """Under torchrun (or `advdef evaluate --nproc 2`, which re-runs itself under torchrun) each rank takes its shard."""
    pytest.importorskip("torch.distributed.run")
    _, runs = trained_store
    expected = _unsharded(trained_store, tmp_path)
    sharded = _copy(trained_store, tmp_path / "torchrun.sqlite")
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    command = _command(sharded, runs["pgd_at"], "--no-checks")
    if launcher == "torchrun":
        command = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *command]
    else:
        command = [arg for arg in command if arg != "--"] + ["--nproc", "2"]
    result = subprocess.run([sys.executable, *command], capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert _outcomes(sharded, runs["pgd_at"]) == expected
    with Store(sharded) as store:
        (evaluation,) = store.evaluations(runs["pgd_at"])
        assert [(s["shard"], s["shards"]) for s in store.shards(evaluation["eval_id"])] == [(1, 2), (2, 2)]


def test_nproc_rebuilds_repeated_options_and_refuses_shard(monkeypatch):
    launched = []
    monkeypatch.setattr(subprocess, "run", lambda command, check: launched.append(command) or
                        subprocess.CompletedProcess(command, 0))
    result = CliRunner().invoke(app, ["evaluate", "--attacks", "fgsm", "--run", "a", "--run", "b", "--n", "10",
                                      "--no-checks", "--nproc", "2"])
    assert result.exit_code == 0, result.output
    (command,) = launched
    arguments = command[command.index("advdef") + 1:]
    assert arguments[:2] == ["--", "evaluate"] and "--nproc" not in arguments
    assert [arguments[i + 1] for i, a in enumerate(arguments) if a == "--run"] == ["a", "b"]
    assert "--no-checks" in arguments and arguments[arguments.index("--n") + 1] == "10"
    result = CliRunner().invoke(app, ["evaluate", "--attacks", "fgsm", "--shard", "1/2", "--nproc", "2"])
    assert result.exit_code == 2 and "drop --shard" in result.output


def test_shards_on_a_shared_postgresql_store_equal_the_unsharded_evaluation(trained_store, tmp_path, postgres_url):
    """Many machines' case: two shard processes writing to one PostgreSQL store."""
    path, runs = trained_store
    run_id = runs["pgd_at"]
    expected = _unsharded(trained_store, tmp_path)
    with Store(path) as source, Store(postgres_url) as shared:  # the trained run, registered on the server
        run = source.get_run(run_id)
        shared.insert_run({k: run[k] for k in ("run_id", "created_at", "status", "dataset", "arch", "defense",
                                                "at_method", "seed", "run_dir", "config", "versions")})
        for checkpoint in source.checkpoints(run_id):
            shared.record_checkpoint(run_id, checkpoint["epoch"], checkpoint["path"], checkpoint["metrics"],
                                     checkpoint["seconds"])
        shared.update_run(run_id, epochs_done=run["epochs_done"], best_epoch=run["best_epoch"])
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    processes = [
        subprocess.Popen([sys.executable, *_command(postgres_url, run_id, "--shard", f"{k}/2", "--no-checks")],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        for k in (1, 2)
    ]
    for process in processes:
        _, err = process.communicate(timeout=600)
        assert process.returncode == 0, err
    assert _outcomes(postgres_url, run_id) == expected
    with Store(postgres_url) as shared:
        assert refused_evaluations(shared) == []
