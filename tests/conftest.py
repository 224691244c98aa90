"""Shared fixtures: small real models trained once per session on the embedded digits."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import pytest
import torch

from advdef.store import Store
from advdef.training.config import TrainConfig
from advdef.training.trainer import start_run

SHARED_CIFAR = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpeg"

# Two threads at most: CI and developer machines here have 2 cores (measured: the suite takes
# 75 s with two threads, 87 s with one, on an idle machine).
torch.set_num_threads(min(2, torch.get_num_threads()))


# CPU-size variants of each architecture (same topology, fewer channels), for table-driven tests.
TINY = {
    "smallcnn": "smallcnn:width=4",
    "resnet18": "resnet18:width=4",
    "preact_resnet18": "preact_resnet18:width=4",
    "wrn34_10": "wrn34_10:widen_factor=1,width=4",
    "wrn28_10": "wrn28_10:widen_factor=1,width=4",
    "vgg16_bn": "vgg16_bn:width=4",
}


def quick_config(**overrides) -> TrainConfig:
    """A SmallCNN config that trains in seconds on CPU."""
    base = dict(data="digits", arch="smallcnn:width=16", defense="none", at="standard", epochs=4,
                batch_size=64, lr=0.05, device="cpu")
    base.update(overrides)
    return TrainConfig(**base)


@pytest.fixture(scope="session")
def trained_store(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """A store file with a standard-trained and a PGD-AT-trained SmallCNN (run ids by method)."""
    root = tmp_path_factory.mktemp("trained")
    path = root / "advdef.sqlite"
    with Store(path) as store:
        runs = {
            "standard": start_run(quick_config(at="standard", epochs=6), store, root / "runs"),
            "pgd_at": start_run(quick_config(at="pgd_at:eps=16/255", epochs=6), store, root / "runs"),
        }
    return path, runs


@pytest.fixture()
def store(tmp_path) -> Store:
    with Store(tmp_path / "advdef.sqlite") as opened:
        yield opened


@pytest.fixture()
def eval_store(trained_store, tmp_path) -> tuple[Store, dict[str, str]]:
    """A private copy of the trained store, so evaluations never leak between tests."""
    import shutil

    path, runs = trained_store
    source = Store(path)
    source.conn.execute("PRAGMA wal_checkpoint(FULL)")
    source.close()
    copy = tmp_path / "copy.sqlite"
    shutil.copy(path, copy)
    return Store(copy), runs


# -- PostgreSQL stores --------------------------------------------------------------------------
POSTGRES_ENV = "ADVDEF_TEST_POSTGRES"  # a server URL whose role may CREATE SCHEMA; .ci/run sets it


def with_search_path(url: str, schema: str) -> str:
    """The URL with the session's search_path set to one schema, so a store's tables land there."""
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query) if k != "options"] + [("options", f"-csearch_path={schema}")]
    return urlunsplit((parts.scheme, parts.netloc, parts.path, urlencode(query), parts.fragment))


@pytest.fixture()
def postgres_url() -> Iterator[str]:
    """A store URL on the test server, in a fresh empty schema of its own that is dropped afterwards.

    Skips (saying why) without $ADVDEF_TEST_POSTGRES, psycopg or a reachable server, so the suite
    runs anywhere; .ci/run installs and starts a server so CI runs these tests for real.
    """
    server = os.environ.get(POSTGRES_ENV)
    if not server:
        pytest.skip(f"no PostgreSQL test server: set {POSTGRES_ENV}=postgresql://... (.ci/run does)")
    psycopg = pytest.importorskip("psycopg", reason="psycopg is not installed: pip install 'advdef[postgres]'")
    from psycopg import sql

    try:
        admin = psycopg.connect(server, autocommit=True, connect_timeout=5)
    except psycopg.Error as error:
        pytest.skip(f"PostgreSQL test server unreachable: {str(error).strip().splitlines()[0]}")
    schema = f"advdef_test_{uuid.uuid4().hex[:12]}"
    with admin:
        admin.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
        try:
            yield with_search_path(server, schema)
        finally:
            admin.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema)))


def interrupt_evaluation(monkeypatch, source: Store, run_id: str, config, *, nth: int, selects) -> Store:
    """Evaluate `run_id` into a fresh in-memory store (the run copied from `source`), raising
    KeyboardInterrupt from `Store.record_outcomes` on its `nth` call that `selects(attack, costs)`
    picks: a kill mid-attack, after the earlier batches were stored. Returns the half-filled store."""
    from advdef.evaluation.engine import evaluate_run

    calls = {"n": 0}
    original = Store.record_outcomes

    def flaky(self, eval_id, attack, rows, seconds, **costs):
        if selects(attack, costs):
            calls["n"] += 1
            if calls["n"] == nth:
                raise KeyboardInterrupt
        return original(self, eval_id, attack, rows, seconds, **costs)

    fresh = Store(memory=True)
    fresh.insert_run(source.get_run(run_id))
    monkeypatch.setattr(Store, "record_outcomes", flaky)
    with pytest.raises(KeyboardInterrupt):
        evaluate_run(fresh, run_id, config)
    monkeypatch.setattr(Store, "record_outcomes", original)
    assert calls["n"] == nth, "the interruption hit a selected batch"
    return fresh
