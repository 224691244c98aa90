import signal
import subprocess
import sys
import textwrap
import time

import pytest

from advdef.errors import UserError
from advdef.store import Store

RUN = {
    "run_id": "r1", "status": "trained", "dataset": "digits", "arch": "smallcnn", "defense": "none",
    "at_method": "standard", "seed": 0, "run_dir": "/tmp/r1", "config": {"epochs": 1}, "versions": {"torch": "x"},
}
PROTOCOL = {"eps": "8/255", "norm": "Linf", "n": 3, "sample_hash": "abc", "seed": 0}


def test_round_trip_of_runs_checkpoints_evaluations_and_outcomes():
    store = Store(memory=True)
    store.insert_run(RUN)
    store.record_checkpoint("r1", 1, "/tmp/r1/epoch-001.json", {"val_clean": 0.5}, 1.5)
    store.update_run("r1", epochs_done=1, best_epoch=1)
    eval_id = store.get_or_create_evaluation("r1", "key", PROTOCOL, [4, 5, 6])
    assert store.get_or_create_evaluation("r1", "key", PROTOCOL, [4, 5, 6]) == eval_id
    store.start_attack(eval_id, "clean", {"implementation": "advdef"})
    store.record_outcomes(eval_id, "clean", [(4, 1, 1, 1), (5, 2, 0, 3), (6, 0, None, None)], 0.25)
    store.finish_attack(eval_id, "clean", {"implementation": "advdef", "warnings": []})

    run = store.get_run("r1")
    assert run["config"] == {"epochs": 1} and run["best_epoch"] == 1
    assert store.checkpoints("r1")[0]["metrics"] == {"val_clean": 0.5}
    evaluation = store.evaluations("r1")[0]
    assert evaluation["protocol"] == PROTOCOL and evaluation["sample_ids"] == [4, 5, 6]
    attack = store.eval_attacks(eval_id)[0]
    assert attack["status"] == "done" and attack["seconds"] == 0.25
    rows = store.outcomes(eval_id, "clean")
    assert [(r["sample_id"], r["robust"], r["prediction"]) for r in rows] == [(4, 1, 1), (5, 0, 3), (6, None, None)]


def test_missing_run_is_a_user_error_with_suggestions():
    store = Store(memory=True)
    store.insert_run(RUN)
    with pytest.raises(UserError, match="did you mean r1"):
        store.get_run("r2")


def test_a_failed_transaction_leaves_nothing():
    store = Store(memory=True)
    with pytest.raises(RuntimeError):
        with store.atomic():
            store.insert_run(RUN)  # nested: a savepoint
            raise RuntimeError("boom")
    assert store.runs() == []


def test_store_file_uses_wal(tmp_path):
    store = Store(tmp_path / "s.sqlite")
    assert store.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_update_refuses_unknown_fields():
    store = Store(memory=True)
    store.insert_run(RUN)
    with pytest.raises(ValueError):
        store.update_run("r1", dataset="cifar10")


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


def test_store_survives_a_killed_writer(tmp_path):
    path = tmp_path / "killed.sqlite"
    Store(path).insert_run(RUN)
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while time.time() < deadline:
        line = writer.stdout.readline()
        if line and int(line) >= 20:
            break
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    store = Store(path)
    assert store.conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    rows = store.outcomes(1, "pgd")
    assert len(rows) >= 2000 and len(rows) % 100 == 0, "only whole batches are stored"
    store.record_outcomes(1, "pgd", [(10**6, 0, 1, 0)], 0.0)  # and it takes writes again
