"""The store's behaviour, run on every backend: SQLite (a file) and PostgreSQL (a server, where one is set up).

The PostgreSQL cases skip, saying why, without $ADVDEF_TEST_POSTGRES (see tests/conftest.py).
"""

import signal
import subprocess
import sys
import textwrap
import time

import pytest

from advdef.errors import UserError
from advdef.store import Store
from advdef.store.schema import MIGRATIONS

RUN = {
    "run_id": "r1", "status": "trained", "dataset": "digits", "arch": "smallcnn", "defense": "none",
    "at_method": "standard", "seed": 0, "run_dir": "/tmp/r1", "config": {"epochs": 1}, "versions": {"torch": "x"},
}
PROTOCOL = {"eps": "8/255", "norm": "Linf", "n": 3, "sample_hash": "abc", "seed": 0}


@pytest.fixture(params=["sqlite", "postgresql"])
def location(request, tmp_path) -> str:
    """Where a fresh store goes: a new SQLite file, or a new schema on the PostgreSQL test server."""
    if request.param == "sqlite":
        return str(tmp_path / "advdef.sqlite")
    return request.getfixturevalue("postgres_url")


@pytest.fixture()
def store(location):
    with Store(location) as opened:
        yield opened


def test_round_trip_of_runs_checkpoints_evaluations_and_outcomes(store):
    store.insert_run(RUN)
    store.record_checkpoint("r1", 1, "/tmp/r1/epoch-001.json", {"val_clean": 0.5}, 1.5)
    store.record_checkpoint("r1", 1, "/tmp/r1/epoch-001.json", {"val_clean": 0.75}, 1.5)  # replaced
    store.update_run("r1", epochs_done=1, best_epoch=1)
    eval_id = store.get_or_create_evaluation("r1", "key", PROTOCOL, [4, 5, 6])
    assert store.get_or_create_evaluation("r1", "key", PROTOCOL, [4, 5, 6]) == eval_id
    store.start_attack(eval_id, "clean", {"implementation": "advdef"})
    store.record_outcomes(eval_id, "clean", [(4, 1, 1, 1), (5, 2, 0, 3), (6, 0, None, None)], 0.25)
    assert store.finish_attack(eval_id, "clean", {"implementation": "advdef", "warnings": []})

    run = store.get_run("r1")
    assert run["config"] == {"epochs": 1} and run["best_epoch"] == 1
    assert [c["metrics"] for c in store.checkpoints("r1")] == [{"val_clean": 0.75}]
    evaluation = store.evaluations("r1")[0]
    assert evaluation["protocol"] == PROTOCOL and evaluation["sample_ids"] == [4, 5, 6]
    attack = store.eval_attacks(eval_id)[0]
    assert attack["status"] == "done" and attack["seconds"] == 0.25
    rows = store.outcomes(eval_id, "clean")
    assert [(r["sample_id"], r["robust"], r["prediction"]) for r in rows] == [(4, 1, 1), (5, 0, 3), (6, None, None)]
    assert store.outcome_counts(eval_id) == {"clean": 3}


def test_numbers_keep_sqlite_width(store):
    """64-bit integers and doubles on every backend (PostgreSQL's INTEGER is 32-bit, its REAL a float4)."""
    store.insert_run({**RUN, "seed": 2**40, "train_seconds": 0.1 + 0.2})
    run = store.get_run("r1")
    assert run["seed"] == 2**40 and run["train_seconds"] == 0.1 + 0.2
    eval_id = store.get_or_create_evaluation("r1", "key", PROTOCOL, [1])
    store.start_attack(eval_id, "pgd", {})
    store.record_outcomes(eval_id, "pgd", [(1, 0, 1, 0)], 1 / 3, forwards=2**35)
    (attack,) = store.eval_attacks(eval_id)
    assert attack["seconds"] == 1 / 3 and attack["forwards"] == 2**35


def test_missing_run_is_a_user_error_with_suggestions(store):
    store.insert_run(RUN)
    with pytest.raises(UserError, match="did you mean r1"):
        store.get_run("r2")


def test_a_failed_transaction_leaves_nothing(store):
    with pytest.raises(RuntimeError):
        with store.atomic():
            store.insert_run(RUN)  # nested: a savepoint
            raise RuntimeError("boom")
    assert store.runs() == []
    store.insert_run(RUN)  # and the connection still works
    assert store.run_ids() == ["r1"]


def test_update_refuses_unknown_fields(store):
    store.insert_run(RUN)
    with pytest.raises(ValueError):
        store.update_run("r1", dataset="cifar10")


def test_attacks_keep_their_positions_and_finish_when_complete(store):
    store.insert_run(RUN)
    eval_id = store.get_or_create_evaluation("r1", "key", PROTOCOL, [1, 2, 3])
    for attack in ("clean", "fgsm", "pgd", "fgsm"):  # restarting fgsm keeps its place
        store.start_attack(eval_id, attack, {})
    assert [(a["attack"], a["position"]) for a in store.eval_attacks(eval_id)] == [("clean", 0), ("fgsm", 1), ("pgd", 2)]
    store.record_outcomes(eval_id, "fgsm", [(1, 0, 1, 0), (2, 0, 0, 1)], 0.5, forwards=4, backwards=2)
    assert not store.finish_attack(eval_id, "fgsm", {"warnings": ["a"]})  # one shard's part
    store.record_outcomes(eval_id, "fgsm", [(3, 0, 1, 0), (2, 0, 1, 0)], 0.5, forwards=4, backwards=2)  # 2 again
    assert store.finish_attack(eval_id, "fgsm", {"warnings": ["b"]})
    fgsm = store.eval_attacks(eval_id)[1]
    assert fgsm["status"] == "done" and fgsm["details"]["warnings"] == ["a", "b"]
    assert (fgsm["seconds"], fgsm["forwards"], fgsm["backwards"]) == (1.0, 8, 4)
    assert [(r["sample_id"], r["robust"]) for r in store.outcomes(eval_id, "fgsm")] == [(1, 1), (2, 1), (3, 1)]


def test_checks_keep_the_order_first_recorded(store):
    store.insert_run(RUN)
    eval_id = store.get_or_create_evaluation("r1", "key", PROTOCOL, [1])
    for name in ("zeta", "alpha", "mid"):
        store.record_check(eval_id, name, "pass", 0.5, 0.1, {})
    store.record_check(eval_id, "zeta", "fail", float("nan"), None, {"why": "x"})  # replaced in place
    checks = store.checks(eval_id)
    assert [c["name"] for c in checks] == ["zeta", "alpha", "mid"]
    assert (checks[0]["verdict"], checks[0]["figure"], checks[0]["detail"]) == ("fail", None, {"why": "x"})
    with pytest.raises(ValueError):
        store.record_check(eval_id, "x", "maybe", None, None, {})


def test_a_second_shard_count_is_refused_until_the_first_is_done(store):
    store.insert_run(RUN)
    eval_id = store.get_or_create_evaluation("r1", "key", PROTOCOL, [1])
    store.register_shard(eval_id, 1, 2, "a:1")
    store.register_shard(eval_id, 2, 2, "b:1")
    with pytest.raises(UserError, match="use --shard K/2"):
        store.register_shard(eval_id, 1, 3, "c:1")
    store.finish_shard(eval_id, 1, 2)
    store.finish_shard(eval_id, 2, 2)
    store.register_shard(eval_id, 1, 3, "c:1")
    assert [(s["shard"], s["shards"], s["status"]) for s in store.shards(eval_id)] == [
        (1, 2, "done"), (2, 2, "done"), (1, 3, "running")]


def test_tables_export_in_key_order(store):
    store.insert_run(RUN)
    eval_id = store.get_or_create_evaluation("r1", "key", PROTOCOL, [1, 2])
    store.start_attack(eval_id, "pgd", {})
    store.record_outcomes(eval_id, "pgd", [(2, 0, 1, 0), (1, 1, 0, 1)], 0.0)
    rows = store.table("outcomes")
    assert [(r["attack"], r["sample_id"]) for r in rows] == [("pgd", 1), ("pgd", 2)]
    assert list(rows[0]) == ["eval_id", "attack", "sample_id", "label", "robust", "prediction"]
    assert store.table("runs")[0]["config"] == '{"epochs": 1}', "exported as stored"
    with pytest.raises(UserError, match="unknown table"):
        store.table("sqlite_master")


def test_reopening_applies_no_migration_twice(location):
    Store(location).close()
    with Store(location) as store:
        assert sorted(r["name"] for r in store._query("SELECT name FROM _migrations")) == [n for n, _ in MIGRATIONS]


def test_store_file_uses_wal(tmp_path):
    store = Store(tmp_path / "s.sqlite")
    assert store.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


# -- several processes ------------------------------------------------------------------------------
WRITER = textwrap.dedent('''
    import sys, time
    from advdef.store import Store
    store = Store(sys.argv[1])
    eval_id = store.get_or_create_evaluation("r1", "key", {"eps": "8/255", "norm": "Linf", "n": 0, "sample_hash": "h", "seed": 0}, [])
    store.start_attack(eval_id, "pgd", {})
    batch = 0
    while True:
        store.record_outcomes(eval_id, "pgd", [(batch * 100 + i, 0, 1, 0) for i in range(100)], 0.0)
        batch += 1
        print(batch, flush=True)
''')


def test_store_survives_a_killed_writer(location):
    with Store(location) as store:
        store.insert_run(RUN)
    writer = subprocess.Popen([sys.executable, "-c", WRITER, location], stdout=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while time.time() < deadline:
        line = writer.stdout.readline()
        if line and int(line) >= 20:
            break
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    store = Store(location)
    if not store.is_server:
        assert store.conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    eval_id = store.evaluations("r1")[0]["eval_id"]
    rows = store.outcomes(eval_id, "pgd")
    assert len(rows) >= 2000 and len(rows) % 100 == 0, "only whole batches are stored"
    store.record_outcomes(eval_id, "pgd", [(10**6, 0, 1, 0)], 0.0)  # and it takes writes again
    store.close()


def _start_together(script: str, argv_per_process: list[list[str]], tmp_path) -> list[subprocess.CompletedProcess]:
    """Run one script in several processes, released at the same moment once all have opened the store."""
    go = tmp_path / "go"
    processes = [
        subprocess.Popen([sys.executable, "-c", script, str(go), *argv], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
        for argv in argv_per_process
    ]
    for process in processes:  # each prints 'ready' before waiting for the go file
        assert process.stdout.readline().strip() == "ready", process.stderr.read()
    go.touch()
    results = []
    for process in processes:
        out, err = process.communicate(timeout=300)
        results.append(subprocess.CompletedProcess(process.args, process.returncode, out, err))
    return results


# Two evaluators of one run, started together: both create the same evaluations, register as
# shards 1/2 and 2/2, start the same attacks (in opposite orders) and store outcome batches that
# overlap on samples 300..599 (one ascending, one descending), checks and their finish.
RACER = textwrap.dedent('''
    import os, sys, time
    from advdef.store import Store
    go, location, k = sys.argv[1], sys.argv[2], int(sys.argv[3])
    store = Store(location)
    print("ready", flush=True)
    while not os.path.exists(go):
        time.sleep(0.005)
    attacks = ["clean", "fgsm", "pgd"] if k == 1 else ["pgd", "fgsm", "clean"]
    samples = list(range(0, 600)) if k == 1 else list(range(899, 299, -1))
    for round in range(ROUNDS):
        protocol = {"eps": "8/255", "norm": "Linf", "n": 900, "sample_hash": "h", "seed": round}
        eval_id = store.get_or_create_evaluation("r1", f"key{round}", protocol, list(range(900)))
        store.register_shard(eval_id, k, 2, f"host{k}:{os.getpid()}")
        for attack in attacks:
            store.start_attack(eval_id, attack, {})
        for attack in attacks:
            for start in range(0, len(samples), BATCH):
                rows = [(s, s % 10, (s + k) % 2, k) for s in samples[start:start + BATCH]]
                store.record_outcomes(eval_id, attack, rows, 0.25, forwards=len(rows))
            store.record_check(eval_id, f"check_{attack}", "pass", 0.5, 0.1, {"by": k})
            store.finish_attack(eval_id, attack, {"warnings": [f"from {k}"]})
        store.finish_shard(eval_id, k, 2)
    print("finished", flush=True)
''')


def test_concurrent_writers_lose_and_duplicate_nothing(location, tmp_path):
    rounds, batch = 4, 50
    with Store(location) as store:
        store.insert_run(RUN)
    script = RACER.replace("ROUNDS", str(rounds)).replace("BATCH", str(batch))
    results = _start_together(script, [[location, "1"], [location, "2"]], tmp_path)
    for result in results:
        assert result.returncode == 0 and "finished" in result.stdout, result.stderr

    with Store(location) as store:
        evaluations = store.evaluations("r1")
        assert sorted(e["protocol_key"] for e in evaluations) == [f"key{r}" for r in range(rounds)], "one per key"
        for evaluation in evaluations:
            eval_id = evaluation["eval_id"]
            attacks = store.eval_attacks(eval_id)
            assert sorted(a["position"] for a in attacks) == [0, 1, 2], "distinct positions"
            for attack in attacks:
                rows = store.outcomes(eval_id, attack["attack"])
                assert [r["sample_id"] for r in rows] == list(range(900)), "each sample exactly once"
                assert attack["status"] == "done", "the last shard to finish saw every outcome"
                assert attack["details"]["warnings"] == ["from 1", "from 2"], "both shards' warnings kept"
                assert attack["forwards"] == 2 * 600, "each stored batch's cost counted once"
            assert store.outcome_counts(eval_id) == {"clean": 900, "fgsm": 900, "pgd": 900}
            assert sorted(c["position"] for c in store.checks(eval_id)) == [1, 2, 3]
            assert [(s["shard"], s["status"]) for s in store.shards(eval_id)] == [(1, "done"), (2, "done")]


SHARDER = textwrap.dedent('''
    import os, sys, time
    from advdef.errors import UserError
    from advdef.store import Store
    go, location, shards = sys.argv[1], sys.argv[2], int(sys.argv[3])
    store = Store(location)
    eval_id = store.get_or_create_evaluation("r1", "key", {"eps": "8/255", "norm": "Linf", "n": 1, "sample_hash": "h", "seed": 0}, [0])
    print("ready", flush=True)
    while not os.path.exists(go):
        time.sleep(0.005)
    try:
        store.register_shard(eval_id, 1, shards, "host")
        print("registered")
    except UserError:
        print("refused")
''')


def test_two_shard_counts_racing_leave_one_registered(location, tmp_path):
    with Store(location) as store:
        store.insert_run(RUN)
    results = _start_together(SHARDER, [[location, "2"], [location, "3"]], tmp_path)
    assert all(r.returncode == 0 for r in results), [r.stderr for r in results]
    assert sorted(r.stdout.strip() for r in results) == ["refused", "registered"]
    with Store(location) as store:
        assert len(store.shards(store.evaluations("r1")[0]["eval_id"])) == 1


OPENER = textwrap.dedent('''
    import os, sys, time
    go, location = sys.argv[1], sys.argv[2]
    from advdef.store import Store
    print("ready", flush=True)
    while not os.path.exists(go):
        time.sleep(0.005)
    Store(location).close()
''')


def test_processes_opening_a_fresh_store_together_migrate_it_once(location, tmp_path):
    results = _start_together(OPENER, [[location]] * 3, tmp_path)
    assert all(r.returncode == 0 for r in results), [r.stderr for r in results]
    with Store(location) as store:
        applied = [r["name"] for r in store._query("SELECT name FROM _migrations ORDER BY name")]
        assert applied == [name for name, _ in MIGRATIONS]
        store.insert_run(RUN)  # and the schema is whole
        assert store.run_ids() == ["r1"]


def test_an_older_sqlite_store_keeps_its_checks_order(tmp_path, monkeypatch):
    """Before 0005 the order first recorded was SQLite's rowid; the migration carries it into a column."""
    import advdef.store.sqlite as sqlite_store

    path = tmp_path / "old.sqlite"
    monkeypatch.setattr(sqlite_store, "MIGRATIONS", [m for m in MIGRATIONS if m[0] < "0005"])
    with Store(path) as old:
        old.insert_run(RUN)
        eval_id = old.get_or_create_evaluation("r1", "key", PROTOCOL, [1])
        for name in ("zeta", "alpha"):  # what the code of that time wrote
            old.conn.execute("INSERT INTO checks VALUES (?, ?, 'pass', 0.5, 0.1, '{}', 'then')", (eval_id, name))
    monkeypatch.setattr(sqlite_store, "MIGRATIONS", MIGRATIONS)
    with Store(path) as store:
        store.record_check(eval_id, "beta", "pass", None, None, {})
        store.record_check(eval_id, "zeta", "fail", None, None, {})
        assert [(c["name"], c["verdict"]) for c in store.checks(eval_id)] == [
            ("zeta", "fail"), ("alpha", "pass"), ("beta", "pass")]
